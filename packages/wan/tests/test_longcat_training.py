"""LongCat-Video training (`longcat_training.py`): the Wan task picks the LongCat task from the DiT's files; its
encodings are the pipeline's, its velocity is the negated prediction the pipeline steps with (its schedule and one
sample equal the pipeline's), and (integration) `diffsynth-train` trains a LoRA the pipeline loads."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.longcat import LongCatConfig, LongCatVideoDiT
from diffsynth.wan.longcat_training import LongCatTrainingTask
from diffsynth.wan.training import WanTrainingTask

from . import conftest as C

TINY = dict(hidden_size=48, depth=2, num_heads=2, adaln_tembed_dim=16, frequency_embedding_size=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LongCat-Video `dit/` folder beside the T2V repo's umT5, VAE and tokenizer."""
    from safetensors.torch import save_file

    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-longcat-train"), "t2v")
    dit = C.randomize(LongCatVideoDiT(LongCatConfig(**TINY, caption_channels=C.TINY_UMT5["d_model"])), 5).eval()
    (root / "dit").mkdir()
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "dit" / "model.safetensors"))
    configs = [ModelConfig(path=str(root / "dit" / "model.safetensors")), ModelConfig(path=str(root / C.T5_FILE))]
    configs.append(ModelConfig(path=str(root / "Wan2.1_VAE.pth")))
    return root, configs, ModelConfig(path=str(root / C.TOKENIZER_DIR))


@pytest.fixture(scope="module")
def task(files):
    _, configs, tokenizer = files
    return WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def pipe(files):
    _, configs, tokenizer = files
    return WanVideoPipeline.from_pretrained(model_configs=configs, tokenizer_config=tokenizer, torch_dtype="float32",
                                            device="cpu")  # fmt: skip


def rows():
    g = torch.Generator().manual_seed(0)
    return [{"prompt": C.CAPTIONS[0], "video": torch.rand(3, 5, 32, 48, generator=g) * 2 - 1}]


def test_the_wan_task_hands_a_longcat_dit_to_its_task(task):
    assert isinstance(task, LongCatTrainingTask) and task.kind == "longcat" and task.family == "wan"
    assert task.scheduler.template == "wan" and task.scheduler.template_defaults == {"shift": 1.0}


def test_encode_is_the_pipelines_and_velocity_its_negated_prediction(task, pipe):
    (sample,) = task.encode(rows())
    video = rows()[0]["video"]
    torch.testing.assert_close(sample["latents"], pipe.vae.encode(video[None])[0].float())
    torch.testing.assert_close(sample["text"], pipe.encode_prompt([C.CAPTIONS[0]])[0])
    batch = task.collate([sample, sample])
    noisy = torch.randn(2, *sample["latents"].shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        text = batch["text"]
        mask = (text != 0).any(-1).float()
        for k in range(2):
            t = torch.full((1, noisy.shape[2]), float(sigma[k]) * 1000)
            want = -pipe.dit(noisy[k : k + 1], t, text[k : k + 1], mask[k : k + 1], num_cond_latents=0)
            torch.testing.assert_close(ours[k : k + 1], want, atol=1e-5, rtol=1e-4)


def test_direct_distillation_samples_on_the_pipelines_schedule(task, pipe):
    from diffsynth.runtime.testing.distill import check_distill_matches_pipeline

    row = {"prompt": C.CAPTIONS[0], "image": torch.zeros(3, 32, 48)}
    options = dict(height=32, width=48, num_frames=1, tiled=False, sigma_shift=1.0)
    check_distill_matches_pipeline(task, pipe, row, timestep_arg=1, timestep_scale=1000, **options)


def test_condition_columns_are_refused(task):
    row = {**rows()[0], "input_image": torch.zeros(3, 32, 48)}
    with pytest.raises(ConfigError, match="LongCat-Video trains text-to-video here"):
        task.encode([row])
    with pytest.raises(ConfigError, match="text-to-video"):
        task.reference_arguments(["image"])


@pytest.mark.integration
def test_trainer_writes_a_lora_the_pipeline_loads(files, pipe, tmp_path):
    from diffsynth.training.testing import train_with_cli, write_caption_dataset

    root, _, _ = files
    data = write_caption_dataset(tmp_path / "data", [C.CAPTIONS[0], C.CAPTIONS[1]], size=(48, 32))
    paths = ",".join(str(p) for p in (root / C.T5_FILE, root / "Wan2.1_VAE.pth"))  # --model is the dit/ folder
    losses = train_with_cli(root / "dit", "wan", data, tmp_path / "out", "--model_paths", paths, "--tokenizer_path",
                            str(root / C.TOKENIZER_DIR), "--dataset_repeat", "2", "--num_frames", "1")  # fmt: skip
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    run = dict(height=32, width=48, num_frames=1, num_inference_steps=2, seed=0, tiled=False, output_type="pt",
               progress_bar=False)  # fmt: skip
    before = pipe(C.CAPTIONS[0], **run)
    pipe.load_lora(str(tmp_path / "out" / "step-000002.safetensors"), fuse=False, name="trained")
    try:
        after = pipe(C.CAPTIONS[0], **run)
    finally:
        pipe.clear_loras()
    assert (after - before).abs().max() > 1e-5
