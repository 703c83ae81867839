"""VRAM management through a pipeline: ModelConfig keys and vram_limit applied by from_pretrained,
models activated and parked per stage without user code, and `pipe.vram_report()`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.modules import load_beside

pytest.importorskip("diffsynth.z_image")
from diffsynth.z_image import ZImagePipeline  # noqa: E402

helpers = load_beside(__file__, "helpers.py", "diffsynth_runtime_test_helpers")

PROMPT = "a red circle on a blue background"
FAST = {"height": 32, "width": 32, "num_inference_steps": 2, "progress_bar": False, "output_type": "pt", "seed": 0}
DISK = {"offload_device": "disk", "onload_device": "disk"}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return helpers.tiny_z_image_repo(tmp_path_factory.mktemp("tiny-z-image-vram"))


def configs(root: Path, **keys) -> list[ModelConfig]:
    files = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")
    files += ("text_encoder/model.safetensors",)
    return [ModelConfig(path=str(root / f), **keys) for f in files]


def test_from_pretrained_applies_the_keys_and_stages_move_models(tiny_repo):
    base = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    expected = base(PROMPT, **FAST)
    assert all(r.state == "unmanaged" for r in base.vram_report().values())

    pipe = ZImagePipeline.from_pretrained(
        model_configs=configs(tiny_repo, **DISK),
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
        torch_dtype="float32",
        device="cpu",
        vram_limit=1e-6,  # from_pretrained takes positive limits; the plan streams everything
    )
    events = []
    for slot, handle in pipe.vram_handles.items():
        for method in ("activate", "park"):
            original = getattr(handle, method)

            def record(original=original, slot=slot, method=method):
                events.append((slot, method))
                original()

            setattr(handle, method, record)
    torch.testing.assert_close(pipe(PROMPT, **FAST), expected, rtol=0, atol=0)
    assert [slot for slot, method in events if method == "activate"] == ["text_encoder", "dit", "vae"]
    report = pipe.vram_report()
    assert set(report) == {"dit", "vae", "text_encoder"}
    assert all(r.state == "parked" and r.resident_bytes == 0 for r in report.values())
    assert report["dit"].streamed_units == 4 and report["dit"].bytes_per_step > 0
    assert report["vae"].bytes_per_step > 0 and report["text_encoder"].bytes_moved > 0
    assert all(r.peak_in_flight <= 2 for r in report.values())

    handles = pipe.enable_vram_management(vram_limit=None, slots=["dit"], preparing_dtype="float8_e4m3fn")
    assert handles["dit"].config.preparing_dtype == torch.float8_e4m3fn and handles["dit"].plan.streamed == ()
    out = pipe(PROMPT, **FAST)
    assert 0 < (out - expected).abs().max() < 0.25  # fp8 weights: close, not equal


@pytest.mark.parametrize("managed_first", [False, True], ids=["unmanaged", "cpu-offload"])
def test_a_fused_lora_survives_disk_offload_enabled_afterwards(tiny_repo, managed_first):
    """Fusing a LoRA changes the weights in memory: disk offload enabled afterwards keeps those values instead
    of reading the file again (which silently gave the base model's output)."""
    pipe = ZImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=0 if managed_first else None
    )
    base = pipe(PROMPT, **FAST)
    pipe.load_lora(helpers.lora_state(pipe.dit), scale=0.8)
    expected = pipe(PROMPT, **FAST)
    assert (expected - base).abs().max() > 1e-3
    pipe.enable_vram_management(vram_limit=0, **DISK)
    torch.testing.assert_close(pipe(PROMPT, **FAST), expected)
    pipe.enable_vram_management(vram_limit=None, **DISK)  # and again, from a disk store holding them
    torch.testing.assert_close(pipe(PROMPT, **FAST), expected)


def test_a_non_finite_vram_limit_is_refused(tiny_repo):
    """NaN compares false with everything, so `vram_limit=nan` ran as 0 (everything streamed)."""
    from diffsynth.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"vram_limit must be .*got nan \(not a finite number\)"):
        ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=float("nan"))
    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match=r"got inf \(not a finite number\)"):
        pipe.enable_vram_management(vram_limit=float("inf"))
    assert pipe.vram_limit is None and not pipe.vram_handles


def test_a_lora_fused_outside_the_pipeline_survives_disk_offload_enabled_afterwards(tiny_repo):
    """`lora.load_lora(model, ..., fuse=True)` called directly marks the weights it changes as the pipeline's
    `load_lora` did: disk offload enabled afterwards read the base weights back from the file."""
    from diffsynth.runtime.lora import load_lora
    from diffsynth.runtime.vram.disk import is_changed

    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    base = pipe(PROMPT, **FAST)
    load_lora(pipe.dit, helpers.lora_state(pipe.dit), scale=0.8, fuse=True)
    assert all(is_changed(m.weight) for m in pipe.dit.modules() if isinstance(m, torch.nn.Linear))
    expected = pipe(PROMPT, **FAST)
    assert (expected - base).abs().max() > 1e-3
    pipe.enable_vram_management(vram_limit=0, **DISK)
    torch.testing.assert_close(pipe(PROMPT, **FAST), expected)


def test_enable_vram_management_names_the_slots_it_cannot_manage(tiny_repo):
    """A misspelled slot was dropped in silence (nothing managed), and `slots="dit"` was read letter by letter."""
    from diffsynth.runtime.errors import ConfigError

    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match=r"unknown model slot\(s\) \['dti'\]; slots: \['dit', 'vae', "):
        pipe.enable_vram_management(slots=["dti"], vram_limit=0)
    with pytest.raises(ConfigError, match=r"unknown model slot\(s\) \['vea'\]"):
        pipe.enable_vram_management(slots=["dit", "vea"], vram_limit=0)
    with pytest.raises(ConfigError, match=r"\['controlnet'\] hold no loaded model; loaded: \['dit', 'vae', 'text_e"):
        pipe.enable_vram_management(slots=["controlnet"], vram_limit=0)
    assert not pipe.vram_handles and pipe.vram_limit is None  # refused calls change nothing
    assert set(pipe.enable_vram_management(slots="dit", vram_limit=0)) == {"dit"}


def test_a_gpu_torch_does_not_see_is_refused_before_anything_loads(tiny_repo, monkeypatch):
    """`device="cuda"` without CUDA loaded every model, then failed in torch ("Found no NVIDIA driver")."""
    from diffsynth.runtime.errors import ConfigError

    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def never(self, config):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(ZImagePipeline, "_load_config", never)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ConfigError, match=r"device='cuda(:0)?': torch .* sees no CUDA GPU here .* device='cpu'"):
            ZImagePipeline.from_pretrained(str(tiny_repo), device=device)
    with pytest.raises(ConfigError, match=r"device='mps': the Apple GPU \(mps\) is not available .* device='cpu'"):
        ZImagePipeline.from_pretrained(str(tiny_repo), device="mps")
    with pytest.raises(ConfigError, match=r"ModelConfig computation_device='cuda': torch .* sees no CUDA GPU"):
        ZImagePipeline.from_pretrained(model_configs=configs(tiny_repo, computation_device="cuda"), device="cpu")
    with pytest.raises(ConfigError, match=r"^computation_device='cuda': torch .* use computation_device='cpu'"):
        pipe.enable_vram_management(computation_device="cuda")
    assert not pipe.vram_handles
    assert set(pipe.enable_vram_management(computation_device="cpu", vram_limit=0)) == {"dit", "vae", "text_encoder"}


def test_disabled_handles_leave_an_unmanaged_pipeline(tiny_repo):
    """Handles disabled directly were still driven by the stages (AttributeError in activate, or 'parked' in the
    report with disk offload); `disable_vram_management` drops them and stops moving the models between stages."""
    from diffsynth.runtime.errors import ConfigError

    pipe = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=1e-6)
    expected = pipe(PROMPT, **FAST)
    for keys in ({}, DISK):
        pipe.enable_vram_management(**keys)
        for handle in pipe.vram_handles.values():
            handle.disable()
        torch.testing.assert_close(pipe(PROMPT, **FAST), expected, rtol=0, atol=0)
        assert {r.state for r in pipe.vram_report().values()} == {"unmanaged"}
    pipe.enable_vram_management(**DISK)
    pipe.disable_vram_management(slots=["dit"])
    assert set(pipe.vram_handles) == {"vae", "text_encoder"} and pipe.model_offload
    torch.testing.assert_close(pipe(PROMPT, **FAST), expected, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"unknown model slot\(s\) \['dti'\]"):
        pipe.disable_vram_management(slots=["dti"])
    pipe.disable_vram_management()
    assert pipe.vram_handles == {} and not pipe.model_offload
    torch.testing.assert_close(pipe(PROMPT, **FAST), expected, rtol=0, atol=0)
    assert {r.state for r in pipe.vram_report().values()} == {"unmanaged"}
