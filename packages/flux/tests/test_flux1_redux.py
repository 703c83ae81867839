"""FLUX.1 Redux (`flux1/redux.py`, `FluxImagePipeline.load_redux` / `flux_redux_image`).

- the embedder and the Redux-extended prompt embeddings against diffusers' `ReduxImageEncoder` /
  `FluxPriorReduxPipeline` (with the tiny text encoders loaded: its T5 length is fixed at 512), fp32, <= 1e-5;
- end to end: our pipeline with `flux_redux_image` against the prior's output fed to diffusers' `FluxPipeline`
  (without and with true CFG), fp32, max abs <= 1e-4;
- full-size keys/shapes on meta, strict loads, model_configs, refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import latent_noise, our_images, our_pipeline, random_image, reference_components
from safetensors.torch import save_file

from diffsynth.flux.flux1.redux import (
    FLUX_REDUX_SPEC,
    FluxReduxConfig,
    FluxReduxEmbedder,
    check_scales,
    config_from_state,
    load_redux_model,
)
from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.testing.weights import random_weights

TEXT_LEN = 512  # diffusers' FluxPriorReduxPipeline encodes the prompt at 512 T5 tokens, always
SIGLIP = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
SETTINGS = dict(height=32, width=32, num_inference_steps=2)
# flux1-redux-dev.safetensors (header of the released file)
FULL_SIZE = {
    "redux_up.weight": (12288, 1152),
    "redux_up.bias": (12288,),
    "redux_down.weight": (4096, 12288),
    "redux_down.bias": (4096,),
}


def make_embedder(image_dim=32, text_dim=32, seed=0) -> FluxReduxEmbedder:
    return random_weights(FluxReduxEmbedder(FluxReduxConfig(image_dim, text_dim)), seed, scale=0.2).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A tiny SigLIP vision tower folder and a Redux embedder file for the tiny DiT (T5 width 32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("redux")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).save_pretrained(root / "siglip")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**SIGLIP, projection_dim=16)).save_pretrained(root / "clip")
    embedder = make_embedder(seed=3)
    save_file(embedder.state_dict(), str(root / "flux1-redux-dev.safetensors"))
    wide = make_embedder(text_dim=64, seed=4)
    save_file(wide.state_dict(), str(root / "wide.safetensors"))
    return {
        "siglip": root / "siglip",
        "clip": root / "clip",
        "redux": root / "flux1-redux-dev.safetensors",
        "wide": root / "wide.safetensors",
        "embedder": embedder,
    }


@pytest.fixture(scope="module")
def pipe(tiny_repo, files):
    pipe = our_pipeline(tiny_repo)
    pipe.load_redux(str(files["redux"]), image_encoder=str(files["siglip"]))
    return pipe


def _run(pipe, **kwargs):
    return our_images(pipe, "a red circle", latent_noise(1, 32, 32), TEXT_LEN, **{**SETTINGS, **kwargs})


# ----------------------------------------------------------------------------------------- the embedder
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="image_dim"):
        FluxReduxConfig(image_dim=0)
    with pytest.raises(ValueError, match="text_dim"):
        FluxReduxConfig(text_dim=True)


def test_full_size_keys_and_shapes_equal_the_released_file():
    with torch.device("meta"):
        embedder = FluxReduxEmbedder()
    assert {k: tuple(v.shape) for k, v in embedder.state_dict().items()} == FULL_SIZE
    meta = {k: torch.empty(v, device="meta") for k, v in FULL_SIZE.items()}
    assert FLUX_REDUX_SPEC.match(meta) is not None
    assert config_from_state(meta) == FluxReduxConfig()


def test_file_round_trips_strictly_and_a_missing_key_is_named(files, tmp_path):
    loaded = load_redux_model(str(files["redux"]))
    for key, value in files["embedder"].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    state = dict(files["embedder"].state_dict())
    del state["redux_down.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(DiffSynthError, match=r"redux_down\.bias"):
        load_redux_model(str(tmp_path / "broken.safetensors"))


@pytest.mark.parity
def test_embedder_matches_diffusers():
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    ours = make_embedder(image_dim=24, text_dim=16, seed=5)
    theirs = ReduxImageEncoder(redux_dim=24, txt_in_features=16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).image_embeds).abs().max().item()
    print(f"Redux embedder vs diffusers: max abs diff {diff:.3g}")
    assert diff <= 1e-6


# ----------------------------------------------------------------------------------------- against diffusers
@pytest.fixture(scope="module")
def prior(tiny_repo, files):
    """diffusers' FluxPriorReduxPipeline on the same tiny SigLIP, Redux weights and text encoders."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    embedder = ReduxImageEncoder(redux_dim=32, txt_in_features=32)
    embedder.load_state_dict(files["embedder"].state_dict())
    parts = reference_components(tiny_repo)
    text = {k: parts[k] for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    return FluxPriorReduxPipeline(
        image_encoder=SiglipVisionModel.from_pretrained(files["siglip"]),
        feature_extractor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        image_embedder=embedder,
        **text,
    ).to(torch.float32)


IMAGES = [random_image(40, 28, 1), random_image(24, 50, 2)]


@pytest.mark.parity
@pytest.mark.parametrize(
    "n_images, scale, pooled_scale", [(1, 1.0, 1.0), (2, [0.6, 0.3], [0.5, 0.2])], ids=["one", "two-scaled"]
)
def test_prompt_embeddings_match_diffusers_prior(pipe, prior, n_images, scale, pooled_scale):
    images = IMAGES[:n_images]
    want = prior(
        images if n_images > 1 else images[0],
        prompt="a red circle",
        prompt_embeds_scale=scale,
        pooled_prompt_embeds_scale=pooled_scale,
    )
    with torch.no_grad():
        text = pipe.encode_prompt(["a red circle"], TEXT_LEN)
        got = pipe.prepare_redux(text, *pipe.check_redux_inputs(images, scale, pooled_scale))
    assert got.t5.shape == (1, TEXT_LEN + 16, 32)  # 16 image tokens: (32 / 8) ** 2 patches
    diff = max(
        (got.t5 - want.prompt_embeds).abs().max().item(),
        (got.pooled - want.pooled_prompt_embeds).abs().max().item(),
    )
    print(f"Redux prompt embeddings vs FluxPriorReduxPipeline ({n_images} image(s)): max abs diff {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_pipeline_matches_diffusers_prior_then_flux_pipeline(pipe, prior, tiny_repo, cfg_scale):
    """The prior's embeddings fed to FluxPipeline; with true CFG the negative prompt has no Redux tokens there
    (FluxPipeline encodes it itself), which our negative branch reproduces."""
    import diffusers

    from diffsynth.flux.pipeline import pack_latents

    image = IMAGES[0]
    prior_out = prior(image, prompt="a red circle", prompt_embeds_scale=0.8)
    reference = diffusers.FluxPipeline(**reference_components(tiny_repo)).to(torch.float32)
    reference.set_progress_bar_config(disable=True)
    negative = {"negative_prompt": "blurry"} if cfg_scale != 1.0 else {}
    want = reference(
        prompt_embeds=prior_out.prompt_embeds,
        pooled_prompt_embeds=prior_out.pooled_prompt_embeds,
        latents=pack_latents(latent_noise(1, 32, 32)),
        max_sequence_length=TEXT_LEN,
        true_cfg_scale=cfg_scale,
        guidance_scale=3.5,
        output_type="np",
        **SETTINGS,
        **negative,
    ).images
    got = _run(pipe, flux_redux_image=image, flux_redux_scale=0.8, cfg_scale=cfg_scale, **negative)
    plain = _run(pipe, cfg_scale=cfg_scale, **negative)
    diff = float(np.abs(got - want).max())
    print(f"Redux pipeline vs prior + FluxPipeline (cfg {cfg_scale}): max abs diff {diff:.3g}")
    assert float(np.abs(got - plain).max()) > 1e-3  # the image tokens do act
    assert diff <= 1e-4


# ----------------------------------------------------------------------------------------- loading, refusals
def test_model_configs_load_redux_as_diffsynth_studio_lists_it(tiny_repo, files, pipe):
    """`from_pretrained(model_configs=[..., Redux embedder, SigLIP encoder])` in any order equals `load_redux`."""
    from diffsynth.flux.pipeline import FluxImagePipeline
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.pipeline import configs_from_folder

    found, _ = configs_from_folder(tiny_repo)
    tokenizers = {f"tokenizer_{i}_config": ModelConfig(path=str(tiny_repo / name))
                  for i, name in ((1, "tokenizer"), (2, "tokenizer_2"))}  # fmt: skip
    listed = FluxImagePipeline.from_pretrained(
        model_configs=[ModelConfig(path=str(files["redux"])), *found, ModelConfig(path=str(files["siglip"]))],
        torch_dtype="float32",
        device="cpu",
        **tokenizers,
    )
    assert listed.flux_redux.config == FluxReduxConfig(32, 32) and listed.flux_redux_image_encoder.kind == "siglip"
    inputs = {"flux_redux_image": IMAGES[1], "flux_redux_scale": 0.7, "num_inference_steps": 1}
    assert np.array_equal(_run(listed, **inputs), _run(pipe, **inputs))


def test_images_without_redux_are_refused(tiny_pipe):
    with pytest.raises(ConfigError, match=r"no Redux model is loaded: use pipe\.load_redux"):
        _run(tiny_pipe, flux_redux_image=IMAGES[0])


def test_bad_scales_are_refused(pipe):
    with pytest.raises(ConfigError, match="flux_redux_scale has 1 values for 2"):
        _run(pipe, flux_redux_image=IMAGES, flux_redux_scale=[0.5])
    with pytest.raises(ConfigError, match="flux_redux_pooled_scale='high' must be a finite number"):
        _run(pipe, flux_redux_image=IMAGES[0], flux_redux_pooled_scale="high")


def test_scales_must_be_finite_numbers_named_per_item():
    """NaN / inf scales would make the Redux tokens, so the whole image, NaN; numpy scalars are numbers."""
    with pytest.raises(ConfigError, match="flux_redux_scale=nan must be a finite number"):
        check_scales(float("nan"), 2, "flux_redux_scale")
    with pytest.raises(ConfigError, match=r"flux_redux_pooled_scale\[1\]=inf must be a finite number"):
        check_scales([0.5, float("inf")], 2, "flux_redux_pooled_scale")
    assert check_scales(np.float32(0.5), 2, "flux_redux_scale") == [0.5, 0.5]
    assert check_scales([np.float64(0.25), 1], 2, "flux_redux_scale") == [0.25, 1.0]


def test_wrong_sources_are_refused_with_what_is_accepted(tiny_pipe, files):
    with pytest.raises(ConfigError, match="known repos .*FLUX.1-Redux-dev"):
        tiny_pipe.load_redux("nobody/some-redux")
    with pytest.raises(ConfigError, match="trained with SigLIP"):
        tiny_pipe.load_redux(str(files["redux"]), image_encoder=str(files["clip"]))
    with pytest.raises(ConfigError, match="64-wide tokens; the DiT reads 32-wide"):
        tiny_pipe.load_redux(str(files["wide"]), image_encoder=str(files["siglip"]))
    with pytest.raises(DiffSynthError, match="redux_up.weight"):  # names what a Redux file has
        tiny_pipe.load_redux(str(files["siglip"] / "model.safetensors"), image_encoder=str(files["siglip"]))
    assert tiny_pipe.flux_redux is None
