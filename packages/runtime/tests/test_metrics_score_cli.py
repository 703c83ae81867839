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


@pytest.mark.parametrize(
    ("name", "inputs", "message"),
    [
        ("lpips", ["a.png", "missing.png"], "missing.png does not exist; "),
        ("fid", ["folder", "gone"], "gone does not exist; "),
        ("aesthetic", ["a.png", "folder"], "folder is a folder; --metric aesthetic scores image files"),
    ],
)
def test_score_checks_its_inputs_before_loading_the_model(tmp_path, monkeypatch, capsys, name, inputs, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the metric's model was loaded (maybe downloaded) before its inputs were checked")

    for class_name in METRIC_CLASSES:
        monkeypatch.setattr(getattr(metrics, class_name), "from_pretrained", no_model)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    assert main(["score", "--metric", name, *(str(tmp_path / path) for path in inputs)]) == 2
    assert message in capsys.readouterr().err
