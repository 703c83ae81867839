"""AutoencoderKL against diffusers: same weights, same numbers; our LDM conversion equals theirs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.models.autoencoder_kl import AutoencoderKL
from diffsynth.runtime.models.autoencoder_kl_formats import ldm_to_ours

pytestmark = pytest.mark.parity
KEYS = Path(__file__).parent / "data" / "keys"


def _tiny_config(**overrides):
    """`tiny_config` of test_autoencoder_kl.py (its one home), loaded by path: test dirs are not packages."""
    spec = importlib.util.spec_from_file_location(
        "_autoencoder_kl_tests", Path(__file__).with_name("test_autoencoder_kl.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_config(**overrides)


def _diffusers_model(config):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    n = len(config.block_out_channels)
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_block_add_attention,
    ).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1 normalisation
        dict(scaling_factor=0.18215, shift_factor=0.0, use_quant_conv=True, use_post_quant_conv=True),  # SD-style
        dict(mid_block_add_attention=False),
    ],
)
def test_matches_diffusers(overrides):
    pytest.importorskip("diffusers")
    config = _tiny_config(**overrides)
    torch.manual_seed(0)
    theirs = _diffusers_model(config)
    with torch.no_grad():  # random norms and biases too, so every parameter matters
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    scale, shift = config.scaling_factor, config.shift_factor
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = theirs.encode(image).latent_dist
        expected = (posterior.mode() - shift) * scale
        latents = ours.encode(image)
        assert (latents - expected).abs().max().item() <= 1e-5

        sampled = (posterior.sample(generator=torch.Generator().manual_seed(2)) - shift) * scale
        ours_sampled = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(2))
        assert (ours_sampled - sampled).abs().max().item() <= 1e-5

        decoded = theirs.decode(expected / scale + shift).sample
        assert (ours.decode(expected) - decoded).abs().max().item() <= 1e-5


def _ldm_state(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict in the original LDM layout, written from the LDM architecture
    (`ch`, `ch_mult`, `num_res_blocks`; decoder `up.N` counted from the full-resolution stage)."""
    state: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k=3):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=generator)
        state[f"{name}.bias"] = torch.randn(cout, generator=generator)

    def norm(name, c):
        state[f"{name}.weight"] = torch.randn(c, generator=generator)
        state[f"{name}.bias"] = torch.randn(c, generator=generator)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    chans, n, z = config.block_out_channels, len(config.block_out_channels), config.latent_channels
    conv("encoder.conv_in", chans[0], config.in_channels)
    for i in range(n):
        for j in range(config.layers_per_block):
            resnet(f"encoder.down.{i}.block.{j}", chans[max(i - 1, 0)] if j == 0 else chans[i], chans[i])
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", chans[i], chans[i])
    mid("encoder", chans[-1])
    norm("encoder.norm_out", chans[-1])
    conv("encoder.conv_out", 2 * z, chans[-1])
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", chans[-1], z)
    mid("decoder", chans[-1])
    block_in = chans[-1]
    for i in reversed(range(n)):
        for j in range(config.layers_per_block + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, chans[i])
            block_in = chans[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", chans[i], chans[i])
    norm("decoder.norm_out", chans[0])
    conv("decoder.conv_out", config.out_channels, chans[0])
    return state


def _diffusers_convert(state, num_blocks):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
    }
    return convert_ldm_vae_checkpoint(dict(state), config)  # it may pop from its input: give it a copy


@pytest.mark.parametrize("blocks", [(32, 64), (32, 32, 64)])
def test_ldm_conversion_matches_diffusers(blocks):
    pytest.importorskip("diffusers")
    config = _tiny_config(block_out_channels=blocks, use_quant_conv=True, use_post_quant_conv=True)
    state = _ldm_state(config, torch.Generator().manual_seed(0))
    theirs = _diffusers_convert(state, len(blocks))
    ours = ldm_to_ours(dict(state))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    AutoencoderKL(config).load_state_dict(ours, strict=True)


def test_full_size_ldm_conversion_matches_diffusers():
    pytest.importorskip("diffusers")
    shapes = json.loads((KEYS / "flux1_ae_orig.json").read_text())
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    theirs = {k: tuple(v.shape) for k, v in _diffusers_convert(state, 4).items()}
    assert {k: tuple(v.shape) for k, v in ldm_to_ours(dict(state)).items()} == theirs
