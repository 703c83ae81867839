"""What LoRA files carry besides their tensors, through reading and the `diffsynth lora` tools: diffusers' alphas in
the safetensors header, the rest of the header, the names' prefix and dtype; and what the tools refuse (text-encoder
entries, one layer named two ways, shapes that do not match) or leave out (layers that are no Linear)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffsynth.runtime import lora_tools
from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.lora import apply_lora, load_lora, read_lora
from diffsynth.runtime.lora_tools import extract_lora, merge_loras, resize_lora

RANK, ALPHA = 8, 4.0


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.t_embedding = nn.Embedding(4, 16)  # like Qwen-Image's addition_t_embedding
        self.proj = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 16, 2)  # like Wan's patch_embedding
        self.blocks = nn.ModuleList([nn.Linear(16, 16, bias=False)])


def pair(out: int = 16, fan_in: int = 16, rank: int = RANK, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, fan_in, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1


def diffusers_header(config: dict) -> dict[str, str]:
    """The header diffusers' `save_lora_weights` writes (`LoraBaseMixin.write_lora_layers`): the peft config of each
    model under its name, as sorted, indented JSON."""
    packed = {f"transformer.{key}": value for key, value in config.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def delta_of(path, model_factory=Tiny) -> torch.Tensor:
    torch.manual_seed(0)
    model = model_factory()
    before = model.proj.weight.detach().clone()
    load_lora(model, path)
    return model.proj.weight.detach() - before


# ------------------------------------------------------------------------------- 1. diffusers' header alphas
def test_diffusers_header_alpha_is_applied_by_the_runtime_loader(tmp_path):
    down, up = pair()
    path = tmp_path / "diffusers.safetensors"
    tensors = {"transformer.proj.lora_A.weight": down, "transformer.proj.lora_B.weight": up}
    save_file(tensors, str(path), metadata=diffusers_header({"r": RANK, "lora_alpha": ALPHA}))
    assert read_lora(path).targets["proj"].alpha == ALPHA
    assert torch.allclose(delta_of(path), (ALPHA / RANK) * up @ down, atol=1e-6)
    resized = resize_lora(path, RANK)  # the tools read it the same way, and fold the strength in
    assert torch.allclose(resized.targets["proj"].delta_weight(), 0.5 * up @ down, atol=1e-5)
    assert "lora_adapter_metadata" not in resized.header


def test_diffusers_header_alpha_pattern_and_rslora(tmp_path):
    down, up = pair()
    config = {"r": RANK, "lora_alpha": ALPHA, "alpha_pattern": {"blocks.0": 2.0}, "use_rslora": True}
    path = tmp_path / "pattern.safetensors"
    tensors = {"proj.lora_A.weight": down, "proj.lora_B.weight": up}
    tensors |= {"blocks.0.lora_A.weight": down.clone(), "blocks.0.lora_B.weight": up.clone()}
    save_file(tensors, str(path), metadata=diffusers_header(config))
    lora = read_lora(path)
    assert lora.targets["proj"].factor == pytest.approx(ALPHA / RANK**0.5)
    assert lora.targets["blocks.0"].factor == pytest.approx(2.0 / RANK**0.5)


def test_a_file_saved_by_diffusers_is_applied_at_alpha_over_rank(tmp_path):
    pipeline_loras = pytest.importorskip("diffusers.loaders.lora_pipeline")
    down, up = pair()
    pipeline_loras.WanLoraLoaderMixin.save_lora_weights(
        str(tmp_path),
        transformer_lora_layers={"proj.lora_A.weight": down, "proj.lora_B.weight": up},
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": ["proj"]},
        weight_name="wan.safetensors",
    )
    path = tmp_path / "wan.safetensors"
    assert torch.allclose(delta_of(path), 0.5 * up @ down, atol=1e-6)


def test_an_own_alpha_key_wins_over_the_header(tmp_path):
    down, up = pair()
    path = tmp_path / "own.safetensors"
    tensors = {"proj.lora_A.weight": down, "proj.lora_B.weight": up, "proj.alpha": torch.tensor(8.0)}
    save_file(tensors, str(path), metadata=diffusers_header({"r": RANK, "lora_alpha": ALPHA}))
    assert read_lora(path).targets["proj"].factor == 1.0


# ------------------------------------------------------------------------------- 2. header, text encoders
def test_resize_and_merge_keep_the_header(tmp_path):
    down, up = pair()
    ic = tmp_path / "ic.safetensors"
    meta = {"reference_downscale_factor": "2", "ss_output_name": "mine", "ss_network_dim": "8"}
    save_file({"proj.lora_A.weight": down, "proj.lora_B.weight": up}, str(ic), metadata=meta)
    out = tmp_path / "r.safetensors"
    assert main(["lora", "resize", str(ic), "--rank", "4", "-o", str(out)]) == 0
    written = header(out)
    assert written["reference_downscale_factor"] == "2" and written["ss_output_name"] == "mine"
    assert "ss_network_dim" not in written  # the rank changed
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.lora_A.weight": down, "blocks.0.lora_B.weight": up}, str(other), metadata={"ss_x": "b"})
    merged = tmp_path / "m.safetensors"
    assert main(["lora", "merge", str(ic), str(other), "-o", str(merged)]) == 0
    assert header(merged)["reference_downscale_factor"] == "2" and header(merged)["ss_x"] == "b"


def test_merge_drops_header_entries_that_disagree_and_refuses_loader_ones(tmp_path, caplog):
    down, up = pair()
    files = []
    for n, meta in enumerate(({"ss_output_name": "a", "k": "1"}, {"ss_output_name": "b", "k": "1"})):
        files.append(tmp_path / f"{n}.safetensors")
        save_file({"proj.lora_A.weight": down, "proj.lora_B.weight": up}, str(files[-1]), metadata=meta)
    with caplog.at_level(logging.WARNING):
        merged = merge_loras([(files[0], 1.0), (files[1], 1.0)])
    assert merged.header == {"k": "1"}
    assert "'ss_output_name' differs" in caplog.text
    for n, factor in enumerate(("1", "2")):
        save_file({"proj.lora_A.weight": down, "proj.lora_B.weight": up}, str(files[n]),
                  metadata={"reference_downscale_factor": factor})  # fmt: skip
    with pytest.raises(LoRAError, match=r"'reference_downscale_factor' is '1' in .*0\.safetensors but '2' in"):
        merge_loras([(files[0], 1.0), (files[1], 1.0)])


def test_tools_refuse_text_encoder_entries_unless_dropped(tmp_path):
    down, up = pair()
    path = tmp_path / "k.safetensors"
    te_down, te_up = pair(seed=1)
    save_file({
        "lora_unet_proj.lora_down.weight": down, "lora_unet_proj.lora_up.weight": up,
        "lora_te1_text_model_q.lora_down.weight": te_down, "lora_te1_text_model_q.lora_up.weight": te_up,
    }, str(path))  # fmt: skip
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoRAError, match="holds 2 text-encoder LoRA keys .* denoiser's part only"):
        resize_lora(path, 4)
    with pytest.raises(LoRAError, match="holds 2 text-encoder LoRA keys"):
        merge_loras([(path, 1.0)])
    assert main(["lora", "resize", str(path), "--rank", "4", "-o", str(out)]) == 2 and not out.exists()
    assert (
        main(["lora", "resize", str(path), "--rank", "4", "-o", str(out), "--drop-text-encoder", "--format", "kohya"])
        == 0
    )
    assert sorted(load_file(out)) == ["lora_unet_proj.lora_down.weight", "lora_unet_proj.lora_up.weight"]


# ------------------------------------------------------------------------------- 3. prefix
@pytest.mark.parametrize(
    ("prefix", "format", "written"),
    [
        ("transformer.", "diffsynth", "transformer.proj.lora_A.weight"),
        ("transformer.", "peft", "transformer.proj.lora_A.weight"),
        ("transformer.", "kohya", "lora_unet_proj.lora_down.weight"),
        ("", "peft", "diffusion_model.proj.lora_A.weight"),
    ],
)
def test_resize_writes_the_names_under_the_prefix_they_were_read_with(tmp_path, prefix, format, written):
    down, up = pair()
    path = tmp_path / "in.safetensors"
    save_file({f"{prefix}proj.lora_A.weight": down, f"{prefix}proj.lora_B.weight": up}, str(path))
    out = tmp_path / "out.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "4", "--format", format, "-o", str(out)]) == 0
    assert written in load_file(out)


def test_merge_keeps_a_shared_prefix_and_prefix_flag_overrides(tmp_path):
    down, up = pair()
    paths = []
    for n in range(2):
        paths.append(tmp_path / f"{n}.safetensors")
        save_file({"transformer.proj.lora_A.weight": down, "transformer.proj.lora_B.weight": up}, str(paths[-1]))
    out = tmp_path / "m.safetensors"
    assert main(["lora", "merge", *map(str, paths), "-o", str(out)]) == 0
    assert "transformer.proj.lora_A.weight" in load_file(out)
    assert main(["lora", "merge", *map(str, paths), "-o", str(out), "--prefix", ""]) == 0
    assert "proj.lora_A.weight" in load_file(out)


# ------------------------------------------------------------------------------- 4, 5. extract
def tiny_pair(prefix: str = "") -> tuple[dict, dict, Tiny]:
    torch.manual_seed(0)
    base = Tiny()
    state = {prefix + k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    return state, tuned, base


def test_extract_leaves_out_weights_that_are_no_linear_and_loads_back(tmp_path, caplog):
    base, tuned, model = tiny_pair()
    with caplog.at_level(logging.WARNING):
        lora = extract_lora(base, tuned, rank=4)
    assert sorted(lora.targets) == ["blocks.0", "proj"]
    assert "2 changed weights are no Linear layer" in caplog.text and "t_embedding.weight (4, 16)" in caplog.text
    assert "conv.weight (16, 4, 2, 2)" in caplog.text
    apply_lora(model, lora)  # an Embedding's lora_A/B would be refused here
    precise = extract_lora(base, tuned, rank=4, linears={"proj"})
    assert sorted(precise.targets) == ["proj"]


def test_extract_drops_a_comfyui_checkpoint_prefix_from_the_names(tmp_path):
    base, tuned, model = tiny_pair("model.diffusion_model.")
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "k.safetensors"
    args = ["lora", "extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--rank", "2"]
    assert main([*args, "--format", "kohya", "-o", str(out)]) == 0
    assert "lora_unet_proj.lora_down.weight" in load_file(out)
    load_lora(model, out)


# ------------------------------------------------------------------------------- 6, 7. merge refusals
def test_merge_refuses_one_layer_named_two_ways(tmp_path):
    down, up = pair()
    kohya, dotted = tmp_path / "k.safetensors", tmp_path / "p.safetensors"
    save_file({"lora_unet_blocks_0.lora_down.weight": down, "lora_unet_blocks_0.lora_up.weight": up}, str(kohya))
    save_file(
        {"diffusion_model.blocks.0.lora_A.weight": down, "diffusion_model.blocks.0.lora_B.weight": up}, str(dotted)
    )
    with pytest.raises(LoRAError, match=r"k\.safetensors names a layer 'lora_unet_blocks_0.*/p\.safetensors "
                       r"'diffusion_model\.blocks\.0\.lora_A\.weight': both are layer 'blocks_0'"):  # fmt: skip
        merge_loras([(kohya, 1.0), (dotted, 1.0)])


@pytest.mark.parametrize("rank", [None, 4])
def test_merge_refuses_factors_of_different_shapes(tmp_path, rank):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(dict(zip(("proj.lora_A.weight", "proj.lora_B.weight"), pair(), strict=True)), str(first))
    save_file(dict(zip(("proj.lora_A.weight", "proj.lora_B.weight"), pair(16, 12), strict=True)), str(second))
    with pytest.raises(LoRAError, match=r"'proj.lora_A.weight': layer 'proj' has weight change \(16, 16\) in .*a\."
                       r"safetensors but \(16, 12\) in .*b\.safetensors"):  # fmt: skip
        merge_loras([(first, 1.0), (second, 1.0)], rank=rank)


# ------------------------------------------------------------------------------- 8. arguments checked first
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "comfyui", "-o", "x.safetensors"], "--format 'comfyui' is not a LoRA key layout"),
        (["-o", "x.pt"], "-o x.pt: LoRA files are written as .safetensors"),
        (["--dtype", "fp8", "-o", "x.safetensors"], "--dtype 'fp8' is not accepted"),
    ],
)
def test_bad_format_or_output_fails_before_any_work(tmp_path, monkeypatch, capsys, extra, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    monkeypatch.setattr(lora_tools, "extract_lora", no_work)
    monkeypatch.chdir(tmp_path)
    assert main(["lora", "extract", "base.safetensors", "tuned.safetensors", "--rank", "2", *extra]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- 9. dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tools_write_the_inputs_dtype(tmp_path, dtype):
    down, up = pair()
    path = tmp_path / "half.safetensors"
    save_file({"proj.lora_A.weight": down.to(dtype), "proj.lora_B.weight": up.to(dtype)}, str(path))
    for command in (["resize", str(path), "--rank", "4"], ["merge", str(path), f"{path}:0.5"]):
        out = tmp_path / "out.safetensors"
        assert main(["lora", *command, "-o", str(out)]) == 0
        assert {t.dtype for t in load_file(out).values()} == {dtype}
        assert main(["lora", *command, "-o", str(out), "--dtype", "float32"]) == 0
        assert {t.dtype for t in load_file(out).values()} == {torch.float32}
    base, tuned, _ = tiny_pair()
    lora = extract_lora({k: v.to(dtype) for k, v in base.items()}, {k: v.to(dtype) for k, v in tuned.items()}, 2)
    assert {lora.targets["proj"].down.dtype, lora.targets["proj"].up.dtype} == {dtype}
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in base.items() if v.dim() == 2}
    lora = extract_lora(fp8, {k: v.to(torch.float8_e4m3fn) for k, v in tuned.items() if k in fp8}, 2)
    assert lora.targets["proj"].down.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- 10. kohya names, replaced -o
def kohya_file(tmp_path):
    down, up = pair()
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_blocks_0.lora_down.weight": down, "lora_unet_blocks_0.lora_up.weight": up}, str(path))
    return path


@pytest.mark.parametrize("format", ["peft", "diffsynth"])
@pytest.mark.parametrize("command", [["resize", "--rank", "4"], ["merge"]])
def test_kohya_names_are_refused_in_a_dotted_format_and_nothing_is_written(tmp_path, capsys, format, command):
    path, out = kohya_file(tmp_path), tmp_path / "out.safetensors"
    args = ["lora", command[0], str(path), *command[1:], "--format", format, "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "kohya.safetensors has kohya names ('lora_unet_blocks_0.lora_down.weight'" in err
    assert "Keep --format kohya" in err and "diffsynth lora convert" in err
    assert not out.exists()
    assert main([*args[:-4], "--format", "kohya", "-o", str(out)]) == 0
    assert "lora_unet_blocks_0.lora_down.weight" in load_file(out)


def test_an_existing_output_is_replaced_with_a_warning(tmp_path, caplog):
    down, up = pair()
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"proj.lora_A.weight": down, "proj.lora_B.weight": up}, str(path))
    assert main(["lora", "resize", str(path), "--rank", "4", "-o", str(out)]) == 0
    assert "replacing" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert main(["lora", "resize", str(path), "--rank", "2", "-o", str(out)]) == 0
    assert f"-o {out} exists; replacing it" in caplog.text
    assert load_file(out)["proj.lora_A.weight"].shape[0] == 2
