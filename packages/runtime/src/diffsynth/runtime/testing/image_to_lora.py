"""i2L test helpers: tiny image encoders (the one place their sizes live: SigLIP2-G384 and DINOv3-7B at a few
thousand parameters, seeded random weights, written in the released files' layouts when asked), random pictures,
LoRA deltas, and DiffSynth-Studio's i2L sources loaded from its git mirror for parity."""

from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

STUDIO_MIRROR = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")


def picture(seed: int, size=(80, 56)):
    """A random RGB PIL picture of `size` (width, height)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def lora_deltas(lora: dict) -> dict:
    """Each target's weight change `up @ down` of a `<name>.lora_A.weight` / `.lora_B.weight` state dict."""
    suffix = ".lora_A.weight"
    return {k[: -len(suffix)]: lora[k.replace("lora_A", "lora_B")] @ v for k, v in lora.items() if k.endswith(suffix)}


def without_adapter(lora: dict) -> dict:
    """DiffSynth-Studio's `.lora_A.default.weight` keys as ours."""
    return {k.replace(".default.", "."): v for k, v in lora.items()}


@contextlib.contextmanager
def studio_modules(root: Path, package: str, sources: dict[str, str]):
    """DiffSynth-Studio's files `sources` (path under `diffsynth/` -> module name) from its git mirror, written into
    the package `package` under `root` and imported; yields the modules in order. Skips the test (pytest) when
    the mirror or a file is absent."""
    import pytest

    if not (STUDIO_MIRROR / "HEAD").exists() and not (STUDIO_MIRROR / ".git").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    folder = Path(root) / package
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    for source, name in sources.items():
        show = subprocess.run(
            ["git", "-C", str(STUDIO_MIRROR), "show", f"HEAD:diffsynth/{source}"], capture_output=True
        )
        if show.returncode:
            pytest.skip(f"diffsynth/{source} is not in the DiffSynth-Studio mirror")
        (folder / f"{name}.py").write_bytes(show.stdout)
    sys.path.insert(0, str(root))
    try:
        yield [importlib.import_module(f"{package}.{name}") for name in sources.values()]
    finally:
        sys.path.remove(str(root))


TINY_SIGLIP = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
TINY_DINOV3 = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_register_tokens=2,
    image_size=32,
    patch_size=8,
)
TINY_FEATURES = TINY_SIGLIP["hidden_size"] + TINY_DINOV3["hidden_size"]  # what a tiny i2L model reads


def tiny_image_encoders(seed: int = 0):
    """(SigLIP, DINOv3): our tiny encoders with random weights."""
    from ..models.image_encoders import (
        DINOv3ImageEncoder,
        DINOv3ImageEncoderConfig,
        SiglipImageEncoder,
        SiglipImageEncoderConfig,
    )
    from .weights import random_weights

    siglip = random_weights(SiglipImageEncoder(SiglipImageEncoderConfig(**TINY_SIGLIP)), seed)
    dinov3 = random_weights(DINOv3ImageEncoder(DINOv3ImageEncoderConfig(**TINY_DINOV3)), seed + 1)
    return siglip.eval(), dinov3.eval()


def write_image_encoders(root, seed: int = 0) -> list[Path]:
    """The tiny encoders as `root/SigLIP2-G384/model.safetensors` and `root/DINOv3-7B/model.safetensors` in the
    released layouts (DINOv3's blocks at `layer.N`), each with a config.json naming its head count (which the
    shapes do not tell). Returns the two files."""
    from safetensors.torch import save_file

    siglip, dinov3 = tiny_image_encoders(seed)
    files = []
    for folder, model, config in (("SigLIP2-G384", siglip, TINY_SIGLIP), ("DINOv3-7B", dinov3, TINY_DINOV3)):
        state = {
            k.removeprefix("model.") if k.startswith("model.layer.") else k: v.contiguous()
            for k, v in model.state_dict().items()
        }
        path = Path(root) / folder / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        (path.parent / "config.json").write_text(json.dumps(config))
        files.append(path)
    return files


__all__ = [
    "STUDIO_MIRROR",
    "TINY_DINOV3",
    "TINY_FEATURES",
    "TINY_SIGLIP",
    "lora_deltas",
    "picture",
    "studio_modules",
    "tiny_image_encoders",
    "without_adapter",
]
