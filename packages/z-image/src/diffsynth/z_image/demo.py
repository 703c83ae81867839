"""The bundled demo model's world: flat shapes in named colours, sizes and places, and their captions.

The demo model (preset `demo`, weights in `demo_model/` beside this file) is a tiny Z-Image trained from
scratch on pictures drawn here; `diffsynth-train-demo` (package diffsynth-training) is the recipe. This
module is shared by the recipe, which renders the training set, and the tests, which check generated
images against their captions with `check_image`.

A scene is a shape, its colour, the background colour, and optionally a size and one of nine places on a
3x3 grid; captions read "a small red circle in the top left corner on a blue background". Scenes named
by `held_out_scenes()` are never drawn for training, so the tests measure generalisation, not recall.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
MODEL_FOLDER = Path(__file__).parent / "demo_model"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.36}  # shape width as a fraction of the image side
# place -> (row, column) on the 3x3 grid, and how a caption says it
PLACES: dict[str, tuple[tuple[int, int], str]] = {
    "top left": ((0, 0), "in the top left corner"),
    "top": ((0, 1), "at the top"),
    "top right": ((0, 2), "in the top right corner"),
    "left": ((1, 0), "on the left"),
    "center": ((1, 1), "in the center"),
    "right": ((1, 2), "on the right"),
    "bottom left": ((2, 0), "in the bottom left corner"),
    "bottom": ((2, 1), "at the bottom"),
    "bottom right": ((2, 2), "in the bottom right corner"),
}
_GRID_CENTRES = (0.2, 0.5, 0.8)  # centre of a grid row/column, as a fraction of the side
_JITTER = 0.025  # random offset of a shape's centre, as a fraction of the side


@dataclass(frozen=True)
class Scene:
    """What a caption says. `size`/`place` of None leave them unsaid (drawn at random)."""

    shape: str
    colour: str
    background: str
    size: str | None = None
    place: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        for name in (self.colour, self.background):
            if name not in COLOURS:
                raise ValueError(f"colour {name!r} is not one of {tuple(COLOURS)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background cannot be seen")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {tuple(SIZES)}")
        if self.place is not None and self.place not in PLACES:
            raise ValueError(f"place {self.place!r} is not one of {tuple(PLACES)}")

    @property
    def caption(self) -> str:
        words = ([self.size] if self.size else []) + [self.colour, self.shape]
        words = [_article(words[0]), *words]
        if self.place:
            words.append(PLACES[self.place][1])
        return " ".join([*words, "on", _article(self.background), self.background, "background"])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_scenes() -> list[Scene]:
    """Every fully specified scene, in a fixed order."""
    return [
        Scene(shape, colour, background, size, place)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if background != colour
        for size in SIZES
        for place in PLACES
    ]


def held_out_scenes(count: int = 24, seed: int = 2026) -> list[Scene]:
    """Scenes the training set never draws (the generalisation test), a fixed seeded choice."""
    return random.Random(seed).sample(all_scenes(), count)


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene; an unsaid size or place is chosen with `rng`, the centre jitters slightly."""
    shape_size = SIZES[scene.size or rng.choice(tuple(SIZES))]
    row, col = PLACES[scene.place or rng.choice(tuple(PLACES))][0]
    cx = (_GRID_CENTRES[col] + rng.uniform(-_JITTER, _JITTER)) * size
    cy = (_GRID_CENTRES[row] + rng.uniform(-_JITTER, _JITTER)) * size
    half = shape_size * size / 2
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


def training_rows(
    copies: int = 2, seed: int = 0, unsaid: float = 0.2, empty: float = 0.08
) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) pairs for every scene not held out, `copies` drawings each.

    A caption leaves out the size or the place with probability `unsaid` each (the drawing then
    picks them at random, so "a red circle on a blue background" means any size, anywhere), and is
    empty with probability `empty`, which teaches the unconditional prediction that CFG needs.
    """
    rng = random.Random(seed)
    held_out = set(held_out_scenes())
    for scene in all_scenes():
        if scene in held_out:
            continue
        for _ in range(copies):
            image = render(scene, rng)
            said = Scene(
                scene.shape,
                scene.colour,
                scene.background,
                None if rng.random() < unsaid else scene.size,
                None if rng.random() < unsaid else scene.place,
            )
            yield image, "" if rng.random() < empty else said.caption


def nearest_colours(image: Image.Image) -> np.ndarray:
    """Per pixel, the index (into COLOURS) of the nearest palette colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def check_image(image: Image.Image, scene: Scene) -> list[str]:
    """What in `image` contradicts `scene` (empty when it matches), by pixel statistics.

    Background: the most common palette colour outside the named grid cell. Shape: the pixels
    whose palette colour is not the background's; it must cover at least a third of the area it
    should, its most common colour must be the scene's, and its centroid must lie in the cell.
    """
    names = list(COLOURS)
    labels = nearest_colours(image)
    h, w = labels.shape
    problems: list[str] = []
    cell = np.zeros_like(labels, dtype=bool)
    if scene.place is not None:
        row, col = PLACES[scene.place][0]
        cell[row * h // 3 : (row + 1) * h // 3, col * w // 3 : (col + 1) * w // 3] = True
    outside = labels[~cell]
    background = int(np.bincount(outside, minlength=len(names)).argmax())
    if names[background] != scene.background:
        problems.append(f"background is {names[background]}, not {scene.background}")
    shape = labels != background
    expected_area = (SIZES[scene.size or "small"] * min(h, w)) ** 2 * 0.4  # a triangle's area is 1/2 its box's
    if shape.sum() < expected_area / 3:
        problems.append(f"no shape: {int(shape.sum())} pixels differ from the background")
        return problems
    colour = int(np.bincount(labels[shape], minlength=len(names)).argmax())
    if names[colour] != scene.colour:
        problems.append(f"shape is {names[colour]}, not {scene.colour}")
    if scene.place is not None:
        ys, xs = np.nonzero(shape)
        cy, cx = ys.mean(), xs.mean()
        if not cell[min(int(cy), h - 1), min(int(cx), w - 1)]:
            problems.append(f"shape centre ({cx:.0f}, {cy:.0f}) is not {PLACES[scene.place][1]}")
    return problems


__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "MODEL_FOLDER",
    "PLACES",
    "SHAPES",
    "SIZES",
    "Scene",
    "all_scenes",
    "check_image",
    "held_out_scenes",
    "nearest_colours",
    "render",
    "training_rows",
]
