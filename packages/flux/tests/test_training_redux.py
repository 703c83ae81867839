"""FLUX.1 Redux training (DiffSynth-Studio's lora/ and full/FLUX.1-Redux-dev.sh): a row's `flux_redux_image` is
encoded as the pipeline's `prepare_redux` extends the positive prompt (its Redux tokens after the prompt's T5
states), the task's velocity is the pipeline's per-step call with that prompt, and the trainer trains a DiT LoRA
(the Redux models frozen) that the pipeline then loads and that changes its Redux output.

The repo is conftest's tiny one at 32 T5 tokens; the SigLIP tower is tiny (32x32 input, 8x8 patches: 16 Redux
tokens per image). The trainer tests are `integration` (they need diffsynth-training installed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth.flux.flux1.redux import FluxReduxConfig, FluxReduxEmbedder
from diffsynth.flux.flux1.text_encoder import FluxPromptEmbeds
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "a yellow triangle over a blue sea"]
T5_TOKENS = 32
REDUX_TOKENS = 16  # (32 / 8) ** 2 patches of the tiny SigLIP tower
SIZE = 64
SIGLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens, with a tiny SigLIP tower and a Redux embedder beside it (the DiT's
    T5 width, 32), the two files DiffSynth-Studio lists from black-forest-labs/FLUX.1-Redux-dev."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("redux-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).save_pretrained(root.parent / "image_encoder")
    embedder = random_weights(FluxReduxEmbedder(FluxReduxConfig(32, 32)), 3, scale=0.2)
    save_file(embedder.state_dict(), str(root.parent / "flux1-redux-dev.safetensors"))
    return root


def redux_paths(repo: Path) -> list[str]:
    return [str(repo.parent / "flux1-redux-dev.safetensors"), str(repo.parent / "image_encoder")]


@pytest.fixture(scope="module")
def task(repo) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    redux = [ModelConfig(path=path) for path in redux_paths(repo)]
    return FluxTrainingTask.from_pretrained(
        [*redux, *configs], tokenizer_config=tokenizer, torch_dtype="float32", device="cpu"
    )


@pytest.fixture(scope="module")
def pipe(repo) -> FluxImagePipeline:
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    pipe.load_redux(*redux_paths(repo))
    return pipe


def picture(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rows(seed: int = 0) -> list[dict]:
    """Rows as the dataset reads them: the image and the Redux reference (at its own, other size) as [3, H, W]
    tensors in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": prompt,
            "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
            "flux_redux_image": pil_to_tensor(picture(seed + i, 48 + 16 * i, 40))[0],
        }
        for i, prompt in enumerate(PROMPTS)
    ]


def pipeline_prompt(pipe, index: int, seed: int = 0, scale=1.0, pooled_scale=1.0) -> FluxPromptEmbeds:
    """What the pipeline gives the DiT as row `index`'s positive prompt with its Redux reference."""
    text = pipe.encode_prompt([PROMPTS[index]], T5_TOKENS)
    return pipe.prepare_redux(
        text, *pipe.check_redux_inputs(picture(seed + index, 48 + 16 * index, 40), scale, pooled_scale)
    )


# ------------------------------------------------------------------ encodings
def test_rows_are_encoded_as_the_pipeline_prepares_the_redux_prompt(task, pipe):
    assert task.redux and "flux_redux_image" in task.conditioning
    assert not any(p.requires_grad for p in task.pipe.flux_redux.parameters())
    data = rows()
    samples = task.encode(data)
    for i, sample in enumerate(samples):
        want = pipeline_prompt(pipe, i)
        assert sample["t5"].shape == (T5_TOKENS + REDUX_TOKENS, 32)
        assert torch.equal(sample["t5"], want.t5[0]) and torch.equal(sample["pooled"], want.pooled[0])
        # the prompt's own states first (unchanged), then the image's tokens
        plain = pipe.encode_prompt([PROMPTS[i]], T5_TOKENS)
        assert torch.equal(sample["t5"][:T5_TOKENS], plain.t5[0])
        assert sample["t5"][T5_TOKENS:].abs().max() > 1e-3
    batch = task.collate(samples)
    assert batch["t5"].shape == (2, T5_TOKENS + REDUX_TOKENS, 32)
    # a PIL reference (a caller's rows) gives the same encoding as the dataset's tensor
    as_pil = {**data[1], "flux_redux_image": picture(1, 64, 40)}
    assert torch.equal(task.encode([as_pil])[0]["t5"], samples[1]["t5"])
    # the pipeline's weights, from a CSV cell's text too: two images, weighted and summed as the pipeline does
    two = {**data[0], "flux_redux_image": [data[0]["flux_redux_image"], data[1]["flux_redux_image"]]}
    two.update(flux_redux_scale="0.5,0.8", flux_redux_pooled_scale=[0.3, 0.9])
    text = pipe.encode_prompt([PROMPTS[0]], T5_TOKENS)
    images = [picture(0, 48, 40), picture(1, 64, 40)]
    want = pipe.prepare_redux(text, *pipe.check_redux_inputs(images, [0.5, 0.8], [0.3, 0.9]))
    got = task.encode([two])[0]
    assert torch.equal(got["t5"], want.t5[0]) and torch.equal(got["pooled"], want.pooled[0])


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipeline_per_step_call_with_the_redux_prompt(task, pipe):
    """The task's velocity equals the pipeline's `predict` (its denoise step) at embedded guidance 1 with the Redux
    prompt, row by row (a batch of two vs. one row: float32 rounding only); without the reference it is another."""
    data = rows()
    batch = task.collate(task.encode(data))
    noisy = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.35])
    dit = task.models["dit"]
    with torch.no_grad():
        ours = task.velocity(dit, batch, noisy, sigma)
        worst = 0.0
        for i in range(2):
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], pipeline_prompt(pipe, i), None, 1.0, 1.0)
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
            alone = task.velocity(dit, task.collate(task.encode([data[i]])), noisy[i : i + 1], sigma[i])
            assert torch.equal(alone, theirs)  # one row: the same call, bit for bit
        assert worst <= 5e-6, worst  # measured: about 1.1e-6 (a batch of two vs. one row)
        plain = task.collate(task.encode([{k: v for k, v in row.items() if k != "flux_redux_image"} for row in data]))
        without = task.velocity(dit, plain, noisy, sigma)
        assert torch.equal(without, pipe.predict(noisy, sigma, pipe.encode_prompt(PROMPTS, T5_TOKENS), None, 1.0, 1.0))
        assert (without - ours).abs().max() > 1e-4
    assert ours.shape == (2, 16, SIZE // 8, SIZE // 8) and ours.dtype == torch.float32


# ------------------------------------------------------------------ errors
def test_clear_errors(task, repo):
    row = rows()[0]
    configs, tokenizer = configs_from_folder(repo)
    plain = FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    assert not plain.redux and plain.conditioning == ("kontext_images",)  # the Redux columns: only with Redux
    with pytest.raises(ConfigError, match="has flux_redux_image, but FLUX.1 Redux is not among the models.*Redux-dev"):
        plain.encode([row])
    with pytest.raises(ConfigError, match=r"flux_redux_image is the path 'ref.png'.*--data_file_keys"):
        task.encode([{**row, "flux_redux_image": "ref.png"}])
    with pytest.raises(ConfigError, match=r"flux_redux_image must be one image .*got \(2, 8\)"):
        task.encode([{**row, "flux_redux_image": torch.zeros(2, 8)}])
    with pytest.raises(ConfigError, match="flux_redux_scale has 2 values for 1 flux_redux_image"):
        task.encode([{**row, "flux_redux_scale": "0.5,0.7"}])
    with pytest.raises(ConfigError, match="flux_redux_pooled_scale 'strong' is not a number"):
        task.encode([{**row, "flux_redux_pooled_scale": "strong"}])
    without = {k: v for k, v in row.items() if k != "flux_redux_image"}
    with pytest.raises(ConfigError, match="has flux_redux_scale but no flux_redux_image"):
        task.encode([{**without, "flux_redux_scale": 0.5}])
    with pytest.raises(ConfigError, match="rows with flux_redux_image.*cannot share a batch.*--batch_size 1"):
        task.collate(task.encode([row, without]))
    with pytest.raises(ConfigError, match="holds? 2 FLUX.1 Redux embedders"):
        FluxTrainingTask.from_pretrained(
            [*configs, *(ModelConfig(path=redux_paths(repo)[0]) for _ in range(2))], tokenizer_config=tokenizer
        )


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path) -> Path:
    """DiffSynth-Studio's FLUX.1-Redux-dev layout: metadata.csv with image, prompt and flux_redux_image."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,prompt,flux_redux_image"]
    for i, prompt in enumerate(PROMPTS):
        picture(10 + i, SIZE, SIZE).save(folder / f"img{i}.png")
        picture(i, 48 + 16 * i, 40).save(folder / f"ref{i}.png")
        lines.append(f"img{i}.png,{prompt},ref{i}.png")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_that_changes_the_pipeline_redux_output(repo, pipe, tmp_path):
    """Through the trainer (`--data_file_keys image,flux_redux_image`, the Redux files as --model_paths, the default
    DiT LoRA, `--batch_size 1`): the dataset reads the reference at its own size, two steps change only LoRA
    weights (the Redux models stay frozen), and the pipeline with the saved LoRA predicts, with the Redux prompt,
    what the trained DiT predicts, and draws another Redux image than without it."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", model_paths=redux_paths(repo),
        data_file_keys=["image", "flux_redux_image"], batch_size=1, seed=0,
    )  # fmt: skip
    run = setup(config)
    dit, redux = run.task.models["dit"], run.task.pipe.flux_redux
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    # its own size (64x40 in steps of 32), not the target's
    assert items[1]["flux_redux_image"].shape == (3, 32, 64) and items[1]["image"].shape == (3, SIZE, SIZE)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    frozen = {name: p.detach().clone() for name, p in redux.named_parameters()}
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all(torch.equal(p, frozen[name]) for name, p in redux.named_parameters())
    save(run, state)
    lora = tmp_path / "out" / "step-000002.safetensors"
    batch = run.task.collate(run.task.encode([items[0]]))
    noisy = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6])
    reference = tensor_to_pil(items[0]["flux_redux_image"])[0]  # as the dataset read it
    prompt = pipe.prepare_redux(
        pipe.encode_prompt(PROMPTS[:1], T5_TOKENS), *pipe.check_redux_inputs(reference, 1.0, 1.0)
    )
    call = dict(flux_redux_image=reference, height=SIZE, width=SIZE, num_inference_steps=2, seed=0)
    with torch.no_grad():
        trained = run.task.velocity(run.model, batch, noisy, sigma)
        base = pipe.predict(noisy, sigma, prompt, None, 1.0, 1.0)
        base_image = np.asarray(pipe(PROMPTS[0], **call), dtype=np.int16)
        pipe.load_lora(lora, fuse=False, name="redux")
        try:
            applied = pipe.predict(noisy, sigma, prompt, None, 1.0, 1.0)
            image = np.asarray(pipe(PROMPTS[0], **call), dtype=np.int16)
        finally:
            pipe.clear_loras()
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5
    assert np.abs(image - base_image).max() > 0


@pytest.mark.integration
def test_cli_cached_two_stage_equals_direct(repo, tmp_path):
    """`diffsynth-train` as users type it (the Redux files in --model_paths, `--data_file_keys
    image,flux_redux_image`): the encoding stage loads Redux and caches the extended prompt; training from the cache
    (no Redux, no encoders loaded) gives the direct run's losses."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data")
    train = testing.CliTrainer(
        repo, "flux", dataset, "--model_paths", ",".join(redux_paths(repo)),
        "--data_file_keys", "image,flux_redux_image", "--batch_size", "1",
    )  # fmt: skip
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "2")
    stored = load_file(str(tmp_path / "two-stage" / "cache" / "items" / "000000.safetensors"))
    assert stored["t5"].shape == (T5_TOKENS + REDUX_TOKENS, 32)
    assert len(direct) == 2 and cached == pytest.approx(direct, rel=1e-6, abs=1e-7)
