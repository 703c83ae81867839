"""Insert Anything training (DiffSynth-Studio's lora/Insert-Anything.sh): a row's four pictures are encoded as the
pipeline's Insert Anything preparation makes its Fill + Redux call (the diptych's Fill condition and mask, the
masked reference's Redux tokens after zero text states), the target being the diptych itself (DiffSynth-Studio's
unit sets the input image to the unmasked diptych in training: the source image already holds the object); the
task's velocity is the pipeline's per-step call; the trainer trains a Fill DiT LoRA that the pipeline's
`insert_anything_*` call then uses.

The repo is a tiny Fill one (`flux1_tools_repo.py`) at 32 T5 tokens, with a tiny SigLIP tower (16 Redux tokens) and
Redux embedder; diptych halves of 32 pixels (`insert_anything_size=32`, the authors' 768). The trainer test is
`integration` (it needs diffsynth-training installed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import random_image
from PIL import Image
from safetensors.torch import save_file

from diffsynth.flux.flux1.redux import FluxReduxConfig, FluxReduxEmbedder
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import INSERT_COLUMNS, FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = pytest.mark.usefixtures("one_thread")
T5_TOKENS = 32
REDUX_TOKENS = 16
SIDE = 32
SIGLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
# (target size, target mask box, reference size, reference mask box) of each row (x1, y1, x2, y2)
CASES = [((96, 80), (40, 30, 60, 50), (48, 64), (8, 10, 40, 56)), ((80, 64), (10, 8, 30, 28), (64, 48), (4, 4, 60, 40))]


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """A tiny FLUX.1 Fill repo at 32 T5 tokens, with the Redux embedder and SigLIP tower beside it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    base = tmp_path_factory.mktemp("insert-train")
    root = tools.tools_repo(tiny_repo, base / "repo", tools.FILL_CHANNELS, seed=5)
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).save_pretrained(base / "image_encoder")
    embedder = random_weights(FluxReduxEmbedder(FluxReduxConfig(32, 32)), 3, scale=0.2)
    (base / "image_embedder").mkdir()
    save_file(embedder.state_dict(), str(base / "image_embedder" / "diffusion_pytorch_model.safetensors"))
    return root


def redux_paths(repo: Path) -> list[str]:
    return [str(repo.parent / "image_embedder"), str(repo.parent / "image_encoder")]


@pytest.fixture(scope="module")
def task(repo) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    return FluxTrainingTask.from_pretrained(
        [*configs, *(ModelConfig(path=p) for p in redux_paths(repo))],
        tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", insert_anything_size=SIDE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipe(repo) -> FluxImagePipeline:
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_redux(*redux_paths(repo))
    return pipe


def mask(width: int, height: int, box, seed: int) -> Image.Image:
    """White inside `box` with a ragged edge, dark gray noise elsewhere (RGB, as the dataset reads masks)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (height, width), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = rng.integers(100, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")


def pictures(index: int) -> list[Image.Image]:
    """Row `index`'s source image, source mask, reference image and reference mask."""
    (tw, th), tbox, (rw, rh), rbox = CASES[index]
    seed = 10 * index
    return [
        random_image(tw, th, seed=seed),
        mask(tw, th, tbox, seed + 1),
        random_image(rw, rh, seed=seed + 2),
        mask(rw, rh, rbox, seed + 3),
    ]


def rows() -> list[dict]:
    """Rows as the dataset reads them: every picture a [3, H, W] tensor in [-1, 1] at its own size, plus the
    row's `image` (DiffSynth-Studio's column, which the target replaces) and a prompt (not read either)."""
    return [
        {
            "prompt": "put it there",
            "image": pil_to_tensor(random_image(64, 64, seed=99))[0],
            **{column: pil_to_tensor(p)[0] for column, p in zip(INSERT_COLUMNS, pictures(i), strict=True)},
        }
        for i in range(len(CASES))
    ]


def pipeline_inputs(pipe, index: int):
    """The pipeline's own preparation of row `index`: its Insert Anything inputs, the Fill condition, the Redux
    prompt after zero text states, and the diptych's latents (DiffSynth-Studio's training target)."""
    insert = pipe.check_insert_anything(pictures(index), prompt=None, cfg_scale=None, height=SIDE, width=None)
    channels = pipe.check_channel_inputs(insert.fill_image, insert.fill_mask, None, None)
    condition = pipe.encode_channel_condition(channels, 1, insert.height, insert.width)
    text = pipe.prepare_redux(
        pipe.insert_anything_text(T5_TOKENS), *pipe.check_redux_inputs(insert.redux_image, 1.0, 1.0)
    )
    latents = pipe.vae.encode(pil_to_tensor(insert.fill_image).contiguous())  # [-1, 1], as the dataset reads it
    return insert, condition, text, latents


# ------------------------------------------------------------------ encodings
def test_rows_are_encoded_as_the_pipeline_prepares_its_insert_anything_call(task, pipe):
    assert set(INSERT_COLUMNS) <= set(task.conditioning)
    data = rows()
    samples = task.encode(data)
    for i, sample in enumerate(samples):
        insert, condition, text, latents = pipeline_inputs(pipe, i)
        assert insert.fill_image.size == (2 * SIDE, SIDE)
        assert sample["latents"].shape == (16, SIDE // 8, 2 * SIDE // 8)
        # the whole diptych is the target (a batch of two vs. one image through the VAE: float32 rounding)
        torch.testing.assert_close(sample["latents"], latents[0], rtol=0, atol=1e-5)
        assert torch.equal(task.encode([data[i]])[0]["latents"], latents[0])
        assert torch.equal(sample["condition"], condition[0])
        assert torch.equal(sample["t5"], text.t5[0]) and torch.equal(sample["pooled"], text.pooled[0])
        assert sample["t5"].shape == (T5_TOKENS + REDUX_TOKENS, 32) and not sample["t5"][:T5_TOKENS].any()
        assert not sample["pooled"].any() and sample["t5"][T5_TOKENS:].abs().max() > 1e-3
    # the row's own image and prompt are not read; PIL pictures (a caller's rows) encode as the tensors do
    other = {**data[0], "prompt": "something else", "image": torch.zeros(3, 16, 16)}
    other.update(zip(INSERT_COLUMNS, pictures(0), strict=True))
    again, alone = task.encode([other])[0], task.encode([data[0]])[0]
    assert set(again) == set(alone) == {"latents", "t5", "pooled", "condition"}
    assert all(torch.equal(again[k], alone[k]) for k in alone)
    batch = task.collate(samples)
    assert batch["condition"].shape == (2, (SIDE // 16) * (2 * SIDE // 16), 320)


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipeline_per_step_call(task, pipe):
    """The task's velocity equals the pipeline's `predict` at embedded guidance 1 with the Fill condition and the
    Redux prompt, row by row; with the zero text states alone (no Redux tokens) it is another prediction."""
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, SIDE // 8, 2 * SIDE // 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.35])
    dit = task.models["dit"]
    with torch.no_grad():
        ours = task.velocity(dit, batch, noisy, sigma)
        worst = 0.0
        for i in range(2):
            _, condition, text, _ = pipeline_inputs(pipe, i)
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], text, None, 1.0, 1.0, condition=condition)
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
        assert worst <= 5e-6, worst  # measured: about 8e-7 (a batch of two vs. one row)
        zero = {**batch, "t5": torch.zeros_like(batch["t5"][:, :T5_TOKENS])}
        assert (task.velocity(dit, zero, noisy, sigma) - ours).abs().max() > 1e-4


# ------------------------------------------------------------------ errors
def test_clear_errors(task, repo, tiny_repo):
    row = rows()[0]
    partial = {k: v for k, v in row.items() if k != "insert_anything_ref_mask"}
    with pytest.raises(ConfigError, match="but no insert_anything_ref_mask: Insert Anything trains on all four"):
        task.encode([partial])
    with pytest.raises(ConfigError, match="insert_anything_source_mask is the path 'm.png'.*--data_file_keys"):
        task.encode([{**row, "insert_anything_source_mask": "m.png"}])
    with pytest.raises(ConfigError, match="has insert_anything_\\* with flux_redux_image; .* drop them"):
        task.encode([{**row, "flux_redux_image": row["insert_anything_ref_image"]}])
    configs, tokenizer = configs_from_folder(repo)
    no_redux = FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32")
    with pytest.raises(ConfigError, match="insert_anything_ref_image is read by FLUX.1 Redux, which is not among"):
        no_redux.encode([row])
    configs, tokenizer = configs_from_folder(tiny_repo)
    plain = FluxTrainingTask.from_pretrained(
        [*configs, *(ModelConfig(path=p) for p in redux_paths(repo))], tokenizer_config=tokenizer
    )
    with pytest.raises(ConfigError, match="need a FLUX.1 Fill DiT .*FLUX.1-Fill-dev"):
        plain.encode([row])
    with pytest.raises(ConfigError, match="insert_anything_size=40 must be a multiple of 16"):
        FluxTrainingTask(task.pipe, insert_anything_size=40)


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path) -> Path:
    """DiffSynth-Studio's Insert-Anything layout: metadata.csv with image, prompt and the four pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,prompt," + ",".join(INSERT_COLUMNS)]
    for i in range(len(CASES)):
        names = [f"{column}{i}.png" for column in INSERT_COLUMNS]
        for name, p in zip(names, pictures(i), strict=True):
            p.save(folder / name)
        random_image(64, 64, seed=50 + i).save(folder / f"image{i}.png")
        lines.append(f"image{i}.png,put it there," + ",".join(names))
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.integration
def test_trainer_trains_a_fill_lora_that_the_insert_anything_call_uses(repo, pipe, tmp_path):
    """Through the trainer (the four columns in --data_file_keys, the Redux files as --model_paths, the default DiT
    LoRA, `--batch_size 1`): two steps change only LoRA weights, the pipeline with the saved LoRA predicts what the
    trained DiT predicts on the row's Fill + Redux inputs, and its `insert_anything_*` call draws another result."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", model_paths=redux_paths(repo),
        data_file_keys=["image", *INSERT_COLUMNS], batch_size=1, seed=0,
        task_options={"insert_anything_size": SIDE},
    )  # fmt: skip
    run = setup(config)
    dit = run.task.models["dit"]
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    items = [run.dataset[i] for i in range(len(CASES))]
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    save(run, state)
    lora = tmp_path / "out" / "step-000002.safetensors"
    sample = run.task.encode([items[0]])[0]
    noisy = torch.randn(1, 16, SIDE // 8, 2 * SIDE // 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6])
    text = type(pipe.insert_anything_text(T5_TOKENS))(sample["t5"][None], sample["pooled"][None])
    condition = sample["condition"][None]
    call = dict(zip(INSERT_COLUMNS, pictures(0), strict=True), height=SIDE, num_inference_steps=2, seed=0)
    with torch.no_grad():
        trained = run.task.velocity(run.model, run.task.collate([sample]), noisy, sigma)
        base = pipe.predict(noisy, sigma, text, None, 1.0, 1.0, condition=condition)
        base_image = np.asarray(pipe(**call), dtype=np.int16)
        pipe.load_lora(lora, fuse=False, name="insert")
        try:
            applied = pipe.predict(noisy, sigma, text, None, 1.0, 1.0, condition=condition)
            image = np.asarray(pipe(**call), dtype=np.int16)
        finally:
            pipe.clear_loras()
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5
    assert image.shape == base_image.shape == (80, 96, 3) and np.abs(image - base_image).max() > 0
