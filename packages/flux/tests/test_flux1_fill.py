"""FLUX.1 Fill: the mask folding, the 384-channel DiT at full size on meta, the pipeline path, refusals, preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import our_pipeline, random_image
from PIL import Image

from diffsynth.flux.flux1.channels import CONTROL, FILL, condition_kind, fold_mask
from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.formats import FLUX1_DIT_SPEC, config_from_state
from diffsynth.flux.pipeline import FluxImagePipeline, pack_latents
from diffsynth.flux.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.testing.modules import load_beside

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = Path(__file__).parent / "data" / "keys"
FAST = dict(num_inference_steps=2, t5_sequence_length=16, output_type="np", progress_bar=False)


@pytest.fixture(scope="module")
def fill_repo(tiny_repo, tmp_path_factory):
    return tools.tools_repo(tiny_repo, tmp_path_factory.mktemp("fill") / "repo", tools.FILL_CHANNELS, seed=5)


@pytest.fixture(scope="module")
def fill_pipe(fill_repo):
    return our_pipeline(fill_repo)


def half_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask, mode="L")


# ------------------------------------------------------------------ the condition
def test_fold_mask_is_bfls_two_rearranges():
    """`b (h 8) (w 8) -> b (8 8) h w`, then the 2x2 packing `b c (h 2) (w 2) -> b (h w) (c 2 2)`."""
    mask = torch.rand(2, 1, 32, 48)
    b, h, w = 2, 32 // 8, 48 // 8
    grid = mask[:, 0].reshape(b, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, h, w)
    assert torch.equal(fold_mask(mask), pack_latents(grid))
    with pytest.raises(ValueError, match="multiples of 16"):
        fold_mask(torch.rand(1, 1, 24, 32))


def test_condition_kind_follows_the_widths():
    assert condition_kind(Flux1DiTConfig()) is None
    assert condition_kind(Flux1DiTConfig(in_channels=384, out_channels=64)) == FILL
    assert condition_kind(Flux1DiTConfig(in_channels=128, out_channels=64)) == CONTROL
    assert condition_kind(Flux1DiTConfig(in_channels=100, out_channels=64)) == "unknown"


@pytest.mark.parametrize("in_channels", [tools.FILL_CHANNELS, tools.CONTROL_CHANNELS])
def test_full_size_wide_dit_keys_and_config_on_meta(in_channels):
    """FLUX.1-Fill-dev / -Canny-dev / -Depth-dev: FLUX.1-dev's keys with a wider img_in; both layouts derive it."""
    official = json.loads((KEYS / "flux1_dev_orig.json").read_text())
    official["img_in.weight"] = [3072, in_channels]
    with torch.device("meta"):
        ours = Flux1DiT(Flux1DiTConfig(in_channels=in_channels, out_channels=64)).state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == official
    state = {k: torch.empty(v, device="meta") for k, v in official.items()}
    config = config_from_state(state)
    assert (config.in_channels, config.out_channels, config.depth, config.hidden_size) == (in_channels, 64, 19, 3072)
    diffusers = json.loads((KEYS / "flux1_dev_diffusers.json").read_text())
    diffusers["x_embedder.weight"] = [3072, in_channels]
    diffusers_state = {k: torch.empty(v, device="meta") for k, v in diffusers.items()}
    layout = FLUX1_DIT_SPEC.match(diffusers_state)
    converted = layout.to_ours(diffusers_state)
    assert {k: list(v.shape) for k, v in converted.items()} == official
    # transformer/config.json of the released repos: out_channels 64 given, in_channels the wide one
    json_config = {"in_channels": in_channels, "out_channels": 64, "num_layers": 19, "num_single_layers": 38}
    assert config_from_state(converted, json_config).in_channels == in_channels


def test_fill_condition_tokens(fill_pipe):
    """Masked pixels become 0 in [-1, 1] (mid gray) before encoding; the mask is binarised at 0.5 and folded."""
    image = random_image(48, 32, seed=1)
    soft = Image.fromarray(np.full((32, 48), 140, dtype=np.uint8), mode="L")  # 0.55: repaint everything
    inputs = fill_pipe.check_channel_inputs(image, soft, None, None)
    tokens = fill_pipe.encode_channel_condition(inputs, 1, 32, 48)
    assert tokens.shape == (1, 6, 320)
    gray = fill_pipe.vae.encode(pil_to_tensor([image]) * 0).float()  # the same memory layout as the pipeline's
    torch.testing.assert_close(tokens[..., :64], pack_latents(gray))
    assert torch.equal(tokens[..., 64:], torch.ones(1, 6, 256))
    keep_left = fill_pipe.encode_channel_condition(
        fill_pipe.check_channel_inputs(image, half_mask(48, 32), None, None), 1, 32, 48
    )
    assert torch.equal(
        keep_left[..., 64:], fold_mask(torch.tensor(np.asarray(half_mask(48, 32)) / 255.0)[None, None].float())
    )


def test_fill_defaults_and_outpainting(fill_pipe):
    """Guidance 30 by default; the output takes the image's size (rounded down to 16); outpainting = pad + mask."""
    seen = []
    hook = fill_pipe.dit.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape, float(args[6][0]))))
    try:
        photo = random_image(40, 30, seed=2)
        padded = Image.new("RGB", (64, 48), (127, 127, 127))
        padded.paste(photo, (12, 9))
        mask = Image.new("L", (64, 48), 255)
        mask.paste(Image.new("L", photo.size, 0), (12, 9))
        out = fill_pipe("a red circle", flux_fill_image=padded, flux_fill_mask=mask, seed=0, **FAST)
    finally:
        hook.remove()
    assert out.shape == (1, 48, 64, 3)
    assert seen[0] == ((1, 12, 384), 30.0)
    explicit = fill_pipe("a red circle", flux_fill_image=photo, flux_fill_mask=mask.resize(photo.size), **FAST)
    assert explicit.shape == (1, 16, 32, 3)  # 30x40 rounded down to multiples of 16


def test_fill_one_image_per_prompt(fill_pipe):
    """Each prompt keeps its own image, with and without true CFG (both branches in one batch): the first sample
    of a batch equals that prompt alone (the same seed gives it the same noise)."""
    images = [random_image(32, 32, seed=s) for s in (1, 2)]
    mask = half_mask(32, 32)
    for cfg in (1.0, 2.0):
        both = fill_pipe(["a", "b"], flux_fill_image=images, flux_fill_mask=mask, cfg_scale=cfg, seed=3, **FAST)
        first = fill_pipe("a", flux_fill_image=images[0], flux_fill_mask=mask, cfg_scale=cfg, seed=3, **FAST)
        assert both.shape == (2, 32, 32, 3)
        assert np.abs(both[0] - first[0]).max() < 1e-5
    with pytest.raises(ConfigError, match="flux_fill_image has 2 images for 3 prompts"):
        fill_pipe(["a", "b", "c"], flux_fill_image=images, flux_fill_mask=mask, **FAST)


def test_fill_refusals(fill_pipe, tiny_pipe):
    image, mask = random_image(32, 32), half_mask(32, 32)
    with pytest.raises(ConfigError, match="flux_fill_mask needs flux_fill_image"):
        fill_pipe("a", flux_fill_mask=mask, **FAST)
    with pytest.raises(ConfigError, match="flux_fill_image needs flux_fill_mask.*pad the image"):
        fill_pipe("a", flux_fill_image=image, **FAST)
    with pytest.raises(ConfigError, match="give flux_fill_image and flux_fill_mask"):
        fill_pipe("a", **FAST)
    with pytest.raises(ConfigError, match="need a FLUX.1 Fill DiT .*plain FLUX.1 DiT \\(in_channels 64"):
        tiny_pipe("a", flux_fill_image=image, flux_fill_mask=mask, **FAST)
    with pytest.raises(ConfigError, match="control_image needs a FLUX.1 Canny/Depth DiT.*Fill DiT"):
        fill_pipe("a", control_image=image, **FAST)
    with pytest.raises(ConfigError, match="kontext_images are not taken"):
        fill_pipe("a", flux_fill_image=image, flux_fill_mask=mask, kontext_images=image, **FAST)
    with pytest.raises(ConfigError, match="flux_fill_mask must be a file path or a PIL.Image"):
        fill_pipe("a", flux_fill_image=image, flux_fill_mask=np.zeros((32, 32)), **FAST)


def test_fill_preset_loads_offline(fill_repo, tmp_path, monkeypatch):
    preset = PRESETS["black-forest-labs/FLUX.1-Fill-dev"]
    assert preset.defaults["embedded_guidance"] == 30.0 and preset.defaults["num_inference_steps"] == 50
    assert [f.origin_file_pattern for f in preset.files][0] == "flux1-fill-dev.safetensors"
    tools.bfl_layout(fill_repo, tmp_path / "black-forest-labs" / "FLUX.1-Fill-dev", "flux1-fill-dev.safetensors")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-Fill-dev", torch_dtype="float32", device="cpu")
    assert pipe.dit.config.in_channels == 384
    got = pipe("a", flux_fill_image=random_image(32, 32), flux_fill_mask=half_mask(32, 32), seed=1, **FAST)
    want = our_pipeline(fill_repo)(
        "a",
        flux_fill_image=random_image(32, 32),
        flux_fill_mask=half_mask(32, 32),
        seed=1,
        embedded_guidance=30.0,
        **FAST,
    )
    np.testing.assert_allclose(got, want, atol=1e-5)  # same weights, other file layouts


def test_cli_input_image_and_inpaint_mask_drive_a_fill_model(fill_repo, tmp_path):
    """`--input-image` + `--inpaint-mask` on a Fill DiT become `flux_fill_image` / `flux_fill_mask`."""
    from diffsynth.runtime.cli import main

    random_image(32, 32, seed=3).save(tmp_path / "in.png")
    half_mask(32, 32).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(fill_repo), "--prompt", "a red circle", "--seed", "2", "--output", str(out)]
    args += ["--input-image", str(tmp_path / "in.png"), "--inpaint-mask", str(tmp_path / "mask.png")]
    assert main([*args, "--steps", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    pipe = our_pipeline(fill_repo)
    with Image.open(tmp_path / "mask.png") as mask:
        want = pipe("a red circle", flux_fill_image=str(tmp_path / "in.png"), flux_fill_mask=mask.convert("L"),
                    seed=2, num_inference_steps=2, progress_bar=False)  # fmt: skip
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(want))
