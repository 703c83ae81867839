"""Timestep LoRA (`flux1/timestep_lora.py`, `FluxImagePipeline.load_timestep_lora`): the per-layer math and the time
embedding against DiffSynth-Studio's `FluxTimestepLoRAComponent` / `TemporalTimesteps` (read from its git mirror;
skipped where it is absent); the diffusers names mapped onto our fused Linears (a timestep LoRA with gamma 1 and
beta 0 is the plain LoRA of the same tensors, loaded by `load_lora`); its time dependence; removal; errors."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.flux.flux1.timestep_lora import EMBEDDING_DIM, TimestepLoRALayer, read_timestep_lora
from diffsynth.runtime.errors import LoRAError
from diffsynth.runtime.layers import timestep_embedding

pytestmark = pytest.mark.usefixtures("one_thread")
STUDIO = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")
RANK = 2
# the layers DiffSynth-Studio's loader reads, in diffusers names (block 0; the tiny DiT has one double block)
LAYERS = (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
    "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.1.attn.to_q",
    "single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.1.attn.to_v",
)  # fmt: skip


def studio_module(name: str):
    if not (STUDIO / "HEAD").exists() and not (STUDIO / ".git").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    source = subprocess.run(["git", "-C", str(STUDIO), "show", f"HEAD:{name}"], capture_output=True, text=True)
    if source.returncode:
        pytest.skip(f"{name} is not in the mirror")
    module = types.ModuleType("studio_" + Path(name).stem)
    text = source.stdout.replace("from ...core import load_state_dict", "load_state_dict = None")
    exec(compile(text, f"studio:{name}", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module


def timestep_state(dit, seed: int = 0, gamma_one: bool = False) -> dict[str, torch.Tensor]:
    """A timestep LoRA file's tensors on `LAYERS` (peft names under base_model.model.); `gamma_one`: gamma 1 and
    beta 0 at every timestep (a plain LoRA)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    width = dit.config.hidden_size
    for layer in LAYERS:
        from diffsynth.flux.flux1.timestep_lora import _part_rows

        module, rows = _part_rows(dit, layer)
        linear = dit.get_submodule(module)
        out = width if rows is not None else linear.out_features
        key = f"base_model.model.{layer}"
        state[f"{key}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=g) * 0.2
        state[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.2
        for name in ("gamma", "beta"):
            weight = torch.zeros(RANK, EMBEDDING_DIM) if gamma_one else torch.randn(RANK, EMBEDDING_DIM, generator=g)
            bias = (torch.ones(RANK) if name == "gamma" else torch.zeros(RANK)) if gamma_one else torch.randn(RANK)
            state[f"{key}.lora_time_{name}.weight"], state[f"{key}.lora_time_{name}.bias"] = weight, bias
    return state


def test_layer_math_and_time_embedding_match_diffsynth_studio():
    lora = studio_module("diffsynth/utils/lora/flux_timestep.py")
    general = studio_module("diffsynth/models/general_modules.py")
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
    gamma = (torch.randn(3, 256, generator=g), torch.randn(3, generator=g))
    beta = (torch.randn(3, 256, generator=g), torch.randn(3, generator=g))
    ours = TimestepLoRALayer("m", slice(0, 6), down, up, gamma, beta)
    theirs = lora.FluxTimestepLoRAComponent(down, up, *gamma, *beta, scaling=2.0)
    x = torch.randn(1, 5, 8, generator=g)
    sigma = torch.tensor([0.37])
    embedding = general.TemporalTimesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(sigma * 1000)
    torch.testing.assert_close(timestep_embedding(sigma * 1000, 256, cos_first=True), embedding)
    torch.testing.assert_close(ours.delta(x, embedding, 2.0), theirs(x, embedding))


def test_with_gamma_one_and_beta_zero_it_is_the_plain_lora(tiny_repo, tmp_path):
    """The same A and B as a diffusers-named LoRA (alpha = 2 * rank: factor 2) through `load_lora`: the DiT's output
    is the same, so every name lands on the right Linear and rows."""
    from diffsynth_flux_test_helpers import our_pipeline

    timed, plain = our_pipeline(tiny_repo), our_pipeline(tiny_repo)
    state = timestep_state(timed.dit, gamma_one=True)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    timed.load_timestep_lora(str(tmp_path / "adapter_model.safetensors"))
    peft = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            peft[key.replace("base_model.model.", "transformer.")] = value
        if key.endswith("lora_A.weight"):
            peft[key.replace("base_model.model.", "transformer.").replace("lora_A.weight", "alpha")] = torch.tensor(
                2.0 * RANK
            )
    save_file(peft, str(tmp_path / "plain.safetensors"))
    plain.load_lora(str(tmp_path / "plain.safetensors"), fuse=False)
    run = dict(num_inference_steps=2, height=32, width=32, seed=0, t5_sequence_length=16, output_type="pt",
               progress_bar=False)  # fmt: skip
    torch.testing.assert_close(timed("a cat", **run), plain("a cat", **run), atol=1e-5, rtol=1e-4)


def test_the_delta_follows_the_timestep_and_clearing_restores_the_model(tiny_repo, tmp_path):
    from diffsynth_flux_test_helpers import our_pipeline

    pipe = our_pipeline(tiny_repo)
    run = dict(num_inference_steps=2, height=32, width=32, seed=0, t5_sequence_length=16, output_type="pt",
               progress_bar=False)  # fmt: skip
    before = pipe("a cat", **run)
    save_file(timestep_state(pipe.dit, seed=3), str(tmp_path / "adapter_model.safetensors"))
    attached = pipe.load_timestep_lora(str(tmp_path / "adapter_model.safetensors"), alpha=1.5)
    linear = pipe.dit.get_submodule("double_blocks.0.img_attn.proj")
    seen = []
    handle = linear.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad():
            for sigma in (0.9, 0.2):
                seen.clear()
                x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
                ids = torch.zeros(4, 3)
                text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
                pipe.dit(
                    x, ids, text, torch.zeros(16, 3), torch.tensor([sigma]), torch.zeros(1, 32), torch.tensor([3.5])
                )
                (inputs, out), part = seen[0], next(p for p in attached.layers if p.module == linear_name(pipe, linear))
                base = torch.nn.functional.linear(inputs, linear.weight, linear.bias)
                t = timestep_embedding(torch.tensor([sigma * 1000]), EMBEDDING_DIM, cos_first=True)
                h = torch.nn.functional.linear(inputs, part.down)
                h = (
                    h * torch.nn.functional.linear(t, *part.gamma)[:, None]
                    + torch.nn.functional.linear(t, *part.beta)[:, None]
                )
                torch.testing.assert_close(
                    out, base + 1.5 * torch.nn.functional.linear(h, part.up), atol=1e-5, rtol=1e-4
                )
    finally:
        handle.remove()
    assert (pipe("a cat", **run) - before).abs().max() > 1e-4
    pipe.clear_timestep_loras()
    torch.testing.assert_close(pipe("a cat", **run), before, atol=0, rtol=0)


def linear_name(pipe, linear) -> str:
    return next(name for name, module in pipe.dit.named_modules() if module is linear)


def test_errors_name_the_key(tiny_pipe):
    state = timestep_state(tiny_pipe.dit)
    key = next(k for k in state if k.endswith("lora_time_beta.bias"))
    with pytest.raises(LoRAError, match="lacks lora_time_beta.bias"):
        read_timestep_lora({k: v for k, v in state.items() if k != key}, tiny_pipe.dit, "f")
    with pytest.raises(LoRAError, match="is no FLUX.1 DiT Linear"):
        read_timestep_lora({"base_model.model.foo.lora_A.weight": torch.zeros(1)} | {
            f"base_model.model.foo.{p}": torch.zeros(1) for p in ("lora_B.weight", "lora_time_gamma.weight",
            "lora_time_gamma.bias", "lora_time_beta.weight", "lora_time_beta.bias")}, tiny_pipe.dit, "f")  # fmt: skip
    with pytest.raises(LoRAError, match="'x.weight' is not a timestep LoRA tensor"):
        read_timestep_lora({"x.weight": torch.zeros(1)}, tiny_pipe.dit, "f")
