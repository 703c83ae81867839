"""FID's `resize` option (`metrics/fid.py`): "bilinear" (the default) is pytorch-fid's float resize, exactly
torch's bilinear `interpolate`; "bicubic" is DiffSynth-Studio's (torchvision's `Resize(BICUBIC)` on the PIL image,
i.e. PIL's bicubic on the 8-bit values), within 8-bit rounding of torch's antialiased bicubic `interpolate`; the
two give different inputs and FIDs, `diffsynth score --fid-resize` reaches the option, and a bad value is a clear
error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.metrics import FIDMetric
from diffsynth.runtime.metrics.fid import fid_input, frechet_distance_of_features

_spec = importlib.util.spec_from_file_location("fid_helpers_resize", Path(__file__).with_name("test_metrics_fid.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def as_tensor(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def smooth_picture(height: int, width: int, seed: int) -> Image.Image:
    """A photo-like picture (no pixel noise, whose bicubic overshoot 8-bit clipping would cut)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)


@pytest.mark.parametrize("size", [(64, 48), (512, 600)])  # enlarged and shrunk
def test_each_resize_is_torchs_interpolate_with_that_mode(size):
    picture = smooth_picture(*size, seed=size[0])
    x = as_tensor(picture)
    bilinear = fid_input(picture)  # the default
    assert bilinear.shape == (1, 3, 299, 299)
    torch.testing.assert_close(bilinear, F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False),
                               rtol=0, atol=0)  # fmt: skip
    bicubic = fid_input(picture, "bicubic")
    torch.testing.assert_close(bicubic, as_tensor(picture.resize((299, 299), Image.BICUBIC)), rtol=0, atol=0)
    torch_bicubic = F.interpolate(x, size=(299, 299), mode="bicubic", align_corners=False, antialias=True)
    to_torch, to_bilinear = (bicubic - torch_bicubic).abs(), (bicubic - bilinear).abs()
    # the same kernel (PIL's fixed-point arithmetic rounds to 8 bits): within 2.5 levels, half a level on average
    assert to_torch.max() < 2.5 / 255 and to_torch.mean() < 0.5 / 255
    assert to_bilinear.max() > 2 / 255 and to_bilinear.max() > to_torch.max()  # the option changes the input


def cheap_features() -> torch.nn.Module:
    """A stand-in for the Inception (its 94 layers cost seconds per image on a CPU): pooled pixels, projected."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AvgPool2d(13), torch.nn.Flatten(), torch.nn.Linear(3 * 23 * 23, 16)).eval()


def test_the_option_changes_the_fid_as_the_written_out_features_say(tmp_path):
    model = cheap_features()
    reference = helpers.write_images(tmp_path / "reference", 20, [(64, 64), (90, 70), (40, 52), (299, 299)])
    generated = helpers.write_images(tmp_path / "generated", 21, [(80, 60), (48, 48), (100, 100)])
    scores = {}
    for resize in ("bilinear", "bicubic"):
        metric = FIDMetric(model, batch_size=2, resize=resize)
        with torch.no_grad():
            ref = torch.cat([model(fid_input(p, resize)).double() for p in reference])
            gen = torch.cat([model(fid_input(p, resize)).double() for p in generated])
        scores[resize] = metric.compute(str(tmp_path / "reference"), str(tmp_path / "generated"))
        assert scores[resize] == pytest.approx(frechet_distance_of_features(ref, gen), rel=1e-5)
    default = FIDMetric(model, batch_size=2).compute(str(tmp_path / "reference"), str(tmp_path / "generated"))
    assert default == scores["bilinear"]
    assert abs(scores["bicubic"] - scores["bilinear"]) > 1e-3 * scores["bilinear"]


def test_score_command_takes_fid_resize_and_bad_values_are_clear_errors(tmp_path, capsys):
    from diffsynth.runtime.cli import main

    helpers.save_fid_file(helpers.random_inception(7), tmp_path / "model.safetensors")
    helpers.write_images(tmp_path / "a", 22, [(32, 32), (40, 30)])
    helpers.write_images(tmp_path / "b", 23, [(30, 40), (64, 64)])
    model = ["--model-path", str(tmp_path / "model.safetensors"), "--device", "cpu"]
    metric = FIDMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), device="cpu",
                                       resize="bicubic")  # fmt: skip
    expected = metric.compute(str(tmp_path / "a"), str(tmp_path / "b"))
    assert main(["score", "--metric", "fid", "--fid-resize", "bicubic", *model, str(tmp_path / "a"),
                 str(tmp_path / "b")]) == 0  # fmt: skip
    assert float(capsys.readouterr().out) == pytest.approx(expected, abs=1e-6)
    message = r"FID resize='nearest' must be one of \('bilinear', 'bicubic'\)"
    assert main(["score", "--metric", "fid", "--fid-resize", "nearest", *model, str(tmp_path / "a"),
                 str(tmp_path / "b")]) == 2  # fmt: skip
    assert "FID resize='nearest' must be one of ('bilinear', 'bicubic')" in capsys.readouterr().err
    assert main(["score", "--metric", "aesthetic", "--fid-resize", "bicubic", str(tmp_path / "a")]) == 2
    assert "--metric aesthetic takes no --fid-resize" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=message):
        FIDMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), resize="nearest")
    with pytest.raises(ConfigError, match=message):
        fid_input(Image.new("RGB", (8, 8)), "nearest")
