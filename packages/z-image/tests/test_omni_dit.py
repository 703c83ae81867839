"""Z-Image Omni DiT: parity with diffusers' `ZImageTransformer2DModel(siglip_feat_dim=...)` (omni mode), the
full-size keys and shapes on the meta device, and the input checks."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.testing.modules import load_beside
from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

SIGLIP_DIM = 24

# transformer/config.json of Tongyi-MAI/Z-Image-Omni-Base (diffusers), as DiffSynth-Studio builds it
RELEASED_OMNI_CONFIG = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "siglip_feat_dim": 1152,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}


def _test_dit():
    """`tiny_config` and `make_model` live in test_dit.py."""
    return load_beside(__file__, "test_dit.py", "z_image_test_dit")


def omni_config(**overrides) -> ZImageDiTConfig:
    return _test_dit().tiny_config(**{"siglip_feat_dim": SIGLIP_DIM, **overrides})


def omni_inputs(seed: int, caption_lengths, condition_sizes, siglip_sizes, target=(8, 8), with_siglip=True):
    """Per sample: caption segments, condition latents `[4, H, W]`, SigLIP grids `[h, w, SIGLIP_DIM]`."""
    g = torch.Generator().manual_seed(seed)
    b = len(caption_lengths)
    x = torch.randn(b, 4, *target, generator=g)
    t = torch.rand(b, generator=g)
    text = [[torch.randn(n, 32, generator=g) for n in lengths] for lengths in caption_lengths]
    images = [[torch.randn(4, *size, generator=g) for size in condition_sizes[i]] for i in range(b)]
    siglip = [
        [torch.randn(*size, SIGLIP_DIM, generator=g) for size in siglip_sizes[i]] if with_siglip else None
        for i in range(b)
    ]
    return x, t, text, images, siglip


CASES = {
    # one condition image: segments n + 2 = 3
    "one-image": (((7, 40, 5),), ([(8, 8)],), ([(3, 4)],)),
    # two images of other sizes than the target, a SigLIP grid of one row
    "two-images": (((3, 9, 33, 4),), ([(6, 10), (8, 4)],), ([(1, 5), (4, 4)],)),
    # a batch of two whose sequences differ in length (masked), same number of images
    "batch": (((5, 12, 6), (31, 2, 40)), ([(8, 8)], [(10, 6)]), ([(3, 3)], [(2, 5)])),
}


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("diffusers")
    t = _test_dit()
    cfg = omni_config()
    ours = t.make_model(cfg, seed=5).eval()
    reference = load_beside(__file__, "test_dit_parity.py", "z_image_test_dit_parity").reference_dit(cfg)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def _reference(reference, x, t, text, images, siglip):
    """diffusers' omni mode: nested lists of `[C, F, H, W]` latents, the target last; the target's SigLIP slot None."""
    b = x.shape[0]
    latents = [[im.unsqueeze(1) for im in images[i]] + [x[i].unsqueeze(1)] for i in range(b)]
    feats = [None if siglip[i] is None else [*siglip[i], None] for i in range(b)]
    noise = [[0] * len(images[i]) + [1] for i in range(b)]
    out = reference(latents, t, text, siglip_feats=feats, image_noise_mask=noise, return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(CASES))
def test_omni_matches_diffusers(pair, case):
    ours, reference = pair
    lengths, conditions, grids = CASES[case]
    x, t, text, images, siglip = omni_inputs(len(case), lengths, conditions, grids)
    with torch.no_grad():
        got = ours(x, t, text, images=images, siglip=siglip)
        want = _reference(reference, x, t, text, images, siglip)
    assert want.abs().max() > 0.1
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, f"{case}: max abs diff {diff:.3g} vs diffusers"


@pytest.mark.parity
def test_omni_text_to_image_matches_diffusers(pair):
    """No condition image: one caption segment, no SigLIP stream, the omni layout `[caption | image]`."""
    ours, reference = pair
    x, t, text, images, siglip = omni_inputs(3, ((9,), (40,)), ([], []), ([], []), with_siglip=False)
    with torch.no_grad():
        got = ours(x, t, text, images=images, siglip=siglip)
        want = _reference(reference, x, t, text, images, siglip)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_full_size_keys_and_shapes_match_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import ZImageTransformer2DModel

    from diffsynth.z_image.formats import config_from_state

    with torch.device("meta"):
        reference = ZImageTransformer2DModel(**RELEASED_OMNI_CONFIG)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    cfg = config_from_state({k: v for k, v in reference.state_dict().items()}, dict(RELEASED_OMNI_CONFIG))
    assert cfg.siglip_feat_dim == 1152 and cfg.omni
    with torch.device("meta"):
        ours = ZImageDiT(cfg)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want


def test_default_config_is_not_omni_and_has_no_siglip_modules():
    model = ZImageDiT(_test_dit().tiny_config())
    assert not model.config.omni and model.siglip_embedder is None
    assert not any(k.startswith("siglip") for k in model.state_dict())
    assert "siglip_refiner" not in model.offload_units


def test_omni_modules_and_units():
    model = ZImageDiT(omni_config())
    keys = set(model.state_dict())
    assert {"siglip_pad_token", "siglip_embedder.0.weight", "siglip_embedder.1.weight"} <= keys
    assert "siglip_refiner.0.attention.to_q.weight" in keys
    assert "siglip_refiner.0.adaLN_modulation.0.weight" not in keys  # unmodulated, like the context refiner
    assert model.offload_units[-1] == "siglip_refiner" and model.compile_units[-1] == "siglip_refiner"


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_config_rejects_bad_siglip_feat_dim(value):
    with pytest.raises(ValueError, match="siglip_feat_dim"):
        omni_config(siglip_feat_dim=value)


def test_omni_inputs_are_checked():
    model = _test_dit().make_model(omni_config(), seed=1).eval()
    x, t, text, images, siglip = omni_inputs(2, ((7, 4, 5),), ([(8, 8)],), ([(3, 4)],))
    with pytest.raises(ValueError, match="at least one more"):
        model(x, t, [text[0][:1]], images=images, siglip=siglip)
    with pytest.raises(ValueError, match="SigLIP grids"):
        model(x, t, text, images=images, siglip=[[siglip[0][0], siglip[0][0]]])
    with pytest.raises(ValueError, match="siglip_feat_dim=24"):
        model(x, t, text, images=images, siglip=[[torch.zeros(3, 4, 5)]])
    with pytest.raises(ValueError, match="condition image 0"):
        model(x, t, text, images=[[torch.zeros(4, 7, 8)]], siglip=siglip)
    with pytest.raises(ValueError, match="ControlNets"):
        model(x, t, text, [object()], images=images, siglip=siglip)
    plain = _test_dit().make_model(seed=1).eval()
    with pytest.raises(ValueError, match="Omni DiT"):
        plain(x, t, text, images=images, siglip=siglip)
    with torch.no_grad():  # a plain DiT still runs the omni layout without SigLIP, as the reference does
        assert plain(x, t, text, images=images).shape == x.shape
