"""The demo recipe runs end to end (a few steps of each stage) and leaves a loadable model folder.

Integration: needs diffsynth-z-image installed (the `integration` nox session installs every package).
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("diffsynth.z_image")

import torch  # noqa: E402

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


def test_a_stage_killed_while_writing_leaves_no_file_a_rerun_would_keep(tmp_path, monkeypatch):
    """Each stage is skipped when its weights file exists: a write cut short leaves only a `.tmp` beside it."""
    from diffsynth.training import demo_recipe

    def torn(state, path):
        Path(path).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_recipe, "save_file", torn)
    with pytest.raises(KeyboardInterrupt):
        demo_recipe._save_whole({}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
