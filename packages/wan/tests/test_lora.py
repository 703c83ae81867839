"""Wan LoRAs in diffusers' module names: renamed to ours, so they change the DiT exactly as the same LoRA in our
names does (diffusers' own loader is the reference in test_dit_parity.py)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, read_lora
from diffsynth.wan.formats import OURS_TO_DIFFUSERS, _template
from diffsynth.wan.lora import convert_wan_lora, wan_module_name


def _test_dit():
    spec = importlib.util.spec_from_file_location("wan_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _test_dit()


def diffusers_name(ours: str) -> str:
    template, index = _template(ours + ".weight")
    return OURS_TO_DIFFUSERS.get(template, template).removesuffix(".weight").format(*index)


@pytest.mark.parametrize(
    ("raw", "ours"),
    [
        ("blocks.3.attn1.to_q", "blocks.3.self_attn.q"),
        ("blocks.3.attn2.add_k_proj", "blocks.3.cross_attn.k_img"),
        ("blocks_3_attn1_to_out_0", "blocks.3.self_attn.o"),  # kohya-underscored diffusers name
        ("blocks_0_ffn_net_0_proj", "blocks.0.ffn.0"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder_time_proj", "time_projection.1"),
        ("vace_blocks.1.proj_out", "vace_blocks.1.after_proj"),
        ("blocks.3.self_attn.q", "blocks.3.self_attn.q"),  # ours, as they are
        ("blocks_3_self_attn_q", "blocks_3_self_attn_q"),  # ours underscored: resolve_lora's job
    ],
)
def test_module_names(raw, ours):
    assert wan_module_name(raw) == ours


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_a_diffusers_named_lora_changes_the_dit_as_the_same_lora_in_our_names(kind):
    base = T.make_model(kind, seed=2).eval()
    g = torch.Generator().manual_seed(3)
    ours_state, theirs_state = {}, {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = torch.randn(2, module.in_features, generator=g), torch.randn(module.out_features, 2, generator=g)
            for state, key in ((ours_state, name), (theirs_state, "transformer." + diffusers_name(name))):
                state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": 0.1 * up})
    assert set(theirs_state) != {"transformer." + k for k in ours_state}  # the names differ
    want, got = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(want, read_lora(ours_state))
    apply_lora(got, convert_wan_lora(read_lora(theirs_state)))
    for (name, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_one_layer_under_both_names_is_refused():
    state = {}
    for key in ("blocks.0.attn1.to_q", "blocks.0.self_attn.q"):
        state.update({f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(LoRAError, match=r"both change 'blocks\.0\.self_attn\.q'"):
        convert_wan_lora(read_lora(state))


def test_lycoris_and_dora_changes_keep_their_kind():
    state = {
        "blocks.0.attn1.to_q.lokr_w1": torch.ones(2, 2),
        "blocks.0.attn1.to_q.lokr_w2": torch.ones(4, 4),
        "blocks.0.ffn.net.2.lora_A.weight": torch.ones(2, 16),
        "blocks.0.ffn.net.2.lora_B.weight": torch.ones(8, 2),
        "blocks.0.ffn.net.2.lora_magnitude_vector": torch.ones(8),
    }
    converted = convert_wan_lora(read_lora(state))
    assert converted.targets["blocks.0.self_attn.q"].factors is not None
    assert converted.targets["blocks.0.ffn.2"].magnitude is not None
