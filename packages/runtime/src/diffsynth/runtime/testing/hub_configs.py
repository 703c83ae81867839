"""`config.json` files of released checkpoints, as published on the hub: one copy for the tests of every package
that reads them (full size) or writes them beside tiny weights (with smaller widths)."""

from __future__ import annotations

# `vae/config.json` of Qwen/Qwen-Image (the Wan 2.1 VAE architecture under another class name)
QWEN_IMAGE_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKLQwenImage",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}  # fmt: skip


def tiny_vae_config_json(class_name: str, latent_channels: int, **fields) -> dict:
    """A diffusers LDM-architecture VAE `config.json` (`AutoencoderKL` and kin) at test size: 4 stages of 32
    channels with one block each, so a latent cell is 8 pixels as released; `fields` follow the shared ones."""
    return {
        "_class_name": class_name,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": 64,
        **fields,
    }
