"""LPIPS: parity with the PyPI `lpips` package (random trunks, its bundled linear heads), DiffSynth-Studio's file
layout (their registered key/shape hash), and the invariants of a distance (0 on itself, symmetric, paired folders
averaged by stem), with clear errors for unpaired folders and wrong files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.metrics import LPIPSMetric
from diffsynth.runtime.metrics.lpips import LPIPSModel, lpips_input, resize_center_crop

# DiffSynth-Studio's `model_hash` of LPIPS/{alexnet,vgg,squeezenet}.safetensors: md5 of the sorted "key:shape" + key list
DIFFSYNTH_HASHES = {
    "alex": "08a75c660c9b2e775c530a0955857f1f",
    "vgg": "5740953aaa8aba2ecd9b9c23da813591",
    "squeeze": "ff994b70a30599287a332105396d5004",
}


def keys_hash(shapes: dict[str, tuple]) -> str:
    entries = [f"{k}:{'_'.join(map(str, s))}" for k, s in shapes.items()] + list(shapes)
    return hashlib.md5(",".join(sorted(entries)).encode()).hexdigest()


def picture(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def random_state(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = LPIPSModel(net).state_dict()
    # positive heads, as trained LPIPS heads are, so distances are positive
    return {k: (v.abs() if k.startswith("lin") else v).contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "alexnet.safetensors"
    save_file(random_state("alex"), str(path))
    return path


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_layout_is_diffsynth_studios_file(net):
    """Our module's keys and shapes are exactly those DiffSynth-Studio recognises its released file by."""
    with torch.device("meta"):
        model = LPIPSModel(net)
    assert keys_hash({k: tuple(v.shape) for k, v in model.state_dict().items()}) == DIFFSYNTH_HASHES[net]


def test_identical_images_give_zero_and_distance_is_symmetric(alex_file):
    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu")
    a, b = picture(1), picture(2)
    assert metric.compute(a, a) == 0.0
    ab, ba = metric.compute(a, b), metric.compute(b, a)
    assert ab > 1e-4
    assert abs(ab - ba) < 1e-7


def test_folders_pair_by_stem_and_average(tmp_path, alex_file):
    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu", batch_size=1)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    images = {stem: (picture(i), picture(10 + i)) for i, stem in enumerate(["x", "y", "z"])}
    for stem, (a, b) in images.items():
        a.save(first / f"{stem}.png")
        b.save(second / f"{stem}.bmp")  # another suffix: pairing is by stem
    (second / "notes.txt").write_text("not an image")
    expected = np.mean([metric.compute(a, b) for a, b in images.values()])
    assert abs(metric.compute(first, second) - expected) < 1e-7
    # swapping two partners changes the mean: the pairing is by stem, not by listing order
    (second / "x.bmp").rename(second / "tmp.bmp"), (second / "y.bmp").rename(second / "x.bmp")
    (second / "tmp.bmp").rename(second / "y.bmp")
    assert abs(metric.compute(first, second) - expected) > 1e-5


def test_unpaired_empty_and_mixed_inputs_are_refused(tmp_path, alex_file):
    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu")
    first, second, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    for folder in (first, second, empty):
        folder.mkdir()
    for stem in ("x", "y"):
        picture(0).save(first / f"{stem}.png")
    picture(0).save(second / "x.png")
    picture(0).save(second / "w.png")
    with pytest.raises(ConfigError, match=r"only in .*a: \['y'\]; only in .*b: \['w'\]"):
        metric.compute(first, second)
    with pytest.raises(ConfigError, match="no images"):
        metric.compute(first, empty)
    with pytest.raises(ConfigError, match="two images or two folders"):
        metric.compute(first, first / "x.png")
    with pytest.raises(ConfigError, match="does not exist"):
        metric.compute(first / "x.png", first / "missing.png")
    picture(0).save(first / "x.jpg")
    with pytest.raises(ConfigError, match="share the stem 'x'"):
        metric.compute(first, second)


def test_different_sizes_are_resized_and_centre_cropped(alex_file):
    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu", target_size=32)
    a, b = picture(1, (64, 48)), picture(2, (40, 40))
    # 64x48 -> shorter side 32: 42x32, then the centre 32x32 starts at x = round(5.0) = 5
    cropped = a.resize((42, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    assert np.array_equal(np.asarray(resize_center_crop(a, 32)), np.asarray(cropped))
    with torch.no_grad():
        expected = metric.model(lpips_input(a, 32)[None], lpips_input(b, 32)[None]).item()
    assert abs(metric.compute(a, b) - expected) < 1e-7
    with pytest.raises(ConfigError, match="different sizes"):
        LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu", target_size=None).compute(a, b)


def test_strict_loading_names_the_key(tmp_path):
    state = random_state("alex")
    renamed = dict(state)
    renamed["lin0.model.2.weight"] = renamed.pop("lin0.model.1.weight")
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 'lin0.model.1.weight'; unexpected 'lin0.model.2.weight'"):
        LPIPSMetric.from_pretrained(model_config=tmp_path / "renamed.safetensors", device="cpu")
    state["net.slice2.3.weight"] = torch.zeros(192, 64, 3, 3)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"net.slice2.3.weight has shape \(192, 64, 3, 3\).*\(192, 64, 5, 5\)"):
        LPIPSMetric.from_pretrained(model_config=tmp_path / "shape.safetensors", device="cpu")
    save_file({"unknown.weight": torch.zeros(1)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointError, match="'unknown.weight'"):
        LPIPSMetric.from_pretrained(model_config=tmp_path / "unknown.safetensors", device="cpu")
    with pytest.raises(ConfigError, match="net='resnet'"):
        LPIPSMetric.from_pretrained(net="resnet", model_config=tmp_path / "unknown.safetensors")


# ------------------------------------------------------------------ parity with the lpips package
@pytest.mark.parity
@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_parity_with_lpips_package(tmp_path, net):
    lpips = pytest.importorskip("lpips")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    # pnet_rand: a random trunk (nothing downloads); pretrained: the package's bundled linear heads
    reference = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    path = tmp_path / "lpips.safetensors"
    save_file({k: v.clone() for k, v in reference.state_dict().items()}, str(path))  # with its lins.* too
    metric = LPIPSMetric.from_pretrained(net=net, model_config=path, device="cpu", target_size=48)
    x0, x1 = torch.rand(2, 3, 64, 56) * 2 - 1, torch.rand(2, 3, 64, 56) * 2 - 1
    with torch.no_grad():
        assert (metric.model(x0, x1) - reference(x0, x1).reshape(-1)).abs().max() < 1e-6
    # whole images, same size: ToTensor, then lpips' [0, 1] -> [-1, 1]
    a, b = picture(1), picture(2)
    to_tensor = torchvision.transforms.ToTensor()
    with torch.no_grad():
        expected = reference(to_tensor(a)[None], to_tensor(b)[None], normalize=True).item()
    assert abs(metric.compute(a, b) - expected) < 1e-6
    # different sizes: DiffSynth-Studio's torchvision Resize(BICUBIC) + CenterCrop
    c = picture(3, (70, 52))
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(48, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
            torchvision.transforms.CenterCrop(48),
            torchvision.transforms.ToTensor(),
        ]
    )
    with torch.no_grad():
        expected = reference(transform(a)[None], transform(c)[None], normalize=True).item()
    assert abs(metric.compute(a, c) - expected) < 1e-6


def test_score_command_prints_the_distance(tmp_path, alex_file, capsys):
    from diffsynth.runtime.cli import main

    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    picture(1).save(a), picture(2).save(b)
    model = ["--model-path", str(alex_file), "--device", "cpu"]
    assert main(["score", "--metric", "lpips", *model, "--json", str(a), str(b)]) == 0
    assert abs(json.loads(capsys.readouterr().out)["lpips"] - metric.compute(a, b)) < 1e-7
    assert main(["score", "--metric", "lpips", *model, str(a)]) == 2
    assert "takes two images or two folders" in capsys.readouterr().err
    assert main(["score", "--metric", "lpips", *model, "--lpips-net", "vgg", str(a), str(b)]) == 2
    assert "do not fit LPIPSModel" in capsys.readouterr().err  # an AlexNet file is not a VGG one
    assert main(["score", "--metric", "aesthetic", "--target-size", "64", str(a)]) == 2
    assert "takes no --target-size" in capsys.readouterr().err


def test_a_photo_stored_sideways_is_compared_upright(tmp_path, alex_file):
    """Two files of one header size, one a JPEG stored sideways with an EXIF orientation: they are compared as the
    pictures they show (resized as two sizes), exactly as the upright pictures given directly."""
    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu", target_size=48)
    upright = picture(3, size=(40, 48))  # a portrait
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 48 x 40, turned back by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "portrait.jpg", exif=exif, quality=100)
    picture(4).save(tmp_path / "landscape.png")  # 48 x 40 as stored
    from diffsynth.runtime.media import load_image

    shown = load_image(tmp_path / "portrait.jpg")
    assert shown.size == (40, 48)
    score = metric.compute(tmp_path / "portrait.jpg", tmp_path / "landscape.png")
    assert abs(score - metric.compute(shown, picture(4))) < 1e-7


def test_a_file_that_is_no_image_is_a_config_error_naming_it(tmp_path, alex_file, capsys):
    from diffsynth.runtime.cli import main

    picture(1).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    metric = LPIPSMetric.from_pretrained(model_config=alex_file, device="cpu")
    with pytest.raises(ConfigError, match=r"notes\.txt is not an image PIL can read"):
        metric.compute(tmp_path / "a.png", tmp_path / "notes.txt")
    model = ["--model-path", str(alex_file), "--device", "cpu"]
    assert main(["score", "--metric", "lpips", *model, str(tmp_path / "a.png"), str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is not an image PIL can read" in capsys.readouterr().err
