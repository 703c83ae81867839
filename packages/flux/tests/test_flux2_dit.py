"""FLUX.2 DiT (dev, klein-4B, klein-9B): conformance suite, full-size keys on meta, formats, loading, VRAM manager,
and parity with diffusers' `Flux2Transformer2DModel` on the same weights (fp32, CPU).

Inputs are built like the FLUX.2 pipelines build them: text ids (0, 0, 0, l), image ids (0, h, w, 0) and a
reference-image token block with ids (10, h, w, 0) appended to the image tokens (editing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffsynth_flux_test_helpers import cached_calls, reused_call_reference
from safetensors.torch import save_file

from diffsynth.flux.flux1.formats import FLUX1_DIT_SPEC
from diffsynth.flux.flux2 import dit as dit_module
from diffsynth.flux.flux2.dit import Flux2DiT, Flux2DiTConfig
from diffsynth.flux.flux2.formats import (
    FLUX2_DIT_SPEC,
    PREFIX,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"
LAYOUTS = {layout.name: layout for layout in FLUX2_DIT_SPEC.layouts}

# transformer/config.json of the released repos (diffusers field names).
DEV_CONFIG_JSON = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "guidance_embeds": True,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "out_channels": None,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
KLEIN_4B_CONFIG_JSON = {
    **DEV_CONFIG_JSON,
    "guidance_embeds": False,
    "joint_attention_dim": 7680,
    "num_attention_heads": 24,
    "num_layers": 5,
    "num_single_layers": 20,
}


# ------------------------------------------------------------------ tiny models and inputs
def tiny_config(**overrides) -> Flux2DiTConfig:
    """The one place tiny FLUX.2 DiT sizes live (head_dim 16, RoPE axes 4 x 4)."""
    fields = dict(
        in_channels=16,
        out_channels=16,
        context_in_dim=32,
        hidden_size=32,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
    )
    return Flux2DiTConfig(**{**fields, **overrides})


def make_dit(config: Flux2DiTConfig | None = None, seed: int = 0) -> Flux2DiT:
    model = Flux2DiT(config or tiny_config())
    return random_weights(model, seed, scale=0.2, is_norm=lambda name, p: name.endswith(".scale"))


def grid_ids(height: int, width: int, t: int = 0) -> torch.Tensor:
    """`[h*w, 4]` ids (t, row, column, 0) of a packed latent grid, as the FLUX.2 pipelines build them."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)


def text_ids(length: int) -> torch.Tensor:
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def dit_inputs(batch=2, grid=(4, 4), txt_len=7, ref_grid=None, seed=1, config: Flux2DiTConfig | None = None):
    """The DiT's positional inputs: img, img_ids `[1, L, 4]`, txt, txt_ids `[1, L, 4]`, timesteps, guidance.

    `ref_grid` appends a reference-image block (ids t = 10) after the image tokens."""
    cfg = config or tiny_config()
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, grid[0] * grid[1], cfg.in_channels, generator=g)
    ids = grid_ids(*grid)
    if ref_grid is not None:
        ref = torch.randn(batch, ref_grid[0] * ref_grid[1], cfg.in_channels, generator=g)
        img, ids = torch.cat([img, ref], dim=1), torch.cat([ids, grid_ids(*ref_grid, t=10)])
    txt = torch.randn(batch, txt_len, cfg.context_in_dim, generator=g)
    timesteps = torch.rand(batch, generator=g)
    guidance = 1.0 + 4.0 * torch.rand(batch, generator=g)
    return img, ids[None], txt, text_ids(txt_len)[None], timesteps, guidance


def meta_state_from_keys(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / name).read_text())
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def meta_state(config: Flux2DiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return Flux2DiT(config).state_dict()


def shapes(state) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------ config
def test_default_config_is_flux2_dev():
    cfg = Flux2DiTConfig()
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.depth, cfg.depth_single_blocks) == (6144, 48, 128, 8, 48)
    assert (cfg.in_channels, cfg.out_channels, cfg.context_in_dim, cfg.mlp_hidden_dim) == (128, 128, 15360, 18432)
    assert cfg.axes_dim == (32, 32, 32, 32) and cfg.theta == 2000.0 and cfg.guidance_embed
    assert Flux2DiTConfig.variant("dev") == cfg == Flux2DiTConfig.variant("FLUX.2-dev")


def test_klein_variants():
    klein4 = Flux2DiTConfig.variant("klein-4b")
    assert (klein4.hidden_size, klein4.num_heads, klein4.depth, klein4.depth_single_blocks) == (3072, 24, 5, 20)
    assert klein4.context_in_dim == 7680 and not klein4.guidance_embed
    klein9 = Flux2DiTConfig.variant("FLUX.2-klein-base-9B")
    assert (klein9.hidden_size, klein9.num_heads, klein9.depth, klein9.depth_single_blocks) == (4096, 32, 8, 24)
    assert klein9.context_in_dim == 12288 and klein9.head_dim == 128 and not klein9.guidance_embed
    with pytest.raises(ValueError, match="klein-4b"):
        Flux2DiTConfig.variant("klein-12b")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 33}, "hidden_size"),
        ({"axes_dim": (4, 4, 4, 6)}, "axes_dim"),
        ({"axes_dim": (3, 5, 4, 4)}, "axes_dim"),
        ({"depth": -1}, "depth"),
        ({"in_channels": 0}, "in_channels"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"theta": 0.0}, "theta"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# ------------------------------------------------------------------ conformance suite
def test_forward_shape_and_dtype():
    args = dit_inputs(ref_grid=(2, 3))
    cf.check_forward(make_dit, args, expected_shapes=[args[0].shape])


def test_forward_bfloat16_keeps_dtype_and_stays_close_to_float32():
    args = dit_inputs()
    img, *rest = args
    (low,) = cf.check_forward(
        lambda: make_dit().to(torch.bfloat16), (img.bfloat16(), *rest), expected_shapes=[img.shape]
    )
    with torch.no_grad():
        full = make_dit().eval()(*args)
    error = ((low.float() - full).norm() / full.norm()).item()
    assert error < 0.03, f"bf16 relative error {error:.3g}"


def test_backward_reaches_every_parameter():
    cf.check_backward(make_dit, dit_inputs())


def test_gradient_checkpointing_gives_same_output_and_grads():
    cf.check_gradient_checkpointing(make_dit, dit_inputs(), atol=1e-6)


def test_meta_build_and_assign_load_are_identical():
    cf.check_meta_load(make_dit, dit_inputs())


def test_declared_units_exist():
    cf.check_declared_units(make_dit)
    assert Flux2DiT.offload_units == Flux2DiT.compile_units == ("double_blocks", "single_blocks")


def test_spec_config_from_tiny_shapes_rebuilds_the_same_model():
    """Shapes give widths, counts, heads, MLP ratio, guidance embedder; RoPE axes come from the json."""
    tiny = tiny_config()
    assert cf.check_spec_config(FLUX2_DIT_SPEC, make_dit, {"axes_dims_rope": list(tiny.axes_dim)}) == tiny


# ------------------------------------------------------------------ first-block cache
@pytest.mark.parametrize("ref_grid", [None, (2, 3)], ids=["text-to-image", "reference-tokens"])
def test_first_block_cache_hook(ref_grid):
    """Over both block lists (diffusers' span); reference-image tokens ride in the image stream."""
    cf.check_first_block_cache(
        make_dit,
        dit_inputs(ref_grid=ref_grid),
        other_args=dit_inputs(ref_grid=ref_grid, seed=2),
        blocks=("double_blocks", "single_blocks"),
    )


def test_first_block_cache_reuses_what_the_later_blocks_added():
    """diffusers' FBC cannot run on its FLUX.2 model (its tail hook subtracts a list from a tensor), so the
    reference is built by hand from our model's pieces."""
    model = make_dit().eval()
    full, reused = dit_inputs(ref_grid=(2, 3)), dit_inputs(ref_grid=(2, 3), seed=2)
    want = reused_call_reference(model, full, reused, n_txt=full[2].shape[1])
    (_, got), cache = cached_calls(model, float("inf"), [full, reused])
    assert (cache.calls, cache.skipped) == (2, 1)
    assert got.shape == reused[0].shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (got - model(*reused)).abs().max() > 1e-3  # the reuse did change the output


# ------------------------------------------------------------------ behaviour
def test_batch_equals_each_sample_alone():
    model = make_dit().eval()
    img, img_ids, txt, txt_ids, t, g = dit_inputs(batch=3)
    with torch.no_grad():
        batch = model(img, img_ids, txt, txt_ids, t, g)
        for i in range(3):
            s = slice(i, i + 1)
            alone = model(img[s], img_ids, txt[s], txt_ids, t[s], g[s])
            torch.testing.assert_close(batch[s], alone, atol=1e-5, rtol=1e-5)


def test_id_forms_are_equivalent_and_reference_tokens_are_attended():
    model = make_dit().eval()
    img, img_ids, txt, txt_ids, t, g = dit_inputs(ref_grid=(3, 2))
    with torch.no_grad():
        out = model(img, img_ids, txt, txt_ids, t, g)
        per_sample = model(img, img_ids.expand(2, -1, -1), txt, txt_ids.expand(2, -1, -1), t, g)
        two_dim_float = model(img, img_ids[0].float(), txt, txt_ids[0].float(), t, g)
        without_ref = model(img[:, :16], img_ids[:, :16], txt, txt_ids, t, g)
    assert out.shape == (2, 16 + 6, 16)
    assert torch.equal(out, per_sample) and torch.equal(out, two_dim_float)
    assert (out[:, :16] - without_ref).abs().max() > 1e-4


def test_positions_move_the_output_on_every_axis():
    model = make_dit().eval()
    img, img_ids, *rest = dit_inputs()
    with torch.no_grad():
        base = model(img, img_ids, *rest)
        for axis in range(4):
            shifted = img_ids.clone()
            shifted[..., axis] += 1 + torch.arange(shifted.shape[1]) % 3  # not a uniform shift (RoPE ignores those)
            assert (model(img, shifted, *rest) - base).abs().max() > 1e-4, f"axis {axis} has no effect"


def test_scalar_timestep_and_guidance_broadcast():
    model = make_dit().eval()
    img, img_ids, txt, txt_ids, _, _ = dit_inputs()
    with torch.no_grad():
        per_sample = model(img, img_ids, txt, txt_ids, torch.full((2,), 0.5), torch.full((2,), 3.5))
        scalar = model(img, img_ids, txt, txt_ids, 0.5, 3.5)
    assert torch.equal(per_sample, scalar)


def test_guidance_changes_the_output_of_a_guidance_distilled_model():
    model = make_dit().eval()
    img, img_ids, txt, txt_ids, t, _ = dit_inputs()
    with torch.no_grad():
        assert (
            model(img, img_ids, txt, txt_ids, t, 2.0) - model(img, img_ids, txt, txt_ids, t, 4.0)
        ).abs().max() > 1e-4


def test_klein_style_model_has_no_guidance_embedder_and_ignores_guidance():
    model = make_dit(tiny_config(guidance_embed=False)).eval()
    assert model.guidance_in is None and not any(k.startswith("guidance_in") for k in model.state_dict())
    img, img_ids, txt, txt_ids, t, _ = dit_inputs()
    with torch.no_grad():
        assert torch.equal(model(img, img_ids, txt, txt_ids, t), model(img, img_ids, txt, txt_ids, t, 4.0))


def test_guidance_distilled_model_needs_guidance():
    img, img_ids, txt, txt_ids, t, _ = dit_inputs()
    with pytest.raises(ValueError, match="guidance"):
        make_dit()(img, img_ids, txt, txt_ids, t)


def test_attention_goes_through_the_runtime_entry_point(monkeypatch):
    calls = []
    original = dit_module.attention

    def spy(q, k, v, mask=None, scale=None, **options):
        calls.append(tuple(q.shape))
        return original(q, k, v, mask, scale, **options)

    monkeypatch.setattr(dit_module, "attention", spy)
    with torch.no_grad():
        make_dit()(*dit_inputs())
    assert calls == [(2, 7 + 16, 2, 16)] * 4  # 2 double + 2 single blocks, joint [text, image] sequence


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({0: torch.zeros(2, 16, 15)}, "img has shape"),
        ({2: torch.zeros(2, 7, 31)}, "txt has shape"),
        ({2: torch.zeros(1, 7, 32)}, "txt has shape"),
        ({1: torch.zeros(1, 15, 4)}, "img_ids"),
        ({3: torch.zeros(1, 7, 3)}, "txt_ids has 3 axes"),
        ({4: torch.zeros(3)}, "timesteps has 3 values"),
        ({5: torch.zeros(3)}, "guidance has 3 values"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = list(dit_inputs())
    for index, value in change.items():
        args[index] = value
    with pytest.raises(ValueError, match=message):
        make_dit()(*args)


# ------------------------------------------------------------------ full size, meta device
@pytest.mark.parametrize(("variant", "name"), [("dev", "flux2_dev"), ("klein-4b", "flux2_klein4b")])
def test_released_models_have_exactly_the_original_keys_and_shapes(variant, name):
    official = json.loads((KEYS / f"{name}_orig.json").read_text())
    ours = shapes(meta_state(Flux2DiTConfig.variant(variant)))
    assert sorted(ours.keys() - official.keys()) == [] and sorted(official.keys() - ours.keys()) == []
    assert ours == official


@pytest.mark.parametrize(("variant", "name"), [("dev", "flux2_dev"), ("klein-4b", "flux2_klein4b")])
def test_diffusers_folders_convert_to_exactly_our_keys_and_shapes(variant, name):
    diffusers = meta_state_from_keys(f"{name}_diffusers.json")
    layout = FLUX2_DIT_SPEC.match(diffusers)
    assert layout.name == "diffusers"
    ours = meta_state(Flux2DiTConfig.variant(variant))
    assert shapes(layout.to_ours(diffusers)) == shapes(ours)
    assert shapes(ours_to_diffusers(ours)) == json.loads((KEYS / f"{name}_diffusers.json").read_text())


@pytest.mark.parametrize(
    ("name", "variant", "config_json"),
    [
        ("flux2_dev_orig.json", "dev", DEV_CONFIG_JSON),
        ("flux2_dev_diffusers.json", "dev", DEV_CONFIG_JSON),
        ("flux2_klein4b_orig.json", "klein-4b", KLEIN_4B_CONFIG_JSON),
        ("flux2_klein4b_diffusers.json", "klein-4b", KLEIN_4B_CONFIG_JSON),
    ],
)
def test_config_derived_from_each_released_file_is_the_variant(name, variant, config_json):
    state = meta_state_from_keys(name)
    ours = FLUX2_DIT_SPEC.match(state).to_ours(state)
    assert config_from_state(ours, None) == Flux2DiTConfig.variant(variant)
    assert config_from_state(ours, config_json) == Flux2DiTConfig.variant(variant)
    assert config_from_state({}, config_json) == Flux2DiTConfig.variant(variant)


def _parameter_count(cfg: Flux2DiTConfig) -> int:
    """Parameters of a FLUX.2 DiT counted from its sizes (no biases), independently of the module tree."""
    d, m, hd = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim
    stream = 3 * d * d + d * d + d * 2 * m + m * d + 2 * hd  # qkv, proj, SwiGLU in/out, QK-norm scales
    single = d * (3 * d + 2 * m) + (d + m) * d + 2 * hd
    modulation = 6 * d * d + 6 * d * d + 3 * d * d
    embedders = cfg.in_channels * d + cfg.context_in_dim * d + (256 * d + d * d) * (1 + cfg.guidance_embed)
    final = 2 * d * d + d * cfg.out_channels
    return cfg.depth * 2 * stream + cfg.depth_single_blocks * single + modulation + embedders + final


def test_klein_9b_builds_on_meta_with_9b_parameters_and_its_shapes_give_its_config():
    cfg = Flux2DiTConfig.variant("klein-9b")
    with torch.device("meta"):
        model = Flux2DiT(cfg)
    cf.check_declared_units(model)
    count = sum(p.numel() for p in model.parameters())
    assert count == _parameter_count(cfg)
    assert 8.5e9 < count < 9.5e9, count  # "9B"
    assert config_from_state(model.state_dict(), None) == cfg
    assert FLUX2_DIT_SPEC.match(model.state_dict()).name == "original"


def test_parameter_counts_of_dev_and_klein_4b_match_the_count_from_sizes():
    for variant, billions in (("dev", 32.22), ("klein-4b", 3.88)):
        cfg = Flux2DiTConfig.variant(variant)
        with torch.device("meta"):
            count = sum(p.numel() for p in Flux2DiT(cfg).parameters())
        assert count == _parameter_count(cfg) and round(count / 1e9, 2) == billions


@pytest.mark.parametrize(
    ("name", "spec", "layout"),
    [
        ("flux2_dev_orig.json", "flux2_dit", "original"),
        ("flux2_dev_diffusers.json", "flux2_dit", "diffusers"),
        ("flux2_klein4b_orig.json", "flux2_dit", "original"),
        ("flux2_klein4b_diffusers.json", "flux2_dit", "diffusers"),
        ("flux1_dev_orig.json", "flux1_dit", "original"),
        ("flux1_dev_diffusers.json", "flux1_dit", "diffusers"),
    ],
)
def test_flux1_and_flux2_files_are_told_apart(name, spec, layout):
    state = meta_state_from_keys(name)
    for keys, want_layout in ((state, layout), ({PREFIX + k: v for k, v in state.items()}, "comfyui")):
        if want_layout == "comfyui" and layout == "diffusers":
            continue
        (rec,) = recognise(keys, specs=[FLUX1_DIT_SPEC, FLUX2_DIT_SPEC], label=name)
        assert (rec.spec.name, rec.layout.name) == (spec, want_layout)
    other = FLUX1_DIT_SPEC if spec == "flux2_dit" else FLUX2_DIT_SPEC
    assert other.match(state) is None


def test_config_json_that_contradicts_the_shapes_is_an_error():
    state = meta_state(Flux2DiTConfig())
    with pytest.raises(ConfigError, match="depth"):
        config_from_state(state, {**DEV_CONFIG_JSON, "num_layers": 7})
    with pytest.raises(ConfigError, match="guidance_embed"):
        config_from_state(state, {**DEV_CONFIG_JSON, "guidance_embeds": False})
    with pytest.raises(ConfigError, match="patch_size"):
        config_from_state({}, {**DEV_CONFIG_JSON, "patch_size": 2})
    with pytest.raises(ConfigError, match="timestep_guidance_channels"):
        config_from_state({}, {**DEV_CONFIG_JSON, "timestep_guidance_channels": 128})


def test_shapes_that_need_other_rope_axes_say_so():
    with torch.device("meta"):
        state = make_dit().state_dict()
    with pytest.raises(ConfigError, match="axes_dim"):
        config_from_state(state, None)


# ------------------------------------------------------------------ tiny: conversions round trip
@pytest.mark.parametrize("name", ["original", "comfyui"])
def test_original_layouts_round_trip(name):
    cf.check_layout_roundtrip(make_dit, LAYOUTS[name])


@pytest.mark.parametrize("guidance_embed", [True, False])
def test_diffusers_layout_inverts_ours_to_diffusers_exactly(guidance_embed):
    factory = lambda: make_dit(tiny_config(guidance_embed=guidance_embed))  # noqa: E731
    cf.check_layout_roundtrip(factory, LAYOUTS["diffusers"], from_ours=ours_to_diffusers)
    ours = factory().state_dict()
    back = diffusers_to_ours(ours_to_diffusers(ours))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    diffusers = ours_to_diffusers(ours)
    again = ours_to_diffusers(diffusers_to_ours(diffusers))
    assert again.keys() == diffusers.keys() and all(torch.equal(again[k], diffusers[k]) for k in diffusers)


def test_final_modulation_halves_are_swapped_and_qkv_is_split_in_order():
    ours = make_dit().state_dict()
    theirs = ours_to_diffusers(ours)
    shift, scale = ours["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(theirs["norm_out.linear.weight"], torch.cat([scale, shift]))
    q, k, v = ours["double_blocks.1.txt_attn.qkv.weight"].chunk(3)
    assert torch.equal(theirs["transformer_blocks.1.attn.add_q_proj.weight"], q)
    assert torch.equal(theirs["transformer_blocks.1.attn.add_v_proj.weight"], v)


def test_unmapped_and_incomplete_keys_are_errors_naming_them():
    diffusers = ours_to_diffusers(make_dit().state_dict())
    with pytest.raises(KeyError, match="transformer_blocks.0.attn.rogue.weight"):
        diffusers_to_ours({**diffusers, "transformer_blocks.0.attn.rogue.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="x_embedder.bias"):
        diffusers_to_ours({**diffusers, "x_embedder.bias": torch.zeros(1)})
    without_v = {k: v for k, v in diffusers.items() if k != "transformer_blocks.1.attn.to_v.weight"}
    with pytest.raises(KeyError, match="transformer_blocks.1.attn.to_v.weight"):
        diffusers_to_ours(without_v)
    with pytest.raises(KeyError, match="rogue"):
        ours_to_diffusers({"rogue.weight": torch.zeros(1)})


def test_layouts_own_only_dit_keys():
    assert LAYOUTS["original"].owns("double_stream_modulation_img.lin.weight")
    assert not LAYOUTS["original"].owns("encoder.conv_in.weight")
    assert LAYOUTS["diffusers"].owns("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight")
    assert not LAYOUTS["diffusers"].owns("model.language_model.embed_tokens.weight")


# ------------------------------------------------------------------ loading files
def _file_config() -> Flux2DiTConfig:
    """Small, but with FLUX.2's head width 128 so a BFL single file without a config.json derives it."""
    return Flux2DiTConfig(in_channels=16, out_channels=16, context_in_dim=32, hidden_size=128, num_heads=1, depth=1,
                          depth_single_blocks=1, guidance_embed=False)  # fmt: skip


def _diffusers_config_json(cfg: Flux2DiTConfig) -> dict:
    """What diffusers writes for this model (`Flux2Transformer2DModel.save_pretrained`)."""
    return {
        **DEV_CONFIG_JSON,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim),
    }


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_runtime_loader_builds_the_same_model_from_a_file_in_each_layout(layout, tmp_path):
    cfg = _file_config()
    reference = make_dit(cfg, seed=4).eval()
    state = reference.state_dict()
    folder = tmp_path / layout
    folder.mkdir()
    if layout == "comfyui":
        state = {PREFIX + k: v for k, v in state.items()}
    elif layout == "diffusers":
        state = ours_to_diffusers(state)
        (folder / "config.json").write_text(json.dumps(_diffusers_config_json(cfg)))
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = load_model(str(path), specs=[FLUX1_DIT_SPEC, FLUX2_DIT_SPEC])
    assert isinstance(model, Flux2DiT) and model.config == cfg
    args = dit_inputs(config=cfg)
    with torch.no_grad():
        assert torch.equal(model(*args), reference(*args))


def test_runtime_loader_takes_a_tiny_state_dict_with_the_rope_axes_given():
    reference = make_dit().eval()
    model = load_model(reference.state_dict(), specs=[FLUX2_DIT_SPEC], config={"axes_dims_rope": [4, 4, 4, 4]})
    assert model.config == tiny_config()
    args = dit_inputs()
    with torch.no_grad():
        assert torch.equal(model(*args), reference(*args))


# ------------------------------------------------------------------ VRAM manager
def test_vram_managed_dit_equals_the_unmanaged_one(tmp_path):
    """Blocks streamed from cpu or read from disk give bit-identical outputs; fp8 storage equals the model
    whose block weights went through the same fp8 round trip."""
    from diffsynth.runtime.vram import enable_vram_management, find_units, quantize

    def factory():
        return make_dit(seed=2).eval().requires_grad_(False)

    args = dit_inputs(ref_grid=(2, 2))
    with torch.no_grad():
        reference = factory()(*args)

        model = factory()
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0,
                                        device="cpu")  # fmt: skip
        assert handle.plan.resident == () and len(handle.units) == 4
        assert torch.equal(model(*args), reference)
        assert handle.report().bytes_moved > 0

        model = factory()
        path = tmp_path / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        disk = {"offload_device": "disk", "onload_device": "disk"}
        enable_vram_management(model, disk, vram_limit=0, device="cpu", checkpoint=[str(path)])
        assert torch.equal(model(*args), reference)

        model = factory()
        enable_vram_management(model, {"offload_device": "cpu", "preparing_dtype": "float8_e4m3fn"}, device="cpu")
        rounded = factory()
        for _, unit in find_units(rounded):
            for p in unit.parameters():
                if p.dim() >= 2:
                    p.copy_(quantize(p, torch.float8_e4m3fn).dequantize(p.dtype))
        torch.testing.assert_close(model(*args), rounded(*args), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ parity with diffusers
def reference_dit(cfg: Flux2DiTConfig, ours: Flux2DiT | None = None, state: dict | None = None):
    """diffusers' `Flux2Transformer2DModel` of `cfg`'s sizes, eval mode, strictly loaded with `ours`' weights
    (through our `ours_to_diffusers`) or with a diffusers-named `state`."""
    from diffusers import Flux2Transformer2DModel

    reference = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        mlp_ratio=cfg.mlp_ratio,
        axes_dims_rope=cfg.axes_dim,
        rope_theta=int(cfg.theta),
        guidance_embeds=cfg.guidance_embed,
    ).eval()
    if ours is not None:
        state = ours_to_diffusers(ours.state_dict())
    if state is not None:
        reference.load_state_dict(state, strict=True)
    return reference


def _compare(ours, reference, args, guidance_embed: bool) -> float:
    img, img_ids, txt, txt_ids, t, g = args
    with torch.no_grad():
        got = ours(*args) if guidance_embed else ours(*args[:5])
        want = reference(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g if guidance_embed else None,
            return_dict=False,
        )[0]
    diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    print(f"parity: max abs diff {diff:.3g}, output scale {scale:.3g}")
    assert scale > 0.1  # a vacuous comparison (all zeros) would prove nothing
    assert diff <= 1e-5 * max(1.0, scale), f"max abs diff {diff:.3g} (output scale {scale:.3g}) vs diffusers"
    return diff


@pytest.mark.parity
@pytest.mark.parametrize(
    ("guidance_embed", "grid", "txt_len", "ref_grid"),
    [
        (True, (4, 4), 7, None),  # dev-like
        (True, (3, 5), 5, (2, 3)),  # dev-like, editing: reference tokens with t = 10
        (False, (4, 4), 7, None),  # klein-like: no guidance embedder
        (False, (4, 3), 9, (3, 3)),  # klein-like, editing
    ],
)
def test_tiny_matches_diffusers_through_ours_to_diffusers(guidance_embed, grid, txt_len, ref_grid):
    pytest.importorskip("diffusers")
    cfg = tiny_config(guidance_embed=guidance_embed)
    ours = make_dit(cfg, seed=3).eval()
    args = dit_inputs(batch=2, grid=grid, txt_len=txt_len, ref_grid=ref_grid, seed=txt_len, config=cfg)
    _compare(ours, reference_dit(cfg, ours), args, guidance_embed)


@pytest.mark.parity
@pytest.mark.parametrize("guidance_embed", [True, False])
def test_original_layout_through_the_diffusers_converter_loads_strictly_and_matches(guidance_embed):
    """Our state dict is BFL's file: diffusers' own single-file converter maps it onto its model."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    cfg = tiny_config(guidance_embed=guidance_embed)
    ours = make_dit(cfg, seed=5).eval()
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(ours.state_dict()))
    reference = reference_dit(cfg, state=converted)
    _compare(ours, reference, dit_inputs(ref_grid=(2, 2), config=cfg), guidance_embed)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["flux2_dev_orig.json", "flux2_klein4b_orig.json"])
def test_ours_to_diffusers_matches_the_diffusers_converter_at_full_size(name):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = meta_state_from_keys(name)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
    assert shapes(ours_to_diffusers(state)) == shapes(theirs)
