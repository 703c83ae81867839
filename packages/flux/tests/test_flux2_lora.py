"""FLUX.2 DiT LoRAs (`flux2/lora.py`): every accepted layout lands on the right layers, the files our trainer
exports read back to peft's own output, errors name the file and key, and parity with diffusers
(`Flux2Pipeline.lora_state_dict` + `Flux2Transformer2DModel.load_lora_adapter`, and `Flux2KleinPipeline
.load_lora_weights` end to end) for each layout diffusers 0.42 reads, in fp32 on CPU.

What diffusers 0.42 cannot take is left out of the parity LoRAs and checked here against a hand-applied delta
instead: its kohya converter has no rule for the modulation layers, `guidance_in` and
`final_layer.adaLN_modulation.1` (it drops them with a warning); its ai-toolkit converter
(`diffusion_model.` + BFL names) renames `final_layer.adaLN_modulation.1` to `norm_out.linear` without swapping
the (shift, scale) halves, fails on `.alpha` keys, and a `lora_down` / `lora_up` file under `diffusion_model.`
goes to its kohya converter, which expects `lora_unet_` names, so it loads nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from diffsynth_flux2_test_repo import CAPTIONS, our_pipeline, reference_pipeline
from diffsynth_flux_test_helpers import max_abs
from safetensors.torch import save_file
from torch import nn

from diffsynth.flux.flux2.dit import Flux2DiT
from diffsynth.flux.flux2.formats import diffusers_to_ours, ours_to_diffusers
from diffsynth.flux.flux2.lora import read_flux2_lora
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import LoRATarget, LoRAWeights, apply_lora, clear_loras, save_lora


def _load(name: str):
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"flux2_lora_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


D = _load("test_flux2_dit.py")  # tiny_config, make_dit, dit_inputs, reference_dit
L1 = _load("test_flux1_lora.py")  # random_lora, peft_file, kohya_file, linear_shapes, assert_close

random_lora, peft_file, kohya_file, linear_shapes = L1.random_lora, L1.peft_file, L1.kohya_file, L1.linear_shapes


def assert_close(got: torch.Tensor, want: torch.Tensor) -> float:
    """fp32 agreement: max abs difference <= 1e-5 of the output's scale (at least 1e-5)."""
    return L1.assert_close(got, want, tol=1e-5 * max(1.0, want.abs().max().item()))


def parity(test):
    """A parity test; peft warns when a second adapter joins the first, which is how diffusers stacks LoRAs."""
    test = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")(test)
    return pytest.mark.parity(test)


# The layers diffusers' kohya converter maps (blocks, img_in, txt_in, time_in, final_layer.linear).
KOHYA_MAPPED = re.compile(r"^(double_blocks|single_blocks)\.|^(img_in|txt_in|time_in\.\w+|final_layer\.linear)$")


# ----------------------------------------------------------------------------------- models and LoRAs
def tiny(guidance: bool = True):
    cfg = D.tiny_config(depth=1, depth_single_blocks=1, guidance_embed=guidance)
    return cfg, D.make_dit(cfg, seed=3).eval()


def inputs(cfg):
    return D.dit_inputs(batch=2, grid=(3, 4), txt_len=5, ref_grid=(2, 2), seed=5, config=cfg)


def run(model, cfg) -> torch.Tensor:
    args = inputs(cfg)
    with torch.no_grad():
        return model(*args) if cfg.guidance_embed else model(*args[:5])


def reference_run(reference, cfg) -> torch.Tensor:
    img, img_ids, txt, txt_ids, t, g = inputs(cfg)
    with torch.no_grad():
        return reference(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g if cfg.guidance_embed else None,
            return_dict=False,
        )[0]


def diffusers_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The Linears of diffusers' Flux2Transformer2DModel with our model's sizes, from `ours_to_diffusers`."""
    state = {f"{n}.weight": torch.empty(shape) for n, shape in linear_shapes(model).items()}
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in ours_to_diffusers(state).items()}


def with_loras(base, files_and_scales, fuse=True):
    model = copy.deepcopy(base)
    for state, scale in files_and_scales:
        apply_lora(model, read_flux2_lora(state, model), scale=scale, fuse=fuse)
    return model


def manual(base, lora: dict, scale: float = 1.0):
    """`base` with W += scale * alpha / rank * up @ down written into the weights by hand (our names)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, (down, up, alpha) in lora.items():
            factor = 1.0 if alpha is None else alpha / down.shape[0]
            model.get_submodule(name).weight += scale * factor * (up @ down)
    return model


def manual_diffusers(base, lora: dict, scale: float = 1.0):
    """`base` with a diffusers-named LoRA added to diffusers-named weights, converted back to ours: the
    reference for merging split parts and swapping `norm_out.linear`'s halves."""
    model = copy.deepcopy(base)
    state = ours_to_diffusers(model.state_dict())
    for name, (down, up, alpha) in lora.items():
        factor = 1.0 if alpha is None else alpha / down.shape[0]
        state[f"{name}.weight"] = state[f"{name}.weight"] + scale * factor * (up @ down)
    model.load_state_dict(diffusers_to_ours(state))
    return model


def changes_output(model, base, cfg):
    assert (run(model, cfg) - run(base, cfg)).abs().max() > 0.05  # the LoRA is not a no-op


# ----------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["diffsynth", "ai-toolkit", "peft", "comfyui", "kohya"])
def test_bfl_names_equal_the_hand_applied_delta(layout):
    cfg, base = tiny()
    lora = random_lora(linear_shapes(base), seed=1)
    if layout == "diffsynth":  # what our trainer writes by default and DiffSynth-Studio reads: no alpha
        lora = {name: (down, up, None) for name, (down, up, _) in lora.items()}
    state = {
        "diffsynth": lambda: peft_file(lora, prefix=""),
        "ai-toolkit": lambda: peft_file(lora, prefix="diffusion_model."),
        "peft": lambda: peft_file(lora, prefix="base_model.model."),
        "comfyui": lambda: kohya_file(lora, prefix="diffusion_model.", dotted=True),
        "kohya": lambda: kohya_file(lora),
    }[layout]()
    want = manual(base, lora, 0.7)
    changes_output(want, base, cfg)
    assert_close(run(with_loras(base, [(state, 0.7)]), cfg), run(want, cfg))


@pytest.mark.parametrize("layout", ["transformer", "bare", "kohya", "sformer"])
def test_diffusers_names_merge_into_fused_layers_with_the_final_halves_swapped(layout):
    """Split q/k/v parts merge into `qkv`, `to_qkv_mlp_proj` lands on `linear1`, `norm_out.linear` is swapped:
    the same LoRA written on diffusers weights and converted to ours is the reference."""
    cfg, base = tiny()
    lora = random_lora(diffusers_linear_shapes(base), seed=2)
    state = {
        "transformer": lambda: peft_file(lora),  # diffusers' save_lora_weights
        "bare": lambda: peft_file(lora, prefix=""),  # DiffSynth-Studio's FLUX.2 (diffusers module names)
        "kohya": lambda: kohya_file(lora, prefix="lora_transformer_"),
        "sformer": lambda: {
            k.replace("diffusion_model.transformer_blocks.", "diffusion_model.sformer_blocks."): v
            for k, v in peft_file(lora, prefix="diffusion_model.").items()
        },
    }[layout]()
    want = manual_diffusers(base, lora)
    changes_output(want, base, cfg)
    assert_close(run(with_loras(base, [(state, 1.0)]), cfg), run(want, cfg))


def test_missing_parts_of_a_fused_layer_are_zero_rows():
    cfg, base = tiny()
    shapes = diffusers_linear_shapes(base)
    parts = ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj"]
    lora = random_lora({p: shapes[p] for p in parts}, seed=4)
    converted = read_flux2_lora(peft_file(lora), base)
    assert sorted(converted.targets) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv"]
    hidden = cfg.hidden_size
    delta = converted.targets["double_blocks.0.img_attn.qkv"].delta_weight()
    down, up, alpha = lora["transformer_blocks.0.attn.to_k"]
    torch.testing.assert_close(delta[hidden : 2 * hidden], alpha / down.shape[0] * up @ down)
    assert delta[:hidden].abs().max() == 0 and delta[2 * hidden :].abs().max() == 0
    txt = converted.targets["double_blocks.0.txt_attn.qkv"].delta_weight()
    assert txt[: 2 * hidden].abs().max() == 0 and txt[2 * hidden :].abs().max() > 0


def test_diff_on_a_split_part_and_on_the_swapped_layer():
    _, base = tiny()
    hidden = base.config.hidden_size
    diff_v, diff_norm = torch.randn(hidden, hidden), torch.randn(2 * hidden, hidden)
    state = {"transformer_blocks.0.attn.add_v_proj.diff": diff_v, "norm_out.linear.diff": diff_norm}
    targets = read_flux2_lora(state, base).targets
    qkv = targets["double_blocks.0.txt_attn.qkv"]
    assert qkv.down is None
    torch.testing.assert_close(qkv.diff[2 * hidden :], diff_v)
    assert qkv.diff[: 2 * hidden].abs().max() == 0
    final = targets["final_layer.adaLN_modulation.1"].diff  # (scale, shift) -> (shift, scale)
    torch.testing.assert_close(final, torch.cat([diff_norm[hidden:], diff_norm[:hidden]]))


def test_text_encoder_entries_are_skipped():
    _, base = tiny()
    state = peft_file(random_lora({"x_embedder": (32, 16)}, seed=0))
    state["text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 8)
    state["lora_te1_model_layers_0_mlp_gate_proj.lora_down.weight"] = torch.zeros(2, 8)
    converted = read_flux2_lora(state, base)
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
        read_flux2_lora(path, base)
    with pytest.raises(LoRAError, match=r"double_blocks_7_img_attn_qkv\.lora_down\.weight"):
        read_flux2_lora(kohya_file(random_lora({"double_blocks.7.img_attn.qkv": (96, 32)}, seed=0)), base)


@pytest.mark.parametrize(
    ("name", "key"),
    [  # FLUX.1 layers FLUX.2 does not have
        ("single_transformer_blocks.0.proj_mlp", "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"),
        ("double_blocks.0.img_mod.lin", "transformer.double_blocks.0.img_mod.lin.lora_A.weight"),
        ("time_text_embed.text_embedder.linear_1", "transformer.time_text_embed.text_embedder.linear_1.lora_A.weight"),
    ],
)
def test_a_flux1_lora_is_refused_with_its_key(name, key):
    _, base = tiny()
    with pytest.raises(LoRAError, match=re.escape(key) + ".*Accepted are BFL names"):
        read_flux2_lora(peft_file(random_lora({name: (32, 32)}, seed=0)), base)


@pytest.mark.parametrize(
    ("name", "shape", "key"),
    [
        ("transformer_blocks.0.attn.to_v", (33, 32), "transformer.transformer_blocks.0.attn.to_v.lora_A.weight"),
        ("double_blocks.0.img_attn.qkv", (96, 31), "transformer.double_blocks.0.img_attn.qkv.lora_A.weight"),
        ("norm_out.linear", (32, 32), "transformer.norm_out.linear.lora_A.weight"),
        (
            "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            (96, 32),
            "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight",
        ),
    ],
)
def test_wrong_shape_names_the_key_and_the_model(name, shape, key):
    _, base = tiny()
    with pytest.raises(LoRAError, match=re.escape(f"<state dict>: {key!r} has down") + ".*of the FLUX.2 DiT"):
        read_flux2_lora(peft_file(random_lora({name: shape}, seed=0)), base)


def test_two_entries_for_the_same_rows_are_refused():
    _, base = tiny()
    state = peft_file(random_lora({"transformer_blocks.0.attn.to_q": (32, 32)}, seed=0))
    state.update(peft_file(random_lora({"double_blocks.0.img_attn.qkv": (96, 32)}, seed=1), prefix=""))
    with pytest.raises(LoRAError, match="both change rows of 'double_blocks.0.img_attn.qkv'"):
        read_flux2_lora(state, base)


# ----------------------------------------------------------------------------------- applying
def test_fused_equals_unfused_and_two_loras_stack_with_their_scales():
    cfg, base = tiny()
    first = peft_file(random_lora(diffusers_linear_shapes(base), seed=7))
    second = kohya_file(random_lora(linear_shapes(base), seed=8))
    files = [(first, 0.8), (second, -0.5)]
    fused = run(with_loras(base, files, fuse=True), cfg)
    unfused_model = with_loras(base, files, fuse=False)
    assert_close(run(unfused_model, cfg), fused)
    assert (run(with_loras(base, files[:1]), cfg) - fused).abs().max() > 0.05  # the second LoRA counts
    clear_loras(unfused_model)
    torch.testing.assert_close(run(unfused_model, cfg), run(base, cfg), rtol=0, atol=0)


def test_pipeline_load_lora_reads_the_family_layouts(tmp_path):
    from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline

    cfg, base = tiny(guidance=False)
    lora = random_lora(diffusers_linear_shapes(base), seed=9)
    path = tmp_path / "diffusers.safetensors"
    save_file(peft_file(lora), str(path))
    pipe = Flux2ImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = copy.deepcopy(base)
    name = pipe.load_lora(str(path), scale=0.8, fuse=False)
    assert name == "lora_0"
    assert_close(run(pipe.dit, cfg), run(manual_diffusers(base, lora, 0.8), cfg))
    pipe.clear_loras()
    torch.testing.assert_close(run(pipe.dit, cfg), run(base, cfg), rtol=0, atol=0)
    pipe.dit = Flux2DiT(D.tiny_config(hidden_size=64, num_heads=4, axes_dim=(4, 4, 4, 4), guidance_embed=False))
    with pytest.raises(LoRAError, match=r"diffusers\.safetensors: 'transformer\..*' has down .* FLUX.2 DiT"):
        pipe.load_lora(str(path))  # a LoRA for another size


# ----------------------------------------------------------------------------------- our trainer's files
def peft_model(base, seed: int, rank: int = 4, alpha: float = 2.0):
    """`base` with peft LoRA layers on `Flux2DiT.lora_target_modules`, as the trainer injects them, and random
    up matrices (peft starts them at zero), so peft's own forward is the reference."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(base)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(Flux2DiT.lora_target_modules))
    model = inject_adapter_in_model(config, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g) / rank**0.5)
    return model.eval()


def exported(model) -> LoRAWeights:
    """The peft layers as `LoRAWeights` under our module names, as the trainer's `lora_weights` collects them."""
    from peft.tuners.lora import LoraLayer

    targets = {
        name: LoRATarget(
            down=m.lora_A["default"].weight.detach().clone(),
            up=m.lora_B["default"].weight.detach().clone(),
            alpha=float(m.lora_alpha["default"]),
        )
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    return LoRAWeights(targets=targets, source="training")


@pytest.mark.integration  # peft and the trainer's writers: the integration session has them
@pytest.mark.parametrize("fmt", ["diffsynth", "peft", "kohya"])
@pytest.mark.parametrize("fuse", [True, False])
def test_trainer_exports_read_back_to_the_trained_model(tmp_path, fmt, fuse):
    pytest.importorskip("peft")
    cfg, base = tiny(guidance=False)
    trained = peft_model(base, seed=10)
    path = tmp_path / f"lora.{fmt}.safetensors"
    save_lora(exported(trained), path, format=fmt)  # what `--lora_formats` writes (runtime save_lora)
    want = run(trained, cfg)
    changes_output(trained, base, cfg)
    assert_close(run(with_loras(base, [(path, 1.0)], fuse=fuse), cfg), want)


@pytest.mark.integration
def test_the_trainers_own_export_reads_back(tmp_path):
    """The same through the trainer's `save_lora_files` when the trainer is installed (not in this package's
    isolated session)."""
    pytest.importorskip("peft")
    checkpoint = pytest.importorskip("diffsynth.training.checkpoint")
    cfg, base = tiny(guidance=False)
    trained = peft_model(base, seed=11)
    files = checkpoint.save_lora_files(trained, tmp_path, "step-1", ["diffsynth", "peft", "kohya"])
    assert len(files) == 3
    for path in files:
        assert_close(run(with_loras(base, [(path, 1.0)]), cfg), run(trained, cfg))


# ----------------------------------------------------------------------------------- parity with diffusers
def diffusers_output(base, cfg, files_and_scales) -> torch.Tensor:
    """diffusers' DiT with `base`'s weights and each LoRA file read by `Flux2Pipeline.lora_state_dict` (its
    kohya / ai-toolkit / peft converters) and attached by `load_lora_adapter`, with the scales set."""
    from diffusers import Flux2Pipeline

    reference = D.reference_dit(cfg, base)
    names = []
    for i, (state, _) in enumerate(files_and_scales):
        converted, metadata = Flux2Pipeline.lora_state_dict(
            dict(state) if isinstance(state, dict) else str(state), return_lora_metadata=True
        )
        reference.load_lora_adapter(converted, metadata=metadata, adapter_name=f"lora{i}", prefix="transformer")
        names.append(f"lora{i}")
    reference.set_adapters(names, weights=[scale for _, scale in files_and_scales])
    return reference_run(reference.eval(), cfg)


def compare(base, cfg, files_and_scales, fuse=True) -> float:
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    want = diffusers_output(base, cfg, files_and_scales)
    assert (want - reference_run(D.reference_dit(cfg, base), cfg)).abs().max() > 0.05  # diffusers applied it
    return assert_close(run(with_loras(base, files_and_scales, fuse=fuse), cfg), want)


def kohya_mapped(base, seed):
    return random_lora({n: s for n, s in linear_shapes(base).items() if KOHYA_MAPPED.match(n)}, seed=seed)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("guidance", [True, False])
@parity
def test_diffusers_names_match_diffusers(fuse, guidance):
    """`transformer.<diffusers name>.lora_A/B.weight` on every diffusers Linear (no alpha: diffusers takes
    alphas from the file's metadata only)."""
    cfg, base = tiny(guidance)
    lora = random_lora(diffusers_linear_shapes(base), seed=11, with_alpha=False)
    compare(base, cfg, [(peft_file(lora), 0.8)], fuse=fuse)


@pytest.mark.parametrize("rslora", [False, True])
@parity
def test_diffusers_file_with_alphas_in_its_header_matches_diffusers(tmp_path, rslora):
    """diffusers' `save_lora_weights` keeps lora_alpha / alpha_pattern / rank_pattern in the safetensors header,
    not in `.alpha` keys; both readers scale by them."""
    pytest.importorskip("diffusers")
    from diffusers import Flux2Pipeline

    cfg, base = tiny()
    lora = random_lora(diffusers_linear_shapes(base), seed=19, with_alpha=False)
    ranks = {name: down.shape[0] for name, (down, _, _) in lora.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    metadata = {
        "r": common,
        "lora_alpha": 3.0 * common,
        "rank_pattern": {name: r for name, r in ranks.items() if r != common},
        "alpha_pattern": {"norm_out.linear": 1.0, "attn.to_q": 0.5},  # a full name, and a name end
        "target_modules": sorted(lora),
        "use_rslora": rslora,
    }
    layers = {
        f"{name}.lora_{ab}.weight": t for name, (down, up, _) in lora.items() for ab, t in (("A", down), ("B", up))
    }
    Flux2Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
        weight_name="d.safetensors",
    )
    path = tmp_path / "d.safetensors"
    alphas = {name: target.alpha for name, target in read_flux2_lora(path, base).targets.items()}
    assert len(set(alphas.values())) > 2  # the header's alphas arrived, with their patterns
    compare(base, cfg, [(path, 0.9)])


@parity
def test_diffusers_names_on_some_parts_only_match_diffusers():
    cfg, base = tiny()
    shapes = diffusers_linear_shapes(base)
    parts = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_v_proj",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "norm_out.linear",
    ]
    compare(base, cfg, [(peft_file(random_lora({p: shapes[p] for p in parts}, seed=12, with_alpha=False)), 1.0)])


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
@parity
def test_ai_toolkit_bfl_names_match_diffusers(prefix):
    """`diffusion_model.<BFL name>.lora_A/B.weight` (ai-toolkit) and peft's `base_model.model.`, without alpha
    and without `final_layer.adaLN_modulation.1` (see the module docstring)."""
    cfg, base = tiny()
    shapes = {n: s for n, s in linear_shapes(base).items() if n != "final_layer.adaLN_modulation.1"}
    compare(base, cfg, [(peft_file(random_lora(shapes, seed=13, with_alpha=False), prefix=prefix), 0.9)])


@pytest.mark.parametrize("fuse", [True, False])
@parity
def test_kohya_bfl_names_match_diffusers(fuse):
    cfg, base = tiny()
    compare(base, cfg, [(kohya_file(kohya_mapped(base, seed=14)), 0.7)], fuse=fuse)


@pytest.mark.parametrize("fuse", [True, False])
@parity
def test_trainer_kohya_export_matches_diffusers_and_peft(tmp_path, fuse):
    """The file our trainer writes for diffusers (`--lora_formats kohya`): diffusers, our reader and the trained
    peft model agree."""
    cfg, base = tiny(guidance=False)
    trained = peft_model(base, seed=15, rank=6, alpha=3.0)
    path = tmp_path / "lora.kohya.safetensors"
    save_lora(exported(trained), path, format="kohya")
    diff = compare(base, cfg, [(path, 1.0)], fuse=fuse)
    assert_close(run(trained, cfg), diffusers_output(base, cfg, [(path, 1.0)]))
    assert diff <= 1e-5


@pytest.mark.parametrize("fuse", [True, False])
@parity
def test_two_loras_with_scales_match_diffusers(fuse):
    cfg, base = tiny()
    first = peft_file(random_lora(diffusers_linear_shapes(base), seed=16, with_alpha=False))
    second = kohya_file(kohya_mapped(base, seed=17))
    compare(base, cfg, [(first, 0.8), (second, -0.5)], fuse=fuse)


@pytest.mark.parametrize("fuse", [True, False])
@parity
def test_klein_pipeline_with_a_lora_matches_diffusers(tiny_klein_repo, tmp_path, one_thread, fuse):
    """End to end: our `Flux2ImagePipeline.load_lora` and diffusers' `Flux2KleinPipeline.load_lora_weights` on
    the same kohya file (our trainer's export for diffusers) give the same images."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ours = our_pipeline(tiny_klein_repo)
    path = tmp_path / "klein.kohya.safetensors"
    save_file(kohya_file(kohya_mapped(ours.dit, seed=18)), str(path))
    reference = reference_pipeline(tiny_klein_repo, distilled=True)
    reference.load_lora_weights(str(path), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.1])
    ours.load_lora(str(path), scale=0.1, fuse=fuse)
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    options = dict(height=64, width=64, num_inference_steps=3, latents=latents, output_type="np")
    got = ours(CAPTIONS[:2], progress_bar=False, **options)
    want = reference(prompt=CAPTIONS[:2], **options).images
    plain = reference_pipeline(tiny_klein_repo, distilled=True)(prompt=CAPTIONS[:2], **options).images
    assert max_abs(want, plain) > 0.05  # the LoRA changes the image (at a scale that does not saturate it)
    diff = max_abs(got, want)
    print(f"pipeline max abs diff {diff:.3g} (LoRA effect {max_abs(want, plain):.3g})")
    assert diff < 2e-5
