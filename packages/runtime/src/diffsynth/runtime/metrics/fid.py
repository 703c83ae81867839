"""FID: the Fréchet distance between Gaussians fitted to Inception pool features of two image sets.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) (Heusel et al. 2017). Features follow pytorch-fid:
each image as RGB in [0, 1], resized to 299x299 bilinearly (align_corners=False), scaled to [-1, 1], through the
FID Inception-v3 (`inception.FIDInceptionV3`). `resize="bicubic"` resizes as DiffSynth-Studio does instead
(torchvision's `Resize(BICUBIC)` on the PIL image: PIL's bicubic on the 8-bit values, antialiased when shrinking),
to reproduce its numbers; bilinear stays the default because it is pytorch-fid's, whose FIDs papers report and
which every score computed here so far used (the two differ by a few tenths on typical sets, so scores computed
with different resizes must not be compared). Statistics are float64; the covariance is unbiased (N - 1), as
`numpy.cov`. tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
symmetric positive semi-definite matrix, so no complex parts or scipy are involved; with fewer images than the 2048
feature dimensions it is the nuclear norm of a small N1 x N2 matrix (`frechet_distance_of_features`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint import folder_listing
from ..errors import ConfigError
from ..hub import ModelConfig
from ..media import IMAGE_SUFFIXES, load_image
from .base import (
    Metric,
    build_on_meta,
    check_batch_size,
    convert_keys,
    default_config,
    load_strict,
    pick_device,
    read_state_dict,
    resolve_files,
)
from .inception import FID_IMAGE_SIZE, FIDInceptionV3, resize_for_fid

# the FID weights file holds torchvision's names; its 1008-way classifier is not used for features
FID_RULES = (("fc.", None), ("Conv2d_", "Conv2d_"), ("Mixed_", "Mixed_"))


def image_files(path: str | os.PathLike, what: str) -> list[str]:
    """The image files under a folder (recursively, sorted), or the file itself."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} does not exist; {folder_listing(path.parent)}")
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) under {path}; {folder_listing(path)}")
    return files


def _as_inputs(images, what: str) -> list:
    if isinstance(images, (str, os.PathLike)):
        return image_files(images, what)
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ConfigError(f"{what} must be a folder, an image path, a PIL.Image, or a list of them")


RESIZE_MODES = ("bilinear", "bicubic")


def check_resize(resize) -> str:
    """`resize` if it is one of `RESIZE_MODES`, else an error saying what each means."""
    if resize not in RESIZE_MODES:
        raise ConfigError(
            f"FID resize={resize!r} must be one of {RESIZE_MODES}: 'bilinear' (pytorch-fid's, the default) or "
            "'bicubic' (DiffSynth-Studio's)"
        )
    return resize


def fid_input(image, resize: str = "bilinear") -> torch.Tensor:
    """One image (PIL or path) as the FID Inception's [1, 3, 299, 299] input in [0, 1]: pytorch-fid's bilinear
    resize of the float tensor, or DiffSynth-Studio's PIL bicubic resize of the 8-bit image before it."""
    if check_resize(resize) == "bicubic":
        size = (FID_IMAGE_SIZE, FID_IMAGE_SIZE)
        return _to_tensor(load_image(image).resize(size, Image.Resampling.BICUBIC))
    return resize_for_fid(_to_tensor(image))


def _to_tensor(image) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1] from a PIL image or path (torchvision's ToTensor)."""
    array = np.asarray(load_image(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _psd_eigenvalues(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with rounding noise removed: those below numpy's rank tolerance become 0.

    Covariances of fewer images than feature dimensions are singular; the square roots of their ~1e-16 noise
    eigenvalues would otherwise add up over 2048 dimensions (making identical sets score about -1e-5, not 0).
    """
    tolerance = values.abs().max() * values.shape[0] * torch.finfo(values.dtype).eps
    return torch.where(values > tolerance, values, torch.zeros_like(values))


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * _psd_eigenvalues(values).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy arrays or tensors), in float64."""
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    for name, value in (("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        expected = (d,) if name == "mu2" else (d, d)
        if tuple(value.shape) != expected:
            raise ConfigError(f"{name} has shape {tuple(value.shape)}; expected {expected} to match mu1 ({d},)")
    root = _sqrt_psd(sigma1)
    inner = root @ sigma2 @ root
    trace_sqrt = _psd_eigenvalues(torch.linalg.eigvalsh((inner + inner.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def frechet_distance_of_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """The Fréchet distance of the Gaussians fitted to two [N, D] feature sets, exact and cheap when N < D.

    With S = A^T A (A: centred features / sqrt(N - 1)), the non-zero eigenvalues of S1 S2 are those of
    (A1 A2^T)(A1 A2^T)^T, so tr((S1 S2)^(1/2)) is the sum of the singular values of the small A1 A2^T, and
    tr(S) = |A|^2: no D x D matrix is formed. With more images than dimensions the covariances are used instead.
    """
    if features1.shape[0] >= features1.shape[1] or features2.shape[0] >= features2.shape[1]:
        (mu1, sigma1), (mu2, sigma2) = feature_statistics(features1), feature_statistics(features2)
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    a1, a2 = (_scaled_centred(f) for f in (features1, features2))
    diff = features1.double().mean(0) - features2.double().mean(0)
    nuclear = torch.linalg.svdvals(a1 @ a2.T).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear)


def _scaled_centred(features: torch.Tensor) -> torch.Tensor:
    """(features - mean) / sqrt(N - 1) in float64, so that its Gram matrix A^T A is the unbiased covariance."""
    features = features.to(torch.float64)
    if features.shape[0] < 2:
        raise ConfigError(f"FID needs at least 2 images per set to estimate a covariance, got {features.shape[0]}")
    return (features - features.mean(dim=0)) / (features.shape[0] - 1) ** 0.5


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of [N, D] features; N >= 2."""
    scaled = _scaled_centred(features)
    return features.to(torch.float64).mean(dim=0), scaled.T @ scaled


class FIDMetric(Metric):
    """FID between a reference image set and a generated one (lower is closer)."""

    def __init__(self, model: FIDInceptionV3, batch_size: int = 16, resize: str = "bilinear"):
        super().__init__()
        self.model = model
        self.batch_size = check_batch_size(batch_size)
        self.resize = check_resize(resize)

    @classmethod
    def from_pretrained(
        cls,
        model_config: ModelConfig | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        resize: str = "bilinear",
    ):
        """Load the FID Inception weights (DiffSynth-Studio's `FID/model.safetensors` by default); float32.
        `resize`: "bilinear" (pytorch-fid's) or "bicubic" (DiffSynth-Studio's), see the module docstring."""
        check_resize(resize)
        check_batch_size(batch_size)
        files = resolve_files(model_config or default_config("FID/model.safetensors"), "model_config")
        label = ", ".join(files)
        state = read_state_dict(files)
        if state and all(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items()}
        state = convert_keys(state, FID_RULES, label)
        model = build_on_meta(FIDInceptionV3)
        for key, value in model.state_dict().items():  # older files carry no BatchNorm step counters
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros((), dtype=value.dtype)
        load_strict(model, state, label)
        return cls(model, batch_size=batch_size, resize=resize)._ready(pick_device(device), torch.float32)

    @torch.no_grad()
    def features(self, images, batch_size: int | None = None, what: str = "images") -> torch.Tensor:
        """[N, 2048] pool features (float64, on the CPU) of a folder, a path, an image or a list of them."""
        inputs = _as_inputs(images, what)
        if not inputs:
            raise ConfigError(f"{what} is empty: give at least 2 images")
        size = self.batch_size if batch_size is None else check_batch_size(batch_size)
        out = []
        for start in range(0, len(inputs), size):
            # resized one by one, so a batch may mix sizes; the model's own resize is then the identity
            batch = [fid_input(image, self.resize) for image in inputs[start : start + size]]
            out.append(self.model(torch.cat(batch).to(self.device)).to("cpu", torch.float64))
        return torch.cat(out)

    def statistics(self, images, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the features of an image set (float64), to cache a reference set's statistics."""
        return feature_statistics(self.features(images, batch_size))

    @torch.no_grad()
    def compute(self, reference_images, generated_images, batch_size: int | None = None) -> float:
        """FID between two image sets: folders (searched recursively), image paths or PIL images (>= 2 each)."""
        reference = self.features(reference_images, batch_size, "reference_images")
        generated = self.features(generated_images, batch_size, "generated_images")
        for name, features in (("reference_images", reference), ("generated_images", generated)):
            if features.shape[0] < 2:
                raise ConfigError(f"{name} has {features.shape[0]} image; FID needs at least 2 per set")
        return frechet_distance_of_features(reference, generated)

    def forward(self, reference_images, generated_images) -> float:
        return self.compute(reference_images, generated_images)
