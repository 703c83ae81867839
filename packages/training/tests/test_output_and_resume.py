"""What a run does with its output folder and its checkpoints across runs: a new run is kept from an older run's
folder, a resume from an older checkpoint sets the abandoned branch's files aside, a checkpoint of another number
of processes resumes at the same place of the epoch (or is refused), and the --ema_decay average starts from the
resumed weights. Also: the samples an epoch leaves out are said, the encode stage counts every process's samples,
and an FSDP / DeepSpeed launch that accelerate would run as plain DDP is refused."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffsynth_training_toy import toy_config
from safetensors.torch import load_file

import diffsynth.training.trainer as trainer
from diffsynth.runtime.errors import ConfigError
from diffsynth.training.checkpoint import list_checkpoints
from diffsynth.training.distributed import check_mode
from diffsynth.training.trainer import setup, train


def weights(output: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def test_a_new_run_into_a_folder_with_checkpoints_is_refused(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, max_steps=1))
    with pytest.raises(ConfigError, match=r"--output_path .*out holds checkpoints .*step-000001.*--resume latest"):
        train(toy_config(tmp_path, dataset, max_steps=2, learning_rate=1e-3))
    assert [p.name for p in list_checkpoints(tmp_path / "out" / "checkpoints")] == ["step-000001"]  # untouched


def test_going_back_sets_the_abandoned_steps_exports_and_pictures_aside(tmp_path, dataset):
    settings = dict(save_steps=1, lora_formats=["diffsynth", "kohya"], validation_prompts=["a cat"], validation_steps=1)
    train(toy_config(tmp_path, dataset, max_steps=3, **settings))
    out = tmp_path / "out"
    train(toy_config(tmp_path, dataset, max_steps=2, resume=str(out / "checkpoints" / "step-000001"), **settings))
    assert {p.name for p in out.glob("step-*")} == {
        f"step-00000{s}{suffix}.safetensors" for s in (1, 2) for suffix in ("", ".kohya")
    }
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001-0.png", "step-000002-0.png"]
    (aside,) = (out / "checkpoints").glob("abandoned-from-step-000001-*")
    assert {p.name for p in (aside / "exports").iterdir()} == {
        f"step-00000{s}{suffix}.safetensors" for s in (2, 3) for suffix in ("", ".kohya")
    }
    assert sorted(p.name for p in (aside / "validation").iterdir()) == ["step-000002-0.png", "step-000003-0.png"]


def test_validation_a_crash_skipped_after_a_checkpoint_runs_at_resume(tmp_path, dataset, monkeypatch):
    """A crash inside validate at step 2, after step 2's checkpoint: the resumed run draws step 2's samples and
    validation loss before going on, and ends with the pictures, metrics and weights of a straight run."""
    settings = dict(
        save_steps=1, max_steps=3, seed=0, validation_prompts=["a cat"], validation_steps=1,
        validation_dataset_base_path=str(dataset),
    )  # fmt: skip
    train(toy_config(tmp_path, dataset, "straight", **settings))
    real = trainer.validate

    def crashing(run, state):
        if state.step == 2:
            raise RuntimeError("crash in validate")
        return real(run, state)

    monkeypatch.setattr(trainer, "validate", crashing)
    with pytest.raises(RuntimeError, match="crash in validate"):
        train(toy_config(tmp_path, dataset, "resumed", **settings))
    monkeypatch.setattr(trainer, "validate", real)
    train(toy_config(tmp_path, dataset, "resumed", resume="latest", **settings))

    def outcome(output: Path):
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        pictures = {p.name: p.read_bytes() for p in (output / "validation").iterdir()}
        return [{k: v for k, v in r.items() if k != "time"} for r in records], pictures

    (straight_metrics, straight_pictures), (metrics, pictures) = (
        outcome(tmp_path / "straight"),
        outcome(tmp_path / "resumed"),
    )
    assert sorted(pictures) == [f"step-00000{s}-0.png" for s in (1, 2, 3)]
    assert pictures == straight_pictures
    assert [(r["step"], "val_loss" in r) for r in metrics] == [(s, v) for s in (1, 2, 3) for v in (False, True)]
    assert metrics == straight_metrics
    for name, value in weights(tmp_path / "straight", 3).items():
        assert torch.equal(value, weights(tmp_path / "resumed", 3)[name]), name


def as_written_by_two_processes(checkpoint: Path) -> None:
    """Turn a one-process checkpoint with --gradient_accumulation_steps 2 into the one two DDP processes without
    accumulation write at the same step (the same weights: test_ddp.py), as far as its position goes."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    progress = state["progress"]
    progress.update(processes=2, batches_done=progress["batches_done"] // 2)
    progress.pop("all_batches_done", None)  # reconstructed from the per-process position
    state["config"]["gradient_accumulation_steps"] = 1
    torch.save(state, checkpoint / "state.pt")
    shutil.copy(checkpoint / "rng-0.pt", checkpoint / "rng-1.pt")


def test_a_checkpoint_of_two_processes_resumes_in_one_at_the_same_batch(tmp_path, dataset):
    """Batch size 1, 6 samples: 3 steps an epoch at a global batch of 2. The checkpoint at step 1 says each of its
    2 processes did 1 batch; one process accumulating 2 must go on from batch 2, not 1."""
    settings = dict(batch_size=1, gradient_accumulation_steps=2, save_steps=1, max_steps=3)
    train(toy_config(tmp_path, dataset, "straight", **settings))
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000001", tmp_path / "two" / "step-000001")
    as_written_by_two_processes(tmp_path / "two" / "step-000001")
    resumed = toy_config(tmp_path, dataset, "resumed", resume=str(tmp_path / "two" / "step-000001"), **settings)
    assert train(resumed).step == 3
    straight, again = weights(tmp_path / "straight", 3), weights(tmp_path / "resumed", 3)
    for name in straight:
        assert torch.equal(straight[name], again[name]), name

    with pytest.raises(
        ConfigError, match="written by 2 processes, resumed by 1; the global batch .* was 2 there and is 1"
    ):
        train(replace(resumed, gradient_accumulation_steps=1, output_path=str(tmp_path / "other")))


def test_an_average_switched_on_at_resume_starts_from_the_resumed_weights(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, save_steps=2, max_steps=2))
    train(toy_config(tmp_path, dataset, save_steps=2, max_steps=3, ema_decay=0.9, resume="latest"))
    out = tmp_path / "out"
    resumed, stepped = weights(out, 2), weights(out, 3)
    shadow = torch.load(out / "checkpoints" / "step-000003" / "ema.pt", weights_only=True)["shadow"]
    for name, value in shadow.items():  # one update with the warm-up's decay 1/10
        torch.testing.assert_close(value, 0.1 * resumed[name] + 0.9 * stepped[name])


def test_resuming_into_another_folder_and_export_formats_says_nothing_changed(tmp_path, dataset, caplog):
    train(toy_config(tmp_path, dataset, save_steps=2, max_steps=2))
    moved = toy_config(
        tmp_path, dataset, "moved", max_steps=3, lora_formats=["diffsynth", "peft"], save_dtype="bfloat16"
    )
    with caplog.at_level(logging.WARNING, logger="diffsynth.training.trainer"):
        train(replace(moved, resume=str(tmp_path / "out" / "checkpoints" / "step-000002")))
    assert "changed settings" not in caplog.text
    assert (tmp_path / "moved" / "step-000003.peft.safetensors").is_file()


def test_the_samples_an_epoch_leaves_out_are_said_once(tmp_path, dataset, caplog):
    """6 samples in 3 batches of 2, accumulated 2 a step: one step an epoch, the third batch left out."""
    with caplog.at_level(logging.INFO, logger="diffsynth.training.trainer"):
        setup(toy_config(tmp_path, dataset, gradient_accumulation_steps=2))
    assert caplog.text.count("2 of 6 samples per epoch are left out") == 1
    assert "--gradient_accumulation_steps 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffsynth.training.trainer"):
        setup(toy_config(tmp_path, dataset, "all"))
    assert "left out" not in caplog.text


def test_the_encode_stage_logs_the_samples_of_every_process(tmp_path, monkeypatch, caplog):
    """Each process encodes its share; the count logged is their sum (here the other process's 3 are faked)."""
    monkeypatch.setattr(trainer, "write_cache", lambda *args, **kwargs: 4)
    monkeypatch.setattr(trainer, "write_cache_index", lambda *args: None)
    acc = SimpleNamespace(
        wait_for_everyone=lambda: None,
        is_main_process=True,
        process_index=0,
        num_processes=2,
        device=torch.device("cpu"),
        reduce=lambda tensor, reduction: tensor + 3 if reduction == "sum" else tensor,
    )
    cfg = SimpleNamespace(dataset_num_workers=0)
    with caplog.at_level(logging.INFO, logger="diffsynth.training.trainer"):
        trainer.write_encoded(cfg, acc, None, None, tmp_path / "cache", {}, batch_size=1)
    assert "encoded 7 samples" in caplog.text


@pytest.mark.parametrize(
    ("variable", "wanted"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")]
)
def test_a_sharded_launch_accelerate_runs_as_ddp_is_refused(monkeypatch, variable, wanted):
    monkeypatch.setenv(variable, "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    acc = SimpleNamespace(distributed_type="DistributedType.MULTI_CPU")
    with pytest.raises(ConfigError, match=f"asks for {wanted} \\({variable}\\), but accelerate runs this as MULTI_CPU"):
        check_mode(acc)
    monkeypatch.setenv(variable, "false")
    check_mode(acc)
