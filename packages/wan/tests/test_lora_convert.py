"""`diffsynth lora convert` for Wan (`lora.convert_wan_naming`): a LoRA in diffusers' names written in the authors'
names changes a tiny DiT's weights exactly as the original (the written file read with no family conversion at
all), any kind of change (LoRA, LoHa, DoRA) moving with its name; written in diffusers' names it loads in
diffusers' own `load_lora_adapter` to the same weights. Errors name the key."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, read_lora, save_lora
from diffsynth.wan.formats import OURS_TO_DIFFUSERS, _template, diffusers_to_ours
from diffsynth.wan.lora import convert_wan_lora, convert_wan_naming


def _load(name: str):
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"wan_lora_convert_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _load("test_dit.py")  # tiny_config, make_model


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def diffusers_name(ours: str) -> str:
    template, index = _template(ours + ".weight")
    return OURS_TO_DIFFUSERS[template].removesuffix(".weight").format(*index)


def random_lora(model: nn.Module, seed: int, names=None, kohya_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA (ranks 2..4, alphas varying) on every Linear of `model`, under `names(ours)` (default ours),
    as peft keys under `transformer.` or, with `kohya_prefix`, kohya keys (underscored, lora_down / up / alpha)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (ours, module) in enumerate(sorted(linears(model).items())):
        name = names(ours) if names else ours
        rank = 2 + i % 3
        down = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
        up = 0.2 * torch.randn(module.out_features, rank, generator=g)
        if kohya_prefix is None:
            state.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
        else:
            key = kohya_prefix + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        state[f"{'transformer.' + name if kohya_prefix is None else key}.alpha"] = torch.tensor(rank * (0.5 + i % 2))
    return state


def fused(base, lora, family: bool):
    model = copy.deepcopy(base)
    apply_lora(model, convert_wan_lora(read_lora(lora)) if family else read_lora(lora), fuse=True)
    return model


def max_weight_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_diffusers_names_to_official_are_exact(tmp_path, layout):
    base = T.make_model("i2v", seed=3).eval()
    state = random_lora(base, 41, names=diffusers_name, kohya_prefix="lora_transformer_" if layout == "kohya" else None)
    lora = convert_wan_naming(state, "official", model=base)
    save_lora(lora, tmp_path / "o.safetensors")
    written = load_file(str(tmp_path / "o.safetensors"))
    assert not any(part in k for k in written for part in ("attn1", "attn2", "ffn.net", "condition_embedder"))
    assert {k.rsplit(".lora_", 1)[0] for k in written} == set(linears(base))
    want = fused(base, state, family=True)
    assert max_weight_diff(want, base) > 1e-2
    diff = max_weight_diff(fused(base, tmp_path / "o.safetensors", family=False), want)
    print(f"official file vs original: max abs weight diff {diff:.3g}")
    assert diff <= 1e-6


def test_loha_and_dora_move_with_their_names_both_ways(tmp_path):
    base = T.make_model("t2v", seed=3).eval()
    q = base.blocks[0].self_attn.q
    g = torch.Generator().manual_seed(42)
    w = [torch.randn(*s, generator=g) * 0.3 for s in ((q.out_features, 2), (2, q.in_features)) * 2]
    state = {
        f"lora_transformer_blocks_0_attn1_to_q.hada_{n}": t
        for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), w, strict=True)
    }
    state["lora_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(1.5)
    k = "transformer.blocks.1.ffn.net.0.proj"
    ffn = base.blocks[1].ffn[0]
    state[f"{k}.lora_A.weight"] = torch.randn(2, ffn.in_features, generator=g)
    state[f"{k}.lora_B.weight"] = 0.1 * torch.randn(ffn.out_features, 2, generator=g)
    state[f"{k}.lora_magnitude_vector"] = ffn.weight.norm(dim=1) * (1 + 0.1 * torch.rand(ffn.out_features, generator=g))
    save_lora(convert_wan_naming(state, "official", model=base), tmp_path / "o.safetensors", format="kohya")
    written = load_file(str(tmp_path / "o.safetensors"))
    assert "lora_unet_blocks_0_self_attn_q.hada_w1_a" in written and "lora_unet_blocks_1_ffn_0.dora_scale" in written
    want = fused(base, state, family=True)
    assert max_weight_diff(fused(base, tmp_path / "o.safetensors", family=False), want) <= 1e-6
    back = convert_wan_naming(tmp_path / "o.safetensors", "diffusers", model=base)
    assert set(back.targets) == {"blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"}


@pytest.mark.parity
def test_official_names_to_diffusers_load_in_diffusers_to_the_same_weights(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    P = _load("test_dit_parity.py")
    base = T.make_model("i2v", seed=3).eval()
    g = torch.Generator().manual_seed(43)
    state = {}  # official names, kohya layout, one rank (diffusers' peft config then needs no rank pattern)
    for name, module in sorted(linears(base).items()):
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(3, module.in_features, generator=g) / module.in_features**0.5
        state[f"{key}.lora_up.weight"] = 0.2 * torch.randn(module.out_features, 3, generator=g)
        state[f"{key}.alpha"] = torch.tensor(1.5 + len(name) % 3)
    save_file(state, str(tmp_path / "kohya.safetensors"))
    converted = convert_wan_naming(tmp_path / "kohya.safetensors", "diffusers", model=base)
    save_lora(converted, tmp_path / "d.safetensors", format="peft", prefix="transformer.")
    written = load_file(str(tmp_path / "d.safetensors"))
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in written
    assert not any("self_attn" in k or "lora_unet" in k for k in written)

    reference = P._reference(base.config)
    reference.load_state_dict(convert_wan_transformer_to_diffusers(dict(base.state_dict())), strict=True)
    reference.load_lora_adapter(written, adapter_name="converted", prefix="transformer")
    reference.fuse_lora(lora_scale=1.0)
    weights = {k.replace(".base_layer.", "."): v for k, v in reference.state_dict().items() if ".lora_" not in k}
    theirs = copy.deepcopy(base)
    theirs.load_state_dict(diffusers_to_ours(weights))
    ours = fused(base, tmp_path / "kohya.safetensors", family=False)
    assert max_weight_diff(ours, base) > 1e-2
    diff = max_weight_diff(theirs, ours)
    print(f"diffusers' loader on the converted file vs ours on the original: max abs weight diff {diff:.3g}")
    assert diff <= 1e-6


def test_cli_and_errors_name_the_key(tmp_path):
    from diffsynth.runtime.cli import main

    base = T.make_model("t2v", seed=3).eval()
    state = random_lora(base, 44, names=diffusers_name)
    save_file(state, str(tmp_path / "in.safetensors"))
    out = tmp_path / "official.safetensors"
    # the command resolves names against a full-size meta DiT; shapes are checked when the file is applied
    assert main(["lora", "convert", str(tmp_path / "in.safetensors"), "--family", "wan", "-o", str(out)]) == 0
    assert max_weight_diff(fused(base, out, family=False), fused(base, state, family=True)) <= 1e-6
    bad = {"transformer.blocks.0.attn9.to_q.lora_A.weight": torch.zeros(1, 4)}
    bad["transformer.blocks.0.attn9.to_q.lora_B.weight"] = torch.zeros(4, 1)
    with pytest.raises(LoRAError, match="attn9.to_q.lora_A.weight"):
        convert_wan_naming(bad)
    with pytest.raises(LoRAError, match="unknown LoRA naming 'comfy'"):
        convert_wan_naming(state, "comfy")


def test_wan_animate_layers_are_known_without_a_model(tmp_path):
    """The default layer names cover Wan2.2-Animate's face adapter beside the VACE blocks (both kohya-underscored)."""
    from diffsynth.wan.lora import convert_wan_naming

    state = {}
    for name, (rows, cols) in {
        "face_adapter.fuser_blocks.0.linear1_kv": (10240, 5120),
        "vace_blocks.0.cross_attn.q": (5120, 5120),
    }.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.zeros(2, cols)
        state[f"{key}.lora_up.weight"] = torch.zeros(rows, 2)
    assert sorted(convert_wan_naming(state).targets) == [
        "face_adapter.fuser_blocks.0.linear1_kv",
        "vace_blocks.0.cross_attn.q",
    ]
