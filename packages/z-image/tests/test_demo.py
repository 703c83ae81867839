"""The bundled demo model: its world of shapes, the checker, and what the shipped weights draw."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from PIL import Image

from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.pipeline import preset_sources
from diffsynth.runtime.registry import Preset, installed_families
from diffsynth.z_image.demo import (
    COLOURS,
    MODEL_FOLDER,
    PLACES,
    Scene,
    all_scenes,
    check_image,
    held_out_scenes,
    render,
    training_rows,
)
from diffsynth.z_image.pipeline import ZImagePipeline

MAX_BYTES = 20 * 1024 * 1024


def test_caption_reads_like_english():
    assert Scene("circle", "red", "blue").caption == "a red circle on a blue background"
    scene = Scene("triangle", "orange", "white", "small", "top left")
    assert scene.caption == "a small orange triangle in the top left corner on a white background"
    assert (
        Scene("square", "green", "orange", place="center").caption
        == "a green square in the center on an orange background"
    )


def test_scene_rejects_unknown_words():
    with pytest.raises(ValueError, match="pink"):
        Scene("circle", "pink", "blue")
    with pytest.raises(ValueError, match="cannot be seen"):
        Scene("circle", "red", "red")


def test_checker_accepts_every_true_drawing():
    rng = random.Random(0)
    scenes = random.Random(1).sample(all_scenes(), 150)
    failures = {s.caption: check_image(render(s, rng), s) for s in scenes}
    assert not {c: p for c, p in failures.items() if p}


def test_checker_rejects_wrong_colour_background_and_place():
    rng = random.Random(0)
    scene = Scene("circle", "red", "blue", "small", "top left")
    image = render(scene, rng)
    assert check_image(image, dataclasses.replace(scene, colour="green"))
    assert check_image(image, dataclasses.replace(scene, background="white"))
    assert check_image(image, dataclasses.replace(scene, place="bottom right"))
    blank = render(Scene("circle", "blue", "red", "small", "top left"), rng)
    assert check_image(blank, scene)  # colours swapped


def test_held_out_scenes_are_never_drawn_for_training():
    held_out = {s.caption for s in held_out_scenes()}
    assert len(held_out) == 24
    captions = {caption for _, caption in training_rows(copies=1)}
    assert not held_out & captions
    assert "" in captions  # unconditional rows for CFG
    assert any(c.startswith("a red circle on") for c in captions)  # size and place left unsaid


def test_demo_is_a_preset_within_size():
    preset = installed_families()["z_image"].presets["demo"]
    assert preset.folder == str(MODEL_FOLDER)
    files = [p for p in MODEL_FOLDER.rglob("*") if p.is_file()]
    assert {"transformer", "vae", "text_encoder", "tokenizer"} <= {p.parent.name for p in files}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_a_preset_whose_folder_is_gone_says_so(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        preset_sources(Preset(name="gone", folder=str(tmp_path / "gone")))


def test_cli_draws_with_the_demo_by_default(tmp_path):
    output = tmp_path / "shapes.png"
    code = main(["generate", "--prompt", "a red circle on a blue background", "--steps", "4", "--output", str(output)])
    assert code == 0
    with Image.open(output) as image:
        assert image.size == (128, 128)


@pytest.fixture(scope="module")
def demo_pipe():
    return ZImagePipeline.from_pretrained("demo", torch_dtype=torch.float32, device="cpu")


def test_demo_draws_held_out_scenes(demo_pipe):
    """24 caption combinations never drawn in training, at the preset's defaults, checked property by property.

    Issue #9's bar: at least 90% of the prompts right in background, shape colour and place. The shipped model
    (the recipe's GPU run) draws all 24 right at seeds 0-3; 90% leaves room for CPU rounding differences.
    """
    scenes = held_out_scenes()
    images = demo_pipe([s.caption for s in scenes], seed=0, progress_bar=False)
    assert images[0].size == (128, 128)
    problems = {s.caption: check_image(im, s) for s, im in zip(scenes, images, strict=True)}

    def share_without(*kinds: str) -> float:
        return sum(not any(p.startswith(kinds) for p in found) for found in problems.values()) / len(scenes)

    assert share_without("background", "no shape") >= 0.9, problems
    assert share_without("shape centre", "no shape") >= 0.9, problems
    assert share_without("shape is", "no shape") >= 0.9, problems
    assert sum(not found for found in problems.values()) / len(scenes) >= 0.9, problems  # every property at once


def test_sizes_beyond_the_dits_rope_are_refused_by_name(demo_pipe):
    with pytest.raises(ConfigError, match="width=1024 .* at most 512 pixels"):
        demo_pipe("a red circle on a blue background", width=1024, num_inference_steps=1, progress_bar=False)


def test_demo_follows_the_prompt_not_the_seed(demo_pipe):
    """Same seed, captions differing only in colour or place: the pictures follow the captions."""
    scenes = [Scene("square", colour, "black", "large", place) for colour in ("red", "yellow") for place in PLACES]
    scenes = random.Random(3).sample(scenes, 6)
    images = demo_pipe([s.caption for s in scenes], seed=7, progress_bar=False)
    assert sum(not check_image(im, s) for s, im in zip(scenes, images, strict=True)) >= 5


def test_palette_is_distinct():
    values = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    distances = torch.cdist(values, values) + torch.eye(len(values)) * 1e6
    assert distances.min() > 80  # the checker's nearest-colour labels cannot confuse two names
