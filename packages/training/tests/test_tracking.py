"""`--report_to`: the logged steps and validation pictures reach accelerate's trackers (TensorBoard's event files
here); tracker names and packages are checked before any model loads. On the toy family."""

import json
from pathlib import Path

import pytest
from diffsynth_training_toy import TASK

from diffsynth.runtime.errors import ConfigError
from diffsynth.training import tracking
from diffsynth.training.config import TrainConfig
from diffsynth.training.trainer import train


def toy_config(tmp_path, dataset, **overrides) -> TrainConfig:
    values = dict(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), max_pixels=64 * 128,
        bucket_step=16, batch_size=2, mixed_precision="no", dtype="float32", lora_rank=4, learning_rate=1e-2,
        max_steps=3, num_epochs=10, log_every=1,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_tensorboard_gets_every_logged_step_and_the_validation_pictures(tmp_path, dataset):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy_config(
        tmp_path, dataset, report_to=["tensorboard"], tracker_project_name="toy", validation_prompts=["a red circle"]
    )
    train(cfg)
    logged = [json.loads(line) for line in (Path(cfg.output_path) / "metrics.jsonl").read_text().splitlines()]
    folder = Path(cfg.output_path) / "logs" / "toy"
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]  # the same steps and values
    assert [e.step for e in events.Scalars("lr")] == [r["step"] for r in logged]
    pictures = events.Images("validation/0")
    assert [p.step for p in pictures] == [3] and (pictures[0].width, pictures[0].height) == (32, 32)
    recorded = b""  # the run's settings, as its hyperparameters (accelerate writes them in a run of their own)
    for run in {p.parent for p in folder.rglob("events.out.tfevents.*")}:
        hparams = EventAccumulator(str(run))
        hparams.Reload()
        try:
            recorded += b"".join(hparams.PluginTagToContent("hparams").values())
        except KeyError:  # the run of the scalars and pictures
            continue
    assert b"lora_rank" in recorded and b"tracker_project_name" in recorded


def test_trackers_are_checked_before_models_load(tmp_path, dataset, monkeypatch):
    from diffsynth.training import trainer

    monkeypatch.setattr(trainer, "task_class", lambda cfg: pytest.fail("the task was looked up"))
    with pytest.raises(ConfigError, match="--report_to 'tensorbord' is not a tracker; accepted: tensorboard, wandb"):
        trainer.setup(toy_config(tmp_path, dataset, report_to=["tensorbord"]))
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match="--report_to wandb needs the wandb package: pip install wandb"):
        trainer.setup(toy_config(tmp_path, dataset, report_to=["wandb"]))


def test_hyperparameters_are_plain_values():
    cfg = TrainConfig(model="m", dataset_base_path="d", lora_target_modules=["to_q", "to_k"])
    values = tracking.hyperparameters(vars(cfg))
    assert values["lora_rank"] == 32 and values["lora_target_modules"] == "['to_q', 'to_k']"
    assert "height" not in values  # unset settings are left out
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
