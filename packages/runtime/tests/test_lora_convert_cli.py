"""`diffsynth lora convert`'s argument errors: one clear line naming the flag and what is accepted, exit code 2,
nothing written. (The conversions themselves are tested in each family's test_lora_convert.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.cli import main


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file({"a.lora_A.weight": torch.zeros(1, 4), "a.lora_B.weight": torch.zeros(4, 1)}, str(path))
    return path


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lora", "convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--family", "--to", "--format", "--output"):
        assert flag in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--family", "no_such_family"], "--family 'no_such_family' is not an installed model family; installed: "),
        (["--family", "runtime"], "--family 'runtime' has no LoRA naming converter"),
        (["--family", "runtime", "--to", "comfy"], "--to 'comfy' is not a LoRA naming; accepted: official, diffusers"),
        (["--family", "runtime", "--format", "xlabs"], "--format 'xlabs' is not a LoRA key layout; accepted: "),
        (["--family", "runtime", "--to", "diffusers", "--format", "kohya"], "with --to diffusers use --format peft"),
    ],
)
def test_argument_errors_are_one_line_naming_the_flag(tmp_path, lora_file, capsys, extra, message):
    out = tmp_path / "out.safetensors"
    assert main(["lora", "convert", str(lora_file), "-o", str(out), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()
