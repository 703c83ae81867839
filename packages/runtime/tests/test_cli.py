"""The `diffsynth` command: every command has a working --help, and errors are one clear line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.cli import main

COMMANDS = ["generate", "list-models", "inspect"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"diffsynth {command}" in capsys.readouterr().out


def test_generate_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in [
        "--model",
        "--prompt",
        "--negative-prompt",
        "--height",
        "--width",
        "--steps",
        "--cfg",
        "--seed",
        "--lora",
        "--controlnet",
        "--control-image",
        "--control-mode",
        "--input-video",
        "--first-block-cache",
        "--tea-cache",
        "--tea-cache-model-id",
        "--sequence-parallel",
        "--cfg-parallel",
        "--vram-limit",
        "--device",
        "--dtype",
        "--output",
        "--audio-only",
        "--dub-video",
        "--motion-bucket-id",
        "--animate2-reference-image",
        "--animate2-reference-video",
        "--animate2-prompt-ref",
        "--context-image",
        "--sampler",
        "--positive-only-lora",
    ]:
        assert flag in out


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "diffsynth.runtime.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "generate" in done.stdout


def test_unknown_preset_is_one_clear_error(capsys):
    code = main(["generate", "--model", "Nobody/No-Such-Model", "--prompt", "a cat"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Nobody/No-Such-Model" in err and "Traceback" not in err


def test_default_model_without_its_package_says_what_to_install(monkeypatch, capsys):
    from diffsynth.runtime import registry

    monkeypatch.setattr(registry, "installed_families", lambda: {})
    code = main(["generate", "--prompt", "a red circle on a blue background"])
    err = capsys.readouterr().err
    assert code == 2
    assert "diffsynth-z-image" in err and "--model" in err


def test_disk_is_not_a_compute_device(capsys):
    code = main(["generate", "--model", "Nobody/No-Such-Model", "--prompt", "a cat", "--device", "disk"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--device disk" in err and "cuda or cpu" in err


def test_list_models_runs(capsys):
    assert main(["list-models"]) == 0
    assert "runtime" in capsys.readouterr().out


def test_inspect_unknown_file_names_it(tmp_path, capsys):
    path = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "mystery.safetensors" in out
    assert "parameter" in out


def test_inspect_says_what_a_lora_file_holds(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    g = torch.Generator().manual_seed(0)
    state = {
        "lora_unet_layers_0_attention_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_layers_0_attention_to_q.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(2.0),
        "lora_unet_layers_0_attention_to_k.lokr_w1": torch.randn(2, 2, generator=g),
        "lora_unet_layers_0_attention_to_k.lokr_w2": torch.randn(4, 4, generator=g),
        "lora_te1_text_model_encoder_layers_0_q_proj.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_te1_text_model_encoder_layers_0_q_proj.lora_up.weight": torch.randn(8, 4, generator=g),
    }
    save_file(state, str(path))
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lora"] == {
        "adapter": {"LoRA": 1, "LoKr": 1},
        "targets": 2,
        "ranks": [4],
        "alphas": [2.0],
        "text_encoder_keys_skipped": 2,
    }
    assert "unrecognised" not in info


def test_generate_needs_a_prompt_unless_the_pipeline_runs_its_own_cli(monkeypatch, capsys):
    """`--prompt` is required by every pipeline but those with their own `run_cli` (LTX-2.3 HDR reads embeddings);
    the refusal comes before any model loads."""
    from diffsynth.runtime import cli

    class Plain:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise AssertionError("the prompt is checked before loading")

    class OwnCli(Plain):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def run_cli(self, args):
            return 0 if args.prompt is None and args.input_video == "clip.mp4" else 1

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Plain)
    assert main(["generate", "--model", "x"]) == 2
    assert "--prompt is required: what Plain should make" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: OwnCli)
    assert main(["generate", "--model", "x", "--input-video", "clip.mp4", "--device", "cpu"]) == 0


def test_animate2_and_speed_flags_reach_the_pipeline(monkeypatch, tmp_path):
    """`--animate2-*` and `--motion-bucket-id` are passed under the pipeline's argument names."""
    from PIL import Image

    from diffsynth.runtime import cli

    seen = {}

    class Video:
        defaults: dict = {}

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def step_caches(self):
            return {}

        def __call__(self, prompt, seed=None, num_frames=None, motion_bucket_id=None, animate2_reference_image=None,
                     animate2_reference_video=None, animate2_prompt_ref=None):  # fmt: skip
            seen.update(motion_bucket_id=motion_bucket_id, image=animate2_reference_image)
            seen.update(video=animate2_reference_video, prompt_ref=animate2_prompt_ref)
            return [Image.new("RGB", (16, 16))] * 5

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Video)
    args = ["generate", "--model", "x", "--prompt", "a dancer", "--device", "cpu", "--motion-bucket-id", "30"]
    args += ["--animate2-reference-image", "me.png", "--animate2-reference-video", "moves.mp4"]
    args += ["--animate2-prompt-ref", "a person dances", "--output", str(tmp_path / "out.mp4")]
    assert main(args) == 0 and (tmp_path / "out.mp4").exists()
    assert seen == {"motion_bucket_id": 30.0, "image": "me.png", "video": "moves.mp4", "prompt_ref": "a person dances"}
