"""`diffsynth lora convert` for FLUX.1 and FLUX.2 (`convert_flux1_naming`, `convert_flux2_naming`): a LoRA renamed to
official (BFL) names is exact (the converted file, read with no family conversion at all, changes a tiny DiT's
weights exactly as the original read by the family loader), fused layers come out as one LoRA each (no `.diff`);
renamed to diffusers names it loads in diffusers' own `load_lora_adapter` to the same weights, and diffusers ->
official -> diffusers gives back the original tensors. Refusals name the layer."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.flux.flux1.formats import diffusers_to_ours
from diffsynth.flux.flux1.lora import convert_flux1_naming, read_flux1_lora
from diffsynth.flux.flux2.lora import convert_flux2_naming, read_flux2_lora
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, read_lora, save_lora


def _load(name: str):
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"lora_convert_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L = _load("test_flux1_lora.py")  # tiny, random_lora, peft_file, kohya_file, linear_shapes, diffusers_linear_shapes
D2 = _load("test_flux2_dit.py")  # tiny_config, make_dit


def fused(base, lora, reader=None):
    """A copy of `base` with `lora` fused at scale 1, read by `reader(lora, model)` (None: the plain reader, which
    knows no family names: only a file in our names loads that way)."""
    model = copy.deepcopy(base)
    apply_lora(model, read_lora(lora) if reader is None else reader(lora, model), fuse=True)
    return model


def max_weight_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def write(lora, path, **kwargs) -> dict[str, torch.Tensor]:
    save_lora(lora, path, **kwargs)
    return load_file(str(path))


# ----------------------------------------------------------------------------------- FLUX.1 to official names
@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_flux1_diffusers_names_to_official_are_exact(tmp_path, layout):
    _, base = L.tiny()
    lora = L.random_lora(L.diffusers_linear_shapes(base), seed=21)  # every diffusers Linear, alphas varying
    state = L.peft_file(lora) if layout == "peft" else L.kohya_file(lora, prefix="lora_transformer_")
    written = write(convert_flux1_naming(state, "official", model=base), tmp_path / "official.safetensors")

    assert not any("transformer_blocks" in k or ".to_q." in k or "norm_out" in k for k in written)
    assert not any(k.endswith((".diff", ".diff_b")) for k in written)  # fused layers as exact LoRAs
    ours = set(L.linear_shapes(base))
    assert {k.rsplit(".lora_", 1)[0] for k in written} <= ours
    assert "double_blocks.0.img_attn.qkv.lora_A.weight" in written
    assert "single_blocks.0.linear1.lora_B.weight" in written

    want = fused(base, state, read_flux1_lora)
    got = fused(base, tmp_path / "official.safetensors")  # our names: no family conversion needed
    assert max_weight_diff(want, base) > 1e-2
    diff = max_weight_diff(got, want)
    print(f"official file vs original: max abs weight diff {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize("format", ["peft", "kohya"])
def test_flux1_official_output_in_peft_and_kohya_layouts(tmp_path, format):
    _, base = L.tiny()
    lora = L.random_lora(L.diffusers_linear_shapes(base), seed=22)
    written = write(convert_flux1_naming(L.peft_file(lora), model=base), tmp_path / "o.safetensors", format=format)
    prefix = "diffusion_model." if format == "peft" else "lora_unet_"
    assert all(k.startswith(prefix) for k in written)
    fused_key = (
        "diffusion_model.double_blocks.0.img_attn.qkv" if format == "peft" else "lora_unet_double_blocks_0_img_attn_qkv"
    )
    assert f"{fused_key}.{'lora_A' if format == 'peft' else 'lora_down'}.weight" in written
    want = fused(base, L.peft_file(lora), read_flux1_lora)
    got = fused(base, tmp_path / "o.safetensors")  # kohya's underscored names resolve against the model
    assert max_weight_diff(got, want) <= 1e-6


def test_flux1_xlabs_and_some_parts_only_to_official(tmp_path):
    """XLabs' processor LoRAs (single blocks: the q, k, v rows of linear1 only) and a file with some parts of
    each fused layer: the parts left out are zero rows of the fused LoRA, still one exact LoRA."""
    _, base = L.tiny()
    shapes = L.diffusers_linear_shapes(base)
    parts = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp", "norm_out.linear"]
    for i, state in enumerate(
        (L.xlabs_file(base, seed=24), L.peft_file(L.random_lora({p: shapes[p] for p in parts}, seed=23)))
    ):
        path = tmp_path / f"o{i}.safetensors"
        written = write(convert_flux1_naming(state, model=base), path)
        assert not any(k.endswith(".diff") or "processor" in k for k in written)
        assert max_weight_diff(fused(base, path), fused(base, state, read_flux1_lora)) <= 1e-6


# ----------------------------------------------------------------------------------- FLUX.1 to diffusers names
def test_flux1_diffusers_round_trip_gives_back_the_original_tensors():
    _, base = L.tiny()
    shapes = L.diffusers_linear_shapes(base)
    parts = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",  # to_k left out: zero rows there, dropped again on the way back
        "transformer_blocks.0.attn.add_k_proj",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.proj_mlp",
        "norm_out.linear",  # halves swapped and swapped back
        "x_embedder",
    ]
    lora = L.random_lora({p: shapes[p] for p in parts}, seed=25)
    official = convert_flux1_naming(L.peft_file(lora), "official", model=base)
    back = convert_flux1_naming(official, "diffusers", model=base)
    assert set(back.targets) == set(parts)
    worst = 0.0
    for name, (down, up, alpha) in lora.items():
        t = back.targets[name]
        assert t.down.shape == down.shape and t.up.shape == up.shape
        worst = max(worst, (t.down - down).abs().max().item())
        worst = max(worst, (t.up * t.factor - up * (alpha / down.shape[0])).abs().max().item())
    print(f"diffusers -> official -> diffusers: max abs diff {worst:.3g}")
    assert worst <= 1e-6


@pytest.mark.parity
def test_flux1_diffusers_output_loads_in_diffusers_to_the_same_weights(tmp_path):
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    cfg, base = L.tiny()
    # a rank shared by every layer, so diffusers' peft config needs no rank pattern (its top-level `proj_out`
    # pattern would also match the single blocks' `proj_out`); alphas vary and are folded into lora_B
    lora = L.random_lora(L.linear_shapes(base), seed=26)
    lora = {n: (d[:2], u[:, :2], a) for n, (d, u, a) in lora.items()}
    original = L.kohya_file(lora)  # BFL names, kohya layout, alphas
    path = tmp_path / "diffusers.safetensors"
    written = write(convert_flux1_naming(original, "diffusers", model=base), path, format="peft", prefix="transformer.")
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in written)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in written
    assert not any("double_blocks" in k or "img_attn" in k for k in written)

    from diffsynth_flux_test_helpers import reference_dit

    reference = reference_dit(cfg, base)
    state = diffusers.FluxPipeline.lora_state_dict(str(path))
    reference.load_lora_adapter(state, prefix="transformer", adapter_name="converted")
    reference.fuse_lora(lora_scale=1.0)
    weights = {k.replace(".base_layer.", "."): v for k, v in reference.state_dict().items() if ".lora_" not in k}
    theirs = copy.deepcopy(base)
    theirs.load_state_dict(diffusers_to_ours(weights))
    ours = fused(base, original, read_flux1_lora)
    assert max_weight_diff(ours, base) > 1e-2
    diff = max_weight_diff(theirs, ours)
    print(f"diffusers' loader on the converted file vs ours on the original: max abs weight diff {diff:.3g}")
    assert diff <= 1e-6


def test_flux1_row_dora_on_a_fused_layer_splits_and_column_dora_is_refused():
    _, base = L.tiny()
    qkv = base.double_blocks[0].img_attn.qkv
    out_features, in_features = qkv.weight.shape
    g = torch.Generator().manual_seed(27)
    down, up = torch.randn(2, in_features, generator=g), torch.randn(out_features, 2, generator=g)
    key = "double_blocks.0.img_attn.qkv"
    row = {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.dora_scale": torch.rand(out_features, 1)}
    split = convert_flux1_naming(row, "diffusers", model=base)
    third = out_features // 3
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        t = split.targets[f"transformer_blocks.0.attn.{part}"]
        assert torch.equal(t.magnitude, row[f"{key}.dora_scale"][i * third : (i + 1) * third])
    column = {**row, f"{key}.dora_scale": torch.rand(1, in_features)}
    with pytest.raises(LoRAError, match="column norms on the fused layer 'double_blocks.0.img_attn.qkv'"):
        convert_flux1_naming(column, "diffusers", model=base)


def test_flux1_lycoris_on_fused_layers_is_refused_both_ways():
    _, base = L.tiny()
    shapes = L.linear_shapes(base)
    state, _ = L.lycoris_file({"double_blocks.0.img_attn.qkv": shapes["double_blocks.0.img_attn.qkv"]}, seed=28)
    with pytest.raises(LoRAError, match="LoHa / LoKr on the fused layer 'double_blocks.0.img_attn.qkv'"):
        convert_flux1_naming(state, "diffusers", model=base)
    assert convert_flux1_naming(state, "official", model=base).targets  # as it is: official already
    part = L.diffusers_linear_shapes(base)["transformer_blocks.0.attn.to_q"]
    state, _ = L.lycoris_file({"transformer_blocks.0.attn.to_q": part}, seed=29, prefix="lora_transformer_")
    with pytest.raises(LoRAError, match="part of 'double_blocks.0.img_attn.qkv'"):
        convert_flux1_naming(state, "official", model=base)


def test_flux1_unknown_target_names_the_key():
    _, base = L.tiny()
    state = {
        "transformer.nothing_here.lora_A.weight": torch.zeros(1, 4),
        "transformer.nothing_here.lora_B.weight": torch.zeros(4, 1),
    }
    with pytest.raises(LoRAError, match="nothing_here"):
        convert_flux1_naming(state, model=base)


# ----------------------------------------------------------------------------------- FLUX.2
def _flux2_tiny():
    cfg = D2.tiny_config()
    return cfg, D2.make_dit(cfg, seed=3).eval()


def test_flux2_diffusers_names_to_official_and_back(tmp_path):
    from diffsynth.flux.flux2.formats import ours_to_diffusers

    _, base = _flux2_tiny()
    shapes = {
        k.removesuffix(".weight"): tuple(v.shape)
        for k, v in ours_to_diffusers({f"{n}.weight": torch.empty(s) for n, s in L.linear_shapes(base).items()}).items()
    }
    lora = L.random_lora(shapes, seed=31)
    state = L.peft_file(lora)
    written = write(convert_flux2_naming(state, "official", model=base), tmp_path / "o.safetensors")
    assert not any("transformer_blocks" in k for k in written)
    assert not any(k.endswith(".diff") for k in written)
    want = fused(base, state, read_flux2_lora)
    assert max_weight_diff(want, base) > 1e-2
    diff = max_weight_diff(fused(base, tmp_path / "o.safetensors"), want)
    print(f"FLUX.2 official file vs original: max abs weight diff {diff:.3g}")
    assert diff <= 1e-6

    back = convert_flux2_naming(tmp_path / "o.safetensors", "diffusers", model=base)
    assert set(back.targets) == set(lora)
    for name, (down, up, alpha) in lora.items():
        t = back.targets[name]
        assert torch.allclose(t.up @ t.down * t.factor, up @ down * (alpha / down.shape[0]), atol=1e-6)


# ----------------------------------------------------------------------------------- the command
def test_cli_converts_a_full_size_flux1_lora_on_the_meta_model(tmp_path):
    """`diffsynth lora convert` builds FLUX.1-dev's DiT on the meta device for the shapes (no memory)."""
    from diffsynth.runtime.cli import main

    g = torch.Generator().manual_seed(32)
    parts = {"transformer_blocks.3.attn.to_k": (3072, 3072), "single_transformer_blocks.7.proj_mlp": (12288, 3072)}
    state = {}
    for name, (o, i) in parts.items():
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(2, i, generator=g)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(o, 2, generator=g)
        state[f"transformer.{name}.alpha"] = torch.tensor(4.0)
    save_file(state, str(tmp_path / "in.safetensors"))
    out, back = tmp_path / "official.safetensors", tmp_path / "back.safetensors"
    assert main(["lora", "convert", str(tmp_path / "in.safetensors"), "--family", "flux", "-o", str(out)]) == 0
    written = load_file(str(out))
    assert sorted(written) == [
        "double_blocks.3.img_attn.qkv.lora_A.weight",
        "double_blocks.3.img_attn.qkv.lora_B.weight",
        "single_blocks.7.linear1.lora_A.weight",
        "single_blocks.7.linear1.lora_B.weight",
    ]
    assert written["single_blocks.7.linear1.lora_B.weight"].shape == (3 * 3072 + 12288, 2)
    assert main(["lora", "convert", str(out), "--family", "flux", "--to", "diffusers", "-o", str(back)]) == 0
    returned = load_file(str(back))
    assert sorted(returned) == sorted(k for k in state if not k.endswith(".alpha"))
    for key, value in returned.items():
        want = state[key] * (2.0 if ".lora_B." in key else 1.0)  # alpha 4 / rank 2 folded into lora_B
        assert torch.allclose(value, want, atol=1e-6)
