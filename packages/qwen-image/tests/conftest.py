"""A tiny random Qwen-Image repo laid out like the hub (transformer/, vae/, text_encoder/, tokenizer/, scheduler/).

Built with our own classes (no diffusers needed) and written in the official file layouts: the DiT
in diffusers names, the VAE renamed to diffusers' `AutoencoderKLQwenImage` names, the text encoder in
the older Qwen2.5-VL causal-LM layout with a legacy flat config.json, like `Qwen/Qwen-Image`. Both
our `from_pretrained` and diffusers/transformers can load the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.testing.hub_configs import QWEN_IMAGE_VAE_CONFIG_JSON
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

# test_dit.py (where `tiny_config` and friends live) as a module other tests import
load_beside(__file__, "test_dit.py", "qwen_image_test_dit")

KEYS = Path(__file__).parent / "data" / "keys"

CAPTIONS = [
    "a red circle on a blue background",
    "a small green square in the top left corner",
    "a yellow triangle on a black background",
    "bad quality, blurry",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:",
]

DIT_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": False,
}

VAE_CONFIG = {**QWEN_IMAGE_VAE_CONFIG_JSON, "base_dim": 8}  # Qwen/Qwen-Image `vae/config.json`, tiny width

# Legacy flat Qwen2.5-VL config.json, as in Qwen/Qwen-Image `text_encoder/` (tiny sizes)
TEXT_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 32,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [0],
    },
}

# Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


VISION_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
}


def build_processor(directory: Path, tokenizer) -> None:
    """A `processor/` folder like the Edit repos': Qwen2-VL image preprocessing (fewer pixels) and the tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def vae_ours_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Wan-VAE names -> diffusers' (the runtime converter is a pure rename; invert it on the key list)."""
    from diffsynth.runtime.models.wan_vae_formats import diffusers21_to_ours

    names = list(json.loads((KEYS / "qwenimage_vae_diffusers.json").read_text()))
    tagged = diffusers21_to_ours({k: torch.tensor(float(i)) for i, k in enumerate(names)})
    ours_to_theirs = {ours: names[int(v.item())] for ours, v in tagged.items()}
    return {ours_to_theirs[k]: v for k, v in state.items()}


def text_encoder_to_hub(state: dict[str, torch.Tensor], lm_head: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our names -> the older causal-LM layout of the hub files (`model.*`, `visual.*`, `lm_head`)."""
    out = {}
    for key, value in state.items():
        out["model." + key[len("language_model.") :] if key.startswith("language_model.") else key] = value
    out["lm_head.weight"] = lm_head
    return out


def build_tiny_repo(root: Path) -> Path:
    from diffsynth.qwen_image.formats import DIT_SPEC
    from diffsynth.qwen_image.text_encoder import TEXT_ENCODER_SPEC
    from diffsynth.runtime.models.wan_vae import WAN21_VAE_SPEC
    from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer

    tokenizer = build_tiny_qwen_tokenizer(root / "tokenizer", texts=CAPTIONS * 4)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS.values())})
    tokenizer.save_pretrained(str(root / "tokenizer"))
    vision_ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in VISION_TOKENS.items()}
    build_processor(root / "processor", tokenizer)
    text_config = dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **vision_ids,
    )
    parts = [
        ("transformer", DIT_SPEC, DIT_CONFIG, "diffusion_pytorch_model.safetensors", 1),
        ("vae", WAN21_VAE_SPEC, VAE_CONFIG, "diffusion_pytorch_model.safetensors", 2),
        ("text_encoder", TEXT_ENCODER_SPEC, text_config, "model.safetensors", 3),
    ]
    for folder, spec, config_json, filename, seed in parts:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(config_json, indent=2))
        model = random_weights(spec.build(spec.config_from_state({}, config_json)), seed)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if folder == "vae":
            state = vae_ours_to_diffusers(state)
        elif folder == "text_encoder":
            head = torch.randn(text_config["vocab_size"], 32, generator=torch.Generator().manual_seed(seed))
            state = text_encoder_to_hub(state, head)
        save_file(state, str(root / folder / filename))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return root


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory) -> Path:
    """The tiny repo with both `tokenizer/` and Edit's `processor/` (tests override `tiny_repo`, not this)."""
    torch.manual_seed(0)
    return build_tiny_repo(tmp_path_factory.mktemp("tiny-qwen-image"))


@pytest.fixture(scope="session")
def tiny_repo(built_repo) -> Path:
    return built_repo


@pytest.fixture(scope="session")
def t2i_repo(built_repo, tmp_path_factory) -> Path:
    """The tiny repo laid out as Qwen/Qwen-Image's: no Edit `processor/` folder, which makes a training task Edit."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-qwen-image-t2i") / "Qwen-Image"
    return shutil.copytree(built_repo, folder, ignore=shutil.ignore_patterns("processor"))


@pytest.fixture
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead (seconds per call on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LORA_LAYOUTS = ("peft", "diffusion_model", "diffusion_model_alpha", "kohya")


def make_random_lora(model: torch.nn.Module, layout: str, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """A random LoRA on every Linear of `model` (named like diffusers' Qwen-Image transformer), in one layout:

    - "peft": `transformer.<name>.lora_A.weight` / `.lora_B.weight` (diffusers `save_lora_weights`);
    - "diffusion_model": `diffusion_model.<name>.lora_A.weight` / `.lora_B.weight` (Qwen-Image-Lightning);
    - "diffusion_model_alpha": `diffusion_model.<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
    - "kohya": `lora_unet_<name, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha` (ComfyUI).
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        down = torch.randn(rank, module.in_features, generator=g) * 0.2
        up = torch.randn(module.out_features, rank, generator=g) * 0.2
        if layout == "peft":
            state |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
        elif layout == "diffusion_model":
            state |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
        elif layout in ("diffusion_model_alpha", "kohya"):
            base = (
                f"diffusion_model.{name}"
                if layout == "diffusion_model_alpha"
                else f"lora_unet_{name.replace('.', '_')}"
            )
            state |= {
                f"{base}.lora_down.weight": down,
                f"{base}.lora_up.weight": up,
                f"{base}.alpha": torch.tensor(alpha),
            }
        else:
            raise ValueError(f"layout={layout!r}; use one of {LORA_LAYOUTS}")
    return state


def load_into_diffusers(transformer, state: dict):
    """`transformer` (diffusers) with `state` loaded through `QwenImagePipeline.load_lora_weights`."""
    import diffusers

    pipe = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.load_lora_weights(dict(state))
    return transformer


@pytest.fixture(scope="session")
def random_lora():
    """`make_random_lora`, for test modules (conftest is not importable under importlib mode)."""
    return make_random_lora


@pytest.fixture(scope="session")
def diffusers_with_lora():
    """`load_into_diffusers`, for test modules."""
    return load_into_diffusers
