"""DiffSynth Qwen-Image family: Qwen-Image / Qwen-Image-2512 text-to-image and image-to-image, the Qwen-Image
MMDiT (also Edit, Edit-2509/2511 with zero_cond_t), its Qwen2.5-VL text encoder, the InstantX ControlNets and
DiffSynth-Studio's Blockwise ControlNets; and Qwen-Image 2.1 (`qwen_image21`: its single-stream DiT, RGBA VAE,
Qwen3-VL text encoder and `QwenImage21Pipeline`)
(`ControlNetInput` is the runtime's, re-exported for `pipe(controlnet_inputs=[...])`)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "diffsynth.runtime.hub",  # so a DiffSynth-Studio import changes in one line
    "QwenImageI2LPipeline": "image_to_lora",
    "ControlNetInput": "pipeline",
    "QwenImageBlockwiseControlNet": "blockwise_controlnet",
    "QwenImageControlNet": "controlnet",
    "QwenImageControlNetConfig": "controlnet",
    "QwenImagePipeline": "pipeline",
    "QwenImageDiT": "dit",
    "QwenImageDiTConfig": "dit",
    "QwenImageTextEncoder": "text_encoder",
    "QwenImage21DiT": "qwen_image21.dit",
    "QwenImage21DiTConfig": "qwen_image21.dit",
    "QwenImage21Pipeline": "qwen_image21.pipeline",
    "QwenImage21TextEncoder": "qwen_image21.text_encoder",
    "QwenImage21VAE": "qwen_image21.vae",
    "QwenImage21VAEConfig": "qwen_image21.vae",
    "qwen_image_velocity": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        module = importlib.import_module(module if module.startswith("diffsynth.") else f".{module}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'diffsynth.qwen_image' has no attribute {name!r}")
