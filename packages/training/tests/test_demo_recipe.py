"""The demo recipe runs end to end (a few steps of each stage) and leaves a loadable model folder.

Integration: needs diffsynth-z-image installed (the `integration` nox session installs every package).
"""

import json
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("diffsynth.z_image")

import torch  # noqa: E402

from diffsynth.training import demo_recipe  # noqa: E402
from diffsynth.training.demo_recipe import main  # noqa: E402
from diffsynth.z_image import ZImagePipeline  # noqa: E402

pytestmark = pytest.mark.integration


def test_recipe_writes_a_model_the_pipeline_loads(tmp_path):
    out = tmp_path / "demo"
    args = ["--output_path", str(out), "--copies", "1", "--vae_steps", "2", "--steps", "2", "--batch_size", "8"]
    assert main(args) == 0
    model = out / "model"
    assert {"transformer", "vae", "text_encoder", "tokenizer"} <= {p.name for p in model.iterdir()}
    assert json.loads((model / "diffsynth.json").read_text())["defaults"]["height"] == 128
    rows = (out / "data" / "metadata.csv").read_text().splitlines()
    assert len(rows) == 1 + 3024 - 24  # header + one drawing per training scene
    pipe = ZImagePipeline.from_pretrained(str(model), torch_dtype=torch.float32, device="cpu")
    assert pipe("a red circle on a blue background", num_inference_steps=2, seed=0, progress_bar=False).size == (
        128,
        128,
    )
    # a second run finds every stage done and only re-exports and re-checks
    assert main(args) == 0


STAGES = ("write_dataset", "write_text_encoder", "train_vae", "write_initial_dit", "train_dit", "export", "evaluate")


@pytest.fixture
def no_stage(monkeypatch):
    """Every stage of the recipe fails the test if it runs."""
    for name in STAGES:
        monkeypatch.setattr(demo_recipe, name, lambda *a, _name=name, **k: pytest.fail(f"stage {_name} ran"))


@pytest.mark.parametrize("device", ["gpu", "mps", "disk", "cuda"])
def test_device_is_refused_before_any_stage(tmp_path, monkeypatch, capsys, no_stage, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "cuda" on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["--output_path", str(tmp_path / "demo"), "--device", device]) == 2
    assert f"--device {device}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", {"ACCELERATE_USE_CPU": "true"}), ("cuda:1", {"ACCELERATE_TORCH_DEVICE": "cuda:1"})]
)
def test_dit_stage_runs_on_the_given_device(tmp_path, monkeypatch, device, expected):
    """diffsynth-train picks its device through accelerate (CUDA when available): the DiT stage tells it --device."""
    import diffsynth.training.cli

    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    seen = []

    def train(argv):
        seen.append(({k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")}, argv))
        return 0

    monkeypatch.setattr(diffsynth.training.cli, "main", train)
    for part in ("vae", "text_encoder", "tokenizer"):
        (tmp_path / "model" / part).mkdir(parents=True)
    args = SimpleNamespace(batch_size=2, seed=0, learning_rate=1e-3, steps=3)
    demo_recipe.train_dit(tmp_path, args, device)
    assert [argv[-2:] if "--stage" in argv else "train" for _, argv in seen] == [["--stage", "encode"], "train"]
    want = dict.fromkeys(("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")) | expected
    assert all(env == want for env, _ in seen)
    assert "ACCELERATE_USE_CPU" not in os.environ and "ACCELERATE_TORCH_DEVICE" not in os.environ  # put back


def test_rerun_with_fewer_steps_is_refused_before_any_stage(tmp_path, capsys, no_stage):
    """A folder whose DiT run reached step 6: --steps 4 would resume at 6, train nothing and find no step-4 weights."""
    out = tmp_path / "demo"
    (out / "train" / "checkpoints" / "step-000006").mkdir(parents=True)
    (out / "train" / "checkpoints" / "step-000006" / "state.pt").write_bytes(b"")
    assert main(["--output_path", str(out), "--device", "cpu", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "--steps 4" in err and "already at step 6" in err and "--output_path" in err
    demo_recipe.check_previous_run(out, 6)  # continuing (or finishing) the run is fine
    demo_recipe.check_previous_run(out, 8)
    exported = out / "train" / "step-000004" / "dit"
    exported.mkdir(parents=True)
    (exported / demo_recipe.WEIGHTS).write_bytes(b"")
    demo_recipe.check_previous_run(out, 4)  # step 4 was exported on the way: nothing is lost
