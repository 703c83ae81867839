"""Known FLUX.1 hub repos: their files and the authors' default generation settings.

Each preset fetches BFL's single-file DiT and `ae.safetensors` (the layouts the DiT and VAE use as
they are) and the diffusers folders of the two text encoders and tokenizers. Defaults follow the
model cards (diffusers `FluxPipeline` / `FluxKontextPipeline` with 28 steps): embedded guidance 3.5
for dev, 4.5 for Krea-dev, 2.5 for Kontext-dev; no true CFG (`cfg_scale` 1). Kontext presets give
no size: the output takes the reference image's, which they resize to the Kontext training resolution nearest
its aspect ratio (`kontext_auto_resize`, as BFL and diffusers do). FLUX.1-schnell (timestep-distilled, no guidance embedder)
samples 4 steps without the time shift (BFL's `shift=False`, diffusers' schnell scheduler config: shift 1,
no dynamic shifting), with T5 prompts of 256 tokens.

FLUX.1 Tools (wider DiT input, `flux1/channels.py`): Fill-dev (`flux_fill_image` + `flux_fill_mask`) with 50 steps
and guidance 30 (its model card, diffusers' `FluxFillPipeline` defaults); Canny-dev (`control_image`) with 50 steps
and guidance 30, Depth-dev with 30 steps and guidance 10 (their model cards). They give no size: the output takes
the condition image's. The Canny / Depth LoRAs (`FLUX.1-Canny-dev-lora`, `-Depth-dev-lora`) are no presets: load
one onto FLUX.1-dev with `pipe.load_lora(...)`.

Flex.2-preview (ostris): its single file with FLUX.1-dev's VAE and text encoders, as DiffSynth-Studio's example
loads it; 50 steps and embedded guidance 3.5 (that example's); no size (a condition image gives it).
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile, PresetLoRA


def _shared_files(repo: str) -> tuple[PresetFile, ...]:
    """The VAE and the two text encoders of a FLUX.1 repo."""
    return (
        PresetFile(repo, "ae.safetensors"),
        PresetFile(repo, "text_encoder/model.safetensors"),
        PresetFile(repo, "text_encoder_2/*.safetensors*"),  # two shards and their index
    )


def _repo_files(repo: str, dit_file: str) -> tuple[PresetFile, ...]:
    return (PresetFile(repo, dit_file), *_shared_files(repo))


def _preset(repo: str, dit_file: str, defaults: dict, description: str) -> Preset:
    return Preset(
        name=repo,
        files=_repo_files(repo, dit_file),
        tokenizer=PresetFile(repo, "tokenizer/"),  # the T5 one is `tokenizer_2/` of the same repo
        defaults=defaults,
        description=description,
    )


PRESETS: dict[str, Preset] = {
    "black-forest-labs/FLUX.1-dev": _preset(
        "black-forest-labs/FLUX.1-dev",
        "flux1-dev.safetensors",
        {"num_inference_steps": 28, "embedded_guidance": 3.5, "cfg_scale": 1.0, "height": 1024, "width": 1024},
        "FLUX.1-dev 12B, guidance-distilled: 28 steps, embedded guidance 3.5.",
    ),
    "black-forest-labs/FLUX.1-Krea-dev": _preset(
        "black-forest-labs/FLUX.1-Krea-dev",
        "flux1-krea-dev.safetensors",
        {"num_inference_steps": 28, "embedded_guidance": 4.5, "cfg_scale": 1.0, "height": 1024, "width": 1024},
        "FLUX.1-Krea-dev 12B (aesthetic fine-tune of dev): 28 steps, embedded guidance 4.5.",
    ),
    "black-forest-labs/FLUX.1-schnell": _preset(
        "black-forest-labs/FLUX.1-schnell",
        "flux1-schnell.safetensors",
        {
            "num_inference_steps": 4,
            "sigma_shift": 1.0,
            "t5_sequence_length": 256,
            "cfg_scale": 1.0,
            "height": 1024,
            "width": 1024,
        },
        "FLUX.1-schnell 12B (Apache-2.0), timestep-distilled: 4 steps, no time shift, no guidance.",
    ),
    "black-forest-labs/FLUX.1-Kontext-dev": _preset(
        "black-forest-labs/FLUX.1-Kontext-dev",
        "flux1-kontext-dev.safetensors",
        {"num_inference_steps": 28, "embedded_guidance": 2.5, "cfg_scale": 1.0, "kontext_auto_resize": True},
        "FLUX.1-Kontext-dev 12B, image editing: pass kontext_images; 28 steps, embedded guidance 2.5.",
    ),
    "black-forest-labs/FLUX.1-Fill-dev": _preset(
        "black-forest-labs/FLUX.1-Fill-dev",
        "flux1-fill-dev.safetensors",
        {"num_inference_steps": 50, "embedded_guidance": 30.0, "cfg_scale": 1.0},
        "FLUX.1-Fill-dev 12B, inpainting / outpainting: pass flux_fill_image and flux_fill_mask (white = repaint); "
        "50 steps, embedded guidance 30.",
    ),
    "black-forest-labs/FLUX.1-Canny-dev": _preset(
        "black-forest-labs/FLUX.1-Canny-dev",
        "flux1-canny-dev.safetensors",
        {"num_inference_steps": 50, "embedded_guidance": 30.0, "cfg_scale": 1.0},
        "FLUX.1-Canny-dev 12B, follows a canny edge map: pass control_image; 50 steps, embedded guidance 30.",
    ),
    "black-forest-labs/FLUX.1-Depth-dev": _preset(
        "black-forest-labs/FLUX.1-Depth-dev",
        "flux1-depth-dev.safetensors",
        {"num_inference_steps": 30, "embedded_guidance": 10.0, "cfg_scale": 1.0},
        "FLUX.1-Depth-dev 12B, follows a depth map: pass control_image; 30 steps, embedded guidance 10.",
    ),
    "ostris/Flex.2-preview": Preset(
        name="ostris/Flex.2-preview",
        files=(
            PresetFile("ostris/Flex.2-preview", "Flex.2-preview.safetensors"),
            *_shared_files("black-forest-labs/FLUX.1-dev"),
        ),
        tokenizer=PresetFile("black-forest-labs/FLUX.1-dev", "tokenizer/"),
        defaults={"num_inference_steps": 50, "embedded_guidance": 3.5, "cfg_scale": 1.0},
        description="Flex.2-preview 8B (ostris, Apache-2.0): text-to-image, inpainting (flex_inpaint_image + "
        "flex_inpaint_mask) and control (flex_control_image) in one model; 50 steps, embedded guidance 3.5.",
    ),
}

# DiffSynth-Studio's EliGen LoRA (regional entity prompts) on FLUX.1-dev, with its example's settings: true CFG 3
# beside the embedded guidance, 50 steps
PRESETS["DiffSynth-Studio/Eligen"] = Preset(
    name="DiffSynth-Studio/Eligen",
    files=PRESETS["black-forest-labs/FLUX.1-dev"].files,
    tokenizer=PRESETS["black-forest-labs/FLUX.1-dev"].tokenizer,
    defaults={**PRESETS["black-forest-labs/FLUX.1-dev"].defaults, "num_inference_steps": 50, "cfg_scale": 3.0},
    description="FLUX.1-dev with DiffSynth-Studio's EliGen LoRA (fused): eligen_entity_prompts + "
    "eligen_entity_masks, 50 steps, true CFG 3, embedded guidance 3.5.",
    loras=(PresetLoRA("DiffSynth-Studio/Eligen", "model_bf16.safetensors"),),
)

# Insert Anything (song-wensong/insert-anything, `flux1/insert_anything.py`): FLUX.1-Fill-dev with the authors' LoRA
# (fused) and FLUX.1-Redux-dev's image encoder and embedder, as DiffSynth-Studio's example lists them; the authors'
# settings (diffusers' FluxFillPipeline defaults): 50 steps, embedded guidance 30, the 1536x768 diptych
PRESETS["HuanJue/Insert-Anything"] = Preset(
    name="HuanJue/Insert-Anything",
    files=(
        *PRESETS["black-forest-labs/FLUX.1-Fill-dev"].files,
        PresetFile("black-forest-labs/FLUX.1-Redux-dev", "image_encoder/model.safetensors"),
        PresetFile("black-forest-labs/FLUX.1-Redux-dev", "image_embedder/diffusion_pytorch_model.safetensors"),
    ),
    tokenizer=PRESETS["black-forest-labs/FLUX.1-Fill-dev"].tokenizer,
    defaults={"num_inference_steps": 50, "embedded_guidance": 30.0, "cfg_scale": 1.0},
    description="Insert Anything on FLUX.1-Fill-dev + Redux: the object insert_anything_ref_mask marks in "
    "insert_anything_ref_image put where insert_anything_source_mask marks in insert_anything_source_image; "
    "50 steps, embedded guidance 30.",
    loras=(PresetLoRA("HuanJue/Insert-Anything", "20250321_steps5000_pytorch_lora_weights.safetensors"),),
)

# DiffSynth-Studio's ArtAug aesthetics LoRA (a differential LoRA, Qwen2-VL-72B's taste) on FLUX.1-dev: the repo's
# `merged_lora.safetensors`, as DiffSynth-Studio's LoRA-Fusion example names it
PRESETS["DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1"] = Preset(
    name="DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1",
    files=PRESETS["black-forest-labs/FLUX.1-dev"].files,
    tokenizer=PRESETS["black-forest-labs/FLUX.1-dev"].tokenizer,
    defaults=PRESETS["black-forest-labs/FLUX.1-dev"].defaults,
    description="FLUX.1-dev with DiffSynth-Studio's ArtAug aesthetics LoRA (fused): FLUX.1-dev's settings.",
    loras=(PresetLoRA("DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1", "merged_lora.safetensors"),),
)

# DiffSynth-Studio's AttriCtrl on FLUX.1-dev: the brightness encoder of its example (`flux1/value_control.py`);
# value_controller_inputs=[0..1] sets the brightness. Other attribute files load with pipe.load_value_controller.
PRESETS["DiffSynth-Studio/AttriCtrl-FLUX.1-Dev"] = Preset(
    name="DiffSynth-Studio/AttriCtrl-FLUX.1-Dev",
    files=(
        *PRESETS["black-forest-labs/FLUX.1-dev"].files,
        PresetFile("DiffSynth-Studio/AttriCtrl-FLUX.1-Dev", "models/brightness.safetensors"),
    ),
    tokenizer=PRESETS["black-forest-labs/FLUX.1-dev"].tokenizer,
    defaults=PRESETS["black-forest-labs/FLUX.1-dev"].defaults,
    description="FLUX.1-dev with DiffSynth-Studio's AttriCtrl brightness encoder: value_controller_inputs=[0..1] "
    "(0 dark, 1 bright).",
)

# DiffSynth-Studio's LoRA Encoder and LoRA Fusion on FLUX.1-dev (`flux1/lora_encoder.py`, `flux1/lora_fusion.py`), the
# files of their examples: lora_encoder_inputs=<LoRA> turns a LoRA into a prompt token; enable_lora_merger() gates
# the LoRAs loaded after it.
for _repo, _what in (
    (
        "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev",
        "LoRA Encoder: lora_encoder_inputs=<a LoRA> acts without its trigger words",
    ),
    (
        "DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev",
        "LoRA Fusion: enable_lora_merger(), then load_lora(...) each LoRA",
    ),
):
    PRESETS[_repo] = Preset(
        name=_repo,
        files=(*PRESETS["black-forest-labs/FLUX.1-dev"].files, PresetFile(_repo, "model.safetensors")),
        tokenizer=PRESETS["black-forest-labs/FLUX.1-dev"].tokenizer,
        defaults=PRESETS["black-forest-labs/FLUX.1-dev"].defaults,
        description=f"FLUX.1-dev with DiffSynth-Studio's {_what}.",
    )

# ByteDance's InfiniteYou on FLUX.1-dev: the stage's InfuseNet (a ControlNet folder) and id projector beside
# FLUX.1-dev's files (`flux1/infiniteyou.py`); the authors' defaults: 30 steps, 864 x 1152, guidance 3.5. The
# default is their aesthetics stage (`aes_stage2`), `:sim` their identity-similarity stage (`sim_stage1`).
for _suffix, _stage, _what in (("", "aes_stage2", "aesthetics"), (":sim", "sim_stage1", "identity similarity")):
    PRESETS[f"ByteDance/InfiniteYou{_suffix}"] = Preset(
        name=f"ByteDance/InfiniteYou{_suffix}",
        files=(
            *PRESETS["black-forest-labs/FLUX.1-dev"].files,
            PresetFile("ByteDance/InfiniteYou", f"infu_flux_v1.0/{_stage}/InfuseNetModel/*"),
            PresetFile("ByteDance/InfiniteYou", f"infu_flux_v1.0/{_stage}/image_proj_model.bin"),
        ),
        tokenizer=PRESETS["black-forest-labs/FLUX.1-dev"].tokenizer,
        defaults={"num_inference_steps": 30, "embedded_guidance": 3.5, "cfg_scale": 1.0, "height": 1152, "width": 864},
        description=f"InfiniteYou (ByteDance, {_what} stage) on FLUX.1-dev: a person with the identity of "
        "infiniteyou_id_image (or infiniteyou_id_embedding); 30 steps, 864x1152.",
    )

# stepfun-ai's Step1X-Edit v1.0 and (`:v1.1`) v1.1 (`step1x.py`): a single file (DiT without guidance embedder + the
# connector; the two versions share the architecture and the authors' code, which only picks the file) and the FLUX.1
# VAE, with Qwen2.5-VL-7B-Instruct as text encoder (its repo root gives the processor and tokenizer); the authors'
# defaults: 28 steps, CFG 6, the reference resized to about 512^2 pixels.
for _suffix, _file, _version in (
    ("", "step1x-edit-i1258.safetensors", "v1.0"),
    (":v1.1", "step1x-edit-v1p1-official.safetensors", "v1.1"),
):
    PRESETS[f"stepfun-ai/Step1X-Edit{_suffix}"] = Preset(
        name=f"stepfun-ai/Step1X-Edit{_suffix}",
        files=(
            PresetFile("stepfun-ai/Step1X-Edit", _file),
            PresetFile("stepfun-ai/Step1X-Edit", "vae.safetensors"),
            PresetFile("Qwen/Qwen2.5-VL-7B-Instruct", "model-*.safetensors"),
        ),
        tokenizer=PresetFile("Qwen/Qwen2.5-VL-7B-Instruct", "*.json"),
        defaults={"num_inference_steps": 28, "cfg_scale": 6.0, "size_level": 512},
        description=f"Step1X-Edit {_version} (stepfun-ai), instruction-based image editing: pass reference_image "
        "(--input-image); 28 steps, CFG 6, about 512x512 pixels at the reference's aspect ratio.",
        pipeline="diffsynth.flux.step1x:Step1XEditPipeline",
        training="diffsynth.flux.step1x_training:Step1XTrainingTask",
    )

# DiffSynth-Studio's Nexus-Gen V2 (`flux1/nexus_gen.py`): its Qwen2.5-VL (`model*.safetensors`, processor from its
# `processor/`) and a decoder file (a fine-tuned FLUX.1 DiT + adapter) with FLUX.1-dev's VAE and text encoders, as its
# examples list them, with their settings: editing (`edit_decoder.bin`, nexus_gen_reference_image) true CFG 2 at
# 512x512, `:generation` (`generation_decoder.bin`) true CFG 3 at 1024x1024; 50 steps, embedded guidance 3.5.
for _suffix, _file, _defaults, _what in (
    ("", "edit_decoder.bin", {"cfg_scale": 2.0, "height": 512, "width": 512}, "image editing: pass "
     "nexus_gen_reference_image (--edit-image) and the instruction; true CFG 2, 512x512"),
    (":generation", "generation_decoder.bin", {"cfg_scale": 3.0, "height": 1024, "width": 1024},
     "text-to-image; true CFG 3, 1024x1024"),
):  # fmt: skip
    PRESETS[f"DiffSynth-Studio/Nexus-GenV2{_suffix}"] = Preset(
        name=f"DiffSynth-Studio/Nexus-GenV2{_suffix}",
        files=(
            PresetFile("DiffSynth-Studio/Nexus-GenV2", "model*.safetensors"),
            PresetFile("DiffSynth-Studio/Nexus-GenV2", _file),
            *_shared_files("black-forest-labs/FLUX.1-dev"),
        ),
        tokenizer=PresetFile("black-forest-labs/FLUX.1-dev", "tokenizer/"),
        defaults={"num_inference_steps": 50, "embedded_guidance": 3.5, **_defaults},
        description=f"Nexus-Gen V2 (DiffSynth-Studio; Qwen2.5-VL-7B + a FLUX.1 decoder), {_what}; 50 steps.",
    )
