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

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from diffsynth.flux.flux1.controlnet import Flux1ControlNet, Flux1ControlNetConfig  # noqa: E402
from diffsynth.flux.flux1.controlnet_formats import ours_to_diffusers  # noqa: E402
from diffsynth.flux.flux1.formats import ours_to_diffusers as dit_to_diffusers  # noqa: E402
from diffsynth.flux.pipeline import ControlNetInput, FluxImagePipeline, pack_latents  # noqa: E402

pytestmark = pytest.mark.parity
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
TEXT_LEN = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead (seconds per call on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"flux1_parity_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _load("test_flux1_dit")
C = _load("test_controlnet")


def _max_abs(got, want) -> float:
    got, want = (x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in (got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max())


def _reference_net(cfg: Flux1ControlNetConfig):
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_config(C._config_json(cfg)).eval()


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("overrides", [{}, dict(num_modes=None), dict(num_modes=None, guidance_embed=False)])
def test_controlnet_matches_diffusers(overrides):
    cfg = C.tiny_config(**overrides)
    ours = C.make_model(cfg).eval()
    ref = _reference_net(cfg)
    ref.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    img, img_ids, txt, txt_ids, t, y, g, cond, mode = C.inputs(config=cfg)
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
    diff = max(_max_abs(a, b) for a, b in zip(double + single, [*want_double, *want_single], strict=True))
    assert diff <= 1e-5, diff


def test_inpainting_width_matches_diffusers_with_a_wider_x_embedder():
    """alimama's net is diffusers' model with `controlnet_x_embedder` taking latents + 4 mask features."""
    cfg = C.tiny_config(cond_in_channels=20, num_modes=None, depth_single_blocks=0)
    ours = C.make_model(cfg).eval()
    ref = _reference_net(cfg)
    ref.controlnet_x_embedder = torch.nn.Linear(20, cfg.hidden_size)
    ref.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    img, img_ids, txt, txt_ids, t, y, g, cond, _ = C.inputs(config=cfg)
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
    assert max(_max_abs(a, b) for a, b in zip(double, want, strict=True)) <= 1e-5


@pytest.mark.parametrize("counts", [(2, 2), (1, 2), (2, 1), (3, 1)])
def test_dit_with_residuals_matches_diffusers(counts):
    from diffusers import FluxTransformer2DModel

    cfg = T.tiny_config()
    ours = T.make_model(cfg).eval()
    ref = FluxTransformer2DModel(
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=True,
        axes_dims_rope=cfg.axes_dim,
    ).eval()
    ref.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    args = T.inputs()
    img, img_ids, txt, txt_ids, t, y, g = args
    gen = torch.Generator().manual_seed(5)
    double, single = ([torch.randn(2, img.shape[1], cfg.hidden_size, generator=gen) for _ in range(n)] for n in counts)
    with torch.no_grad():
        got = ours(*args, controlnet_block_samples=double, controlnet_single_block_samples=single)
        want = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=g,
            controlnet_block_samples=double,
            controlnet_single_block_samples=single,
            return_dict=False,
        )[0]
    assert _max_abs(got, want) <= 1e-5


# ------------------------------------------------------------------ the pipeline
def _net_config(tiny_configs, **overrides) -> Flux1ControlNetConfig:
    dit = tiny_configs["dit"]
    fields = dict(
        in_channels=64,
        vec_in_dim=dit["pooled_projection_dim"],
        context_in_dim=dit["joint_attention_dim"],
        hidden_size=dit["attention_head_dim"] * dit["num_attention_heads"],
        num_heads=dit["num_attention_heads"],
        depth=1,
        depth_single_blocks=1,
        num_modes=None,
    )
    return Flux1ControlNetConfig(**{**fields, **overrides})


def _write(folder: Path, model: Flux1ControlNet) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ours_to_diffusers(model.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(C._config_json(model.config)))
    return folder


@pytest.fixture(scope="module")
def nets(tiny_configs, tmp_path_factory) -> dict[str, Path]:
    """Tiny hub-style ControlNet folders of the tiny DiT's widths (weights scaled to visibly act)."""
    root = tmp_path_factory.mktemp("flux-controlnets")
    configs = {
        "union": _net_config(tiny_configs, num_modes=4),
        "plain": _net_config(tiny_configs),
        "unguided": _net_config(tiny_configs, guidance_embed=False, depth=2),
        "inpaint": _net_config(tiny_configs, cond_in_channels=68, depth_single_blocks=0),
    }
    return {name: _write(root / name, C.make_model(cfg, seed=i + 3)) for i, (name, cfg) in enumerate(configs.items())}


@pytest.fixture(scope="module")
def ours(tiny_repo, nets):
    order = ["union", "plain", "unguided", "inpaint"]  # controlnet_id = position
    return FluxImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=[str(nets[n]) for n in order]
    )


@pytest.fixture(scope="module")
def reference_parts(tiny_repo) -> dict:
    """diffusers' components of the tiny repo, loaded once (a ControlNet pipeline is built per test)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    repo = tiny_repo
    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(repo / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(repo / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(repo / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(repo / "tokenizer_2"),
        transformer=diffusers.FluxTransformer2DModel.from_pretrained(repo / "transformer"),
    )


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


def _image(seed, size=(40, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _noise(batch, height, width, seed=11):
    return torch.randn((batch, 16, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(seed))


@pytest.mark.parametrize(
    "name, cid, mode, start, end",
    [("union", 0, 2, 0.0, 0.75), ("unguided", 2, None, 0.25, 1.0)],
)
def test_one_controlnet_matches_diffusers(reference_parts, nets, ours, posterior_mean, name, cid, mode, start, end):
    from diffusers import FluxControlNetModel

    ref = _reference_pipe(reference_parts, FluxControlNetModel.from_pretrained(nets[name]))
    image, noise = _image(1), _noise(1, 32, 48)
    expected = ref(
        PROMPTS[0],
        control_image=image,
        control_mode=mode,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=start,
        control_guidance_end=end,
        guidance_scale=3.5,
        num_inference_steps=4,
        height=32,
        width=48,
        latents=pack_latents(noise.clone()),
        max_sequence_length=TEXT_LEN,
        output_type="np",
    ).images
    control = ControlNetInput(image=image, scale=0.8, start=start, end=end, processor_id=mode, controlnet_id=cid)
    got = ours(
        PROMPTS[0],
        controlnet_inputs=[control],
        embedded_guidance=3.5,
        num_inference_steps=4,
        height=32,
        width=48,
        latents=noise.clone(),
        t5_sequence_length=TEXT_LEN,
        output_type="np",
        progress_bar=False,
    )
    plain = ours(
        PROMPTS[0],
        embedded_guidance=3.5,
        num_inference_steps=4,
        height=32,
        width=48,
        latents=noise.clone(),
        t5_sequence_length=TEXT_LEN,
        output_type="np",
        progress_bar=False,
    )
    assert _max_abs(got, plain) > 1e-3  # the control acts
    assert _max_abs(got, expected) <= 1e-4


def test_two_controlnets_match_diffusers(reference_parts, nets, ours, posterior_mean):
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    multi = FluxMultiControlNetModel([FluxControlNetModel.from_pretrained(nets[n]) for n in ("union", "plain")])
    ref = _reference_pipe(reference_parts, multi)
    images, noise = [_image(1), _image(2, (48, 32))], _noise(2, 32, 48, seed=3)
    expected = ref(
        list(PROMPTS),
        control_image=images,
        control_mode=[1, None],
        controlnet_conditioning_scale=[0.8, 0.6],
        control_guidance_start=[0.0, 0.25],
        control_guidance_end=[1.0, 0.75],
        guidance_scale=3.5,
        num_inference_steps=4,
        height=32,
        width=48,
        latents=pack_latents(noise.clone()),
        max_sequence_length=TEXT_LEN,
        output_type="np",
    ).images
    controls = [
        ControlNetInput(image=images[0], scale=0.8, processor_id="tile", controlnet_id=0),
        ControlNetInput(image=images[1], scale=0.6, start=0.25, end=0.75, controlnet_id=1),
    ]
    got = ours(
        PROMPTS,
        controlnet_inputs=controls,
        embedded_guidance=3.5,
        num_inference_steps=4,
        height=32,
        width=48,
        latents=noise.clone(),
        t5_sequence_length=TEXT_LEN,
        output_type="np",
        progress_bar=False,
    )
    assert _max_abs(got, expected) <= 1e-4


def test_inpainting_condition_matches_alimamas_recipe(reference_parts, ours):
    """Masked pixels set to -1, VAE posterior mean normalised, mask binarised at 0.5, nearest-resized to
    the latent grid, inverted, appended as a 17th channel and packed: computed here with diffusers'
    processors and VAE."""
    from diffusers.image_processor import VaeImageProcessor

    image, mask = _image(4, (40, 56)), _image(5, (40, 56)).convert("L")
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
    assert _max_abs(prepared.tokens, want) <= 1e-5


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
        ref = FluxControlNetModel.from_config(C._config_json(cfg))
        if cfg.cond_in_channels != cfg.in_channels:
            ref.controlnet_x_embedder = torch.nn.Linear(cfg.cond_in_channels, cfg.hidden_size)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want
