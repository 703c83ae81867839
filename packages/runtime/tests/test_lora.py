"""LoRA reading, fused/unfused application, scales, clearing, errors and export round trips."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffsynth.runtime.errors import ConfigError, LoRAError
from diffsynth.runtime.lora import (
    LoRATarget,
    LoRAWeights,
    apply_lora,
    clear_loras,
    list_loras,
    load_lora,
    read_lora,
    read_lora_state,
    resolve_lora,
    save_lora,
    set_lora_scale,
)

DIM, HIDDEN, RANK = 8, 16, 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(DIM, DIM)
        self.to_k = nn.Linear(DIM, DIM)
        self.to_v = nn.Linear(DIM, DIM)
        self.to_out = nn.ModuleList([nn.Linear(DIM, DIM)])

    def forward(self, x):
        return self.to_out[0](self.to_q(x) * torch.sigmoid(self.to_k(x)) + self.to_v(x))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class TinyDiT(nn.Module):
    """Z-Image-like names, with underscores inside module names to exercise kohya resolution."""

    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Linear(4, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(DIM, 4)

    def forward(self, x):
        x = self.x_embedder(x)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer.linear(x)


TARGETS = {  # name -> (in, out)
    "layers.0.attention.to_q": (DIM, DIM),
    "layers.1.attention.to_out.0": (DIM, DIM),
    "layers.0.feed_forward.w1": (DIM, HIDDEN),
    "x_embedder": (4, DIM),
    "final_layer.linear": (DIM, 4),
}


def make_model(seed: int = 0) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT().eval()


def make_lora(seed: int = 1, alpha: float | None = 2.0) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    targets = {
        name: LoRATarget(
            down=torch.randn(RANK, fan_in, generator=g), up=torch.randn(fan_out, RANK, generator=g), alpha=alpha
        )
        for name, (fan_in, fan_out) in TARGETS.items()
    }
    return LoRAWeights(targets=targets)


def to_state_dict(lora: LoRAWeights, layout: str) -> dict[str, torch.Tensor]:
    """Write keys by hand (independently of save_lora) in the layouts found in the wild."""
    out = {}
    for name, t in lora.targets.items():
        if layout == "peft":
            key, a, b = f"transformer.{name}", "lora_A.weight", "lora_B.weight"
        elif layout == "peft_adapter":
            key, a, b = f"base_model.model.{name}", "lora_A.default.weight", "lora_B.default.weight"
        elif layout == "kohya":
            key, a, b = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "comfy_dotted":
            key, a, b = f"diffusion_model.{name}", "lora_down.weight", "lora_up.weight"
        else:
            raise AssertionError(layout)
        out[f"{key}.{a}"] = t.down
        out[f"{key}.{b}"] = t.up
        if t.alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(t.alpha)
    return out


def expected_weights(model: nn.Module, lora: LoRAWeights, scale: float) -> dict[str, torch.Tensor]:
    """W + scale * alpha / r * up @ down, computed here in float64."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, t in lora.targets.items():
        alpha = RANK if t.alpha is None else t.alpha
        delta = scale * alpha / RANK * (t.up.double() @ t.down.double())
        state[f"{name}.weight"] = (state[f"{name}.weight"].double() + delta).float()
    return state


X = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("layout", ["peft", "peft_adapter", "kohya", "comfy_dotted"])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_fused_equals_independent_delta(layout, alpha):
    lora = make_lora(alpha=alpha)
    model = make_model()
    want = expected_weights(model, lora, scale=0.7)
    assert apply_lora(model, read_lora(to_state_dict(lora, layout)), scale=0.7) is None
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_unfused_forward_equals_fused_forward(layout):
    state = to_state_dict(make_lora(), layout)
    fused, unfused = make_model(), make_model()
    load_lora(fused, state, scale=0.5)
    name = load_lora(unfused, state, scale=0.5, fuse=False)
    assert name == "lora_0" and list_loras(unfused) == {"lora_0": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(unfused(X), fused(X), rtol=1e-5, atol=1e-5)


def test_two_unfused_loras_add_up_and_scales_change():
    a, b = make_lora(seed=1), make_lora(seed=2, alpha=None)
    model, reference = make_model(), make_model()
    apply_lora(model, a, scale=0.3, fuse=False, name="style")
    apply_lora(model, b, scale=-0.8, fuse=False, name="subject")
    apply_lora(reference, a, scale=0.3)
    apply_lora(reference, b, scale=-0.8)
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-5)
        set_lora_scale(model, "subject", 0.0)
        set_lora_scale(model, "style", 1.5)
        only_a = make_model()
        apply_lora(only_a, a, scale=1.5)
        torch.testing.assert_close(model(X), only_a(X), rtol=1e-5, atol=1e-5)
    assert list_loras(model) == {"style": 1.5, "subject": 0.0}


def test_clear_restores_exact_outputs_and_state_dict():
    model = make_model()
    with torch.no_grad():
        before_out = model(X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = {n: type(m) for n, m in model.named_modules()}
    apply_lora(model, make_lora(seed=1), fuse=False, name="a")
    apply_lora(model, make_lora(seed=2), fuse=False, name="b")
    assert list(model.state_dict().keys()) == list(before.keys())  # unchanged keys while attached
    with torch.no_grad():
        assert not torch.equal(model(X), before_out)
    clear_loras(model, "a")
    assert list_loras(model) == {"b": 1.0}
    clear_loras(model)
    with torch.no_grad():
        assert torch.equal(model(X), before_out)
    after = model.state_dict()
    assert list(after.keys()) == list(before.keys())
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert all(not m._forward_hooks for m in model.modules())
    assert list_loras(model) == {}


def test_reusing_a_name_replaces_that_lora():
    model, reference = make_model(), make_model()
    apply_lora(model, make_lora(seed=1), fuse=False, name="x")
    apply_lora(model, make_lora(seed=2), fuse=False, name="x", scale=0.5)
    apply_lora(reference, make_lora(seed=2), scale=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-5)


def test_lora_on_other_dtype_than_weights():
    lora = make_lora()  # float32 LoRA
    unfused, fused = make_model().to(torch.bfloat16), make_model().to(torch.bfloat16)
    want = expected_weights(make_model().to(torch.bfloat16), lora, scale=1.0)  # from the bf16 weights
    apply_lora(fused, lora)
    for name in TARGETS:
        w = fused.get_submodule(name).weight
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(w.float(), want[f"{name}.weight"], rtol=2**-8, atol=0)  # one bf16 rounding
    apply_lora(unfused, lora, fuse=False)
    with torch.no_grad():
        out = unfused(X.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        reference = make_model().to(torch.bfloat16).float()  # the same base weights, computed in float32
        apply_lora(reference, lora)
        want = reference(X.to(torch.bfloat16).float())
        assert (out.float() - want).abs().max() < 0.02 * want.abs().max()  # bf16 activations only


def test_diff_and_diff_b_deltas():
    model = make_model()
    g = torch.Generator().manual_seed(3)
    diff, diff_b = torch.randn(DIM, DIM, generator=g), torch.randn(DIM, generator=g)
    state = {
        "diffusion_model.layers.0.attention.to_k.diff": diff,
        "diffusion_model.layers.0.attention.to_k.diff_b": diff_b,
    }
    lin = model.get_submodule("layers.0.attention.to_k")
    want_w, want_b = lin.weight + 0.5 * diff, lin.bias + 0.5 * diff_b
    unfused = make_model()
    apply_lora(model, state, scale=0.5)
    torch.testing.assert_close(lin.weight, want_w.detach())
    torch.testing.assert_close(lin.bias, want_b.detach())
    apply_lora(unfused, state, scale=0.5, fuse=False)
    with torch.no_grad():
        torch.testing.assert_close(unfused(X), model(X), rtol=1e-5, atol=1e-5)


def test_kohya_names_resolve_through_underscores():
    lora = read_lora(to_state_dict(make_lora(), "kohya"))
    assert "layers_0_feed_forward_w1" in lora.targets
    resolved = resolve_lora(make_model(), lora)
    assert sorted(resolved.targets) == sorted(TARGETS)


def test_kohya_name_fitting_two_modules_is_refused():
    model = nn.Module()
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(2, 2)
    model.a = nn.Module()
    model.a.b_c = nn.Linear(2, 2)
    state = {"lora_unet_a_b_c.lora_down.weight": torch.zeros(1, 2), "lora_unet_a_b_c.lora_up.weight": torch.zeros(2, 1)}
    with pytest.raises(LoRAError, match=r"'a_b_c' fits several modules.*a\.b_c.*key_map"):
        apply_lora(model, state)
    apply_lora(model, state, key_map=lambda name: "a.b_c")  # the family mapper decides


def test_key_map_renames_and_skips():
    lora = make_lora()
    state = {f"other.{k}": v for k, v in to_state_dict(lora, "peft").items()}
    state["junk_net.lora_A.weight"] = torch.zeros(1, 3)
    state["junk_net.lora_B.weight"] = torch.zeros(3, 1)

    def key_map(name):
        return None if name.startswith("junk") else name.removeprefix("other.transformer.")

    model, reference = make_model(), make_model()
    apply_lora(model, state, key_map=key_map)
    apply_lora(reference, lora)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_text_encoder_keys_are_skipped():
    state = to_state_dict(make_lora(), "kohya")
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 3)
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(3, RANK)
    lora = read_lora(state)
    assert len(lora) == len(TARGETS) and len(lora.skipped) == 2


def test_save_read_round_trip(tmp_path):
    lora = make_lora(alpha=8.0)
    lora.targets["layers.0.attention.to_k"] = LoRATarget(diff=torch.randn(DIM, DIM), diff_b=torch.randn(DIM))
    for fmt in ("peft", "kohya", "diffsynth"):
        path = tmp_path / f"{fmt}.safetensors"
        save_lora(lora, path, format=fmt)
        back = resolve_lora(make_model(), read_lora(path))
        assert back.targets.keys() == lora.targets.keys(), fmt
        for name, t in lora.targets.items():
            b = back.targets[name]
            for field in ("down", "diff", "diff_b"):
                want, got = getattr(t, field), getattr(b, field)
                assert (want is None and got is None) or torch.equal(want, got), (fmt, name, field)
            if t.down is not None:
                if fmt in ("diffsynth", "peft"):  # alpha folded into up: same delta, no alpha key
                    assert b.alpha is None
                    torch.testing.assert_close(b.up, t.up * t.factor)
                else:
                    assert b.alpha == t.alpha and torch.equal(b.up, t.up)
    exact = make_lora(alpha=None)
    save_lora(exact, tmp_path / "exact.safetensors", format="diffsynth")
    back = read_lora(tmp_path / "exact.safetensors")
    assert all(
        torch.equal(back.targets[n].up, t.up) and back.targets[n].alpha is None for n, t in exact.targets.items()
    )


def test_peft_files_carry_no_alpha_and_the_same_delta(tmp_path):
    """diffusers' loaders refuse non-LoRA keys in peft-named files: no alpha is written, one other than the rank
    is folded into lora_B (reading it back gives the same delta); kohya files always carry theirs."""
    for alpha in (float(RANK), 2.0 * RANK):
        lora = make_lora(alpha=alpha)
        save_lora(lora, tmp_path / "p.safetensors", format="peft")
        save_lora(lora, tmp_path / "k.safetensors", format="kohya")
        assert not any(k.endswith(".alpha") for k in load_file(tmp_path / "p.safetensors"))
        assert any(k.endswith(".alpha") for k in load_file(tmp_path / "k.safetensors"))
        for path in (tmp_path / "p.safetensors", tmp_path / "k.safetensors"):
            back = resolve_lora(make_model(), read_lora(path))
            for name, t in lora.targets.items():
                torch.testing.assert_close(back.targets[name].delta_weight(), t.delta_weight(), rtol=0, atol=0)


def test_saved_layouts_use_the_expected_keys(tmp_path):
    lora = make_lora()
    save_lora(lora, tmp_path / "k.safetensors", format="kohya")
    save_lora(lora, tmp_path / "p.safetensors", format="peft")
    save_lora(lora, tmp_path / "d.safetensors", format="diffsynth")
    assert "lora_unet_layers_0_feed_forward_w1.lora_down.weight" in load_file(tmp_path / "k.safetensors")
    assert "lora_unet_layers_0_feed_forward_w1.alpha" in load_file(tmp_path / "k.safetensors")
    assert "diffusion_model.layers.0.feed_forward.w1.lora_B.weight" in load_file(tmp_path / "p.safetensors")
    assert set(load_file(tmp_path / "d.safetensors")) == {f"{n}.lora_{ab}.weight" for n in TARGETS for ab in "AB"}


# ----------------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(LoRAError, match="nope.safetensors does not exist"):
        load_lora(make_model(), tmp_path / "nope.safetensors")


def test_unrecognised_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2, 2), "blocks.0.bias": torch.zeros(2)}, path)
    with pytest.raises(LoRAError, match=r"no LoRA keys we recognise.*'blocks\.0\.bias'"):
        read_lora(path)


def test_lora_for_another_model():
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, DIM),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(DIM, RANK),
    }
    with pytest.raises(LoRAError, match=r"TinyDiT: 'blocks\.0\.self_attn\.q'.*different model"):
        load_lora(make_model(), state)


def test_shape_mismatch():
    state = to_state_dict(make_lora(), "peft")
    state["transformer.layers.0.attention.to_q.lora_A.weight"] = torch.zeros(RANK, DIM + 1)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"layers\.0\.attention\.to_q.*\(4, 9\).*different model"):
        load_lora(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-applied


def test_rank_mismatch_names_the_key():
    state = {
        "lora_unet_x_embedder.lora_down.weight": torch.zeros(4, 4),
        "lora_unet_x_embedder.lora_up.weight": torch.zeros(8, 3),
    }
    with pytest.raises(LoRAError, match=r"'lora_unet_x_embedder\.lora_down\.weight' has rank 4.*3"):
        read_lora(state)


def test_half_pair_and_unsupported_adapters():
    with pytest.raises(LoRAError, match="no up matrix"):
        read_lora({"x_embedder.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(LoRAError, match="LoCon"):
        read_lora({"lora_unet_x_embedder.lora_mid.weight": torch.zeros(2, 2, 3, 3)})


def test_unknown_names_for_scale_and_clear():
    model = make_model()
    apply_lora(model, make_lora(), fuse=False, name="a")
    with pytest.raises(LoRAError, match=r"no unfused LoRA named 'b'.*'a'"):
        set_lora_scale(model, "b", 1.0)
    with pytest.raises(LoRAError, match="no unfused LoRA named 'b'"):
        clear_loras(model, "b")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_a_scale_that_is_not_finite_is_refused_naming_the_lora(tmp_path, scale):
    """A nan or inf scale would turn every weight it touches into nan: refused, the weights left as they were."""
    path = tmp_path / "style.safetensors"
    save_lora(make_lora(), path)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fuse in (True, False):
        with pytest.raises(ConfigError, match=f"LoRA {re.escape(str(path))}: scale {scale} must be a finite number"):
            load_lora(model, path, scale=scale, fuse=fuse)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not list_loras(model)
    apply_lora(model, make_lora(), fuse=False, name="a")
    with pytest.raises(ConfigError, match=f"LoRA 'a': scale {scale} must be a finite number"):
        set_lora_scale(model, "a", scale)
    assert list_loras(model) == {"a": 1.0}


def test_bad_save_format(tmp_path):
    with pytest.raises(LoRAError, match=r"unknown LoRA save format 'civitai'.*diffsynth"):
        save_lora(make_lora(), tmp_path / "x.safetensors", format="civitai")


def test_raw_state_source_and_keys_for_family_converters(tmp_path):
    state = to_state_dict(make_lora(), "kohya")
    path = tmp_path / "family.safetensors"
    save_file(state, str(path))
    raw, source = read_lora_state(path)
    assert raw.keys() == state.keys() and source == str(path)
    lora = read_lora(raw, source=source)
    assert lora.source == str(path)
    assert lora.keys["x_embedder"] == "lora_unet_x_embedder.lora_down.weight"
    with pytest.raises(LoRAError, match="family.safetensors"):
        read_lora({"odd.weight": torch.zeros(1)}, source=str(path))


def test_pipeline_read_lora_is_the_family_hook():
    from diffsynth.runtime.pipeline import BasePipeline

    class Renaming(BasePipeline):
        model_slots = {"dit": "dit"}

        def read_lora(self, path, slot="dit"):
            lora = read_lora(path)
            return LoRAWeights({name.replace("ours_", ""): t for name, t in lora.targets.items()}, lora.source)

    lora = make_lora()
    renamed = LoRAWeights({f"ours_{name}": t for name, t in lora.targets.items()})
    pipe = Renaming(device="cpu", torch_dtype=torch.float32)
    pipe.dit = make_model()
    reference = make_model()
    apply_lora(reference, lora, scale=0.5)
    pipe.load_lora(renamed, scale=0.5)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(pipe.dit(x), reference(x))


def test_pipeline_takes_diffsynth_studios_load_lora_form(tmp_path):
    """`load_lora(pipe.dit, lora_config, alpha=..., hotload=...)` (DiffSynth-Studio's signature, the model first,
    a file or a `ModelConfig`) applies the same LoRA as ours; `hotload=True` keeps it apart, which
    `clear_lora()` (DiffSynth-Studio's name) removes; a module of no slot and a missing LoRA are clear errors."""
    from diffsynth.runtime.errors import ConfigError
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.pipeline import BasePipeline

    class Pipe(BasePipeline):
        model_slots = {"dit": "dit", "dit2": "dit2"}

    lora = make_lora()
    path = tmp_path / "style.safetensors"
    save_file(to_state_dict(lora, "peft"), str(path))
    x = torch.randn(2, 3, 4)
    reference = make_model()
    apply_lora(reference, lora, scale=0.7)
    want = reference(x)

    def fresh() -> Pipe:
        pipe = Pipe(device="cpu", torch_dtype=torch.float32)
        pipe.dit, pipe.dit2 = make_model(), make_model()
        return pipe

    plain = make_model()(x)
    for call in (
        lambda p: p.load_lora(p.dit2, str(path), 0.7),
        lambda p: p.load_lora(p.dit2, lora_config=ModelConfig(path=str(path)), alpha=0.7),
        lambda p: p.load_lora(p.dit2, ModelConfig(path=str(path)), alpha=0.7, hotload=True),
        lambda p: p.load_lora(p.dit2, state_dict=to_state_dict(lora, "peft"), alpha=0.7),
        lambda p: p.load_lora(ModelConfig(path=str(path)), scale=0.7, slot="dit2"),
    ):
        pipe = fresh()
        call(pipe)
        torch.testing.assert_close(pipe.dit2(x), want)
        assert torch.equal(pipe.dit(x), plain)  # the other model is untouched
    assert list_loras(pipe.dit2) == {}  # fused
    pipe = fresh()
    pipe.load_lora(pipe.dit2, str(path), alpha=0.7, hotload=True)
    assert len(list_loras(pipe.dit2)) == 1
    pipe.clear_lora()
    assert list_loras(pipe.dit2) == {} and torch.equal(pipe.dit2(x), plain)
    with pytest.raises(ConfigError, match="none of this pipeline's models"):
        pipe.load_lora(make_model(), str(path))
    with pytest.raises(ConfigError, match="give the LoRA file"):
        pipe.load_lora(pipe.dit)
    with pytest.raises(TypeError, match="unexpected keyword"):
        pipe.load_lora(str(path), alpha=0.7)


@pytest.mark.parametrize("managed_by", ["model_config", "handle"])
def test_diffsynth_studios_load_lora_keeps_it_apart_under_vram_management(tmp_path, managed_by):
    """DiffSynth-Studio hot-loads (`hotload=None`) onto a VRAM-managed module, so its `clear_lora()` restores the
    base model; fused, the LoRA would stay after `clear_lora()`. Without VRAM management it is fused, as before."""
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.pipeline import BasePipeline

    class Pipe(BasePipeline):
        model_slots = {"dit": "dit"}

    path = tmp_path / "style.safetensors"
    save_file(to_state_dict(make_lora(), "peft"), str(path))
    x = torch.randn(2, 3, 4)
    plain = make_model()(x)
    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit = make_model()
    if managed_by == "model_config":
        pipe.model_configs["dit"] = ModelConfig(path=str(path), offload_device="cpu", offload_dtype=torch.float32)
    else:
        pipe.vram_handles["dit"] = object()
    pipe.load_lora(pipe.dit, str(path))
    assert len(list_loras(pipe.dit)) == 1 and not torch.equal(pipe.dit(x), plain)
    pipe.clear_lora()
    assert torch.equal(pipe.dit(x), plain)
    pipe.model_configs.clear()
    pipe.vram_handles.clear()
    pipe.load_lora(pipe.dit, str(path))
    assert list_loras(pipe.dit) == {} and not torch.equal(pipe.dit(x), plain)  # fused without VRAM management


def _hub_pipe():
    from diffsynth.runtime.pipeline import BasePipeline

    class Pipe(BasePipeline):
        model_slots = {"dit": "dit"}

    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit = make_model()
    return pipe


def test_a_lora_loads_by_its_hub_name(tmp_path, monkeypatch):
    """`load_lora("Org/Name")` takes the repo's one `.safetensors` (found under the model base path, downloads off),
    `"Org/Name/file"` names a file of a repo holding several; a repo with several files, a missing repo and a
    missing local file are clear errors naming what was asked for."""
    from diffsynth.runtime.errors import ConfigError

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    one, other = make_lora(seed=1), make_lora(seed=2)
    (tmp_path / "models/Org/Style").mkdir(parents=True)
    save_file(to_state_dict(one, "peft"), str(tmp_path / "models/Org/Style/style.safetensors"))
    (tmp_path / "models/Org/Many").mkdir(parents=True)
    save_file(to_state_dict(one, "peft"), str(tmp_path / "models/Org/Many/a.safetensors"))
    save_file(to_state_dict(other, "kohya"), str(tmp_path / "models/Org/Many/b.safetensors"))

    for name, lora in (("Org/Style", one), ("Org/Many/b.safetensors", other)):
        pipe = _hub_pipe()
        pipe.load_lora(name, scale=0.5)
        reference = make_model()
        apply_lora(reference, lora, scale=0.5)
        torch.testing.assert_close(pipe.dit(X), reference(X))
        assert not torch.equal(pipe.dit(X), make_model()(X))
    with pytest.raises(ConfigError, match=r"2 weight files \['a.safetensors', 'b.safetensors'\]; name one: Org/Many/"):
        _hub_pipe().load_lora("Org/Many")
    with pytest.raises(ConfigError, match="'Org/Nothing' is no local file, nor found on the hub"):
        _hub_pipe().load_lora("Org/Nothing")
    with pytest.raises(LoRAError, match="does not exist"):  # a relative path is not taken for a repo
        _hub_pipe().load_lora("loras/missing.safetensors")


def test_a_presets_loras_are_applied_on_load(tmp_path, monkeypatch):
    """A preset's `loras` (e.g. a distillation or camera LoRA on its base model) are applied by `from_pretrained`
    as `load_lora` applies them: fused, or kept apart with `fuse=False`, at their scale."""
    from diffsynth.runtime import registry
    from diffsynth.runtime.pipeline import BasePipeline
    from diffsynth.runtime.registry import Family, Preset, PresetFile, PresetLoRA

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    (tmp_path / "models/Org/Base").mkdir(parents=True)
    (tmp_path / "models/Org/Fast").mkdir(parents=True)
    lora = make_lora(seed=3)
    save_file(to_state_dict(lora, "peft"), str(tmp_path / "models/Org/Fast/fast.safetensors"))

    class Pipe(BasePipeline):
        family = "tiny-lora-family"
        model_slots = {"dit": "dit"}

        def _load_config(self, config):  # the base model: the tiny DiT (its file's contents do not matter here)
            assert config.model_id == "Org/Base"
            self.dit = make_model()

    def family(fuse: bool) -> dict:
        preset = Preset(
            name="Org/Fast",
            files=(PresetFile("Org/Base", "*"),),
            defaults={"num_inference_steps": 4},
            loras=(PresetLoRA("Org/Fast", "fast.safetensors", scale=0.7, fuse=fuse),),
        )
        return {"tiny-lora-family": Family(name="tiny-lora-family", presets={"Org/Fast": preset})}

    reference = make_model()
    apply_lora(reference, lora, scale=0.7)
    for fuse in (True, False):
        monkeypatch.setattr(registry, "installed_families", lambda fuse=fuse: family(fuse))
        pipe = Pipe.from_pretrained("Org/Fast", torch_dtype=torch.float32, device="cpu")
        torch.testing.assert_close(pipe.dit(X), reference(X))
        assert (list_loras(pipe.dit) == {}) == fuse and pipe.defaults["num_inference_steps"] == 4


def test_a_lora_for_a_controlnet_slot_goes_onto_its_one_net(tmp_path):
    """`load_lora(file, slot="controlnet")`: the slot holds a list of nets; a LoRA trained on a net (its own layer
    names) goes onto the one net loaded, as `apply_lora(net, ...)` would; with two nets it asks which."""
    from diffsynth.runtime.controlnet import ControlNetSlot
    from diffsynth.runtime.errors import ConfigError
    from diffsynth.runtime.pipeline import BasePipeline

    class Pipe(BasePipeline):
        model_slots = {"dit": "dit", "controlnet": "controlnet"}

    lora = make_lora()
    path = tmp_path / "net_lora.safetensors"
    save_file(to_state_dict(lora, "peft"), str(path))
    x = torch.randn(2, 3, 4)
    want = make_model(3)
    apply_lora(want, lora, scale=0.5)
    pipe = Pipe(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.controlnet = make_model(), ControlNetSlot([make_model(3)])
    pipe.load_lora(str(path), scale=0.5, slot="controlnet")
    torch.testing.assert_close(pipe.controlnet.nets[0](x), want(x))
    assert torch.equal(pipe.dit(x), make_model()(x))
    pipe.controlnet.append(make_model(4))
    with pytest.raises(ConfigError, match="holds 2 ControlNets"):
        pipe.load_lora(str(path), slot="controlnet")


def test_save_lora_writes_extra_header_entries(tmp_path):
    """`metadata` lands in the file's header beside our own entries (what an IC-LoRA's loader reads)."""
    from safetensors import safe_open

    from diffsynth.runtime.lora import save_lora

    path = tmp_path / "ic.safetensors"
    save_lora(make_lora(), path, metadata={"reference_downscale_factor": 2})
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["reference_downscale_factor"] == "2" and header["diffsynth_lora_format"] == "diffsynth"
    torch.testing.assert_close(
        read_lora(str(path)).targets["x_embedder"].delta_weight(), make_lora().targets["x_embedder"].delta_weight()
    )
