"""FLUX.1 ControlNet against diffusers (fp32, CPU, same weights).

- our `Flux1ControlNet` vs `FluxControlNetModel` (union with a mode, single-condition, and the
  alimama inpainting width): residuals max abs <= 1e-5;
- our DiT given ControlNet residuals vs `FluxTransformer2DModel` given the same: <= 1e-5;
- our pipeline with one and with two ControlNets vs `FluxControlNetPipeline` on the tiny hub repo
  with the same initial noise: decoded images max abs <= 1e-4. diffusers samples the control
  image's VAE posterior; ours takes its mean, so the reference is run with the mean too;
- alimama's inpainting condition (masked image latents + packed kept-region mask) vs the same
  computed with diffusers' image/mask processors and VAE.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffsynth_flux_test_helpers import (
    controlnet_config_json,
    controlnet_inputs,
    dit_inputs,
    latent_noise,
    make_controlnet,
    make_dit,
    max_abs,
    our_images,
    our_pipeline,
    random_image,
    reference_components,
    reference_dit,
    reference_dit_output,
    reference_images,
    repo_controlnet_config,
    tiny_controlnet_config,
    tiny_dit_config,
    write_controlnet_folder,
)

pytest.importorskip("diffusers")

from diffsynth.flux.flux1.controlnet import Flux1ControlNet, Flux1ControlNetConfig  # noqa: E402
from diffsynth.flux.flux1.controlnet_formats import ours_to_diffusers  # noqa: E402
from diffsynth.flux.pipeline import ControlNetInput, pack_latents  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
TEXT_LEN = 48


def _reference_net(cfg: Flux1ControlNetConfig):
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_config(controlnet_config_json(cfg)).eval()


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("overrides", [{}, dict(num_modes=None), dict(num_modes=None, guidance_embed=False)])
def test_controlnet_matches_diffusers(overrides):
    cfg = tiny_controlnet_config(**overrides)
    ours = make_controlnet(cfg).eval()
    ref = _reference_net(cfg)
    ref.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    img, img_ids, txt, txt_ids, t, y, g, cond, mode = controlnet_inputs(config=cfg)
    guidance = g if cfg.guidance_embed else None
    with torch.no_grad():
        double, single = ours(img, img_ids, txt, txt_ids, t, y, guidance, cond=cond, mode=mode, scale=0.7)
        want_double, want_single = ref(
            hidden_states=img,
            controlnet_cond=cond,
            controlnet_mode=mode[:, None] if cfg.num_modes else None,
            conditioning_scale=0.7,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance,
            return_dict=False,
        )
    assert len(double) == len(want_double) and len(single) == len(want_single)
    diff = max(max_abs(a, b) for a, b in zip(double + single, [*want_double, *want_single], strict=True))
    assert diff <= 1e-5, diff


def test_inpainting_width_matches_diffusers_with_a_wider_x_embedder():
    """alimama's net is diffusers' model with `controlnet_x_embedder` taking latents + 4 mask features."""
    cfg = tiny_controlnet_config(cond_in_channels=20, num_modes=None, depth_single_blocks=0)
    ours = make_controlnet(cfg).eval()
    ref = _reference_net(cfg)
    ref.controlnet_x_embedder = torch.nn.Linear(20, cfg.hidden_size)
    ref.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    img, img_ids, txt, txt_ids, t, y, g, cond, _ = controlnet_inputs(config=cfg)
    with torch.no_grad():
        double, single = ours(img, img_ids, txt, txt_ids, t, y, g, cond=cond)
        want, want_single = ref(
            hidden_states=img,
            controlnet_cond=cond,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=g,
            return_dict=False,
        )
    assert single == [] and want_single is None
    assert max(max_abs(a, b) for a, b in zip(double, want, strict=True)) <= 1e-5


@pytest.mark.parametrize("counts", [(2, 2), (1, 2), (2, 1), (3, 1)])
def test_dit_with_residuals_matches_diffusers(counts):
    cfg = tiny_dit_config()
    ours = make_dit(cfg).eval()
    ref = reference_dit(cfg, ours)
    args = dit_inputs()
    img, img_ids, txt, txt_ids, t, y, g = args
    gen = torch.Generator().manual_seed(5)
    double, single = ([torch.randn(2, img.shape[1], cfg.hidden_size, generator=gen) for _ in range(n)] for n in counts)
    with torch.no_grad():
        got = ours(*args, controlnet_block_samples=double, controlnet_single_block_samples=single)
        want = reference_dit_output(ref, args, controlnet_block_samples=double, controlnet_single_block_samples=single)
    assert max_abs(got, want) <= 1e-5


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def nets(tiny_configs, tmp_path_factory) -> dict[str, Path]:
    """Tiny hub-style ControlNet folders of the tiny DiT's widths (weights scaled to visibly act)."""
    root = tmp_path_factory.mktemp("flux-controlnets")
    dit = tiny_configs["dit"]
    configs = {
        "union": repo_controlnet_config(dit, num_modes=4),
        "plain": repo_controlnet_config(dit),
        "unguided": repo_controlnet_config(dit, guidance_embed=False, depth=2),
        "inpaint": repo_controlnet_config(dit, cond_in_channels=68, depth_single_blocks=0),
    }
    return {
        name: write_controlnet_folder(root / name, make_controlnet(cfg, seed=i + 3), controlnet_config_json(cfg))
        for i, (name, cfg) in enumerate(configs.items())
    }


@pytest.fixture(scope="module")
def ours(tiny_repo, nets):
    order = ["union", "plain", "unguided", "inpaint"]  # controlnet_id = position
    return our_pipeline(tiny_repo, controlnet=[str(nets[n]) for n in order])


@pytest.fixture(scope="module")
def reference_parts(tiny_repo) -> dict:
    """diffusers' components of the tiny repo, loaded once (a ControlNet pipeline is built per test)."""
    return reference_components(tiny_repo)


def _reference_pipe(parts: dict, controlnet):
    import diffusers

    pipe = diffusers.FluxControlNetPipeline(**parts, controlnet=controlnet).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers encodes the control image with a posterior sample; use the mean as ours does."""
    import diffusers.pipelines.flux.pipeline_flux_controlnet as module

    original = module.retrieve_latents
    monkeypatch.setattr(
        module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": original(out, None, "argmax")
    )


@pytest.mark.parametrize(
    "name, cid, mode, start, end",
    [("union", 0, 2, 0.0, 0.75), ("unguided", 2, None, 0.25, 1.0)],
)
def test_one_controlnet_matches_diffusers(reference_parts, nets, ours, posterior_mean, name, cid, mode, start, end):
    from diffusers import FluxControlNetModel

    ref = _reference_pipe(reference_parts, FluxControlNetModel.from_pretrained(nets[name]))
    image, noise = random_image(40, 40, 1), latent_noise(1, 32, 48)
    size = dict(num_inference_steps=4, height=32, width=48)
    expected = reference_images(
        ref,
        noise,
        TEXT_LEN,
        prompt=PROMPTS[0],
        control_image=image,
        control_mode=mode,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=start,
        control_guidance_end=end,
        guidance_scale=3.5,
        **size,
    )
    control = ControlNetInput(image=image, scale=0.8, start=start, end=end, processor_id=mode, controlnet_id=cid)
    got = our_images(ours, PROMPTS[0], noise, TEXT_LEN, controlnet_inputs=[control], embedded_guidance=3.5, **size)
    plain = our_images(ours, PROMPTS[0], noise, TEXT_LEN, embedded_guidance=3.5, **size)
    assert max_abs(got, plain) > 1e-3  # the control acts
    assert max_abs(got, expected) <= 1e-4


def test_two_controlnets_match_diffusers(reference_parts, nets, ours, posterior_mean):
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    multi = FluxMultiControlNetModel([FluxControlNetModel.from_pretrained(nets[n]) for n in ("union", "plain")])
    ref = _reference_pipe(reference_parts, multi)
    images, noise = [random_image(40, 40, 1), random_image(48, 32, 2)], latent_noise(2, 32, 48, seed=3)
    size = dict(num_inference_steps=4, height=32, width=48)
    expected = reference_images(
        ref,
        noise,
        TEXT_LEN,
        prompt=list(PROMPTS),
        control_image=images,
        control_mode=[1, None],
        controlnet_conditioning_scale=[0.8, 0.6],
        control_guidance_start=[0.0, 0.25],
        control_guidance_end=[1.0, 0.75],
        guidance_scale=3.5,
        **size,
    )
    controls = [
        ControlNetInput(image=images[0], scale=0.8, processor_id="tile", controlnet_id=0),
        ControlNetInput(image=images[1], scale=0.6, start=0.25, end=0.75, controlnet_id=1),
    ]
    got = our_images(ours, PROMPTS, noise, TEXT_LEN, controlnet_inputs=controls, embedded_guidance=3.5, **size)
    assert max_abs(got, expected) <= 1e-4


def test_inpainting_condition_matches_alimamas_recipe(reference_parts, ours):
    """Masked pixels set to -1, VAE posterior mean normalised, mask binarised at 0.5, nearest-resized to
    the latent grid, inverted, appended as a 17th channel and packed: computed here with diffusers'
    processors and VAE."""
    from diffusers.image_processor import VaeImageProcessor

    image, mask = random_image(40, 56, 4), random_image(40, 56, 5).convert("L")
    height, width = 32, 48
    images = VaeImageProcessor(vae_scale_factor=16)
    masks = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    pixels = images.preprocess(image, height=height, width=width)
    repaint = masks.preprocess(mask, height=height, width=width)
    masked = pixels.clone()
    masked[(repaint > 0.5).repeat(1, 3, 1, 1)] = -1
    vae = reference_parts["vae"]
    with torch.no_grad():
        latents = vae.encode(masked).latent_dist.mode()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    keep = 1 - F.interpolate(repaint, size=(height // 8, width // 8))
    want = pack_latents(torch.cat([latents, keep], dim=1))

    control = ControlNetInput(image=image, inpaint_mask=mask, controlnet_id=3)
    (prepared,) = ours.prepare_controls([control], height, width)
    assert prepared.tokens.shape == (1, 6, 68)
    assert max_abs(prepared.tokens, want) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(depth=4, num_modes=None), dict(depth=6, depth_single_blocks=0, num_modes=None, cond_in_channels=68)],
)
def test_full_size_keys_and_shapes_equal_diffusers(overrides):
    """FLUX.1-dev widths on the meta device: InstantX Union (5 + 10 blocks, 10 modes), a single-condition
    net and an inpainting-width net give exactly diffusers' `FluxControlNetModel` keys and shapes."""
    from diffusers import FluxControlNetModel

    cfg = Flux1ControlNetConfig(**overrides)
    with torch.device("meta"):
        ours = ours_to_diffusers(Flux1ControlNet(cfg).state_dict())
        ref = FluxControlNetModel.from_config(controlnet_config_json(cfg))
        if cfg.cond_in_channels != cfg.in_channels:
            ref.controlnet_x_embedder = torch.nn.Linear(cfg.cond_in_channels, cfg.hidden_size)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want
