"""DiffSynth-Studio's Qwen-Image extras: `context_image` (its In-Context Control LoRAs) and `edit_rope_interpolation`
(its Edit-Lowres-Fix LoRA). The interpolated positions are checked against DiffSynth-Studio's rotary module (read
from its git mirror; skipped where the mirror is absent), the rest against invariants of our own pipeline."""

from __future__ import annotations

import ast
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.qwen_image import QwenImagePipeline
from diffsynth.qwen_image.dit import QwenImageDiT, QwenImageDiTConfig, msrope_angles
from diffsynth.qwen_image.pipeline import pack
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.testing.weights import random_weights

FAST = dict(num_inference_steps=2, height=32, width=48, progress_bar=False)
MIRROR = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")
AXES = (16, 56, 56)  # the released axes_dims_rope


def picture(seed: int, size=(48, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


# ----------------------------------------------------------------------------------------- rotary positions
@pytest.fixture(scope="module")
def studio_rope():
    """DiffSynth-Studio's `QwenEmbedRope` class, taken alone from its Qwen-Image DiT module."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    show = subprocess.run(
        ["git", "-C", str(MIRROR), "show", "HEAD:diffsynth/models/qwen_image_dit.py"], capture_output=True, text=True
    )
    if show.returncode:
        pytest.skip("qwen_image_dit.py is not in the DiffSynth-Studio mirror")
    node = next(n for n in ast.parse(show.stdout).body if isinstance(n, ast.ClassDef) and n.name == "QwenEmbedRope")
    namespace = {"torch": torch, "nn": torch.nn, "math": math}
    exec(compile(ast.Module([node], []), "qwen_image_dit.py", "exec"), namespace)  # noqa: S102 (their class, in a test)
    return namespace["QwenEmbedRope"]


@pytest.mark.parametrize("reference", [(1, 2, 3), (1, 6, 4), (1, 4, 6)])
def test_interpolated_positions_match_diffsynth_studio(studio_rope, reference):
    """A smaller (or differently shaped) reference samples the target's rows and columns; its frame is its own."""
    shapes = [(1, 4, 6), reference, (1, 3, 3)]
    rope = studio_rope(theta=10000, axes_dim=list(AXES), scale_rope=True)
    want_img, want_txt = rope.forward_sampling(shapes, [5], device=torch.device("cpu"))
    img, txt = msrope_angles(shapes, 5, AXES, torch.device("cpu"), interpolate_references=True)
    torch.testing.assert_close(torch.polar(torch.ones_like(img), img), want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.polar(torch.ones_like(txt), txt), want_txt, atol=1e-5, rtol=0)


def test_interpolation_keeps_references_of_the_target_size_and_moves_smaller_ones():
    cpu = torch.device("cpu")
    same = [(1, 4, 6), (1, 4, 6)]
    torch.testing.assert_close(
        msrope_angles(same, 5, AXES, cpu, interpolate_references=True)[0], msrope_angles(same, 5, AXES, cpu)[0]
    )
    small = [(1, 4, 6), (1, 2, 3)]
    plain = msrope_angles(small, 5, AXES, cpu)[0][24:]
    spread = msrope_angles(small, 5, AXES, cpu, interpolate_references=True)[0][24:]
    assert torch.equal(plain[:, :8], spread[:, :8])  # the frame axis (its first 8 angles) is the reference's own
    assert (plain[:, 8:] - spread[:, 8:]).abs().max() > 0.1
    target = msrope_angles(small, 5, AXES, cpu)[0][:24].reshape(4, 6, -1)
    torch.testing.assert_close(spread.reshape(2, 3, -1)[..., 8:], target[[0, 3]][:, [0, 2, 5]][..., 8:])


def test_dit_passes_the_switch_to_its_positions():
    torch.manual_seed(0)
    config = QwenImageDiTConfig(
        num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)
    )
    dit = random_weights(QwenImageDiT(config), 0, scale=0.2).eval()
    latents, text = torch.randn(1, 6 + 2, config.in_channels), torch.randn(1, 3, 16)
    shapes = [[(1, 2, 3), (1, 1, 2)]]
    with torch.no_grad():
        plain = dit(latents, torch.tensor([0.5]), text, img_shapes=shapes)
        spread = dit(latents, torch.tensor([0.5]), text, img_shapes=shapes, edit_rope_interpolation=True)
    assert (plain - spread).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------- the pipeline
class DiTCalls:
    def __init__(self, dit):
        self.calls = []
        self.hook = dit.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args, kwargs))

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        self.hook.remove()


def test_context_image_tokens_follow_the_image(pipe):
    """The context image, resized to the output, is encoded by the VAE and its tokens follow the image's as a second
    frame; the prompt is encoded as for text-to-image (the text encoder never sees the control image)."""
    control = picture(1, (64, 40))  # resized to 48x32
    with DiTCalls(pipe.dit) as calls:
        pipe("Context_Control. a red circle", context_image=control, seed=0, cfg_scale=1.0, **FAST)
    (args, kwargs) = calls[0]
    latents, text, shapes = args[0], args[2], args[4]
    assert shapes == [[(1, 2, 3), (1, 2, 3)]] and latents.shape[1] == 12
    with torch.no_grad():
        pixels = pil_to_tensor(control.resize((48, 32)), dtype=torch.float32)
        context = pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0]
        plain_text, _ = pipe.encode_prompt(["Context_Control. a red circle"], 512)
    torch.testing.assert_close(latents[:, 6:], pack(context, pipe.dit.config.patch_size), atol=1e-6, rtol=0)
    torch.testing.assert_close(text, plain_text, atol=0, rtol=0)
    assert "edit_rope_interpolation" not in kwargs


def test_context_image_steers_the_prediction_and_interpolation_reaches_the_dit(pipe):
    """The image's predicted velocity depends on the context image (the tiny VAE's pictures barely show it)."""

    def first_prediction(**kwargs):
        outputs = []
        hook = pipe.dit.register_forward_hook(lambda m, i, out: outputs.append(out[:, :6].clone()))
        try:
            pipe("a red circle", seed=0, cfg_scale=1.0, **kwargs, **FAST)
        finally:
            hook.remove()
        return outputs[0]

    plain, a, b = (
        first_prediction(),
        first_prediction(context_image=picture(1)),
        first_prediction(context_image=picture(2)),
    )
    assert (a - plain).abs().max() > 1e-3 and (a - b).abs().max() > 1e-4
    with DiTCalls(pipe.dit) as calls:
        pipe("a red circle", context_image=picture(1), edit_rope_interpolation=True, seed=0, **FAST)
    assert len(calls) == 4 and all(kwargs.get("edit_rope_interpolation") is True for _, kwargs in calls)


def test_bad_context_inputs(pipe):
    with pytest.raises(ConfigError, match="context_image is one image"):
        pipe("a cat", context_image=[picture(1), picture(2)], **FAST)
    with pytest.raises(ConfigError, match="no edit_image or context_image"):
        pipe(
            "a cat",
            context_image=picture(1),
            eligen_entity_prompts=["a dog"],
            eligen_entity_masks=[Image.new("L", (48, 32), 255)],
            **FAST,
        )


def test_cli_context_image_matches_the_python_api(pipe, tiny_repo, tmp_path):
    """`--context-image` is the pipeline's `context_image`."""
    from diffsynth.runtime.cli import main

    picture(1).save(tmp_path / "depth.png")
    out = tmp_path / "cli.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "Context_Control. a red circle", "--seed", "3"]
    args += ["--context-image", str(tmp_path / "depth.png"), "--output", str(out), "--height", "32", "--width", "48"]
    assert main([*args, "--steps", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    want = pipe("Context_Control. a red circle", context_image=Image.open(tmp_path / "depth.png"), seed=3, **FAST)
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(want))


def test_lowres_fix_settings_come_from_the_preset(pipe):
    """The Edit-Lowres-Fix preset sets `edit_image_auto_resize=False` and `edit_rope_interpolation=True` as
    defaults: a pipeline holding those defaults calls the DiT as the explicit arguments do (the reference at its
    own size, the switch on), and an explicit argument still wins over them."""
    from diffsynth.qwen_image.presets import PRESETS

    defaults = PRESETS["DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix"].defaults
    assert defaults["edit_image_auto_resize"] is False and defaults["edit_rope_interpolation"] is True
    call = dict(edit_image=picture(3, size=(32, 16)), seed=0, **FAST)

    def dit_calls(**kwargs) -> list:
        with DiTCalls(pipe.dit) as calls:
            pipe("make it blue", **kwargs, **call)
        return [(args[0].shape, args[4], kwargs.get("edit_rope_interpolation")) for args, kwargs in calls]

    explicit = dit_calls(edit_image_auto_resize=False, edit_rope_interpolation=True)
    resized, plain = dit_calls(), dit_calls(edit_image_auto_resize=False)
    assert explicit[0][2] is True and plain[0][2] is not True and explicit[0][:2] == plain[0][:2] != resized[0][:2]
    saved = dict(pipe.defaults)
    try:
        pipe.defaults.update(edit_image_auto_resize=False, edit_rope_interpolation=True)
        assert dit_calls() == explicit and dit_calls(edit_rope_interpolation=False) == plain
    finally:
        pipe.defaults.clear()
        pipe.defaults.update(saved)
