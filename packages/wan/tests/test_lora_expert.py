"""A LoRA trained on one Wan 2.2 A14B expert names it in its header (`diffsynth_wan_expert`, the training task's
`lora_metadata`), and `WanVideoPipeline.load_lora` applies it to that expert (`dit` / `dit2`) unless told a slot."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.hub import ModelConfig
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.pipeline import folder_model_configs
from diffsynth.wan.training import WanTrainingTask

KEY = WanVideoPipeline.LORA_EXPERT_KEY
LAYER = "blocks.0.self_attn.q"


def expert_task(repo, **options) -> WanTrainingTask:
    """The task on the low-noise expert's folder alone (the DiT only)."""
    config = ModelConfig(path=str(repo / "low_noise_model"))
    return WanTrainingTask.from_pretrained([config], torch_dtype="float32", device="cpu", encoders=False, **options)


def test_a_lora_header_names_the_expert_it_trained(tiny_repo_factory):
    repo = tiny_repo_factory("a14b")
    assert expert_task(repo).lora_metadata() == {KEY: "low"}
    assert expert_task(repo, expert="high").lora_metadata() == {KEY: "high"}
    configs, _ = folder_model_configs(tiny_repo_factory("t2v"))
    dits = [c for c in configs if "diffusion_pytorch_model" in str(c.path)]
    plain = WanTrainingTask.from_pretrained(dits, torch_dtype="float32", device="cpu", encoders=False)
    assert plain.lora_metadata() == {}  # a Wan 2.1 DiT: no expert


@pytest.fixture(scope="module")
def a14b_pipe(tiny_repo_factory):
    return WanVideoPipeline.from_pretrained(str(tiny_repo_factory("a14b")), torch_dtype="float32", device="cpu")


def lora_file(pipe, folder, expert: str | None):
    """A seeded rank-2 LoRA on one attention layer, its header naming `expert` (none when None)."""
    layer = dict(pipe.dit.named_modules())[LAYER]
    g = torch.Generator().manual_seed(0)
    state = {
        f"{LAYER}.lora_A.weight": torch.randn(2, layer.in_features, generator=g),
        f"{LAYER}.lora_B.weight": torch.randn(layer.out_features, 2, generator=g),
    }
    path = folder / f"lora-{expert}.safetensors"
    save_file(state, str(path), metadata={"format": "pt", **({KEY: expert} if expert else {})})
    return path


def changed(pipe, path, **options) -> list[str]:
    """The experts (`dit`, `dit2`) whose weights `load_lora(path, **options)` changes; both restored after."""
    before = {slot: getattr(pipe, slot).state_dict()[f"{LAYER}.weight"].clone() for slot in ("dit", "dit2")}
    pipe.load_lora(path, **options)
    after = {slot: getattr(pipe, slot).state_dict()[f"{LAYER}.weight"] for slot in ("dit", "dit2")}
    moved = [slot for slot in ("dit", "dit2") if not torch.equal(before[slot], after[slot])]
    for slot, weight in before.items():
        after[slot].copy_(weight)
    return moved


def test_load_lora_applies_an_expert_lora_to_its_expert(a14b_pipe, tmp_path, caplog):
    assert changed(a14b_pipe, lora_file(a14b_pipe, tmp_path, "low")) == ["dit2"]
    assert changed(a14b_pipe, lora_file(a14b_pipe, tmp_path, "high")) == ["dit"]
    assert changed(a14b_pipe, lora_file(a14b_pipe, tmp_path, None)) == ["dit"]  # no header: the denoiser
    assert changed(a14b_pipe, lora_file(a14b_pipe, tmp_path, "low"), slot="dit2") == ["dit2"]
    with caplog.at_level(logging.WARNING, logger="diffsynth.wan.pipeline"):
        assert changed(a14b_pipe, lora_file(a14b_pipe, tmp_path, "low"), slot="dit") == ["dit"]  # obeyed, warned
    assert "low-noise expert" in caplog.text and "slot='dit'" in caplog.text
