"""Known Z-Image hub repos: their files and the authors' default generation settings.

Defaults come from the authors' published inference code (the Tongyi-MAI model cards, which use
the diffusers `ZImagePipeline` the Z-Image team wrote). Our `cfg_scale` is the usual
`uncond + cfg_scale * (cond - uncond)`, so 1 means off; the authors' `guidance_scale` g is written
`cond + g * (cond - uncond)`, which is our `cfg_scale = g + 1`.
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile

from .demo import MODEL_FOLDER as DEMO_FOLDER


def _repo_files(repo: str) -> tuple[PresetFile, ...]:
    return (
        PresetFile(repo, "transformer/*.safetensors*"),  # shards and their index
        PresetFile(repo, "text_encoder/*.safetensors*"),
        PresetFile(repo, "vae/diffusion_pytorch_model.safetensors"),
    )


# The Fun ControlNet repos (model cards of alibaba-pai on Hugging Face, PAI on ModelScope; DiffSynth-Studio's
# examples) -> the file `ZImagePipeline.load_controlnet("<repo>")` fetches. Other files of these repos (the
# 2.1 non-distilled, lite and Tile nets) load by naming them: ModelConfig(model_id=..., origin_file_pattern=...).
_UNION_2_1 = "Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors"
_UNION_1_0 = "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
CONTROLNET_FILES: dict[str, str] = {
    "PAI/Z-Image-Turbo-Fun-Controlnet-Union-2.1": _UNION_2_1,
    "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1": _UNION_2_1,
    "PAI/Z-Image-Turbo-Fun-Controlnet-Union": _UNION_1_0,
    "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union": _UNION_1_0,
    "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.0": "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors",
}

PRESETS: dict[str, Preset] = {
    "Tongyi-MAI/Z-Image-Turbo": Preset(
        name="Tongyi-MAI/Z-Image-Turbo",
        files=_repo_files("Tongyi-MAI/Z-Image-Turbo"),
        tokenizer=PresetFile("Tongyi-MAI/Z-Image-Turbo", "tokenizer/"),
        # Model card: 9 steps (8 effective NFEs), guidance 0 (distilled), 1024x1024.
        defaults={"num_inference_steps": 9, "cfg_scale": 1.0, "height": 1024, "width": 1024, "sigma_shift": 3.0},
        description="Z-Image-Turbo 6B, distilled: 9 steps, no CFG.",
    ),
    "Tongyi-MAI/Z-Image": Preset(
        name="Tongyi-MAI/Z-Image",
        files=_repo_files("Tongyi-MAI/Z-Image"),
        tokenizer=PresetFile("Tongyi-MAI/Z-Image", "tokenizer/"),
        # Model card: 50 steps, guidance_scale 4 (= our cfg_scale 5), negative prompt supported.
        defaults={"num_inference_steps": 50, "cfg_scale": 5.0, "height": 1024, "width": 1024, "sigma_shift": 3.0},
        description="Z-Image 6B base: 50 steps with CFG.",
    ),
    # Z-Image Omni: the repo's DiT and SigLIP2 encoder with Z-Image-Turbo's text encoder, VAE and tokenizer, the
    # files DiffSynth-Studio's example (examples/z_image/model_inference/Z-Image-Omni-Base.py) loads, with its
    # settings: 40 steps, cfg_scale 4 (diffusers' ZImageOmniPipeline defaults to 50 steps, guidance_scale 5).
    # No height/width: with edit_image the output takes the (last) edit image's size, else 1024x1024.
    "Tongyi-MAI/Z-Image-Omni-Base": Preset(
        name="Tongyi-MAI/Z-Image-Omni-Base",
        files=(
            PresetFile("Tongyi-MAI/Z-Image-Omni-Base", "transformer/*.safetensors*"),
            PresetFile("Tongyi-MAI/Z-Image-Omni-Base", "siglip/model.safetensors"),
            PresetFile("Tongyi-MAI/Z-Image-Turbo", "text_encoder/*.safetensors*"),
            PresetFile("Tongyi-MAI/Z-Image-Turbo", "vae/diffusion_pytorch_model.safetensors"),
        ),
        tokenizer=PresetFile("Tongyi-MAI/Z-Image-Turbo", "tokenizer/"),
        defaults={"num_inference_steps": 40, "cfg_scale": 4.0, "sigma_shift": 3.0},
        description="Z-Image-Omni-Base 6B: text-to-image and editing (edit_image=...), 40 steps with CFG.",
    ),
    "demo": Preset(
        name="demo",
        folder=str(DEMO_FOLDER),
        description="DiffSynth demo: a tiny Z-Image trained from scratch on shapes, shipped with the package "
        "(128x128, CPU in seconds; see diffsynth.z_image.demo).",
    ),
}


# Image to LoRA (`image_to_lora.py`): the general image encoders and a Z-Image-i2L model only
# (`ZImageI2LPipeline`), as DiffSynth-Studio's examples/z_image/model_inference/Z-Image-i2L.py and
# Z-Image-Omni-Base-i2L.py load them (the two repos hold the same architecture).
_I2L_PIPELINE = "diffsynth.z_image.image_to_lora:ZImageI2LPipeline"
IMAGE_ENCODER_FILES = (
    PresetFile("DiffSynth-Studio/General-Image-Encoders", "SigLIP2-G384/model.safetensors"),
    PresetFile("DiffSynth-Studio/General-Image-Encoders", "DINOv3-7B/model.safetensors"),
)
I2L_PRESETS: dict[str, Preset] = {
    repo: Preset(
        name=repo,
        files=(*IMAGE_ENCODER_FILES, PresetFile(repo, "model.safetensors")),
        description=f"{repo.split('/')[1]}: a style LoRA for {target} from a few images (image_to_lora).",
        pipeline=_I2L_PIPELINE,
    )
    for repo, target in (
        ("DiffSynth-Studio/Z-Image-i2L", "Z-Image"),
        ("DiffSynth-Studio/Z-Image-Omni-Base-i2L", "Z-Image-Omni-Base"),
    )
}
