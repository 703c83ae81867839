"""LoRAs made from other files: extraction from a fine-tune, resizing and merging, against their definitions (a
rank-r change is recovered exactly at rank r; below it the error is the truncated singular values', the least any
rank-k matrix can have; a merge changes the model as the LoRAs loaded one after the other)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, read_lora
from diffsynth.runtime.lora_tools import extract_lora, low_rank, merge_loras, resize_lora


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(12, 24)
        self.blocks = nn.ModuleList([nn.Linear(24, 24), nn.Linear(24, 24)])
        self.proj_out = nn.Linear(24, 10)

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.proj_out(x)


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(9))


def rank_r(out: int, fan_in: int, r: int, g: torch.Generator) -> torch.Tensor:
    return 0.2 * torch.randn(out, r, generator=g) @ torch.randn(r, fan_in, generator=g)


def tuned_state(base: nn.Module, ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """The base's state with a rank-r change on each named layer (the others and every bias unchanged)."""
    g = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, r in ranks.items():
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = weight + rank_r(*weight.shape, r, g)
    return state


def test_low_rank_error_is_the_truncated_singular_values():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(20, 16, generator=g, dtype=torch.float64)
    values = torch.linalg.svdvals(delta)
    for k in (1, 4, 16):
        down, up, error = low_rank(delta, k)
        assert down.shape == (k, 16) and up.shape == (20, k)
        residual = torch.linalg.norm(delta.float() - up @ down) / torch.linalg.norm(delta.float())
        optimal = (values[k:].pow(2).sum() / values.pow(2).sum()).sqrt()
        assert abs(float(residual) - float(optimal)) < 1e-5 and abs(error - float(optimal)) < 1e-5


def test_extract_recovers_a_low_rank_fine_tune_exactly(tmp_path):
    base = make_model()
    tuned = tuned_state(base, {"proj_in": 2, "blocks.1": 3})
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=3)
    assert sorted(lora.targets) == ["blocks.1", "proj_in"]  # unchanged layers and biases left out
    model = make_model()
    apply_lora(model, lora)
    want = make_model()
    want.load_state_dict(tuned)
    assert (model(X) - want(X)).abs().max().item() < 1e-5


def test_extract_below_the_true_rank_is_the_best_approximation():
    base = make_model()
    tuned = tuned_state(base, {"blocks.0": 6})
    lora = extract_lora(base.state_dict(), tuned, rank=2)
    delta = tuned["blocks.0.weight"] - base.state_dict()["blocks.0.weight"]
    values = torch.linalg.svdvals(delta.double())
    got = torch.linalg.norm(delta - lora.targets["blocks.0"].delta_weight()) / torch.linalg.norm(delta)
    assert abs(float(got) - float((values[2:].pow(2).sum() / values.pow(2).sum()).sqrt())) < 1e-5


def test_extract_refuses_checkpoints_of_different_models():
    base = make_model().state_dict()
    other = {**base, "proj_in.weight": torch.zeros(24, 13)}
    with pytest.raises(LoRAError, match=r"'proj_in.weight' is \(24, 12\) in the base and \(24, 13\)"):
        extract_lora(base, other, rank=2)
    with pytest.raises(LoRAError, match="no Linear weight differs"):
        extract_lora(base, base, rank=2)
    with pytest.raises(LoRAError, match="rank must be a whole number >= 1"):
        extract_lora(base, base, rank=0)


def lora_state(seed: int, rank: int, names=("proj_in", "blocks.0")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {n: m.weight.shape for n, m in make_model().named_modules() if isinstance(m, nn.Linear)}
    state = {}
    for name in names:
        out, fan_in = shapes[name]
        state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        state[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def test_resize_keeps_what_fits_the_rank_and_turns_lokr_into_a_pair():
    state = lora_state(3, rank=4)
    same = resize_lora(state, rank=4)
    for name, target in read_lora(state).targets.items():
        assert (same.targets[name].delta_weight() - target.delta_weight()).abs().max() < 1e-5
        assert same.targets[name].rank == 4
    g = torch.Generator().manual_seed(4)
    lokr = {"blocks.1.lokr_w1": torch.randn(2, 2, generator=g), "blocks.1.lokr_w2": torch.randn(12, 12, generator=g)}
    small = resize_lora(lokr, rank=3)
    delta = read_lora(lokr).targets["blocks.1"].delta_weight()
    values = torch.linalg.svdvals(delta.double())
    got = torch.linalg.norm(delta - small.targets["blocks.1"].delta_weight()) / torch.linalg.norm(delta)
    assert small.targets["blocks.1"].factors is None and small.targets["blocks.1"].rank == 3
    assert abs(float(got) - float((values[3:].pow(2).sum() / values.pow(2).sum()).sqrt())) < 1e-5


def test_merge_equals_loading_each_at_its_scale():
    first, second = lora_state(5, rank=2), lora_state(6, rank=3, names=("blocks.0", "proj_out"))
    want = make_model()
    apply_lora(want, first, scale=0.7)
    apply_lora(want, second, scale=-0.4)
    merged = merge_loras([(first, 0.7), (second, -0.4)])
    assert merged.targets["blocks.0"].rank == 5  # stacked, exact
    model = make_model()
    apply_lora(model, merged)
    assert (model(X) - want(X)).abs().max().item() < 1e-5
    cut = merge_loras([(first, 0.7), (second, -0.4)], rank=5)  # the summed change has rank <= 5: exact too
    model = make_model()
    apply_lora(model, cut)
    assert (model(X) - want(X)).abs().max().item() < 1e-4


def test_merge_and_resize_refuse_what_they_cannot_do_exactly():
    g = torch.Generator().manual_seed(7)
    lokr = {"blocks.1.lokr_w1": torch.randn(2, 2, generator=g), "blocks.1.lokr_w2": torch.randn(12, 12, generator=g)}
    with pytest.raises(LoRAError, match="LyCORIS change .* give a rank"):
        merge_loras([(lokr, 1.0), (lora_state(8, 2, names=("blocks.1",)), 1.0)])
    dora = {**lora_state(9, 2, names=("blocks.0",)), "blocks.0.lora_magnitude_vector": torch.ones(24)}
    with pytest.raises(LoRAError, match="is a DoRA"):
        resize_lora(dora, rank=2)


def test_lora_command_line(tmp_path):
    base = make_model()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_file(tuned_state(base, {"blocks.0": 2}), str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "extracted.safetensors"
    args = ["lora", "extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")]
    assert main([*args, "--rank", "2", "-o", str(out), "--format", "kohya"]) == 0
    assert all(key.startswith("lora_unet_") for key in read_lora(out).keys.values())
    save_file(lora_state(10, 4), str(tmp_path / "a.safetensors"))
    assert (
        main(["lora", "resize", str(tmp_path / "a.safetensors"), "--rank", "1", "-o", str(tmp_path / "r.safetensors")])
        == 0
    )
    assert {t.rank for t in read_lora(tmp_path / "r.safetensors").targets.values()} == {1}
    merge = ["lora", "merge", f"{tmp_path / 'a.safetensors'}:0.5", str(tmp_path / "r.safetensors")]
    assert main([*merge, "-o", str(tmp_path / "m.safetensors")]) == 0
    want, got = make_model(), make_model()
    apply_lora(want, tmp_path / "a.safetensors", scale=0.5)
    apply_lora(want, tmp_path / "r.safetensors")
    apply_lora(got, tmp_path / "m.safetensors")
    assert (got(X) - want(X)).abs().max().item() < 1e-5
    assert (
        main(["lora", "resize", str(tmp_path / "a.safetensors"), "--rank", "0", "-o", str(tmp_path / "x.safetensors")])
        == 2
    )
    assert not (tmp_path / "x.safetensors").exists()
