"""Wan Fun Control (Alibaba PAI): the DiT's reference tokens (`ref_conv`), the released layouts, and the pipeline's
`control_video` / `reference_image` as DiffSynth-Studio's Fun units build them.

No installable reference implements these models (diffusers has none; VideoX-Fun and DiffSynth-Studio are not
importable here), so the proofs are invariants: reference tokens equal an extra leading latent frame through the
patch embedding, and the pipeline hands the DiT exactly the conditions DiffSynth-Studio's units compose.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.wan.dit import WanDiTConfig
from diffsynth.wan.formats import DIT_SPEC, config_from_state


def _beside(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _beside("test_dit")
P = _beside("test_pipeline")
KEYS = Path(__file__).parent / "data" / "keys"


def fun_model(seed: int = 3):
    """A tiny Fun Control DiT: noise + control + image latent channels (3 x 4), CLIP input, ref_conv."""
    return T.make_model(T.tiny_config("i2v", in_dim=12, ref_conv=True, ref_dim=4), seed)


def fun_inputs(batch: int = 2, size=(2, 4, 6), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    y = torch.randn(batch, 8, *size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, 7, 32, generator=g)
    clip = torch.randn(batch, 5, 24, generator=g)
    reference = torch.randn(batch, 4, 1, *size[1:], generator=g)
    return (x, t, context), {"clip_feature": clip, "y": y, "reference_latents": reference}


# ------------------------------------------------------------------ the DiT
def test_reference_tokens_are_a_leading_latent_frame():
    """With `ref_conv` set to the patch embedding's weights for the latent channels, the reference tokens are
    what the patch embedding gives a latent frame holding the reference (other channels zero) placed before
    the video: the output equals the DiT run on that longer video, its first frame dropped. This pins the
    token order, the RoPE frame offset and the slicing before the head."""
    model = fun_model().eval()
    with torch.no_grad():
        model.ref_conv.weight.copy_(model.patch_embedding.weight[:, :4, 0])
        model.ref_conv.bias.copy_(model.patch_embedding.bias)
    (x, t, context), kwargs = fun_inputs()
    reference = kwargs.pop("reference_latents")
    with torch.no_grad():
        got = model(x, t, context, reference_latents=reference, **kwargs)
        longer_x = torch.cat([reference, x], dim=2)
        longer_y = torch.cat([torch.zeros_like(kwargs["y"][:, :, :1]), kwargs["y"]], dim=2)
        want = model(longer_x, t, context, clip_feature=kwargs["clip_feature"], y=longer_y)[:, :, 1:]
        plain = model(x, t, context, **kwargs)
    assert (got - plain).abs().max() > 0.02  # the reference changes the video
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_conformance_with_a_reference():
    args, kwargs = fun_inputs()
    other = fun_inputs(seed=2)[0]
    cf.check_forward(fun_model, args, kwargs, expected_shapes=[args[0].shape])
    cf.check_backward(fun_model, args, kwargs)
    cf.check_gradient_checkpointing(fun_model, args, kwargs, atol=1e-6)
    cf.check_meta_load(fun_model, args, kwargs)
    cf.check_first_block_cache(fun_model, args, kwargs, other_args=other, blocks=("blocks",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reference_latents": torch.zeros(2, 4, 1, 4, 4)}, "reference_latents has shape"),
        ({"reference_latents": torch.zeros(2, 5, 1, 4, 6)}, "reference_latents has shape"),
    ],
)
def test_bad_reference_inputs_name_the_argument(change, message):
    (x, t, context), kwargs = fun_inputs()
    with pytest.raises(ValueError, match=message):
        fun_model()(x, t, context, **{**kwargs, **change})


def test_a_dit_without_ref_conv_refuses_a_reference():
    (x, t, context), kwargs = fun_inputs()
    model = T.make_model(T.tiny_config("i2v", in_dim=12))
    with pytest.raises(ValueError, match="no ref_conv"):
        model(x, t, context, **kwargs)


# ------------------------------------------------------------------ released layouts
def _released(base: str, in_dim: int) -> dict[str, list[int]]:
    """A Fun Control DiT's keys: the Wan I2V DiT it extends (the authors' key list), its patch embedding over
    `in_dim` channels, and `ref_conv` (16 -> dim, 2 x 2), as DiffSynth-Studio's model table describes
    Wan2.1-Fun-V1.1-14B-Control (in_dim 48, CLIP) and Wan2.2-Fun-A14B-Control (in_dim 52, no CLIP)."""
    keys = json.loads((KEYS / f"{base}.json").read_text())
    dim = keys["patch_embedding.weight"][0]
    keys["patch_embedding.weight"] = [dim, in_dim, 1, 2, 2]
    return {**keys, "ref_conv.weight": [dim, 16, 2, 2], "ref_conv.bias": [dim]}


@pytest.mark.parametrize(
    ("base", "in_dim", "config"),
    [
        ("wan21_i2v_14b_orig", 48, WanDiTConfig(in_dim=48, model_type="i2v", has_image_input=True, ref_conv=True)),
        ("wan22_i2v_a14b_orig", 52, WanDiTConfig(in_dim=52, model_type="i2v", ref_conv=True)),
    ],
)
def test_released_fun_control_layouts(base, in_dim, config):
    listed = _released(base, in_dim)
    state = {k: torch.empty(shape, device="meta") for k, shape in listed.items()}
    assert DIT_SPEC.match(state).name == "original"
    assert config_from_state(state, None) == config
    assert config_from_state(state, {"add_ref_conv": True, "in_dim_ref_conv": 16, "in_dim": in_dim}) == config
    with torch.device("meta"):
        model = DIT_SPEC.build(config)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == listed


# ------------------------------------------------------------------ the pipeline
FAST = dict(P.FAST)


@pytest.fixture(scope="module")
def fun_repo(tiny_repo_factory):
    return tiny_repo_factory("fun_control")


@pytest.fixture(scope="module")
def fun_pipe(fun_repo):
    return P.load(fun_repo)


class DitInputs:
    """The keyword inputs of every DiT call (a forward pre-hook)."""

    def __init__(self, dit):
        self.calls = []
        self.hook = dit.register_forward_pre_hook(lambda m, a, kw: self.calls.append(dict(kw)), with_kwargs=True)

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.hook.remove()


def control_frames(seed: int = 0):
    return [P.image(seed + i) for i in range(5)]


def vae_latent(pipe, frames):
    """The VAE latent `[1, z, T, h, w]` of 32 x 32 frames."""
    from diffsynth.runtime.media import pil_to_tensor

    return pipe.vae.encode(pil_to_tensor(frames).transpose(0, 1)[None], tiled=True).float()


def test_conditions_are_diffsynth_studios_composition(fun_pipe):
    """Without an input image: y = control latent + zeros, CLIP features zeros; with a reference image: its
    latent as `reference_latents` and its CLIP features; with an input image: y = control latent + the I2V
    latent channels (no mask channels: V1.1's layout)."""
    from diffsynth.runtime.media import pil_to_tensor
    from diffsynth.wan.image_encoder import encode_image

    control = control_frames()
    want_control = vae_latent(fun_pipe, control)
    with DitInputs(fun_pipe.dit) as calls:
        fun_pipe(P.PROMPT, seed=1, control_video=control, **FAST)
    y = calls[0]["y"]
    assert y.shape == (1, 32, 2, 4, 4)
    torch.testing.assert_close(y[:, :16], want_control, atol=1e-5, rtol=0)
    assert torch.all(y[:, 16:] == 0) and torch.all(calls[0]["clip_feature"] == 0)
    assert calls[0]["clip_feature"].shape == (1, 257, fun_pipe.dit.config.image_dim)
    assert "reference_latents" not in calls[0]

    reference, first = P.image(20), P.image(21)
    with DitInputs(fun_pipe.dit) as calls:
        fun_pipe(P.PROMPT, seed=1, control_video=control, reference_image=reference, input_image=first, **FAST)
    kwargs = calls[0]
    torch.testing.assert_close(
        kwargs["reference_latents"], vae_latent(fun_pipe, [reference])[:, :, :1], atol=1e-5, rtol=0
    )
    clip = encode_image(fun_pipe.image_encoder, pil_to_tensor(reference), "cpu", torch.float32)
    torch.testing.assert_close(kwargs["clip_feature"], clip, atol=1e-5, rtol=0)  # the reference's, not the image's
    given = torch.zeros(1, 3, 5, 32, 32)  # the first frame, then zeros (mid-grey), as the authors' I2V builds it
    given[:, :, 0] = pil_to_tensor(first)
    first_video = fun_pipe.vae.encode(given, tiled=True).float()
    torch.testing.assert_close(kwargs["y"][:, :16], want_control, atol=1e-5, rtol=0)
    torch.testing.assert_close(kwargs["y"][:, 16:], first_video, atol=1e-5, rtol=0)


def test_control_and_reference_change_the_video_and_cfg_merge_agrees(fun_pipe):
    base = fun_pipe(P.PROMPT, seed=2, output_type="pt", control_video=control_frames(), **FAST)
    other = fun_pipe(P.PROMPT, seed=2, output_type="pt", control_video=control_frames(7), **FAST)
    assert (base - other).abs().max() > 1e-3
    guided = dict(FAST, cfg_scale=3.0)
    kwargs = dict(seed=2, output_type="pt", control_video=control_frames(), reference_image=P.image(9), **guided)
    two = fun_pipe(P.PROMPT, negative_prompt="bad", **kwargs)
    one = fun_pipe(P.PROMPT, negative_prompt="bad", cfg_merge=True, **kwargs)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("repo", "kwargs", "message"),
    [
        ("fun_control", {}, "pass control_video"),
        ("fun_control", {"control_video": [P.image(0)] * 3}, "fewer than num_frames"),
        ("i2v", {"input_image": P.image(0), "control_video": [P.image(0)] * 5}, "Fun Control model"),
        ("t2v", {"control_video": [P.image(0)] * 5}, "Fun Control model"),
        ("i2v", {"input_image": P.image(0), "reference_image": P.image(0)}, "ref_conv"),
    ],
)
def test_bad_fun_inputs_name_the_argument(tiny_repo_factory, repo, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        P.load(tiny_repo_factory(repo))(P.PROMPT, seed=1, **kwargs, **FAST)


def test_control_channels_follow_the_released_layouts():
    from diffsynth.wan.fun_control import control_channels

    def config(in_dim, kind="i2v"):
        return T.tiny_config(kind, in_dim=in_dim, out_dim=16) if kind == "i2v" else T.tiny_config(kind)

    assert control_channels(config(36)) == 0  # plain I2V / Fun InP: mask + image latent
    assert control_channels(config(48)) == 16  # Fun (V1.1) Control: control + image latent
    assert control_channels(config(52)) == 16  # Wan2.2-Fun-A14B-Control: control + mask + image latent
    assert control_channels(config(16, "t2v")) == 0


# ------------------------------------------------------------------ training
def test_training_encodes_the_pipelines_conditions(fun_repo, fun_pipe):
    from diffsynth.runtime.media import pil_to_tensor
    from diffsynth.wan.pipeline import WanConditions, folder_model_configs
    from diffsynth.wan.training import WanTrainingTask

    configs, tokenizer = folder_model_configs(fun_repo)
    task = WanTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    control, reference = control_frames(), P.image(20)
    row = {
        "prompt": P.PROMPT,
        "video": pil_to_tensor(control_frames(30)).transpose(0, 1),
        "control_video": pil_to_tensor(control).transpose(0, 1),
        "reference_image": pil_to_tensor(reference)[0],
    }
    sample = task.encode([row])[0]
    with DitInputs(fun_pipe.dit) as calls:
        fun_pipe(P.PROMPT, seed=1, control_video=control, reference_image=reference, **FAST)
    for key in ("y", "clip_feature", "reference_latents"):
        torch.testing.assert_close(sample[key], calls[0][key][0], atol=1e-5, rtol=0)
    batch = task.collate([sample])
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = task.velocity(task.models["dit"], batch, noisy, torch.tensor([0.5]))
        conditions = WanConditions(
            batch["text"], batch["clip_feature"], batch["y"], reference_latents=batch["reference_latents"]
        )
        want = fun_pipe.predict(fun_pipe.dit, noisy, torch.tensor([500.0]), conditions, None, 1.0, False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="control_video"):
        task.encode([{k: v for k, v in row.items() if k != "control_video"}])
    with pytest.raises(ConfigError, match="follow a control video"):
        task.reference_arguments([reference])


def test_cli_control_flags(fun_repo, tmp_path, monkeypatch):
    """`--control-video` / `--reference-image` reach the pipeline as `control_video` / `reference_image`."""
    from diffsynth.runtime.media import load_video, save_video

    video = tmp_path / "control.mp4"
    save_video(control_frames(), video, fps=16)
    P.image(3).save(tmp_path / "ref.png")
    flags = ["--control-video", str(video), "--reference-image", str(tmp_path / "ref.png")]
    seen, _, out = P.run_cli(fun_repo, tmp_path, monkeypatch, *flags)
    assert seen["control_video"] == str(video) and seen["reference_image"] == str(tmp_path / "ref.png")
    assert len(load_video(out)) == 5


def test_two_expert_fun_control_keeps_the_mask_channels_and_feeds_both_experts(tiny_repo_factory):
    """Wan2.2-Fun-A14B-Control (2 x 16 + 4 extra channels, no CLIP): y is the control latent, then the I2V mask and
    latent channels (zeros without an input image), and the reference reaches both experts."""
    pipe = P.load(tiny_repo_factory("fun_a14b"))
    assert pipe.dit2 is not None and pipe.dit.config.in_dim == 52 and not pipe.dit.config.has_image_input
    control, first = control_frames(), P.image(21)
    options = dict(FAST, num_inference_steps=4, switch_DiT_boundary=0.875)
    with DitInputs(pipe.dit) as high, DitInputs(pipe.dit2) as low:
        pipe(P.PROMPT, seed=1, control_video=control, reference_image=P.image(20), input_image=first, **options)
    assert high and low and all("reference_latents" in c and c.get("clip_feature") is None for c in high + low)
    y = high[0]["y"]
    assert y.shape == (1, 36, 2, 4, 4)
    torch.testing.assert_close(y[:, :16], vae_latent(pipe, control), atol=1e-5, rtol=0)
    given = torch.zeros(1, 3, 5, 32, 32)
    given[:, :, 0] = P.pil_to_tensor(first)
    torch.testing.assert_close(y[:, 20:], pipe.vae.encode(given, tiled=True).float(), atol=1e-5, rtol=0)
    assert torch.all(y[:, 16:20, 0] == 1) and torch.all(y[:, 16:20, 1] == 0)  # the first frame's mask
    with DitInputs(pipe.dit) as calls:
        pipe(P.PROMPT, seed=1, control_video=control, **options)
    assert torch.all(calls[0]["y"][:, 16:] == 0)
