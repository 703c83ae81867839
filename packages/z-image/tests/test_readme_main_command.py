"""The README's main command, run exactly as written, draws its picture with the bundled demo model."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"


def main_command() -> str:
    """The command line under the README's "run the main job" comment."""
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# run the main job"):
            return lines[i + 1].strip()
    raise AssertionError(f"{README} has no '# run the main job' line")


def _in_venv(folder: str) -> bool:
    return bool(folder) and (Path(folder).parent / "pyvenv.cfg").exists()


def test_main_command_uses_the_demo_model():
    argv = shlex.split(main_command().split("&&")[-1])
    assert argv[argv.index("run") :][:3] == ["run", "--all-packages", "--no-dev"]
    assert "generate" in argv and "--model" not in argv  # the default: the bundled demo
    assert argv[argv.index("--output") + 1].endswith(".png")


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_main_command_runs_as_written(tmp_path):
    if shutil.which("uv") is None:
        pytest.skip("uv is not installed")
    command = main_command()
    output = ROOT / shlex.split(command)[shlex.split(command).index("--output") + 1]
    if output.exists():
        pytest.skip(f"{output} exists; not overwriting it")
    # A user's shell: virtual environments off PATH (this test's, and the one `uvx nox` runs in), so python3
    # is the system one, which has pip; uv's project environment in a temporary folder, so the developer's
    # .venv is left alone.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if not _in_venv(p))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=path, UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"))
    started = time.time()
    try:
        result = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert output.exists() and output.stat().st_mtime >= started - 1
        with Image.open(output) as image:
            assert image.size == (128, 128)
    finally:
        output.unlink(missing_ok=True)
