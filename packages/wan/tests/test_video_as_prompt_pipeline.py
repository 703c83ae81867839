"""Video-As-Prompt in `WanVideoPipeline`: the reference inputs as DiffSynth-Studio's `WanVideoUnit_VAP` builds them,
each denoising step's DiT call through `vap_forward`, the plain I2V output untouched without `vap_video`, the preset
loading the official `transformer/` files into `dit` and `vap` strictly, the CLI flags and the refusals.

Everything runs on the tiny I2V repo of `conftest.py` with a tiny random expert; no mirror is needed.
"""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.dit import WanDiT, WanDiTConfig
from diffsynth.wan.formats import ours_to_diffusers
from diffsynth.wan.image_encoder import encode_image
from diffsynth.wan.video_as_prompt import VideoAsPromptConfig, VideoAsPromptExpert, official_keys, vap_forward

from . import conftest as C

PROMPT, NEGATIVE = "a red circle on a blue background", "bad quality, blurry, static"
VAP_PROMPT, NEGATIVE_VAP = "a small green square in the top left corner", "a yellow triangle on a black background"
H, W, F = 32, 48, 5  # 2 latent frames of 4 x 6
FAST = dict(height=H, width=W, num_frames=F, num_inference_steps=1, tiled=False, progress_bar=False, output_type="pt")


def image(seed: int, size=(40, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


REFERENCE = [image(100 + i) for i in range(9)]  # 9 frames, not the output size: 5 are picked and resized


def tiny_expert(dit_config, mot_layers, seed: int = 7) -> VideoAsPromptExpert:
    cfg = VideoAsPromptConfig(
        dim=dit_config.dim, num_heads=dit_config.num_heads, ffn_dim=dit_config.ffn_dim, freq_dim=dit_config.freq_dim,
        text_dim=dit_config.text_dim, text_len=dit_config.text_len, image_dim=dit_config.image_dim,
        mot_layers=mot_layers, num_layers=dit_config.num_layers,
    )  # fmt: skip
    return C.randomize(VideoAsPromptExpert(cfg), seed).eval()


@pytest.fixture(scope="module")
def pipe(tiny_repo_factory):
    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("i2v")), torch_dtype="float32", device="cpu")
    # beside both layers: the reference caption reaches the video only through a later joint layer
    pipe.vap = tiny_expert(pipe.dit.config, (0, 1))
    return pipe


def expected_vap_inputs(pipe, prompt: str):
    """The reference inputs built here step by step as DiffSynth-Studio's `WanVideoUnit_VAP` does: frames 0, 2, 4,
    6, 8 of 9 (spread evenly, the authors' selection), each resized to the output size; their latent joined with the
    mask (first frame given) and the latent of the first frame followed by black; CLIP of the first frame."""
    frames = [REFERENCE[i] for i in (0, 2, 4, 6, 8)]
    pixels = pil_to_tensor([f.resize((W, H), Image.BICUBIC) for f in frames])  # [F, 3, H, W] in [-1, 1]
    latent = pipe.vae.encode(pixels.transpose(0, 1)[None], tiled=False).float()
    t, h, w = latent.shape[2:]
    mask = torch.ones(1, F, h, w)
    mask[:, 1:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(4, dim=1), mask[:, 1:]], dim=1)
    mask = mask.view(1, t, 4, h, w).transpose(1, 2)
    first_then_black = torch.cat([pixels[:1].transpose(0, 1), torch.zeros(3, F - 1, H, W)], dim=1)[None]
    y = torch.cat([mask, pipe.vae.encode(first_then_black, tiled=False).float()], dim=1)
    clip = encode_image(pipe.image_encoder, pixels[:1], torch.device("cpu"), torch.float32)
    return torch.cat([latent, y], dim=1), pipe.encode_prompt([prompt]), clip


class DiTCalls:
    """Every DiT forward (inputs and output) and every expert `prepare` (the reference inputs it embeds)."""

    def __init__(self, pipe, monkeypatch):
        self.calls, self.prepared = [], []
        self.handle = pipe.dit.register_forward_hook(self.record, with_kwargs=True)
        prepare = pipe.vap.prepare

        def spy(latents, context, clip_feature, dtype):
            self.prepared.append((latents, context, clip_feature))
            return prepare(latents, context, clip_feature, dtype)

        monkeypatch.setattr(pipe.vap, "prepare", spy)

    def record(self, module, args, kwargs, output):
        self.calls.append((args, dict(kwargs), output.detach().clone()))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_each_step_calls_the_dit_through_vap_forward(pipe, monkeypatch, cfg_scale):
    """One step's DiT calls (one without guidance, positive then negative with it) are `vap_forward` on the encoded
    inputs: the reference latent / caption / CLIP as built above (the negative branch with `negative_vap_prompt`),
    and the expert changes the velocity."""
    calls = DiTCalls(pipe, monkeypatch)
    try:
        pipe(PROMPT, NEGATIVE, input_image=image(1), seed=3, cfg_scale=cfg_scale, vap_video=REFERENCE,
             vap_prompt=VAP_PROMPT, negative_vap_prompt=NEGATIVE_VAP, **FAST)  # fmt: skip
    finally:
        calls.close()
    branches = [(PROMPT, VAP_PROMPT)] + ([(NEGATIVE, NEGATIVE_VAP)] if cfg_scale != 1.0 else [])
    assert len(calls.calls) == len(calls.prepared) == len(branches)
    recorded = list(zip(calls.calls, calls.prepared, branches, strict=True))  # before the direct calls below
    for (args, kwargs, output), prepared, (text, vap_text) in recorded:
        assert callable(kwargs["block_hook"])
        torch.testing.assert_close(args[2], pipe.encode_prompt([text]), rtol=0, atol=0)
        expected = expected_vap_inputs(pipe, vap_text)
        for got, want in zip(prepared, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        direct = vap_forward(pipe.dit, pipe.vap, *args, kwargs["clip_feature"], kwargs["y"], *expected)
        torch.testing.assert_close(output, direct, rtol=1e-5, atol=1e-5)
        plain = pipe.dit(*args, clip_feature=kwargs["clip_feature"], y=kwargs["y"])
        assert (plain - output).abs().max() > 1e-3


def test_without_vap_video_the_output_is_the_plain_i2v_output(pipe):
    """The expert loaded but no `vap_video`: bit-identical to the pipeline without the expert; with it: different."""
    args = dict(input_image=image(1), seed=5, cfg_scale=3.0, **FAST)
    with_expert = pipe(PROMPT, NEGATIVE, **args)
    expert, pipe.vap = pipe.vap, None
    try:
        without = pipe(PROMPT, NEGATIVE, **args)
    finally:
        pipe.vap = expert
    assert torch.equal(with_expert, without)
    guided = pipe(PROMPT, NEGATIVE, vap_video=REFERENCE, vap_prompt=VAP_PROMPT, **args)
    assert (guided - without).abs().max() > 1e-4


def test_cfg_merge_runs_both_branches_as_one_batch(pipe):
    """`cfg_merge` batches the branches, the reference inputs with them (positive first)."""
    args = dict(input_image=image(2), seed=6, cfg_scale=3.0, vap_video=REFERENCE, vap_prompt=VAP_PROMPT, **FAST)
    apart = pipe(PROMPT, NEGATIVE, negative_vap_prompt=NEGATIVE_VAP, **args)
    merged = pipe(PROMPT, NEGATIVE, negative_vap_prompt=NEGATIVE_VAP, cfg_merge=True, **args)
    torch.testing.assert_close(merged, apart, rtol=1e-4, atol=1e-4)
    other = pipe(PROMPT, NEGATIVE, negative_vap_prompt="", **args)  # the negative branch reads its own caption
    assert (other - apart).abs().max() > 1e-5


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (dict(end_image=image(3)), "end_image"),
        (dict(vace_video=REFERENCE), "vace_video"),
        (dict(sliding_window_size=2, sliding_window_stride=1), "sliding_window_size"),
        (dict(motion_bucket_id=10), "motion_bucket_id"),
        (dict(animate_pose_video=REFERENCE), "animate_pose_video"),
        (dict(audio_embeds=torch.zeros(1)), "audio_embeds"),
        (dict(longcat_video=REFERENCE), "longcat_video"),
        (dict(wantodance_fps=30.0), "wantodance_fps"),
        (dict(animate2_reference_video=REFERENCE), "animate2_reference_video"),
        (dict(camera_control_direction="Left"), "camera_control_direction"),
    ],
)
def test_combinations_the_expert_cannot_take_are_refused_by_name(pipe, given, named):
    args = dict(input_image=image(1), vap_video=REFERENCE, **FAST)
    with pytest.raises(ConfigError, match=named):
        pipe(PROMPT, **{**args, **given})


def test_bad_calls_name_the_argument(pipe):
    with pytest.raises(ConfigError, match="vap_prompt"):
        pipe(PROMPT, input_image=image(1), vap_prompt=VAP_PROMPT, **FAST)
    with pytest.raises(ConfigError, match="negative_vap_prompt"):
        pipe(PROMPT, input_image=image(1), negative_vap_prompt=NEGATIVE_VAP, **FAST)
    with pytest.raises(ConfigError, match="input_image"):
        pipe(PROMPT, vap_video=REFERENCE, **FAST)
    with pytest.raises(ConfigError, match="vap_prompt must be a string"):
        pipe(PROMPT, input_image=image(1), vap_video=REFERENCE, vap_prompt=3, **FAST)
    expert, pipe.vap = pipe.vap, None
    try:
        with pytest.raises(ConfigError, match="vap_video needs the Video-As-Prompt expert"):
            pipe(PROMPT, input_image=image(1), vap_video=REFERENCE, **FAST)
    finally:
        pipe.vap = expert


# ----------------------------------------------------------------------------------------- preset loading
VAP_REPO = "ByteDance/Video-As-Prompt-Wan2.1-14B"
I2V_REPO = "Wan-AI/Wan2.1-I2V-14B-720P"


def hub_folder(base, tiny_i2v, transformer: dict, config: dict) -> None:
    """A local hub copy: the `transformer/` file of the Video-As-Prompt repo, the 720P repo's encoders and VAE, and
    the tokenizer of Wan2.1-T2V-1.3B, where the preset's (model_id, pattern) pairs look."""
    folder = base / VAP_REPO / "transformer"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in transformer.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (base / I2V_REPO).mkdir(parents=True)
    for name in (C.T5_FILE, "Wan2.1_VAE.pth", C.CLIP_FILE):
        shutil.copy(tiny_i2v / name, base / I2V_REPO / name)
    shutil.copytree(tiny_i2v / C.TOKENIZER_DIR, base / "Wan-AI" / "Wan2.1-T2V-1.3B" / C.TOKENIZER_DIR)


def official_transformer(seed: int = 0):
    """A tiny DiT and expert, and their weights as one official `transformer/` file: the DiT under diffusers names
    (width 128: the head count is derived from the shapes, as for the 14B file) with the `_mot_ref` keys."""
    cfg = WanDiTConfig(dim=128, ffn_dim=64, num_heads=1, num_layers=3, freq_dim=32, text_dim=C.TINY_UMT5["d_model"],
                       in_dim=36, out_dim=16, model_type="i2v", has_image_input=True,
                       image_dim=C.TINY_CLIP["hidden_size"])  # fmt: skip
    dit = C.randomize(WanDiT(cfg), seed).eval()
    expert = tiny_expert(cfg, (0, 2), seed + 1)
    theirs = {ours: official for official, ours in official_keys(expert.config).items()}
    state = {**ours_to_diffusers(dit.state_dict()), **{theirs[k]: v for k, v in expert.state_dict().items()}}
    config = {"_class_name": "WanTransformer3DMOTModel", "num_attention_heads": 1, "attention_head_dim": 128,
              "num_layers": 3, "block_idx_with_mot_ref": [0, 2]}  # fmt: skip
    return dit, expert, state, config


def test_preset_loads_the_transformer_folder_into_dit_and_vap(tiny_repo_factory, tmp_path, monkeypatch):
    """The preset's files resolve in a hub-layout folder; the one `transformer/` file gives the DiT to `dit` and the
    expert (at DiT layers 0 and 2, read from the key names) to `vap`, every weight in place; a step then runs."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    dit, expert, state, config = official_transformer()
    hub_folder(tmp_path, tiny_repo_factory("i2v"), state, config)
    pipe = WanVideoPipeline.from_pretrained(VAP_REPO, torch_dtype="float32", device="cpu")
    assert isinstance(pipe.vap, VideoAsPromptExpert) and type(pipe.dit) is WanDiT
    assert pipe.vap.config.mot_layers == (0, 2) and pipe.vap.config.num_layers == 3
    for loaded, original in ((pipe.dit, dit), (pipe.vap, expert)):
        got, want = loaded.state_dict(), original.state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    defaults = pipe.defaults
    assert (defaults["num_frames"], defaults["height"], defaults["width"]) == (49, 480, 832)
    assert (defaults["num_inference_steps"], defaults["cfg_scale"], defaults["sigma_shift"]) == (50, 5.0, 3.0)
    out = pipe(PROMPT, input_image=image(1), vap_video=REFERENCE, vap_prompt=VAP_PROMPT, seed=1,
               **{**FAST, "height": 32, "width": 32, "cfg_scale": 1.0})  # fmt: skip
    assert out.shape == (1, 3, F, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_preset_load_is_strict_about_expert_keys(tiny_repo_factory, tmp_path, monkeypatch, change):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    _, _, state, config = official_transformer()
    key = "blocks.2.attn1_mot_ref.to_q.weight"
    if change == "extra":
        state["blocks.2.attn1_mot_ref.to_x.weight"] = state[key].clone()
        key = "blocks.2.attn1_mot_ref.to_x.weight"
    else:
        del state[key]
    hub_folder(tmp_path, tiny_repo_factory("i2v"), state, config)
    with pytest.raises(CheckpointError, match="to_x" if change == "extra" else "blocks.1.self_attn.q.weight"):
        WanVideoPipeline.from_pretrained(VAP_REPO, torch_dtype="float32", device="cpu")


# ----------------------------------------------------------------------------------------- CLI
def test_cli_flags_reach_the_pipeline(monkeypatch, tmp_path):
    """`--vap-video` / `--vap-prompt` are passed as `vap_video` / `vap_prompt`, which `WanVideoPipeline` takes."""
    from diffsynth.runtime import cli

    accepted = inspect.signature(WanVideoPipeline.__call__).parameters
    assert {"vap_video", "vap_prompt", "negative_vap_prompt"} <= set(accepted)
    seen = {}

    class Video:
        defaults: dict = {}

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def step_caches(self):
            return {}

        def __call__(self, prompt, seed=None, num_frames=None, input_image=None, vap_video=None, vap_prompt=None):
            seen.update(image=input_image, video=vap_video, prompt=vap_prompt)
            return [Image.new("RGB", (16, 16))] * 5

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Video)
    args = ["generate", "--model", VAP_REPO, "--prompt", "a dancer", "--device", "cpu", "--input-image", "me.png"]
    args += ["--vap-video", "ref.mp4", "--vap-prompt", "a man turns into a toy", "--output", str(tmp_path / "o.mp4")]
    assert cli.main(args) == 0 and (tmp_path / "o.mp4").exists()
    assert seen == {"image": "me.png", "video": "ref.mp4", "prompt": "a man turns into a toy"}


def test_full_size_transformer_file_is_split_into_dit_and_expert_on_meta():
    """The full-size official layout (the Wan2.1-I2V-14B DiT in diffusers names + the released expert's `_mot_ref`
    keys, on meta): recognised as two models, the 14B I2V DiT (40 heads from the shapes) and the expert beside layers
    0, 4, ..., 36, each owning exactly its keys."""
    from diffsynth.runtime.loading import load_models
    from diffsynth.wan.video_as_prompt import RELEASED_MOT_LAYERS

    with torch.device("meta"):
        dit = WanDiT(WanDiTConfig(model_type="i2v", in_dim=36, has_image_input=True))
        expert = VideoAsPromptExpert(VideoAsPromptConfig())
    theirs = {ours: official for official, ours in official_keys(expert.config).items()}
    state = {**ours_to_diffusers(dit.state_dict()), **{theirs[k]: v for k, v in expert.state_dict().items()}}
    loaded = {item.role: item for item in load_models(state)}  # meta tensors: modules on meta
    assert set(loaded) == {"dit", "vap"}
    cfg = loaded["dit"].config
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.model_type, cfg.has_image_input) == (5120, 40, 40, "i2v", True)
    vap = loaded["vap"].config
    assert (vap.dim, vap.num_heads, vap.mot_layers, vap.num_layers) == (5120, 40, RELEASED_MOT_LAYERS, 40)
    assert sorted(loaded["vap"].module.state_dict()) == sorted(expert.state_dict())
