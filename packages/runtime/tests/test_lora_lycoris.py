"""LyCORIS LoHa and LoKr files: read in every naming, applied fused and unfused, against peft's layers (parity)
and against the products written out with torch (the definition of each format)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import (
    LoRATarget,
    LoRAWeights,
    apply_lora,
    clear_loras,
    read_lora,
    resolve_lora,
    save_lora,
)
from diffsynth.runtime.lora_factors import FIELDS as FACTOR_FIELDS
from diffsynth.runtime.lora_factors import KroneckerDelta, RowStackedDelta


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.ff_in = nn.Linear(dim, hidden)
        self.ff_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = x + torch.tanh(self.to_q(x))
        return x + self.ff_out(torch.nn.functional.gelu(self.ff_in(x)))


class TinyModel(nn.Module):
    """Widths with several Kronecker factorisations (16 = 4 x 4, 24 = 4 x 6, 64 = 8 x 8)."""

    def __init__(self, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.x_embedder = nn.Linear(8, dim)
        self.layers = nn.ModuleList([Block(dim, hidden), Block(dim, hidden)])

    def forward(self, x):
        x = self.x_embedder(x)
        for layer in self.layers:
            x = layer(x)
        return x


SHAPES = {  # target -> (out, in)
    "layers.0.to_q": (16, 16),
    "layers.0.ff_in": (24, 16),
    "layers.1.ff_out": (16, 24),
    "x_embedder": (16, 8),
}


def make_model(seed: int = 0, **kwargs) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**kwargs).eval()


def inputs(dim: int = 8) -> torch.Tensor:
    return torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(3))


def randn(*shape, g):
    return torch.randn(*shape, generator=g) * 0.2


def loha_file(prefix: str = "lycoris_", rank: int = 3, alpha: float | None = 2.0, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, fan_in) in SHAPES.items():
        key = prefix + (name.replace(".", "_") if prefix.endswith("_") else name)
        state[f"{key}.hada_w1_a"], state[f"{key}.hada_w1_b"] = randn(out, rank, g=g), randn(rank, fan_in, g=g)
        state[f"{key}.hada_w2_a"], state[f"{key}.hada_w2_b"] = randn(out, rank, g=g), randn(rank, fan_in, g=g)
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def lokr_file(prefix: str = "lycoris_", w2_rank: int | None = None, alpha: float | None = 4.0, seed: int = 2) -> dict:
    """w1 [4, 4] (or [4, 2] for an input of 8) and w2 the rest: a full matrix, or a pair of rank `w2_rank`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, fan_in) in SHAPES.items():
        key = prefix + (name.replace(".", "_") if prefix.endswith("_") else name)
        state[f"{key}.lokr_w1"] = randn(4, 4 if fan_in % 4 == 0 else 2, g=g)
        b_out, b_in = out // 4, fan_in // state[f"{key}.lokr_w1"].shape[1]
        if w2_rank is None:
            state[f"{key}.lokr_w2"] = randn(b_out, b_in, g=g)
        else:
            state[f"{key}.lokr_w2_a"], state[f"{key}.lokr_w2_b"] = randn(b_out, w2_rank, g=g), randn(w2_rank, b_in, g=g)
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def written_out_delta(state: dict, key: str) -> torch.Tensor:
    """A target's change from the format's definition: LoHa (w1a w1b) * (w2a w2b) * alpha / rank; LoKr
    kron(w1, w2) * alpha / rank when w2 is a pair, else kron(w1, w2)."""
    f = {k.removeprefix(key + "."): v.double() for k, v in state.items() if k.startswith(key + ".")}
    if "hada_w1_a" in f:
        scale = f["alpha"].item() / f["hada_w1_b"].shape[0] if "alpha" in f else 1.0
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * scale
    if "lokr_w2" in f:
        return torch.kron(f["lokr_w1"], f["lokr_w2"])
    scale = f["alpha"].item() / f["lokr_w2_b"].shape[0] if "alpha" in f else 1.0
    return torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"]) * scale


def expected_model(model: nn.Module, state: dict, prefix: str, scale: float = 1.0) -> nn.Module:
    want = copy.deepcopy(model)
    with torch.no_grad():
        for name in SHAPES:
            key = prefix + (name.replace(".", "_") if prefix.endswith("_") else name)
            layer = want.get_submodule(name)
            layer.weight.copy_((layer.weight.double() + scale * written_out_delta(state, key)).float())
    return want


FILES = {
    "loha": lambda prefix: loha_file(prefix),
    "loha_no_alpha": lambda prefix: loha_file(prefix, alpha=None),
    "lokr_full": lambda prefix: lokr_file(prefix),
    "lokr_w2_pair": lambda prefix: lokr_file(prefix, w2_rank=2),
}


@pytest.mark.parametrize("kind", sorted(FILES))
@pytest.mark.parametrize("prefix", ["lycoris_", "lora_unet_", "diffusion_model.", "base_model.model."])
@pytest.mark.parametrize("fuse", [True, False])
def test_applied_change_equals_the_written_out_product(kind, prefix, fuse):
    model, x = make_model(), inputs()
    state = FILES[kind](prefix)
    want = expected_model(model, state, prefix, scale=0.7)(x)
    apply_lora(model, state, scale=0.7, fuse=fuse)
    got = model(x)
    assert (got - want).abs().max().item() < 1e-5
    if not fuse:
        clear_loras(model)
        assert torch.equal(model(x), make_model()(x))


def test_kronecker_forward_without_building_the_change():
    """`KroneckerDelta.linear` reshapes the input instead of building kron(w1, w2); it must equal x @ delta^T."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 6 * 5, generator=g, dtype=torch.float64)
    full = torch.randn(4, 5, generator=g).double()
    pair = (torch.randn(4, 2, generator=g).double(), torch.randn(2, 5, generator=g).double())
    for w2 in (full, pair):
        delta = KroneckerDelta(torch.randn(3, 6, generator=g).double(), w2, 0.5)
        assert delta.shape == (12, 30)
        want = x @ delta.delta().T
        assert (delta.linear(x) - want).abs().max().item() < 1e-12


def test_row_stacked_parts_and_swapped_halves():
    g = torch.Generator().manual_seed(1)
    a = KroneckerDelta(torch.randn(2, 2, generator=g), torch.randn(2, 3, generator=g), 1.0)  # [4, 6]
    b = KroneckerDelta(torch.randn(1, 2, generator=g), torch.randn(2, 3, generator=g), 2.0)  # [2, 6]
    stacked = RowStackedDelta(10, 6, ((0, a), (6, b)), swap_halves=True)
    full = torch.zeros(10, 6)
    full[0:4], full[6:8] = a.delta(), b.delta()
    full = torch.cat([full[5:], full[:5]])
    assert torch.equal(stacked.delta(), full)
    x = torch.randn(3, 6, generator=g)
    assert (stacked.linear(x) - x @ full.T).abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", sorted(FILES))
@pytest.mark.parametrize("fmt", ["diffsynth", "peft", "kohya"])
def test_saved_factors_read_back_as_the_same_change(tmp_path, kind, fmt):
    """save_lora writes LyCORIS keys (with the alpha that gives the same scale; two full LoKr factors carry it in
    the first), which read back as the same model change."""
    model, x = make_model(), inputs()
    state = FILES[kind]("diffusion_model.")
    save_lora(resolve_lora(model, read_lora(state)), tmp_path / "saved.safetensors", format=fmt)
    saved = load_file(tmp_path / "saved.safetensors")
    fields = {key.rsplit(".", 1)[1] for key in saved}
    assert fields <= {"alpha", *FACTOR_FIELDS} and fields & set(FACTOR_FIELDS)
    apply_lora(model, tmp_path / "saved.safetensors")
    want = expected_model(make_model(), state, "diffusion_model.")(x)
    assert (model(x) - want).abs().max().item() < 1e-5


def test_a_change_placed_on_rows_is_saved_as_a_diff(tmp_path):
    g = torch.Generator().manual_seed(5)
    part = KroneckerDelta(torch.randn(2, 2, generator=g), torch.randn(4, 4, generator=g), 0.5)  # [8, 8]
    placed = RowStackedDelta(16, 8, ((8, part),))
    save_lora(LoRAWeights({"x_embedder": LoRATarget(factors=placed)}), tmp_path / "rows.safetensors")
    saved = load_file(tmp_path / "rows.safetensors")
    assert list(saved) == ["x_embedder.diff"]
    assert torch.equal(saved["x_embedder.diff"], placed.delta())


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"x_embedder.hada_w1_a": torch.zeros(16, 2), "x_embedder.hada_w1_b": torch.zeros(2, 8)},
            r"'x_embedder\.hada_w1_a'.*LoHa needs .*hada_w2_a, hada_w2_b missing",
        ),
        (
            {"x_embedder.lokr_w1": torch.zeros(4, 4), "x_embedder.lokr_w2": torch.zeros(4, 2, 1, 1)},
            r"lokr_w2 has shape \(4, 2, 1, 1\).*not convolution",
        ),
        (
            {"x_embedder.lokr_w1": torch.zeros(4, 4), "x_embedder.lokr_t2": torch.zeros(2, 2, 3, 3)},
            "lokr_t2, a Tucker",
        ),
        (
            {
                "x_embedder.lokr_w1": torch.zeros(4, 4),
                "x_embedder.lokr_w2": torch.zeros(4, 2),
                "x_embedder.lora_A.weight": torch.zeros(2, 8),
                "x_embedder.lora_B.weight": torch.zeros(16, 2),
            },
            "LyCORIS factors and also LoRA matrices",
        ),
        (
            {"x_embedder.lokr_w1_a": torch.zeros(4, 2), "x_embedder.lokr_w1_b": torch.zeros(3, 4)},
            r"lokr_w1_a \(4, 2\) @ lokr_w1_b \(3, 4\) do not multiply",
        ),
        (
            {"x_embedder.dora_scale": torch.zeros(16, 1)},
            "gives a DoRA magnitude for 'x_embedder' but no LoRA matrices",
        ),
    ],
)
def test_bad_files_are_named(state, message):
    with pytest.raises(LoRAError, match=message):
        read_lora(state)


def test_a_change_of_the_wrong_shape_names_the_layer():
    state = {"x_embedder.lokr_w1": torch.zeros(4, 4), "x_embedder.lokr_w2": torch.zeros(4, 4)}  # [16, 16]
    with pytest.raises(LoRAError, match=r"'x_embedder'.*KroneckerDelta of shape \(16, 16\) vs weight \(16, 8\)"):
        apply_lora(make_model(), state)


# ----------------------------------------------------------------------------------- against peft
def _peft_state(config) -> tuple[nn.Module, dict]:
    """A peft-wrapped TinyModel with random factors, and its state dict as a LyCORIS file (alpha written in)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    wrapped = peft.get_peft_model(make_model(dim=64, hidden=96), config).eval()
    state = dict(peft.get_peft_model_state_dict(wrapped))
    names = {key.rsplit(".", 1)[0] for key in state}
    state.update({f"{name}.alpha": torch.tensor(float(config.alpha)) for name in names})
    return wrapped, state


def _peft_configs():
    peft = pytest.importorskip("peft")
    targets = ["to_q", "ff_in", "ff_out", "x_embedder"]
    return {
        "loha": peft.LoHaConfig(r=4, alpha=6, target_modules=targets, init_weights=False),
        "lokr_w2_pair": peft.LoKrConfig(r=2, alpha=6, target_modules=targets, init_weights=False),
        "lokr_both_pairs": peft.LoKrConfig(
            r=2, alpha=6, target_modules=targets, init_weights=False, decompose_both=True
        ),
    }


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["loha", "lokr_w2_pair", "lokr_both_pairs"])
@pytest.mark.parametrize("fuse", [True, False])
def test_equals_peft(kind, fuse):
    wrapped, state = _peft_state(_peft_configs()[kind])
    if kind == "lokr_both_pairs":
        assert any(k.endswith("lokr_w1_a") for k in state) and any(k.endswith("lokr_w2_a") for k in state)
    x = inputs()
    with torch.no_grad():
        want = wrapped(x)
    ours = make_model(dim=64, hidden=96)
    apply_lora(ours, state, fuse=fuse)
    with torch.no_grad():
        got = ours(x)
    assert (got - want).abs().max().item() < 1e-5
