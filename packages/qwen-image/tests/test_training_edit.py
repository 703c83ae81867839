"""Qwen-Image-Edit training: prompts encoded with the edit images through the vision tower and edit latents
appended as the pipeline does, and the trainer (`diffsynth-train --family qwen_image`) overfitting a tiny edit
dataset. The tiny repo's `processor/` folder is the Edit repos' tokenizer source; the edit areas (1024x1024 for
the VAE, 384x384 for the vision tower) are shrunk, as in test_edit_parity.py, so the tiny models run in seconds.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.pipeline import qwen_image_velocity
from diffsynth.qwen_image.training import QwenImageTrainingTask, _tokenizer_defaults
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder

PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
EDIT_AREA, CONDITION_AREA = 32 * 32, 56 * 56


@pytest.fixture(autouse=True)
def small_areas(monkeypatch):
    from diffsynth.qwen_image import pipeline

    monkeypatch.setattr(pipeline, "EDIT_AREA", EDIT_AREA)
    monkeypatch.setattr(pipeline, "CONDITION_AREA", CONDITION_AREA)


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny repo with Edit-2511's `zero_cond_t` DiT beside the plain one."""
    copy = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("edit") / "Qwen-Image-Edit-2511")
    config = json.loads((copy / "transformer" / "config.json").read_text())
    (copy / "transformer" / "config.json").write_text(json.dumps({**config, "zero_cond_t": True}))
    return copy


def make_task(repo: Path, **options) -> QwenImageTrainingTask:
    configs, _ = configs_from_folder(repo)
    processor = ModelConfig(path=str(repo / "processor"))
    return QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=processor, torch_dtype="float32", device="cpu", **options
    )


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rows(edits) -> list[dict]:
    """Rows as the dataset gives them: tensors in [-1, 1], edit images at their own size."""
    g = torch.Generator().manual_seed(0)
    out = []
    for prompt, images in zip(PROMPTS, edits, strict=True):
        value = [pil_to_tensor(i)[0] for i in images] if isinstance(images, list) else pil_to_tensor(images)[0]
        out.append({"prompt": prompt, "image": torch.rand(3, 64, 64, generator=g) * 2 - 1, "edit_image": value})
    return out


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_velocity_is_the_pipeline_per_step_call_with_the_edit_images(tiny_repo, repo, zero_cond_t):
    """Two edit images shared by the batch: the prompt encoding, edit latents and velocity are the pipeline's
    (its batched prompt encoding pads, ours encodes each row alone: equal to float rounding)."""
    source = repo if zero_cond_t else tiny_repo
    task = make_task(source)
    pipe = QwenImagePipeline.from_pretrained(str(source), torch_dtype="float32", device="cpu")
    assert task.edit is True and pipe.dit.config.zero_cond_t is zero_cond_t
    images = [picture(1, 40, 56), picture(2, 64, 48)]
    samples = task.encode(rows([images, images]))
    edits = pipe.prepare_edit_images(images, auto_resize=True)
    text, mask = pipe.encode_prompt(PROMPTS, 512, edits)
    references = pipe.encode_edit_images(edits, 2, False, 34, 18)
    assert [tuple(r.shape[-2:]) for r in references] == [(4, 4), (4, 4)]  # 32x32-pixel areas, then 8x VAE
    for i, sample in enumerate(samples):
        assert set(sample) == {"latents", "text", "edit_0", "edit_1"}
        torch.testing.assert_close(sample["text"], text[i][mask[i].bool()], rtol=0, atol=1e-5)
        assert all(torch.equal(sample[f"edit_{k}"], references[k][i]) for k in range(2))
    batch = task.collate(samples)
    assert torch.equal(batch["text_mask"], mask)
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        theirs = qwen_image_velocity(pipe.dit, noisy, sigma, text, mask, references)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        plain = qwen_image_velocity(pipe.dit, noisy, sigma, text, mask)
    assert (ours - plain).abs().max() > 1e-3  # the edit latents count


def test_zero_cond_t_option_makes_a_dit_without_its_config_edit_2511s(tiny_repo, repo):
    """DiffSynth-Studio's `--zero_cond_t` (its Edit-2511 commands load the DiT without config.json): the task
    option turns the plain-config DiT into Edit-2511's, whose velocity then equals the 2511 repo's."""
    task = make_task(tiny_repo, zero_cond_t=True)
    reference = make_task(repo)
    assert task.models["dit"].config.zero_cond_t is True and task.edit is True
    images = [picture(1, 40, 56)]
    batch = task.collate(task.encode(rows([images, images])))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        theirs = reference.velocity(reference.models["dit"], batch, noisy, sigma)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        plain = make_task(tiny_repo)
        assert (plain.velocity(plain.models["dit"], batch, noisy, sigma) - ours).abs().max() > 1e-4


def test_the_prompt_template_follows_the_pipeline_setting(tiny_repo):
    """Edit-2509/2511 ("plus") number the images and show the vision tower 384x384 versions; the first Edit
    ("edit", its preset's setting) shows it the VAE-sized image unnumbered."""
    hub = ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/")
    assert _tokenizer_defaults(hub) == {"edit_template": "edit"}
    assert _tokenizer_defaults(ModelConfig(model_id="Qwen/Qwen-Image-Edit-2509", origin_file_pattern="processor/")) == {
        "edit_template": "plus"
    }
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    image = picture(3, 48, 40)
    edit_row = rows([image, image])[:1]
    texts = {}
    for template in ("plus", "edit"):
        task = make_task(tiny_repo, edit_template=template)
        pipe.defaults["edit_template"] = template
        text, mask = pipe.encode_prompt(PROMPTS[:1], 512, pipe.prepare_edit_images([image], auto_resize=True))
        texts[template] = task.encode(edit_row)[0]["text"]
        torch.testing.assert_close(texts[template], text[0][mask[0].bool()], rtol=0, atol=1e-5)
    assert texts["plus"].shape != texts["edit"].shape  # "Picture 1: " and another vision-tower size
    assert torch.equal(make_task(tiny_repo).encode(edit_row)[0]["text"], texts["plus"])  # a folder: "plus"


def test_clear_errors(tiny_repo):
    task = make_task(tiny_repo)
    image = picture(1, 40, 56)
    no_edit = rows([image, image])
    del no_edit[1]["edit_image"]
    with pytest.raises(ConfigError, match=r"row 1 of the batch \(prompt 'a small green.*has no edit_image"):
        task.encode(no_edit)
    configs, tokenizer = configs_from_folder(tiny_repo)  # processor/ beside tokenizer/: Edit unless edit=False
    plain = QwenImageTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", edit=False
    )
    assert plain.edit is False  # rows decide
    with pytest.raises(ConfigError, match="different edit images.*--batch_size 1"):
        plain.collate(plain.encode(no_edit))
    with pytest.raises(ConfigError, match="different edit images"):
        task.collate(task.encode(rows([image, [image, image]])))
    with pytest.raises(ConfigError, match="edit_template='fancy'"):
        make_task(tiny_repo, edit_template="fancy", encoders=False)


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two recolouring edits of plain pictures, each with its edit image in `edit_image` (`edit{i}.png`)."""
    testing = pytest.importorskip("diffsynth.training.testing")
    return testing.write_edit_dataset(tmp_path_factory.mktemp("edit-data"), PROMPTS, "edit_image", "edit")


def train_config(repo, dataset, output, **overrides):
    """A LoRA (also on the DiT's input and output layers), no loss weights, low noise."""
    from diffsynth.qwen_image.dit import QwenImageDiT
    from diffsynth.training.testing import overfit_config

    targets = [*QwenImageDiT.lora_target_modules, "img_in", "proj_out"]
    values = dict(tokenizer_path=str(Path(repo) / "processor"), lora_rank=8, lora_target_modules=targets, max_steps=12)
    return overfit_config(repo, "qwen_image", dataset, output, noise=(0.9, 1.0), **{**values, **overrides})


@pytest.mark.integration
def test_trainer_overfits_an_edit_dataset_with_a_lora(repo, dataset, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    state, curve = testing.train_and_log(train_config(repo, dataset, tmp_path / "out"))
    testing.assert_overfits(state, curve, steps=12, last=3)
    assert (tmp_path / "out" / "step-000012.safetensors").is_file()


@pytest.mark.integration
def test_cached_training_gives_the_online_losses(repo, dataset, tmp_path):
    testing = pytest.importorskip("diffsynth.training.testing")
    runs = testing.train_direct_and_cached(train_config(repo, dataset, tmp_path, max_steps=3))
    stored = runs.cached_item(1)
    assert set(stored) == {"latents", "text", "edit_0"} and stored["edit_0"].shape == (16, 4, 4)  # 32x32 px
    online, cached = runs.losses()
    assert cached == pytest.approx(online, rel=1e-5)


@pytest.mark.integration
def test_a_missing_edit_image_is_named(repo, dataset, tmp_path):
    trainer = pytest.importorskip("diffsynth.training.trainer")
    broken = shutil.copytree(dataset, tmp_path / "broken")
    (broken / "edit1.png").unlink()
    with pytest.raises(ConfigError, match=r"'edit1.png' \(at row 2 column edit_image\)"):
        trainer.train(train_config(repo, broken, tmp_path / "out"))


def test_validation_samples_are_the_pipeline_with_the_same_edit_images(repo):
    """`sample` (the trainer's --validation_images) draws what the pipeline draws from the same edit images, seed
    and size (one image, and two as 2509/2511 take them); the images matter (without them the picture differs).
    Compared as floats: the tiny random models' pictures move by about one 8-bit level with the images."""
    task = make_task(repo)
    pipe = QwenImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    references = [[picture(6, 40, 56)], [picture(7, 64, 48), picture(8, 32, 32)]]
    size = {"height": 32, "width": 32, "num_inference_steps": 2, "cfg_scale": 1.0, "output_type": "np"}
    assert task.validation_references == "expected"
    with torch.no_grad():
        drawn = task.sample(task.models["dit"], PROMPTS, seed=3, references=references, **size)
        plain = task.sample(task.models["dit"], PROMPTS[:1], seed=3, **size)
        for prompt, images, ours in zip(PROMPTS, references, drawn, strict=True):
            theirs = pipe(prompt, edit_image=images, seed=3, progress_bar=False, **size)
            assert ours.shape == (1, 32, 32, 3) and np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(plain[0] - drawn[0]).max() > 1e-4  # deterministic: equal pictures would differ by 0


def test_both_stages_of_a_first_edit_folder_take_its_template(tiny_repo, tmp_path):
    """A local Qwen-Image-Edit folder (model_index.json names QwenImageEditPipeline): the encoder-only stage of
    cached training loads no DiT, yet prompts with the "edit" template the DiT's stage reads from its source."""
    folder = shutil.copytree(tiny_repo, tmp_path / "Qwen-Image-Edit")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    encoding = make_task(folder, denoiser=False)
    assert encoding.pipe.dit is None
    assert encoding.pipe.edit_template() == "edit"
    assert make_task(folder, encoders=False).pipe.edit_template() == "edit"
    assert make_task(tiny_repo, denoiser=False).pipe.edit_template() == "plus"  # no model_index.json: "plus"
