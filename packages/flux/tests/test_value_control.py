"""AttriCtrl (`flux1/value_control.py`, `FluxImagePipeline(value_controller_inputs=...)`).

- one attribute encoder against DiffSynth-Studio's `SingleValueEncoder` (read from its git mirror; skipped where it
  is absent) in float32 and bfloat16, and the released layout on the meta device;
- the pipeline: the DiT reads the prompt's T5 states followed by each encoder's 32 tokens (both CFG branches, load
  order), the encoders load from `model_configs` / `load_value_controller` / the preset, and the errors name the
  argument.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from diffsynth_flux_test_helpers import our_pipeline
from safetensors.torch import save_file

from diffsynth.flux.flux1.value_control import (
    VALUE_ENCODER_SPEC,
    ValueEncoder,
    ValueEncoderConfig,
    config_from_state,
    is_value_encoder_file,
)
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
STUDIO = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")
RUN = dict(num_inference_steps=2, height=32, width=32, seed=0, t5_sequence_length=16, progress_bar=False)


def studio_value_encoder():
    """DiffSynth-Studio's `SingleValueEncoder` (its module and `general_modules`, compiled from the mirror)."""
    if not (STUDIO / "HEAD").exists() and not (STUDIO / ".git").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    modules = {}
    for name in ("general_modules", "flux_value_control"):
        source = subprocess.run(
            ["git", "-C", str(STUDIO), "show", f"HEAD:diffsynth/models/{name}.py"], capture_output=True, text=True
        )
        if source.returncode:
            pytest.skip(f"diffsynth/models/{name}.py is not in the mirror")
        text = source.stdout.replace("from .general_modules import", "from studio_general_modules import")
        module = types.ModuleType(f"studio_{name}")
        sys.modules[module.__name__] = module
        exec(compile(text, f"studio:{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["flux_value_control"].SingleValueEncoder


def tiny_encoder(dim: int = 32, seed: int = 0) -> ValueEncoder:
    return random_weights(ValueEncoder(ValueEncoderConfig(embedding_dim=16, dim=dim, tokens=4)), seed, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_matches_diffsynth_studio(dtype):
    cls = studio_value_encoder()
    theirs = cls(dim_in=16, dim_out=32, prefer_len=4)
    ours = tiny_encoder()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    for value in (0.0, 0.3, 0.77, 1.0):
        with torch.no_grad():  # their pipeline casts the value to its dtype first
            want = theirs(torch.tensor(value, dtype=dtype).unsqueeze(0), dtype)
            got = ours(value)
        assert got.shape == (4, 32) and got.dtype == dtype
        assert torch.equal(got, want)  # the same operations in the same order, in either dtype


def test_released_layout_on_meta():
    with torch.device("meta"):
        ours = ValueEncoder()
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {
        "prefer_value_embedder.0.weight": (4096, 256),
        "prefer_value_embedder.0.bias": (4096,),
        "prefer_value_embedder.2.weight": (4096, 4096),
        "prefer_value_embedder.2.bias": (4096,),
        "positional_embedding": (32, 4096),
    }
    assert config_from_state(ours.state_dict()) == ValueEncoderConfig()
    try:
        cls = studio_value_encoder()
    except pytest.skip.Exception:
        return
    with torch.device("meta"):
        theirs = cls()
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_the_value_is_a_sinusoidal_time_of_1000_times_it():
    """The tokens: MLP([cos, sin](1000 v * f_i)) + positions, f_i = 10000^(-i/half) (an invariant written out)."""
    enc = tiny_encoder(seed=3)
    v = 0.42
    half = 8
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    features = torch.cat([torch.cos(1000 * v * freqs), torch.sin(1000 * v * freqs)])[None]
    with torch.no_grad():
        want = enc.prefer_value_embedder(features) + enc.positional_embedding
        torch.testing.assert_close(enc(v), want)


# ------------------------------------------------------------------ the pipeline
def write_encoder(path: Path, seed: int, dim: int = 32) -> ValueEncoder:
    enc = tiny_encoder(dim=dim, seed=seed)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return enc


def _dit_texts(pipe, **kwargs):
    seen = []
    hook = pipe.dit.register_forward_pre_hook(lambda m, args, kw: seen.append(args[2] if len(args) > 2 else kw["txt"]),
                                              with_kwargs=True)  # fmt: skip
    try:
        out = pipe("a cat on the beach", output_type="np", **{**RUN, **kwargs})
    finally:
        hook.remove()
    return seen, out


def test_the_dit_reads_the_prompt_then_each_encoders_tokens(tiny_repo, tmp_path):
    """Two encoders (one from model_configs, one by `load_value_controller`): the DiT's text is the prompt's T5
    states, then encoder 0's tokens for value 0, then encoder 1's for value 1; with CFG both branches carry them."""
    first = write_encoder(tmp_path / "brightness.safetensors", 1)
    second = write_encoder(tmp_path / "other.safetensors", 2)
    assert is_value_encoder_file([str(tmp_path / "brightness.safetensors")])
    pipe = our_pipeline(tiny_repo, model_configs=[ModelConfig(path=str(tmp_path / "brightness.safetensors"))])
    assert pipe.load_value_controller(str(tmp_path / "other.safetensors")) == 1
    plain, plain_image = _dit_texts(pipe)
    seen, image = _dit_texts(pipe, value_controller_inputs=[0.2, 0.9])
    with torch.no_grad():
        tokens = torch.cat([first(0.2), second(0.9)])
    (prompt,) = {t.shape for t in plain}
    assert seen[0].shape == (1, prompt[1] + 8, 32)
    torch.testing.assert_close(seen[0][:, : prompt[1]], plain[0])
    torch.testing.assert_close(seen[0][0, prompt[1] :], tokens)
    assert abs(image - plain_image).max() > 1e-4
    cfg, _ = _dit_texts(pipe, value_controller_inputs=[0.2, 0.9], cfg_scale=2.0, negative_prompt="dark")
    assert all(t.shape[1] == prompt[1] + 8 for t in cfg)
    for text in cfg:  # batched [positive, negative] or one branch at a time: every row ends in the tokens
        for row in text:
            torch.testing.assert_close(row[prompt[1] :], tokens)


def test_errors_name_the_argument(tiny_repo, tiny_pipe, tmp_path):
    with pytest.raises(ConfigError, match="load_value_controller"):
        tiny_pipe("a", value_controller_inputs=0.5, **RUN)
    write_encoder(tmp_path / "b.safetensors", 1)
    pipe = our_pipeline(tiny_repo)
    pipe.load_value_controller(str(tmp_path / "b.safetensors"))
    with pytest.raises(ConfigError, match="2 values for 1 loaded"):
        pipe("a", value_controller_inputs=[0.1, 0.2], **RUN)
    with pytest.raises(ConfigError, match=r"value_controller_inputs\[0\]=1.5 must be a number in \[0, 1\]"):
        pipe("a", value_controller_inputs=1.5, **RUN)
    write_encoder(tmp_path / "wide.safetensors", 1, dim=48)
    with pytest.raises(ConfigError, match="48-wide tokens; this DiT reads 32-wide text"):
        pipe.load_value_controller(str(tmp_path / "wide.safetensors"))


def test_preset_loads_flux1_dev_and_the_brightness_encoder(bfl_repo_base, tmp_path, monkeypatch):
    import shutil

    from diffsynth.flux import FluxImagePipeline

    base = tmp_path / "models"
    shutil.copytree(bfl_repo_base, base)
    folder = base / "DiffSynth-Studio" / "AttriCtrl-FLUX.1-Dev" / "models"
    folder.mkdir(parents=True)
    enc = write_encoder(folder / "brightness.safetensors", 5)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = FluxImagePipeline.from_pretrained("DiffSynth-Studio/AttriCtrl-FLUX.1-Dev", torch_dtype="float32")
    (loaded,) = pipe.value_controller.encoders
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in enc.state_dict().items())
    assert VALUE_ENCODER_SPEC.role == "value_controller"
    image = pipe("a cat", value_controller_inputs=[0.7], height=32, width=32, num_inference_steps=1)
    assert image.size == (32, 32)


def test_cli_flag_reaches_the_pipeline(bfl_repo_base, tmp_path, monkeypatch):
    """`diffsynth generate --model DiffSynth-Studio/AttriCtrl-FLUX.1-Dev --value-controller-inputs 0.7` writes the
    pipeline's image for that value."""
    import shutil

    import numpy as np
    from PIL import Image

    from diffsynth.flux import FluxImagePipeline
    from diffsynth.runtime.cli import main

    base = tmp_path / "models"
    shutil.copytree(bfl_repo_base, base)
    folder = base / "DiffSynth-Studio" / "AttriCtrl-FLUX.1-Dev" / "models"
    folder.mkdir(parents=True)
    write_encoder(folder / "brightness.safetensors", 6)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "out.png"
    args = ["generate", "--model", "DiffSynth-Studio/AttriCtrl-FLUX.1-Dev", "--prompt", "a cat", "--seed", "1"]
    args += ["--value-controller-inputs", "0.7", "--steps", "1", "--height", "32", "--width", "32"]
    assert main([*args, "--output", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    pipe = FluxImagePipeline.from_pretrained("DiffSynth-Studio/AttriCtrl-FLUX.1-Dev", torch_dtype="float32")
    want = pipe("a cat", value_controller_inputs=[0.7], seed=1, num_inference_steps=1, height=32, width=32)
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written), np.asarray(want))
