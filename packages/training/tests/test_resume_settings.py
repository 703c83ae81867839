"""`--resume` with the toy family: a run whose frozen weights the VRAM manager holds (--offload_models,
--fp8_models) resumes exactly; another --optimizer is refused by name; a changed learning rate is said to be kept
from the checkpoint, and is."""

import json
import logging

import pytest
import torch
from diffsynth_training_toy import toy_config
from safetensors.torch import load_file

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.testing import resume_after_crash
from diffsynth.training.trainer import train


def trained(output, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def rates(output) -> list[float]:
    return [json.loads(line)["lr"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "settings",
    [{"offload_models": ["denoiser"], "ema_decay": 0.9}, {"fp8_models": ["denoiser"]}],
    ids=["offload", "fp8"],
)
def test_a_run_with_vram_managed_weights_resumes_exactly(tmp_path, dataset, settings):
    """The frozen blocks are meta placeholders there: the resumed LoRA must stay the optimizer's parameters."""
    settings = dict(save_steps=2, max_steps=3, **settings)
    train(toy_config(tmp_path, dataset, "straight", **settings))
    assert resume_after_crash(toy_config(tmp_path, dataset, "resumed", **settings)).step == 3
    straight, resumed = trained(tmp_path / "straight", 3), trained(tmp_path / "resumed", 3)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resuming_with_another_optimizer_is_refused_by_name(tmp_path, dataset):
    train(toy_config(tmp_path, dataset, save_steps=2, max_steps=2))
    with pytest.raises(ConfigError, match="trained with --optimizer adamw, resumed with --optimizer adafactor"):
        train(toy_config(tmp_path, dataset, max_steps=3, optimizer="adafactor", resume="latest"))


def test_a_changed_learning_rate_is_said_to_be_kept_from_the_checkpoint(tmp_path, dataset, caplog):
    train(toy_config(tmp_path, dataset, save_steps=2, max_steps=2))
    with caplog.at_level(logging.WARNING, logger="diffsynth.training.trainer"):
        train(toy_config(tmp_path, dataset, max_steps=3, learning_rate=1e-3, weight_decay=0.5, resume="latest"))
    assert "--learning_rate, --weight_decay changed but NOT applied" in caplog.text
    assert "kept from the checkpoint (--learning_rate 0.01, --weight_decay 0.01)" in caplog.text
    assert "resuming with changed settings" not in caplog.text
    assert rates(tmp_path / "out") == [0.01, 0.01, 0.01]
