"""`ZImagePipeline.__call__` refuses bad numbers by name before any model runs (a NaN shift, a height that int()
used to cut, a prompt length the tokenizer cannot use), and reads inpaint masks as the inpaint image is read."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.z_image import ZImagePipeline
from diffsynth.z_image.pipeline import _load_mask

PROMPT = "a red circle on a blue background"
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "progress_bar": False, "seed": 0}


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


def refused_before_any_model_runs(pipe, fragment: str, **kwargs) -> None:
    def ran(module, args):
        raise AssertionError(f"{type(module).__name__} ran before the input was checked")

    hooks = [m.register_forward_pre_hook(ran) for m in (pipe.text_encoder, pipe.vae, pipe.dit)]
    try:
        with pytest.raises(ConfigError, match=fragment):
            pipe(PROMPT, **{**FAST, **kwargs})
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "value, fragment",
    [(float("nan"), "sigma_shift=nan must be a finite number"), (float("inf"), "sigma_shift=inf must be a finite")],
)
def test_a_non_finite_sigma_shift_is_refused(pipe, value, fragment):
    """A NaN shift made every sigma NaN: a black image with no word why."""
    refused_before_any_model_runs(pipe, fragment, sigma_shift=value)


def test_a_sigma_shift_that_is_no_number_is_a_config_error(pipe):
    """float("x") raised a bare ValueError."""
    refused_before_any_model_runs(pipe, "sigma_shift='x' must be a finite number", sigma_shift="x")


@pytest.mark.parametrize(
    "name, value",
    [("height", float("nan")), ("width", 33.7), ("height", "64"), ("width", 64.0)],
)
def test_a_size_that_is_not_an_integer_is_refused_not_truncated(pipe, name, value):
    """int() ran before check_size: NaN was a bare ValueError, 33.7 became 33 and "64" was taken."""
    refused_before_any_model_runs(pipe, f"{name}={value!r} is not accepted", **{name: value})


@pytest.mark.parametrize("value", [0, -5, "a", 1.5, True])
def test_a_bad_max_sequence_length_is_refused_by_name(pipe, value):
    """0 and -5 were a bare ValueError about `max_length` from the text encoder, "a" a TypeError."""
    refused_before_any_model_runs(pipe, f"max_sequence_length={value!r} is not accepted", max_sequence_length=value)


def grey_ramp(size: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0, 255, size).round().astype(np.uint8), (size, 1))  # black -> white, left to right


def test_a_16_bit_mask_reads_as_the_same_8_bit_mask(tmp_path):
    """PIL's convert("L") clips 16-bit grey to white, so a soft 16-bit mask repainted almost everything."""
    ramp = grey_ramp()
    eight = _load_mask(Image.fromarray(ramp), (32, 32))
    sixteen = Image.fromarray(ramp.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    torch.testing.assert_close(_load_mask(sixteen, (32, 32)), eight)
    sixteen.save(tmp_path / "mask16.png")
    torch.testing.assert_close(_load_mask(tmp_path / "mask16.png", (32, 32)), eight)
    assert 0.4 < eight.mean().item() < 0.6


def test_a_mask_turns_upright_as_its_exif_says(tmp_path):
    """The inpaint image is turned upright (load_image); its mask must be too, or they would not line up."""
    ramp = grey_ramp()
    stored = Image.fromarray(ramp)
    exif = stored.getexif()
    exif[0x0112] = 6  # the pixels are stored turned; show them rotated 90 degrees clockwise
    stored.save(tmp_path / "turned.png", exif=exif.tobytes())
    upright = _load_mask(Image.fromarray(ramp).transpose(Image.Transpose.ROTATE_270), (32, 32))
    assert torch.equal(_load_mask(tmp_path / "turned.png", (32, 32)), upright)


def test_a_missing_mask_file_is_a_config_error_naming_it(tmp_path):
    """It was a bare FileNotFoundError from PIL."""
    missing = tmp_path / "no-mask.png"
    with pytest.raises(ConfigError, match=f"inpaint_mask file {missing} does not exist"):
        _load_mask(missing, (32, 32))
