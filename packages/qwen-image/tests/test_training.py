"""The Qwen-Image training task: its encodings and model call are the pipeline's own, and the trainer
(`diffsynth-train --family qwen_image`) trains it end to end on the tiny repo.

The trainer tests are `integration` (they need diffsynth-training installed, which the per-package session does
not install); the task tests need only this package and the runtime.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.pipeline import qwen_image_velocity
from diffsynth.qwen_image.training import QwenImageTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import configs_from_folder

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "cfg_scale": 1.0, "progress_bar": False}


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def task(t2i_repo):
    configs, tokenizer = configs_from_folder(t2i_repo)
    return QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu"
    )


def rows():
    g = torch.Generator().manual_seed(0)
    return [{"prompt": p, "image": torch.rand(3, 64, 64, generator=g) * 2 - 1} for p in PROMPTS]


def test_task_declares_the_protocol_attributes(task):
    assert (task.family, task.denoiser_slot, task.media, task.size_multiple) == ("qwen_image", "dit", ("image",), 16)
    assert set(task.models) == {"dit", "vae", "text_encoder"}
    assert set(task.model_files) == set(task.models)
    assert task.scheduler.template == "qwen_image" and task.scheduler.template_defaults == {"mu": 0.8}


def test_encode_and_collate_give_the_pipeline_encodings(task, pipe):
    batch_rows = rows()
    samples = task.encode(batch_rows)
    text, mask = pipe.encode_prompt(PROMPTS)
    assert mask.shape[0] == 2 and mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]  # two prompt lengths
    for sample, m in zip(samples, mask, strict=True):
        assert sample["latents"].shape == (16, 8, 8)
        assert sample["text"].shape == (int(m.sum()), 32)  # the prompt's own tokens, no padding
    batch = task.collate(samples)
    assert batch["latents"].shape == (2, 16, 8, 8)
    assert torch.equal(batch["text"], text) and torch.equal(batch["text_mask"], mask)  # padded as the pipeline
    pixels = torch.stack([r["image"] for r in batch_rows])[:, :, None]
    assert torch.equal(batch["latents"], pipe.vae.encode(pixels)[:, :, 0].float())


def test_velocity_is_the_pipeline_per_step_call(task, pipe):
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        theirs = qwen_image_velocity(pipe.dit, noisy, sigma, *pipe.encode_prompt(PROMPTS))
    assert ours.shape == (2, 16, 8, 8) and torch.equal(ours, theirs)


def test_direct_distillation_samples_on_the_pipelines_schedule(task, pipe):
    """`inference_sigmas` (what `--task direct_distill` steps along) is the schedule the pipeline's DiT sees at
    64x48 pixels in 3 steps, and stepping a seed's noise along it with the task's velocity gives the latent the
    pipeline decodes for that seed."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 64, 48)}
    check_distill_matches_pipeline(task, pipe, row, timestep_arg=1, height=64, width=48)


@pytest.mark.parametrize(
    "preset", [{"exponential_shift_mu": 0.9162907318741551}, {"sigma_template": "lightning"}], ids=["mu", "lightning"]
)
def test_direct_distillation_follows_the_presets_schedule(task, pipe, preset, monkeypatch):
    """A preset's schedule settings (Qwen-Image-Distill's `exponential_shift_mu` ln 2.5, the Lightning presets'
    `sigma_template`), which `load_partial_pipeline` puts in the task's `pipe.defaults`, are what it samples with."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    for name, value in preset.items():
        monkeypatch.setitem(task.pipe.defaults, name, value)
        monkeypatch.setitem(pipe.defaults, name, value)
    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 64, 48)}
    check_distill_matches_pipeline(task, pipe, row, timestep_arg=1, height=64, width=48)


def test_stages_load_only_what_they_need(tiny_repo):
    configs, tokenizer = configs_from_folder(tiny_repo)
    trainer_side = QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", encoders=False
    )
    assert set(trainer_side.models) == {"dit"} and trainer_side.pipe.tokenizer is None
    encoder_side = QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(encoder_side.models) == {"vae", "text_encoder"}


def test_edit_models_are_recognised(task, tiny_repo, tmp_path):
    """A `processor/` tokenizer or Edit-2511's `zero_cond_t` DiT makes an Edit task (rows need edit_image; see
    test_training_edit.py); the text-to-image task takes rows as they come."""
    assert task.edit is None and task.conditioning == ("edit_image",)
    configs, _ = configs_from_folder(tiny_repo)
    processor = ModelConfig(path=str(tiny_repo / "processor"))
    edit = QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=processor, encoders=False)
    assert edit.edit is True
    hub_processor = ModelConfig(model_id="Qwen/Qwen-Image-Edit-2509", origin_file_pattern="processor/")
    assert QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=hub_processor, encoders=False).edit
    edit_dit = tmp_path / "transformer"
    shutil.copytree(tiny_repo / "transformer", edit_dit)
    config = json.loads((edit_dit / "config.json").read_text())
    (edit_dit / "config.json").write_text(json.dumps({**config, "zero_cond_t": True}))
    dit_config = ModelConfig(path=[str(p) for p in edit_dit.glob("*.safetensors")])
    zero_cond = QwenImageTrainingTask.from_pretrained([dit_config], torch_dtype="float32", encoders=False)
    assert zero_cond.edit is True
    with pytest.raises(ConfigError, match="row 0 of the batch"):
        task.encode([{"prompt": "x"}])


@pytest.mark.parametrize("stage", [{"denoiser": False}, {"encoders": False}])
def test_a_local_edit_folder_is_an_edit_model(tiny_repo, t2i_repo, stage):
    """A local folder laid out as Qwen-Image-Edit's hub repo (`processor/` beside `tokenizer/`, which the folder's
    configs name) makes an Edit task in both stages: rows without edit_image are refused at setup. Qwen/Qwen-Image's
    layout (no `processor/`) stays text-to-image."""
    configs, tokenizer = configs_from_folder(tiny_repo)
    assert Path(tokenizer.path).name == "tokenizer"
    edit = QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", **stage)
    assert edit.edit is True and edit.validation_references == "expected"
    with pytest.raises(ConfigError, match="column edit_image: empty"):
        edit.check_row({"image": "0.png", "prompt": "x"}, None)
    configs, tokenizer = configs_from_folder(t2i_repo)
    plain = QwenImageTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", **stage)
    assert plain.edit is None
    plain.check_row({"image": "0.png", "prompt": "x"}, None)


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def train(t2i_repo, tmp_path_factory):
    """`diffsynth-train --family qwen_image` on the tiny repo and two captioned noise pictures, each seen twice."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = testing.write_caption_dataset(tmp_path_factory.mktemp("qwen-data"), PROMPTS)
    return testing.CliTrainer(t2i_repo, "qwen_image", dataset, "--dataset_repeat", "2")


@pytest.mark.integration
def test_lora_training_gives_a_lora_the_pipeline_loads(tiny_repo, train, tmp_path):
    from diffsynth.training.testing import outputs_before_and_after_lora

    losses = train(tmp_path / "out")
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    lora = tmp_path / "out" / "step-000002.safetensors"
    base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], seed=0, output_type="pt", **FAST)
    assert after.shape == base.shape == (1, 3, 64, 64)
    assert (after - base).abs().max() > 1e-4  # the LoRA changes the image


@pytest.mark.integration
def test_full_training_writes_weights_the_pipeline_loads(tiny_repo, pipe, train, tmp_path):
    from diffsynth.training.testing import configs_with_trained_weights

    losses = train(tmp_path / "out", "--trainable_models", "dit", "--max_steps", "1")
    assert len(losses) == 1 and np.isfinite(losses[0])
    configs = configs_with_trained_weights(tiny_repo, tmp_path / "out" / "step-000001" / "dit")  # asserts files
    tokenizer = ModelConfig(path=str(tiny_repo / "tokenizer"))
    tuned = QwenImagePipeline.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    image, reference = (p(PROMPTS[1], seed=1, output_type="pt", **FAST) for p in (tuned, pipe))
    assert (image - reference).abs().max() > 1e-5


@pytest.mark.integration
def test_cached_two_stage_training_gives_the_on_the_fly_loss(train, tmp_path):
    direct, cached = train.direct_and_cached(tmp_path, "--max_steps", "1")
    assert len(direct) == len(cached) == 1
    assert cached[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-7)
