"""Wan training for the speed-control model, Fun Control-Camera, Wan2.2-Animate, Wan2.2-Animate-2 and Wan2.2-S2V.

As in test_training_i2v.py, the reference is the pipeline itself: a hook records what its DiT returns at the
first step of a generation from the same noise, sigma and inputs, and the training task's `velocity` on the
encoded row must equal it. The tiny models are the other Wan tests' (conftest, test_animate, test_animate2, test_s2v).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.motion_controller import MotionControllerConfig, WanMotionController
from diffsynth.wan.pipeline import folder_model_configs
from diffsynth.wan.training import WanTrainingTask

from . import test_animate2 as A2  # relative imports inside: not loadable with `_beside`


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_variants_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = _beside("conftest")
I2V = _beside("test_training_i2v")  # frames, as_video, pipeline_velocity, PROMPTS
A = _beside("test_animate")
S = _beside("test_s2v")

PROMPT = I2V.PROMPTS[0]
frames, as_video, pipeline_velocity = I2V.frames, I2V.as_video, I2V.pipeline_velocity


def load(repo) -> tuple[WanVideoPipeline, WanTrainingTask]:
    """The repo's pipeline and, over it, the training task (encoders and DiT: the same models)."""
    pipe = WanVideoPipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")
    return pipe, WanTrainingTask(pipe)


def noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def velocity(task, model, rows, noisy, sigma) -> torch.Tensor:
    batch = task.collate(task.encode(rows))
    with torch.no_grad():
        return task.velocity(model, batch, noisy, torch.tensor(sigma))


# ----------------------------------------------------------------------------------------- speed control
@pytest.fixture(scope="module")
def speed_repo(tiny_repo, tmp_path_factory) -> Path:
    """The tiny T2V repo with a (random, not zeroed) speed-control model in a folder of its own."""
    root = tmp_path_factory.mktemp("variants-speed") / "repo"
    shutil.copytree(tiny_repo, root)
    (root / "speedcontrol").mkdir()
    config = MotionControllerConfig(freq_dim=C.TINY_DIT["freq_dim"], dim=C.TINY_DIT["dim"])
    save_file(
        dict(C.randomize(WanMotionController(config), 11).state_dict()), str(root / "speedcontrol/model.safetensors")
    )
    return root


@pytest.fixture(scope="module")
def speed(speed_repo):
    return load(speed_repo)


def speed_rows():
    return [
        {"prompt": I2V.PROMPTS[0], "video": as_video(frames(1)), "motion_bucket_id": "30"},  # a CSV cell
        {"prompt": I2V.PROMPTS[1], "video": as_video(frames(2)), "motion_bucket_id": 85},
    ]


def test_speed_control_velocity_is_the_pipeline_prediction_with_motion_bucket_id(speed):
    pipe, task = speed
    noisy, sigma = noise((2, 16, 2, 4, 4), 0), [0.7, 0.3]
    assert task.speed_control and task.denoiser_slot == "dit"
    ours = velocity(task, task.models["dit"], speed_rows(), noisy, sigma)
    for k, bucket in enumerate((30, 85)):
        theirs = pipeline_velocity(pipe, I2V.PROMPTS[k], noisy[k : k + 1], sigma[k], motion_bucket_id=bucket)
        torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)
    plain = pipeline_velocity(pipe, I2V.PROMPTS[0], noisy[:1], sigma[0])
    assert (ours[:1] - plain).abs().max() > 1e-4  # the offset is there


def test_training_the_controller_alone(speed):
    """`trained_model="motion_controller"`: the trainer's model is the controller; the same prediction, and the
    gradient reaches the controller, not the frozen DiT; gradient checkpointing asked of it reaches the DiT."""
    pipe, _ = speed
    task = WanTrainingTask(pipe, trained_model="motion_controller")
    assert task.denoiser_slot == "motion_controller" and task.validation_references == "required"
    assert "motion_controller" in task.model_files
    controller = task.models["motion_controller"]
    batch = task.collate(task.encode(speed_rows()))
    noisy, sigma = noise((2, 16, 2, 4, 4), 0), torch.tensor([0.7, 0.3])
    controller.requires_grad_(True)
    try:
        out = task.velocity(controller, batch, noisy, sigma)
        out.square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in controller.parameters())
        assert all(p.grad is None for p in pipe.dit.parameters())
        controller.gradient_checkpointing = True
        again = task.velocity(controller, batch, noisy, sigma)
        assert pipe.dit.gradient_checkpointing
    finally:
        controller.requires_grad_(False).zero_grad(set_to_none=True)
        controller.gradient_checkpointing = pipe.dit.gradient_checkpointing = False
    with torch.no_grad():
        reference = WanTrainingTask(pipe).velocity(pipe.dit, batch, noisy, sigma)
    torch.testing.assert_close(out.detach(), reference, rtol=0, atol=0)
    torch.testing.assert_close(again.detach(), reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="in training need a motion_bucket_id"):
        task.reference_arguments([])


def test_speed_control_stages_and_errors(speed, speed_repo, tiny_repo):
    pipe, task = speed
    configs, tokenizer = folder_model_configs(speed_repo)
    trainer_side = WanTrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu", encoders=False)
    assert set(trainer_side.models) == {"dit", "motion_controller"} and trainer_side.speed_control
    encoder_side = WanTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(encoder_side.models) == {"vae", "text_encoder"} and encoder_side.speed_control
    rows = speed_rows()
    with pytest.raises(ConfigError, match="row 1 has no motion_bucket_id"):
        encoder_side.encode([rows[0], {k: v for k, v in rows[1].items() if k != "motion_bucket_id"}])
    with pytest.raises(ConfigError, match="row 0: motion_bucket_id='fast' is not a number"):
        encoder_side.encode([dict(rows[0], motion_bucket_id="fast")])
    t2v_configs, _ = folder_model_configs(tiny_repo)
    plain = WanTrainingTask.from_pretrained(
        t2v_configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    with pytest.raises(ConfigError, match="row 0 has motion_bucket_id, but motion_bucket_id needs .*speedcontrol"):
        plain.encode(rows[:1])
    with pytest.raises(ConfigError, match="trained_model='motion_controller' trains .*speed-control model"):
        WanTrainingTask.from_pretrained(t2v_configs, encoders=False, device="cpu", trained_model="motion_controller")
    with pytest.raises(ConfigError, match="trained_model='vace' is not accepted"):
        WanTrainingTask(pipe, trained_model="vace")


@pytest.mark.integration
def test_trainer_saves_a_controller_the_pipeline_loads(speed_repo, tmp_path):
    """`--trainable_models motion_controller` (the task's `trained_model`, which the trainer sets from it): only the
    controller learns; its saved file is recognised and loaded back by the pipeline as the speed-control model."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training.trainer import train

    data = tmp_path / "data"
    data.mkdir()
    videos = [np.stack([np.asarray(f) for f in frames(k)]) for k in (3, 4)]
    dataset = testing.write_video_dataset(data, I2V.PROMPTS, videos)
    lines = (dataset / "metadata.jsonl").read_text().splitlines()
    rows = [dict(json.loads(line), motion_bucket_id=b) for line, b in zip(lines, (20, 90), strict=True)]
    testing.write_metadata(dataset, rows)
    config = testing.tiny_config(
        speed_repo, "wan", dataset, tmp_path / "out", num_frames=5, max_pixels=32 * 32, bucket_step=32,
        trainable_models=["motion_controller"], max_steps=1,
    )  # fmt: skip
    train(config)
    saved = tmp_path / "out" / "step-000001" / "motion_controller" / "diffusion_pytorch_model.safetensors"
    weights, before = load_file(str(saved)), load_file(str(speed_repo / "speedcontrol" / "model.safetensors"))
    assert set(weights) == set(before) and any(not torch.equal(weights[k], before[k]) for k in weights)
    configs, tokenizer = folder_model_configs(speed_repo)
    configs = [c for c in configs if "speedcontrol" not in str(c.path)] + [ModelConfig(path=str(saved))]
    reloaded = WanVideoPipeline.from_pretrained(
        model_configs=configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu"
    )
    for key, value in reloaded.motion_controller.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- Control-Camera
@pytest.fixture(scope="module")
def camera(tiny_repo_factory):
    return load(tiny_repo_factory("fun_camera"))


def test_camera_velocity_is_the_pipeline_prediction_along_the_rows_paths(camera):
    pipe, task = camera
    videos, first = [frames(5), frames(6)], frames(7, count=1)[0]
    rows = [
        {"prompt": I2V.PROMPTS[0], "video": as_video(videos[0]), "camera_control_direction": "LeftUp",
         "camera_control_speed": "0.1", "input_image": pil_to_tensor(first)[0]},
        {"prompt": I2V.PROMPTS[1], "video": as_video(videos[1]), "camera_control_direction": "In"},
    ]  # fmt: skip
    noisy, sigma = noise((2, 16, 2, 4, 4), 1), [0.8, 0.4]
    ours = velocity(task, task.models["dit"], rows, noisy, sigma)
    calls = [
        dict(input_image=first, camera_control_direction="LeftUp", camera_control_speed=0.1),
        dict(input_image=videos[1][0], camera_control_direction="In"),  # the default speed; the first frame
    ]
    for k, kwargs in enumerate(calls):
        theirs = pipeline_velocity(pipe, I2V.PROMPTS[k], noisy[k : k + 1], sigma[k], **kwargs)
        torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)


def test_camera_rows_need_a_direction_and_other_dits_refuse_one(camera, tiny_repo_factory):
    _, task = camera
    row = {"prompt": PROMPT, "video": as_video(frames(8))}
    with pytest.raises(ConfigError, match="row 0 has no camera_control_direction"):
        task.encode([row])
    with pytest.raises(ConfigError, match="row 0: camera_control_direction='Diagonal' is not accepted"):
        task.encode([dict(row, camera_control_direction="Diagonal")])
    with pytest.raises(ConfigError, match="row 0: camera_control_speed='quick' is not a number"):
        task.encode([dict(row, camera_control_direction="Left", camera_control_speed="quick")])
    with pytest.raises(ConfigError, match="row 0: camera_control_origin has 2 numbers"):
        task.encode([dict(row, camera_control_direction="Left", camera_control_origin="0, 1")])
    with pytest.raises(ConfigError, match="row 0 has an end_image; a Wan Fun Control-Camera DiT moves the camera"):
        task.encode([dict(row, camera_control_direction="Left", end_image=as_video(frames(9))[:, 0])])
    i2v = WanTrainingTask(
        WanVideoPipeline.from_pretrained(str(tiny_repo_factory("i2v")), torch_dtype="float32", device="cpu")
    )
    with pytest.raises(ConfigError, match="row 0 has camera_control_direction, but this Wan DiT has no camera"):
        i2v.encode([dict(row, camera_control_direction="Left")])
    with pytest.raises(ConfigError, match="follow a camera_control_direction"):
        task.reference_arguments([frames(9, count=1)[0]])


# ----------------------------------------------------------------------------------------- Wan2.2-Animate
@pytest.fixture(scope="module")
def animate(tiny_repo_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants-animate") / "repo"
    shutil.copytree(tiny_repo_factory("i2v"), root)
    A._save_animate_dit(root)
    return load(root)


def driving(seed: int, count: int = 5, replace: bool = False) -> dict:
    """The driving videos as pipeline arguments (PIL frames at the video's size, as the dataset gives them)."""
    out = {
        "animate_pose_video": frames(seed, count),
        "animate_face_video": frames(seed + 1, count),  # 32 x 32 crops: the stage resizes them to 16 x 16
    }
    if replace:
        out["animate_inpaint_video"] = frames(seed + 2, count)
        masks = [np.zeros((32, 32, 3), np.uint8) for _ in range(count)]
        for i, m in enumerate(masks):
            m[4 + i : 20 + i, 8:24] = 255
        out["animate_mask_video"] = [Image.fromarray(m) for m in masks]
    return out


@pytest.mark.parametrize("replace", [False, True])
def test_animate_velocity_is_the_pipeline_prediction_of_one_segment(animate, replace):
    """A 5-frame row is the segment of a `num_frames=9` call; the character's latent leads the latents."""
    pipe, task = animate
    video, character, inputs = frames(10), frames(11, count=1)[0], driving(12, replace=replace)
    row = {"prompt": PROMPT, "video": as_video(video), "input_image": pil_to_tensor(character)[0]}
    row.update({key: as_video(value) for key, value in inputs.items()})
    (sample,) = task.encode([row])
    assert sample["latents"].shape == (16, 3, 4, 4) and sample["face_pixels"].dtype == torch.uint8
    clean = pipe.vae.encode(as_video(video)[None])[0]
    torch.testing.assert_close(sample["latents"][:, 1:], clean, rtol=0, atol=0)
    noisy = noise((1, 16, 3, 4, 4), 2)
    ours = velocity(task, task.models["dit"], [row], noisy, [0.6])
    theirs = pipeline_velocity(pipe, PROMPT, noisy, 0.6, input_image=character, **inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_animate_rows_and_the_adapter_part(animate, tiny_repo):
    _, task = animate
    row = {"prompt": PROMPT, "video": as_video(frames(13))}
    inputs = {key: as_video(value) for key, value in driving(14).items()}
    with pytest.raises(ConfigError, match="row 0 has no animate_face_video"):
        task.encode([dict(row, animate_pose_video=inputs["animate_pose_video"])])
    with pytest.raises(ConfigError, match="row 0: animate_pose_video has 3 frames, fewer than the video's 5"):
        task.encode([{**row, **inputs, "animate_pose_video": inputs["animate_pose_video"][:, :3]}])
    with pytest.raises(ConfigError, match="row 0: animate_face_video is the path 'f.mp4'.*--data_file_keys"):
        task.encode([{**row, **inputs, "animate_face_video": "f.mp4"}])
    with pytest.raises(ConfigError, match="row 0: replacement trains on both"):
        task.encode([{**row, **inputs, "animate_mask_video": inputs["animate_pose_video"]}])
    with pytest.raises(ConfigError, match="row 0 has an end_image; Wan2.2-Animate"):
        task.encode([dict(row, **inputs, end_image=row["video"][:, -1])])
    t2v = WanTrainingTask(WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu"))
    # the dataset reads the face crops at their own size (square), not fitted to the video's
    assert task.conditioning == ("animate_face_video",) and t2v.conditioning == ()
    with pytest.raises(ConfigError, match="row 0 has animate_pose_video, animate_face_video, but .*no Animate"):
        t2v.encode([dict(row, **inputs)])
    with pytest.raises(ConfigError, match="follow a pose and a face video"):
        task.reference_arguments([])
    # --trainable_models animate_adapter (DiffSynth-Studio's name) names the four Animate modules of our DiT
    dit = task.models["dit"]
    parts = dit.trainable_parts["animate_adapter"]
    assert {name.split(".")[0] for name, _ in dit.named_parameters() if name.split(".")[0] in parts} == set(parts)
    trainer = pytest.importorskip("diffsynth.training.trainer")
    config = types.SimpleNamespace(trainable_models=["animate_adapter"], lora_base_model=None)
    trainer._check_slots(config, task)
    assert trainer.trained_parts(config, task) == parts


# ----------------------------------------------------------------------------------------- Wan2.2-S2V
@pytest.fixture(scope="module")
def s2v(tiny_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants-s2v") / "repo"
    shutil.copytree(tiny_repo, root)
    S._save_s2v_dit(root)
    S.save_wav2vec_folder(root / "wav2vec2-large-xlsr-53-english")
    return root, *load(root)


def sound(seed: int, rate: int = 16000, seconds: float = 5 / 16) -> torch.Tensor:
    """A waveform `[1, N]` as the dataset reads it (the video's duration at 16 fps)."""
    return torch.from_numpy(S.speech(seconds, seed, rate))[None]


@pytest.mark.parametrize("pose", [False, True])
def test_s2v_velocity_is_the_pipeline_prediction_after_the_context_frame(s2v, pose):
    """The row's video is the pipeline's clip: the latents after the first frame are learned, from its sound
    (the trainer's `audio`, here at 22.05 kHz), its first frame as the reference and, optionally, a pose video."""
    _, pipe, task = s2v
    video, waveform = frames(20), sound(1, rate=22050)
    row = {"prompt": PROMPT, "video": as_video(video), "audio": waveform, "audio_sample_rate": 22050}
    row["frame_rate"] = 16.0
    extra = {}
    if pose:
        extra["s2v_pose_video"] = frames(21, count=3)  # shorter than the clip: the stage pads it
        row["s2v_pose_video"] = as_video(extra["s2v_pose_video"])
    (sample,) = task.encode([row])
    clean = pipe.vae.encode(as_video(video)[None])[0]
    torch.testing.assert_close(sample["latents"], clean[:, 1:], rtol=0, atol=0)
    assert ("pose_latents" in sample) == pose
    noisy = noise((1, 16, 1, 4, 4), 3)
    ours = velocity(task, task.models["dit"], [row], noisy, [0.55])
    lead = torch.zeros_like(noisy)  # the pipeline's noise has the context frame's place first (unused)
    theirs = pipeline_velocity(
        pipe, PROMPT, torch.cat([lead, noisy], dim=2), 0.55, input_image=video[0], input_audio=waveform[0].numpy(),
        audio_sample_rate=22050, **extra,
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_s2v_rows_stages_and_errors(s2v, tiny_repo):
    repo, _, task = s2v
    configs, tokenizer = folder_model_configs(repo)
    encoder_side = WanTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(encoder_side.models) == {"vae", "text_encoder", "audio_encoder"}
    assert encoder_side.validation_references == "required"
    row = {"prompt": PROMPT, "video": as_video(frames(22))}
    with pytest.raises(ConfigError, match="row 0 has no sound"):
        task.encode([row])
    with pytest.raises(ConfigError, match="row 0: input_audio is the path 'a.wav'.*audio column"):
        task.encode([dict(row, input_audio="a.wav")])
    with pytest.raises(ConfigError, match="row 0: a Wan2.2-S2V clip is a context frame and 4k new frames"):
        task.encode([{"prompt": PROMPT, "image": as_video(frames(22, count=1))[:, 0], "audio": sound(0)}])
    with pytest.raises(ConfigError, match="follow a sound"):
        task.reference_arguments([])
    without = [c for c in configs if "wav2vec2" not in str(c.path)]
    with pytest.raises(ConfigError, match="wav2vec2 audio encoder"):
        WanTrainingTask.from_pretrained(without, tokenizer_config=tokenizer, device="cpu", denoiser=False)
    t2v = WanTrainingTask(WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu"))
    with pytest.raises(ConfigError, match="row 0 has s2v_pose_video, but this Wan DiT is not Wan2.2-S2V"):
        t2v.encode([dict(row, s2v_pose_video=row["video"])])


# ----------------------------------------------------------------------------------------- Wan2.2-Animate-2
ANIMATE2_FILES = ["wan_animate_2/wan_animate_2_bf16.safetensors", C.T5_FILE, C.CLIP_FILE, "Wan2.1_VAE.pth"]


@pytest.fixture(scope="module")
def animate2(tiny_repo_factory, tmp_path_factory):
    """The I2V repo's umT5, CLIP and VAE with a 2-block Animate-2 DiT of their widths (test_animate2's builder)."""
    root = tmp_path_factory.mktemp("variants-animate2") / "repo"
    shutil.copytree(tiny_repo_factory("i2v"), root)
    widths = dict(text_dim=C.TINY_UMT5["d_model"], image_dim=C.TINY_CLIP["hidden_size"], text_len=512)
    A2.save_tiny_dit(root / "wan_animate_2", seed=7, **widths)
    pipe = A2.load_pipe(root)
    return root, pipe, WanTrainingTask(pipe)


def animate2_row(seed: int, driving: int = 5, prompt_ref: str | None = None) -> tuple[dict, dict]:
    """A row (tensors, as the dataset gives them) and the same inputs as pipeline arguments (PIL)."""
    video, character, moves = frames(seed), frames(seed + 1, count=1)[0], frames(seed + 2, count=driving)
    row = {"prompt": PROMPT, "video": as_video(video), "animate2_reference_image": pil_to_tensor(character)[0]}
    row["animate2_reference_video"] = as_video(moves)
    kwargs = {"animate2_reference_image": character, "animate2_reference_video": moves}
    if prompt_ref is not None:
        row["animate2_prompt_ref"] = kwargs["animate2_prompt_ref"] = prompt_ref
    return row, kwargs


def animate2_pipeline_velocity(pipe, noisy: torch.Tensor, sigma: float, **kwargs) -> torch.Tensor:
    """The pipeline's DiT output at its first step from `noisy` (frame 0: the reference image's place)."""
    seen = []
    hook = pipe.dit.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    try:
        _, _, f, h, w = noisy.shape
        s = pipe.vae.spatial_compression
        pipe(
            PROMPT, latents=noisy, sigmas=[sigma], height=h * s, width=w * s, num_frames=1 + 4 * (f - 2),
            cfg_scale=1.0, tiled=False, progress_bar=False, output_type="pt", **kwargs,
        )  # fmt: skip
    finally:
        hook.remove()
    return seen[0]


def test_animate2_velocity_is_the_pipeline_prediction_of_one_clip(animate2):
    """A row with a longer driving video and its own prompt equals the pipeline's first-step prediction, also
    batched with a row of its own driving video (exactly the clip's frames, the default prompt); the character's
    latent leads the video's latents."""
    _, pipe, task = animate2
    rows, calls = zip(animate2_row(30, driving=7, prompt_ref="a man dancing"), animate2_row(40), strict=True)
    samples = task.encode(list(rows))
    sample = samples[0]
    assert sample["latents"].shape == (16, 3, 4, 4) and sample["y"].shape == (20, 3, 4, 4)
    assert sample["driving_latents"].shape == (16, 2, 4, 4) and sample["driving_y"].shape == (20, 2, 4, 4)
    torch.testing.assert_close(sample["latents"][:, 1:], pipe.vae.encode(rows[0]["video"][None])[0], rtol=0, atol=0)
    torch.testing.assert_close(sample["latents"][:, :1], sample["y"][4:, :1], rtol=0, atol=0)
    assert not torch.equal(samples[0]["context_ref"], samples[1]["context_ref"])  # its own prompt; " " by default
    noisy, sigma = noise((2, 16, 3, 4, 4), 5), torch.tensor([0.7, 0.25])
    dit = task.models["dit"]
    with torch.no_grad():
        ours = task.velocity(dit, task.collate(samples), noisy, sigma)
        alone = task.velocity(dit, task.collate(samples[1:]), noisy[1:], sigma[1:])
    theirs = animate2_pipeline_velocity(pipe, noisy[:1], float(sigma[0]), **calls[0])
    torch.testing.assert_close(ours[:1], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1:], alone, rtol=1e-5, atol=1e-5)  # each row with its own driving video


def test_animate2_lora_gradient_reaches_the_driving_stream(animate2):
    """LoRA on self_attn.q,k,v (DiffSynth-Studio's recipe): the driving video's pass is part of `velocity`, so the
    k/v adapters of every block get gradient through the driving keys/values (it differs from the gradient with
    that pass detached); gradient checkpointing gives the same gradient."""
    peft = pytest.importorskip("peft")
    _, pipe, task = animate2
    dit = copy.deepcopy(pipe.dit)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["self_attn.q", "self_attn.k", "self_attn.v"])
    peft.inject_adapter_in_model(config, dit)
    torch.manual_seed(0)
    lora = {name: p for name, p in dit.named_parameters() if ".lora_" in name}
    for p in lora.values():
        p.data.normal_(0, 0.1)  # lora_B starts at zero: make every adapter act
        p.requires_grad_(True)
    batch = task.collate(task.encode([animate2_row(50)[0]]))
    noisy, sigma = noise((1, 16, 3, 4, 4), 6), torch.tensor([0.6])

    def gradients():
        dit.zero_grad(set_to_none=True)
        task.velocity(dit, batch, noisy, sigma).square().mean().backward()
        return {name: p.grad.clone() for name, p in lora.items()}

    full = gradients()
    assert len(full) == 2 * 3 * 2 and all(g.abs().sum() > 0 for g in full.values())
    encode = dit.encode_reference

    def detached(*args, **kwargs):
        with torch.no_grad():
            return encode(*args, **kwargs)

    dit.encode_reference = detached  # the driving keys/values as constants
    try:
        generation_only = gradients()
    finally:
        del dit.encode_reference
    for name in full:
        if ".self_attn.k." in name or ".self_attn.v." in name:
            assert (full[name] - generation_only[name]).abs().max() > 1e-6, name
    dit.gradient_checkpointing = True
    checkpointed = gradients()
    for name in full:
        torch.testing.assert_close(checkpointed[name], full[name], rtol=1e-5, atol=1e-7)


def test_animate2_rows_stages_and_errors(animate2, tiny_repo):
    root, _, task = animate2
    row, _ = animate2_row(60)
    assert task.validation_references == "required"
    with pytest.raises(ConfigError, match="follow a driving video"):
        task.reference_arguments([])
    without = {k: v for k, v in row.items() if k != "animate2_reference_image"}
    with pytest.raises(ConfigError, match="row 0 has no animate2_reference_image"):
        task.encode([without])
    without = {k: v for k, v in row.items() if k != "animate2_reference_video"}
    with pytest.raises(ConfigError, match="row 0 has no animate2_reference_video"):
        task.encode([without])
    short = dict(row, animate2_reference_video=row["animate2_reference_video"][:, :3])
    with pytest.raises(ConfigError, match="row 0: animate2_reference_video has 3 frames, fewer than the video's 5"):
        task.encode([short])
    with pytest.raises(ConfigError, match="row 0: animate2_reference_video is the path 'd.mp4'.*--data_file_keys"):
        task.encode([dict(row, animate2_reference_video="d.mp4")])
    with pytest.raises(ConfigError, match="row 0 has input_image, but Wan2.2-Animate-2 takes its character as"):
        task.encode([dict(row, input_image=row["animate2_reference_image"])])
    with pytest.raises(ConfigError, match="row 0 has animate2_refert_images: .*first clip"):
        task.encode([dict(row, animate2_refert_images=row["video"])])
    with pytest.raises(ConfigError, match="row 0 has animate_pose_video, but .*no Animate modules"):
        task.encode([dict(row, animate_pose_video=row["video"])])
    t2v = WanTrainingTask(WanVideoPipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu"))
    message = "row 0 has animate2_reference_image, animate2_reference_video, but this Wan DiT is not Wan2.2-Animate-2"
    with pytest.raises(ConfigError, match=message):
        t2v.encode([row])
    # the trainer's two stages load the DiT alone, and the encoders (with CLIP) alone
    configs = [ModelConfig(path=str(root / f)) for f in ANIMATE2_FILES]
    tokenizer = ModelConfig(path=str(root / C.TOKENIZER_DIR))
    trainer_side = WanTrainingTask.from_pretrained(configs, torch_dtype="float32", device="cpu", encoders=False)
    assert set(trainer_side.models) == {"dit"} and trainer_side.kind == "animate2"
    encoder_side = WanTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", denoiser=False
    )
    assert set(encoder_side.models) == {"vae", "text_encoder", "image_encoder"}
    torch.testing.assert_close(encoder_side.encode([row])[0]["y"], task.encode([row])[0]["y"], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="takes CLIP image features"):
        WanTrainingTask.from_pretrained(configs[:2] + configs[3:], tokenizer_config=tokenizer, device="cpu")
