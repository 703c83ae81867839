"""FLUX.1 EliGen training: a row's entity prompts and masks are what the pipeline's `prepare_eligen` prepares for its
positive branch, the task's velocity is the pipeline's per-step call with those entities (entity text before the
prompt's, the joint attention mask), and the trainer trains a DiT LoRA on DiffSynth-Studio's metadata.json rows that
the pipeline then loads.

The repo is conftest's tiny one at 32 T5 tokens; masks are 64x64 pictures with white boxes (white = the entity). The
trainer test is `integration` (it needs diffsynth-training installed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsynth.flux.flux1.text_encoder import FluxPromptEmbeds
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle beside a green square", "a yellow triangle over a blue sea"]
ENTITIES = [["a red circle", "a green square"], ["a yellow triangle", "a blue sea"]]
BOXES = [[(0, 0, 32, 64), (32, 16, 64, 48)], [(16, 0, 48, 24), (0, 32, 64, 64)]]  # (left, top, right, bottom)
T5_TOKENS = 32
SIZE = 64


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens (the pipeline and the task both read the setting)."""
    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("eligen-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    return root


@pytest.fixture(scope="module")
def task(repo) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    return FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def pipe(repo) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


def mask(box) -> Image.Image:
    """A black RGB picture with the white box `box`."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels)


def rows(seed: int = 0, entities=ENTITIES, boxes=BOXES) -> list[dict]:
    """Rows as the dataset reads them: the image and the masks as [3, H, W] tensors in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": prompt,
            "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
            "eligen_entity_prompts": list(names),
            "eligen_entity_masks": [pil_to_tensor(mask(box))[0] for box in row_boxes],
        }
        for prompt, names, row_boxes in zip(PROMPTS, entities, boxes, strict=True)
    ]


def pipeline_entities(pipe, index: int):
    """What the pipeline prepares for row `index`'s entities (masks as PIL pictures) at the target size."""
    masks = [mask(box) for box in BOXES[index]]
    positive, negative = pipe.prepare_eligen(ENTITIES[index], masks, None, False, SIZE, SIZE, T5_TOKENS)
    assert negative is None
    return positive


# ------------------------------------------------------------------ encodings
def test_rows_are_encoded_as_the_pipeline_prepares_their_entities(task, pipe):
    data = rows()
    samples = task.encode(data)
    for i, sample in enumerate(samples):
        want = pipeline_entities(pipe, i)
        assert sample["eligen_t5"].shape == (2, T5_TOKENS, 32)
        assert torch.equal(sample["eligen_t5"], want.t5[0])
        assert sample["eligen_regions"].dtype == torch.bool and torch.equal(sample["eligen_regions"], want.regions[0])
        # the entity prompts' T5 states alone, at the prompt's length; the prompt's own states are unchanged
        assert torch.equal(sample["eligen_t5"], pipe.encode_prompt(ENTITIES[i], T5_TOKENS).t5)
        assert torch.equal(sample["t5"], pipe.encode_prompt([PROMPTS[i]], T5_TOKENS).t5[0])
    # the first mask of row 0 is the left half: the left two of the 4x4 token columns
    assert samples[0]["eligen_regions"][0].reshape(4, 4).tolist() == [[True, True, False, False]] * 4
    batch = task.collate(samples)
    assert batch["eligen_t5"].shape == (2, 2, T5_TOKENS, 32) and batch["eligen_regions"].shape == (2, 2, 16)
    # PIL masks (a caller's rows) give the same encoding as the dataset's tensors
    as_pil = {**data[1], "eligen_entity_masks": [mask(box) for box in BOXES[1]]}
    assert torch.equal(task.encode([as_pil])[0]["eligen_regions"], samples[1]["eligen_regions"])


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipeline_per_step_call_with_the_entities(task, pipe):
    """The task's velocity equals the pipeline's `predict` (its denoise step) at embedded guidance 1 with the
    entities `prepare_eligen` gives, row by row (a batch of two vs. one row: float32 rounding only); without the
    entities the prediction is another one."""
    data = rows()
    batch = task.collate(task.encode(data))
    noisy = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.35])
    text = pipe.encode_prompt(PROMPTS, T5_TOKENS)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        worst = 0.0
        for i in range(2):
            prompt = FluxPromptEmbeds(text.t5[i : i + 1], text.pooled[i : i + 1])
            entities = (pipeline_entities(pipe, i), None)
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], prompt, None, 1.0, 1.0, entities=entities)
            worst = max(worst, (ours[i : i + 1] - theirs).abs().max().item())
            alone = task.velocity(task.models["dit"], task.collate(task.encode([data[i]])), noisy[i : i + 1], sigma[i])
            assert torch.equal(alone, theirs)  # one row: the same call, bit for bit
        assert worst <= 5e-6, worst  # measured: about 1.1e-6 (a batch of two vs. one row)
        plain = {k: v for k, v in batch.items() if not k.startswith("eligen")}
        without = task.velocity(task.models["dit"], plain, noisy, sigma)
        assert torch.equal(without, pipe.predict(noisy, sigma, text, None, 1.0, 1.0))
        assert (without - ours).abs().max() > 1e-4
    assert ours.shape == (2, 16, SIZE // 8, SIZE // 8) and ours.dtype == torch.float32


# ------------------------------------------------------------------ errors
def test_clear_errors(task):
    row = rows()[0]
    with pytest.raises(ConfigError, match="has 2 eligen_entity_prompts and 1 eligen_entity_masks; give one mask"):
        task.encode([{**row, "eligen_entity_masks": row["eligen_entity_masks"][:1]}])
    with pytest.raises(ConfigError, match=r"eligen_entity_masks\[0\] is the path 'm0.png'.*--data_file_keys"):
        task.encode([{**row, "eligen_entity_masks": ["m0.png", "m1.png"]}])
    without_masks = {k: v for k, v in row.items() if k != "eligen_entity_masks"}
    with pytest.raises(ConfigError, match="has eligen_entity_prompts but no eligen_entity_masks"):
        task.encode([without_masks])
    without_prompts = {k: v for k, v in row.items() if k != "eligen_entity_prompts"}
    with pytest.raises(ConfigError, match="has eligen_entity_masks but no eligen_entity_prompts"):
        task.encode([without_prompts])
    with pytest.raises(ConfigError, match="eligen_entity_prompts must be a list of strings"):
        task.encode([{**row, "eligen_entity_prompts": ["a cat", 3]}])
    three = rows(entities=[ENTITIES[0], [*ENTITIES[1], "a bird"]], boxes=[BOXES[0], [*BOXES[1], (0, 0, 16, 16)]])
    with pytest.raises(ConfigError, match=r"have \[2, 3\] EliGen entities.*--batch_size 1"):
        task.collate(task.encode(three))
    plain = {k: v for k, v in row.items() if not k.startswith("eligen")}
    with pytest.raises(ConfigError, match="mixes 1 rows with EliGen entities and 1 without"):
        task.collate(task.encode([row, plain]))


def test_bad_entity_rows_are_refused_at_setup(task, tmp_path):
    """`check_row`, which the trainer's dataset runs on each metadata row before training, refuses what the
    metadata alone shows: one column without the other, counts that differ, prompts that are not strings, and a
    mask file that is missing (read through the dataset's `size`, which names the file)."""
    mask(BOXES[0][0]).save(tmp_path / "m0.png")

    def size(column: str, name: str) -> tuple[int, int]:
        if not (tmp_path / name).is_file():
            raise ConfigError(f"column {column}: {name} is missing")
        with Image.open(tmp_path / name) as picture:
            return picture.size

    row = {"image": "img0.png", "prompt": "x", "eligen_entity_prompts": ["a", "b"], "eligen_entity_masks": ["m0.png"]}
    bad = [
        (row, "has 2 eligen_entity_prompts and 1 eligen_entity_masks; give one mask"),
        ({**row, "eligen_entity_prompts": ["a"], "eligen_entity_masks": []}, "has eligen_entity_prompts but no"),
        ({**row, "eligen_entity_prompts": None}, "has eligen_entity_masks but no eligen_entity_prompts"),
        ({**row, "eligen_entity_prompts": [3]}, "eligen_entity_prompts must be a list of strings"),
        ({**row, "eligen_entity_prompts": ["a"], "eligen_entity_masks": ["m9.png"]}, "m9.png is missing"),
    ]
    for bad_row, message in bad:
        with pytest.raises(ConfigError, match=message):
            task.check_row(bad_row, size)
    task.check_row({**row, "eligen_entity_prompts": "a cat", "eligen_entity_masks": "m0.png"}, size)
    task.check_row({"image": "img0.png", "prompt": "x"}, size)


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path) -> Path:
    """DiffSynth-Studio's EliGen layout: metadata.json rows with `image`, `prompt`, `eligen_entity_prompts` (a list
    of strings) and `eligen_entity_masks` (a list of mask files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i, prompt in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        names = []
        for k, box in enumerate(BOXES[i]):
            mask(box).save(folder / f"mask{i}_{k}.png")
            names.append(f"mask{i}_{k}.png")
        items.append(
            {
                "image": f"img{i}.png",
                "prompt": prompt,
                "eligen_entity_prompts": ENTITIES[i],
                "eligen_entity_masks": names,
            }
        )
    (folder / "metadata.json").write_text(json.dumps(items, indent=1))
    return folder


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_that_the_pipeline_loads(repo, pipe, tmp_path):
    """Through the trainer (`--data_file_keys image,eligen_entity_masks`, the default DiT LoRA, DiffSynth-Studio's
    `--batch_size 1`): the dataset reads the mask lists as pictures, two steps change only LoRA weights, and the
    pipeline with the saved LoRA predicts, with the row's entities, what the trained DiT predicts."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", data_file_keys=["image", "eligen_entity_masks"], batch_size=1, seed=0
    )
    run = setup(config)
    dit = run.task.models["dit"]
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    masks = items[0]["eligen_entity_masks"]
    assert len(masks) == 2 and masks[0].shape == (3, SIZE, SIZE)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    save(run, state)
    lora = tmp_path / "out" / "step-000002.safetensors"
    batch = run.task.collate(run.task.encode([items[0]]))
    noisy = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6])
    text = pipe.encode_prompt(PROMPTS[:1], T5_TOKENS)
    entities = (pipeline_entities(pipe, 0), None)
    with torch.no_grad():
        trained = run.task.velocity(run.model, batch, noisy, sigma)
        base = pipe.predict(noisy, sigma, text, None, 1.0, 1.0, entities=entities)
        pipe.load_lora(lora, fuse=False, name="eligen")
        try:
            applied = pipe.predict(noisy, sigma, text, None, 1.0, 1.0, entities=entities)
        finally:
            pipe.clear_loras()
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5


@pytest.mark.integration
def test_cli_cached_two_stage_equals_direct(repo, tmp_path):
    """`diffsynth-train` as users type it (`--data_file_keys image,eligen_entity_masks --batch_size 1`): the cache
    stores each row's entity states and token regions, and training from it gives the direct run's loss."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data")
    train = testing.CliTrainer(
        repo, "flux", dataset, "--data_file_keys", "image,eligen_entity_masks", "--batch_size", "1"
    )
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "2")
    stored = load_file(str(tmp_path / "two-stage" / "cache" / "items" / "000000.safetensors"))
    assert stored["eligen_t5"].shape == (2, T5_TOKENS, 32) and stored["eligen_regions"].dtype == torch.bool
    assert len(direct) == 2 and cached == pytest.approx(direct, rel=1e-6, abs=1e-7)
