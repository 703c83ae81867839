"""FLUX.1 DiT LoRAs: every accepted layout lands on the right layers, errors name the file and key, fused equals
unfused, several LoRAs stack with their scales. Parity with diffusers is in test_flux1_lora_parity.py, which
loads the file builders below from here."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffsynth_flux_test_helpers import dit_inputs, make_dit, tiny_dit_config
from safetensors.torch import save_file
from torch import nn

from diffsynth.flux.flux1.formats import ours_to_diffusers
from diffsynth.flux.flux1.lora import read_flux1_lora
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, clear_loras


# ----------------------------------------------------------------------------------- LoRA builders
def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def diffusers_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The Linears of the diffusers FluxTransformer2DModel with our model's sizes, from `ours_to_diffusers`."""
    state = {f"{n}.weight": torch.empty(shape) for n, shape in linear_shapes(model).items()}
    state.update({f"{n}.bias": torch.empty(shape[0]) for n, shape in linear_shapes(model).items()})
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in ours_to_diffusers(state).items() if v.dim() == 2}


def random_lora(shapes: dict[str, tuple[int, int]], seed: int, with_alpha: bool = True) -> dict[str, tuple]:
    """name -> (down, up, alpha or None), ranks 2..5 and alphas varying per target."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (name, (out_features, in_features)) in enumerate(sorted(shapes.items())):
        rank = 2 + (i + seed) % 4
        down = torch.randn(rank, in_features, generator=g) / in_features**0.5
        up = 0.3 * torch.randn(out_features, rank, generator=g) / rank**0.5
        lora[name] = (down, up, rank * (0.5 + 0.5 * (i % 3)) if with_alpha else None)
    return lora


def peft_file(lora: dict, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up, alpha) in lora.items():
        out[f"{prefix}{name}.lora_A.weight"] = down
        out[f"{prefix}{name}.lora_B.weight"] = up
        if alpha is not None:
            out[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return out


def kohya_file(lora: dict, prefix: str = "lora_unet_", dotted: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up, alpha) in lora.items():
        key = prefix + (name if dotted else name.replace(".", "_"))
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


_XLABS = {
    "img_attn.qkv": "qkv_lora1",
    "img_attn.proj": "proj_lora1",
    "txt_attn.qkv": "qkv_lora2",
    "txt_attn.proj": "proj_lora2",
}


def xlabs_file(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """XLabs processor LoRAs (no alpha) on every double block and single block of `model`."""
    shapes = linear_shapes(model)
    hidden = model.config.hidden_size
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, (out_features, in_features) in sorted(shapes.items()):
        block, _, rest = name.partition(".")
        index, _, layer = rest.partition(".")
        if block == "double_blocks" and layer in _XLABS:
            key = f"double_blocks.{index}.processor.{_XLABS[layer]}"
        elif block == "single_blocks" and layer in ("linear1", "linear2"):
            key = f"single_blocks.{index}.processor.{'qkv_lora' if layer == 'linear1' else 'proj_lora'}"
            out_features = 3 * hidden if layer == "linear1" else out_features
        else:
            continue
        out[f"{key}.down.weight"] = torch.randn(4, in_features, generator=g) / in_features**0.5
        out[f"{key}.up.weight"] = 0.15 * torch.randn(out_features, 4, generator=g)
    return out


def tiny():
    cfg = tiny_dit_config(depth=1, depth_single_blocks=1)
    return cfg, make_dit(cfg, seed=3).eval()


def run(model, cfg, seed=5):
    with torch.no_grad():
        return model(*dit_inputs(batch=2, grid=(3, 4), txt_len=5, seed=seed, config=cfg))


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> float:
    diff = (got - want).abs().max().item()
    print(f"max abs diff {diff:.3g} (output scale {want.abs().max().item():.3g})")
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"
    return diff


def with_loras(base, files_and_scales, fuse=True):
    model = copy.deepcopy(base)
    for sd, scale in files_and_scales:
        apply_lora(model, read_flux1_lora(sd, model), scale=scale, fuse=fuse)
    return model


def manual(base, lora: dict, scale: float = 1.0):
    """`base` with W += scale * alpha / rank * up @ down written into the weights by hand (our names)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, (down, up, alpha) in lora.items():
            factor = 1.0 if alpha is None else alpha / down.shape[0]
            model.get_submodule(name).weight += scale * factor * (up @ down)
    return model


# ----------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["peft", "diffusion_model_peft", "comfyui", "kohya"])
def test_bfl_names_equal_the_hand_applied_delta(layout):
    cfg, base = tiny()
    lora = random_lora(linear_shapes(base), seed=1)
    state = {
        "peft": lambda: peft_file(lora, prefix=""),
        "diffusion_model_peft": lambda: peft_file(lora, prefix="diffusion_model."),
        "comfyui": lambda: kohya_file(lora, prefix="diffusion_model.", dotted=True),
        "kohya": lambda: kohya_file(lora),
    }[layout]()
    want = run(manual(base, lora, 0.7), cfg)
    got = run(with_loras(base, [(state, 0.7)]), cfg)
    assert (want - run(base, cfg)).abs().max() > 0.05  # the LoRA changes the output
    assert_close(got, want)


def test_diffusers_names_merge_into_fused_layers_with_the_final_halves_swapped():
    cfg, base = tiny()
    lora = random_lora(diffusers_linear_shapes(base), seed=2)
    # the same delta written on diffusers weights, converted to ours, is the reference
    reference = copy.deepcopy(base)
    state = ours_to_diffusers(reference.state_dict())
    with torch.no_grad():
        for name, (down, up, alpha) in lora.items():
            state[f"{name}.weight"] = state[f"{name}.weight"] + alpha / down.shape[0] * (up @ down)
    from diffsynth.flux.flux1.formats import diffusers_to_ours

    reference.load_state_dict(diffusers_to_ours(state))
    for layout in (peft_file(lora), kohya_file(lora, prefix="lora_transformer_")):
        got = run(with_loras(base, [(layout, 1.0)]), cfg)
        assert_close(got, run(reference, cfg))


def lycoris_file(shapes: dict[str, tuple[int, int]], seed: int, prefix: str = "lycoris_") -> tuple[dict, dict]:
    """(a LyCORIS file in kohya-style names, LoKr and LoHa by turns (LoHa where a side is odd); each target's
    change written out with torch from the format's definition)."""
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for i, (name, (out_features, in_features)) in enumerate(sorted(shapes.items())):
        key = prefix + name.replace(".", "_")
        if (
            i % 2 == 0 and out_features % 2 == 0 and in_features % 2 == 0
        ):  # kron of [2, 2] and [out/2, in/2] (rank-3 pair)
            w1 = torch.randn(2, 2, generator=g)
            a, b = torch.randn(out_features // 2, 3, generator=g), torch.randn(3, in_features // 2, generator=g) * 0.1
            state.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": a, f"{key}.lokr_w2_b": b})
            deltas[name] = torch.kron(w1, a @ b) * (1.5 / 3)
        else:
            w = [torch.randn(*shape, generator=g) * 0.3 for shape in ((out_features, 2), (2, in_features)) * 2]
            state.update({f"{key}.hada_{n}": t for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), w, strict=True)})
            deltas[name] = (w[0] @ w[1]) * (w[2] @ w[3]) * (1.5 / 2)
        state[f"{key}.alpha"] = torch.tensor(1.5)
    return state, deltas


@pytest.mark.parametrize("fuse", [True, False])
def test_lycoris_factors_with_diffusers_names_merge_into_fused_layers(fuse):
    """LoKr / LoHa changes on diffusers' split layers land on their rows of our fused ones, the final modulation's
    halves swapped, kept factored when unfused; the reference writes each change on the diffusers weights."""
    cfg, base = tiny()
    state, deltas = lycoris_file(diffusers_linear_shapes(base), seed=8)
    assert any(k.endswith("lokr_w1") for k in state) and any(k.endswith("hada_w1_a") for k in state)
    reference = copy.deepcopy(base)
    weights = ours_to_diffusers(reference.state_dict())
    for name, delta in deltas.items():
        weights[f"{name}.weight"] = weights[f"{name}.weight"] + 0.8 * delta
    from diffsynth.flux.flux1.formats import diffusers_to_ours

    reference.load_state_dict(diffusers_to_ours(weights))
    model = with_loras(base, [(state, 0.8)], fuse=fuse)
    if not fuse:
        assert any(t.factors is not None for t in read_flux1_lora(state, base).targets.values())
    assert (run(reference, cfg) - run(base, cfg)).abs().max() > 0.05
    assert_close(run(model, cfg), run(reference, cfg))


@pytest.mark.parametrize("fuse", [True, False])
def test_dora_with_diffusers_names_keeps_each_parts_row_norms(fuse):
    """A DoRA (peft's `lora_magnitude_vector`) on diffusers' split layers: each part's rows of our fused layer get
    its magnitude, rows of parts the file leaves out stay as they were, the final modulation's halves swapped. The
    reference applies each part's DoRA to the diffusers weights and converts."""
    cfg, base = tiny()
    shapes = diffusers_linear_shapes(base)
    names = [n for i, n in enumerate(sorted(shapes)) if i % 4 != 1]  # some parts of fused layers left out
    lora = random_lora({n: shapes[n] for n in names}, seed=9)
    weights = ours_to_diffusers(copy.deepcopy(base).state_dict())
    state = peft_file(lora)
    g = torch.Generator().manual_seed(10)
    for name, (down, up, alpha) in lora.items():
        merged = weights[f"{name}.weight"] + alpha / down.shape[0] * (up @ down)
        magnitude = merged.norm(dim=1) * (1 + 0.3 * torch.rand(merged.shape[0], generator=g))
        state[f"transformer.{name}.lora_magnitude_vector"] = magnitude
        weights[f"{name}.weight"] = merged * (magnitude / merged.norm(dim=1))[:, None]
    from diffsynth.flux.flux1.formats import diffusers_to_ours

    reference = copy.deepcopy(base)
    reference.load_state_dict(diffusers_to_ours(weights))
    assert (run(reference, cfg) - run(base, cfg)).abs().max() > 0.05
    assert_close(run(with_loras(base, [(state, 1.0)], fuse=fuse), cfg), run(reference, cfg))


def test_a_column_norm_dora_on_part_of_a_fused_layer_is_refused():
    _, base = tiny()
    hidden = base.config.hidden_size
    state = {
        "transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, hidden),
        "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(hidden, 2),
        "transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1, hidden),
    }
    with pytest.raises(LoRAError, match=r"'transformer_blocks\.0\.attn\.to_q.*column norms.*img_attn\.qkv"):
        read_flux1_lora(state, base)


def test_missing_parts_of_a_fused_layer_are_zero_rows():
    cfg, base = tiny()
    shapes = diffusers_linear_shapes(base)
    parts = ["transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp"]
    lora = random_lora({p: shapes[p] for p in parts}, seed=4)
    converted = read_flux1_lora(peft_file(lora), base)
    hidden = cfg.hidden_size
    qkv = converted.targets["double_blocks.0.img_attn.qkv"]
    delta = qkv.delta_weight()
    down, up, alpha = lora["transformer_blocks.0.attn.to_k"]
    torch.testing.assert_close(delta[hidden : 2 * hidden], alpha / down.shape[0] * up @ down)
    assert delta[:hidden].abs().max() == 0 and delta[2 * hidden :].abs().max() == 0
    linear1 = converted.targets["single_blocks.0.linear1"].delta_weight()
    assert linear1[: 3 * hidden].abs().max() == 0 and linear1[3 * hidden :].abs().max() > 0


def test_diff_and_diff_b_on_a_split_part():
    _, base = tiny()
    hidden = base.config.hidden_size
    diff, diff_b = torch.randn(hidden, hidden), torch.randn(hidden)
    state = {"transformer_blocks.0.attn.to_v.diff": diff, "transformer_blocks.0.attn.to_v.diff_b": diff_b}
    target = read_flux1_lora(state, base).targets["double_blocks.0.img_attn.qkv"]
    assert target.down is None
    torch.testing.assert_close(target.diff[2 * hidden :], diff)
    torch.testing.assert_close(target.diff_b[2 * hidden :], diff_b)
    assert target.diff[: 2 * hidden].abs().max() == 0 and target.diff_b[: 2 * hidden].abs().max() == 0


def test_xlabs_processor_names():
    cfg, base = tiny()
    state = xlabs_file(base, seed=6)
    hidden = cfg.hidden_size
    lora = {}
    for key, down in state.items():
        if key.endswith(".down.weight"):
            name = key.removesuffix(".down.weight")
            lora[name] = (down, state[f"{name}.up.weight"], None)
    ours = {}
    for name, (down, up, _) in lora.items():
        block, index, _, kind = name.split(".")
        if block == "single_blocks":
            target = f"single_blocks.{index}.{'linear1' if kind == 'qkv_lora' else 'linear2'}"
            if kind == "qkv_lora":  # q, k, v rows of linear1 only
                up = torch.cat([up, torch.zeros(base.get_submodule(target).out_features - 3 * hidden, 4)])
        else:
            target = f"double_blocks.{index}.{next(k for k, v in _XLABS.items() if v == kind)}"
        ours[target] = (down, up, None)
    got = run(with_loras(base, [(state, 1.0)]), cfg)
    assert_close(got, run(manual(base, ours), cfg))
    prefixed = {f"diffusion_model.{k}": v for k, v in state.items()}
    torch.testing.assert_close(run(with_loras(base, [(prefixed, 1.0)]), cfg), got)


def test_text_encoder_entries_are_skipped():
    _, base = tiny()
    state = peft_file(random_lora({"x_embedder": (32, 16)}, seed=0))
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 8)
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    converted = read_flux1_lora(state, base)
    assert list(converted.targets) == ["img_in"]
    assert len(converted.skipped) == 2


# ----------------------------------------------------------------------------------- errors
def test_unknown_key_names_the_file_and_the_key(tmp_path):
    _, base = tiny()
    state = peft_file(random_lora({"transformer_blocks.0.attn.to_q": (32, 32)}, seed=0))
    state["transformer.transformer_blocks.0.attn.to_nothing.lora_A.weight"] = torch.zeros(2, 32)
    state["transformer.transformer_blocks.0.attn.to_nothing.lora_B.weight"] = torch.zeros(32, 2)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoRAError, match=r"odd\.safetensors.*transformer_blocks\.0\.attn\.to_nothing\.lora_A\.weight"):
        read_flux1_lora(path, base)
    with pytest.raises(LoRAError, match=r"double_blocks_7_img_attn_qkv\.lora_down\.weight"):
        read_flux1_lora(kohya_file(random_lora({"double_blocks.7.img_attn.qkv": (96, 32)}, seed=0)), base)


@pytest.mark.parametrize(
    ("name", "shape", "key"),
    [
        ("transformer_blocks.0.attn.to_v", (33, 32), "transformer.transformer_blocks.0.attn.to_v.lora_A.weight"),
        ("double_blocks.0.img_attn.qkv", (96, 31), "transformer.double_blocks.0.img_attn.qkv.lora_A.weight"),
        ("norm_out.linear", (32, 32), "transformer.norm_out.linear.lora_A.weight"),
    ],
)
def test_wrong_shape_names_the_key(name, shape, key):
    _, base = tiny()
    with pytest.raises(LoRAError, match=re.escape(f"<state dict>: {key!r} has down")):
        read_flux1_lora(peft_file(random_lora({name: shape}, seed=0)), base)


def test_two_entries_for_the_same_rows_are_refused():
    _, base = tiny()
    state = peft_file(random_lora({"transformer_blocks.0.attn.to_q": (32, 32)}, seed=0))
    state.update(peft_file(random_lora({"double_blocks.0.img_attn.qkv": (96, 32)}, seed=1), prefix=""))
    with pytest.raises(LoRAError, match="both change rows of 'double_blocks.0.img_attn.qkv'"):
        read_flux1_lora(state, base)


# ----------------------------------------------------------------------------------- applying
def test_fused_equals_unfused_and_two_loras_stack_with_their_scales():
    cfg, base = tiny()
    first = peft_file(random_lora(diffusers_linear_shapes(base), seed=7))
    second = xlabs_file(base, seed=8)
    files = [(first, 0.8), (second, -0.5)]
    fused = run(with_loras(base, files, fuse=True), cfg)
    unfused_model = with_loras(base, files, fuse=False)
    unfused = run(unfused_model, cfg)
    assert_close(unfused, fused)
    one = run(with_loras(base, files[:1]), cfg)
    assert (one - fused).abs().max() > 0.05  # the second LoRA counts
    clear_loras(unfused_model)
    torch.testing.assert_close(run(unfused_model, cfg), run(base, cfg))


def test_pipeline_load_lora_reads_every_layout(tmp_path):
    from diffsynth.flux.pipeline import FluxImagePipeline

    cfg, base = tiny()
    lora = random_lora(linear_shapes(base), seed=9)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_file(lora), str(path))
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = copy.deepcopy(base)
    name = pipe.load_lora(str(path), scale=0.8, fuse=False)
    assert_close(run(pipe.dit, cfg), run(manual(base, lora, 0.8), cfg))
    pipe.load_lora(xlabs_file(base, seed=10), scale=0.3, fuse=False)
    pipe.clear_loras()
    assert name == "lora_0"
    torch.testing.assert_close(run(pipe.dit, cfg), run(base, cfg))
    pipe.dit = make_dit(tiny_dit_config(depth=1, depth_single_blocks=1, hidden_size=64, num_heads=4))
    with pytest.raises(LoRAError, match=r"kohya\.safetensors: 'lora_unet_.*' has down"):  # a LoRA for another size
        pipe.load_lora(str(path))
