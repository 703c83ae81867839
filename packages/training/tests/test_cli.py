"""`diffsynth-train` end to end, and the README's commands and YAML example, which must stay valid."""

import re
import shlex
from pathlib import Path

import pytest
from diffsynth_training_toy import TASK

from diffsynth.training.checkpoint import list_checkpoints
from diffsynth.training.cli import main
from diffsynth.training.config import load_yaml, parse_args

README = Path(__file__).parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[list[str]]:
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            words = shlex.split(line, comments=True)
            if "diffsynth-train" in words:
                commands.append(words[words.index("diffsynth-train") + 1 :])
            elif "diffsynth.training.cli" in words:
                commands.append(words[words.index("diffsynth.training.cli") + 1 :])
    return commands


@pytest.fixture
def readme_yaml(tmp_path, monkeypatch) -> Path:
    (yaml_block,) = readme_blocks("yaml")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "z_image_lora.yaml"
    path.write_text(yaml_block)
    return path


def test_readme_commands_parse(readme_yaml):
    commands = readme_commands()
    assert len(commands) == 18
    for argv in commands:
        parse_args(argv)  # raises on an unknown flag or a value that does not check


def test_readme_yaml_trains_the_toy_family(readme_yaml, dataset, tmp_path):
    assert load_yaml(readme_yaml)["model"] == "Tongyi-MAI/Z-Image-Turbo"
    weights = tmp_path / "weights"  # the toy task ignores model files, but --model must name some
    weights.mkdir()
    (weights / "toy.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["--config", str(readme_yaml), "--family", TASK, "--model", str(weights), "--dataset_base_path",
            str(dataset), "--output_path", str(out), "--max_steps", "2", "--mixed_precision", "no", "--dtype",
            "float32", "--lora_rank", "4"]  # fmt: skip
    assert main(argv) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002"]
    assert (out / "step-000002.safetensors").is_file() and (out / "step-000002.peft.safetensors").is_file()


def test_run_errors_are_reported_with_exit_code_2(tmp_path, caplog):
    argv = ["--family", "no_such_family", "--model", str(tmp_path), "--dataset_base_path", str(tmp_path),
            "--mixed_precision", "no"]  # fmt: skip
    assert main(argv) == 2
    assert "--family 'no_such_family' has no training task" in caplog.text
