"""Training the Video-As-Prompt expert itself (`trained_model="vap"`, DiffSynth-Studio's `--trainable_models vap`):
the trainer's model (`VapExpertInTraining`) holds the expert's own modules and runs the whole model call, which is the
pipeline's per-step call with that expert; only the expert learns; the saved file has the released `*_mot_ref*` keys
and loads into `WanVideoPipeline` as its expert, giving the trained velocity.

The reference is the pipeline itself, as in test_training_vap.py (the tiny DiT and expert of
test_video_as_prompt_pipeline.py, the rows and the one-step pipeline call of test_training_vap.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.wan import WanVideoPipeline
from diffsynth.wan.pipeline import folder_model_configs
from diffsynth.wan.training import VapExpertInTraining, WanTrainingTask
from diffsynth.wan.video_as_prompt import MOT_SUFFIX

from . import test_training_vap as TV
from . import test_video_as_prompt_pipeline as VP

PROMPTS, CAPTION = TV.PROMPTS, TV.CAPTION
frames, as_video, pipeline_velocity = TV.frames, TV.as_video, TV.pipeline_velocity


def noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vap(tiny_repo_factory):
    """The tiny I2V pipeline with an expert beside both its layers, the task training the expert, and one batch."""
    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("i2v")), torch_dtype="float32", device="cpu")
    pipe.vap = VP.tiny_expert(pipe.dit.config, (0, 1))
    task = WanTrainingTask(pipe, trained_model="vap")
    return pipe, task, task.collate(task.encode(TV.vap_rows()))


def test_the_expert_in_training_runs_the_pipelines_call(vap):
    """The trainer's model is `VapExpertInTraining` over the expert's own modules (its state dict is the expert's);
    its velocity is the pipeline's DiT call with that expert (one step from the same noise and sigma), and exactly
    what the DiT-training task computes."""
    pipe, task, batch = vap
    assert task.denoiser_slot == "vap"
    model = task.models["vap"]
    assert isinstance(model, VapExpertInTraining) and task.models["dit"] is pipe.dit
    assert model.state_dict().keys() == pipe.vap.state_dict().keys()
    assert all(model.get_submodule(n) is m for n, m in pipe.vap.named_children())
    noisy, sigma = noise((2, 16, 2, 4, 4), 0), torch.tensor([0.8, 0.35])
    with torch.no_grad():
        ours = task.velocity(model, batch, noisy, sigma)
        frozen = WanTrainingTask(pipe).velocity(pipe.dit, batch, noisy, sigma)
    torch.testing.assert_close(ours, frozen, rtol=0, atol=0)
    for k, row in enumerate(TV.vap_rows()):
        arguments = TV.pipeline_arguments(row)
        theirs = pipeline_velocity(pipe, row["prompt"], noisy[k : k + 1], float(sigma[k]), **arguments)
        torch.testing.assert_close(ours[k : k + 1], theirs, rtol=1e-5, atol=1e-5)


def test_only_the_expert_gets_gradients_and_checkpointing_reaches_the_joint_layers(vap):
    """The gradient reaches the expert's weights and none of the frozen DiT's; the weights it misses are exactly
    those after the last joint layer's attention (the reference tokens feed nothing after it). Gradient
    checkpointing asked of the trained model reaches the DiT (whose flag recomputes the joint layers too) and
    gives the same gradients. (The last block's reference queries get a zero gradient: they only make reference
    tokens.)"""
    pipe, task, batch = vap
    model = task.models["vap"]
    noisy, sigma = noise((2, 16, 2, 4, 4), 1), torch.tensor([0.7, 0.2])
    last = f"blocks.{len(model.blocks) - 1}."
    unused = ("self_attn.o.", "norm3.", "cross_attn.", "ffn.")
    model.requires_grad_(True)
    grads = []
    try:
        for checkpointing in (False, True):
            model.gradient_checkpointing = checkpointing
            task.velocity(model, batch, noisy, sigma).square().mean().backward()
            assert pipe.dit.gradient_checkpointing is checkpointing
            assert all(p.grad is None for p in pipe.dit.parameters())
            named = dict(model.named_parameters())
            for name, p in named.items():
                tail = name[len(last) :] if name.startswith(last) else ""
                assert (p.grad is None) == tail.startswith(unused), name
                if tail.startswith(("self_attn.q.", "self_attn.norm_q.")):  # only for the reference's own rows
                    assert not p.grad.any(), name
                elif p.grad is not None:
                    assert p.grad.abs().sum() > 0, name
            grads.append({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
            model.zero_grad(set_to_none=True)
    finally:
        model.requires_grad_(False).zero_grad(set_to_none=True)
        model.gradient_checkpointing = pipe.dit.gradient_checkpointing = False
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_a_float32_expert_trains_under_a_bfloat16_dit(tiny_repo_factory):
    """The trainer's default: the frozen DiT in bfloat16, the expert's trained weights in float32. Each expert layer
    computes in float32 and hands back bfloat16: the velocity stays that of the all-bfloat16 pipeline call (to
    bfloat16 rounding) and the float32 weights get their gradients."""
    pipe = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("i2v")), torch_dtype="float32", device="cpu")
    pipe.vap = VP.tiny_expert(pipe.dit.config, (0, 1))
    rows = TV.vap_rows()
    batch = WanTrainingTask(pipe).collate(WanTrainingTask(pipe).encode(rows))
    pipe.dit.to(torch.bfloat16)
    pipe.vap.to(torch.bfloat16)
    noisy, sigma = noise((2, 16, 2, 4, 4), 2), torch.tensor([0.6, 0.4])
    with torch.no_grad():
        bf16 = WanTrainingTask(pipe).velocity(pipe.dit, batch, noisy, sigma)
    task = WanTrainingTask(pipe, trained_model="vap")
    model = task.models["vap"].to(torch.float32).requires_grad_(True)  # as the trainer does
    out = task.velocity(model, batch, noisy, sigma)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.detach(), bf16, rtol=0.05, atol=0.05)
    assert float((out.detach() - bf16).abs().max()) < 0.02 * float(bf16.abs().max())
    out.square().mean().backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.patch_embedding.weight.grad.abs().sum() > 0 and model.blocks[0].self_attn.q.weight.grad is not None
    assert all(p.grad is None for p in pipe.dit.parameters())


def test_refusals(vap, tiny_repo_factory):
    pipe, task, batch = vap
    plain = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("i2v")), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match=r"trained_model='vap' \(--trainable_models vap.*not among the model files"):
        WanTrainingTask(plain, trained_model="vap")
    t2v = WanVideoPipeline.from_pretrained(str(tiny_repo_factory("t2v")), torch_dtype="float32", device="cpu")
    t2v.vap = VP.tiny_expert(t2v.dit.config, (0, 1))
    with pytest.raises(ConfigError, match="not the plain Wan 2.1 I2V DiT it runs beside"):
        WanTrainingTask(t2v, trained_model="vap")
    without = {k: v for k, v in batch.items() if not k.startswith("vap_")}
    with pytest.raises(ConfigError, match="encoded without vap_video"):
        task.velocity(task.models["vap"], without, noise((2, 16, 2, 4, 4), 3), torch.tensor([0.5, 0.5]))
    with pytest.raises(ConfigError, match="validation samples of a Video-As-Prompt model"):
        task.reference_arguments([])
    with pytest.raises(ConfigError, match="have no released key"):
        task.export_state("vap", {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(1)})


def test_ddp_needs_find_unused_parameters(vap, tmp_path):
    """Under DDP (one gloo process here) the expert trains with `find_unused_parameters` (the last block's weights
    after its attention get no gradient; two steps run) and is refused by name without it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    PreparedDenoiser = pytest.importorskip("diffsynth.training.distributed").PreparedDenoiser  # the trainer's

    pipe, task, batch = vap
    model = task.models["vap"]
    noisy, sigma = noise((2, 16, 2, 4, 4), 4), torch.tensor([0.5, 0.3])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    model.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match="needs --find_unused_parameters"):
            task.velocity(DistributedDataParallel(model), batch, noisy, sigma)
        with pytest.raises(ConfigError, match="needs --find_unused_parameters"):  # as the trainer passes it
            task.velocity(PreparedDenoiser(DistributedDataParallel(model), model), batch, noisy, sigma)
        wrapped = PreparedDenoiser(DistributedDataParallel(model, find_unused_parameters=True), model)
        for _ in range(2):
            task.velocity(wrapped, batch, noisy, sigma).square().mean().backward()
        assert model.patch_embedding.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()
        model.requires_grad_(False).zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def vap_repo(tiny_repo_factory, tmp_path_factory) -> Path:
    """The tiny I2V repo with its DiT replaced by an official `transformer/` folder (DiT and expert in one file)."""
    root = tmp_path_factory.mktemp("vap-expert-training") / "repo"
    shutil.copytree(tiny_repo_factory("i2v"), root)
    (root / "diffusion_pytorch_model.safetensors").unlink()
    (root / "config.json").unlink()
    _, _, state, config = VP.official_transformer(seed=3)
    (root / "transformer").mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(root / "transformer/diffusion_pytorch_model.safetensors")
    )
    (root / "transformer/config.json").write_text(json.dumps(config))
    return root


def train(vap_repo, tmp_path, monkeypatch, **options):
    """2 steps of DiffSynth-Studio's recipe (`--data_file_keys video,vap_video`) with `options`; the task built."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training import trainer

    data = tmp_path / "data"
    data.mkdir()
    dataset = TV.write_dataset(data)
    built = []
    build_task = trainer.build_task

    def keep(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainer, "build_task", keep)
    config = testing.tiny_config(
        vap_repo, "wan", dataset, tmp_path / "out", num_frames=5, max_pixels=32 * 32, bucket_step=32, batch_size=1,
        data_file_keys=["video", "vap_video"], max_steps=2, **options,
    )  # fmt: skip
    assert trainer.train(config).step == 2
    (task,) = built
    return task


def trained_velocity(task, pipe, seed: int):
    """The trained model's velocity on a new row and the loaded pipeline's for the same row, noise and sigma."""
    row = {"prompt": PROMPTS[0], "video": as_video(frames(6)), "vap_video": as_video(frames(7)), "vap_prompt": CAPTION}
    noisy = noise((1, 16, 2, 4, 4), seed)
    with torch.no_grad():
        ours = task.velocity(task.models["vap"], task.collate(task.encode([row])), noisy, torch.tensor([0.6]))
    return ours, pipeline_velocity(pipe, PROMPTS[0], noisy, 0.6, **TV.pipeline_arguments(row))


@pytest.mark.integration
def test_trainer_trains_the_expert_and_the_pipeline_loads_it(vap_repo, tmp_path, monkeypatch):
    """`--trainable_models vap` for 2 steps (gradient checkpointing on): the DiT is untouched and the expert learns;
    the saved file holds exactly the released expert keys, and the pipeline given it after the `transformer/` files
    loads it as its expert, strictly, and reproduces the trained velocity."""
    task = train(vap_repo, tmp_path, monkeypatch, trainable_models=["vap"], use_gradient_checkpointing=True)
    dit, expert, state, _ = VP.official_transformer(seed=3)
    assert all(torch.equal(task.pipe.dit.state_dict()[k], v) for k, v in dit.state_dict().items())
    trained = task.pipe.vap.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in expert.state_dict().items())
    saved_file = tmp_path / "out" / "step-000002" / "vap" / "diffusion_pytorch_model.safetensors"
    saved = load_file(str(saved_file))
    assert set(saved) == {k for k in state if MOT_SUFFIX in k}
    assert json.loads((saved_file.parent / "config.json").read_text())["block_idx_with_mot_ref"] == [0, 2]

    configs, tokenizer = folder_model_configs(vap_repo)
    pipe = WanVideoPipeline.from_pretrained(
        model_configs=[*configs, ModelConfig(path=str(saved_file))], tokenizer_config=tokenizer,
        torch_dtype="float32", device="cpu",
    )  # fmt: skip
    assert pipe.vap.config.mot_layers == (0, 2)
    loaded = pipe.vap.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    ours, theirs = trained_velocity(task, pipe, seed=4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    original = WanVideoPipeline.from_pretrained(str(vap_repo), torch_dtype="float32", device="cpu")
    _, before = trained_velocity(task, original, seed=4)
    assert (theirs - before).abs().max() > 1e-6


@pytest.mark.integration
def test_trainer_trains_a_lora_on_the_expert(vap_repo, tmp_path, monkeypatch):
    """`--lora_base_model vap` (the expert's default targets q, k, v, o, ffn.0, ffn.2) for 2 steps: only LoRA weights
    learn, the expert's and the DiT's own weights are untouched, and the saved LoRA, loaded into the pipeline's `vap`
    slot, reproduces the trained velocity."""
    task = train(vap_repo, tmp_path, monkeypatch, lora_base_model="vap")
    dit, expert, _, _ = VP.official_transformer(seed=3)
    assert all(torch.equal(task.pipe.dit.state_dict()[k], v) for k, v in dit.state_dict().items())
    trained = task.models["vap"].state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if ".lora_" not in k}
    assert base.keys() == expert.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in expert.state_dict().items())
    lora_file = tmp_path / "out" / "step-000002.safetensors"
    saved = load_file(str(lora_file))
    assert saved and all("lora" in k for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k or "lora_up" in k)
    pipe = WanVideoPipeline.from_pretrained(str(vap_repo), torch_dtype="float32", device="cpu")
    _, before = trained_velocity(task, pipe, seed=5)
    pipe.load_lora(str(lora_file), slot="vap")
    ours, after = trained_velocity(task, pipe, seed=5)
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-6
