"""A tiny Step1X-Edit hub layout for the tests (`test_step1x.py`, `test_step1x_training.py`): the single file of
the FLUX.1-style DiT (no guidance embedder) and the connector, the FLUX.1 VAE, and Qwen2.5-VL-7B-Instruct's repo
(config, causal-LM weights, tokenizer with the vision tokens, image processor and chat template), all tiny."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.step1x_connector import Step1XConnector, Step1XConnectorConfig
from diffsynth.runtime.testing.weights import random_weights

TINY_DIT = dict(
    in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=128, hidden_size=256, num_heads=2, depth=1,
    depth_single_blocks=2, axes_dim=(16, 56, 56), guidance_embed=False,
)  # fmt: skip

# Qwen/Qwen2.5-VL-7B-Instruct's chat template (its `chat_template.json`), as test data for the tiny processor folder
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# a tiny Qwen2.5-VL in the Instruct repo's flat config.json (32 wide; its vision tower 16 wide, one block)
QWEN_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [0],
    },
}  # fmt: skip
HUB_CONNECTOR = dict(in_channels=32, hidden_size=128, num_heads=1, depth=1, pooled_dim=16)


def write_qwen_repo(folder: Path) -> None:
    """Qwen2.5-VL-7B-Instruct's layout, tiny: `config.json`, `model-*.safetensors` (causal-LM key names),
    tokenizer files, `preprocessor_config.json` and the chat template."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from diffsynth.flux.step1x import PREFIX
    from diffsynth.runtime.models.qwen25vl import TEXT_ENCODER_SPEC
    from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer

    texts = [PREFIX, "make the sky red", 'write "OK" on the sign', "You are a helpful assistant."] * 3
    texts += ["\u201c", "\u201d"] * 20  # the curly quotes become single tokens, as in Qwen2.5's vocabulary
    tokenizer = build_tiny_qwen_tokenizer(folder, texts=texts, vocab_size=1200)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    Qwen2VLImageProcessorPil().save_pretrained(str(folder))
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")
    }
    ids["image_token_id"] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids["video_token_id"] = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    config = dict(QWEN_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id, **ids)
    config["eos_token_id"] = tokenizer.eos_token_id
    (folder / "config.json").write_text(json.dumps(config))
    model = random_weights(TEXT_ENCODER_SPEC.build(TEXT_ENCODER_SPEC.config_from_state({}, config)), 11, scale=0.2)
    state = {}
    for key, value in model.state_dict().items():
        name = "model." + key[len("language_model.") :] if key.startswith("language_model.") else key
        state[name] = value.contiguous()
    state["lm_head.weight"] = torch.randn(len(tokenizer), 32, generator=torch.Generator().manual_seed(12))
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))


def build_step1x_base(base: Path, vae_file: Path) -> Path:
    """A model base path holding `stepfun-ai/Step1X-Edit` (the single DiT + connector file and `vae.safetensors`,
    here the tiny FLUX.1 VAE `vae_file`) and `Qwen/Qwen2.5-VL-7B-Instruct`, tiny, as the preset fetches them."""
    repo = base / "stepfun-ai" / "Step1X-Edit"
    repo.mkdir(parents=True)
    dit = random_weights(Flux1DiT(Flux1DiTConfig(**TINY_DIT)), 21, scale=0.05)
    connector = random_weights(Step1XConnector(Step1XConnectorConfig(**HUB_CONNECTOR)), 22, scale=0.2)
    state = {**dit.state_dict(), **{f"connector.{k}": v for k, v in connector.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "step1x-edit-i1258.safetensors"))
    # the loader recognises the VAE by its keys: the tiny diffusers-named FLUX VAE stands in for BFL's file
    shutil.copy(vae_file, repo / "vae.safetensors")
    qwen = base / "Qwen" / "Qwen2.5-VL-7B-Instruct"
    qwen.mkdir(parents=True)
    write_qwen_repo(qwen)
    return base
