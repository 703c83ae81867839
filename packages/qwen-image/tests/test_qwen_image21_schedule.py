"""Qwen-Image 2.1's schedule from the model's own scheduler config and `sample_sigmas`, against diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffsynth.qwen_image.qwen_image21.schedule import ScheduleSettings
from diffsynth.runtime.errors import ConfigError

# a config of the released shape (exponential resolution shift and a terminal stretch), and diffusers' defaults
SHIFTED = {
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
}
TURBO_LEVELS = [1.0, 0.97, 0.94, 0.9, 0.85, 0.7, 0.4]


def diffusers_sigmas(config: dict, steps: int, image_seq_len: int, raw=None) -> np.ndarray:
    """What diffusers' QwenImage21Pipeline samples: its scheduler from `config`, mu from `calculate_shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    raw = np.linspace(1.0, 1 / steps, steps) if raw is None else raw
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=raw, mu=mu)
    return scheduler.sigmas.numpy()


@pytest.mark.parity
@pytest.mark.parametrize(
    ("config", "raw"),
    [(SHIFTED, None), ({**SHIFTED, "time_shift_type": "linear"}, None), ({}, None), (SHIFTED, TURBO_LEVELS)],
)
@pytest.mark.parametrize("tokens", [64 * 64, 96 * 48])
def test_sigmas_match_diffusers(config, raw, tokens):
    settings = ScheduleSettings.from_configs(config, {"sample_sigmas": raw} if raw else None)
    steps = settings.steps(None if raw else 12)
    ours = settings.sigmas(steps, tokens).numpy()
    np.testing.assert_allclose(ours, diffusers_sigmas(config, steps, tokens, raw), rtol=0, atol=2e-6)


def test_sample_sigmas_fix_the_step_count_and_are_shifted_by_resolution():
    settings = ScheduleSettings.from_configs(SHIFTED, {"sample_sigmas": TURBO_LEVELS})
    assert settings.steps(None) == len(TURBO_LEVELS)
    small, large = settings.sigmas(7, 32 * 32), settings.sigmas(7, 128 * 128)
    assert small[-1] == 0 and large[-1] == 0 and len(small) == 8
    assert (large[1:-2] > small[1:-2]).all()  # more tokens, more time at high noise (both end on the terminal)
    assert abs(float(small[-2]) - 0.02) < 1e-6  # the terminal stretch lands the last level on shift_terminal
    with pytest.raises(ConfigError, match="num_inference_steps=4.*7 noise levels"):
        settings.steps(4)


def test_folder_reading_and_refusals(tmp_path, caplog):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SHIFTED))
    (tmp_path / "model_index.json").write_text(json.dumps({"sample_sigmas": None}))
    assert ScheduleSettings.from_folder(tmp_path) == ScheduleSettings.from_configs(SHIFTED)
    empty = tmp_path / "bare"
    empty.mkdir()
    assert ScheduleSettings.from_folder(empty) == ScheduleSettings()
    assert "no scheduler/scheduler_config.json" in caplog.text
    torch.testing.assert_close(ScheduleSettings().sigmas(4, 4096)[:-1], torch.tensor([1.0, 0.75, 0.5, 0.25]))
    with pytest.raises(ConfigError, match="use_karras_sigmas=True is not supported"):
        ScheduleSettings.from_configs({"use_karras_sigmas": True})
    with pytest.raises(ConfigError, match="time_shift_type='cosine'"):
        ScheduleSettings.from_configs({"time_shift_type": "cosine"})
    with pytest.raises(ConfigError, match="sample_sigmas.*strictly decreasing"):
        ScheduleSettings.from_configs({}, {"sample_sigmas": [1.0, 1.0, 0.5]})
    with pytest.raises(ConfigError, match="shift_terminal=1.5"):
        ScheduleSettings.from_configs({"shift_terminal": 1.5})
