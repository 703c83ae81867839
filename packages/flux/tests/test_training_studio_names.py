"""DiffSynth-Studio's FLUX.1 LoRA training commands on our FLUX.1 DiT (BFL module names): its
`--lora_target_modules` list selects the Linears it selects in DiffSynth-Studio, and the trainer's `peft` file
is the diffusers-named LoRA that diffusers' FLUX.1 loader applies in full (and our pipeline reads back).

The trainer tests are `integration` (they need diffsynth-training and peft installed).
"""

import pytest
import torch

from diffsynth.flux.flux1.lora_layers import DOUBLE_LAYERS, SINGLE_LAYERS, studio_layers, studio_target_names
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.testing.modules import load_beside

helpers = load_beside(__file__, "helpers.py", "diffsynth_flux_test_helpers")

# DiffSynth-Studio's default `--lora_target_modules` for FLUX.1, as in its FLUX example scripts
STUDIO = (
    "a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,norm1_a.linear,"
    "norm1_b.linear,to_qkv_mlp"
).split(",")
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]


def linears(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def expected_layers(config) -> set[str]:
    """Every layer DiffSynth-Studio's FLUX.1 DiT trains with `STUDIO`, in our names (the table of its layers)."""
    layers = studio_layers(config.depth, config.depth_single_blocks, config.hidden_size, 1)
    return {layer.ours for layer in layers}


def lora_layers(module: torch.nn.Module) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in module.named_parameters() if ".lora_A" in name}


def test_each_studio_name_becomes_our_layers():
    dit = helpers.make_dit()
    names = linears(dit)
    table = {**DOUBLE_LAYERS, **SINGLE_LAYERS}
    for name in STUDIO:
        translated = studio_target_names([name], names)
        assert translated and all(any(n.endswith("." + t) for n in names) for t in translated), name
        assert set(translated) <= {ours for theirs, (ours, _) in table.items() if theirs.endswith(name)}, name
    assert set(studio_target_names(STUDIO, names)) == {ours for ours, _ in table.values()}
    # our own names (and a mixed list) stay as given
    assert studio_target_names(["img_attn.qkv", "linear1", "qkv"], names) == ["img_attn.qkv", "linear1", "qkv"]
    assert studio_target_names(["to_qkv_mlp", "linear1"], names) == ["linear1"]


def test_add_lora_takes_studios_list_through_the_task():
    """The trainer's `add_lora` with the FLUX.1 task's hook: `STUDIO` puts LoRA layers on exactly the layers
    DiffSynth-Studio's DiT trains with it (our default targets)."""
    pytest.importorskip("peft")
    trainer = pytest.importorskip("diffsynth.training.trainer")
    from diffsynth.training.config import TrainConfig

    dit = helpers.make_dit()
    task = FluxTrainingTask.__new__(FluxTrainingTask)  # the hook reads no state of the task
    cfg = TrainConfig(family="flux", dataset_base_path=".", lora_target_modules=STUDIO, lora_rank=2)
    trainer.add_lora(dit, cfg, task=task)
    assert lora_layers(dit) == expected_layers(dit.config)


@pytest.mark.integration
def test_studio_command_trains_and_its_peft_file_loads_in_diffusers(tiny_repo, tmp_path):
    """`--lora_target_modules <Studio's list> --lora_formats diffsynth,peft` on the tiny repo: the LoRA covers
    Studio's layers; the peft file has diffusers' names under `transformer.`, diffusers' `FluxTransformer2DModel`
    applies every one of its layers (its fused weights equal ours with our file fused), and our pipeline reads it
    back to the same weights as our own file."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    testing = pytest.importorskip("diffsynth.training.testing")
    from safetensors.torch import load_file

    from diffsynth.flux.flux1.formats import ours_to_diffusers

    dataset = testing.write_caption_dataset(tmp_path / "data", PROMPTS)
    out = tmp_path / "out"
    flags = ["--lora_target_modules", ",".join(STUDIO), "--lora_formats", "diffsynth,peft", "--max_steps", "1"]
    testing.train_with_cli(tiny_repo, "flux", dataset, out, *flags)
    ours_file, peft_file = out / "step-000001.safetensors", out / "step-000001.peft.safetensors"

    pipe = helpers.our_pipeline(tiny_repo)
    assert set(pipe.read_lora(ours_file).targets) == expected_layers(pipe.dit.config)
    keys = list(load_file(peft_file))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".attn.to_q.lora_A." in k for k in keys) and not any("double_blocks" in k for k in keys)

    # diffusers' loader: every layer of the file changes a weight, equal to ours with our file fused
    reference = diffusers.FluxTransformer2DModel.from_pretrained(tiny_repo / "transformer").eval()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    state = diffusers.FluxPipeline.lora_state_dict(str(peft_file))
    reference.load_lora_adapter(state[0] if isinstance(state, tuple) else state, prefix="transformer")
    reference.fuse_lora(lora_scale=1.0)
    after = {k.replace(".base_layer.", "."): v for k, v in reference.state_dict().items() if ".lora_" not in k}
    changed = {k.removesuffix(".weight") for k in before if not torch.equal(before[k], after[k])}
    layers = {k.removeprefix("transformer.").rsplit(".lora_A", 1)[0] for k in keys if ".lora_A." in k}
    assert changed == layers
    pipe.load_lora(ours_file, fuse=True)
    fused = ours_to_diffusers(pipe.dit.state_dict())
    for name in before:
        torch.testing.assert_close(after[name], fused[name], rtol=1e-5, atol=1e-6, msg=name)

    # our pipeline reads the peft file back to the same fused weights
    again = helpers.our_pipeline(tiny_repo)
    again.load_lora(peft_file, fuse=True)
    for name, value in again.dit.state_dict().items():
        torch.testing.assert_close(value, pipe.dit.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_only_the_dit_peft_file_is_renamed_and_what_diffusers_cannot_hold_stays_ours():
    from types import SimpleNamespace

    from diffsynth.runtime.lora import LoRATarget, LoRAWeights
    from diffsynth.runtime.lora_factors import HadamardDelta

    task = FluxTrainingTask.__new__(FluxTrainingTask)
    task.pipe = SimpleNamespace(dit=helpers.make_dit())
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g)
    lora = LoRAWeights(targets={"double_blocks.0.img_attn.qkv": LoRATarget(down=down, up=up, alpha=2.0)})
    assert task.lora_layout("kohya", lora) == (lora, None)
    renamed, prefix = task.lora_layout("peft", lora)
    assert prefix == "transformer." and set(renamed.targets) == {f"transformer_blocks.0.attn.to_{p}" for p in "qkv"}
    loha = HadamardDelta(up, down, up.flip(0), down, scale=1.0)
    loha_lora = LoRAWeights(targets={"double_blocks.0.img_attn.qkv": LoRATarget(factors=loha)})
    assert task.lora_layout("peft", loha_lora) == (loha_lora, None)  # a LoHa on a fused layer cannot be split
