"""DoRA files (peft's `lora_magnitude_vector`, LyCORIS' `dora_scale`): against peft's DoRA layers (parity) and
against the decomposition written out here, fused and unfused, at several strengths."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, clear_loras, read_lora, resolve_lora, save_lora, set_lora_scale


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Linear(8, 16)
        self.to_q = nn.Linear(16, 16)
        self.ff_in = nn.Linear(16, 24, bias=False)
        self.ff_out = nn.Linear(24, 16)

    def forward(self, x):
        x = self.x_embedder(x)
        x = x + torch.tanh(self.to_q(x))
        return x + self.ff_out(torch.nn.functional.gelu(self.ff_in(x)))


SHAPES = {"x_embedder": (16, 8), "to_q": (16, 16), "ff_in": (24, 16), "ff_out": (16, 24)}  # (out, in)


def make_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel().eval()


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))


def dora_file(column_wise: bool = False, rank: int = 3, alpha: float = 2.0, seed: int = 1) -> dict:
    """LoRA pairs with LyCORIS `dora_scale` magnitudes: [out, 1] (row norms), or [1, in] with `column_wise`. The
    magnitudes are the base weight's norms perturbed, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    base = make_model()
    state = {}
    for name, (out, fan_in) in SHAPES.items():
        key = f"lora_unet_{name}"
        state[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.3
        state[f"{key}.alpha"] = torch.tensor(alpha)
        weight = base.get_submodule(name).weight.detach()
        norms = weight.norm(dim=0, keepdim=True) if column_wise else weight.norm(dim=1, keepdim=True)
        state[f"{key}.dora_scale"] = norms * (1 + 0.3 * torch.rand(norms.shape, generator=g))
    return state


def written_out(state: dict, strength: float) -> nn.Module:
    """The model with W_s = (W + s dW) * (s (m / ||W + s dW|| - 1) + 1), norms over rows ([out, 1] magnitude) or
    columns ([1, in]), in float64."""
    model = make_model()
    with torch.no_grad():
        for name in SHAPES:
            key = f"lora_unet_{name}"
            down, up = state[f"{key}.lora_down.weight"].double(), state[f"{key}.lora_up.weight"].double()
            delta = float(state[f"{key}.alpha"]) / down.shape[0] * (up @ down)
            layer = model.get_submodule(name)
            merged = layer.weight.double() + strength * delta
            magnitude = state[f"{key}.dora_scale"].double()
            norm = merged.norm(dim=1, keepdim=True) if magnitude.shape[1] == 1 else merged.norm(dim=0, keepdim=True)
            layer.weight.copy_((merged * (strength * (magnitude / norm - 1) + 1)).float())
    return model


@pytest.mark.parametrize("column_wise", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("fuse", [True, False])
def test_dora_equals_the_written_out_decomposition(column_wise, strength, fuse):
    state = dora_file(column_wise)
    model = make_model()
    apply_lora(model, state, scale=strength, fuse=fuse)
    want = written_out(state, strength)(X)
    assert (want - make_model()(X)).abs().max() > 0.05  # the DoRA changes the output
    assert (model(X) - want).abs().max().item() < 1e-5


def test_unfused_dora_follows_its_strength_and_clears():
    state = dora_file()
    model = make_model()
    name = apply_lora(model, state, fuse=False)
    set_lora_scale(model, name, 0.6)
    assert (model(X) - written_out(state, 0.6)(X)).abs().max().item() < 1e-5
    set_lora_scale(model, name, 0.0)
    assert torch.equal(model(X), make_model()(X))
    set_lora_scale(model, name, 1.0)
    assert (model(X) - written_out(state, 1.0)(X)).abs().max().item() < 1e-5
    clear_loras(model)
    assert torch.equal(model(X), make_model()(X))


@pytest.mark.parametrize("fmt", ["diffsynth", "peft", "kohya"])
def test_saved_dora_reads_back_as_the_same_change(tmp_path, fmt):
    state = dora_file(column_wise=fmt == "kohya")
    model = make_model()
    save_lora(resolve_lora(model, read_lora(state)), tmp_path / "dora.safetensors", format=fmt)
    assert any(key.endswith(".dora_scale") for key in load_file(tmp_path / "dora.safetensors"))
    apply_lora(model, tmp_path / "dora.safetensors")
    want = written_out(state, 1.0)(X)
    assert (model(X) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("fmt", ["diffsynth", "peft", "kohya"])
def test_saving_a_dora_for_other_tools_says_diffusers_would_drop_its_magnitudes(tmp_path, caplog, fmt):
    """diffusers' loaders filter `.dora_scale` out and apply the rest as a plain LoRA: the peft / kohya files say so
    when written (our own format is for `load_lora`); a plain LoRA says nothing."""
    model = make_model()
    plain = {k: v for k, v in dora_file().items() if not k.endswith(".dora_scale")}
    with caplog.at_level(logging.WARNING, logger="diffsynth.runtime.lora"):
        save_lora(resolve_lora(model, read_lora(plain)), tmp_path / "plain.safetensors", format=fmt)
        assert "diffusers" not in caplog.text
        save_lora(resolve_lora(model, read_lora(dora_file())), tmp_path / "dora.safetensors", format=fmt)
    noted = "dora.safetensors: a DoRA's magnitudes are written as .dora_scale" in caplog.text
    assert noted == (fmt != "diffsynth")
    assert not noted or "diffusers' load_lora_weights drops them" in caplog.text


def test_a_magnitude_of_the_wrong_shape_names_the_layer():
    state = dora_file()
    state["lora_unet_to_q.dora_scale"] = torch.ones(8, 1)
    with pytest.raises(LoRAError, match=r"'to_q'.*DoRA magnitude \(8, 1\) vs weight \(16, 16\)"):
        apply_lora(make_model(), state)
    state["lora_unet_to_q.dora_scale"] = torch.ones(2, 3, 4)
    with pytest.raises(LoRAError, match=r"'lora_unet_to_q\.dora_scale' has shape \(2, 3, 4\)"):
        read_lora(state)


@pytest.mark.parity
@pytest.mark.parametrize("fuse", [True, False])
def test_equals_peft_dora(fuse):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=list(SHAPES), use_dora=True, init_lora_weights=False)
    torch.manual_seed(4)
    wrapped = peft.get_peft_model(make_model(), config).eval()
    with torch.no_grad():  # trained magnitudes differ from the base norms peft starts them at
        for module in wrapped.modules():
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if magnitudes is not None and "default" in magnitudes:
                magnitudes["default"].weight.mul_(1 + 0.3 * torch.rand_like(magnitudes["default"].weight))
    state = dict(peft.get_peft_model_state_dict(wrapped))
    assert any(key.endswith("lora_magnitude_vector") for key in state)
    state.update({f"base_model.model.{name}.alpha": torch.tensor(6.0) for name in SHAPES})
    with torch.no_grad():
        want = wrapped(X)
    ours = make_model()
    apply_lora(ours, copy.deepcopy(state), fuse=fuse)
    with torch.no_grad():
        assert (want - make_model()(X)).abs().max() > 0.05
        assert (ours(X) - want).abs().max().item() < 1e-5
