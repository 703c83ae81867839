"""Flex.2 (`flux1/flex.py`): the 196-channel DiT with 8 double blocks at full size on meta, the condition tokens
against DiffSynth-Studio's recipe (concatenate the latents on channels, then pack), the control's stop step,
the optional inputs, refusals, the preset, and training on images and prompts with the empty condition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import our_pipeline, random_image
from PIL import Image

from diffsynth.flux.flux1.channels import FLEX, condition_kind, describe_widths
from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.formats import config_from_state
from diffsynth.flux.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor
from diffsynth.runtime.testing.modules import load_beside

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = Path(__file__).parent / "data" / "keys"
FLEX_CHANNELS = 196  # 64 noisy + 64 inpainting + 4 mask + 64 control features
FAST = dict(num_inference_steps=4, t5_sequence_length=16, output_type="np", progress_bar=False)


@pytest.fixture(scope="module")
def flex_repo(tiny_repo, tmp_path_factory):
    return tools.tools_repo(tiny_repo, tmp_path_factory.mktemp("flex") / "repo", FLEX_CHANNELS, seed=7)


@pytest.fixture(scope="module")
def flex_pipe(flex_repo):
    return our_pipeline(flex_repo)


def mask_image(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    mask[:, width // 2 :] = 255  # repaint the right half
    return Image.fromarray(mask)


class DiTInputs:
    """The image tokens (with the condition features) of every DiT call."""

    def __init__(self, dit):
        self.seen = []
        self.hook = dit.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].clone()))

    def __enter__(self):
        return self.seen

    def __exit__(self, *exc):
        self.hook.remove()


# ------------------------------------------------------------------ the model
def test_condition_kind_and_full_size_keys_on_meta():
    """Flex.2-preview: FLUX.1-dev's keys with 8 double blocks and a 196-wide img_in; the shapes give the config."""
    config = Flux1DiTConfig(in_channels=FLEX_CHANNELS, out_channels=64, depth=8)
    assert condition_kind(config) == FLEX and "Flex.2" in describe_widths(config)
    official = json.loads((KEYS / "flux1_dev_orig.json").read_text())
    flex = {k: v for k, v in official.items() if not any(k.startswith(f"double_blocks.{i}.") for i in range(8, 19))}
    flex["img_in.weight"] = [3072, FLEX_CHANNELS]
    with torch.device("meta"):
        ours = Flux1DiT(config).state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == flex
    derived = config_from_state({k: torch.empty(v, device="meta") for k, v in flex.items()})
    assert (derived.in_channels, derived.out_channels, derived.depth, derived.depth_single_blocks) == (196, 64, 8, 38)


# ------------------------------------------------------------------ the condition
def studio_tokens(pipe, inpaint, mask, control, strength, size) -> torch.Tensor:
    """DiffSynth-Studio's Flex condition as its pipeline builds it: latents of the inpainting image times (1 - the
    mask resized to the latent grid), the mask, the control latents times the strength, on channels, then packed
    `B C (H 2) (W 2) -> B (H W) (C 2 2)` (the noisy latents' 16 channels lead in the DiT's input)."""
    width, height = size
    h, w = height // 8, width // 8
    with torch.no_grad():
        z_inpaint = pipe.vae.encode(pil_to_tensor([inpaint.resize(size, Image.LANCZOS)])).float()
        z_control = pipe.vae.encode(pil_to_tensor([control.resize(size, Image.LANCZOS)])).float() * strength
    grid = torch.from_numpy(np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255)
    grid = grid[None, None]
    stacked = torch.cat([z_inpaint * (1 - grid), grid, z_control], dim=1)  # [1, 33, h, w]
    c = stacked.shape[1]
    return stacked.reshape(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, c * 4)


def test_condition_tokens_follow_diffsynth_studio_and_the_control_stops(flex_pipe):
    """Steps up to int(stop * (steps - 1)) see the control map; later ones see zeros there (stop 0.5 of 4 steps:
    steps 0 and 1). The inpainting image and its mask are seen at every step."""
    inpaint, control, mask = random_image(48, 32, seed=1), random_image(64, 40, seed=2), mask_image(48, 32)
    with DiTInputs(flex_pipe.dit) as seen:
        flex_pipe(
            "a cat",
            flex_inpaint_image=inpaint,
            flex_inpaint_mask=mask,
            flex_control_image=control,
            flex_control_strength=0.7,
            flex_control_stop=0.5,
            seed=0,
            **FAST,
        )
    want = studio_tokens(flex_pipe, inpaint, mask, control, 0.7, (48, 32))
    assert len(seen) == 4 and seen[0].shape == (1, 6, FLEX_CHANNELS)  # the inpainting image gives the size
    for step, tokens in enumerate(seen):
        torch.testing.assert_close(tokens[..., 64 : 196 - 64], want[..., :-64], atol=1e-5, rtol=0)
        if step <= 1:
            torch.testing.assert_close(tokens[..., -64:], want[..., -64:], atol=1e-5, rtol=0)
        else:
            assert torch.count_nonzero(tokens[..., -64:]) == 0


def test_without_inputs_the_condition_is_zeros_and_a_mask_of_ones(flex_pipe):
    with DiTInputs(flex_pipe.dit) as seen:
        out = flex_pipe("a cat", height=32, width=32, seed=0, **FAST)
    assert out.shape == (1, 32, 32, 3)
    condition = seen[0][..., 64:]
    assert torch.count_nonzero(condition[..., :64]) == 0 and torch.count_nonzero(condition[..., -64:]) == 0
    assert torch.equal(condition[..., 64:68], torch.ones_like(condition[..., 64:68]))


def test_control_changes_the_picture(flex_pipe):
    plain = flex_pipe("a cat", height=32, width=32, seed=0, **FAST)
    steered = flex_pipe("a cat", height=32, width=32, seed=0, flex_control_image=random_image(32, 32, 3), **FAST)
    assert np.abs(plain - steered).max() > 1e-4


def test_refusals(flex_pipe, tiny_pipe):
    with pytest.raises(ConfigError, match="need a Flex.2 DiT"):
        tiny_pipe("a cat", flex_control_image=random_image(32, 32), **FAST)
    with pytest.raises(ConfigError, match="flex_inpaint_image and flex_inpaint_mask go together"):
        flex_pipe("a cat", flex_inpaint_image=random_image(32, 32), **FAST)
    with pytest.raises(ConfigError, match=r"flex_control_stop=1.5 must be in \[0, 1\]"):
        flex_pipe("a cat", flex_control_image=random_image(32, 32), flex_control_stop=1.5, **FAST)
    with pytest.raises(ConfigError, match="flex_control_image is one image"):
        flex_pipe("a cat", flex_control_image=[random_image(32, 32)] * 2, **FAST)
    with pytest.raises(ConfigError, match="flux_fill_image / flux_fill_mask need a FLUX.1 Fill DiT"):
        flex_pipe("a cat", flux_fill_image=random_image(32, 32), flux_fill_mask=mask_image(32, 32), **FAST)


@pytest.mark.parametrize("name", ["flex_control_strength", "flex_control_stop"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5"], ids=str)
def test_control_strength_and_stop_must_be_finite_numbers(flex_pipe, name, value):
    """A NaN or infinite strength scaled the control latents into a NaN image; a NaN stop passed the range check."""
    with pytest.raises(ConfigError, match=rf"{name}=.* must be a finite number"):
        flex_pipe("a cat", flex_control_image=random_image(32, 32), height=32, width=32, **{name: value}, **FAST)


def test_cli_maps_inpaint_and_control_flags_to_flex_inputs(flex_repo, tiny_repo, tmp_path, capsys):
    """`--input-image` + `--inpaint-mask` are Flex.2's `flex_inpaint_*` and `--control-image MAP:STRENGTH` its
    `flex_control_*`: the written picture is the pipeline call with those arguments; a plain DiT refuses them."""
    from diffsynth.runtime.cli import main

    random_image(32, 32, seed=3).save(tmp_path / "in.png")
    mask_image(32, 32).save(tmp_path / "mask.png")
    random_image(32, 32, seed=4).save(tmp_path / "depth.png")
    out = tmp_path / "out.png"
    args = ["generate", "--prompt", "a cat", "--seed", "2", "--steps", "2", "--device", "cpu", "--dtype", "float32"]
    args += [
        "--output",
        str(out),
        "--input-image",
        str(tmp_path / "in.png"),
        "--inpaint-mask",
        str(tmp_path / "mask.png"),
    ]
    args += ["--control-image", f"{tmp_path / 'depth.png'}:0.8"]
    assert main([*args, "--model", str(flex_repo)]) == 0
    pipe = our_pipeline(flex_repo)
    with Image.open(tmp_path / "mask.png") as mask:
        want = pipe("a cat", flex_inpaint_image=str(tmp_path / "in.png"), flex_inpaint_mask=mask.convert("L"),
                    flex_control_image=str(tmp_path / "depth.png"), flex_control_strength=0.8, seed=2,
                    num_inference_steps=2, progress_bar=False)  # fmt: skip
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(want))
    assert main([*args[:-2], "--model", str(flex_repo)]) == 0  # no control: the default strength is not asked for
    capsys.readouterr()
    assert main([*args[:-2], "--model", str(tiny_repo)]) == 2
    assert "--inpaint-mask is not used" in capsys.readouterr().err


def test_preset_is_the_single_file_with_flux1_dev_encoders():
    preset = PRESETS["ostris/Flex.2-preview"]
    files = [(f.model_id, f.origin_file_pattern) for f in preset.files]
    assert files[0] == ("ostris/Flex.2-preview", "Flex.2-preview.safetensors")
    assert {m for m, _ in files[1:]} == {"black-forest-labs/FLUX.1-dev"} and len(files) == 4
    assert preset.defaults["num_inference_steps"] == 50 and preset.defaults["embedded_guidance"] == 3.5


def test_training_velocity_is_the_pipeline_call_with_the_empty_condition(flex_repo, flex_pipe):
    """Flex.2 trains on images and prompts (as DiffSynth-Studio does): the task's velocity is the pipeline's per-step
    call with no inpainting image, a mask of ones and no control map."""
    from diffsynth.flux.flux1.flex import FlexInputs, encode_flex
    from diffsynth.flux.training import FluxTrainingTask
    from diffsynth.runtime.pipeline import configs_from_folder

    configs, tokenizer = configs_from_folder(flex_repo)
    task = FluxTrainingTask.from_pretrained(configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu")
    rows = [{"prompt": "a cat", "image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1}]
    batch = task.collate(task.encode(rows))
    noisy = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    empty = encode_flex(flex_pipe, FlexInputs(None, None, None, 0.5, 0.5), noisy, 4, False, 512, 384)
    text = flex_pipe.encode_prompt(["a cat"], task.t5_sequence_length)
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        theirs = flex_pipe.predict(noisy, sigma, text, None, 1.0, 1.0, condition=empty.at(0))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
