"""Known FLUX.2 hub repos: their files and the authors' default generation settings.

FLUX.2-dev ships BFL's single files (`flux2-dev.safetensors`, `ae.safetensors`) beside the diffusers
folders; we fetch the single files and the Mistral-Small text encoder's shards. The klein repos ship
diffusers folders only. Defaults follow the model cards and diffusers' `Flux2Pipeline` /
`Flux2KleinPipeline`: dev samples 50 steps with embedded guidance 4; the step-distilled klein models
4 steps without CFG; the klein base models 50 steps with true CFG 4 (negative prompt ""). klein-9B-KV
(`Flux2KleinKVPipeline`) is step-distilled like klein-9B; its DiT is marked as a KV model on loading (see
`formats.released_as_kv`), so the pipeline caches its references' keys and values by default.
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile

DEV = "black-forest-labs/FLUX.2-dev"


def _klein(repo: str, defaults: dict, description: str) -> Preset:
    return Preset(
        name=repo,
        files=(
            PresetFile(repo, "transformer/*.safetensors*"),  # one file (4B) or shards and their index
            PresetFile(repo, "vae/diffusion_pytorch_model.safetensors"),
            PresetFile(repo, "text_encoder/*.safetensors*"),
        ),
        tokenizer=PresetFile(repo, "tokenizer/"),
        defaults=defaults,
        description=description,
    )


_DISTILLED = {"num_inference_steps": 4, "cfg_scale": 1.0, "height": 1024, "width": 1024}
_BASE = {"num_inference_steps": 50, "cfg_scale": 4.0, "height": 1024, "width": 1024}

PRESETS: dict[str, Preset] = {
    DEV: Preset(
        name=DEV,
        files=(
            PresetFile(DEV, "flux2-dev.safetensors"),
            PresetFile(DEV, "ae.safetensors"),
            PresetFile(DEV, "text_encoder/*.safetensors*"),
        ),
        tokenizer=PresetFile(DEV, "tokenizer/"),
        defaults={"num_inference_steps": 50, "embedded_guidance": 4.0, "cfg_scale": 1.0, "height": 1024, "width": 1024},
        description="FLUX.2-dev 32B, guidance-distilled, Mistral-Small-3.1 text encoder: 50 steps, embedded "
        "guidance 4; edits with up to several reference images (edit_image).",
    ),
    "black-forest-labs/FLUX.2-klein-4B": _klein(
        "black-forest-labs/FLUX.2-klein-4B",
        _DISTILLED,
        "FLUX.2-klein 4B (Apache-2.0), step-distilled, Qwen3-4B text encoder: 4 steps, no CFG; edits too.",
    ),
    "black-forest-labs/FLUX.2-klein-9B": _klein(
        "black-forest-labs/FLUX.2-klein-9B",
        _DISTILLED,
        "FLUX.2-klein 9B, step-distilled, Qwen3-8B text encoder: 4 steps, no CFG; edits too.",
    ),
    "black-forest-labs/FLUX.2-klein-9b-kv": _klein(
        "black-forest-labs/FLUX.2-klein-9b-kv",
        _DISTILLED,
        "FLUX.2-klein 9B-KV (non-commercial), step-distilled, Qwen3-8B: 4 steps, no CFG; edits with the "
        "reference images' keys and values computed once (use_kv_cache, on by default).",
    ),
    "black-forest-labs/FLUX.2-klein-base-4B": _klein(
        "black-forest-labs/FLUX.2-klein-base-4B",
        _BASE,
        "FLUX.2-klein base 4B (undistilled, for fine-tuning), Qwen3-4B: 50 steps, CFG 4.",
    ),
    "black-forest-labs/FLUX.2-klein-base-9B": _klein(
        "black-forest-labs/FLUX.2-klein-base-9B",
        _BASE,
        "FLUX.2-klein base 9B (undistilled, for fine-tuning), Qwen3-8B: 50 steps, CFG 4.",
    ),
}
