"""FLUX.1 Kontext training: reference images encoded and appended as the pipeline does, and the trainer
(`diffsynth-train --family flux`) overfitting a tiny Kontext dataset.

The Kontext model is the tiny repo in a folder named like the hub's (`FLUX.1-Kontext-dev`), which is how the
task recognises one, with a `diffsynth.json` setting 32 T5 tokens (the pipeline and the task both read it; it
keeps the trainer tests fast) and its VAE scaling factor raised to 2 so the latents, not the noise, dominate the
loss the overfitting test watches.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.flux.flux1.text_encoder import FluxPromptEmbeds
from diffsynth.flux.flux1_training.kontext import names_kontext
from diffsynth.flux.pipeline import FluxImagePipeline, latent_ids
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


T5_TOKENS = 32


@pytest.fixture(scope="module")
def kontext_repo(tiny_repo, tmp_path_factory) -> Path:
    repo = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("hub") / "FLUX.1-Kontext-dev")
    (repo / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    vae = json.loads((repo / "vae" / "config.json").read_text())
    (repo / "vae" / "config.json").write_text(json.dumps({**vae, "scaling_factor": 2.0}))
    return repo


@pytest.fixture(scope="module")
def kontext_pipe(kontext_repo):
    return FluxImagePipeline.from_pretrained(str(kontext_repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def task(kontext_repo):
    configs, tokenizer = configs_from_folder(kontext_repo)
    return FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rows(references) -> list[dict]:
    """Rows as the dataset gives them: tensors in [-1, 1], references at their own size."""
    g = torch.Generator().manual_seed(0)
    out = []
    for prompt, refs in zip(PROMPTS, references, strict=True):
        value = [pil_to_tensor(r)[0] for r in refs] if isinstance(refs, list) else pil_to_tensor(refs)[0]
        out.append({"prompt": prompt, "image": torch.rand(3, 64, 64, generator=g) * 2 - 1, "kontext_images": value})
    return out


def test_a_kontext_named_model_makes_a_kontext_task(task, tiny_repo):
    assert task.kontext is True and task.conditioning == ("kontext_images",)
    assert task.t5_sequence_length == T5_TOKENS and task.kontext_auto_resize is False
    configs, tokenizer = configs_from_folder(tiny_repo)
    plain = FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, encoders=False)
    assert plain.kontext is None  # FLUX.1-dev: references only where rows have them


def test_a_kontext_repo_in_the_hugging_face_cache_makes_a_kontext_task(tiny_repo, tmp_path):
    """A snapshot folder of the hub cache is named by its hash: the repo folder above `snapshots/` names the model.
    Folders higher up, or a cache repo of another model, do not make a Kontext task."""
    cache = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-Kontext-dev" / "snapshots" / "af58063aeed7f4"
    snapshot = shutil.copytree(tiny_repo, cache)
    configs, tokenizer = configs_from_folder(snapshot)
    assert FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, encoders=False).kontext is True
    assert names_kontext(ModelConfig(path=str(cache / "flux1-dev.safetensors")))
    for path in (
        "/data/kontext-runs/FLUX.1-dev/transformer/model.safetensors",
        "/hub/models--black-forest-labs--FLUX.1-dev/snapshots/af58/transformer/model.safetensors",
    ):
        assert not names_kontext(ModelConfig(path=path)), path


def test_rows_without_references_are_refused_at_setup(task):
    """`check_row`, which the trainer's dataset runs on each metadata row before training (see the trainer test
    below), refuses a Kontext model's row without references; a model not named Kontext takes it."""
    with pytest.raises(ConfigError, match="column kontext_images: empty; a FLUX.1 Kontext model trains on rows"):
        task.check_row({"image": "t0.png", "prompt": "edit", "kontext_images": []}, None)
    task.check_row({"image": "t0.png", "prompt": "edit", "kontext_images": "r0.png"}, None)
    FluxTrainingTask(task.pipe).check_row({"image": "t0.png", "prompt": "edit"}, None)


def test_references_are_encoded_as_the_pipeline_encodes_them(task, kontext_pipe):
    ref = picture(1, 48, 32)
    samples = task.encode(rows([ref, [ref]]))
    expected = kontext_pipe.encode_kontext(kontext_pipe.load_kontext_images([ref]))
    for sample in samples:
        assert sample["kontext"].shape == (3 * 2, 64)  # 48x32 pixels -> 6x4 latent -> 3x2 packed tokens
        assert torch.equal(sample["kontext"], expected.tokens[0]) and torch.equal(sample["kontext_ids"], expected.ids)
    assert torch.equal(samples[0]["kontext_ids"], latent_ids(4, 6, index=1.0))  # t = 1, rows and columns from 0


def test_velocity_is_the_pipeline_per_step_call_with_the_references(task, kontext_pipe):
    """One reference shared by the batch: bit-equal to the pipeline's `predict` (its denoise loop's call) at
    embedded guidance 1. Each row with its own two references: each sample equals the pipeline's call on it."""
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = kontext_pipe.encode_prompt(PROMPTS, T5_TOKENS)
    dit = task.models["dit"]
    ref = picture(1, 48, 32)
    batch = task.collate(task.encode(rows([ref, ref])))
    kontext = kontext_pipe.encode_kontext(kontext_pipe.load_kontext_images([ref]))
    with torch.no_grad():
        ours = task.velocity(dit, batch, noisy, sigma)
        assert torch.equal(ours, kontext_pipe.predict(noisy, sigma, text, None, 1.0, 1.0, kontext))
        assert not torch.allclose(ours, kontext_pipe.predict(noisy, sigma, text, None, 1.0, 1.0), atol=1e-3)
        pairs = [[picture(2, 32, 32), picture(3, 16, 48)], [picture(4, 32, 32), picture(5, 16, 48)]]
        ours = task.velocity(dit, task.collate(task.encode(rows(pairs))), noisy, sigma)
        for i, refs in enumerate(pairs):
            kontext = kontext_pipe.encode_kontext(kontext_pipe.load_kontext_images(refs))
            prompt = FluxPromptEmbeds(text.t5[i : i + 1], text.pooled[i : i + 1])
            theirs = kontext_pipe.predict(noisy[i : i + 1], sigma[i], prompt, None, 1.0, 1.0, kontext)
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=1e-5)


def test_clear_errors(task):
    ref = picture(1, 48, 32)
    no_refs = rows([ref, ref])
    del no_refs[1]["kontext_images"]
    with pytest.raises(ConfigError, match=r"row 1 of the batch \(prompt 'a small green.*has no kontext_images"):
        task.encode(no_refs)
    plain = FluxTrainingTask(task.pipe)  # a model not named Kontext takes the rows as they come ...
    samples = plain.encode(no_refs)
    with pytest.raises(ConfigError, match="mixes 1 rows with kontext_images and 1 without"):
        plain.collate(samples)  # ... but not mixed in one batch
    with pytest.raises(ConfigError, match="different sizes or counts.*--batch_size 1"):
        task.collate(task.encode(rows([ref, picture(2, 32, 32)])))


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two recolouring edits of plain pictures, each with its reference in `kontext_images` (`ref{i}.png`)."""
    testing = pytest.importorskip("diffsynth.training.testing")
    return testing.write_edit_dataset(tmp_path_factory.mktemp("kontext-data"), PROMPTS, "kontext_images", "ref")


def train_config(repo, dataset, output, **overrides):
    """A LoRA (also on the DiT's input and output layers), no loss weights, low noise (sigma <= 0.1)."""
    from diffsynth.flux.flux1.dit import Flux1DiT
    from diffsynth.training.testing import overfit_config

    targets = [*Flux1DiT.lora_target_modules, "img_in", "final_layer.linear"]
    values = dict(lora_rank=8, lora_target_modules=targets, max_steps=20)
    return overfit_config(repo, "flux", dataset, output, noise=(0.9, 1.0), **{**values, **overrides})


@pytest.mark.integration
def test_trainer_overfits_a_kontext_dataset_with_a_lora(kontext_repo, dataset, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    state, curve = testing.train_and_log(train_config(kontext_repo, dataset, tmp_path / "out"))
    testing.assert_overfits(state, curve, steps=20, last=3)  # seeded: 13.9 -> 5.6 (mean of the last 3)
    assert (tmp_path / "out" / "step-000020.safetensors").is_file()


@pytest.mark.integration
def test_cached_training_gives_the_online_losses(kontext_repo, dataset, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    runs = testing.train_direct_and_cached(train_config(kontext_repo, dataset, tmp_path, max_steps=3))
    stored = runs.cached_item(1)
    assert set(stored) == {"latents", "t5", "pooled", "kontext", "kontext_ids"} and stored["kontext"].shape == (6, 64)
    online, cached = runs.losses()
    assert cached == pytest.approx(online, rel=1e-5)


@pytest.mark.integration
def test_a_row_without_references_stops_the_run_before_step_1(kontext_repo, dataset, tmp_path):
    """The last of 8 rows has no kontext_images: the trainer refuses it at setup, naming the metadata file and row,
    not when its batch comes (hours into a run)."""
    trainer = pytest.importorskip("diffsynth.training.trainer")
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = shutil.copytree(dataset, tmp_path / "late")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    testing.write_metadata(folder, [*(rows * 4)[:7], {k: v for k, v in rows[0].items() if k != "kontext_images"}])
    with pytest.raises(ConfigError, match=r"metadata.jsonl row 8 column kontext_images: empty"):
        trainer.train(train_config(kontext_repo, folder, tmp_path / "out", max_steps=1, batch_size=1))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("step-*"))


def test_validation_samples_are_the_pipeline_with_the_same_references(task, kontext_pipe):
    """`sample` (the trainer's --validation_images) draws what the pipeline draws from the same references, seed
    and size; the references matter (without them the picture differs)."""
    references = [[picture(6, 32, 48)], [picture(7, 48, 32), picture(8, 16, 16)]]
    # the T5 length is not given: the task's pipeline keeps the folder's diffsynth.json setting, as the pipeline
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    assert task.validation_references == "expected"
    with torch.no_grad():
        drawn = task.sample(task.models["dit"], PROMPTS, seed=3, references=references, **size)
        plain = task.sample(task.models["dit"], PROMPTS[:1], seed=3, **size)
        for prompt, images, ours in zip(PROMPTS, references, drawn, strict=True):
            theirs = kontext_pipe(prompt, kontext_images=images, seed=3, progress_bar=False, **size)
            diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
            assert ours.size == (32, 32) and diff.max() <= 1
    assert np.abs(np.asarray(plain[0], dtype=int) - np.asarray(drawn[0], dtype=int)).max() > 8
