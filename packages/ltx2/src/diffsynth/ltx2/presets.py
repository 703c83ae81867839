"""Known LTX-2 hub repos: their files and the authors' default generation settings.

`Lightricks/LTX-2` ships one file per variant holding every LTX model (DiT, text connectors, video VAE,
audio VAE, vocoder); the text encoder is Gemma-3-12B from its own repo, whose tokenizer files sit at
that repo's root. Defaults follow ltx-pipelines (`utils/constants.py` `LTX_2_PARAMS`, the one-stage
`TI2VidOneStagePipeline`): 40 steps, 768x512, 121 frames at 24 fps, CFG 3 on video and 7 on audio,
guidance rescale 0.7, STG 1 at block 29 and modality guidance 3 on both streams.

The distilled variant samples the authors' fixed 8-step table without CFG (their `DistilledPipeline`
then refines a 2x-upsampled latent in a second stage, which needs the spatial upsampler: not built).
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile

REPO = "Lightricks/LTX-2"
GEMMA = "google/gemma-3-12b-it-qat-q4_0-unquantized"
GEMMA_WEIGHTS = PresetFile(GEMMA, "model*.safetensors*")  # five shards and their index
GEMMA_TOKENIZER = PresetFile(GEMMA, "tokenizer*")  # tokenizer.json / .model / _config.json at the root

_SIZE = {"height": 512, "width": 768, "num_frames": 121, "frame_rate": 24.0}

PRESETS: dict[str, Preset] = {
    REPO: Preset(
        name=REPO,
        files=(PresetFile(REPO, "ltx-2-19b-dev.safetensors"), GEMMA_WEIGHTS),
        tokenizer=GEMMA_TOKENIZER,
        defaults={
            **_SIZE,
            "num_inference_steps": 40,
            "cfg_scale": 3.0,
            "audio_cfg_scale": 7.0,
            "guidance_rescale": 0.7,
            "stg_scale": 1.0,
            "audio_stg_scale": 1.0,
            "modality_scale": 3.0,
            "audio_modality_scale": 3.0,
            "spatio_temporal_guidance_blocks": (29,),
        },
        description="LTX-2 19B text-to-video with audio (Lightricks), Gemma-3-12B text encoder: 40 steps, "
        "CFG 3 (video) / 7 (audio), STG 1 (block 29), modality guidance 3, 768x512, 121 frames at 24 fps.",
    ),
    f"{REPO}:distilled": Preset(
        name=f"{REPO}:distilled",
        files=(PresetFile(REPO, "ltx-2-19b-distilled.safetensors"), GEMMA_WEIGHTS),
        tokenizer=GEMMA_TOKENIZER,
        defaults={**_SIZE, "use_distilled_pipeline": True, "num_inference_steps": 8, "cfg_scale": 1.0},
        description="LTX-2 19B distilled (same repo): the authors' fixed 8-step table, no CFG, one stage.",
    ),
}
