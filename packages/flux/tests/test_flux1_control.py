"""FLUX.1 Canny / Depth: the 128-channel DiT in the pipeline (`control_image`), the control LoRAs that widen
FLUX.1-dev's `img_in` (BFL and diffusers layouts, full-size keys on meta), refusals and presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import make_dit, our_pipeline, random_image
from safetensors.torch import save_file

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.lora import Flux1LoRAWeights, prepare_model, read_flux1_lora, widen_img_in
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.presets import PRESETS
from diffsynth.runtime.errors import ConfigError, LoRAError
from diffsynth.runtime.lora import resolve_lora
from diffsynth.runtime.testing.modules import load_beside

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(num_inference_steps=2, t5_sequence_length=16, output_type="np", progress_bar=False)


@pytest.fixture(scope="module")
def control_repo(tiny_repo, tmp_path_factory):
    return tools.tools_repo(tiny_repo, tmp_path_factory.mktemp("canny") / "repo", tools.CONTROL_CHANNELS, seed=6)


@pytest.fixture(scope="module")
def control_pipe(control_repo):
    return our_pipeline(control_repo)


def lora_file(tmp_path, state, name="control.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ------------------------------------------------------------------ the Canny / Depth DiT
def test_control_dit_follows_control_image(control_pipe):
    seen = []
    hook = control_pipe.dit.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        edges = random_image(48, 36, seed=1)
        out = control_pipe("a red circle", control_image=edges, seed=0, **FAST)
    finally:
        hook.remove()
    assert out.shape == (1, 32, 48, 3)  # the control image's size rounded down to multiples of 16
    assert seen[0] == (1, 6, 128)
    other = control_pipe("a red circle", control_image=random_image(48, 36, seed=2), seed=0, **FAST)
    assert np.abs(other - out).max() > 1e-3


def test_control_refusals(control_pipe, tiny_pipe):
    image = random_image(32, 32)
    with pytest.raises(ConfigError, match="Canny/Depth DiT \\(in_channels 128.*give control_image"):
        control_pipe("a", **FAST)
    with pytest.raises(ConfigError, match="need a FLUX.1 Fill DiT.*Canny/Depth DiT"):
        control_pipe("a", flux_fill_image=image, flux_fill_mask=image.convert("L"), **FAST)
    with pytest.raises(ConfigError, match="control_image needs a FLUX.1 Canny/Depth DiT.*load_lora.*plain FLUX.1 DiT"):
        tiny_pipe("a", control_image=image, **FAST)
    with pytest.raises(ConfigError, match="go to different DiTs"):
        control_pipe("a", control_image=image, flux_fill_image=image, flux_fill_mask=image.convert("L"), **FAST)


def test_canny_and_depth_presets(control_repo, tmp_path, monkeypatch):
    canny, depth = PRESETS["black-forest-labs/FLUX.1-Canny-dev"], PRESETS["black-forest-labs/FLUX.1-Depth-dev"]
    assert (canny.defaults["num_inference_steps"], canny.defaults["embedded_guidance"]) == (50, 30.0)
    assert (depth.defaults["num_inference_steps"], depth.defaults["embedded_guidance"]) == (30, 10.0)
    assert canny.files[0].origin_file_pattern == "flux1-canny-dev.safetensors"
    assert depth.files[0].origin_file_pattern == "flux1-depth-dev.safetensors"
    tools.bfl_layout(control_repo, tmp_path / "black-forest-labs" / "FLUX.1-Depth-dev", "flux1-depth-dev.safetensors")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = FluxImagePipeline.from_pretrained("black-forest-labs/FLUX.1-Depth-dev", torch_dtype="float32", device="cpu")
    assert pipe.dit.config.in_channels == 128 and pipe.defaults["embedded_guidance"] == 10.0
    assert pipe("a", control_image=random_image(32, 32), seed=1, **FAST).shape == (1, 32, 32, 3)


# ------------------------------------------------------------------ control LoRAs
def test_control_lora_widens_img_in_and_fuses(tiny_repo, tmp_path):
    pipe = our_pipeline(tiny_repo)
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    state = tools.control_lora(pipe.dit)
    pipe.load_lora(lora_file(tmp_path, state), scale=0.5)
    after = pipe.dit.state_dict()
    assert pipe.dit.config.in_channels == 128 and after["img_in.weight"].shape == (256, 128)

    def delta(layer):
        return state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"]

    widened = torch.cat([before["img_in.weight"], torch.zeros(256, 64)], dim=1)
    torch.testing.assert_close(after["img_in.weight"], widened + 0.5 * delta("img_in"))
    torch.testing.assert_close(after["img_in.bias"], before["img_in.bias"] + 0.5 * state["img_in.lora_B.bias"])
    qkv = "double_blocks.0.img_attn.qkv"
    torch.testing.assert_close(after[f"{qkv}.weight"], before[f"{qkv}.weight"] + 0.5 * delta(qkv))
    for name in tools.CONTROL_LORA_NORMS:  # replaced, whatever the scale
        assert torch.equal(after[name], state[name])
    assert torch.equal(after["single_blocks.0.norm.key_norm.scale"], before["single_blocks.0.norm.key_norm.scale"])
    out = pipe("a red circle", control_image=random_image(32, 32), seed=0, **FAST)
    assert out.shape == (1, 32, 32, 3)
    with pytest.raises(ConfigError, match="give control_image"):
        pipe("a red circle", **FAST)


def test_diffusers_layout_control_lora_fuses_the_same(tiny_repo, tmp_path):
    """The same control LoRA with diffusers names (split q/k/v and linear1, swapped norm_out, norm_q ...)."""
    first, second = our_pipeline(tiny_repo), our_pipeline(tiny_repo)
    state = tools.control_lora(first.dit, seed=3)
    first.load_lora(lora_file(tmp_path, state))
    second.load_lora(lora_file(tmp_path, tools.control_lora_to_diffusers(state, hidden=256), "diffusers.safetensors"))
    a, b = first.dit.state_dict(), second.dit.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6, msg=key)


def test_control_lora_refusals_leave_the_dit_as_it_was(tiny_repo, tmp_path):
    pipe = our_pipeline(tiny_repo)
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    state = tools.control_lora(pipe.dit)
    with pytest.raises(ConfigError, match="control LoRA: it widens img_in to 128 .*fuse=True"):
        pipe.load_lora(lora_file(tmp_path, state), fuse=False)
    bad_norm = {**state, "single_blocks.0.norm.query_norm.scale": torch.ones(64)}
    with pytest.raises(LoRAError, match="norm scale 'single_blocks.0.norm.query_norm.scale' has shape \\(64,\\)"):
        pipe.load_lora(lora_file(tmp_path, bad_norm, "bad.safetensors"))
    with pytest.raises(LoRAError, match="bias on a LoRA down matrix"):
        pipe.load_lora({**state, "img_in.lora_A.bias": torch.zeros(2)})
    with pytest.raises(LoRAError, match="lands on 'double_blocks.0.img_attn.qkv'.*takes \\[768, 256\\]"):
        pipe.load_lora({**state, "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(100, 2)})
    after = pipe.dit.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert pipe.dit.config.in_channels == 64


def test_plain_lora_after_a_control_lora_gets_zero_columns(tiny_repo, tmp_path):
    pipe = our_pipeline(tiny_repo)
    pipe.load_lora(lora_file(tmp_path, tools.control_lora(pipe.dit)))
    widened = pipe.dit.img_in.weight.clone()
    plain = {"img_in.lora_A.weight": torch.randn(2, 64), "img_in.lora_B.weight": torch.randn(256, 2)}
    pipe.load_lora(plain, scale=1.0)
    change = pipe.dit.img_in.weight - widened
    torch.testing.assert_close(change[:, :64], plain["img_in.lora_B.weight"] @ plain["img_in.lora_A.weight"])
    assert torch.equal(change[:, 64:], torch.zeros(256, 64))


def test_widen_img_in_keeps_the_output():
    dit = make_dit()  # in_channels 16
    x = torch.randn(2, 5, 16)
    want = dit.img_in(x)
    widen_img_in(dit, 32)
    assert dit.config.in_channels == 32 and dit.img_in.weight.shape == (32, 32)
    torch.testing.assert_close(dit.img_in(torch.cat([x, torch.randn(2, 5, 16)], dim=-1)), want)
    with pytest.raises(LoRAError, match="cannot be narrowed"):
        widen_img_in(dit, 16)


def test_full_size_control_lora_on_meta():
    with torch.device("meta"):
        dit = Flux1DiT(Flux1DiTConfig())
    lora = read_flux1_lora(tools.full_size_control_lora(dit), dit)
    assert isinstance(lora, Flux1LoRAWeights) and lora.in_channels == 128
    assert len(lora.norm_scales) == 19 * 4 + 38 * 2
    linears = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(lora.targets) == sorted(linears)
    assert all(t.diff_b is not None for t in lora.targets.values())
    prepare_model(dit, lora)
    assert dit.img_in.weight.shape == (3072, 128) and dit.config.in_channels == 128
    assert sorted(resolve_lora(dit, lora).targets) == sorted(linears)


def test_control_lora_on_a_vram_managed_dit_is_refused(tiny_repo):
    pipe = our_pipeline(tiny_repo)
    pipe.enable_vram_management()
    with pytest.raises(ConfigError, match="VRAM-managed DiT; load the LoRA before enable_vram_management"):
        pipe.load_lora(tools.control_lora(pipe.dit))
    assert pipe.dit.config.in_channels == 64


def test_cli_control_image_without_a_controlnet_goes_to_a_control_model(control_repo, tiny_repo, tmp_path, capsys):
    """`--control-image` with no `--controlnet` is the Canny / Depth DiT's `control_image`; a plain model refuses it."""
    from PIL import Image

    from diffsynth.runtime.cli import main

    random_image(32, 32, seed=4).save(tmp_path / "edges.png")
    out = tmp_path / "out.png"
    args = ["generate", "--prompt", "a red circle", "--seed", "1", "--steps", "2", "--device", "cpu"]
    args += ["--dtype", "float32", "--control-image", str(tmp_path / "edges.png"), "--output", str(out)]
    assert main([*args, "--model", str(control_repo)]) == 0
    pipe = our_pipeline(control_repo)
    want = pipe("a red circle", control_image=str(tmp_path / "edges.png"), seed=1, num_inference_steps=2,
                progress_bar=False)  # fmt: skip
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(want))
    assert main([*args, "--model", str(tiny_repo)]) == 2
    assert "control_image" in capsys.readouterr().err
