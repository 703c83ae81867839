"""A batch size below 1 is refused up front, by `diffsynth score`'s parser and by every metric's `from_pretrained`,
naming it (it used to fail as a bare ValueError deep inside a batching loop)."""

from __future__ import annotations

import pytest

from diffsynth.runtime import metrics
from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import ConfigError

METRIC_CLASSES = [
    "PickScoreMetric", "CLIPMetric", "HPSv2Metric", "AestheticMetric", "FIDMetric", "LPIPSMetric", "ImageRewardMetric",
]  # fmt: skip


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
@pytest.mark.parametrize("name", METRIC_CLASSES)
def test_from_pretrained_refuses_a_batch_size_below_one_before_reading_files(name, batch_size, tmp_path):
    with pytest.raises(ConfigError, match=rf"batch_size={batch_size!r}"):
        getattr(metrics, name).from_pretrained(
            model_config=str(tmp_path / "missing.safetensors"), batch_size=batch_size
        )


@pytest.mark.parametrize("batch_size", ["0", "-1", "two"])
def test_score_command_refuses_a_batch_size_below_one(batch_size, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--metric", "fid", "--model-path", str(tmp_path / "missing.safetensors"), "--batch-size",
              batch_size, str(tmp_path / "a"), str(tmp_path / "b")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--batch-size" in capsys.readouterr().err
