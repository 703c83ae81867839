"""FID: the Fréchet distance against closed forms, the FID Inception-v3 against its published size and layer shapes
and the FID graph's pooling rules, and FIDMetric end to end against the features and statistics written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.metrics import FIDInceptionV3, FIDMetric, frechet_distance
from diffsynth.runtime.metrics.fid import feature_statistics, frechet_distance_of_features


def random_spd(d: int, rng) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), random_spd(16, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_of_diagonal_gaussians():
    """Commuting covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_2d_gaussians():
    """For 2x2 matrices, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) (M = S1 S2 has positive eigenvalues)."""
    rng = np.random.default_rng(2)
    for _ in range(5):
        s1, s2 = random_spd(2, rng), random_spd(2, rng)
        assert np.abs(s1 @ s2 - s2 @ s1).max() > 1e-3  # really non-commuting
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        m = s1 @ s2
        trace_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_singular_covariances_of_one_set_give_zero():
    """Fewer samples than dimensions (as with a few hundred images in 2048-d): rounding must not leave -1e-5."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(5, 300)) * 3
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


@pytest.mark.parametrize("n1,n2", [(5, 7), (40, 3), (30, 30)])
def test_distance_of_features_equals_distance_of_their_statistics(n1, n2):
    """The low-rank form (N < D) and the covariance form (N >= D) agree with frechet_distance of the statistics."""
    rng = np.random.default_rng(n1 + n2)
    f1, f2 = rng.normal(size=(n1, 12)), rng.normal(1.0, 2.0, size=(n2, 12)) @ rng.normal(size=(12, 12))
    expected = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    got = frechet_distance_of_features(torch.from_numpy(f1), torch.from_numpy(f2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance_of_features(torch.from_numpy(f1), torch.from_numpy(f1))) < 1e-10 * np.abs(f1).sum()


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ConfigError, match="sigma2 has shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_feature_statistics_are_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(7, 5))
    mean, cov = feature_statistics(torch.from_numpy(features))
    np.testing.assert_allclose(mean.numpy(), features.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(features, rowvar=False), atol=1e-12)
    with pytest.raises(ConfigError, match="at least 2 images"):
        feature_statistics(torch.zeros(1, 5))


def test_fid_inception_has_the_published_size_and_names():
    """torchvision's Inception-v3 has 27,161,264 parameters; less the auxiliary head (3,326,696) and the 1000-way
    classifier (2,049,000), the feature network has 21,785,568, in 94 conv + batch-norm units."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    assert sum(p.numel() for p in model.parameters()) == 21_785_568
    state = model.state_dict()
    assert sum(1 for k in state if k.endswith(".conv.weight")) == 94
    assert tuple(state["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["Mixed_5b.branch_pool.conv.weight"].shape) == (32, 192, 1, 1)
    assert tuple(state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape) == (384,)


def random_inception(seed: int) -> FIDInceptionV3:
    """He-initialised convs and random batch-norm statistics, so activations keep their scale through 94 layers."""
    torch.manual_seed(seed)
    model = FIDInceptionV3().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.8, 1.2)
                module.bias.normal_(0, 0.1)
    return model


def test_fid_inception_layer_shapes_and_pools():
    model = random_inception(0)
    seen = {}

    def keep(name):
        return lambda module, args, out: seen.update({name: (args[0], out)})

    for name in ("Mixed_5d", "Mixed_6e", "Mixed_7c", "Mixed_7c.branch_pool"):
        model.get_submodule(name).register_forward_hook(keep(name))
    with torch.no_grad():
        features = model(torch.rand(2, 3, 150, 120, generator=torch.Generator().manual_seed(0)))
    # Inception-v3's grid: 288 x 35 x 35, 768 x 17 x 17, 2048 x 8 x 8 for a 299 input
    assert tuple(seen["Mixed_5d"][1].shape) == (2, 288, 35, 35)
    assert tuple(seen["Mixed_6e"][1].shape) == (2, 768, 17, 17)
    assert tuple(seen["Mixed_7c"][1].shape) == (2, 2048, 8, 8)
    torch.testing.assert_close(features, seen["Mixed_7c"][1].mean(dim=(2, 3)))
    assert features.std() > 0.1  # activations did not vanish: the comparisons below mean something
    # Mixed_7c pools with a 3x3 max (padding never wins): written out with unfold over a -inf border
    x = seen["Mixed_7c"][0]
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)
    torch.testing.assert_close(seen["Mixed_7c.branch_pool"][0], windows.amax(dim=(-1, -2)))


def test_fid_average_pools_do_not_count_padding():
    """A constant input stays constant through the FID graph's average pools, borders included."""
    model = random_inception(1)
    seen = {}
    for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
        model.get_submodule(name + ".branch_pool").register_forward_hook(
            lambda module, args, out, name=name: seen.update({name: args[0]})
        )
    with torch.no_grad():
        model.Mixed_5b(torch.full((1, 192, 6, 6), 0.7))
        model.Mixed_6b(torch.full((1, 768, 5, 5), 0.7))
        model.Mixed_7b(torch.full((1, 1280, 4, 4), 0.7))
    for name, pooled in seen.items():
        torch.testing.assert_close(pooled, torch.full_like(pooled, 0.7), msg=name)


def save_fid_file(model: FIDInceptionV3, path, *, with_counters: bool = False) -> None:
    """The FID weights file's layout: torchvision names plus the 1008-way classifier."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not with_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    save_file(state, str(path))


def write_images(folder, seed: int, sizes) -> list[Image.Image]:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    pictures = []
    for i, (h, w) in enumerate(sizes):
        picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        picture.save(folder / f"{i:02d}.png")
        pictures.append(picture)
    return pictures


def test_fid_metric_equals_the_written_out_computation(tmp_path):
    model = random_inception(2)
    save_fid_file(model, tmp_path / "model.safetensors")
    metric = FIDMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), device="cpu", batch_size=2)
    reference = write_images(tmp_path / "reference", 10, [(64, 64), (48, 80), (299, 299)])
    generated = write_images(tmp_path / "generated", 11, [(40, 40), (70, 50)])

    def features(pictures):  # pytorch-fid's preprocessing: ToTensor, bilinear 299, [-1, 1]
        rows = []
        for picture in pictures:
            x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            rows.append(model(x).double())  # the model's own resize is then a no-op
        return torch.cat(rows).numpy()

    with torch.no_grad():
        ref, gen = features(reference), features(generated)
    # FID written out with numpy: traces of np.cov, and tr sqrt(S1 S2) as the singular values of A1 A2^T
    a1 = (ref - ref.mean(0)) / np.sqrt(len(ref) - 1)
    a2 = (gen - gen.mean(0)) / np.sqrt(len(gen) - 1)
    trace_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    cov1, cov2 = np.cov(ref, rowvar=False), np.cov(gen, rowvar=False)
    expected = np.sum((ref.mean(0) - gen.mean(0)) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt
    score = metric.compute(str(tmp_path / "reference"), str(tmp_path / "generated"))
    assert isinstance(score, float) and expected > 1.0
    assert score == pytest.approx(expected, rel=1e-6)
    same = metric.compute(reference, str(tmp_path / "reference"))  # PIL images vs their files: one set
    assert abs(same) < 1e-6 * expected


def test_fid_metric_reads_files_with_counters_and_refuses_other_layouts(tmp_path):
    model = random_inception(3)
    save_fid_file(model, tmp_path / "counters.safetensors", with_counters=True)
    FIDMetric.from_pretrained(model_config=str(tmp_path / "counters.safetensors"), device="cpu")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)  # the ImageNet model, not the FID one
    save_file(state, str(tmp_path / "imagenet.safetensors"))
    with pytest.raises(CheckpointError, match="AuxLogits.conv0.conv.weight"):
        FIDMetric.from_pretrained(model_config=str(tmp_path / "imagenet.safetensors"), device="cpu")


def test_fid_metric_refuses_missing_and_empty_folders(tmp_path):
    model = random_inception(4)
    save_fid_file(model, tmp_path / "model.safetensors")
    metric = FIDMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="reference_images: no images"):
        metric.compute(str(tmp_path / "empty"), str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="generated_images: .* does not exist"):
        metric.compute([Image.new("RGB", (8, 8))] * 2, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="generated_images has 1 image"):
        metric.compute([Image.new("RGB", (8, 8))] * 2, [Image.new("RGB", (8, 8))])


def test_score_command_prints_the_fid(tmp_path, capsys):
    from diffsynth.runtime.cli import main

    save_fid_file(random_inception(5), tmp_path / "model.safetensors")
    write_images(tmp_path / "a", 12, [(32, 32), (40, 30)])
    write_images(tmp_path / "b", 13, [(30, 40), (32, 32)])
    metric = FIDMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), device="cpu")
    expected = metric.compute(str(tmp_path / "a"), str(tmp_path / "b"))
    model = ["--model-path", str(tmp_path / "model.safetensors"), "--device", "cpu"]
    assert main(["score", "--metric", "fid", *model, str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(expected, abs=1e-6)
    assert main(["score", "--metric", "fid", *model, str(tmp_path / "a")]) == 2
    assert "takes two folders" in capsys.readouterr().err


def test_fid_refuses_a_batch_size_below_one_per_call(tmp_path):
    torch.manual_seed(0)
    save_fid_file(random_inception(5), tmp_path / "model.safetensors")
    write_images(tmp_path / "a", 12, [(32, 32), (40, 30)])
    metric = FIDMetric.from_pretrained(model_config=str(tmp_path / "model.safetensors"), device="cpu")
    with pytest.raises(ConfigError, match="batch_size=-1"):
        metric.features(str(tmp_path / "a"), batch_size=-1)
    with pytest.raises(ConfigError, match="batch_size=0"):
        metric.features(str(tmp_path / "a"), batch_size=0)
