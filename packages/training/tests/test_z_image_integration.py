"""Z-Image trained end to end by the trainer on the tiny random hub-style repo of the z-image tests.

Integration: needs diffsynth-z-image installed (the `integration` nox session installs every package).
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("diffsynth.z_image")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from diffsynth.runtime import ModelConfig, load_model  # noqa: E402
from diffsynth.training.config import TrainConfig  # noqa: E402
from diffsynth.training.data import batch_plan  # noqa: E402
from diffsynth.training.testing import (  # noqa: E402
    assert_same_training,
    load_module,
    outputs_before_and_after_lora,
    tiny_config,
    train_direct_and_cached,
    write_caption_dataset,
)
from diffsynth.training.trainer import TrainState, save, setup, train, train_step  # noqa: E402
from diffsynth.z_image import ZImagePipeline  # noqa: E402
from diffsynth.z_image.pipeline import z_image_velocity  # noqa: E402

pytestmark = pytest.mark.integration

FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "progress_bar": False}


def _z_image_test_helpers():
    return load_module(Path(__file__).parents[2] / "z-image" / "tests" / "conftest.py", "z_image_tiny_repo")


def config(repo, data, output, **overrides) -> TrainConfig:
    return tiny_config(repo, "z_image", data, output, **{"learning_rate": 1e-3, **overrides})


def test_lora_training_gives_a_lora_the_pipeline_applies_exactly(z_image_repo, z_image_dataset, tmp_path):
    run = setup(config(z_image_repo, z_image_dataset, tmp_path / "out", lora_formats=["diffsynth", "kohya"]))
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss) and state.loss > 0
    save(run, state)

    pipe = ZImagePipeline.from_pretrained(str(z_image_repo), torch_dtype="float32", device="cpu")
    base = pipe("a red circle on a blue background", seed=0, output_type="pt", **FAST)
    g = torch.Generator().manual_seed(3)
    latents, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.7])
    text = pipe.encode_prompt(["a red circle on a blue background"])
    with torch.no_grad():
        trained = z_image_velocity(run.model, latents, sigma, text)
        for suffix in ("", ".kohya"):
            pipe.load_lora(tmp_path / "out" / f"step-000002{suffix}.safetensors", fuse=False, name="trained")
            torch.testing.assert_close(z_image_velocity(pipe.dit, latents, sigma, text), trained, atol=1e-5, rtol=1e-5)
    after = pipe("a red circle on a blue background", seed=0, output_type="pt", **FAST)
    assert (after - base).abs().max() > 1e-3  # the LoRA changes the image


def test_cached_two_stage_training_equals_direct_training(z_image_repo, z_image_dataset, tmp_path):
    runs = train_direct_and_cached(config(z_image_repo, z_image_dataset, tmp_path))
    assert runs.state.step == 2
    assert_same_training(runs, step=2, atol=1e-6)


def test_full_finetune_writes_official_weights_that_load_strictly(z_image_repo, z_image_dataset, tmp_path):
    train(
        config(
            z_image_repo, z_image_dataset, tmp_path / "out", trainable_models=["dit"], max_steps=1, learning_rate=1e-3
        )
    )
    folder = tmp_path / "out" / "step-000001" / "dit"
    saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(z_image_repo / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == original.keys()  # the official (diffusers) key layout
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (z_image_repo / "transformer" / "config.json").read_text()
    )
    assert any(not torch.equal(saved[k], original[k]) for k in saved)

    dit = load_model(str(folder / "diffusion_pytorch_model.safetensors"), torch_dtype="float32")  # strict load
    for key, value in dit.state_dict().items():
        assert torch.equal(value, saved[key]), key
    configs = [
        ModelConfig(path=str(folder / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(z_image_repo / "vae" / "diffusion_pytorch_model.safetensors")),
        ModelConfig(path=str(z_image_repo / "text_encoder" / "model.safetensors")),
    ]
    tuned = ZImagePipeline.from_pretrained(
        configs, tokenizer_config=ModelConfig(path=str(z_image_repo / "tokenizer")), torch_dtype="float32", device="cpu"
    )
    base = ZImagePipeline.from_pretrained(str(z_image_repo), torch_dtype="float32", device="cpu")
    prompt = "a small green square in the top left corner"
    image, reference = tuned(prompt, seed=1, output_type="pt", **FAST), base(prompt, seed=1, output_type="pt", **FAST)
    assert image.shape == (1, 3, 64, 64) and (image - reference).abs().max() > 1e-4


def test_validation_samples_are_the_pipeline_with_the_lora_in_training(z_image_repo, z_image_dataset, tmp_path):
    """The sample written at the last step is what the pipeline draws with the saved LoRA applied."""
    import numpy as np
    from PIL import Image

    size = {"validation_height": 32, "validation_width": 32, "validation_num_inference_steps": 2}
    train(config(z_image_repo, z_image_dataset, tmp_path / "out", validation_prompts=["a red circle"], **size))
    drawn = np.asarray(Image.open(tmp_path / "out" / "validation" / "step-000002-0.png"))

    pipe = ZImagePipeline.from_pretrained(str(z_image_repo), torch_dtype="float32", device="cpu")
    fast = {"seed": 0, "height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False}
    pictures = outputs_before_and_after_lora(
        pipe, str(tmp_path / "out" / "step-000002.safetensors"), "a red circle", **fast
    )
    base, expected = (np.asarray(picture).astype(int) for picture in pictures)
    assert drawn.shape == (32, 32, 3)
    assert np.abs(drawn - expected).max() <= 1  # PNG rounding of the same picture
    assert np.abs(drawn - base).max() > 1  # and not the base model's


@pytest.mark.parametrize("preset", ["Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image-Turbo"])
def test_validation_samples_draw_with_the_presets_settings(z_image_repo, tmp_path, monkeypatch, preset):
    """`--model Org/Name` expands to the preset's files; the task's pipeline keeps the preset's steps and
    guidance, so a Z-Image (base) LoRA is validated at 50 steps with CFG 5, not at Turbo's 9 without CFG."""
    import shutil

    from diffsynth.training.task import model_sources
    from diffsynth.training.trainer import build_task, task_class
    from diffsynth.z_image.presets import PRESETS

    base = tmp_path / "models"
    shutil.copytree(z_image_repo, base / preset)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    cfg = TrainConfig(model=preset, dataset_base_path=str(tmp_path), family="z_image", dtype="float32")
    task = build_task(task_class(cfg), cfg, "cpu", encoders=True, denoiser=True)
    assert model_sources(cfg)[0][0].model_id == preset  # the files came from the preset, not a folder
    wanted = PRESETS[preset].defaults
    assert {k: task.pipe.defaults.get(k) for k in wanted} == wanted
    assert PRESETS["Tongyi-MAI/Z-Image"].defaults != PRESETS["Tongyi-MAI/Z-Image-Turbo"].defaults


def test_direct_distillation_samples_as_the_pipeline_does(z_image_repo, tmp_path):
    """`--task direct_distill` before any update: a row's few-step sample (its seed's noise, the task's schedule,
    the task's DiT call) is the latent `ZImagePipeline` decodes for that prompt, seed and step count at cfg 1."""
    from diffsynth.training.trainer import distill_plan, distill_sample, prepare_batch

    prompt = _z_image_test_helpers().CAPTIONS[0]
    data = write_caption_dataset(tmp_path / "data", [prompt], extra=[{"seed": 5, "num_inference_steps": 3}])
    run = setup(config(z_image_repo, data, tmp_path / "out", task="direct_distill", batch_size=1))
    items = [run.dataset[0]]
    with torch.no_grad():
        got = distill_sample(run, run.model, prepare_batch(run, items), distill_plan(run.config, items))
    pipe = ZImagePipeline.from_pretrained(str(z_image_repo), torch_dtype="float32", device="cpu")
    decoded = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: (decoded.append(z.clone()), decode(z, **kw))[1]
    pipe(prompt, seed=5, num_inference_steps=3, cfg_scale=1.0, height=64, width=64, progress_bar=False)
    (want,) = decoded
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_qlora_trains_a_lora_on_a_4bit_dit_that_the_4bit_pipeline_applies_exactly(
    z_image_repo, z_image_dataset, tmp_path
):
    """`--quantize dit=bitsandbytes_nf4` (QLoRA): the DiT's Linears load in NF4 and stay as they are, only the LoRA
    trains, and the pipeline with the same 4-bit DiT and the saved LoRA computes the trained model's velocity.
    DiffSynth-Studio's `--quant_options MODEL:METHOD/EXCLUDED` names the same thing by file."""
    pytest.importorskip("bitsandbytes")
    from diffsynth.runtime.errors import ConfigError
    from diffsynth.runtime.quant import is_quantized_linear, quantize_config

    run = setup(config(z_image_repo, z_image_dataset, tmp_path / "out", quantize=["dit=bitsandbytes_nf4"]))
    dit = run.task.pipe.dit
    assert quantize_config(dit).method == "bitsandbytes_nf4"
    packed = {n: m.weight.detach().clone() for n, m in dit.named_modules() if is_quantized_linear(m)}
    assert packed and all(".lora_" in n for n in run.trainable)
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss) and state.loss > 0
    assert all(torch.equal(m.weight, packed[n]) for n, m in dit.named_modules() if n in packed)
    save(run, state)

    pipe = ZImagePipeline.from_pretrained(
        str(z_image_repo), torch_dtype="float32", device="cpu", quantize={"dit": "bitsandbytes_nf4"}
    )
    g = torch.Generator().manual_seed(3)
    latents, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.7])
    text = pipe.encode_prompt(["a red circle on a blue background"])
    with torch.no_grad():
        trained = z_image_velocity(run.model, latents, sigma, text)
        before = z_image_velocity(pipe.dit, latents, sigma, text)
        pipe.load_lora(tmp_path / "out" / "step-000002.safetensors", name="trained")  # kept apart on 4-bit layers
        torch.testing.assert_close(z_image_velocity(pipe.dit, latents, sigma, text), trained, atol=1e-5, rtol=1e-5)
    assert (trained - before).abs().max() > 1e-4

    transformer = str(z_image_repo / "transformer" / "diffusion_pytorch_model.safetensors")
    files = [transformer, *(str(z_image_repo / f) for f in ("vae/diffusion_pytorch_model.safetensors", "text_encoder"))]
    dss = config(z_image_repo, z_image_dataset, tmp_path / "dss", tokenizer_path=str(z_image_repo / "tokenizer"))
    dss = replace(dss, model=None, model_paths=files, quant_options=f"{transformer}:bitsandbytes_nf4/t_embedder.mlp.0")
    by_file = setup(dss)
    linears = [
        m for m in by_file.task.pipe.dit.modules() if isinstance(m, torch.nn.Linear) and not hasattr(m, "lora_A")
    ]
    assert quantize_config(by_file.task.pipe.dit).exclude_modules == ["t_embedder.mlp.0"]
    assert sum(not is_quantized_linear(m) for m in linears) >= 1  # the excluded layer stays plain
    with pytest.raises(ConfigError, match="--quantize dit=bitsandbytes_nf4: dit is trained in full"):
        setup(
            config(
                z_image_repo,
                z_image_dataset,
                tmp_path / "x",
                quantize=["dit=bitsandbytes_nf4"],
                trainable_models=["dit"],
            )
        )
    with pytest.raises(ConfigError, match="--quant_options 'nowhere:bitsandbytes_nf4': 'nowhere' is none of"):
        setup(config(z_image_repo, z_image_dataset, tmp_path / "y", quant_options="nowhere:bitsandbytes_nf4"))
    with pytest.raises(ConfigError, match="--quantize vae=int3: QuantizeConfig method='int3' is not supported"):
        setup(config(z_image_repo, z_image_dataset, tmp_path / "z", quantize=["vae=int3"]))


@pytest.mark.parametrize("quantize", [["dit=bitsandbytes_nf4"], ["torchao_int8_w8a16"]])
def test_dmd2_refuses_a_quantized_denoiser_before_loading(z_image_repo, z_image_dataset, tmp_path, quantize):
    """DMD2's fake score is a trainable full copy of the denoiser: a quantized one is refused by its flag."""
    from diffsynth.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"--quantize {quantize[0]} with --task dmd2: .*fake score"):
        setup(config(z_image_repo, z_image_dataset, tmp_path, task="dmd2", quantize=quantize))


def test_lora_on_an_int8_dit_is_what_the_int8_pipeline_applies(z_image_repo, z_image_dataset, tmp_path):
    """`--quantize dit=torchao_int8_w8a16`: the DiT's Linears hold torchao int8 weights that do not change, only the
    LoRA trains, and the pipeline with the same int8 DiT and the saved LoRA computes the trained velocity."""
    pytest.importorskip("torchao")
    from diffsynth.runtime.quant import is_quantized_linear, linear_weight, quantize_config

    run = setup(config(z_image_repo, z_image_dataset, tmp_path / "out", quantize=["dit=torchao_int8_w8a16"]))
    dit = run.task.pipe.dit
    assert quantize_config(dit).method == "torchao_int8_w8a16"
    before = {n: linear_weight(m).detach().clone() for n, m in dit.named_modules() if is_quantized_linear(m)}
    assert before and all(".lora_" in n for n in run.trainable)
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss) and state.loss > 0
    assert all(torch.equal(linear_weight(m), before[n]) for n, m in dit.named_modules() if n in before)
    save(run, state)

    pipe = ZImagePipeline.from_pretrained(
        str(z_image_repo), torch_dtype="float32", device="cpu", quantize={"dit": "torchao_int8_w8a16"}
    )
    g = torch.Generator().manual_seed(3)
    latents, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.7])
    text = pipe.encode_prompt(["a red circle on a blue background"])
    with torch.no_grad():
        trained = z_image_velocity(run.model, latents, sigma, text)
        base = z_image_velocity(pipe.dit, latents, sigma, text)
        pipe.load_lora(tmp_path / "out" / "step-000002.safetensors", name="trained")  # kept apart on int8 layers
        torch.testing.assert_close(z_image_velocity(pipe.dit, latents, sigma, text), trained, atol=1e-5, rtol=1e-5)
    assert (trained - base).abs().max() > 1e-4


def test_masked_loss_on_the_latent_grid(z_image_repo, tmp_path):
    """`--masked_loss` on Z-Image's [16, H/8, W/8] latents: white masks everywhere give the unmasked losses
    exactly; masks white on the left half change them."""
    from PIL import Image

    prompts = ["a red circle", "a blue square"]
    white, half = Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    losses = {}
    for name, mask in (("plain", None), ("white", white), ("half", half)):
        folder = tmp_path / name
        extra = None
        if mask is not None:
            folder.mkdir()
            mask.save(folder / "mask.png")
            extra = [{"loss_mask": "mask.png"}] * 2
        data = write_caption_dataset(folder, prompts, seed=1, extra=extra)
        run = setup(config(z_image_repo, data, tmp_path / f"out_{name}", masked_loss=mask is not None))
        state = train_step(run, TrainState(), [[run.dataset[0], run.dataset[1]]])
        losses[name] = state.loss
    assert losses["white"] == pytest.approx(losses["plain"], rel=1e-6)
    assert abs(losses["half"] - losses["plain"]) > 1e-4 * losses["plain"]


def test_a_local_model_folder_needs_no_family_name(z_image_repo, z_image_dataset, tmp_path):
    """`--model <folder>` without `--family`: the family whose denoiser spec knows the folder's weights, however
    many families are installed; a folder no family knows is named."""
    from diffsynth.runtime.errors import ConfigError
    from diffsynth.training.task import task_class, trainable_families

    cfg = replace(config(z_image_repo, z_image_dataset, tmp_path / "out"), family=None)
    assert task_class(cfg).family == "z_image"
    (tmp_path / "stranger").mkdir()
    save_file({"some.weight": torch.zeros(2, 2)}, str(tmp_path / "stranger" / "model.safetensors"))
    stranger = replace(cfg, model=str(tmp_path / "stranger"))
    if len(trainable_families()) > 1:
        with pytest.raises(ConfigError, match=r"--model .*stranger: no installed family recognises .* pass --family"):
            task_class(stranger)
