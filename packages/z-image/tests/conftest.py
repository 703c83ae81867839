"""A tiny random Z-Image repo laid out like the hub (transformer/, vae/, text_encoder/, tokenizer/, scheduler/).

Built with our own classes and written in the official file layouts with diffusers/transformers-style
config.json files, so both our `from_pretrained` and diffusers' classes can load the same folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.testing.hub_configs import tiny_vae_config_json
from diffsynth.runtime.testing.weights import random_weights

CAPTIONS = [
    "a red circle on a blue background",
    "a small green square in the top left corner",
    "a yellow triangle on a black background",
    "bad quality, blurry",
]

DIT_CONFIG = {
    "_class_name": "ZImageTransformer2DModel",
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 4,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 32,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [8, 12, 12],
    "axes_lens": [256, 64, 64],
}

VAE_CONFIG = tiny_vae_config_json(  # FLUX.1's VAE, which Z-Image uses (tiny: 4 latent channels)
    "AutoencoderKL",
    4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

TEXT_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights everywhere, norm weights near 1 (see `random_weights`)."""
    return random_weights(model, seed)


def build_tiny_repo(root: Path) -> Path:
    from diffsynth.runtime.models.autoencoder_kl import AUTOENCODER_KL_SPEC
    from diffsynth.runtime.models.qwen3 import QWEN3_SPEC
    from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer
    from diffsynth.z_image.formats import DIT_SPEC

    tokenizer = build_tiny_qwen_tokenizer(root / "tokenizer", texts=CAPTIONS * 4)
    text_config = dict(TEXT_CONFIG, vocab_size=len(tokenizer))
    parts = [
        ("transformer", DIT_SPEC, DIT_CONFIG, "diffusion_pytorch_model.safetensors", "", 1),
        ("vae", AUTOENCODER_KL_SPEC, VAE_CONFIG, "diffusion_pytorch_model.safetensors", "", 2),
        ("text_encoder", QWEN3_SPEC, text_config, "model.safetensors", "model.", 3),
    ]
    for folder, spec, config_json, filename, prefix, seed in parts:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(config_json, indent=2))
        config = spec.config_from_state({}, config_json)
        model = randomize(spec.build(config), seed)
        state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(root / folder / filename))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return root


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return build_tiny_repo(tmp_path_factory.mktemp("tiny-z-image"))


SIGLIP_CONFIG = {  # the Omni repo's SigLIP2 tower: 16 patches of 4 pixels, width 24
    "model_type": "siglip2_vision_model",
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_patches": 16,
    "patch_size": 4,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


@pytest.fixture(scope="session")
def omni_repo(tiny_repo, tmp_path_factory):
    """The tiny Z-Image repo with an Omni transformer (SigLIP width 24) and a `siglip/` SigLIP2 tower in the hub
    file's layout (`vision_model.` prefix, as transformers 4 saved it)."""
    from diffsynth.runtime.testing.weights import random_weights
    from diffsynth.z_image.formats import DIT_SPEC
    from diffsynth.z_image.image_encoder import IMAGE_ENCODER_SPEC

    root = tmp_path_factory.mktemp("tiny-z-image-omni") / "repo"
    shutil.copytree(tiny_repo, root)
    dit_config = json.loads((root / "transformer" / "config.json").read_text())
    parts = [
        ("transformer", DIT_SPEC, dict(dit_config, siglip_feat_dim=24), "diffusion_pytorch_model.safetensors", ""),
        ("siglip", IMAGE_ENCODER_SPEC, SIGLIP_CONFIG, "model.safetensors", "vision_model."),
    ]
    for seed, (folder, spec, config_json, filename, prefix) in enumerate(parts, start=7):
        (root / folder).mkdir(exist_ok=True)
        for old in (root / folder).glob("*.safetensors"):
            old.unlink()
        (root / folder / "config.json").write_text(json.dumps(config_json))
        model = random_weights(spec.build(spec.config_from_state({}, config_json)), seed)
        state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(root / folder / filename))
    return root
