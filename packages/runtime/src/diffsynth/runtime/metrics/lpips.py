"""LPIPS (Zhang et al. 2018): a learned perceptual distance between two images (0 for identical, larger = further).

Both images, RGB in [-1, 1], go through LPIPS's scaling layer (`(x - shift) / scale`) and a feature network
(AlexNet, VGG-16 or SqueezeNet-1.1 convolutions, cut into the LPIPS package's slices). At each slice output the
features are unit-normalised along channels, the squared difference is weighted by a 1x1 convolution without bias
(`linK`), averaged over space, and the slice values are summed. The networks are written here in plain torch with
torchvision's layer indices, so the files of the PyPI `lpips` package and DiffSynth-Studio's
`LPIPS/{alexnet,vgg,squeezenet}.safetensors` (the `lpips.LPIPS` state dict without its duplicate `lins.*` names:
`scaling_layer.shift/scale`, `net.slice<i>.<torchvision index>.*`, `lin<i>.model.1.weight`) load by name.

`compute(a, b)` takes two images (paths or PIL) or two folders paired by file stem (the mean over the pairs).
As in DiffSynth-Studio, when the sizes differ every image is resized bicubically (shorter side to `target_size`)
and centre-cropped to `target_size` squared; with `target_size=None` differing sizes are an error instead. Unlike
DiffSynth-Studio, which drops unpaired files silently, a stem found in only one folder is an error.
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

DEFAULT_FILES = {
    "alex": "LPIPS/alexnet.safetensors",
    "vgg": "LPIPS/vgg.safetensors",
    "squeeze": "LPIPS/squeezenet.safetensors",
}
NETS = tuple(DEFAULT_FILES)
# the lpips package's state dict names every head twice (`lin<i>` and the ModuleList `lins.<i>`); files keep lin<i>
LPIPS_RULES = (("lins.", None), ("scaling_layer.", "scaling_layer."), ("net.", "net."), ("lin", "lin"))

# Feature networks as data: torchvision `features` layers by index, and where the LPIPS slices end.
# ("conv", in, out, kernel, stride, padding) | ("pool", kernel, stride, ceil_mode) | ("relu",) | ("fire", in, sq, e1, e3)
_VGG16 = []
for _width_in, _width, _convs in ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)):
    if _VGG16:
        _VGG16.append(("pool", 2, 2, False))
    for _i in range(_convs):
        _VGG16 += [("conv", _width_in if _i == 0 else _width, _width, 3, 1, 1), ("relu",)]
NETWORKS = {
    "alex": {
        "layers": [
            ("conv", 3, 64, 11, 4, 2),
            ("relu",),
            ("pool", 3, 2, False),
            ("conv", 64, 192, 5, 1, 2),
            ("relu",),
            ("pool", 3, 2, False),
            ("conv", 192, 384, 3, 1, 1),
            ("relu",),
            ("conv", 384, 256, 3, 1, 1),
            ("relu",),
            ("conv", 256, 256, 3, 1, 1),
            ("relu",),
        ],  # fmt: skip
        "slice_ends": (2, 5, 8, 10, 12),
        "channels": (64, 192, 384, 256, 256),
    },
    "vgg": {"layers": _VGG16, "slice_ends": (4, 9, 16, 23, 30), "channels": (64, 128, 256, 512, 512)},
    "squeeze": {
        "layers": [
            ("conv", 3, 64, 3, 2, 0),
            ("relu",),
            ("pool", 3, 2, True),
            ("fire", 64, 16, 64, 64),
            ("fire", 128, 16, 64, 64),
            ("pool", 3, 2, True),
            ("fire", 128, 32, 128, 128),
            ("fire", 256, 32, 128, 128),
            ("pool", 3, 2, True),
            ("fire", 256, 48, 192, 192),
            ("fire", 384, 48, 192, 192),
            ("fire", 384, 64, 256, 256),
            ("fire", 512, 64, 256, 256),
        ],  # fmt: skip
        "slice_ends": (2, 5, 8, 10, 11, 12, 13),
        "channels": (64, 128, 256, 384, 384, 512, 512),
    },
}


def check_net(net) -> str:
    if net not in NETWORKS:
        raise ConfigError(f"LPIPS net={net!r} is not one of {NETS}")
    return net


class Fire(torch.nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expansions concatenated (torchvision's names)."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = torch.nn.Conv2d(inplanes, squeeze, 1)
        self.expand1x1 = torch.nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = torch.nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], dim=1)


def _layer(spec: tuple) -> torch.nn.Module:
    kind, *args = spec
    if kind == "conv":
        c_in, c_out, kernel, stride, padding = args
        return torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    if kind == "pool":
        kernel, stride, ceil_mode = args
        return torch.nn.MaxPool2d(kernel, stride=stride, ceil_mode=ceil_mode)
    if kind == "fire":
        return Fire(*args)
    return torch.nn.ReLU()


class LPIPSFeatures(torch.nn.Module):
    """The feature network cut into slices `slice1..sliceN`; `forward` returns every slice's output."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        spec = NETWORKS[check_net(net)]
        start = 0
        for number, end in enumerate(spec["slice_ends"], start=1):
            block = torch.nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), _layer(spec["layers"][index]))
            self.add_module(f"slice{number}", block)
            start = end
        self.num_slices = len(spec["slice_ends"])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, self.num_slices + 1):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class ScalingLayer(torch.nn.Module):
    """LPIPS v0.1's input scaling: [-1, 1] images to roughly ImageNet-normalised ones (constants are in the file)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LinearHead(torch.nn.Module):
    """A 1x1 convolution to one channel; `model.0` is the (training-only) dropout, so the weight is `model.1`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Features divided by their channel L2 norm (+ eps, as LPIPS, so zero features stay zero)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPSModel(torch.nn.Module):
    """The LPIPS distance of two [N, 3, H, W] batches in [-1, 1]: one value per pair, shape [N]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net_name = check_net(net)
        self.scaling_layer = ScalingLayer()
        self.net = LPIPSFeatures(net)
        for index, channels in enumerate(NETWORKS[net]["channels"]):
            self.add_module(f"lin{index}", LinearHead(channels))

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        feats0 = self.net(self.scaling_layer(in0))
        feats1 = self.net(self.scaling_layer(in1))
        total = 0
        for index, (f0, f1) in enumerate(zip(feats0, feats1, strict=True)):
            diff = (unit_normalize(f0) - unit_normalize(f1)) ** 2
            total = total + getattr(self, f"lin{index}")(diff).mean(dim=(2, 3))
        return total.reshape(-1)


# ------------------------------------------------------------------ images in
def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(size, BICUBIC)` then `CenterCrop(size)` on a PIL image, without torchvision:
    the shorter side becomes `size` (the longer one `int(size * long / short)`), then the centre square is cut."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != (width, height):
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [0, 1] from an RGB PIL image (torchvision's `ToTensor`)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def lpips_input(image: Image.Image, target_size: int | None) -> torch.Tensor:
    """[3, H, W] in [-1, 1], resized and centre-cropped to `target_size` first when one is given."""
    if target_size is not None:
        image = resize_center_crop(image, target_size)
    return to_unit_tensor(image) * 2.0 - 1.0


def list_images(folder: Path, what: str) -> dict[str, Path]:
    """The images directly in `folder`, by file stem; two files with one stem are ambiguous and refused."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; {folder_listing(folder)}")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise ConfigError(
                f"{what}: {by_stem[path.stem].name} and {path.name} in {folder} share the stem {path.stem!r}"
            )
        by_stem[path.stem] = path
    return by_stem


def pair_folders(folder_a, folder_b) -> list[tuple[Path, Path]]:
    """(a, b) image paths paired by file stem, sorted; a stem in only one folder is an error naming it."""
    a, b = list_images(Path(folder_a), "image_a"), list_images(Path(folder_b), "image_b")
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ConfigError(
            f"LPIPS pairs images by file stem, and some have no partner: only in {folder_a}: {only_a[:5]}"
            f"{' ...' if len(only_a) > 5 else ''}; only in {folder_b}: {only_b[:5]}{' ...' if len(only_b) > 5 else ''}"
        )
    return [(a[stem], b[stem]) for stem in sorted(a)]


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an image file once upright (its header only: `load_image` turns EXIF-rotated
    photos upright)."""
    from ..media import upright_size

    if isinstance(image, Image.Image):
        return upright_size(image)
    try:
        opened = Image.open(image)
    except OSError:  # not an image (UnidentifiedImageError is one) or damaged: load_image's error names the file
        load_image(image)
        raise
    with opened:
        return upright_size(opened)


def _kind(value, what: str) -> str:
    if isinstance(value, Image.Image):
        return "image"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if path.is_dir():
            return "folder"
        if path.is_file():
            return "image"
        raise ConfigError(f"{what}: {path} does not exist; {folder_listing(path.parent)}")
    raise ConfigError(f"{what} must be an image path, a PIL.Image or a folder, got {type(value).__name__}")


class LPIPSMetric(Metric):
    """LPIPS distance between two images, or the mean over two folders' images paired by file stem."""

    def __init__(self, model: LPIPSModel, batch_size: int = 16, target_size: int | None = 512):
        super().__init__()
        if target_size is not None and (not isinstance(target_size, int) or target_size < 1):
            raise ConfigError(f"target_size={target_size!r} must be a positive int (pixels), or None for no resize")
        self.model = model
        self.batch_size = check_batch_size(batch_size)
        self.target_size = target_size

    @classmethod
    def from_pretrained(
        cls,
        net: str = "alex",
        model_config: ModelConfig | str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        target_size: int | None = 512,
    ):
        """Load one LPIPS file (DiffSynth-Studio's `LPIPS/alexnet.safetensors` for net="alex", `vgg.safetensors`,
        `squeezenet.safetensors`); float32, as theirs."""
        check_net(net)
        check_batch_size(batch_size)
        files = resolve_files(model_config or default_config(DEFAULT_FILES[net]), "model_config")
        label = ", ".join(files)
        state = convert_keys(read_state_dict(files), LPIPS_RULES, label)
        model = build_on_meta(lambda: LPIPSModel(net))
        load_strict(model, state, f"{label} (LPIPS net={net!r})")
        return cls(model, batch_size=batch_size, target_size=target_size)._ready(pick_device(device), torch.float32)

    def _size_for(self, sizes: set[tuple[int, int]], what: str) -> int | None:
        """None when every image has one size (no resize, as DiffSynth-Studio), else `target_size`."""
        if len(sizes) == 1:
            return None
        if self.target_size is None:
            raise ConfigError(
                f"{what} have different sizes {sorted(sizes)[:4]} and target_size=None; give a target_size to "
                "resize and centre-crop them"
            )
        return self.target_size

    @torch.no_grad()
    def distances(self, pairs: list[tuple], what: str = "images") -> list[float]:
        """One LPIPS distance per (a, b) pair of paths or PIL images; files are read a batch at a time."""
        size = self._size_for({_image_size(image) for pair in pairs for image in pair}, what)
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            x0 = torch.stack([lpips_input(load_image(a), size) for a, _ in chunk]).to(self.device)
            x1 = torch.stack([lpips_input(load_image(b), size) for _, b in chunk]).to(self.device)
            out.append(self.model(x0, x1).float().cpu())
        return self.tensor_to_list(torch.cat(out))

    def compute(self, image_a, image_b) -> float:
        """LPIPS of two images (paths or PIL), or the mean LPIPS of two folders' images paired by stem."""
        kind_a, kind_b = _kind(image_a, "image_a"), _kind(image_b, "image_b")
        if kind_a != kind_b:
            raise ConfigError(f"LPIPS compares two images or two folders; got an {kind_a} and a {kind_b}")
        if kind_a == "folder":
            scores = self.distances(pair_folders(image_a, image_b), "the folders' images")
            return float(sum(scores) / len(scores))
        return self.distances([(image_a, image_b)], "image_a and image_b")[0]

    def forward(self, image_a, image_b) -> float:
        return self.compute(image_a, image_b)
