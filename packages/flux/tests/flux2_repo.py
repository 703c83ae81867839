"""Tiny random FLUX.2 repos laid out like the hub, built offline with our own classes.

`transformer/` (diffusers layout + config.json), `vae/` (diffusers `AutoencoderKLFlux2` names + config.json),
`text_encoder/` (Qwen3 in the hub's causal-LM file layout), `tokenizer/` (a tiny Qwen tokenizer with Qwen3's
chat template) and `scheduler/`, so both our `from_pretrained` and diffusers' `Flux2KleinPipeline` load the same
folder; `build_tiny_dev_repo` does the same for FLUX.2-dev (Mistral3 text encoder, guidance embedder) and
`Flux2Pipeline`. Text encoders are deep enough for the layers the pipelines read; everything is narrow.
Loaded by conftest as the module `diffsynth_flux2_test_repo` (test modules cannot import each other).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffsynth.runtime.testing.hub_configs import tiny_vae_config_json
from diffsynth.runtime.testing.weights import random_weights

CAPTIONS = [
    "a red circle on a blue background",
    "a small green square in the top left corner",
    "a yellow triangle on a black background",
    "change the colour of the circle to green",
]

TEXT_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 28,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}


def tiny_mistral3_json(**text) -> dict:
    """The only place tiny Mistral3 sizes live: a hub-style `text_encoder/config.json`. head_dim 16 with
    4 heads makes the q width (64) differ from the hidden width (32), as 32 x 128 vs 5120 does at full size."""
    text_config = dict(
        model_type="mistral",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=1_000_000_000.0,
        max_position_embeddings=1024,
        sliding_window=None,
    )
    text_config.update(text)
    vision_config = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        patch_size=2,
        image_size=16,
    )
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "image_token_index": 5,
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "tie_word_embeddings": False,
        "text_config": text_config,
        "vision_config": vision_config,
    }


def hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 Mistral3 names -> the hub file's (transformers 4.x) names."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model.") :]
        elif key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("model."):
            key = key[len("model.") :]
        out[key] = value.clone().contiguous()
    return out


def dit_config(guidance: bool, context: int) -> dict:
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": 16,  # 4 latent channels packed 2x2
        "out_channels": None,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": context,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": [4, 4, 4, 4],
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": guidance,
    }


VAE_CONFIG = tiny_vae_config_json(
    "AutoencoderKLFlux2",
    4,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=[2, 2],
)

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}


def _save(folder: Path, config_json: dict, state: dict, filename: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / filename))


def _write_denoiser_and_vae(root: Path, dit_json: dict, seed: int) -> None:
    """`transformer/` (diffusers layout), `vae/` (BatchNorm statistics far from (0, 1), so they count), `scheduler/`."""
    from diffsynth.flux.flux2.formats import FLUX2_DIT_SPEC, ours_to_diffusers
    from diffsynth.flux.flux2.vae_formats import FLUX2_VAE_SPEC

    dit = random_weights(FLUX2_DIT_SPEC.build(FLUX2_DIT_SPEC.config_from_state({}, dit_json)), seed + 1)
    _save(root / "transformer", dit_json, ours_to_diffusers(dit.state_dict()), "diffusion_pytorch_model.safetensors")
    vae = random_weights(FLUX2_VAE_SPEC.build(FLUX2_VAE_SPEC.config_from_state({}, VAE_CONFIG)), seed + 2)
    generator = torch.Generator().manual_seed(seed + 4)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.5)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    _save(root / "vae", VAE_CONFIG, vae.state_dict(), "diffusion_pytorch_model.safetensors")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))


def build_tiny_klein_repo(root: Path, seed: int = 0) -> Path:
    """klein: a DiT without guidance embedder, Qwen3 (28 layers: klein reads hidden states 9, 18, 27)."""
    from diffsynth.runtime.models.qwen3 import QWEN3_SPEC
    from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer

    tokenizer = build_tiny_qwen_tokenizer(root / "tokenizer", texts=CAPTIONS * 4)
    text_config = dict(TEXT_CONFIG, vocab_size=len(tokenizer))
    text = random_weights(QWEN3_SPEC.build(QWEN3_SPEC.config_from_state({}, text_config)), seed + 3)
    _save(
        root / "text_encoder", text_config, {f"model.{k}": v for k, v in text.state_dict().items()}, "model.safetensors"
    )
    _write_denoiser_and_vae(root, dit_config(guidance=False, context=3 * TEXT_CONFIG["hidden_size"]), seed)
    return root


def build_tiny_dev_repo(root: Path, seed: int = 0) -> Path:
    """FLUX.2-dev: a guidance-embedding DiT, Mistral3 (31 text layers: dev reads hidden states 10, 20, 30) in the
    hub's file names, and its tokenizer."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from diffsynth.runtime.testing.tokenizers import build_tiny_mistral_tokenizer

    tokenizer = build_tiny_mistral_tokenizer(root / "tokenizer", texts=CAPTIONS * 4)
    text_json = tiny_mistral3_json(num_hidden_layers=31, vocab_size=len(tokenizer))
    text = random_weights(Mistral3ForConditionalGeneration(Mistral3Config(**text_json)), seed + 5)
    _save(root / "text_encoder", text_json, hub_names(text.state_dict()), "model.safetensors")
    _write_denoiser_and_vae(root, dit_config(guidance=True, context=3 * text_json["text_config"]["hidden_size"]), seed)
    return root


def our_pipeline(repo: Path, **kwargs):
    from diffsynth.flux.flux2.pipeline import Flux2ImagePipeline

    return Flux2ImagePipeline.from_pretrained(str(repo), device="cpu", torch_dtype=torch.float32, **kwargs)


def reference_pipeline(repo: Path, distilled: bool = True):
    """diffusers' `Flux2KleinPipeline` over the same folder (tests only)."""
    import diffusers
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    return diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(repo / "vae"),
        text_encoder=Qwen3ForCausalLM.from_pretrained(repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(repo / "tokenizer"),
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(repo / "transformer"),
        is_distilled=distilled,
    )


def reference_dev_pipeline(repo: Path):
    """diffusers' `Flux2Pipeline` (FLUX.2-dev) over a `build_tiny_dev_repo` folder; the tokenizer is loaded
    with the processor's chat template (`load_mistral_tokenizer`: AutoProcessor needs torchvision)."""
    import diffusers
    from transformers import Mistral3ForConditionalGeneration

    from diffsynth.flux.flux2.text_encoder import load_mistral_tokenizer

    return diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(repo / "vae"),
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(repo / "text_encoder"),
        tokenizer=load_mistral_tokenizer(repo / "tokenizer"),
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(repo / "transformer"),
    )
