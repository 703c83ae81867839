"""Z-Image LoRAs in ComfyUI's NextDiT names (`lora.py`): read into ours exactly, written back out exactly.

The ComfyUI-named LoRAs here are built by hand from a LoRA in our names (the fused `qkv` as stacked downs and a
block-diagonal up, or as a plain `.diff`), so each test compares the pipeline's reading of one against the other.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import read_lora
from diffsynth.z_image import ZImagePipeline
from diffsynth.z_image.formats import COMFY_FUSED, COMFY_TO_OURS, _template, comfy_to_ours
from diffsynth.z_image.lora import convert_z_image_lora, convert_z_image_naming

# our layer -> (rank, alpha); context_refiner.0 has only to_k (the fused LoRA's q and v rows stay zero)
LAYERS = {
    "layers.0.attention.to_q": (2, 4.0),
    "layers.0.attention.to_k": (3, 3.0),
    "layers.0.attention.to_v": (2, 1.0),
    "layers.0.attention.to_out.0": (2, 8.0),
    "layers.1.feed_forward.w1": (2, 2.0),
    "layers.1.adaLN_modulation.0": (2, 1.0),
    "noise_refiner.0.attention.to_q": (1, 1.0),
    "noise_refiner.0.attention.to_k": (2, 1.0),
    "noise_refiner.0.attention.to_v": (2, 6.0),
    "context_refiner.0.attention.to_k": (2, 0.5),
    "all_x_embedder.2-1": (2, 2.0),
    "all_final_layer.2-1.linear": (2, 2.0),
    "all_final_layer.2-1.adaLN_modulation.1": (2, 2.0),
    "t_embedder.mlp.0": (2, 2.0),
}
QKV = ("to_q", "to_k", "to_v")


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def base(pipe):
    return {k: v.clone() for k, v in pipe.dit.state_dict().items()}


def ours_lora(dit, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (rank, alpha) in LAYERS.items():
        out_features, in_features = dit.get_submodule(name).weight.shape
        lora[name] = (torch.randn(rank, in_features, generator=g), torch.randn(out_features, rank, generator=g), alpha)
    return lora


def ours_state(lora) -> dict[str, torch.Tensor]:
    state = {}
    for name, (down, up, alpha) in lora.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def comfy_targets(lora, dit, diff=False) -> dict[str, dict[str, torch.Tensor]]:
    """The same LoRA in ComfyUI's names, built by hand: {NextDiT layer: {"down", "up"} or {"diff"}}."""
    ours_to_comfy = {o.removesuffix(".weight"): t.removesuffix(".weight") for t, o in COMFY_TO_OURS.items()}
    out, fused = {}, {}
    for name, (down, up, alpha) in lora.items():
        block, _, part = name.rpartition(".")
        if part in QKV:  # collected per block, fused below
            fused.setdefault(block, {})[part] = (down, up, alpha)
            continue
        template, index = _template(name + ".weight")
        comfy = ours_to_comfy.get(template.removesuffix(".weight"), template.removesuffix(".weight"))
        factor = alpha / down.shape[0]
        out[comfy.format(*index)] = {"diff": factor * up @ down} if diff else {"down": down, "up": factor * up}
    for block, parts in fused.items():
        rows, width = dit.get_submodule(f"{block}.to_q").weight.shape
        if diff:
            zero = torch.zeros(rows, width)
            deltas = [(lambda d, u, a: a / d.shape[0] * u @ d)(*parts[p]) if p in parts else zero for p in QKV]
            out[f"{block}.qkv"] = {"diff": torch.cat(deltas)}
            continue
        given = [p for p in QKV if p in parts]
        down = torch.cat([parts[p][0] for p in given])  # downs stacked along the rank
        up = torch.zeros(3 * rows, down.shape[0])  # block-diagonal up, alpha / rank folded in
        column = 0
        for p in given:
            d, u, a = parts[p]
            start = QKV.index(p) * rows
            up[start : start + rows, column : column + d.shape[0]] = u * (a / d.shape[0])
            column += d.shape[0]
        out[f"{block}.qkv"] = {"down": down, "up": up}
    return out


def comfy_state(targets, style="peft", prefix="diffusion_model.") -> dict[str, torch.Tensor]:
    state = {}
    for name, t in targets.items():
        if style == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            if "down" in t:
                state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = t["down"], t["up"]
                state[f"{key}.alpha"] = torch.tensor(float(t["down"].shape[0]))  # alpha / rank = 1
            else:
                state[f"{key}.diff"] = t["diff"]
        elif "down" in t:
            state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"] = t["down"], t["up"]
        else:
            state[f"{prefix}{name}.diff"] = t["diff"]
    return state


def fused_weights(pipe, base, lora) -> dict[str, torch.Tensor]:
    pipe.clear_loras()
    pipe.dit.load_state_dict(base)
    pipe.load_lora(lora, fuse=True)
    fused = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    pipe.dit.load_state_dict(base)
    return fused


def unfused_outputs(pipe, base, lora) -> dict[str, torch.Tensor]:
    """Each LoRA'd Linear's output on a fixed input, the LoRA attached apart (`fuse=False`)."""
    pipe.clear_loras()
    pipe.dit.load_state_dict(base)
    pipe.load_lora(lora, fuse=False)
    g = torch.Generator().manual_seed(7)
    outputs = {}
    for name in LAYERS:
        module = pipe.dit.get_submodule(name)
        outputs[name] = module(torch.randn(3, module.in_features, generator=g))
    pipe.clear_loras()
    return outputs


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ----------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("diff", [False, True], ids=["lora", "diff"])
@pytest.mark.parametrize("style,prefix", [("peft", "diffusion_model."), ("peft", ""), ("kohya", "")])
def test_comfyui_names_load_like_ours(pipe, base, style, prefix, diff):
    lora = ours_lora(pipe.dit)
    ours = fused_weights(pipe, base, ours_state(lora))
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert len(changed) == len(LAYERS)  # every LoRA'd layer changed, nothing else
    comfy = comfy_state(comfy_targets(lora, pipe.dit, diff), style, prefix)
    assert not any("to_q" in k or "to_out" in k or "all_x_embedder" in k for k in comfy)
    assert max_diff(fused_weights(pipe, base, comfy), ours) < 1e-5
    unfused, want = unfused_outputs(pipe, base, comfy), unfused_outputs(pipe, base, ours_state(lora))
    assert max_diff(unfused, want) < 1e-6 * max(float(v.abs().max()) for v in want.values())  # float32 rounding


def test_qkv_lora_splits_exactly_and_keeps_the_rank_columns_each_part_uses(pipe):
    lora = ours_lora(pipe.dit)
    comfy = read_lora(comfy_state(comfy_targets(lora, pipe.dit)))
    split = convert_z_image_lora(comfy)
    assert set(split.targets) == set(LAYERS)  # context_refiner.0's q and v (zero rows) are left out
    for name, (down, up, alpha) in lora.items():
        t = split.targets[name]
        assert t.rank == down.shape[0]
        torch.testing.assert_close(t.factor * t.up @ t.down, alpha / down.shape[0] * up @ down, atol=1e-5, rtol=0)
    assert split.keys["layers.0.attention.to_k"] == "diffusion_model.layers.0.attention.qkv.lora_A.weight"


def test_names_already_ours_pass_unchanged(pipe):
    lora = read_lora(ours_state(ours_lora(pipe.dit)))
    converted = convert_z_image_lora(lora)
    assert list(converted.targets) == list(lora.targets)
    assert all(converted.targets[name] is t for name, t in lora.targets.items())
    kohya = {}
    for name, (down, up, alpha) in ours_lora(pipe.dit).items():
        key = "lora_unet_" + name.replace(".", "_")
        kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
        kohya[f"{key}.alpha"] = torch.tensor(alpha)
    assert set(convert_z_image_lora(read_lora(kohya)).targets) == set(LAYERS)  # underscored names of ours, dotted


def test_row_norm_dora_on_qkv_is_split_on_its_rows(pipe, base):
    g = torch.Generator().manual_seed(3)
    rows, width = pipe.dit.get_submodule("layers.0.attention.to_q").weight.shape
    down, up = torch.randn(2, width, generator=g), torch.randn(3 * rows, 2, generator=g)
    magnitude = torch.rand(3 * rows, generator=g) + 0.5
    comfy = {"layers.0.attention.qkv.lora_down.weight": down, "layers.0.attention.qkv.lora_up.weight": up}
    comfy["layers.0.attention.qkv.dora_scale"] = magnitude[:, None]
    ours = {}
    for i, part in enumerate(QKV):
        ours[f"layers.0.attention.{part}.lora_down.weight"] = down
        ours[f"layers.0.attention.{part}.lora_up.weight"] = up[i * rows : (i + 1) * rows]
        ours[f"layers.0.attention.{part}.dora_scale"] = magnitude[i * rows : (i + 1) * rows, None]
    assert max_diff(fused_weights(pipe, base, comfy), fused_weights(pipe, base, ours)) < 1e-5


# ----------------------------------------------------------------------------------- ComfyUI's checkpoint tables
def test_lora_names_agree_with_comfyui_checkpoint_conversion(pipe, base):
    """The DiT's weights in ComfyUI's layout (`COMFY_TO_OURS` / `COMFY_FUSED` inverted), plus the ComfyUI-named
    LoRA's deltas on those tensors, converted back with `comfy_to_ours`: our fused weights."""
    ours_to_comfy = {o: t for t, o in COMFY_TO_OURS.items()}
    part_of = {part: (fused, i) for fused, parts in COMFY_FUSED.items() for i, part in enumerate(parts)}
    comfy_layout, pieces = {}, {}
    for key, value in base.items():
        template, index = _template(key)
        if template in part_of:
            fused, i = part_of[template]
            pieces.setdefault(fused.format(*index), {})[i] = value
        else:
            comfy_layout[ours_to_comfy[template].format(*index)] = value.clone()
    for key, parts in pieces.items():
        comfy_layout[key] = torch.cat([parts[i] for i in range(3)])
    lora = ours_lora(pipe.dit)
    for name, t in comfy_targets(lora, pipe.dit).items():
        comfy_layout[f"{name}.weight"] += t["up"] @ t["down"]
    back = comfy_to_ours(comfy_layout)
    assert max_diff(back, fused_weights(pipe, base, ours_state(lora))) < 1e-5


# ----------------------------------------------------------------------------------- writing
def test_cli_writes_comfyui_names_and_back(tmp_path):
    """`diffsynth lora convert --to comfyui` on the released DiT's shapes (meta device): NextDiT keys only, read back
    to the same deltas; `--to official` returns the original tensors."""
    g = torch.Generator().manual_seed(11)
    shapes = {
        "layers.3.attention.to_q": (3840, 3840),
        "layers.3.attention.to_v": (3840, 3840),
        "layers.3.attention.to_out.0": (3840, 3840),
        "all_x_embedder.2-1": (3840, 64),
        "all_final_layer.2-1.linear": (64, 3840),
    }
    state = {}
    for name, (o, i) in shapes.items():
        state[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, i, generator=g)
        state[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(o, 2, generator=g)
    save_file(state, str(tmp_path / "ours.safetensors"))
    comfy, back = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    args = ["lora", "convert", str(tmp_path / "ours.safetensors"), "--family", "z_image"]
    assert main([*args, "--to", "comfyui", "-o", str(comfy)]) == 0
    written = load_file(str(comfy))
    assert sorted({k.rsplit(".", 2)[0] for k in written}) == [
        "diffusion_model.final_layer.linear",
        "diffusion_model.layers.3.attention.out",
        "diffusion_model.layers.3.attention.qkv",
        "diffusion_model.x_embedder",
    ]
    assert written["diffusion_model.layers.3.attention.qkv.lora_B.weight"].shape == (3 * 3840, 4)
    read_back = convert_z_image_lora(read_lora(str(comfy)))
    assert set(read_back.targets) == set(shapes)
    for name, t in read_back.targets.items():
        down, up = state[f"diffusion_model.{name}.lora_A.weight"], state[f"diffusion_model.{name}.lora_B.weight"]
        assert torch.equal(t.down, down) and torch.equal(t.up * t.factor, up)
    assert main(["lora", "convert", str(comfy), "--family", "z_image", "--to", "official", "-o", str(back)]) == 0
    returned = load_file(str(back))
    assert sorted(returned) == sorted(k.removeprefix("diffusion_model.") for k in state)
    for key, value in returned.items():
        assert torch.equal(value, state[f"diffusion_model.{key}"])


def test_comfyui_writer_on_the_tiny_dit_reads_back_to_the_same_weights(pipe, base, tmp_path):
    lora = ours_lora(pipe.dit)
    ours = fused_weights(pipe, base, ours_state(lora))
    comfy = convert_z_image_naming(ours_state(lora), to="comfyui", model=pipe.dit)
    assert not any(name.endswith(QKV) or "to_out" in name or "all_" in name for name in comfy.targets)
    assert "context_refiner.0.attention.qkv" in comfy.targets  # k alone, as one LoRA on the fused layer
    assert max_diff(fused_weights(pipe, base, comfy), ours) < 1e-5


# ----------------------------------------------------------------------------------- errors
def test_loha_or_column_dora_on_qkv_is_refused(pipe):
    rows, width = pipe.dit.get_submodule("layers.0.attention.to_q").weight.shape
    key = "diffusion_model.layers.0.attention.qkv"
    loha = {f"{key}.hada_w1_a": torch.ones(3 * rows, 2), f"{key}.hada_w1_b": torch.ones(2, width)}
    loha.update({f"{key}.hada_w2_a": torch.ones(3 * rows, 2), f"{key}.hada_w2_b": torch.ones(2, width)})
    with pytest.raises(LoRAError, match=r"'diffusion_model\.layers\.0\.attention\.qkv\.hada_w1_a'.*LoHa / LoKr"):
        pipe.read_lora(loha)
    dora = {
        "layers.0.attention.qkv.lora_down.weight": torch.ones(2, width),
        "layers.0.attention.qkv.lora_up.weight": torch.ones(3 * rows, 2),
        "layers.0.attention.qkv.dora_scale": torch.ones(1, width),
    }
    with pytest.raises(LoRAError, match=r"'layers\.0\.attention\.qkv\.lora_down\.weight'.*column norms"):
        pipe.read_lora(dora)


def test_one_layer_under_both_names_is_refused(pipe):
    state = comfy_state(comfy_targets(ours_lora(pipe.dit), pipe.dit))
    state.update({k: v for k, v in ours_state(ours_lora(pipe.dit)).items() if k.startswith("layers.0.attention.to_k")})
    with pytest.raises(LoRAError, match=r"'diffusion_model\.layers\.0\.attention\.qkv.*'layers\.0\.attention\.to_k"):
        pipe.read_lora(state)
    kohya = {"lora_unet_x_embedder.lora_down.weight": torch.ones(1, 16), "all_x_embedder.2-1.diff": torch.ones(64, 16)}
    kohya["lora_unet_x_embedder.lora_up.weight"] = torch.ones(64, 1)
    with pytest.raises(LoRAError, match="lora_unet_x_embedder.*all_x_embedder.2-1.diff"):
        pipe.read_lora(kohya)


def test_unknown_keys_are_named(pipe, tmp_path):
    state = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(1, 8)}
    state["double_blocks.0.img_attn.qkv.lora_B.weight"] = torch.ones(24, 1)
    with pytest.raises(LoRAError, match="double_blocks"):
        pipe.load_lora(state)
    with pytest.raises(LoRAError, match="double_blocks.0.img_attn.qkv.lora_A.weight.*ComfyUI's NextDiT names"):
        convert_z_image_naming(state, to="comfyui", model=pipe.dit)
    with pytest.raises(LoRAError, match="unknown LoRA naming 'bfl'"):
        convert_z_image_naming(state, to="bfl", model=pipe.dit)


def test_training_reads_comfyui_names(pipe, tmp_path):
    """`--preset_lora_path` (the task's `read_lora`) and `--lora_checkpoint` (`pipe.read_lora`) convert them too."""
    from diffsynth.z_image.training import ZImageTrainingTask

    read_lora_checkpoint = pytest.importorskip("diffsynth.training.lora_checkpoint").read_lora_checkpoint

    lora = ours_lora(pipe.dit)
    path = tmp_path / "comfy.safetensors"
    save_file(comfy_state(comfy_targets(lora, pipe.dit)), str(path))
    task = ZImageTrainingTask(pipe)
    assert set(task.read_lora(str(path)).targets) == set(LAYERS)
    start = read_lora_checkpoint(task, pipe.dit, str(path))
    assert set(start) == set(LAYERS)
    t, (down, up, alpha) = start["layers.0.attention.to_k"], lora["layers.0.attention.to_k"]
    torch.testing.assert_close(t.factor * t.up @ t.down, alpha / down.shape[0] * up @ down, atol=1e-5, rtol=0)
