"""The original LDM (CompVis) VAE checkpoint layout, written from its architecture, and diffusers' converter of it.

One writer of the layout serves every VAE that ships in it (AutoencoderKL's LDM files, BFL's FLUX `ae.safetensors`),
so each conversion test checks our key mapping against the same independently built keys.
"""

from __future__ import annotations

import torch


def ldm_vae_state(
    config,
    generator: torch.Generator,
    *,
    scale: float = 1.0,
    norm_offset: float = 0.0,
    norm_scale: float = 1.0,
    quant_convs_inside: bool = False,
) -> dict[str, torch.Tensor]:
    """Random weights in the LDM layout (`ch_mult` stages, decoder `up.N` counted from the full-resolution stage,
    1x1-conv attention): convs `scale * N(0, 1)`, norm weights `norm_offset + norm_scale * N(0, 1)`, norm biases
    `norm_scale * N(0, 1)`, drawn in key order. `quant_convs_inside` names the quant convs as BFL does
    (`encoder.quant_conv`, `decoder.post_quant_conv`) instead of at the top level.

    `config` needs `block_out_channels`, `layers_per_block`, `latent_channels`, `in_channels`, `out_channels`.
    """
    state: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k=3):
        state[f"{name}.weight"] = scale * torch.randn(cout, cin, k, k, generator=generator)
        state[f"{name}.bias"] = scale * torch.randn(cout, generator=generator)

    def norm(name, c):
        state[f"{name}.weight"] = norm_offset + norm_scale * torch.randn(c, generator=generator)
        state[f"{name}.bias"] = norm_scale * torch.randn(c, generator=generator)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout)
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
    conv("encoder.quant_conv" if quant_convs_inside else "quant_conv", 2 * z, 2 * z, 1)
    conv("decoder.post_quant_conv" if quant_convs_inside else "post_quant_conv", z, z, 1)
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


def diffusers_convert_ldm_vae(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers' own LDM VAE converter (`convert_ldm_vae_checkpoint`) for `num_blocks` stages; needs diffusers."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {
        "down_block_types": ["DownEncoderBlock2D"] * num_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * num_blocks,
    }
    return convert_ldm_vae_checkpoint(dict(state), config)  # it may pop from its input: give it a copy


def diffusers_ldm_vae_kwargs(config) -> dict:
    """The constructor arguments every diffusers LDM-architecture VAE (`AutoencoderKL`, `AutoencoderKLFlux2`) takes,
    from our config (the fields `ldm_vae_state` reads, plus norm groups and the optional convs and attention)."""
    n = len(config.block_out_channels)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_block_add_attention,
    )
