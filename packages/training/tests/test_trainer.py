"""The trainer with the toy family: LoRA and full fine-tuning, exact resume, the cached two-stage mode,
checkpoint pruning and atomic saves."""

import json
import math

import numpy as np
import pytest
import torch
from diffsynth_training_toy import ToyTask, build, toy_config
from safetensors.torch import load_file

import diffsynth.training.checkpoint as checkpoint_module
import diffsynth.training.trainer as trainer
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.lora import load_lora, read_lora
from diffsynth.training.checkpoint import list_checkpoints
from diffsynth.training.data import batch_plan
from diffsynth.training.task import TrainingTask
from diffsynth.training.testing import first_losses, resume_after_crash
from diffsynth.training.trainer import TrainState, save, setup, train, train_step


def trained(output_path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(output_path / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def toy_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = [torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)]
    return x, torch.tensor([0.3, 0.8]), text


def test_lora_steps_log_a_finite_loss_and_export_lora_files_the_runtime_loads(tmp_path, dataset):
    config = toy_config(tmp_path, dataset, lora_formats=["diffsynth", "kohya", "peft"], lora_alpha=8.0)
    run = setup(config)
    assert isinstance(run.task, TrainingTask)
    state = TrainState()
    plan = batch_plan(run.dataset.batch_keys, batch_size=2)
    for batch in plan[:2]:
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        assert math.isfinite(state.loss)
    save(run, state)

    x, sigma, text = toy_inputs()
    with torch.no_grad():
        expected = run.model(x, sigma, text)
        base = build("denoiser")(x, sigma, text)
    assert (expected - base).abs().max() > 1e-4  # the LoRA learned something
    for suffix in ("", ".kohya", ".peft"):
        path = run.output / f"step-000002{suffix}.safetensors"
        assert len(read_lora(path)) == 3  # proj_in, blocks.0.0, proj_out
        fresh = build("denoiser")
        load_lora(fresh, path)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x, sigma, text), expected, atol=1e-5, rtol=1e-5)


def test_saved_lora_files_say_how_they_were_trained(tmp_path, dataset):
    from safetensors import safe_open

    config = toy_config(tmp_path, dataset, lora_formats=["diffsynth", "kohya"], lora_alpha=8.0)
    run = setup(config)
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2)[:2]:
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
    save(run, state)
    for suffix in ("", ".kohya"):
        with safe_open(str(run.output / f"step-000002{suffix}.safetensors"), framework="pt") as f:
            header = f.metadata()
        assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8.0"
        assert header["ss_network_module"] == "networks.lora" and header["ss_steps"] == "2"
        assert header["ss_base_model_version"] == "toy" and header["ss_num_train_images"] == "6"
        assert header["diffsynth_lora_type"] == "lora"


def test_train_writes_metrics_config_and_a_final_checkpoint(tmp_path, dataset):
    state = train(toy_config(tmp_path, dataset, max_steps=4))
    out = tmp_path / "out"
    assert (state.step, state.epoch, state.batches_done) == (4, 1, 1)  # 3 batches per epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (out / "config.yaml").is_file()
    # saved at the epoch end (step 3) and at the end (step 4)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000003", "step-000004"]
    assert (out / "step-000003.safetensors").is_file() and (out / "step-000004.safetensors").is_file()


@pytest.mark.parametrize(("batch_size", "accumulation"), [(2, 1), (1, 2)])
def test_resume_continues_exactly_where_it_stopped(tmp_path, dataset, batch_size, accumulation):
    """4 steps straight == 2 steps, a crash, then --resume latest for the rest (across an epoch end, with a
    cosine schedule and warm-up, so the LR schedule, optimizer, noise and data position all matter)."""
    settings = dict(
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        save_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        max_steps=5,
    )
    train(toy_config(tmp_path, dataset, "straight", **settings))
    state = resume_after_crash(toy_config(tmp_path, dataset, "resumed", **settings))

    assert state.step == 5
    straight, resumed = trained(tmp_path / "straight", 5), trained(tmp_path / "resumed", 5)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_resume_logs_each_step_once_and_says_what_changed_under_it(tmp_path, dataset, caplog):
    """A crash after step 3 with a checkpoint at step 2: the resumed run trains and logs step 3 again, and
    metrics.jsonl keeps one record per step. Resumed later with more steps under a cosine schedule, or on a dataset
    with a row more, the run says it will differ from an uninterrupted one."""
    import csv
    import logging
    from dataclasses import replace

    cfg = toy_config(tmp_path, dataset, save_steps=2, lr_scheduler="cosine", max_steps=4)
    resume_after_crash(cfg, crash_after=3)
    records = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [1, 2, 3, 4]
    with caplog.at_level(logging.WARNING, logger="diffsynth.training.trainer"):
        train(replace(cfg, max_steps=6, resume="latest"))
    assert "resuming with 6 steps in all where the checkpoint's run had 4" in caplog.text
    assert "another dataset" not in caplog.text
    caplog.clear()
    with (dataset / "metadata.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["img0.png", "one row more"])
    with caplog.at_level(logging.WARNING, logger="diffsynth.training.trainer"):
        train(replace(cfg, max_steps=7, lr_scheduler="constant", resume="latest"))
    assert "resuming on another dataset" in caplog.text and "steps in all" not in caplog.text


def test_resume_with_another_lora_rank_is_refused(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, max_steps=1))
    with pytest.raises(ConfigError, match="--resume .*has shape .*another --lora_rank"):
        train(toy_config(tmp_path, dataset, max_steps=2, lora_rank=8, resume="latest"))


def test_cached_two_stage_equals_direct_and_skips_the_encoders(tmp_path, dataset):
    direct = toy_config(tmp_path, dataset, "direct", max_steps=3, dataset_num_workers=1)
    train(direct)
    cache = str(tmp_path / "cache")
    ToyTask.builds.clear()
    trainer.run_stage(toy_config(tmp_path, dataset, "cached", cache_dir=cache, stage="encode", max_steps=3))
    trainer.run_stage(toy_config(tmp_path, dataset, "cached", cache_dir=cache, max_steps=3))
    assert ToyTask.builds == [{"encoders": True, "denoiser": False}, {"encoders": False, "denoiser": True}]
    a, b = trained(tmp_path / "direct", 3), trained(tmp_path / "cached", 3)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_a_cache_made_with_other_settings_is_refused(tmp_path, dataset):
    cache = str(tmp_path / "cache")
    trainer.run_stage(toy_config(tmp_path, dataset, cache_dir=cache, stage="encode"))
    with pytest.raises(ConfigError, match="encoded with --max_pixels 8192, this run has --max_pixels 4096"):
        train(toy_config(tmp_path, dataset, cache_dir=cache, max_pixels=4096))


def test_task_options_reach_the_task_and_unknown_ones_are_named(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset, task_options={"sigma_shift": 7.0, "text_scale": 2.0}))
    default = setup(toy_config(tmp_path, dataset, "default"))
    assert run.task.text_scale == 2.0
    for task in (run.task, default.task):
        task.scheduler.set_training_grid()
    grid, shifted = default.task.scheduler.train_sigmas, run.task.scheduler.train_sigmas
    assert (shifted[1:] > grid[1:]).all()  # a larger shift moves every sigma below 1 up
    with pytest.raises(
        ConfigError, match=r"--task_options sigma_shfit: the toy training task takes sigma_shift, text_scale"
    ):
        setup(toy_config(tmp_path, dataset, task_options={"sigma_shfit": 7.0}))


def test_a_cache_refuses_other_encoding_task_options_but_not_loss_options(tmp_path, dataset):
    cache = str(tmp_path / "cache")
    trainer.run_stage(toy_config(tmp_path, dataset, cache_dir=cache, stage="encode", task_options={"text_scale": 2.0}))
    with pytest.raises(
        ConfigError, match=r"encoded with --task_options \{'text_scale': 2.0\}, this run has --task_options \{\}"
    ):
        setup(toy_config(tmp_path, dataset, cache_dir=cache))
    run = setup(toy_config(tmp_path, dataset, cache_dir=cache, task_options={"text_scale": 2.0, "sigma_shift": 5.0}))
    assert run.cached and run.task.scheduler is not None


def test_full_finetune_saves_every_weight_under_the_model_names(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, trainable_models=["denoiser"], learning_rate=1e-3, max_steps=2))
    saved = load_file(str(tmp_path / "out" / "step-000002" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    fresh = build("denoiser")
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(saved, strict=True)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(not torch.equal(saved[k], original[k]) for k in original)  # every tensor was trained


def test_gradient_checkpointing_changes_nothing(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, "plain", max_steps=2))
    train(toy_config(tmp_path, dataset, "checkpointed", max_steps=2, use_gradient_checkpointing=True))
    a, b = trained(tmp_path / "plain", 2), trained(tmp_path / "checkpointed", 2)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_keep_last_prunes_old_checkpoints(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, save_steps=1, keep_last=2, max_steps=4))
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000003", "step-000004"]
    assert len(list(out.glob("step-*.safetensors"))) == 4  # LoRA exports are all kept


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, dataset, caplog):
    train(toy_config(tmp_path, dataset, save_steps=1, max_steps=4))
    checkpoints = tmp_path / "out" / "checkpoints"
    older = checkpoints / "step-000002"
    train(toy_config(tmp_path, dataset, save_steps=1, max_steps=3, keep_last=1, resume=str(older)))
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000003"]  # this run's, not the old branch's
    (aside,) = checkpoints.glob("abandoned-from-step-000002-*")
    assert [p.name for p in list_checkpoints(aside)] == ["step-000003", "step-000004"]  # kept, not deleted
    assert "step-000003, step-000004" in caplog.text and aside.name in caplog.text
    assert checkpoint_module.find_checkpoint("latest", tmp_path / "out").name == "step-000003"


def test_an_interrupted_save_leaves_no_partial_checkpoint(tmp_path, dataset, monkeypatch):
    config = toy_config(tmp_path, dataset, save_steps=1, max_steps=2)
    real_save = torch.save

    def fail_on_second_state(obj, path, *args, **kwargs):
        if str(path).endswith("state.pt") and ".step-000002.tmp" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", fail_on_second_state)
    with pytest.raises(OSError, match="disk full"):
        train(config)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    checkpoints = tmp_path / "out" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000001"]
    state = train(toy_config(tmp_path, dataset, save_steps=1, max_steps=2, resume="latest"))
    assert state.step == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]  # the .tmp is gone


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_target_modules": ["nope"]}, "--lora_target_modules nope"),
        ({"trainable_models": ["vae"]}, "--trainable_models vae: only the denoiser 'denoiser' is trained"),
        ({"height": 60, "width": 64}, "--height 60 must be a multiple of 8"),
    ],
)
def test_setup_errors_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup(toy_config(tmp_path, dataset, **overrides))


def test_fp8_base_stores_the_frozen_weights_in_fp8_and_trains_the_lora(tmp_path, dataset):
    from diffsynth.runtime.vram import vram_handle

    plain, _ = first_losses(toy_config(tmp_path, dataset, "plain"))
    fp8, run = first_losses(toy_config(tmp_path, dataset, "fp8", fp8_models=["denoiser"]))
    handle = vram_handle(run.task.models["denoiser"])
    assert handle is not None and handle.config.preparing_dtype == torch.float8_e4m3fn
    frozen = [t for u in handle.units for t in u.targets]
    assert frozen and all(not t.param.requires_grad for t in frozen)  # the LoRA's own weights stay out of it
    assert all(math.isfinite(x) for x in fp8)
    assert fp8[0] != plain[0] and abs(fp8[0] - plain[0]) < 0.05 * plain[0]  # fp8-rounded base: close, not equal
    lora_b = [p for n, p in run.trainable.items() if "lora_B" in n]
    assert max(p.abs().max().item() for p in lora_b) > 0  # B starts at zero: the LoRA trained


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fp8_models": ["nope"]}, "--fp8_models nope: no such model"),
        ({"fp8_models": ["denoiser"], "trainable_models": ["denoiser"]}, "--fp8_models denoiser: a model trained"),
    ],
)
def test_fp8_models_errors_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup(toy_config(tmp_path, dataset, **overrides))


def test_activation_offload_saves_to_cpu_and_changes_nothing(tmp_path, dataset, monkeypatch):
    plain, _ = first_losses(toy_config(tmp_path, dataset, "plain", use_gradient_checkpointing=True))
    entered = []
    original = torch.autograd.graph.save_on_cpu

    def counting(*args, **kwargs):
        entered.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    offload = toy_config(
        tmp_path, dataset, "offload", use_gradient_checkpointing=True, use_gradient_checkpointing_offload=True
    )
    offloaded, _ = first_losses(offload)
    assert len(entered) == 2 and entered[0] == {"pin_memory": False}  # once per micro-batch, no pinning on CPU
    assert offloaded == plain


def test_preset_lora_is_fused_into_the_base_and_the_new_lora_trains_on_top(tmp_path, dataset):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    preset = tmp_path / "style.safetensors"
    save_file({"blocks.0.0.lora_A.weight": down, "blocks.0.0.lora_B.weight": up}, str(preset))
    run = setup(toy_config(tmp_path, dataset, preset_lora_path=str(preset), preset_lora_scale=0.5))
    layer = run.task.models["denoiser"].blocks[0][0]
    expected = build("denoiser").blocks[0][0].weight + 0.5 * up @ down
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    assert not layer.base_layer.weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    assert all("lora_" in name for name in run.trainable)  # the preset is part of the base, not of the new LoRA
    with pytest.raises(ConfigError, match="--preset_lora_path fuses"):
        setup(toy_config(tmp_path, dataset, preset_lora_path=str(preset), trainable_models=["denoiser"]))


@pytest.mark.parametrize(
    ("kind", "fsdp_version", "message"), [("MEGATRON_LM", None, "MEGATRON_LM"), ("FSDP", 1, "FSDP version 1")]
)
def test_accelerate_modes_the_trainer_cannot_save_are_refused_by_name(
    tmp_path, dataset, monkeypatch, kind, fsdp_version, message
):
    """Megatron-LM and FSDP1 would hand the save path state it does not gather: refused up front, not written
    wrong (FSDP2 runs: test_fsdp.py; DeepSpeed: test_deepspeed.py)."""
    import types

    import accelerate
    from accelerate.utils import DistributedType

    class ConfiguredAccelerator(accelerate.Accelerator):
        @property
        def distributed_type(self):
            return DistributedType[kind]

    monkeypatch.setattr(accelerate, "Accelerator", ConfiguredAccelerator)
    if fsdp_version is not None:
        plugin = types.SimpleNamespace(fsdp_version=fsdp_version)
        monkeypatch.setattr(accelerate.state.AcceleratorState, "fsdp_plugin", plugin, raising=False)
    with pytest.raises(ConfigError, match=message):
        setup(toy_config(tmp_path, dataset))


def test_validation_prompts_are_sampled_with_the_weights_in_training(tmp_path, dataset):
    from PIL import Image

    prompts = ["a red circle", "a blue square"]
    config = toy_config(tmp_path, dataset, validation_prompts=prompts, validation_steps=2, max_steps=4)
    train(config)
    folder = tmp_path / "out" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-00000{s}-{k}.png" for s in (2, 4) for k in (0, 1)]
    early, late = (np.asarray(Image.open(folder / f"step-00000{s}-0.png")) for s in (2, 4))
    assert early.shape == (32, 32, 3) and not np.array_equal(early, late)  # the LoRA moved between the two

    # the same seed and weights draw the same picture: the samples compare runs, not noise
    run = setup(toy_config(tmp_path, dataset, "again", validation_prompts=prompts))
    first = trainer.validate(run, TrainState(step=7))
    second = trainer.validate(run, TrainState(step=8))
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(second[0])))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation_prompts": ["a cat"], "cache_dir": "cache"}, "--validation_prompts needs the text encoders"),
        ({"validation_steps": 0}, "--validation_steps"),
    ],
)
def test_validation_errors_name_the_flag(tmp_path, dataset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup(toy_config(tmp_path, dataset, **overrides))


def test_validation_needs_a_task_that_can_sample(tmp_path, dataset, monkeypatch):
    monkeypatch.delattr(ToyTask, "sample")
    with pytest.raises(ConfigError, match="the toy training task cannot sample"):
        setup(toy_config(tmp_path, dataset, validation_prompts=["a cat"]))
