"""The aesthetic predictor against a direct computation: transformers' CLIP vision tower + projection, L2
normalisation, then the five Linears of the LAION MLP written out here as matrix products (no activations)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError
from diffsynth.runtime.metrics import AestheticMetric

WIDTHS = (48, 1024, 128, 64, 16, 1)  # 48: the tiny CLIP's projection; the rest is the released MLP
LINEAR_INDICES = (0, 2, 4, 6, 7)


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("aesthetic")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    config = CLIPVisionConfig(
        hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=48,
    )  # fmt: skip
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(config).eval()
    mlp = {}
    for index, (n_in, n_out) in zip(LINEAR_INDICES, zip(WIDTHS[:-1], WIDTHS[1:], strict=True), strict=True):
        mlp[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in**0.5
        mlp[f"layers.{index}.bias"] = torch.randn(n_out) * 0.1
    mlp["layers.7.bias"] += 5.0  # scores near the released model's range
    return folder, clip, mlp


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


def reference_scores(clip, mlp, folder, pictures) -> np.ndarray:
    from transformers import AutoImageProcessor

    pixels = AutoImageProcessor.from_pretrained(folder)(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        x = torch.nn.functional.normalize(clip(pixel_values=pixels).image_embeds, dim=-1)
        for index in LINEAR_INDICES:
            x = x @ mlp[f"layers.{index}.weight"].T + mlp[f"layers.{index}.bias"]
    return x[:, 0].numpy()


def test_aesthetic_equals_clip_embedding_then_mlp(tmp_path, aesthetic_files):
    folder, clip, mlp = aesthetic_files
    # DiffSynth-Studio's module names: its AestheticModel holds a CLIPVisionModel as `vision_model`
    state = {"vision_model." + k: v for k, v in clip.state_dict().items() if not k.startswith("visual_projection")}
    state["visual_projection.weight"] = clip.visual_projection.weight
    save_file({k: v.contiguous() for k, v in {**state, **mlp}.items()}, str(tmp_path / "model.safetensors"))
    metric = AestheticMetric.from_pretrained(
        model_config=str(tmp_path / "model.safetensors"), processor_config=str(folder), device="cpu", batch_size=2
    )
    pictures = images(3)
    expected = reference_scores(clip, mlp, folder, pictures)
    scores = metric.compute(pictures)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    assert np.std(expected) > 1e-3  # the images score differently, so a wrong pipeline would show
    assert metric.compute(pictures[1]) == pytest.approx([scores[1]], abs=1e-5)  # dropout is off (eval)


def test_aesthetic_reads_the_clip_vision_with_projection_layout(tmp_path, aesthetic_files):
    folder, clip, mlp = aesthetic_files
    state = {"model." + k: v.contiguous() for k, v in {**clip.state_dict(), **mlp}.items()}
    save_file(state, str(tmp_path / "wrapped.safetensors"))
    metric = AestheticMetric.from_pretrained(
        model_config=str(tmp_path / "wrapped.safetensors"), processor_config=str(folder), device="cpu"
    )
    pictures = images(2)
    np.testing.assert_allclose(metric.compute(pictures), reference_scores(clip, mlp, folder, pictures), atol=1e-4)


def test_aesthetic_refuses_a_file_without_the_mlp(tmp_path, aesthetic_files):
    folder, clip, _ = aesthetic_files
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(CheckpointError, match="layers.0.weight"):
        AestheticMetric.from_pretrained(model_config=str(tmp_path / "clip.safetensors"), processor_config=str(folder))


def test_score_json_keeps_every_path_in_order(tmp_path, capsys, aesthetic_files):
    """`--json` lists {"path", "score"} entries in input order: a path given twice keeps both (a dict dropped one)."""
    from diffsynth.runtime.cli import main

    folder, clip, mlp = aesthetic_files
    state = {"vision_model." + k: v for k, v in clip.state_dict().items() if not k.startswith("visual_projection")}
    state["visual_projection.weight"] = clip.visual_projection.weight
    save_file({k: v.contiguous() for k, v in {**state, **mlp}.items()}, str(tmp_path / "model.safetensors"))
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path, picture in zip(paths, images(2), strict=True):
        picture.save(path)
    given = [paths[0], paths[1], paths[0]]  # a path given twice
    files = ["--model-path", str(tmp_path / "model.safetensors"), "--processor-path", str(folder), "--device", "cpu"]
    assert main(["score", "--metric", "aesthetic", *files, "--json", *given]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "aesthetic"
    assert [entry["path"] for entry in out["scores"]] == given
    assert out["scores"][0]["score"] == pytest.approx(out["scores"][2]["score"], abs=1e-5)
