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

`Lightricks/LTX-2.3` (22B) has the same three presets with its own files. The authors' 2.3 defaults
(`LTX_2_3_PARAMS`) differ from 2.0's only in 30 steps and STG at block 28; Gemma-3-12B is the same encoder.
Its `:hq` preset (and LTX-2.5's) is their `TI2VidTwoStagesHQPipeline` (`res2s.py`): the two-stage files, the res_2s
sampler in both stages, the distilled LoRA at 0.25 in stage 1 and 0.5 in stage 2, and `LTX_2_3_HQ_PARAMS`: 15 steps,
STG off, guidance rescale 0.45 (video) / 1 (audio), 1920x1088 (stage 1 at 960x544).
`Lightricks/LTX-2.5-Diffusers` is LTX-2.5 in diffusers' folder layout (Gemma 4 under `text_encoder/`); whether its
transformer is the dev or the distilled one is not known here, so the preset sets only the size (the DiT gives
the 2.4+ defaults: 30 guided steps; `use_distilled_pipeline=True` for a distilled transformer).
`Lightricks/LTX-2.5` is LTX-2.5 in the authors' own files (`split_files.py`), with the same four recipes as the
other generations (one-stage, `:two-stage`, `:distilled`) and their DFR pipeline (`:dfr`).
`jd-opensource/JoyAI-Echo` (JD's few-step talking-video model on LTX-2.3: one file holding every LTX model, as
Lightricks' files do) runs as DiffSynth-Studio's example runs it: the distilled 8-step table without CFG in one
stage, at 1280x736 with 241 frames (about 10 s at 24 fps); pass `tiled=True` to decode that size in tiles.
"""

from __future__ import annotations

from dataclasses import replace

from diffsynth.runtime.registry import Preset, PresetFile, PresetLoRA

REPO = "Lightricks/LTX-2"
GEMMA = "google/gemma-3-12b-it-qat-q4_0-unquantized"
GEMMA_WEIGHTS = PresetFile(GEMMA, "model*.safetensors*")  # five shards and their index
GEMMA_TOKENIZER = PresetFile(GEMMA, "tokenizer*")  # tokenizer.json / .model / _config.json at the root

_SIZE = {"height": 512, "width": 768, "num_frames": 121, "frame_rate": 24.0}
_TWO_STAGE_SIZE = {**_SIZE, "height": 1024, "width": 1536}  # the first stage samples 512 x 768
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


def _presets(repo: str, dev: str, distilled: str, upsampler: str, lora: str, full_guidance: dict, name: str):
    """The one-stage, two-stage and distilled presets of one LTX-2 generation."""
    up = PresetFile(repo, upsampler)
    return {
        repo: Preset(
            name=repo,
            files=(PresetFile(repo, dev), GEMMA_WEIGHTS),
            tokenizer=GEMMA_TOKENIZER,
            defaults={**_SIZE, **full_guidance},
            description=f"{name} text-to-video with audio (Lightricks), Gemma-3-12B text encoder: "
            f"{full_guidance['num_inference_steps']} steps, CFG 3 (video) / 7 (audio), STG 1 (block "
            f"{full_guidance['spatio_temporal_guidance_blocks'][0]}), modality guidance 3, 768x512, 121 frames at 24 fps.",
        ),
        f"{repo}:two-stage": Preset(
            name=f"{repo}:two-stage",
            files=(PresetFile(repo, dev), up, GEMMA_WEIGHTS),
            tokenizer=GEMMA_TOKENIZER,
            defaults={**_TWO_STAGE_SIZE, **full_guidance, "use_two_stage_pipeline": True, "stage2_lora": (repo, lora)},
            description=f"{name}, the authors' two-stage pipeline: {full_guidance['num_inference_steps']} guided "
            "steps at 768x512, the x2 latent upsampler, 3 distilled-LoRA steps at 1536x1024; 121 frames at 24 fps.",
        ),
        f"{repo}:distilled": Preset(
            name=f"{repo}:distilled",
            files=(PresetFile(repo, distilled), up, GEMMA_WEIGHTS),
            tokenizer=GEMMA_TOKENIZER,
            defaults={**_TWO_STAGE_SIZE, "use_distilled_pipeline": True, "num_inference_steps": 8, "cfg_scale": 1.0},
            description=f"{name} distilled (same repo), the authors' DistilledPipeline: the fixed 8-step table "
            "without CFG at 768x512, the x2 latent upsampler, 3 more steps at 1536x1024.",
        ),
    }


REPO_23 = "Lightricks/LTX-2.3"
_FULL_GUIDANCE_23 = {**_FULL_GUIDANCE, "num_inference_steps": 30, "spatio_temporal_guidance_blocks": (28,)}
_HQ = {  # ltx-pipelines `LTX_2_3_HQ_PARAMS` and `hq_2_stage_arg_parser`'s LoRA strengths
    "height": 1088,
    "width": 1920,
    "num_inference_steps": 15,
    "cfg_scale": 3.0,
    "audio_cfg_scale": 7.0,
    "guidance_rescale": 0.45,
    "audio_guidance_rescale": 1.0,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 3.0,
    "audio_modality_scale": 3.0,
    "spatio_temporal_guidance_blocks": (),
    "use_hq_pipeline": True,
    "stage1_lora_strength": 0.25,
    "stage2_lora_strength": 0.5,
}
_HQ_DESCRIPTION = (
    "the authors' HQ two-stage pipeline: 15 res_2s steps (CFG 3 / 7, STG off) at 960x544 with the distilled LoRA at "
    "0.25, the x2 latent upsampler, 3 res_2s steps at 1920x1088 with it at 0.5."
)

REPO_25 = "Lightricks/LTX-2.5-Diffusers"
LTX25_DIFFUSERS = Preset(
    name=REPO_25,
    files=tuple(
        PresetFile(REPO_25, f"{folder}/*.safetensors*")
        for folder in ("transformer", "connectors", "vae", "audio_vae", "vocoder", "text_encoder")
    ),
    tokenizer=PresetFile(REPO_25, "tokenizer/"),
    defaults=dict(_SIZE),  # steps, STG block and image CRF follow the loaded DiT (LTX2Pipeline's 2.4+ defaults)
    description="LTX-2.5 (Lightricks) in diffusers' layout: Gemma 4 text encoder, the convolutional video VAE; "
    "the authors' 2.4+ defaults (30 steps, STG block 28, image CRF 18), 768x512, 121 frames at 24 fps.",
)

# LTX-2.5 as the authors publish it (`split_files.py`): one file a component, ComfyUI's folders. The transformer and
# text encoder files hold the text connectors between them; the text encoder file packs the tokenizer too. The
# video VAE is the convolutional one, except in `:distilled-diffvae`, the authors' quick start, whose video VAE file
# pairs the same encoder with the diffusion decoder (`diffusion_decoder.py`; slower, sharper). Without `num_frames`
# the duration head gives the clip's length (the authors' default), within 1 .. 20 s.
REPO_25_SPLIT = "Lightricks/LTX-2.5"
_SPLIT = {
    "dev": "diffusion_models/ltx-2.5-22b-dev-transformer-bf16.safetensors",
    "distilled": "diffusion_models/ltx-2.5-22b-distilled-transformer-bf16.safetensors",
    "text_encoder": "text_encoders/gemma4-12b-with-proj-ltx-2.5-bf16.safetensors",
    "vae": "vae/ltx-2.5-video-vae-conv-bf16.safetensors",
    "diffusion_vae": "vae/ltx-2.5-video-vae-bf16.safetensors",
    "audio_vae": "vae/ltx-2.5-audio-vae-bf16.safetensors",
    "spatial": "latent_upscale_models/ltx-2.5-latent-spatial-upscaler-x2-bf16-1.0.safetensors",
    "temporal": "latent_upscale_models/ltx-2.5-latent-temporal-upscaler-x2-bf16-1.0.safetensors",
    "lora": "loras/ltx-2.5-22b-distilled-lora-450-bf16.safetensors",
    "duration_head": "model_patches/ltx-2.5-duration-head-bf16.safetensors",
}


def _split_files(transformer: str, *extra: str, vae: str = "vae") -> tuple[PresetFile, ...]:
    names = (transformer, "text_encoder", vae, "audio_vae", *extra, "duration_head")
    return tuple(PresetFile(REPO_25_SPLIT, _SPLIT[n]) for n in names)


_SIZE_25 = {k: v for k, v in _SIZE.items() if k != "num_frames"}  # the duration head picks the length
_TWO_STAGE_SIZE_25 = {k: v for k, v in _TWO_STAGE_SIZE.items() if k != "num_frames"}
_DISTILLED = {"use_distilled_pipeline": True, "num_inference_steps": 8, "cfg_scale": 1.0}
LTX25_PRESETS = {
    REPO_25_SPLIT: Preset(
        name=REPO_25_SPLIT,
        files=_split_files("dev"),
        tokenizer=PresetFile(REPO_25_SPLIT, _SPLIT["text_encoder"]),
        defaults=dict(_SIZE_25),  # steps, STG block and image CRF follow the DiT (the authors' 2.4+ defaults)
        description="LTX-2.5 (Lightricks), the authors' files: Gemma 4 text encoder, 30 guided steps at 768x512, "
        "the clip's length from the duration head.",
    ),
    f"{REPO_25_SPLIT}:two-stage": Preset(
        name=f"{REPO_25_SPLIT}:two-stage",
        files=_split_files("dev", "spatial"),
        tokenizer=PresetFile(REPO_25_SPLIT, _SPLIT["text_encoder"]),
        defaults={**_TWO_STAGE_SIZE_25, "use_two_stage_pipeline": True, "stage2_lora": (REPO_25_SPLIT, _SPLIT["lora"])},
        description="LTX-2.5, the authors' two-stage pipeline: guided steps at half size, the x2 latent upsampler, "
        "3 distilled-LoRA steps at 1536x1024.",
    ),
    f"{REPO_25_SPLIT}:distilled": Preset(
        name=f"{REPO_25_SPLIT}:distilled",
        files=_split_files("distilled", "spatial"),
        tokenizer=PresetFile(REPO_25_SPLIT, _SPLIT["text_encoder"]),
        defaults={**_TWO_STAGE_SIZE_25, **_DISTILLED},
        description="LTX-2.5 distilled, the authors' DistilledPipeline (their quick start): the 8-step table without "
        "CFG at half size, the x2 latent upsampler, 3 more steps at 1536x1024.",
    ),
    f"{REPO_25_SPLIT}:distilled-diffvae": Preset(
        name=f"{REPO_25_SPLIT}:distilled-diffvae",
        files=_split_files("distilled", "spatial", vae="diffusion_vae"),
        tokenizer=PresetFile(REPO_25_SPLIT, _SPLIT["text_encoder"]),
        defaults={**_TWO_STAGE_SIZE_25, **_DISTILLED},
        description="LTX-2.5 distilled with the diffusion-decoder video VAE, the authors' quick start file for file: "
        "as :distilled, decoded by the neighbourhood-attention diffusion decoder (sharper, slower, more memory).",
    ),
    f"{REPO_25_SPLIT}:dfr": Preset(
        name=f"{REPO_25_SPLIT}:dfr",
        files=_split_files("dev", "spatial", "temporal"),
        tokenizer=PresetFile(REPO_25_SPLIT, _SPLIT["text_encoder"]),
        defaults={
            **_TWO_STAGE_SIZE_25,
            "height": 704,
            "width": 1216,
            "use_dfr_pipeline": True,
            "stage2_lora": (REPO_25_SPLIT, _SPLIT["lora"]),
        },
        description="LTX-2.5, the authors' DFRPipeline: the dev DiT with the distilled LoRA, keyframe slots at half "
        "size, the x2 upsampler and a detailing pass at 1216x704 (temporal_upsample_rounds for 2x / 4x fps).",
    ),
}

PRESETS: dict[str, Preset] = {
    **_presets(
        REPO,
        "ltx-2-19b-dev.safetensors",
        "ltx-2-19b-distilled.safetensors",
        "ltx-2-spatial-upscaler-x2-1.0.safetensors",
        "ltx-2-19b-distilled-lora-384.safetensors",
        _FULL_GUIDANCE,
        "LTX-2 19B",
    ),
    **_presets(
        REPO_23,
        "ltx-2.3-22b-dev.safetensors",
        "ltx-2.3-22b-distilled-1.1.safetensors",
        "ltx-2.3-spatial-upscaler-x2-1.1.safetensors",
        "ltx-2.3-22b-distilled-lora-384-1.1.safetensors",
        _FULL_GUIDANCE_23,
        "LTX-2.3 22B",
    ),
    REPO_25: LTX25_DIFFUSERS,
    **LTX25_PRESETS,
}


def _hq(repo: str, name: str) -> Preset:
    """`repo`'s `:hq` preset: its `:two-stage` files (the same three roles and distilled LoRA), HQ settings."""
    two = PRESETS[f"{repo}:two-stage"]
    defaults = {k: v for k, v in two.defaults.items() if k != "use_two_stage_pipeline"}
    return replace(two, name=f"{repo}:hq", defaults={**defaults, **_HQ}, description=f"{name}, {_HQ_DESCRIPTION}")


PRESETS.update({f"{r}:hq": _hq(r, name) for r, name in ((REPO_23, "LTX-2.3 22B"), (REPO_25_SPLIT, "LTX-2.5"))})

# The HDR IC-LoRA (`hdr.py`, the authors' `HDRICLoraPipeline`) runs on the distilled 2.3 model with the x2 upsampler
# and reads pre-computed embeddings instead of Gemma: load it with `LTX2HDRPipeline`, which fetches and fuses the
# LoRA (`hdr_lora`) and reads the embeddings file (`prompt_embeddings`, found by pattern: its exact name was not
# checked here) at the first call.
HDR_REPO = "Lightricks/LTX-2.3-22b-IC-LoRA-HDR"
HDR_LORA = "ltx-2.3-22b-ic-lora-hdr-0.9.safetensors"
HDR_EMBEDDINGS = "*emb*.safetensors"
_distilled_23 = PRESETS[f"{REPO_23}:distilled"]
PRESETS[f"{REPO_23}:hdr"] = Preset(
    name=f"{REPO_23}:hdr",
    files=tuple(f for f in _distilled_23.files if f.model_id == REPO_23),  # no Gemma: the embeddings are given
    defaults={"hdr_lora": (HDR_REPO, HDR_LORA), "prompt_embeddings": (HDR_REPO, HDR_EMBEDDINGS)},
    pipeline="diffsynth.ltx2:LTX2HDRPipeline",
    description="LTX-2.3 HDR IC-LoRA video-to-video (load with LTX2HDRPipeline): an SDR video in, linear HDR float "
    "frames out (LogC3 decoded); the distilled model in two stages (8 steps at half size, x2 upsampler, 2 steps), "
    "pre-computed embeddings instead of Gemma.",
)

JOYAI_ECHO = "jd-opensource/JoyAI-Echo"
PRESETS[JOYAI_ECHO] = Preset(
    name=JOYAI_ECHO,
    files=(PresetFile(JOYAI_ECHO, "JoyAI-Echo-release.safetensors"), GEMMA_WEIGHTS),
    tokenizer=GEMMA_TOKENIZER,
    defaults={
        "height": 736,
        "width": 1280,
        "num_frames": 241,
        "frame_rate": 24.0,
        "use_distilled_pipeline": True,
        "use_two_stage_pipeline": False,
        "num_inference_steps": 8,
        "cfg_scale": 1.0,
    },
    description="JoyAI-Echo (JD, on LTX-2.3): talking video with its voice, the distilled 8-step table without CFG "
    "in one stage at 1280x736, 241 frames at 24 fps (DiffSynth-Studio's example; add tiled=True).",
)


# LoRAs of Lightricks that make a model of their own, on their base's `:two-stage` preset (as DiffSynth-Studio's
# examples load them). Camera-control LoRAs are fused (a motion for the whole clip: say it in the prompt, e.g.
# "Dolly-in shot: ..."). IC-LoRAs stay apart (`fuse=False`) and the second stage runs without them
# (`clear_lora_before_state_two`, as the authors' ICLoraPipeline); give their control videos as
# `in_context_videos` (the `-ref0.5` files read them at half the first stage's size: their metadata says so).
CAMERA_MOTIONS = ("Dolly-In", "Dolly-Out", "Dolly-Left", "Dolly-Right", "Jib-Up", "Jib-Down", "Static")
IC_LORAS = {  # repo -> (base, file, what its control videos are)
    "Lightricks/LTX-2-19b-IC-LoRA-Union-Control": (
        REPO,
        "ltx-2-19b-ic-lora-union-control-ref0.5.safetensors",
        "a depth, pose or edge video",
    ),
    "Lightricks/LTX-2-19b-IC-LoRA-Detailer": (REPO, "ltx-2-19b-ic-lora-detailer.safetensors", "a low-detail video"),
    "Lightricks/LTX-2.3-22b-IC-LoRA-Union-Control": (
        REPO_23,
        "ltx-2.3-22b-ic-lora-union-control-ref0.5.safetensors",
        "a depth, pose or edge video",
    ),
    "Lightricks/LTX-2.3-22b-IC-LoRA-Motion-Track-Control": (
        REPO_23,
        "ltx-2.3-22b-ic-lora-motion-track-control-ref0.5.safetensors",
        "a motion-track video (with input_images for the look)",
    ),
}


def _on_two_stage(base: str, repo: str, lora: PresetLoRA, defaults: dict, description: str) -> Preset:
    two = PRESETS[f"{base}:two-stage"]
    return replace(two, name=repo, defaults={**two.defaults, **defaults}, description=description, loras=(lora,))


for _motion in CAMERA_MOTIONS:
    _repo = f"Lightricks/LTX-2-19b-LoRA-Camera-Control-{_motion}"
    PRESETS[_repo] = _on_two_stage(
        REPO,
        _repo,
        PresetLoRA(_repo, f"ltx-2-19b-lora-camera-control-{_motion.lower()}.safetensors"),
        {},
        f"LTX-2 19B two-stage with Lightricks' {_motion} camera-control LoRA (fused); name the shot in the prompt.",
    )
for _repo, (_base, _file, _what) in IC_LORAS.items():
    PRESETS[_repo] = _on_two_stage(
        _base,
        _repo,
        PresetLoRA(_repo, _file, fuse=False),
        {"clear_lora_before_state_two": True},
        f"{_base.split('/')[1]} two-stage with this IC-LoRA (kept apart, off in the second stage): give "
        f"in_context_videos, {_what}.",
    )
