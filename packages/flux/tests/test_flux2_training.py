"""The FLUX.2 training task: its encodings and model call are the pipeline's own (text-to-image and editing), its
noise levels DiffSynth-Studio's, and the trainer (`diffsynth-train --family flux2`) trains it end to end.

The model is the tiny klein repo in a folder with a `diffsynth.json` setting 64 prompt tokens (the task and its
validation samples read it; 512 would make every encoding several seconds slower). The trainer tests are
`integration` (they need diffsynth-training, which the per-package session does not install).
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux2_test_repo import CAPTIONS, build_tiny_dev_repo
from PIL import Image

from diffsynth.flux.flux2.dit import Flux2DiT
from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline, flux2_velocity
from diffsynth.flux.flux2.training import Flux2TrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.pipeline import configs_from_folder

PROMPTS = CAPTIONS[:2]
TOKENS = 64
SIZE = {"height": 64, "width": 64, "num_inference_steps": 2}
FAST = {**SIZE, "progress_bar": False}
DIT_FILE = "diffusion_pytorch_model.safetensors"


def with_settings(repo: Path, target: Path) -> Path:
    """A copy of a tiny repo with `diffsynth.json` setting the prompt length to `TOKENS`."""
    shutil.copytree(repo, target)
    (target / "diffsynth.json").write_text(json.dumps({"defaults": {"max_sequence_length": TOKENS}}))
    return target


@pytest.fixture(scope="module")
def klein_repo(tiny_klein_repo, tmp_path_factory) -> Path:
    return with_settings(tiny_klein_repo, tmp_path_factory.mktemp("hub") / "FLUX.2-klein-tiny")


@pytest.fixture(scope="module")
def task(klein_repo):
    configs, tokenizer = configs_from_folder(klein_repo)
    return Flux2TrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rows(references=None) -> list[dict]:
    """Rows as the dataset gives them: 64x64 targets and references as tensors in [-1, 1]."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        row = {"prompt": prompt, "image": pil_to_tensor(picture(10 + i, 64, 64))[0]}
        if references is not None:
            refs = references[i]
            row["edit_image"] = (
                [pil_to_tensor(r)[0] for r in refs] if isinstance(refs, list) else pil_to_tensor(refs)[0]
            )
        out.append(row)
    return out


def test_task_declares_the_protocol_and_diffsynth_studios_schedule(task):
    assert (task.family, task.denoiser_slot, task.media, task.size_multiple) == ("flux2", "dit", ("image",), 16)
    assert task.conditioning == ("edit_image",) and task.validation_references == "optional"
    assert set(task.models) == {"dit", "vae", "text_encoder"} and set(task.model_files) == set(task.models)
    assert task.max_sequence_length == TOKENS  # the folder's diffsynth.json
    assert task.embedded_guidance == 1.0  # DiffSynth-Studio's FLUX.2 train.py: embedded_guidance=1.0
    # DiffSynth-Studio's "FLUX.2" training grid: linspace(1, 1/1000, 1000), exponential shift at mu = 0.8
    task.scheduler.set_training_grid()
    t = torch.linspace(1, 1 / 1000, 1000, dtype=torch.float64)
    expected = math.exp(0.8) / (math.exp(0.8) + (1 / t - 1))
    torch.testing.assert_close(task.scheduler.train_sigmas, expected.float())
    weights = task.scheduler.train_weights
    assert weights.argmax() == (task.scheduler.train_sigmas - 0.5).abs().argmin()  # the bell peaks at t = 500
    assert Flux2TrainingTask(task.pipe, exponential_shift_mu=0.0).scheduler.template_defaults == {"mu": 0.0}


def test_encode_and_collate_give_the_pipeline_encodings(task, tiny_klein_pipe):
    samples = task.encode(rows())
    assert [set(s) for s in samples] == [{"latents", "prompt_embeds"}] * 2
    assert samples[0]["latents"].shape == (16, 4, 4) and samples[0]["prompt_embeds"].shape == (TOKENS, 48)
    batch = task.collate(samples)
    assert torch.equal(batch["prompt_embeds"], tiny_klein_pipe.encode_prompt(PROMPTS, TOKENS))
    images = [picture(10 + i, 64, 64) for i in range(2)]
    # `vae_encode`'s PIL pixels come channels-last, which picks other convolution kernels: float rounding apart
    torch.testing.assert_close(batch["latents"], tiny_klein_pipe.vae_encode(images), rtol=0, atol=1e-5)


def test_direct_distillation_samples_on_the_pipelines_schedule(task, tiny_klein_pipe):
    """`inference_sigmas` (what `--task direct_distill` steps along) is the schedule the pipeline's DiT sees at
    64x48 pixels in 3 steps, and stepping a seed's noise along it with the task's velocity gives the latent the
    pipeline decodes for that seed (klein has no guidance embedder: the pipeline refuses embedded_guidance)."""
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    row = {"prompt": PROMPTS[0], "image": torch.zeros(3, 64, 48)}
    options = dict(height=64, width=48, max_sequence_length=TOKENS)
    check_distill_matches_pipeline(task, tiny_klein_pipe, row, timestep_arg=4, **options)


def test_velocity_is_the_pipeline_per_step_call(task, tiny_klein_pipe):
    """Bit-equal to the pipeline's `predict` (its denoise loop's call): one sigma per sample, and one shared."""
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = tiny_klein_pipe.encode_prompt(PROMPTS, TOKENS)
    dit = task.models["dit"]
    with torch.no_grad():
        ours = task.velocity(dit, batch, noisy, sigma)
        assert torch.equal(ours, tiny_klein_pipe.predict(noisy, sigma, text, None, 1.0, 1.0))
        shared = task.velocity(dit, batch, noisy, sigma[:1].expand(2))
        assert torch.equal(shared, tiny_klein_pipe.predict(noisy, sigma[0], text, None, 1.0, 1.0))
    assert ours.shape == (2, 16, 4, 4) and ours.dtype == torch.float32


def test_guidance_distilled_models_train_at_embedded_guidance_one(tmp_path):
    """FLUX.2-dev (guidance embedder, Mistral prompts): the task embeds 1.0, which the output depends on."""
    repo = with_settings(build_tiny_dev_repo(tmp_path / "src", seed=3), tmp_path / "FLUX.2-dev-tiny")
    configs, tokenizer = configs_from_folder(repo)
    # past the tiny tokenizer's system turn (142 tokens), which a shorter length would keep alone (refused)
    task = Flux2TrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", max_sequence_length=192
    )
    assert task.models["dit"].config.guidance_embed
    batch = task.collate(task.encode(rows()))
    noisy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.4])
    pipe = task.pipe
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        assert torch.equal(ours, pipe.predict(noisy, sigma, batch["prompt_embeds"], None, 1.0, 1.0))
        assert not torch.allclose(ours, pipe.predict(noisy, sigma, batch["prompt_embeds"], None, 1.0, 4.0), atol=1e-4)


def test_references_are_encoded_as_the_pipeline_encodes_them(task, tiny_klein_pipe):
    """Both rows share one 96x64 reference (one given alone, one in a list): the pipeline's reference tokens and
    ids, and the velocity of its `predict` with them; the references change the velocity."""
    ref = picture(1, 96, 64)
    samples = task.encode(rows([ref, [ref]]))
    expected = tiny_klein_pipe.encode_references(tiny_klein_pipe.load_edit_images([ref]))
    for sample in samples:
        assert sample["references"].shape == (6 * 4, 16)  # 96x64 pixels -> 6x4 packed tokens
        assert torch.equal(sample["references"], expected.tokens[0])
        assert torch.equal(sample["reference_ids"], expected.ids)
    assert samples[0]["reference_ids"][:, 0].unique().tolist() == [10.0]  # the first reference sits at t = 10
    batch = task.collate(samples)
    noisy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = tiny_klein_pipe.encode_prompt(PROMPTS, TOKENS)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        assert torch.equal(ours, tiny_klein_pipe.predict(noisy, sigma, text, None, 1.0, 1.0, expected))
        assert not torch.allclose(ours, tiny_klein_pipe.predict(noisy, sigma, text, None, 1.0, 1.0), atol=1e-4)


def test_each_row_keeps_its_own_references(task, tiny_klein_pipe):
    """Rows with two references each (the second cut to multiples of 16): each sample's velocity equals the
    pipeline's call on that row alone."""
    pairs = [[picture(2, 64, 64), picture(3, 72, 88)], [picture(4, 64, 64), picture(5, 72, 88)]]
    batch = task.collate(task.encode(rows(pairs)))
    assert batch["references"].shape == (2, 16 + 4 * 5, 16)  # 72x88 is cut to 64x80
    assert batch["reference_ids"][:, 0].unique().tolist() == [10.0, 20.0]
    noisy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = tiny_klein_pipe.encode_prompt(PROMPTS, TOKENS)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        for i, refs in enumerate(pairs):
            encoded = tiny_klein_pipe.encode_references(tiny_klein_pipe.load_edit_images(refs))
            theirs = tiny_klein_pipe.predict(noisy[i : i + 1], sigma[i], text[i : i + 1], None, 1.0, 1.0, encoded)
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=1e-5)


def test_stages_load_only_what_they_need(klein_repo):
    configs, tokenizer = configs_from_folder(klein_repo)
    trainer_side = Flux2TrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", encoders=False
    )
    assert set(trainer_side.models) == {"dit"} and trainer_side.pipe.tokenizer is None
    with pytest.raises(ConfigError, match="without its encoders"):
        trainer_side.encode(rows())
    # no tokenizer config: the tokenizer/ folder beside the model files
    encoder_side = Flux2TrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu", denoiser=False)
    assert set(encoder_side.models) == {"vae", "text_encoder"} and encoder_side.pipe.tokenizer is not None


def test_clear_errors(task, klein_repo, tiny_repo):
    with pytest.raises(ConfigError, match="row 0 of the batch"):
        task.encode([{"prompt": "x"}])
    ref = picture(1, 96, 64)
    mixed = rows([ref, ref])
    del mixed[1]["edit_image"]
    with pytest.raises(ConfigError, match="mixes 1 rows with edit_image and 1 without"):
        task.collate(task.encode(mixed))
    with pytest.raises(ConfigError, match="different sizes or counts.*--batch_size 1"):
        task.collate(task.encode(rows([ref, picture(2, 64, 64)])))
    with pytest.raises(ConfigError, match=r"row 1 of the batch \(prompt 'a small green.*edit_image\[0\] is 48x32"):
        task.encode(rows([ref, picture(2, 48, 32)]))
    with pytest.raises(ConfigError, match="max_sequence_length"):
        Flux2TrainingTask(task.pipe, max_sequence_length=0)
    configs, _ = configs_from_folder(klein_repo)
    dit_only = [c for c in configs if "transformer" in str(c.path)]
    with pytest.raises(ConfigError, match="needs"):
        Flux2TrainingTask.from_pretrained(dit_only, torch_dtype="float32", device="cpu")
    flux1_dit = [c for c in configs_from_folder(tiny_repo)[0] if "transformer" in str(c.path)]
    # refused as the pipeline loads it (`slot_specs`), naming the DiT's family (FLUX.1 trains with --family flux)
    with pytest.raises(ConfigError, match=r"flux1_dit model \(family flux\); Flux2ImagePipeline's dit slot"):
        Flux2TrainingTask.from_pretrained(flux1_dit, torch_dtype="float32", device="cpu", encoders=False)


def test_validation_samples_are_the_pipeline_with_the_same_references(task, tiny_klein_pipe):
    """`sample` draws what the pipeline draws at the task's prompt length, with a prompt's references as
    `edit_image`; the references matter."""
    references = [[picture(6, 64, 64)], [picture(7, 96, 64), picture(8, 64, 80)]]
    with torch.no_grad():
        drawn = task.sample(task.models["dit"], PROMPTS, seed=3, references=references, **SIZE)
        plain = task.sample(task.models["dit"], PROMPTS[:1], seed=3, **SIZE)
        for prompt, images, ours in zip(PROMPTS, references, drawn, strict=True):
            theirs = tiny_klein_pipe(prompt, edit_image=images, seed=3, max_sequence_length=TOKENS, **FAST)
            assert ours.size == (64, 64) and np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert np.abs(np.asarray(plain[0], dtype=int) - np.asarray(drawn[0], dtype=int)).max() > 8


def perturbed_dit_state(dit: Flux2DiT) -> dict[str, torch.Tensor]:
    """The DiT's weights moved by seeded noise, as a full fine-tune would leave them."""
    generator = torch.Generator().manual_seed(7)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in dit.state_dict().items()}


def test_full_export_replaces_the_diffusers_transformer_folder(task, klein_repo, tmp_path):
    from safetensors.torch import load_file, save_file

    original = load_file(str(klein_repo / "transformer" / DIT_FILE))
    untouched = task.export_state("dit", task.pipe.dit.state_dict())
    assert set(untouched) == set(original)  # diffusers' names: the fused qkv split into to_q / to_k / to_v
    assert all(torch.equal(untouched[k], original[k]) for k in original)  # untrained: the very file
    tuned = perturbed_dit_state(task.pipe.dit)
    exported = task.export_state("dit", tuned)
    export = shutil.copytree(klein_repo, tmp_path / "tuned")  # the export in place of transformer/'s weights
    save_file({k: v.contiguous() for k, v in exported.items()}, str(export / "transformer" / DIT_FILE))
    pipe = Flux2ImagePipeline.from_pretrained(str(export), torch_dtype="float32", device="cpu")
    assert all(torch.equal(pipe.dit.state_dict()[k], v) for k, v in tuned.items())  # our pipeline reads it back


def test_diffusers_loads_the_full_export_strictly_and_predicts_as_our_dit(task, klein_repo, tmp_path):
    from safetensors.torch import save_file

    from diffsynth.flux.flux2.pipeline import grid_ids, latents_to_tokens, text_ids

    diffusers = pytest.importorskip("diffusers")
    tuned = perturbed_dit_state(task.pipe.dit)
    export = shutil.copytree(klein_repo / "transformer", tmp_path / "transformer")
    save_file({k: v.contiguous() for k, v in task.export_state("dit", tuned).items()}, str(export / DIT_FILE))
    dit = Flux2DiT(task.pipe.dit.config)
    dit.load_state_dict(tuned)
    theirs, info = diffusers.Flux2Transformer2DModel.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    generator = torch.Generator().manual_seed(3)
    latents, sigma = torch.randn(1, 16, 4, 4, generator=generator), torch.tensor([0.6])
    text = torch.randn(1, 8, dit.txt_in.in_features, generator=generator)
    with torch.no_grad():
        ours = latents_to_tokens(flux2_velocity(dit, latents, sigma, text))
        reference = theirs(
            hidden_states=latents_to_tokens(latents), timestep=sigma, guidance=None, encoder_hidden_states=text,
            txt_ids=text_ids(8)[None], img_ids=grid_ids(4, 4)[None], return_dict=False,
        )[0]  # fmt: skip
    torch.testing.assert_close(reference, ours, rtol=1e-4, atol=1e-4)


def test_full_export_from_bfl_weights_keeps_bfl_names(task, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    single = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in task.pipe.dit.state_dict().items()}, str(single))
    monkeypatch.setattr(Flux2TrainingTask, "model_files", property(lambda self: {"dit": [str(single)]}))
    state = task.pipe.dit.state_dict()
    assert task.export_state("dit", state) is state  # BFL's single file holds our names: the export replaces it


# ----------------------------------------------------------------------------------------- the trainer
def write_edit_dataset(folder: Path) -> Path:
    """Two recolouring edits of plain pictures: `ref{i}.png` in `edit_image`, the target in `image`, all 64x64
    (FLUX.2 takes references of 64 pixels a side and up, and the dataset shrinks them under --max_pixels, 64x64
    here); the first names its reference as a path, the second as a JSON list of one path."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder.mkdir(parents=True)
    colours = [((40, 60, 200), (230, 200, 30)), ((200, 40, 40), (20, 140, 60))]  # (reference, target)
    for i, (reference, _) in enumerate(colours):
        Image.new("RGB", (64, 64), reference).save(folder / f"ref{i}.png")
    targets = [Image.new("RGB", (64, 64), target) for _, target in colours]
    extra = [{"edit_image": "ref0.png"}, {"edit_image": ["ref1.png"]}]
    return testing.write_caption_dataset(folder, PROMPTS, images=targets, extra=extra)


@pytest.fixture(scope="module")
def train(klein_repo, tmp_path_factory):
    """`diffsynth-train --family flux2` on the tiny repo and two captioned noise pictures, each seen twice."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = testing.write_caption_dataset(tmp_path_factory.mktemp("flux2-data"), PROMPTS)
    return testing.CliTrainer(klein_repo, "flux2", dataset, "--dataset_repeat", "2")


@pytest.mark.integration
def test_lora_training_gives_a_lora_the_pipeline_loads(klein_repo, train, tmp_path, one_thread):
    from diffsynth.training.testing import outputs_before_and_after_lora

    losses = train(tmp_path / "out", "--lora_formats", "diffsynth,kohya", "--use_gradient_checkpointing")
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    for name in ("step-000002.safetensors", "step-000002.kohya.safetensors"):
        pipe = Flux2ImagePipeline.from_pretrained(str(klein_repo), torch_dtype="float32", device="cpu")
        lora = tmp_path / "out" / name
        base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], seed=0, output_type="pt", **FAST)
        assert after.shape == base.shape == (1, 3, 64, 64)
        assert (after - base).abs().max() > 1e-4  # the LoRA changes the image


@pytest.mark.integration
def test_full_training_writes_weights_the_pipeline_loads(klein_repo, train, tmp_path, one_thread):
    from safetensors.torch import load_file

    from diffsynth.training.testing import configs_with_trained_weights

    losses = train(tmp_path / "out", "--trainable_models", "dit", "--max_steps", "1")
    assert len(losses) == 1 and np.isfinite(losses[0])
    saved = load_file(str(tmp_path / "out" / "step-000001" / "dit" / DIT_FILE))
    assert set(saved) == set(load_file(str(klein_repo / "transformer" / DIT_FILE)))  # diffusers' names
    configs = configs_with_trained_weights(klein_repo, tmp_path / "out" / "step-000001" / "dit")
    tuned = Flux2ImagePipeline.from_pretrained(
        configs, tokenizer_config=ModelConfig(path=str(klein_repo / "tokenizer")), torch_dtype="float32", device="cpu"
    )
    reference = Flux2ImagePipeline.from_pretrained(str(klein_repo), torch_dtype="float32", device="cpu")
    image, base = (p(PROMPTS[1], seed=1, output_type="pt", **FAST) for p in (tuned, reference))
    assert (image - base).abs().max() > 1e-5


@pytest.mark.integration
def test_cached_two_stage_training_gives_the_on_the_fly_loss(train, tmp_path, one_thread):
    direct, cached = train.direct_and_cached(tmp_path, "--max_steps", "1")
    assert len(direct) == len(cached) == 1
    assert cached[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-7)


@pytest.fixture(scope="module")
def edit_repo(klein_repo, tmp_path_factory) -> Path:
    """The tiny repo with its VAE's BatchNorm variances divided by 16, so the normalised latents (std about 3,
    not 0.75) and not the unpredictable noise dominate the loss the overfitting test watches."""
    from safetensors.torch import load_file, save_file

    repo = shutil.copytree(klein_repo, tmp_path_factory.mktemp("hub") / "FLUX.2-klein-edit-tiny")
    path = repo / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["bn.running_var"] = state["bn.running_var"] / 16
    save_file(state, str(path))
    return repo


def edit_config(repo, dataset, output, **overrides):
    """A LoRA (also on the DiT's input and output layers), no loss weights, low noise."""
    from diffsynth.training.testing import overfit_config

    targets = [*Flux2DiT.lora_target_modules, "img_in", "final_layer.linear"]
    values = dict(lora_rank=8, lora_target_modules=targets, max_steps=10)
    return overfit_config(repo, "flux2", dataset, output, noise=(0.9, 1.0), **{**values, **overrides})


@pytest.mark.integration
def test_trainer_overfits_an_edit_dataset_with_a_lora(edit_repo, tmp_path, one_thread):
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_edit_dataset(tmp_path / "data")
    state, curve = testing.train_and_log(edit_config(edit_repo, dataset, tmp_path / "out"))
    testing.assert_overfits(state, curve, steps=10, last=3)  # seeded: 10.3 -> 3.6 (mean of the last 3)
    assert (tmp_path / "out" / "step-000010.safetensors").is_file()


@pytest.mark.integration
def test_cached_edit_training_gives_the_online_losses(klein_repo, tmp_path, one_thread):
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_edit_dataset(tmp_path / "data")
    runs = testing.train_direct_and_cached(edit_config(klein_repo, dataset, tmp_path / "runs", max_steps=3))
    stored = runs.cached_item(1)
    assert set(stored) == {"latents", "prompt_embeds", "references", "reference_ids"}
    assert stored["references"].shape == (4 * 4, 16) and stored["prompt_embeds"].shape == (TOKENS, 48)
    online, cached = runs.losses()
    assert cached == pytest.approx(online, rel=1e-5)
