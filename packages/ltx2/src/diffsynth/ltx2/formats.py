"""What the LTX-2 package contributes to the runtime: the "ltx2" family with the specs of its models (DiT, text
connectors, video VAE, audio VAE, vocoder, Gemma-3 / Gemma-4 text encoder, latent upsamplers, LTX-2.5's duration
head and diffusion video decoder), presets and pipeline.

One `ltx-2-19b-*.safetensors` / `ltx-2.3-22b-*.safetensors` file holds the five LTX models under their own
prefixes; each spec takes its share, so the file loads whole. Gemma comes from its own repo (LTX-2.5's diffusers
folder has one subfolder a model). LTX-2.5's own files are one a component (`split_files.py`): the text connectors
are split between the transformer file and the text encoder file, so the connectors spec also recognises each of
those files alone (and says where the rest is when asked to build from one).
"""

from __future__ import annotations

from dataclasses import replace

from diffsynth.runtime.registry import Family

from .audio_vae_formats import LTX2_AUDIO_VAE_SPEC
from .connectors_formats import LTX2_CONNECTORS_SPEC
from .diffusion_decoder_formats import LTX2_DIFFUSION_DECODER_SPEC
from .dit_formats import LTX2_DIT_SPEC
from .duration_head_formats import LTX2_DURATION_HEAD_SPEC
from .presets import PRESETS
from .split_files import SPLIT_CONNECTOR_LAYOUTS
from .text_encoder_formats import GEMMA3_TEXT_SPEC, GEMMA4_TEXT_SPEC
from .upsampler_formats import LTX2_UPSAMPLER_SPEC
from .video_vae_formats import LTX2_VIDEO_VAE_SPEC
from .vocoder_formats import LTX2_VOCODER_SPEC

FAMILY = Family(
    name="ltx2",
    specs=(
        LTX2_DIT_SPEC,
        replace(LTX2_CONNECTORS_SPEC, layouts=LTX2_CONNECTORS_SPEC.layouts + SPLIT_CONNECTOR_LAYOUTS),
        LTX2_VIDEO_VAE_SPEC,
        LTX2_AUDIO_VAE_SPEC,
        LTX2_VOCODER_SPEC,
        GEMMA3_TEXT_SPEC,
        GEMMA4_TEXT_SPEC,
        LTX2_UPSAMPLER_SPEC,
        LTX2_DURATION_HEAD_SPEC,
        LTX2_DIFFUSION_DECODER_SPEC,
    ),
    presets=PRESETS,
    pipeline="diffsynth.ltx2.pipeline:LTX2Pipeline",
    training="diffsynth.ltx2.training:LTX2TrainingTask",
    description="LTX-2 19B, LTX-2.3 22B and LTX-2.5 (Lightricks) text-to-video with synchronised audio: audio-video "
    "DiT, Gemma-3-12B (Gemma 4 for 2.5) text encoder with text connectors, 128-channel video VAE, mel audio VAE and vocoder (48 kHz "
    "with bandwidth extension in 2.3)",
)
