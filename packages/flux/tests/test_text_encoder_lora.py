"""A FLUX.1 LoRA file's text-encoder part (kohya's `lora_te1_` CLIP-L / `lora_te3_` T5, diffusers' `text_encoder.`)
reaches the pipeline's encoders, fused or kept apart, as each layer's change written out by hand predicts."""

from __future__ import annotations

import copy

import pytest
import torch
from diffsynth_flux_test_helpers import our_pipeline
from torch import nn

SCALE, ALPHA, RANK = 0.7, 3.0, 2


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def lora_file(pipe, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(a LoRA file with a DiT layer and every CLIP / T5 Linear, each layer's change by slot)."""
    g = torch.Generator().manual_seed(4)
    state, changes = {}, {"text_encoder_1": {}, "text_encoder_2": {}}
    dit_key = "lora_unet_double_blocks_0_img_attn_proj"
    hidden = pipe.dit.config.hidden_size
    state[f"{dit_key}.lora_down.weight"] = torch.randn(RANK, hidden, generator=g) * 0.1
    state[f"{dit_key}.lora_up.weight"] = torch.randn(hidden, RANK, generator=g) * 0.1
    for slot, prefix in (("text_encoder_1", "text_model."), ("text_encoder_2", "")):
        for name, layer in linears(getattr(pipe, slot)).items():
            down = torch.randn(RANK, layer.in_features, generator=g) / layer.in_features**0.5
            up = 0.5 * torch.randn(layer.out_features, RANK, generator=g)
            if layout == "kohya":
                key = ("lora_te1_" if slot == "text_encoder_1" else "lora_te3_") + (prefix + name).replace(".", "_")
                state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
                state[f"{key}.alpha"] = torch.tensor(ALPHA)
                changes[slot][name] = SCALE * ALPHA / RANK * (up @ down)
            else:  # diffusers / peft: no alpha
                key = ("text_encoder." if slot == "text_encoder_1" else "text_encoder_2.") + prefix + name
                state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
                changes[slot][name] = SCALE * (up @ down)
    return state, changes


def embeds(pipe):
    with torch.no_grad():
        out = pipe.encode_prompt(["a red circle", "a cat"])
    return out.t5, out.pooled


@pytest.fixture(scope="module")
def base(tiny_repo):
    return our_pipeline(tiny_repo)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("fuse", [True, False])
def test_text_encoder_part_is_applied_as_written_out(base, layout, fuse):
    pipe = copy.deepcopy(base)
    state, changes = lora_file(pipe, layout)
    want = copy.deepcopy(base)
    with torch.no_grad():
        for slot, layers in changes.items():
            for name, change in layers.items():
                getattr(want, slot).get_submodule(name).weight += change
    pipe.load_lora(state, scale=SCALE, fuse=fuse)
    got_t5, got_pooled = embeds(pipe)
    want_t5, want_pooled = embeds(want)
    base_t5, base_pooled = embeds(base)
    assert (want_t5 - base_t5).abs().max() > 1e-3 and (want_pooled - base_pooled).abs().max() > 1e-3
    torch.testing.assert_close(got_t5, want_t5, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got_pooled, want_pooled, atol=1e-4, rtol=1e-3)
    if fuse:  # the DiT part went in too
        assert not torch.equal(
            pipe.dit.double_blocks[0].img_attn.proj.weight, base.dit.double_blocks[0].img_attn.proj.weight
        )
    if not fuse:
        pipe.clear_loras()  # the DiT's and the encoders' unfused LoRAs
        for got, plain in zip(embeds(pipe), embeds(base), strict=True):
            assert torch.equal(got, plain)


def test_a_pipeline_without_the_encoder_warns_and_applies_the_rest(base, caplog):
    pipe = copy.deepcopy(base)
    state, _ = lora_file(pipe, "kohya")
    pipe.text_encoder_2 = None
    before = pipe.dit.double_blocks[0].img_attn.proj.weight.clone()
    with caplog.at_level("WARNING"):
        pipe.load_lora(state)
    assert "no text_encoder_2 loaded" in caplog.text
    assert not torch.equal(pipe.dit.double_blocks[0].img_attn.proj.weight, before)


def expected(base, changes):
    """`base` with each text-encoder layer's change added by hand."""
    want = copy.deepcopy(base)
    with torch.no_grad():
        for slot, layers in changes.items():
            for name, change in layers.items():
                getattr(want, slot).get_submodule(name).weight += change
    return want


@pytest.mark.parametrize("fuse", [True, False])
def test_a_text_encoder_only_file_reaches_the_encoders(base, tmp_path, fuse):
    """kohya's --network_train_text_encoder_only writes no DiT entries: the encoders get the file, the DiT
    nothing (before, reading the DiT's part refused it)."""
    from safetensors.torch import save_file

    pipe = copy.deepcopy(base)
    state, changes = lora_file(pipe, "kohya")
    path = tmp_path / "te_only.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("lora_unet_")}, str(path))
    name = pipe.load_lora(str(path), scale=SCALE, fuse=fuse)
    for got, want in zip(embeds(pipe), embeds(expected(base, changes)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert torch.equal(pipe.dit.double_blocks[0].img_attn.proj.weight, base.dit.double_blocks[0].img_attn.proj.weight)
    if not fuse:
        assert pipe.list_loras() == {name: SCALE}
        pipe.clear_loras()
        for got, plain in zip(embeds(pipe), embeds(base), strict=True):
            assert torch.equal(got, plain)


def test_pipe_set_lora_scale_switches_the_encoders_part_too(base):
    """A file's DiT and text-encoder parts share its name: `pipe.set_lora_scale` sets both (the runtime's
    `set_lora_scale(pipe.dit, ...)` left the encoders at the old scale)."""
    from diffsynth.runtime.lora import list_loras

    pipe = copy.deepcopy(base)
    state, changes = lora_file(pipe, "kohya")
    pipe.load_lora(state, scale=SCALE, fuse=False, name="style")
    assert pipe.list_loras() == {"style": SCALE}
    pipe.set_lora_scale("style", 0.0)
    for slot in ("dit", "text_encoder_1", "text_encoder_2"):
        assert list_loras(getattr(pipe, slot)) == {"style": 0.0}
    for got, plain in zip(embeds(pipe), embeds(base), strict=True):
        assert torch.equal(got, plain)
    pipe.set_lora_scale("style", SCALE)
    for got, want in zip(embeds(pipe), embeds(expected(base, changes)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
