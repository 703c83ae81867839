"""Known LTX-2 hub repos: their files and the authors' default generation settings.

`Lightricks/LTX-2` ships one file per variant holding every LTX model (DiT, text connectors, video VAE,
audio VAE, vocoder); the text encoder is Gemma-3-12B from its own repo, whose tokenizer files sit at
that repo's root. Defaults follow ltx-pipelines (`utils/constants.py` `LTX_2_PARAMS`, the one-stage
`TI2VidOneStagePipeline`): 40 steps, 768x512, 121 frames at 24 fps, CFG 3 on video and 7 on audio,
guidance rescale 0.7, STG 1 at block 29 and modality guidance 3 on both streams.

`:two-stage` is the authors' recommended `TI2VidTwoStagesPipeline`: the same first stage at half size
(512x768 for the default 1024x1536), the spatial x2 latent upsampler, then 3 distilled steps at full size with
the distilled LoRA at 0.8 (fetched at its first use). `:distilled` is their `DistilledPipeline`: the distilled
model's fixed 8-step table without CFG at half size, the upsampler, and the same 3 steps (no LoRA).
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile

REPO = "Lightricks/LTX-2"
GEMMA = "google/gemma-3-12b-it-qat-q4_0-unquantized"
GEMMA_WEIGHTS = PresetFile(GEMMA, "model*.safetensors*")  # five shards and their index
GEMMA_TOKENIZER = PresetFile(GEMMA, "tokenizer*")  # tokenizer.json / .model / _config.json at the root

_SIZE = {"height": 512, "width": 768, "num_frames": 121, "frame_rate": 24.0}
_TWO_STAGE_SIZE = {**_SIZE, "height": 1024, "width": 1536}  # the first stage samples 512 x 768
UPSAMPLER = PresetFile(REPO, "ltx-2-spatial-upscaler-x2-1.0.safetensors")
DISTILLED_LORA = (REPO, "ltx-2-19b-distilled-lora-384.safetensors")
_FULL_GUIDANCE = {
    "num_inference_steps": 40,
    "cfg_scale": 3.0,
    "audio_cfg_scale": 7.0,
    "guidance_rescale": 0.7,
    "stg_scale": 1.0,
    "audio_stg_scale": 1.0,
    "modality_scale": 3.0,
    "audio_modality_scale": 3.0,
    "spatio_temporal_guidance_blocks": (29,),
}

PRESETS: dict[str, Preset] = {
    REPO: Preset(
        name=REPO,
        files=(PresetFile(REPO, "ltx-2-19b-dev.safetensors"), GEMMA_WEIGHTS),
        tokenizer=GEMMA_TOKENIZER,
        defaults={**_SIZE, **_FULL_GUIDANCE},
        description="LTX-2 19B text-to-video with audio (Lightricks), Gemma-3-12B text encoder: 40 steps, "
        "CFG 3 (video) / 7 (audio), STG 1 (block 29), modality guidance 3, 768x512, 121 frames at 24 fps.",
    ),
    f"{REPO}:two-stage": Preset(
        name=f"{REPO}:two-stage",
        files=(PresetFile(REPO, "ltx-2-19b-dev.safetensors"), UPSAMPLER, GEMMA_WEIGHTS),
        tokenizer=GEMMA_TOKENIZER,
        defaults={**_TWO_STAGE_SIZE, **_FULL_GUIDANCE, "use_two_stage_pipeline": True, "stage2_lora": DISTILLED_LORA},
        description="LTX-2 19B, the authors' two-stage pipeline: 40 guided steps at 768x512, the x2 latent "
        "upsampler, 3 distilled-LoRA steps at 1536x1024; 121 frames at 24 fps.",
    ),
    f"{REPO}:distilled": Preset(
        name=f"{REPO}:distilled",
        files=(PresetFile(REPO, "ltx-2-19b-distilled.safetensors"), UPSAMPLER, GEMMA_WEIGHTS),
        tokenizer=GEMMA_TOKENIZER,
        defaults={**_TWO_STAGE_SIZE, "use_distilled_pipeline": True, "num_inference_steps": 8, "cfg_scale": 1.0},
        description="LTX-2 19B distilled (same repo), the authors' DistilledPipeline: the fixed 8-step table "
        "without CFG at 768x512, the x2 latent upsampler, 3 more steps at 1536x1024.",
    ),
}
