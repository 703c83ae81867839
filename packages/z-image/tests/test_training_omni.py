"""Z-Image Omni training: rows with `edit_image` (one condition image or several, or none for text-to-image)
encoded as `ZImagePipeline` encodes them (the Omni prompt template, VAE latents and SigLIP2 grids of the prepared
images), the task's velocity equal to the pipeline's per-step prediction, validation samples with edit images,
the refusals, and the trainer (`diffsynth-train --family z_image`) training a LoRA and training from a cache on
a tiny random Omni repo (the tiny Z-Image repo with an Omni transformer and a `siglip/` tower).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.z_image import ZImagePipeline
from diffsynth.z_image.pipeline import EditCondition
from diffsynth.z_image.training import ZImageTrainingTask

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


@pytest.fixture(scope="module")
def pipe(omni_repo) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(str(omni_repo), torch_dtype="float32", device="cpu")


def make_task(repo: Path, *, without: str | None = None, **options) -> ZImageTrainingTask:
    """The task over the repo's files (leaving out the files under the folder `without`)."""
    configs, tokenizer = configs_from_folder(repo)
    configs = [c for c in configs if without is None or f"/{without}/" not in str(c.path)]
    return ZImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **options
    )


@pytest.fixture(scope="module")
def task(omni_repo) -> ZImageTrainingTask:
    return make_task(omni_repo)


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_rows(edits: list) -> list[dict]:
    """Rows as the dataset gives them: a 64x64 target, and the edit images as [-1, 1] tensors at their own size
    (one tensor for one image, a list for several, no column for none)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, images in enumerate(edits):
        row = {"prompt": PROMPTS[i % 2], "image": torch.rand(3, 64, 64, generator=g) * 2 - 1}
        if isinstance(images, list):
            row["edit_image"] = [pil_to_tensor(im)[0] for im in images]
        elif images is not None:
            row["edit_image"] = pil_to_tensor(images)[0]
        rows.append(row)
    return rows


EDITS = [picture(1, 100, 72), picture(2, 64, 80)]  # the first is centre-cropped to 96x64 for the VAE


def condition(pipe: ZImagePipeline, images: list) -> EditCondition:
    return pipe.encode_edit_images(pipe.prepare_edit_images(images, None, None)[0])


def test_omni_rows_are_encoded_as_the_pipeline_encodes_them(task, pipe):
    """Two images, one image, none: the prompt's segments (the template split around that many images), the
    target's latents, and each condition image's VAE latents and SigLIP2 grid are the pipeline's, bit for bit."""
    assert task.omni and task.validation_references == "optional" and set(task.models) >= {"dit", "image_encoder"}
    rows = make_rows([EDITS, EDITS[1], None])
    samples = task.encode(rows)
    assert set(samples[0]) == {"latents", *(f"text_{k}" for k in range(4)), "edit_0", "edit_1", "siglip_0", "siglip_1"}
    assert set(samples[1]) == {"latents", "text_0", "text_1", "text_2", "edit_0", "siglip_0"}
    assert set(samples[2]) == {"latents", "text_0"}
    target = pipe.vae.encode(torch.stack([row["image"] for row in rows]))
    for i, images in enumerate([EDITS, [EDITS[1]], []]):
        assert torch.equal(samples[i]["latents"], target[i])
        segments = pipe.encode_omni_prompt([rows[i]["prompt"]], len(images))[0]
        assert len(segments) == (len(images) + 2 if images else 1)
        assert all(torch.equal(samples[i][f"text_{k}"], s) for k, s in enumerate(segments))
        if images:
            expected = condition(pipe, images)
            assert all(torch.equal(samples[i][f"edit_{k}"], z) for k, z in enumerate(expected.latents))
            assert all(torch.equal(samples[i][f"siglip_{k}"], g) for k, g in enumerate(expected.siglip))
    assert samples[0]["edit_0"].shape == (4, 8, 12)  # 96x64 pixels: the pipeline's centre crop
    assert samples[0]["siglip_0"].shape[-1] == 24


def test_velocity_is_the_pipeline_per_step_prediction(task, pipe):
    """A batch mixing two condition images, one and none: each sample's velocity is what the pipeline predicts
    for that prompt and those edit images (`predict`, its per-step call) at the sample's noise level; the edit
    images count (without them the prediction differs)."""
    edits = [EDITS, [EDITS[1]], []]
    rows = make_rows([EDITS, EDITS[1], None])
    batch = task.collate(task.encode(rows))
    noisy = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.45, 0.1])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        for i, images in enumerate(edits):
            text = pipe.encode_omni_prompt([rows[i]["prompt"]], len(images))
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], text, None, 1.0, 0.0, (), condition(pipe, images))
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=1e-5)
        plain = pipe.encode_omni_prompt([rows[0]["prompt"]], 0)
        text_only = pipe.predict(noisy[:1], sigma[0], plain, None, 1.0, 0.0, (), EditCondition([], None))
    assert ours.shape == noisy.shape and (ours[:1] - text_only).abs().max() > 1e-3


def test_validation_samples_are_the_pipeline_with_the_same_edit_images(task, pipe):
    """`sample` (the trainer's --validation_images) draws what the pipeline draws from the same edit images, seed and
    size; without images the Omni model draws from text alone (another picture)."""
    size = {"height": 32, "width": 32, "num_inference_steps": 2, "cfg_scale": 2.0, "output_type": "np"}
    references = [[EDITS[0]], EDITS]
    with torch.no_grad():
        drawn = task.sample(task.models["dit"], PROMPTS, seed=3, references=references, **size)
        plain = task.sample(task.models["dit"], PROMPTS[:1], seed=3, **size)
        for prompt, images, ours in zip(PROMPTS, references, drawn, strict=True):
            theirs = pipe(prompt, edit_image=images, seed=3, progress_bar=False, **size)
            assert ours.shape == (1, 32, 32, 3) and np.abs(ours - theirs).max() <= 1e-6
    assert np.abs(plain[0] - drawn[0]).max() > 1e-4


def test_the_encoding_stage_knows_an_omni_model_from_its_dit_file(omni_repo, tiny_repo):
    """Without the DiT loaded (the cached mode's first stage) the DiT file's header says Omni, even without the
    SigLIP2 file (text-to-image rows need none); a plain Z-Image repo stays plain."""
    encoder_only = make_task(omni_repo, denoiser=False, without="siglip")
    assert "dit" not in encoder_only.models and encoder_only.omni
    assert set(encoder_only.encode(make_rows([None]))[0]) == {"latents", "text_0"}
    assert make_task(omni_repo, denoiser=False).omni
    plain = make_task(tiny_repo, denoiser=False)
    assert not plain.omni and set(plain.encode(make_rows([None]))[0]) == {"latents", "text"}


def test_clear_errors(omni_repo, tiny_repo, task):
    plain = make_task(tiny_repo)
    assert not plain.omni and plain.validation_references == "none"
    with pytest.raises(ConfigError, match=r"row 1 of the batch .* has edit_image, which trains Z-Image Omni"):
        plain.encode(make_rows([None, EDITS[0]]))
    with pytest.raises(ConfigError, match="takes no reference images"):
        plain.reference_arguments([EDITS[0]])
    assert task.reference_arguments(EDITS) == {"edit_image": EDITS}

    no_siglip = make_task(omni_repo, without="siglip")
    assert no_siglip.omni and "image_encoder" not in no_siglip.models
    with pytest.raises(ConfigError, match=r"row 0 of the batch .*siglip/model\.safetensors"):
        no_siglip.encode(make_rows([EDITS[0]]))
    with pytest.raises(ConfigError, match=r"siglip/model\.safetensors"):
        no_siglip.reference_arguments([EDITS[0]])

    with pytest.raises(ConfigError, match=r"row 1 of the batch \(prompt 'a small green.*both sides >= 64"):
        task.encode(make_rows([EDITS[0], picture(4, 48, 80)]))
    # a cache encoded for the other layout
    with pytest.raises(ConfigError, match="encoded for plain Z-Image .* loaded model is a Z-Image Omni DiT"):
        task.collate(plain.encode(make_rows([None])))
    with pytest.raises(ConfigError, match="encoded for Z-Image Omni .* loaded model is a plain Z-Image DiT"):
        plain.collate(task.encode(make_rows([None])))


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three 64x64 targets: edited from one image (a path), from two (a JSON list), and from text alone (no
    column). The edit images are 96x64 and 64x80, kept at their size under the runs' --max_pixels."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder = tmp_path_factory.mktemp("omni-data")
    picture(11, 96, 64).save(folder / "edit0.png")
    picture(12, 64, 80).save(folder / "edit1.png")
    extra = [{"edit_image": "edit0.png"}, {"edit_image": ["edit0.png", "edit1.png"]}, {}]
    return testing.write_caption_dataset(folder, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], seed=1, extra=extra)


def train_config(repo, dataset, output, **overrides):
    from diffsynth.training.testing import tiny_config

    return tiny_config(repo, "z_image", dataset, output, **{"max_pixels": 96 * 96, "learning_rate": 1e-3, **overrides})


@pytest.mark.integration
def test_lora_training_changes_only_the_lora_and_writes_a_file_the_pipeline_applies(omni_repo, dataset, tmp_path):
    """Two steps over the three rows (a batch mixing an edit and a text-to-image row): only LoRA weights move,
    and the saved file, loaded by the pipeline, gives the trained DiT's prediction with edit images."""
    trainer = pytest.importorskip("diffsynth.training.trainer")
    from diffsynth.training.data import batch_plan

    run = trainer.setup(train_config(omni_repo, dataset, tmp_path / "out"))
    assert run.task.omni and run.dataset[1]["edit_image"][1].shape == (3, 80, 64)
    frozen = {k: v.clone() for k, v in run.model.state_dict().items() if "lora_" not in k}
    state = trainer.TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2):
        state = trainer.train_step(run, state, [[run.dataset[i] for i in batch]])
        assert np.isfinite(state.loss) and state.loss > 0
    trainer.save(run, state)
    assert state.step == 2
    after = run.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the DiT's own weights are untouched
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and any(after[k].abs().max() > 0 for k in lora_b)  # and the LoRA learned (B starts at zero)
    assert any("siglip_refiner" in k for k in lora_b)  # the SigLIP refiner's attention carries a LoRA too

    saved = tmp_path / "out" / "step-000002.safetensors"
    assert len(load_file(str(saved))) > 0
    pipe = ZImagePipeline.from_pretrained(str(omni_repo), torch_dtype="float32", device="cpu")
    batch = run.task.collate(run.task.encode(make_rows([EDITS])))
    noisy, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.6])
    with torch.no_grad():
        trained = run.task.velocity(run.model, batch, noisy, sigma)
        base = run.task.velocity(pipe.dit, batch, noisy, sigma)
        pipe.load_lora(saved, fuse=False, name="trained")
        applied = run.task.velocity(pipe.dit, batch, noisy, sigma)
    torch.testing.assert_close(applied, trained, rtol=1e-5, atol=1e-5)
    assert (applied - base).abs().max() > 1e-4


@pytest.mark.integration
def test_cached_two_stage_training_equals_direct_training(omni_repo, dataset, tmp_path):
    """The encode stage stores each row's segments, condition latents and SigLIP grids; training from them loads
    the DiT alone and checkpoints what direct training does."""
    testing = pytest.importorskip("diffsynth.training.testing")
    runs = testing.train_direct_and_cached(train_config(omni_repo, dataset, tmp_path))
    assert set(runs.cached_item(0)) == {"latents", "text_0", "text_1", "text_2", "edit_0", "siglip_0"}
    two = runs.cached_item(1)
    assert {"edit_1", "siglip_1", "text_3"} <= set(two) and two["edit_0"].shape == (4, 8, 12)
    assert set(runs.cached_item(2)) == {"latents", "text_0"}
    # the encode stage batches the three rows otherwise than the training steps do, and the VAE's batched target
    # latents move with the batch by float rounding (~2e-6, measured): equal to that, not bit for bit
    testing.assert_same_training(runs, step=2, atol=1e-5)
    online, cached = runs.losses()
    assert cached == pytest.approx(online, rel=1e-5)


@pytest.mark.integration
def test_full_finetune_saves_the_omni_dit_in_its_official_layout(omni_repo, dataset, tmp_path):
    trainer = pytest.importorskip("diffsynth.training.trainer")
    trainer.train(train_config(omni_repo, dataset, tmp_path / "out", trainable_models=["dit"], max_steps=1))
    saved = load_file(str(tmp_path / "out" / "step-000001" / "dit" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(omni_repo / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == original.keys() and any(k.startswith("siglip_embedder.") for k in saved)
    assert any(not torch.equal(saved[k], original[k]) for k in saved)
    tuned = ZImagePipeline.from_pretrained(
        [ModelConfig(path=str(tmp_path / "out" / "step-000001" / "dit" / "diffusion_pytorch_model.safetensors"))]
        + [c for c in configs_from_folder(omni_repo)[0] if "/transformer/" not in str(c.path)],
        tokenizer_config=ModelConfig(path=str(omni_repo / "tokenizer")),
        torch_dtype="float32",
        device="cpu",
    )
    assert tuned.dit.config.omni


@pytest.mark.parametrize("bucket_step, max_pixels", [(64, 96 * 96), (16, 64 * 64)])
def test_the_dataset_gives_the_task_edit_images_as_the_pipeline_prepares_them(
    omni_repo, pipe, tmp_path, bucket_step, max_pixels
):
    """A 100x72 edit image reaches the DiT as the pipeline's own preparation of the file (centre-cropped to 96x64,
    SigLIP on the whole picture), whatever --bucket_step and --max_pixels make of the target: not at a bucket."""
    trainer = pytest.importorskip("diffsynth.training.trainer")
    testing = pytest.importorskip("diffsynth.training.testing")
    data = testing.write_caption_dataset(tmp_path / "data", [PROMPTS[0]], seed=1, extra=[{"edit_image": "edit.png"}])
    picture(21, 100, 72).save(tmp_path / "data" / "edit.png")
    config = train_config(omni_repo, data, tmp_path / "out", bucket_step=bucket_step, max_pixels=max_pixels)
    run = trainer.setup(config)
    item = run.dataset[0]
    assert item["edit_image"].shape == (3, 72, 100)
    batch = trainer.prepare_batch(run, [item])
    expected = condition(pipe, [Image.open(tmp_path / "data" / "edit.png")])
    torch.testing.assert_close(batch["edit_latents"][0][0], expected.latents[0], rtol=0, atol=0)
    torch.testing.assert_close(batch["siglip"][0][0], expected.siglip[0], rtol=0, atol=0)
