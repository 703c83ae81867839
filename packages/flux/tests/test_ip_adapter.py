"""FLUX.1 IP-Adapters (`flux1/ip_adapter.py`): InstantX and XLabs formats, the DiT wiring and the pipeline.

- InstantX: our DiT + adapter against diffusers' `FluxTransformer2DModel` with a test-side attention
  processor written from InstantX's `IPAFluxAttnProcessor2_0` equations (fp32, tiny sizes);
- XLabs: the whole pipeline against diffusers' `FluxPipeline.load_ip_adapter` on the tiny hub folder
  (a tiny random CLIP vision tower as image encoder), fp32, max abs <= 1e-4;
- invariants: scale 0 is exactly the plain DiT, state-dict round trips, full-size keys/shapes on meta.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffsynth_flux_test_helpers import (
    check_pipeline_first_block_cache,
    dit_inputs,
    latent_noise,
    make_dit,
    our_images,
    our_pipeline,
    random_image,
    reference_components,
    reference_dit,
    reference_dit_output,
    reference_images,
    tiny_dit_config,
)
from safetensors.torch import save_file

from diffsynth.flux.flux1.ip_adapter import (
    INSTANTX,
    XLABS,
    FluxIPAdapter,
    FluxIPAdapterConfig,
    config_from_state,
    load_ip_adapter_model,
    ours_to_xlabs,
    preprocess,
    xlabs_to_ours,
)
from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"
TEXT_LEN = 16


def tiny_adapter_config(**overrides) -> FluxIPAdapterConfig:
    """InstantX-format adapter for `tiny_dit_config()` (width 32, 2 + 2 blocks, T5 width 32)."""
    fields = dict(format=INSTANTX, image_embed_dim=8, context_dim=32, num_tokens=3, hidden_size=32)
    return FluxIPAdapterConfig(**{**fields, "double_blocks": 2, "single_blocks": 2, **overrides})


def make_adapter(config: FluxIPAdapterConfig, seed: int = 0) -> FluxIPAdapter:
    return random_weights(FluxIPAdapter(config), seed, scale=0.3, is_norm=lambda n, p: n.endswith("norm.weight")).eval()


def _instantx_file(adapter: FluxIPAdapter, path: Path) -> Path:
    """Our state dict saved as InstantX does: a pickle of {"image_proj": {...}, "ip_adapter": {...}}."""
    groups = {"image_proj": {}, "ip_adapter": {}}
    for key, value in adapter.state_dict().items():
        group, rest = key.split(".", 1)
        groups[group][rest] = value.clone()
    torch.save(groups, path)
    return path


# ----------------------------------------------------------------------------------------- config, formats
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="format"):
        FluxIPAdapterConfig(format="h94")
    with pytest.raises(ValueError, match="num_tokens"):
        FluxIPAdapterConfig(num_tokens=0)
    with pytest.raises(ValueError, match="single_blocks"):
        FluxIPAdapterConfig(format=XLABS, single_blocks=3)


def test_full_size_instantx_keys_and_shapes_equal_the_released_file():
    """`ip_adapter_flux1_dev_instantx.json` lists `ip-adapter.bin` flattened to `group.key` (see its `_source`)."""
    data = json.loads((KEYS / "ip_adapter_flux1_dev_instantx.json").read_text())
    expected = {k: tuple(v) for k, v in data["keys"].items()}
    with torch.device("meta"):
        adapter = FluxIPAdapter(FluxIPAdapterConfig())
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == expected
    meta = {k: torch.empty(v, device="meta") for k, v in expected.items()}
    assert config_from_state(meta) == FluxIPAdapterConfig()
    assert config_from_state(meta, {"double_blocks": 10}).single_blocks == 47


def test_full_size_xlabs_keys_convert_both_ways():
    """XLabs flux-ip-adapter: 19 double-block layers with biases, 4 tokens from CLIP-L's 768-wide embeds."""
    cfg = FluxIPAdapterConfig(XLABS, 768, 4096, 4, 3072, 19, 0)
    with torch.device("meta"):
        ours = FluxIPAdapter(cfg).state_dict()
    theirs = ours_to_xlabs(ours)
    assert theirs["ip_adapter_proj_model.proj.weight"].shape == (4 * 4096, 768)
    assert theirs["double_blocks.18.processor.ip_adapter_double_stream_v_proj.bias"].shape == (3072,)
    assert len(theirs) == 4 + 19 * 4
    assert set(xlabs_to_ours(theirs)) == set(ours)
    assert config_from_state(xlabs_to_ours(theirs)) == cfg
    with pytest.raises(KeyError, match="double_blocks.0.processor.other"):
        xlabs_to_ours({"double_blocks.0.processor.other.weight": torch.zeros(1)})


def test_instantx_file_round_trips_strictly(tmp_path):
    adapter = make_adapter(tiny_adapter_config(), seed=1)
    loaded = load_ip_adapter_model(str(_instantx_file(adapter, tmp_path / "ip-adapter.bin")), double_blocks=2)
    assert loaded.config == adapter.config
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_xlabs_file_round_trips_strictly(tmp_path):
    adapter = make_adapter(tiny_adapter_config(format=XLABS, single_blocks=0), seed=2)
    save_file(ours_to_xlabs(adapter.state_dict()), str(tmp_path / "ip_adapter.safetensors"))
    loaded = load_ip_adapter_model(str(tmp_path / "ip_adapter.safetensors"))
    assert loaded.config == adapter.config
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_file_missing_a_layer_names_the_key(tmp_path):
    adapter = make_adapter(tiny_adapter_config(), seed=1)
    path = _instantx_file(adapter, tmp_path / "ip-adapter.bin")
    groups = torch.load(path, weights_only=True)
    del groups["ip_adapter"]["2.to_v_ip.weight"]
    torch.save(groups, path)
    with pytest.raises(DiffSynthError, match=r"ip_adapter\.2\.to_v_ip\.weight"):
        load_ip_adapter_model(str(path), double_blocks=2)
    torch.save({"image_proj": groups["image_proj"]}, path)
    with pytest.raises(DiffSynthError, match=r"ip_adapter\.0\.to_k_ip\.weight"):
        load_ip_adapter_model(str(path), double_blocks=2)


# ----------------------------------------------------------------------------------------- the DiT
class InstantXReference:
    """A diffusers attention processor written from InstantX's `IPAFluxAttnProcessor2_0` equations.

    The IP keys/values come straight from the adapter's weights and the test-side image tokens; the
    (unroped, QK-normed) queries of the block attend to them and `scale` times the result is added
    to the image part of the attention output before `to_out` (double blocks), or to the whole
    `[text, image]` output (single blocks).
    """

    def __init__(self, tokens, to_k, to_v, scale):
        self.tokens, self.to_k, self.to_v, self.scale = tokens, to_k, to_v, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        b, heads = hidden_states.shape[0], attn.heads

        def split(x):  # [B, L, H * D] -> [B, H, L, D]
            return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q = attn.norm_q(split(attn.to_q(hidden_states)))
        k = attn.norm_k(split(attn.to_k(hidden_states)))
        v = split(attn.to_v(hidden_states))
        tokens = self.tokens.expand(b, -1, -1)
        ip_k = split(tokens @ self.to_k.T)
        ip_k = ip_k * torch.rsqrt(ip_k.pow(2).mean(-1, keepdim=True) + 1e-5)
        ip_v = split(tokens @ self.to_v.T)
        ip = F.scaled_dot_product_attention(q, ip_k, ip_v).transpose(1, 2).flatten(2)
        n_txt = 0
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states))), q], dim=2)
            k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states))), k], dim=2)
            v = torch.cat([split(attn.add_v_proj(encoder_hidden_states)), v], dim=2)
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out + self.scale * ip
        img = out[:, n_txt:] + self.scale * ip
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(out[:, :n_txt])


def _instantx_tokens(adapter: FluxIPAdapter, embeds: torch.Tensor) -> torch.Tensor:
    """InstantX's MLPProjModel, test side: Linear, exact GELU, Linear, reshape to tokens, LayerNorm."""
    s = adapter.state_dict()
    n, ctx = adapter.config.num_tokens, adapter.config.context_dim
    x = F.gelu(embeds @ s["image_proj.proj.0.weight"].T + s["image_proj.proj.0.bias"])
    x = (x @ s["image_proj.proj.2.weight"].T + s["image_proj.proj.2.bias"]).reshape(-1, n, ctx)
    x = F.layer_norm(x, (ctx,), s["image_proj.norm.weight"], s["image_proj.norm.bias"], eps=1e-5)
    return x.reshape(1, -1, ctx)  # several images: their tokens side by side


@pytest.mark.parity
@pytest.mark.parametrize("n_images", [1, 2])
def test_instantx_dit_matches_the_reference_equations(n_images):
    pytest.importorskip("diffusers")
    cfg = tiny_dit_config()
    ours = make_dit(cfg, seed=3).eval()
    adapter = make_adapter(tiny_adapter_config(), seed=4)
    embeds = torch.randn(n_images, 8, generator=torch.Generator().manual_seed(5))
    scale = 0.7
    reference = reference_dit(cfg, ours)
    tokens = _instantx_tokens(adapter, embeds)
    s = adapter.state_dict()
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(cfg.depth)]
    names += [f"single_transformer_blocks.{i}.attn.processor" for i in range(cfg.depth_single_blocks)]
    reference.set_attn_processor(
        {
            name: InstantXReference(
                tokens, s[f"ip_adapter.{i}.to_k_ip.weight"], s[f"ip_adapter.{i}.to_v_ip.weight"], scale
            )
            for i, name in enumerate(names)
        }
    )
    img, img_ids, txt, txt_ids, t, y, g = dit_inputs(batch=2, grid=(3, 4), txt_len=5, seed=6, config=cfg)
    with torch.no_grad():
        kv = adapter(embeds, cfg.num_heads, scale)
        got = ours(img, img_ids, txt, txt_ids, t, y, g, ip_adapter=kv)
        plain = ours(img, img_ids, txt, txt_ids, t, y, g)
        want = reference_dit_output(reference, (img, img_ids, txt, txt_ids, t, y, g))
    diff = (got - want).abs().max().item()
    print(f"InstantX DiT parity ({n_images} image(s)): max abs diff {diff:.3g}")
    assert (got - plain).abs().max().item() > 1e-2  # the adapter does act
    assert diff <= 1e-5


def test_scale_zero_is_exactly_the_plain_dit():
    cfg = tiny_dit_config()
    ours = make_dit(cfg, seed=3).eval()
    args = dit_inputs(batch=2, grid=(3, 4), txt_len=5, seed=6, config=cfg)
    embeds = torch.randn(1, 8, generator=torch.Generator().manual_seed(5))
    for adapter_cfg in (tiny_adapter_config(), tiny_adapter_config(format=XLABS, single_blocks=0)):
        adapter = make_adapter(adapter_cfg, seed=4)
        with torch.no_grad():
            plain = ours(*args)
            zero = ours(*args, ip_adapter=adapter(embeds, cfg.num_heads, 0.0))
            some = ours(*args, ip_adapter=adapter(embeds, cfg.num_heads, 0.5))
        assert torch.equal(zero, plain)
        assert (some - plain).abs().max().item() > 1e-3


def test_dit_refuses_keys_for_other_blocks():
    cfg = tiny_dit_config()
    ours = make_dit(cfg, seed=3).eval()
    adapter = make_adapter(tiny_adapter_config(double_blocks=1, single_blocks=3), seed=4)
    kv = adapter(torch.randn(1, 8), cfg.num_heads, 1.0)
    with pytest.raises(ValueError, match="1 double \\+ 3 single"):
        ours(*dit_inputs(config=cfg), ip_adapter=kv)


# ----------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parity
def test_preprocessing_matches_the_transformers_processors():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    images = [_image(1, (50, 30)), _image(2, (24, 41))]
    siglip = SiglipImageProcessorPil(size={"height": 32, "width": 32})(images, return_tensors="pt").pixel_values
    clip = CLIPImageProcessorPil(size=32, crop_size=32)(images, return_tensors="pt").pixel_values
    for ours, theirs in ((preprocess(images, "siglip", 32), siglip), (preprocess(images, "clip", 32), clip)):
        diff = (ours - theirs).abs().max().item()
        print(f"preprocess vs transformers: max abs diff {diff:.3g}")
        assert ours.shape == theirs.shape and diff <= 1e-5


# ----------------------------------------------------------------------------------------- the pipeline
CLIP_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("ip-encoders")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION, projection_dim=16)).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**CLIP_VISION)).save_pretrained(root / "siglip")
    return {"clip": root / "clip", "siglip": root / "siglip"}


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return our_pipeline(tiny_repo)


SETTINGS = dict(height=32, width=32, num_inference_steps=2)


def _image(seed, size=(40, 40)):
    return random_image(*size, seed)


def _run(pipe, **kwargs):
    return our_images(pipe, "a red circle", latent_noise(1, 32, 32), TEXT_LEN, **{**SETTINGS, **kwargs})


def test_images_without_an_adapter_are_refused(tiny_repo):
    fresh = our_pipeline(tiny_repo)
    with pytest.raises(ConfigError, match="no IP-Adapter is loaded"):
        _run(fresh, ipadapter_images=[_image(0)])


def test_unknown_sources_are_refused_with_what_is_accepted(pipe, tmp_path):
    with pytest.raises(ConfigError, match="known repos"):
        pipe.load_ip_adapter("nobody/some-adapter")
    with pytest.raises(ConfigError, match="ModelConfig"):
        pipe.load_ip_adapter(3)
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DiffSynthError, match="image_proj.proj.0.weight"):  # names what an adapter file has
        pipe.load_ip_adapter(str(tmp_path / "other.safetensors"))


def test_instantx_pipeline_runs_and_scale_zero_changes_nothing(pipe, encoders, tmp_path):
    dit_cfg = pipe.dit.config
    cfg = tiny_adapter_config(
        image_embed_dim=32,
        hidden_size=dit_cfg.hidden_size,
        double_blocks=dit_cfg.depth,
        single_blocks=dit_cfg.depth_single_blocks,
    )
    path = _instantx_file(make_adapter(cfg, seed=7), tmp_path / "ip-adapter.bin")
    pipe.load_ip_adapter(str(path), image_encoder=str(encoders["siglip"]))
    assert pipe.ipadapter.config == cfg and pipe.ipadapter_image_encoder.kind == "siglip"
    plain = _run(pipe)
    zero = _run(pipe, ipadapter_images=[_image(3)], ipadapter_scale=0.0)
    some = _run(pipe, ipadapter_images=[_image(3), _image(4, (20, 50))], ipadapter_scale=0.8)
    assert np.array_equal(zero, plain)
    assert np.abs(some - plain).max() > 1e-3

    # true CFG: the negative branch gets the tokens of zero image features (DiffSynth-Studio), and the
    # batched evaluation of both branches equals running them one after the other
    from diffsynth.flux.pipeline import flux_velocity

    positive, negative = pipe.prepare_ip_adapter([_image(3)], 0.8, use_cfg=True)
    with torch.no_grad():
        zeros = pipe.ipadapter(torch.zeros(1, 32), pipe.dit.config.num_heads, 0.8)
        for (k, v), (k0, v0) in zip(negative.double + negative.single, zeros.double + zeros.single, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        text, negative_text = pipe.encode_prompt(["a red circle"], TEXT_LEN), pipe.encode_prompt(["blurry"], TEXT_LEN)
        x, sigma = latent_noise(1, 32, 32), torch.tensor(0.6)
        batched = pipe.predict(x, sigma, text, negative_text, 2.0, 3.5, ip_adapter=(positive, negative))
        one = flux_velocity(pipe.dit, x, sigma[None], text, 3.5, ip_adapter=positive)
        other = flux_velocity(pipe.dit, x, sigma[None], negative_text, 3.5, ip_adapter=negative)
    assert (batched - pipe.guide(one, other, 2.0)).abs().max().item() <= 1e-5
    assert (one - other).abs().max().item() > 1e-3


def test_ipadapter_scale_must_be_a_finite_number(pipe, encoders, tmp_path):
    """NaN / inf would make every IP key and value, so the whole image, NaN; a numpy scalar is a number."""
    d = pipe.dit.config
    cfg = tiny_adapter_config(
        image_embed_dim=32, hidden_size=d.hidden_size, double_blocks=d.depth, single_blocks=d.depth_single_blocks
    )
    path = _instantx_file(make_adapter(cfg, seed=7), tmp_path / "ip-adapter.bin")
    pipe.load_ip_adapter(str(path), image_encoder=str(encoders["siglip"]))
    for scale in (float("nan"), float("inf"), "0.8"):
        with pytest.raises(ConfigError, match=f"ipadapter_scale={scale!r} must be a finite number"):
            pipe.check_ip_adapter_inputs([_image(3)], scale)
    assert len(pipe.check_ip_adapter_inputs([_image(3)], np.float32(0.8))) == 1


def test_first_block_cache_with_an_ip_adapter(pipe, encoders, tmp_path, one_thread):
    """The adapter's keys/values reach the first block; with true CFG (zero-image keys on the negative
    branch) both branches run as one batch, one DiT call per step."""
    d = pipe.dit.config
    cfg = tiny_adapter_config(
        image_embed_dim=32, hidden_size=d.hidden_size, double_blocks=d.depth, single_blocks=d.depth_single_blocks
    )
    path = _instantx_file(make_adapter(cfg, seed=7), tmp_path / "ip-adapter.bin")
    pipe.load_ip_adapter(str(path), image_encoder=str(encoders["siglip"]))
    options = {**SETTINGS, "num_inference_steps": 3, "negative_prompt": "blurry", "cfg_scale": 2.0}
    check_pipeline_first_block_cache(
        pipe, lambda: _run(pipe, ipadapter_images=[_image(3)], ipadapter_scale=0.8, **options), steps=3
    )


def _xlabs_config(dit_cfg) -> FluxIPAdapterConfig:
    """An XLabs-format adapter (CLIP's 16-wide embeds, 4 tokens, double blocks only) for the pipeline's DiT."""
    fields = dict(image_embed_dim=16, num_tokens=4, hidden_size=dit_cfg.hidden_size, double_blocks=dit_cfg.depth)
    return tiny_adapter_config(format=XLABS, single_blocks=0, **fields)


def test_loading_a_siglip_encoder_for_an_xlabs_adapter_is_refused(pipe, encoders, tmp_path):
    cfg = _xlabs_config(pipe.dit.config)
    save_file(ours_to_xlabs(make_adapter(cfg).state_dict()), str(tmp_path / "ip_adapter.safetensors"))
    with pytest.raises(ConfigError, match="trained with clip"):
        pipe.load_ip_adapter(str(tmp_path / "ip_adapter.safetensors"), image_encoder=str(encoders["siglip"]))


@pytest.fixture(scope="module")
def xlabs(pipe, encoders, tiny_repo, tmp_path_factory):
    """An XLabs-format adapter for the tiny DiT, loaded into our pipeline and diffusers' FluxPipeline."""
    import diffusers

    cfg = _xlabs_config(pipe.dit.config)
    folder = tmp_path_factory.mktemp("xlabs")
    save_file(ours_to_xlabs(make_adapter(cfg, seed=8).state_dict()), str(folder / "ip_adapter.safetensors"))
    reference = diffusers.FluxPipeline(**reference_components(tiny_repo)).to(torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_ip_adapter(
        str(folder),
        weight_name="ip_adapter.safetensors",
        image_encoder_pretrained_model_name_or_path=str(encoders["clip"]),
        image_encoder_dtype=torch.float32,
    )
    return reference, folder / "ip_adapter.safetensors"


@pytest.mark.parity
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_xlabs_pipeline_matches_diffusers(pipe, encoders, xlabs, cfg_scale):
    """The reference image is the encoder's size, so both sides' resize/crop are the identity."""
    reference, path = xlabs
    pipe.load_ip_adapter(str(path), image_encoder=str(encoders["clip"]))
    assert pipe.ipadapter.config.format == XLABS and pipe.ipadapter_image_encoder.kind == "clip"
    image = _image(5, (32, 32))
    reference.set_ip_adapter_scale(0.7)
    negative = {"negative_prompt": "blurry"} if cfg_scale != 1.0 else {}
    expected = reference_images(
        reference,
        latent_noise(1, 32, 32),
        TEXT_LEN,
        prompt="a red circle",
        ip_adapter_image=image,
        true_cfg_scale=cfg_scale,
        guidance_scale=3.5,
        **SETTINGS,
        **negative,
    )
    got = _run(pipe, ipadapter_images=[image], ipadapter_scale=0.7, cfg_scale=cfg_scale, **negative)
    plain = _run(pipe, cfg_scale=cfg_scale, **negative)
    diff = float(np.abs(got - expected).max())
    print(f"XLabs pipeline parity (cfg {cfg_scale}): max abs diff {diff:.3g}")
    assert float(np.abs(got - plain).max()) > 1e-3  # the adapter does act
    assert diff <= 1e-4


def test_model_configs_load_the_adapter_and_its_encoder_as_diffsynth_studio_lists_them(tiny_repo, encoders, tmp_path):
    """`from_pretrained(model_configs=[..., adapter, image encoder])` in any order equals `load_ip_adapter`."""
    from diffsynth.flux.pipeline import FluxImagePipeline
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.pipeline import configs_from_folder

    reference = our_pipeline(tiny_repo)
    d = reference.dit.config
    cfg = tiny_adapter_config(
        image_embed_dim=32, hidden_size=d.hidden_size, double_blocks=d.depth, single_blocks=d.depth_single_blocks
    )
    adapter = ModelConfig(path=str(_instantx_file(make_adapter(cfg, seed=5), tmp_path / "ip-adapter.bin")))
    encoder = ModelConfig(path=str(encoders["siglip"]))
    reference.load_ip_adapter(adapter, image_encoder=encoder)

    found, _ = configs_from_folder(tiny_repo)
    tokenizers = {f"tokenizer_{i}_config": ModelConfig(path=str(tiny_repo / name))
                  for i, name in ((1, "tokenizer"), (2, "tokenizer_2"))}  # fmt: skip
    listed = FluxImagePipeline.from_pretrained(
        model_configs=[adapter, *found, encoder], torch_dtype="float32", device="cpu", **tokenizers
    )  # the adapter comes before the DiT it is sized by
    assert listed.ipadapter.config == cfg and listed.ipadapter_image_encoder.kind == "siglip"
    images = {"ipadapter_images": [_image(3)], "ipadapter_scale": 0.8}
    ours = _run(listed, **images)
    assert np.array_equal(ours, _run(reference, **images))
    assert np.abs(ours - _run(listed)).max() > 1e-3  # the adapter acts

    with pytest.raises(ConfigError, match="image encoder .* but no IP-Adapter file"):
        FluxImagePipeline.from_pretrained(model_configs=[*found, encoder], torch_dtype="float32", device="cpu")


def test_a_siglip_file_without_its_config_gets_the_released_input_size():
    """google/siglip-so400m-patch14-384 listed alone (DiffSynth-Studio's `model.safetensors`, no config.json):
    27 patches of 14 per side are read as its 384-pixel input, not 378; shapes that tile exactly keep side x patch.
    The shapes are read on the meta device (the released tower's widths)."""
    from diffsynth.flux.flux1.ip_adapter import siglip_config_from_state

    def tower(patch: int, side: int, width: int = 1152) -> dict:
        meta = {"device": "meta"}
        return {
            "embeddings.patch_embedding.weight": torch.empty(width, 3, patch, patch, **meta),
            "embeddings.position_embedding.weight": torch.empty(side * side, width, **meta),
            "encoder.layers.0.mlp.fc1.weight": torch.empty(4304, width, **meta),
            "encoder.layers.26.mlp.fc1.weight": torch.empty(4304, width, **meta),
        }

    assert siglip_config_from_state(tower(14, 27)).image_size == 384
    assert siglip_config_from_state(tower(16, 14)).image_size == 224
    assert (
        siglip_config_from_state(tower(14, 27), {"model_type": "siglip_vision_model", "image_size": 378}).image_size
        == 378
    )
