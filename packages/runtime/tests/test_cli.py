"""The `diffsynth` command: every command has a working --help, and errors are one clear line."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.cli import build_parser, main

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


def test_parser_rejects_missing_prompt():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--model", "x"])
    assert exit_info.value.code == 2
