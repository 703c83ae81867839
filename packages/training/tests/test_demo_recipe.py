"""The demo recipe runs end to end (a few steps of each stage) and leaves a loadable model folder.

Integration: needs diffsynth-z-image installed (the `integration` nox session installs every package).
"""

import json

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
