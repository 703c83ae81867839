"""Known Qwen-Image 2.1 hub repos: their files and the authors' default generation settings.

Both repos are diffusers folders (`transformer/`, `text_encoder/`, `vae/`, `processor/`, `scheduler/`,
`model_index.json`). The schedule is not written here: the pipeline reads it from the repo's
`scheduler/scheduler_config.json` and `model_index.json` (`sample_sigmas`, which fixes the Turbo model's step
count), fetched beside the processor. Defaults follow diffusers' `QwenImage21Pipeline` and its docs (the values
Qwen recommends): 40 steps, no guidance, about 1024x1024 pixels.
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile

# files fetched beside the processor folder: the schedule lives in them (see `schedule.py`)
SCHEDULE_FILES = ("scheduler/scheduler_config.json", "model_index.json")


def _preset(repo: str, defaults: dict, description: str) -> Preset:
    return Preset(
        name=repo,
        files=(
            PresetFile(repo, "transformer/*.safetensors*"),  # shards and their index
            PresetFile(repo, "text_encoder/*.safetensors*"),
            PresetFile(repo, "vae/diffusion_pytorch_model.safetensors"),
        ),
        tokenizer=PresetFile(repo, "processor/"),
        defaults=defaults,
        description=description,
    )


PRESETS: dict[str, Preset] = {
    "Qwen/Qwen-Image-2.1": _preset(
        "Qwen/Qwen-Image-2.1",
        {"cfg_scale": 1.0},
        "Qwen-Image 2.1: text-to-image and editing with condition images (edit_image), 40 steps, no CFG; RGBA output.",
    ),
    "Qwen/Qwen-Image-2.1-Turbo": _preset(
        "Qwen/Qwen-Image-2.1-Turbo",
        {"cfg_scale": 1.0},
        "Qwen-Image 2.1 Turbo (step-distilled): the few noise levels of its model_index.json, no CFG.",
    ),
}
