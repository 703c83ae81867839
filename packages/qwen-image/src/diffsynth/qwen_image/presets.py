"""Known Qwen-Image hub repos: their files and the authors' default generation settings.

Defaults follow the authors' model cards (which call diffusers' `QwenImagePipeline` /
`QwenImageEditPipeline` / `QwenImageEditPlusPipeline`): 1328x1328, `true_cfg_scale=4` with a
negative prompt of one space. Our `cfg_scale` is that `true_cfg_scale` (the same formula, with the
authors' rescale of each token's guided velocity to the norm of the conditional one), so 1 means off.
Edit presets read the tokenizer from `processor/` (the Qwen2-VL processor the vision tower needs) and
name their prompt template (`edit_template`: "edit" for the first Edit, "plus" for 2509/2511).
Qwen-Image-Layered's defaults are those of the authors' card (diffusers' `QwenImageLayeredPipeline` with
`layers=4`, `resolution=640`, `cfg_normalize=True`, `true_cfg_scale=4`, negative prompt " ", 50 steps), under
our names `layer_num`, `layer_resolution`, `cfg_normalize` and `cfg_scale`.

DiffSynth-Studio/Qwen-Image-Distill-Full (its distilled DiT with Qwen-Image's other files) samples in 15 steps
without CFG, as its example does; its LoRA form (`Qwen-Image-Distill-LoRA`) loads onto Qwen/Qwen-Image with
`load_lora`.

DiffSynth-Studio/Qwen-Image-Layered-Control (its Layered DiT fine-tuned to pull out the layer the prompt names)
runs with `layer_num=0`, DiffSynth-Studio's schedule and plain CFG 4 in 30 steps at 1024x1024, as its example
does; its V2 LoRA (`DiffSynth-Studio/Qwen-Image-Layered-Control-V2`, `load_lora`) also reads a `context_image`
mask. FireRedTeam/FireRed-Image-Edit-1.0 / 1.1 (a Qwen-Image-Edit-2509-style fine-tune, several edit images) load
their DiT with Qwen-Image's text encoder and VAE and Qwen-Image-Edit's processor, as DiffSynth-Studio's examples do.

`CONTROLNETS` are the ControlNet repos `load_controlnet("Org/Name")` knows: their files (InstantX's: a diffusers
`QwenImageControlNetModel` folder at the repo root; DiffSynth-Studio's Blockwise nets: a root `model.safetensors`).
"""

from __future__ import annotations

import math

from diffsynth.runtime.registry import Preset, PresetFile, PresetLoRA


def _repo_files(repo: str) -> tuple[PresetFile, ...]:
    return (
        PresetFile(repo, "transformer/*.safetensors*"),  # shards and their index
        PresetFile(repo, "text_encoder/*.safetensors*"),
        PresetFile(repo, "vae/diffusion_pytorch_model.safetensors"),
    )


_T2I = {"num_inference_steps": 50, "cfg_scale": 4.0, "height": 1328, "width": 1328, "negative_prompt": " "}
_LAYERED = {
    "num_inference_steps": 50,
    "cfg_scale": 4.0,
    "negative_prompt": " ",
    "layer_num": 4,
    "layer_resolution": 640,
    "cfg_normalize": True,
}
_EDIT_PLUS = {"num_inference_steps": 40, "cfg_scale": 4.0, "negative_prompt": " ", "edit_template": "plus"}
_LAYERED_CONTROL = {
    "num_inference_steps": 30,
    "cfg_scale": 4.0,
    "negative_prompt": "",
    "layer_num": 0,
    "height": 1024,
    "width": 1024,
    "cfg_normalize": False,
    "sigma_template": "qwen_image",
}


def _preset(repo: str, defaults: dict, description: str, tokenizer: str = "tokenizer/") -> Preset:
    return Preset(
        name=repo,
        files=_repo_files(repo),
        tokenizer=PresetFile(repo, tokenizer),
        defaults=defaults,
        description=description,
    )


PRESETS: dict[str, Preset] = {
    "Qwen/Qwen-Image": _preset("Qwen/Qwen-Image", _T2I, "Qwen-Image 20B text-to-image: 50 steps, true CFG 4."),
    "Qwen/Qwen-Image-2512": _preset(
        "Qwen/Qwen-Image-2512", _T2I, "Qwen-Image-2512 (December 2025 update): 50 steps, true CFG 4."
    ),
    "Qwen/Qwen-Image-Edit": _preset(
        "Qwen/Qwen-Image-Edit",
        {"num_inference_steps": 50, "cfg_scale": 4.0, "negative_prompt": " ", "edit_template": "edit"},
        "Qwen-Image-Edit: one edit image, 50 steps, true CFG 4.",
        tokenizer="processor/",
    ),
    "Qwen/Qwen-Image-Edit-2509": _preset(
        "Qwen/Qwen-Image-Edit-2509",
        _EDIT_PLUS,
        "Qwen-Image-Edit-2509: 1-3 edit images, 40 steps, true CFG 4.",
        tokenizer="processor/",
    ),
    "Qwen/Qwen-Image-Edit-2511": _preset(
        "Qwen/Qwen-Image-Edit-2511",
        _EDIT_PLUS,
        "Qwen-Image-Edit-2511 (zero_cond_t): 1-3 edit images, 40 steps, true CFG 4.",
        tokenizer="processor/",
    ),
    "Qwen/Qwen-Image-Layered": _preset(
        "Qwen/Qwen-Image-Layered",
        _LAYERED,
        "Qwen-Image-Layered: an RGBA image (layer_input_image) into 4 RGBA layers at about 640x640, 50 steps, "
        "true CFG 4 normalised.",
    ),
    # DiffSynth-Studio's distilled Qwen-Image (the whole DiT): its DiT files at the repo root, Qwen-Image's text
    # encoder, VAE and tokenizer; 15 steps without CFG (its example)
    "DiffSynth-Studio/Qwen-Image-Distill-Full": Preset(
        name="DiffSynth-Studio/Qwen-Image-Distill-Full",
        files=(
            PresetFile("DiffSynth-Studio/Qwen-Image-Distill-Full", "diffusion_pytorch_model*.safetensors"),
            PresetFile("Qwen/Qwen-Image", "text_encoder/*.safetensors*"),
            PresetFile("Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors"),
        ),
        tokenizer=PresetFile("Qwen/Qwen-Image", "tokenizer/"),
        defaults={**_T2I, "num_inference_steps": 15, "cfg_scale": 1.0},
        description="DiffSynth-Studio's distilled Qwen-Image: 15 steps without CFG.",
    ),
    "DiffSynth-Studio/Qwen-Image-Layered-Control": Preset(
        name="DiffSynth-Studio/Qwen-Image-Layered-Control",
        files=(
            PresetFile("DiffSynth-Studio/Qwen-Image-Layered-Control", "transformer/*.safetensors*"),
            PresetFile("Qwen/Qwen-Image", "text_encoder/*.safetensors*"),
            PresetFile("Qwen/Qwen-Image-Layered", "vae/diffusion_pytorch_model.safetensors"),
        ),
        tokenizer=PresetFile("Qwen/Qwen-Image", "tokenizer/"),
        defaults=_LAYERED_CONTROL,
        description="DiffSynth-Studio's Qwen-Image-Layered-Control: the layer of layer_input_image the prompt names "
        "(layer_num 0), 30 steps, CFG 4, 1024x1024.",
    ),
    **{
        f"FireRedTeam/FireRed-Image-Edit-{version}": Preset(
            name=f"FireRedTeam/FireRed-Image-Edit-{version}",
            files=(
                PresetFile(f"FireRedTeam/FireRed-Image-Edit-{version}", "transformer/*.safetensors*"),
                PresetFile("Qwen/Qwen-Image", "text_encoder/*.safetensors*"),
                PresetFile("Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors"),
            ),
            tokenizer=PresetFile("Qwen/Qwen-Image-Edit", "processor/"),
            defaults=_EDIT_PLUS,
            description=f"FireRed-Image-Edit-{version} (a Qwen-Image-Edit fine-tune): 1-3 edit images, 40 steps, "
            "true CFG 4.",
        )
        for version in ("1.0", "1.1")
    },
}


def _lora_preset(repo: str, base: str, lora: PresetLoRA, defaults: dict, description: str) -> Preset:
    """A LoRA that makes a model of its own (`repo`): `base`'s files with `lora` applied on load."""
    return Preset(
        name=repo,
        files=PRESETS[base].files,
        tokenizer=PRESETS[base].tokenizer,
        defaults=defaults,
        description=description,
        loras=(lora,),
    )


def _studio_lora(repo: str) -> PresetLoRA:  # DiffSynth-Studio's LoRA repos hold one `model.safetensors`
    return PresetLoRA(repo, "model.safetensors")


_ELIGEN = {**_T2I, "num_inference_steps": 40, "height": 1024, "width": 1024}
_LIGHTNING_2511 = "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"

# LoRAs that make a model of their own, as DiffSynth-Studio's examples load them (their base files, their settings);
# any other LoRA loads with `pipe.load_lora(...)` (a file, or a hub name "Org/Name[/file]")
LORA_PRESETS: dict[str, Preset] = {
    "DiffSynth-Studio/Qwen-Image-Distill-LoRA": _lora_preset(
        "DiffSynth-Studio/Qwen-Image-Distill-LoRA",
        "Qwen/Qwen-Image",
        _studio_lora("DiffSynth-Studio/Qwen-Image-Distill-LoRA"),
        {**_T2I, "num_inference_steps": 15, "cfg_scale": 1.0},
        "DiffSynth-Studio's distillation LoRA on Qwen-Image: 15 steps without CFG.",
    ),
    # MusePublic's DMD2 distillation (peft keys, `base_model.model.`), as DiffSynth-Studio's Qwen-Image-Distill-DMD2
    # example samples it: 3 steps without CFG, the schedule's mu fixed at ln 2.5
    "MusePublic/Qwen-Image-Distill": _lora_preset(
        "MusePublic/Qwen-Image-Distill",
        "Qwen/Qwen-Image",
        PresetLoRA("MusePublic/Qwen-Image-Distill", "qwen_image_distill_3step.safetensors"),
        {**_T2I, "num_inference_steps": 3, "cfg_scale": 1.0, "exponential_shift_mu": math.log(2.5)},
        "MusePublic's DMD2-distilled LoRA on Qwen-Image: 3 steps without CFG, mu ln 2.5.",
    ),
    **{
        f"DiffSynth-Studio/Qwen-Image-{name}": _lora_preset(
            f"DiffSynth-Studio/Qwen-Image-{name}",
            "Qwen/Qwen-Image",
            _studio_lora(f"DiffSynth-Studio/Qwen-Image-{name}"),
            defaults,
            f"DiffSynth-Studio's {description} LoRA on Qwen-Image: eligen_entity_prompts + eligen_entity_masks, "
            "40 steps, true CFG 4.",
        )
        for name, defaults, description in (
            ("EliGen", _ELIGEN, "EliGen (regional entity prompts)"),
            ("EliGen-V2", _ELIGEN, "EliGen V2 (regional entity prompts)"),
            ("EliGen-Poster", {**_ELIGEN, "height": 784, "width": 1280}, "EliGen poster"),
        )
    },
    "DiffSynth-Studio/Qwen-Image-LoRA-ArtAug-v1": _lora_preset(
        "DiffSynth-Studio/Qwen-Image-LoRA-ArtAug-v1",
        "Qwen/Qwen-Image",
        _studio_lora("DiffSynth-Studio/Qwen-Image-LoRA-ArtAug-v1"),
        _T2I,
        "DiffSynth-Studio's ArtAug aesthetics LoRA on Qwen-Image (a differential LoRA): Qwen-Image's settings.",
    ),
    "DiffSynth-Studio/Qwen-Image-In-Context-Control-Union": _lora_preset(
        "DiffSynth-Studio/Qwen-Image-In-Context-Control-Union",
        "Qwen/Qwen-Image",
        _studio_lora("DiffSynth-Studio/Qwen-Image-In-Context-Control-Union"),
        {**_T2I, "height": 1024, "width": 1024},
        "DiffSynth-Studio's In-Context Control LoRA on Qwen-Image: a control map (canny, depth, pose, ...) as "
        "context_image, 50 steps, true CFG 4.",
    ),
    "DiffSynth-Studio/Qwen-Image-Layered-Control-V2": _lora_preset(
        "DiffSynth-Studio/Qwen-Image-Layered-Control-V2",
        "DiffSynth-Studio/Qwen-Image-Layered-Control",
        _studio_lora("DiffSynth-Studio/Qwen-Image-Layered-Control-V2"),
        {**_LAYERED_CONTROL, "num_inference_steps": 10},
        "Qwen-Image-Layered-Control V2 (a LoRA on Layered-Control): the layer a prompt names, or the one a "
        "context_image mask marks, 10 steps.",
    ),
    **{
        f"lightx2v/Qwen-Image-Lightning{suffix}": _lora_preset(
            f"lightx2v/Qwen-Image-Lightning{suffix}",
            "Qwen/Qwen-Image",
            PresetLoRA("lightx2v/Qwen-Image-Lightning", f"Qwen-Image-Lightning-{steps}steps-V2.0.safetensors"),
            {**_T2I, "num_inference_steps": steps, "cfg_scale": 1.0, "sigma_template": "lightning"},
            f"Qwen-Image with lightx2v's {steps}-step Lightning LoRA (V2.0): {steps} steps without CFG, the "
            "Lightning schedule.",
        )
        for suffix, steps in (("", 8), (":4steps", 4))
    },
    "DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix": _lora_preset(
        "DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix",
        "Qwen/Qwen-Image-Edit",
        _studio_lora("DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix"),
        {
            **PRESETS["Qwen/Qwen-Image-Edit"].defaults,
            "num_inference_steps": 40,
            "edit_image_auto_resize": False,
            "edit_rope_interpolation": True,
        },
        "DiffSynth-Studio's low-resolution fix LoRA on Qwen-Image-Edit: a small edit image kept at its size, its "
        "positions spread over the output's grid, 40 steps.",
    ),  # fmt: skip
    "DiffSynth-Studio/Qwen-Image-Edit-2511-ICEdit-LoRA": _lora_preset(
        "DiffSynth-Studio/Qwen-Image-Edit-2511-ICEdit-LoRA",
        "Qwen/Qwen-Image-Edit-2511",
        _studio_lora("DiffSynth-Studio/Qwen-Image-Edit-2511-ICEdit-LoRA"),
        {**_EDIT_PLUS, "num_inference_steps": 50},
        "DiffSynth-Studio's in-context edit LoRA on Qwen-Image-Edit-2511: edit_image = [before, after, new]; the "
        "prompt asks to edit image 3 as image 1 became image 2; 50 steps, true CFG 4.",
    ),
    "lightx2v/Qwen-Image-Edit-2511-Lightning": _lora_preset(
        "lightx2v/Qwen-Image-Edit-2511-Lightning",
        "Qwen/Qwen-Image-Edit-2511",
        PresetLoRA("lightx2v/Qwen-Image-Edit-2511-Lightning", _LIGHTNING_2511),
        {**_EDIT_PLUS, "num_inference_steps": 4, "cfg_scale": 1.0, "sigma_template": "lightning"},
        "Qwen-Image-Edit-2511 with lightx2v's 4-step Lightning LoRA: 4 steps without CFG, the Lightning schedule.",
    ),
}
PRESETS.update(LORA_PRESETS)


# ControlNet repo -> the files `load_controlnet` fetches (weights and the config.json beside them)
CONTROLNETS: dict[str, tuple[str, ...]] = {
    # 5 dual-stream blocks; canny, soft edge, depth and pose maps (the kind is read from the image)
    "InstantX/Qwen-Image-ControlNet-Union": ("diffusion_pytorch_model.safetensors", "config.json"),
    # 6 blocks; the image with the region to repaint and the mask (68 condition features)
    "InstantX/Qwen-Image-ControlNet-Inpainting": ("diffusion_pytorch_model.safetensors", "config.json"),
    # DiffSynth-Studio's Blockwise ControlNets: one root `model.safetensors` each, no config.json
    **{
        f"DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{kind}": ("model.safetensors",)
        for kind in ("Canny", "Depth", "Inpaint")
    },
}


# Image to LoRA (DiffSynth-Studio/Qwen-Image-i2L; `image_to_lora.py`): the general image encoders and the i2L
# models only (`QwenImageI2LPipeline`), as DiffSynth-Studio's examples/qwen_image/model_inference/Qwen-Image-i2L.py
# loads them. Coarse and Fine also read the Qwen-Image text encoder with Qwen-Image-Edit's processor, and the
# authors append their Bias LoRA to what they make.
_I2L_REPO = "DiffSynth-Studio/Qwen-Image-i2L"
_I2L_PIPELINE = "diffsynth.qwen_image.image_to_lora:QwenImageI2LPipeline"
IMAGE_ENCODER_FILES = (
    PresetFile("DiffSynth-Studio/General-Image-Encoders", "SigLIP2-G384/model.safetensors"),
    PresetFile("DiffSynth-Studio/General-Image-Encoders", "DINOv3-7B/model.safetensors"),
)
I2L_PRESETS: dict[str, Preset] = {
    f"{_I2L_REPO}:style": Preset(
        name=f"{_I2L_REPO}:style",
        files=(*IMAGE_ENCODER_FILES, PresetFile(_I2L_REPO, "Qwen-Image-i2L-Style.safetensors")),
        description="Qwen-Image-i2L Style: a style LoRA for Qwen-Image from a few images (image_to_lora).",
        pipeline=_I2L_PIPELINE,
    ),
    f"{_I2L_REPO}:coarse-fine": Preset(
        name=f"{_I2L_REPO}:coarse-fine",
        files=(
            PresetFile("Qwen/Qwen-Image", "text_encoder/*.safetensors*"),
            *IMAGE_ENCODER_FILES,
            PresetFile(_I2L_REPO, "Qwen-Image-i2L-Coarse.safetensors"),
            PresetFile(_I2L_REPO, "Qwen-Image-i2L-Fine.safetensors"),
        ),
        tokenizer=PresetFile("Qwen/Qwen-Image-Edit", "processor/"),
        defaults={"bias_lora": PresetFile(_I2L_REPO, "Qwen-Image-i2L-Bias.safetensors")},
        description="Qwen-Image-i2L Coarse + Fine + Bias: a content LoRA for Qwen-Image from a few images "
        "(image_to_lora).",
        pipeline=_I2L_PIPELINE,
    ),
}
