"""Video-As-Prompt training: the reference inputs of a row are the pipeline's `encode_vap`, the model call is the
pipeline's per-step call through `vap_forward`, a DiT LoRA trained by the real trainer leaves the expert untouched
and loads into `WanVideoPipeline`, and the rows, caches and validation samples it cannot take are refused by name.

As in test_training_i2v.py, the reference is the pipeline itself (its DiT call, recorded while it generates one step
from the same noise and sigma). The tiny DiT and expert are the pipeline tests' (test_video_as_prompt_pipeline.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.pipeline import folder_model_configs
from diffsynth.wan.training import WanTrainingTask

from . import test_training_i2v as I2V
from . import test_video_as_prompt_pipeline as VP

PROMPTS, CAPTION = I2V.PROMPTS, VP.VAP_PROMPT
frames, as_video, pipeline_velocity = I2V.frames, I2V.as_video, I2V.pipeline_velocity


def reference(seed: int, count: int = 9, size=(40, 24)):
    """A reference video of `count` frames at another size than the target's: the pipeline picks and resizes."""
    return [VP.image(seed + i, size) for i in range(count)]


@pytest.fixture(scope="module")
def vap(tiny_repo_factory):
    """The tiny I2V pipeline with an expert beside both its layers, and the training task over it."""
    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("i2v")), torch_dtype="float32", device="cpu")
    pipe.vap = VP.tiny_expert(pipe.dit.config, (0, 1))
    return pipe, WanTrainingTask(pipe)


def vap_rows():
    """Two rows: one with a caption and a 9-frame reference of another size, one with neither caption nor
    input_image (its first frame is the condition) and a reference of the video's own size and length."""
    first = reference(200, count=1, size=(32, 32))[0]
    return [
        {"prompt": PROMPTS[0], "video": as_video(frames(1)), "input_image": pil_to_tensor(first)[0],
         "vap_video": as_video(reference(100)), "vap_prompt": CAPTION},
        {"prompt": PROMPTS[1], "video": as_video(frames(2)), "vap_video": as_video(frames(3)), "vap_prompt": ""},
    ]  # fmt: skip


def pipeline_arguments(row) -> dict:
    """The pipeline's arguments for the same row: its input_image (else the first frame), reference and caption."""
    image = row.get("input_image")
    image = row["video"][:, 0] if image is None else image
    return {
        "input_image": tensor_to_pil(image)[0],
        "vap_video": tensor_to_pil(row["vap_video"].transpose(0, 1)),
        "vap_prompt": row.get("vap_prompt") or "",
    }


# ----------------------------------------------------------------------------------------- (a) the encoded sample
def test_encoded_sample_is_the_pipelines_preparation(vap, monkeypatch):
    """Each row's `vap_*` tensors are exactly what the pipeline hands the expert for the same reference, caption and
    size (frames picked evenly and resized, latent + first-frame conditioning, CLIP, text); its `y` and CLIP
    features are the DiT's I2V inputs of the same call."""
    pipe, task = vap
    rows = vap_rows()
    samples = task.encode(rows)
    assert set(samples[0]) == {"latents", "text", "y", "clip_feature", "vap_latents", "vap_context", "vap_clip_feature"}
    assert samples[0]["vap_latents"].shape == (16 + 4 + 16, 2, 4, 4)
    for row, sample in zip(rows, samples, strict=True):
        seen = {}
        prepare = pipe.vap.prepare

        def spy(latents, context, clip_feature, dtype, prepare=prepare, seen=seen):
            seen.update(latents=latents, context=context, clip=clip_feature)
            return prepare(latents, context, clip_feature, dtype)

        def record(module, args, kwargs, output, seen=seen):
            seen.update(y=kwargs["y"], clip_feature=kwargs["clip_feature"])

        monkeypatch.setattr(pipe.vap, "prepare", spy)
        hook = pipe.dit.register_forward_hook(record, with_kwargs=True)
        try:
            pipe(
                row["prompt"], seed=0, cfg_scale=1.0, **VP.FAST | {"height": 32, "width": 32}, **pipeline_arguments(row)
            )
        finally:
            hook.remove()
            monkeypatch.undo()
        pairs = {"vap_latents": "latents", "vap_context": "context", "vap_clip_feature": "clip"}
        pairs.update(y="y", clip_feature="clip_feature")
        for ours, theirs in pairs.items():
            assert torch.equal(sample[ours], seen[theirs][0]), ours
    # a row without vap_prompt is encoded with "" (what DiffSynth-Studio's training encodes)
    (plain,) = task.encode([{k: v for k, v in rows[1].items() if k != "vap_prompt"}])
    assert torch.equal(plain["vap_context"], samples[1]["vap_context"])
    assert not torch.equal(samples[0]["vap_context"], pipe.encode_prompt([""])[0])


# ----------------------------------------------------------------------------------------- (b) the model call
def test_velocity_is_the_pipelines_vap_forward_and_the_expert_stays_frozen(vap):
    """`velocity` on the encoded batch equals the pipeline's DiT call (through `vap_forward`) at its first step from
    the same latents and sigma; without the reference the output differs (the expert acts); a gradient reaches the
    DiT and none the frozen expert."""
    pipe, task = vap
    rows = vap_rows()
    batch = task.collate(task.encode(rows))
    noisy = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.35])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
    worst = 0.0
    for k, row in enumerate(rows):
        theirs = pipeline_velocity(pipe, row["prompt"], noisy[k : k + 1], float(sigma[k]), **pipeline_arguments(row))
        torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)
        worst = max(worst, float((ours[k : k + 1] - theirs).abs().max()))
        plain = pipeline_velocity(
            pipe, row["prompt"], noisy[k : k + 1], float(sigma[k]), input_image=pipeline_arguments(row)["input_image"]
        )
        assert (theirs - plain).abs().max() > 1e-4
    assert worst <= 1e-5
    dit = task.models["dit"]
    dit.requires_grad_(True)
    try:
        task.velocity(dit, batch, noisy, sigma).square().mean().backward()
        assert all(p.grad is not None for p in dit.blocks.parameters())
        assert all(not p.requires_grad and p.grad is None for p in pipe.vap.parameters())
    finally:
        dit.requires_grad_(False).zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------- (d) refusals
def test_rows_caches_and_validation_samples_that_cannot_train_are_refused(vap, tiny_repo_factory):
    pipe, task = vap
    row = vap_rows()[0]
    plain = WanTrainingTask(pipe, vap=False)  # the I2V DiT without the expert among the model files
    with pytest.raises(ConfigError, match="row 0 has vap_video, vap_prompt, but it needs the Video-As-Prompt expert"):
        plain.encode([row])
    with pytest.raises(ConfigError, match="row 0 has no vap_video: with the Video-As-Prompt expert"):
        task.encode([{k: v for k, v in row.items() if k != "vap_video"}])
    with pytest.raises(ConfigError, match="row 0: vap_video is the path 'ref.mp4', not a loaded video; add vap_video"):
        task.encode([dict(row, vap_video="ref.mp4")])
    with pytest.raises(ConfigError, match=r"row 0: vap_video must be a video \[3, F, H, W\]"):
        task.encode([dict(row, vap_video=row["input_image"])])  # an image file listed in --data_file_keys
    with pytest.raises(ConfigError, match="row 0 has an end_image; Video-As-Prompt"):
        task.encode([dict(row, end_image=row["input_image"])])
    # a cache encoded without the expert, trained with it, and the other way round
    encoded = task.encode([row])
    without = plain.collate(plain.encode([{k: v for k, v in row.items() if not k.startswith("vap")}]))
    noisy, sigma = torch.zeros(1, 16, 2, 4, 4), torch.tensor([0.5])
    with pytest.raises(ConfigError, match="encoded without vap_video"):
        task.velocity(pipe.dit, without, noisy, sigma)
    expert, pipe.vap = pipe.vap, None
    try:
        with pytest.raises(ConfigError, match="encoded with vap_video, but the Video-As-Prompt expert is not loaded"):
            plain.velocity(pipe.dit, task.collate(encoded), noisy, sigma)
    finally:
        pipe.vap = expert
    # validation samples: --validation_images cannot carry a reference video
    assert task.validation_references == "required" and plain.validation_references == "required"
    with pytest.raises(ConfigError, match="validation samples of a Video-As-Prompt model follow a reference video"):
        task.reference_arguments([VP.image(1)])
    t2v = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("t2v")), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="not the plain Wan 2.1 I2V DiT it runs beside"):
        WanTrainingTask(t2v, vap=True)


# ----------------------------------------------------------------------------------------- (c) the trainer
@pytest.fixture(scope="module")
def vap_repo(tiny_repo_factory, tmp_path_factory) -> Path:
    """The tiny I2V repo with its DiT replaced by an official `transformer/` folder: a DiT (diffusers names) and the
    expert (`*_mot_ref*` keys) in one file, as ByteDance/Video-As-Prompt-Wan2.1-14B ships them."""
    root = tmp_path_factory.mktemp("vap-training") / "repo"
    shutil.copytree(tiny_repo_factory("i2v"), root)
    (root / "diffusion_pytorch_model.safetensors").unlink()
    (root / "config.json").unlink()
    _, _, state, config = VP.official_transformer(seed=3)
    (root / "transformer").mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(root / "transformer/diffusion_pytorch_model.safetensors")
    )
    (root / "transformer/config.json").write_text(json.dumps(config))
    return root


def test_stages_load_the_expert_with_the_dit_only(vap_repo):
    configs, tokenizer = folder_model_configs(vap_repo)
    encoder = WanTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(encoder.models) == {"vae", "text_encoder", "image_encoder"} and encoder.vap
    assert encoder.validation_references == "required"
    trainer = WanTrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu", encoders=False)
    assert set(trainer.models) == {"dit", "vap"} and trainer.vap
    assert trainer.models["vap"].config.mot_layers == (0, 2)  # read from the official key names
    full = WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    row = {"prompt": PROMPTS[0], "video": as_video(frames(4)), "vap_video": as_video(frames(5))}
    for ours, theirs in zip(encoder.encode([row]), full.encode([row]), strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def write_dataset(folder: Path, size: int = 32) -> Path:
    """Two 5-frame mp4 videos, each with a 5-frame reference video; one row has a vap_prompt."""
    from diffsynth.runtime.media import save_video
    from diffsynth.training.testing import write_metadata

    rows = []
    for i, prompt in enumerate(PROMPTS):
        for name, seed in ((f"clip{i}.mp4", 10 + i), (f"ref{i}.mp4", 20 + i)):
            save_video(frames(seed, size=size), folder / name, fps=8)
        rows.append({"video": f"clip{i}.mp4", "vap_video": f"ref{i}.mp4", "prompt": prompt})
    rows[0]["vap_prompt"] = CAPTION
    return write_metadata(folder, rows)


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_beside_the_frozen_expert(vap_repo, tmp_path, monkeypatch):
    """DiffSynth-Studio's recipe (`--data_file_keys video,vap_video`, a LoRA on the DiT's q,k,v,o,ffn.0,ffn.2) for 2
    steps: only LoRA weights learn, the expert and the DiT's own weights are untouched, and the saved LoRA, loaded
    into `WanVideoPipeline`, gives the trained model's Video-As-Prompt velocity."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training import trainer

    data = tmp_path / "data"
    data.mkdir()
    dataset = write_dataset(data)
    built = []
    build_task = trainer.build_task

    def keep(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainer, "build_task", keep)
    config = testing.tiny_config(
        vap_repo, "wan", dataset, tmp_path / "out", num_frames=5, max_pixels=32 * 32, bucket_step=32, batch_size=1,
        data_file_keys=["video", "vap_video"], lora_base_model="dit",
        lora_target_modules=["q", "k", "v", "o", "ffn.0", "ffn.2"], max_steps=2,
    )  # fmt: skip
    state = trainer.train(config)
    assert state.step == 2
    (task,) = built
    dit, expert, _, _ = VP.official_transformer(seed=3)
    for key, value in expert.state_dict().items():  # the expert is untouched
        assert torch.equal(task.pipe.vap.state_dict()[key], value), key
    trained = task.models["dit"].state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if ".lora_" not in k}
    assert base.keys() == dit.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in dit.state_dict().items())  # so is the DiT's own weights
    lora_file = tmp_path / "out" / "step-000002.safetensors"
    saved = load_file(str(lora_file))
    assert saved and all("lora" in k and "mot_ref" not in k for k in saved)
    checkpoint = tmp_path / "out" / "checkpoints" / "step-000002" / "trainable.safetensors"
    trainable = load_file(str(checkpoint))
    assert trainable and all(".lora_" in k for k in trainable)
    assert any(float(v.abs().max()) > 0 for k, v in trainable.items() if "lora_B" in k)  # they learned

    pipe = WanVideoPipeline.from_pretrained(str(vap_repo), torch_dtype="float32", device="cpu")
    row = {"prompt": PROMPTS[0], "video": as_video(frames(6)), "vap_video": as_video(frames(7)), "vap_prompt": CAPTION}
    noisy = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    before = pipeline_velocity(pipe, PROMPTS[0], noisy, 0.6, **pipeline_arguments(row))
    pipe.load_lora(str(lora_file))
    after = pipeline_velocity(pipe, PROMPTS[0], noisy, 0.6, **pipeline_arguments(row))
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], task.collate(task.encode([row])), noisy, torch.tensor([0.6]))
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-6
