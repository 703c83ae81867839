"""The Step1X-Edit training task (`step1x_training.py`): its encodings and model call are the pipeline's own, its
direct-distillation schedule is the pipeline's, and (integration, needs diffsynth-training) the trainer picks it
from the `stepfun-ai/Step1X-Edit` preset and trains a LoRA `Step1XEditPipeline` loads."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.flux.pipeline import latent_ids, pack_latents
from diffsynth.flux.step1x import Step1XEditPipeline, encode_instructions, step1x_velocity
from diffsynth.flux.step1x_training import Step1XTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor

PROMPTS = ["make the sky red", 'write "OK" on the sign']


def _files(base):
    repo, qwen = base / "stepfun-ai" / "Step1X-Edit", base / "Qwen" / "Qwen2.5-VL-7B-Instruct"
    configs = [ModelConfig(path=str(repo / n)) for n in ("step1x-edit-i1258.safetensors", "vae.safetensors")]
    return configs + [ModelConfig(path=str(qwen / "model-00001-of-00001.safetensors"))], ModelConfig(path=str(qwen))


@pytest.fixture(scope="module")
def task(step1x_base):
    configs, processor = _files(step1x_base)
    return Step1XTrainingTask.from_pretrained(configs, tokenizer_config=processor, torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def pipe(step1x_base):
    configs, processor = _files(step1x_base)
    return Step1XEditPipeline.from_pretrained(configs, processor_config=processor, torch_dtype="float32", device="cpu")


def picture(seed, width=64, height=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rows():
    """Targets 64x64; the first source 48x80 (resized to the target's size, as the pipeline does), the second
    64x64 under DiffSynth-Studio's column name and ours."""
    return [
        {"prompt": PROMPTS[0], "image": pil_to_tensor(picture(1))[0], "step1x_reference_image": pil_to_tensor(
            picture(2, 48, 80))[0]},
        {"prompt": PROMPTS[1], "image": pil_to_tensor(picture(3))[0], "reference_image": pil_to_tensor(picture(4))[0]},
    ]  # fmt: skip


def test_task_attributes_and_the_preset_names_it():
    from diffsynth.flux.presets import PRESETS

    assert PRESETS["stepfun-ai/Step1X-Edit"].training == "diffsynth.flux.step1x_training:Step1XTrainingTask"
    assert (Step1XTrainingTask.family, Step1XTrainingTask.denoiser_slot, Step1XTrainingTask.media) == (
        "flux", "dit", ("image",),
    )  # fmt: skip
    assert Step1XTrainingTask.conditioning == ("step1x_reference_image", "reference_image")


def test_encode_and_collate_give_the_pipeline_encodings(task, pipe):
    batch = task.collate(task.encode(rows()))
    assert batch["latents"].shape == (2, 16, 8, 8) and batch["reference"].shape == (2, 16, 64)
    for i, row in enumerate(rows()):
        source = pil_to_tensor(picture(2, 48, 80) if i == 0 else picture(4))[0]
        image = Image.fromarray(((source.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
        image = image.resize((64, 64), Image.BICUBIC) if image.size != (64, 64) else image
        with torch.no_grad():
            states, mask = encode_instructions(pipe.text_encoder, pipe.processor, [row["prompt"]], image)
            reference = pack_latents(pipe.vae.encode(pil_to_tensor([image])))
            target = pipe.vae.encode(row["image"][None])
        assert torch.equal(batch["states"][i], states[0]) and torch.equal(batch["mask"][i], mask[0])
        torch.testing.assert_close(batch["reference"][i], reference[0])
        torch.testing.assert_close(batch["latents"][i], target[0])


def test_velocity_is_the_pipeline_per_step_call(task, pipe):
    """One sigma per row (training) and one shared (the pipeline's loop): the pipeline's `step1x_velocity`."""
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        ids = latent_ids(8, 8)
        for i in range(2):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            want = step1x_velocity(
                pipe.dit, pipe.step1x_connector, pack_latents(noisy[i : i + 1]), one["reference"], ids,
                one["states"], one["mask"], sigma[i],
            )  # fmt: skip
            torch.testing.assert_close(pack_latents(ours[i : i + 1]), want, atol=1e-6, rtol=1e-5)
    assert ours.shape == noisy.shape


def test_direct_distillation_samples_on_the_pipelines_schedule(task, pipe):
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    source = picture(7)
    row = {"prompt": PROMPTS[0], "image": pil_to_tensor(picture(6))[0], "step1x_reference_image": pil_to_tensor(
        source)[0]}  # fmt: skip
    options = dict(reference_image=source, height=64, width=64)
    check_distill_matches_pipeline(task, pipe, row, timestep_arg=4, **options)


def test_errors_name_the_row_and_the_flag(task, step1x_base):
    with pytest.raises(ConfigError, match="row 0 of the batch"):
        task.encode([{"prompt": "x", "image": torch.zeros(3, 64, 64)}])
    configs, _ = _files(step1x_base)
    with pytest.raises(ConfigError, match="--tokenizer_path"):
        Step1XTrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="edits one image"):
        task.reference_arguments([picture(1), picture(2)])


# ----------------------------------------------------------------------------------------- the trainer
@pytest.mark.integration
def test_the_preset_trains_a_lora_the_pipeline_loads(step1x_base, pipe, tmp_path, monkeypatch):
    """`diffsynth-train --model stepfun-ai/Step1X-Edit` (no --family: the preset's task) on two edit triples:
    finite losses, and the LoRA it writes changes what `Step1XEditPipeline` makes."""
    from diffsynth.training.cli import main
    from diffsynth.training.testing import TINY_SETTINGS, logged_losses, write_metadata

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(step1x_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        picture(10 + i).save(data / f"img{i}.png")
        picture(20 + i).save(data / f"src{i}.png")
    write_metadata(data, [{"image": f"img{i}.png", "step1x_reference_image": f"src{i}.png", "prompt": PROMPTS[i]}
                          for i in range(2)])  # fmt: skip
    argv = ["--model", "stepfun-ai/Step1X-Edit", "--dataset_base_path", str(data), "--output_path", str(tmp_path / "o")]
    for name, value in TINY_SETTINGS.items():
        argv += [f"--{name}", str(value)]
    assert main([*argv, "--dataset_repeat", "2"]) == 0
    losses = logged_losses(tmp_path / "o")
    assert len(losses) == 2 and all(np.isfinite(losses))
    run = dict(reference_image=picture(30), num_inference_steps=2, cfg_scale=1.0, seed=0, output_type="np")
    before = pipe("make the sky red", **run)
    pipe.load_lora(str(tmp_path / "o" / "step-000002.safetensors"), fuse=False, name="trained")
    try:
        after = pipe("make the sky red", **run)
    finally:
        pipe.clear_loras()
    assert np.abs(after - before).max() > 1e-4
