"""FLUX.1 Canny / Depth against diffusers' FluxControlPipeline (fp32, CPU, same weights, same initial noise).

- a tiny 128-channel DiT repo: our `control_image=` vs `FluxControlPipeline(control_image=...)`;
- a control LoRA loaded onto the tiny FLUX.1-dev repo: ours from BFL names (`pipe.load_lora`) vs diffusers'
  `load_lora_weights` of the same LoRA in diffusers names (which widens `x_embedder`, adds the lora_B biases and
  replaces the QK-norm scales);
- the full-size key set of BFL's control LoRAs: diffusers' own BFL converter accepts it, and our reader gives
  the same targets from its output as from the BFL names.

Decoded images max abs <= 1e-4. diffusers encodes the control image with a posterior sample, ours (as
DiffSynth-Studio) with its mean: the reference runs with the mean too.
"""

from __future__ import annotations

import pytest
import torch
from diffsynth_flux_test_helpers import (
    latent_noise,
    max_abs,
    our_images,
    our_pipeline,
    random_image,
    reference_components,
    reference_images,
)

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.lora import read_flux1_lora
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("diffusers")

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
TEXT_LEN = 48


def reference_pipe(repo):
    import diffusers

    pipe = diffusers.FluxControlPipeline(**reference_components(repo)).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_control_dit_matches_diffusers(tiny_repo, tmp_path, posterior_mean):
    repo = tools.tools_repo(tiny_repo, tmp_path / "canny", tools.CONTROL_CHANNELS, seed=6)
    ref, ours = reference_pipe(repo), our_pipeline(repo)
    edges = random_image(64, 40, seed=5)  # resized to 48x32 on both sides
    noise = latent_noise(2, 32, 48, seed=6)
    size = dict(num_inference_steps=3, height=32, width=48)
    expected = reference_images(
        ref, noise, TEXT_LEN, prompt=list(PROMPTS), control_image=edges, guidance_scale=10.0, **size
    )
    got = our_images(ours, PROMPTS, noise, TEXT_LEN, control_image=edges, embedded_guidance=10.0, **size)
    assert max_abs(got, expected) <= 1e-4


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")  # peft's name matching
def test_control_lora_matches_diffusers(tiny_repo, tmp_path, posterior_mean):
    from safetensors.torch import save_file

    ref, ours = reference_pipe(tiny_repo), our_pipeline(tiny_repo)
    state = tools.control_lora(ours.dit, seed=7)
    path = tmp_path / "flux1-canny-dev-lora.safetensors"
    save_file(state, str(path))
    ours.load_lora(path)
    ref.load_lora_weights(tools.control_lora_to_diffusers(state, hidden=256))
    assert ref.transformer.config.in_channels == ours.dit.config.in_channels == 128
    edges = random_image(48, 32, seed=8)
    noise = latent_noise(1, 32, 48, seed=9)
    size = dict(num_inference_steps=3, height=32, width=48)
    expected = reference_images(
        ref, noise, TEXT_LEN, prompt=PROMPTS[0], control_image=edges, guidance_scale=30.0, **size
    )
    got = our_images(ours, PROMPTS[0], noise, TEXT_LEN, control_image=edges, embedded_guidance=30.0, **size)
    assert max_abs(got, expected) <= 1e-4


def test_full_size_bfl_control_lora_keys_read_like_diffusers_converts_them():
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    with torch.device("meta"):
        dit = Flux1DiT(Flux1DiTConfig())
    bfl = tools.full_size_control_lora(dit, rank=2)  # diffusers halves lora_A of norm_out too: rank >= 2
    converted = _convert_bfl_flux_control_lora_to_diffusers(dict(bfl))  # raises on any key it does not expect
    ours_from_bfl = read_flux1_lora(bfl, dit)
    ours_from_diffusers = read_flux1_lora(converted, dit)
    assert ours_from_bfl.in_channels == ours_from_diffusers.in_channels == 128
    assert ours_from_bfl.norm_scales.keys() == ours_from_diffusers.norm_scales.keys()
    assert ours_from_bfl.targets.keys() == ours_from_diffusers.targets.keys()
    for name, target in ours_from_bfl.targets.items():
        other = ours_from_diffusers.targets[name]
        assert target.diff_b.shape == other.diff_b.shape, name
        # the split parts come back as one LoRA of the summed rank on our fused layer
        assert target.up.shape[0] == other.up.shape[0] and target.down.shape[1] == other.down.shape[1], name
