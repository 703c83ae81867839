"""Wan2.2-Animate: the DiT's Animate modules, their checkpoint layouts, and the pipeline's `animate_*` arguments.

The DiT and the pipeline are compared with diffusers' `WanAnimateTransformer3DModel` / `WanAnimatePipeline` on
tiny random models (one segment and two overlapping ones, animation and replacement); the full-size layout with
diffusers' model at the released config on the meta device.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan.animate import fit_character, reflect_pad, segment_starts
from diffsynth.wan.dit import WanDiT, WanDiTConfig
from diffsynth.wan.formats import DIT_SPEC, config_from_state, diffusers_to_ours, ours_to_diffusers


def _beside(name: str):
    """Helpers of another test module of this folder, loaded by path."""
    spec = importlib.util.spec_from_file_location(f"wan_animate_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _beside("test_dit")
P = _beside("test_pipeline")
C = _beside("conftest")

# the Animate part of the tiny sizes: 16-pixel face crops through a 3-level pyramid, a face block every 2 layers
ANIMATE = dict(animate=True, motion_encoder_size=16, motion_channels=(8, 8, 8), motion_style_dim=16, motion_dim=5,
               motion_encoder_dim=16, face_encoder_hidden_dim=8, face_encoder_num_heads=2, face_adapter_every=2)  # fmt: skip


def animate_config(**overrides) -> WanDiTConfig:
    return T.tiny_config("i2v", num_layers=4, in_dim=12, **{**ANIMATE, **overrides})


def unit_motion_weights(model: WanDiT, seed: int) -> WanDiT:
    """Standard-normal weights in the motion encoder, as its equalised layers expect (they scale by 1 / sqrt(fan
    in) at run time): the generic small random weights would shrink the face signal below float32 precision."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.motion_encoder.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def animate_model(seed: int = 3, **overrides) -> WanDiT:
    return unit_motion_weights(T.make_model(animate_config(**overrides), seed), seed)


def animate_inputs(batch: int = 2, frames: int = 3, hw=(4, 6), seed: int = 1):
    """`(args, kwargs)`: latents of one character frame + `frames` video frames, their pose latents and the
    `4 * frames - 3` face crops."""
    cfg = animate_config()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, frames + 1, *hw, generator=g)
    kwargs = dict(
        y=torch.randn(batch, cfg.in_dim - cfg.out_dim, frames + 1, *hw, generator=g),
        clip_feature=torch.randn(batch, 5, cfg.image_dim, generator=g),
        pose_latents=torch.randn(batch, cfg.out_dim, frames, *hw, generator=g),
        face_pixel_values=torch.rand(batch, 3, 4 * frames - 3, 16, 16, generator=g) * 2 - 1,
    )
    t = torch.rand(batch, generator=g) * 1000
    return (x, t, torch.randn(batch, 7, cfg.text_dim, generator=g)), kwargs


def diffusers_fields(cfg: WanDiTConfig) -> dict:
    """diffusers' `WanAnimateTransformer3DModel` arguments for our config."""
    size = cfg.motion_encoder_size
    channels = {str(size >> i): c for i, c in enumerate(cfg.motion_channels)} if cfg.motion_channels else None
    return dict(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, latent_channels=cfg.out_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps, image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim, rope_max_seq_len=cfg.rope_max_len, motion_encoder_channel_sizes=channels,
        motion_encoder_size=size, motion_style_dim=cfg.motion_style_dim, motion_dim=cfg.motion_dim,
        motion_encoder_dim=cfg.motion_encoder_dim, face_encoder_hidden_dim=cfg.face_encoder_hidden_dim,
        face_encoder_num_heads=cfg.face_encoder_num_heads, inject_face_latents_blocks=cfg.face_adapter_every,
    )  # fmt: skip


def diffusers_animate(ours: WanDiT):
    from diffusers import WanAnimateTransformer3DModel

    model = WanAnimateTransformer3DModel(**diffusers_fields(ours.config))
    model.load_state_dict(ours_to_diffusers(dict(ours.state_dict())), strict=True)
    return model.eval()


# ------------------------------------------------------------------ the DiT
@pytest.mark.parity
@pytest.mark.parametrize(("batch", "frames", "hw"), [(1, 1, (4, 4)), (2, 3, (4, 6))])
def test_dit_matches_diffusers(batch, frames, hw):
    """Pose tokens on the frames after the character's, face blocks after layers 0 and 2 of 4."""
    pytest.importorskip("diffusers")
    ours = animate_model().eval()
    reference = diffusers_animate(ours)
    (x, t, context), kwargs = animate_inputs(batch, frames, hw)
    with torch.no_grad():
        got = ours(x, t, context, **kwargs)
        padded = torch.nn.functional.pad(context, (0, 0, 0, ours.config.text_len - context.shape[1]))
        want = reference(
            torch.cat([x, kwargs["y"]], dim=1), t, padded, encoder_hidden_states_image=kwargs["clip_feature"],
            pose_hidden_states=kwargs["pose_latents"], face_pixel_values=kwargs["face_pixel_values"],
            return_dict=False,
        )[0]  # fmt: skip
        blank = ours(x, t, context, **{**kwargs, "face_pixel_values": -torch.ones_like(kwargs["face_pixel_values"])})
    assert (got - blank).abs().max() > 1e-2  # the faces reach the output
    assert (got - want).abs().max().item() <= 1e-5


def test_face_blocks_run_after_every_kth_layer_and_the_encoder_batch_does_not_matter():
    ours = animate_model().eval()
    order = []
    for name, module in [*ours.blocks.named_children(), *(("f" + n, m) for n, m in ours.face_adapter.fuser_blocks.named_children())]:  # fmt: skip
        module.register_forward_pre_hook(lambda *_, n=name: order.append(n))
    args, kwargs = animate_inputs()
    with torch.no_grad():
        want = ours(*args, **kwargs)
        ours.motion_encoder_batch_size = 3
        got = ours(*args, **kwargs)
    assert order[:6] == ["0", "f0", "1", "2", "f1", "3"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"face_pixel_values": None}, "pass both"),
        ({"pose_latents": torch.zeros(2, 4, 2, 4, 6)}, "pose_latents has shape"),
        ({"face_pixel_values": torch.zeros(2, 3, 8, 16, 16)}, "face_pixel_values has 8 frames; 9"),
        ({"face_pixel_values": torch.zeros(2, 3, 9, 8, 8)}, r"\[2, 3, F, 16, 16\]"),
    ],
)
def test_bad_animate_inputs_name_the_argument(change, message):
    args, kwargs = animate_inputs()
    kwargs = {k: v for k, v in {**kwargs, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        animate_model()(*args, **kwargs)


def test_a_dit_without_animate_modules_refuses_the_inputs():
    args, kwargs = animate_inputs()
    plain = T.make_model(T.tiny_config("i2v", in_dim=12))
    with pytest.raises(ValueError, match="not a Wan2.2-Animate DiT"):
        plain(*args, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"face_adapter_every": 3}, "face_adapter_every"),
        ({"motion_encoder_size": 12}, "motion_encoder_size"),
        ({"motion_channels": (8, 8)}, "motion_channels"),
        ({"model_type": "t2v", "has_image_input": False}, "animate"),
    ],
)
def test_config_refuses_bad_animate_fields(overrides, field):
    with pytest.raises(ValueError, match=field):
        animate_config(**overrides)


def test_conformance_with_animate_inputs():
    args, kwargs = animate_inputs()
    cf.check_forward(animate_model, args, kwargs, expected_shapes=[args[0].shape])
    cf.check_backward(animate_model, args, kwargs)
    cf.check_gradient_checkpointing(animate_model, args, kwargs, atol=1e-6)
    cf.check_meta_load(animate_model, args, kwargs)
    cf.check_declared_units(animate_model)


# ------------------------------------------------------------------ checkpoint layouts
RELEASED = WanDiTConfig(in_dim=36, model_type="i2v", has_image_input=True, animate=True)
# the authors' config.json of Wan-AI/Wan2.2-Animate-14B (`WanAnimateModel`)
AUTHORS_JSON = {"_class_name": "WanAnimateModel", "patch_size": [1, 2, 2], "text_len": 512, "in_dim": 36, "dim": 5120,
                "ffn_dim": 13824, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 40, "num_layers": 40,
                "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": 1e-06,
                "motion_encoder_dim": 512, "use_context_parallel": False, "use_img_emb": True}  # fmt: skip


@pytest.mark.parity
def test_full_size_layout_equals_diffusers_model_of_the_released_config():
    """diffusers' model at the released config, renamed, has exactly our keys and shapes (1441 in the authors'
    file, blur kernels included); diffusers' own converter of our names gives its keys; the config follows
    from the shapes alone and from either config.json."""
    pytest.importorskip("diffusers")
    from diffusers import WanAnimateTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        theirs = WanAnimateTransformer3DModel(image_dim=1280, added_kv_proj_dim=5120).state_dict()
        ours = WanDiT(RELEASED).state_dict()
    assert len(ours) == 1441
    assert tuple(ours["face_adapter.fuser_blocks.7.linear1_kv.weight"].shape) == (10240, 5120)
    assert tuple(ours["motion_encoder.enc.net_app.convs.7.skip.1.weight"].shape) == (512, 512, 1, 1)
    assert tuple(ours["motion_encoder.enc.net_app.convs.0.1.bias"].shape) == (1, 32, 1, 1)
    layout = DIT_SPEC.match(theirs)
    assert layout is not None and layout.name == "diffusers"
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    assert {k: tuple(v.shape) for k, v in layout.to_ours(theirs).items()} == shapes
    converted = convert_wan_transformer_to_diffusers({k: v for k, v in ours.items() if not k.endswith(".kernel")})
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert config_from_state(ours, None) == RELEASED
    assert config_from_state(ours, AUTHORS_JSON) == RELEASED
    diffusers_json = {"_class_name": "WanAnimateTransformer3DModel", **diffusers_fields(RELEASED)}
    diffusers_json.update(patch_size=[1, 2, 2], motion_encoder_channel_sizes=None)
    assert config_from_state(ours, diffusers_json) == RELEASED
    assert config_from_state({}, AUTHORS_JSON) == RELEASED


@pytest.mark.parity
def test_our_converter_and_diffusers_agree_both_ways():
    pytest.importorskip("diffusers")
    ours = animate_model().state_dict()
    theirs = diffusers_animate(animate_model()).state_dict()
    assert ours_to_diffusers(dict(ours)).keys() == theirs.keys()
    back = diffusers_to_ours(dict(theirs))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())
    assert config_from_state(ours, {"num_heads": 2, "text_len": 512}) == animate_config()


def test_diffusers_names_without_a_mapping_are_refused():
    theirs = ours_to_diffusers(dict(animate_model().state_dict()))
    with pytest.raises(KeyError, match="motion_encoder.extra"):
        diffusers_to_ours({**theirs, "motion_encoder.extra.weight": torch.zeros(1)})


# ------------------------------------------------------------------ segments
def authors_padding(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """Where the authors' `padding_resize` (Wan2.2 `wan/animate.py`) puts an image of `size` (w, h): its left, top,
    width, height, with their float arithmetic."""
    ori_width, ori_height = size
    if ori_height / ori_width > height / width:
        new_width = int(height / ori_height * ori_width)
        return int((width - new_width) / 2), 0, new_width, height
    new_height = int(width / ori_width * ori_height)
    return 0, int((height - new_height) / 2), width, new_height


@pytest.mark.parametrize(
    ("size", "frame"),
    [((1005, 1000), (1280, 720)), ((333, 1000), (96, 64)), ((201, 100), (64, 64)), ((64, 63), (96, 64))],
)
def test_character_is_letterboxed_where_the_authors_put_it(size, frame):
    """An odd margin (1280 - 723 = 557) puts the extra column right of the image, as `int((width - w) / 2)`."""
    width, height = frame
    fitted = np.asarray(fit_character(Image.new("RGB", size, (200, 200, 200)), height, width))[..., 0] > 100
    cols, rows = np.nonzero(fitted.any(0))[0], np.nonzero(fitted.any(1))[0]
    left, top, w, h = authors_padding(size, height, width)
    assert (cols[0], rows[0], len(cols), len(rows)) == (left, top, w, h)
    assert fitted[top : top + h, left : left + w].all() and fitted.sum() == w * h


def test_segments_cover_the_pose_video_as_the_authors_do():
    assert segment_starts(77, 77, 1) == [0]
    assert segment_starts(78, 77, 1) == [0, 76]
    assert segment_starts(153, 77, 1) == [0, 76]
    assert segment_starts(3, 5, 1) == [0]
    assert segment_starts(9, 9, 5) == [0]
    assert reflect_pad([1, 2, 3, 4, 5], 10) == [1, 2, 3, 4, 5, 4, 3, 2, 1, 2]
    assert reflect_pad([7], 3) == [7, 7, 7]


# ------------------------------------------------------------------ the pipeline
SIZE = 32
FAST = dict(height=SIZE, width=SIZE, num_frames=9, num_inference_steps=2, cfg_scale=1.0, progress_bar=False)


def _save_animate_dit(folder: Path) -> None:
    """An Animate DiT of the tiny repo sizes (z 16, umT5 width, CLIP width) with the authors' config.json."""
    from safetensors.torch import save_file

    fields = dict(C.TINY_DIT, in_dim=36, out_dim=16, text_dim=C.TINY_UMT5["d_model"], model_type="i2v",
                  has_image_input=True, image_dim=C.TINY_CLIP["hidden_size"], **{**ANIMATE, "motion_encoder_dim": 16})  # fmt: skip
    fields["num_layers"] = 4
    model = unit_motion_weights(C.randomize(WanDiT(WanDiTConfig(**fields)), 1), 1)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )
    config_json = {"_class_name": "WanAnimateModel", **{k: v for k, v in fields.items() if k in AUTHORS_JSON}}
    (folder / "config.json").write_text(json.dumps({**config_json, "patch_size": [1, 2, 2]}))


@pytest.fixture(scope="module")
def animate_repo(tmp_path_factory):
    """A tiny Wan2.2-Animate-14B-style repo: the I2V repo's encoders, VAE and CLIP, with an Animate DiT."""
    root = C.build_tiny_repo(tmp_path_factory.mktemp("tiny-wan-animate"), "i2v")
    _save_animate_dit(root)
    return root


@pytest.fixture(scope="module")
def animate_pipe(animate_repo):
    return P.load(animate_repo)


def driving(frames: int, seed: int = 0, replace: bool = False) -> dict:
    """Pose renders, 16-pixel face crops and, for replacement, a background and a grey-level mask (a box)."""
    out = {
        "animate_pose_video": [P.image(seed + i, (SIZE, SIZE)) for i in range(frames)],
        "animate_face_video": [P.image(seed + 50 + i, (16, 16)) for i in range(frames)],
    }
    if replace:
        out["animate_inpaint_video"] = [P.image(seed + 100 + i, (SIZE, SIZE)) for i in range(frames)]
        masks = []
        for i in range(frames):
            m = np.zeros((SIZE, SIZE), dtype=np.uint8)
            m[4 + i : 20 + i, 8:24] = 255
            masks.append(Image.fromarray(m).convert("RGB"))
        out["animate_mask_video"] = masks
    return out


def diffusers_animate_pipe(repo: Path, ours, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.wan import pipeline_wan_animate
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not hasattr(pipeline_wan_animate, "ftfy"):  # its prompt cleaning calls ftfy without checking it is installed
        monkeypatch.setattr(
            pipeline_wan_animate, "ftfy", type("NoFtfy", (), {"fix_text": staticmethod(str)}), raising=False
        )
    state = load_file(str(repo / "diffusion_pytorch_model.safetensors"))
    dit = WanDiT(config_from_state(state, json.loads((repo / "config.json").read_text())))
    dit.load_state_dict(state)
    clip = CLIPVisionModel(CLIPVisionConfig(**C.TINY_CLIP))
    clip.load_state_dict(ours.image_encoder.state_dict())
    scheduler, sigmas = P.euler(5.0, 3)
    ref = diffusers.WanAnimatePipeline(
        scheduler=scheduler, transformer=diffusers_animate(dit), image_encoder=clip.eval(),
        image_processor=P.WanClipProcessor(C.TINY_CLIP["image_size"]), **P.diffusers_parts(repo, ours),
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ref, sigmas


@pytest.mark.parity
@pytest.mark.parametrize(
    ("frames", "mode", "guidance"), [(5, "animate", 1.0), (9, "animate", 2.0), (9, "replace", 1.0)]
)
def test_pipeline_matches_diffusers(animate_repo, animate_pipe, monkeypatch, frames, mode, guidance):
    """Segments of 5 frames (num_frames 9): one segment, or two overlapping by one frame (the second starts from
    the first's last frame); animation or replacement; guidance with blank faces on the negative branch."""
    ref, sigmas = diffusers_animate_pipe(animate_repo, animate_pipe, monkeypatch)
    inputs = driving(frames, replace=mode == "replace")
    character = P.image(33, (SIZE, SIZE))
    expected = ref(
        image=character, pose_video=inputs["animate_pose_video"], face_video=inputs["animate_face_video"],
        background_video=inputs.get("animate_inpaint_video"), mask_video=inputs.get("animate_mask_video"),
        prompt=P.PROMPT, negative_prompt="bad quality", height=SIZE, width=SIZE, segment_frame_length=5,
        num_inference_steps=3, mode=mode, guidance_scale=guidance, generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).frames  # fmt: skip
    got = animate_pipe(
        P.PROMPT, negative_prompt="bad quality", input_image=character, height=SIZE, width=SIZE, num_frames=9,
        cfg_scale=guidance, sigmas=sigmas, seed=7, tiled=False, progress_bar=False, output_type="np", **inputs,
    )  # fmt: skip
    assert got.shape == expected.shape == (1, frames, SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= 1e-4


def test_diffsynth_studio_call_gives_one_segment_and_cfg_merge_agrees(animate_pipe):
    """DiffSynth-Studio's example: num_frames N with N - 4 driving frames is one segment of N - 4 frames."""
    inputs = driving(5)
    common = dict(input_image=P.image(3), seed=1, output_type="pt", **{**FAST, "cfg_scale": 2.0}, **inputs)
    out = animate_pipe(P.PROMPT, negative_prompt="bad", **common)
    merged = animate_pipe(P.PROMPT, negative_prompt="bad", cfg_merge=True, **common)
    assert out.shape == (1, 3, 5, SIZE, SIZE)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)


def test_vram_managed_pipeline_gives_the_same_video(animate_repo, animate_pipe):
    kwargs = dict(input_image=P.image(3), seed=2, output_type="pt", **FAST, **driving(5, replace=True))
    want = animate_pipe(P.PROMPT, **kwargs)
    managed = P.WanVideoPipeline.from_pretrained(str(animate_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    torch.testing.assert_close(managed(P.PROMPT, **kwargs), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"animate_face_video": None}, "animate_face_video"),
        ({"animate_face_video": [P.image(0, (16, 16))] * 4}, "one face crop per pose frame"),
        ({"animate_inpaint_video": [P.image(0)] * 5}, "both animate_inpaint_video"),
        ({"animate_inpaint_video": [P.image(0)] * 3, "animate_mask_video": [P.image(0)] * 3}, "fewer than"),
        ({"animate_overlap_frames": 2}, "1 \\+ 4k"),
        ({"animate_overlap_frames": 5}, "shorter than a segment"),
        ({"input_image": None}, "input_image"),
        ({"end_image": P.image(0)}, "takes no end_image"),
        ({"num_frames": 1}, "at least 5"),
        ({"latents": torch.zeros(1, 16, 3, 4, 4), "animate_pose_video": [P.image(0)] * 9}, "segments"),
    ],
)
def test_bad_animate_arguments_name_the_argument(animate_pipe, change, message):
    kwargs = {**FAST, "input_image": P.image(3), "seed": 1, **driving(5), **change}
    if "animate_pose_video" in change:
        kwargs["animate_face_video"] = [P.image(0, (16, 16))] * 9
    with pytest.raises(ConfigError, match=message):
        animate_pipe(P.PROMPT, **kwargs)


def test_a_model_without_animate_modules_refuses_the_arguments(tiny_repo):
    with pytest.raises(ConfigError, match="Wan2.2-Animate model"):
        P.load(tiny_repo)(P.PROMPT, seed=1, **{**P.FAST, "num_frames": 9}, **driving(5))


def test_preset_has_the_authors_defaults():
    from diffsynth.runtime.registry import installed_families

    preset = installed_families()["wan"].presets["Wan-AI/Wan2.2-Animate-14B"]
    d = preset.defaults
    assert (d["num_inference_steps"], d["cfg_scale"], d["sigma_shift"], d["num_frames"]) == (20, 1.0, 5.0, 81)
    assert (d["height"], d["width"]) == (720, 1280)
    assert [f.origin_file_pattern for f in preset.files] == [
        "diffusion_pytorch_model*.safetensors",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    ]


def test_cli_animate_flags_reach_the_pipeline(animate_repo, tmp_path, monkeypatch):
    """`--animate-pose-video` / `--animate-face-video` (files) and `--input-image` (the character) become the
    pipeline's arguments; the video written has the pose video's length."""
    import functools

    from diffsynth.runtime.cli import main
    from diffsynth.runtime.media import load_video, save_video
    from diffsynth.wan.pipeline import WanVideoPipeline

    inputs = driving(5)
    save_video(inputs["animate_pose_video"], str(tmp_path / "pose.mp4"), fps=16)
    save_video(inputs["animate_face_video"], str(tmp_path / "face.mp4"), fps=16)
    P.image(3).save(tmp_path / "character.png")
    given = []
    call = WanVideoPipeline.__call__

    @functools.wraps(call)  # the CLI reads the accepted arguments from the signature
    def spy(self, *args, **kwargs):
        given.append({k: kwargs.get(k) for k in ("input_image", "animate_pose_video", "animate_face_video")})
        return call(self, *args, **kwargs)

    monkeypatch.setattr(WanVideoPipeline, "__call__", spy)
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", str(animate_repo), "--prompt", P.PROMPT, "--output", str(out), "--seed", "1"]
    args += ["--input-image", str(tmp_path / "character.png"), "--animate-pose-video", str(tmp_path / "pose.mp4")]
    args += ["--animate-face-video", str(tmp_path / "face.mp4"), "--num-frames", "9", "--height", "32"]
    args += ["--width", "32", "--steps", "2", "--cfg", "1", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    assert given == [
        {
            "input_image": str(tmp_path / "character.png"),
            "animate_pose_video": str(tmp_path / "pose.mp4"),
            "animate_face_video": str(tmp_path / "face.mp4"),
        }
    ]
    assert len(load_video(out)) == 5


def test_unipc_sampler_steps_every_step(animate_pipe):
    """`sampler="unipc"`: every step of the segment is UniPC's, in order (the sampler: runtime's test_unipc.py)."""
    from diffsynth.runtime.testing.samplers import check_unipc_sampling

    common = dict(input_image=P.image(3), seed=1, output_type="pt", **{**FAST, "num_inference_steps": 3}, **driving(5))
    check_unipc_sampling(lambda sampler: animate_pipe(P.PROMPT, sampler=sampler, **common))


def test_sequence_parallelism_is_refused_before_any_model_runs(animate_pipe, monkeypatch):
    """Animate calls do not divide their tokens: the call names the parallelism on before the encoders run (the DiT
    refused it with a bare ValueError after them)."""
    from diffsynth.runtime.parallel import ParallelGroups

    def encoder_ran(*args, **kwargs):
        raise AssertionError("a model ran before the refusal")

    monkeypatch.setattr(animate_pipe, "encode_prompt", encoder_ran)
    monkeypatch.setattr(animate_pipe, "animate_character", encoder_ran)
    monkeypatch.setattr(animate_pipe.dit, "parallel", ParallelGroups(sequence_size=2))
    message = r"Wan2.2-Animate does not run under sequence parallelism over 2 ranks .*--sequence-parallel 2"
    with pytest.raises(ConfigError, match=message):
        animate_pipe(P.PROMPT, **FAST, input_image=P.image(3), seed=1, **driving(5))
