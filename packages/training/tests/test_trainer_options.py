"""The trainer's `--optimizer`, `--ema_decay` and `--lora_checkpoint` with the toy family: the chosen optimizer
trains and resumes exactly; the saved average is the EMA recurrence of the trained weights step by step, and
resumes exactly; a LoRA started from a file computes what the trained LoRA computed."""

import pytest
import torch
from diffsynth_training_toy import build, toy_config
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.lora import load_lora
from diffsynth.training.data import batch_plan
from diffsynth.training.testing import first_losses, resume_after_crash
from diffsynth.training.trainer import TrainState, save, setup, train, train_step


def toy_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.8]), [torch.randn(3, 8, generator=g)] * 2


def straight_and_resumed(tmp_path, dataset, **settings):
    """5 steps straight, and 2 steps + a crash + --resume latest: the two runs' output folders."""
    settings = dict(save_steps=2, max_steps=5, **settings)
    train(toy_config(tmp_path, dataset, "straight", **settings))
    resume_after_crash(toy_config(tmp_path, dataset, "resumed", **settings))
    return tmp_path / "straight", tmp_path / "resumed"


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor", "prodigy"])
def test_each_optimizer_trains_and_resumes_exactly(tmp_path, dataset, optimizer):
    pytest.importorskip({"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(optimizer, "torch"))
    options = {"optimizer": optimizer, "learning_rate": 1.0 if optimizer == "prodigy" else 1e-2}
    run = setup(toy_config(tmp_path, dataset, "probe", **options))
    assert type(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer).__name__ == {
        "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "prodigy": "Prodigy"
    }[optimizer]  # fmt: skip
    straight, resumed = straight_and_resumed(tmp_path, dataset, **options)
    a = load_file(str(straight / "checkpoints" / "step-000005" / "trainable.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-000005" / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_optimizer_options_reach_the_optimizer_and_bad_ones_are_named(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset, optimizer_options={"betas": "0.8:0.95", "eps": 1e-6}))
    group = run.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    with pytest.raises(ConfigError, match=r"--optimizer_options momentum=0.9: AdamW says"):
        setup(toy_config(tmp_path, dataset, "bad", optimizer_options={"momentum": 0.9}))


def test_the_saved_average_is_the_ema_recurrence_and_resumes_exactly(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset, ema_decay=0.8))
    expected = {k: p.detach().clone() for k, p in run.trainable.items()}
    state = TrainState()
    for n, batch in enumerate(batch_plan(run.dataset.batch_keys, batch_size=2)[:3]):
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
        decay = min(0.8, (1 + n) / (10 + n))  # the warm-up
        expected = {k: decay * v + (1 - decay) * run.trainable[k].detach() for k, v in expected.items()}
    save(run, state)
    x, sigma, text = toy_inputs()
    averaged, live = build("denoiser"), build("denoiser")
    load_lora(averaged, run.output / "step-000003-ema.safetensors")
    load_lora(live, run.output / "step-000003.safetensors")
    module = run.accelerator.unwrap_model(run.model)
    with torch.no_grad():
        for k, v in expected.items():  # the recurrence's weights in the model give the -ema file's output
            module.get_parameter(k).copy_(v)
        torch.testing.assert_close(averaged(x, sigma, text), module(x, sigma, text), rtol=1e-5, atol=1e-6)
        assert (averaged(x, sigma, text) - live(x, sigma, text)).abs().max() > 1e-4

    straight, resumed = straight_and_resumed(tmp_path / "r", dataset, ema_decay=0.8)
    a = torch.load(straight / "checkpoints" / "step-000005" / "ema.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step-000005" / "ema.pt", weights_only=True)
    assert a["updates"] == b["updates"] == 5 and all(torch.equal(a["shadow"][k], b["shadow"][k]) for k in a["shadow"])


def test_ema_of_full_weights_is_saved_beside_them(tmp_path, dataset):
    state = train(toy_config(tmp_path, dataset, trainable_models=["denoiser"], ema_decay=0.9, max_steps=2))
    out = tmp_path / "out"
    weights = load_file(str(out / "step-000002" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    averaged = load_file(str(out / "step-000002-ema" / "denoiser" / "diffusion_pytorch_model.safetensors"))
    assert state.step == 2 and weights.keys() == averaged.keys()
    assert any(not torch.equal(weights[k], averaged[k]) for k in weights)


def test_a_lora_started_from_a_file_computes_what_the_trained_lora_computed(tmp_path, dataset):
    run = setup(toy_config(tmp_path, dataset, lora_alpha=8.0, lora_formats=["diffsynth", "kohya"]))
    state = TrainState()
    for batch in batch_plan(run.dataset.batch_keys, batch_size=2)[:2]:
        state = train_step(run, state, [[run.dataset[i] for i in batch]])
    save(run, state)
    x, sigma, text = toy_inputs()
    with torch.no_grad():
        trained = run.model(x, sigma, text)
        assert (trained - build("denoiser")(x, sigma, text)).abs().max() > 1e-4
    # our file and kohya's; the new run's alpha differs from the file's (the up matrices are rescaled)
    for name, alpha in (("step-000002.safetensors", 2.0), ("step-000002.kohya.safetensors", None)):
        again = setup(toy_config(tmp_path, dataset, "again", lora_checkpoint=str(run.output / name), lora_alpha=alpha))
        with torch.no_grad():
            torch.testing.assert_close(again.model(x, sigma, text), trained, rtol=1e-5, atol=1e-6)
        state = train_step(
            again, TrainState(), [[again.dataset[i] for i in batch_plan(again.dataset.batch_keys, batch_size=2)[0]]]
        )
        assert state.step == 1  # and it trains on from there
    source = str(run.output / "step-000002.safetensors")
    with pytest.raises(ConfigError, match=r"--lora_checkpoint .* has rank \[4\]; train with --lora_rank 4"):
        setup(toy_config(tmp_path, dataset, "r8", lora_rank=8, lora_checkpoint=source))
    with pytest.raises(ConfigError, match="--lora_checkpoint .*not trained by this run .*--lora_target_modules"):
        setup(toy_config(tmp_path, dataset, "few", lora_target_modules=["proj_in"], lora_checkpoint=source))
    with pytest.raises(ConfigError, match="--lora_checkpoint starts a LoRA from a file; with --trainable_models"):
        toy_config(tmp_path, dataset, trainable_models=["denoiser"], lora_checkpoint=source).check()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_base_streams_its_blocks_and_trains_exactly_as_resident(tmp_path, dataset, checkpointing):
    """`--offload_models denoiser`: the frozen blocks are held by the VRAM manager and streamed in the forward and
    the backward pass (with or without gradient checkpointing); the LoRA trains exactly as with a resident base."""
    from diffsynth.runtime.vram import vram_handle

    settings = dict(use_gradient_checkpointing=checkpointing)
    plain, resident = first_losses(toy_config(tmp_path, dataset, "plain", **settings), steps=3)
    streamed, run = first_losses(
        toy_config(tmp_path, dataset, "offload", offload_models=["denoiser"], **settings), steps=3
    )
    handle = vram_handle(run.task.models["denoiser"])
    assert handle is not None and handle.plan.streamed and not handle.plan.resident
    assert all(not t.param.requires_grad for u in handle.units for t in u.targets)  # the LoRA stays out of it
    assert streamed == plain
    for name, p in run.trainable.items():
        assert torch.equal(p, resident.trainable[name]), name
    with pytest.raises(ConfigError, match="--offload_models nope: no such model"):
        setup(toy_config(tmp_path, dataset, "x", offload_models=["nope"]))
    with pytest.raises(ConfigError, match="--offload_models denoiser: a model trained in full or stored in fp8"):
        toy_config(tmp_path, dataset, offload_models=["denoiser"], fp8_models=["denoiser"]).check()


def test_extra_inputs_input_image_points_first_frame_tasks_to_their_option(caplog):
    """Studio's `--extra_inputs input_image` switches image-to-video on; tasks with `first_frame` need the option."""
    from types import SimpleNamespace

    from diffsynth.training.trainer import note_first_frame_option

    class FirstFrameTask:
        family = "video"

        def __init__(self, *, first_frame=False):
            pass

    class PlainTask:
        def __init__(self, *, sigma_shift=3.0):
            pass

    def warned(cls, extra_inputs, task_options):
        caplog.clear()
        with caplog.at_level("WARNING", logger="diffsynth.training.trainer"):
            note_first_frame_option(cls, SimpleNamespace(extra_inputs=extra_inputs, task_options=task_options))
        return "--task_options first_frame=true" in caplog.text

    assert warned(FirstFrameTask, ["input_image"], {})
    assert not warned(FirstFrameTask, ["input_image"], {"first_frame": True})
    assert not warned(FirstFrameTask, [], {})
    assert not warned(PlainTask, ["input_image"], {})
