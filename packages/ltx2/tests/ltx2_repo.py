"""A tiny random LTX-2 model base laid out like the hub, built offline with our own classes.

`build_tiny_base(base)` writes `Lightricks/LTX-2/ltx-2-19b-dev.safetensors` (DiT, text connectors, video VAE,
audio VAE and vocoder under the released file's prefixes and names) and
`google/gemma-3-12b-it-qat-q4_0-unquantized/` (a tiny `Gemma3ForConditionalGeneration` as `save_pretrained`
writes it, with a tiny offline tokenizer beside it), so the `Lightricks/LTX-2` preset resolves to it with
downloads off. No diffusers needed; `reference_pipeline` builds diffusers' `LTX2Pipeline` from the same
weights (through our converters) for the parity tests, and `write_diffusers_folder` the diffusers layout.

A single file carries no config, so the per-head widths are the release's (128 for video and text, 64 for
audio, one head each) and the vocoder keeps the released kernels and rates: the shapes alone give the models.
Every parameter is random and both VAEs' latent statistics are away from (0, 1).
Loaded by conftest as the module `diffsynth_ltx2_test_repo` (test modules cannot import each other).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffsynth.runtime.testing.weights import random_weights

CAPTIONS = [
    "a cat plays the piano and sings",
    "waves crash on a rocky beach at dawn",
    "a drummer in a small jazz club",
    "blurry, low quality, distorted audio",
]
LTX_REPO, GEMMA_REPO = "Lightricks/LTX-2", "google/gemma-3-12b-it-qat-q4_0-unquantized"
SINGLE_FILE = "ltx-2-19b-dev.safetensors"
MAX_SEQUENCE_LENGTH = 16  # a multiple of the connectors' 8 registers
FRAMES, HEIGHT, WIDTH = 9, 64, 64  # 2 x 2 x 2 video latents, 9 audio latent frames at 24 fps
TEXT_LAYERS, TEXT_WIDTH = 2, 128  # Gemma hidden states: embeddings + 2 layers, 128 wide
TEXT_WIDTH_23 = 3840  # the LTX-2.3 base's Gemma: Gemma-3-12B's width (see build_tiny_base)
TEXT_WIDTH_25, TEXT_LAYERS_25 = 32, 6  # the LTX-2.5 folder's tiny Gemma 4 (`tiny_gemma4_json`)
LTX23_REPO, SINGLE_FILE_23 = "Lightricks/LTX-2.3", "ltx-2.3-22b-dev.safetensors"


def tiny_configs(version: str = "2.0") -> dict:
    """The one place tiny LTX-2 sizes live: our config of each model, by pipeline slot. `version="2.3"` gives
    LTX-2.3's architecture at the same tiny sizes (see `tiny_configs_23`)."""
    from diffsynth.ltx2.audio_vae import LTX2AudioVAEConfig
    from diffsynth.ltx2.connectors import LTX2ConnectorsConfig
    from diffsynth.ltx2.dit import LTX2DiTConfig
    from diffsynth.ltx2.video_vae import LTX2VideoVAEConfig
    from diffsynth.ltx2.vocoder import LTX2VocoderConfig

    if version == "2.3":
        return tiny_configs_23()
    if version == "2.5":
        return tiny_configs_25()
    side = dict(num_heads=1, head_dim=128, num_layers=1, num_registers=8)
    return {
        "dit": LTX2DiTConfig(
            in_channels=8,
            out_channels=8,
            num_heads=1,
            head_dim=128,
            audio_in_channels=8,  # audio latents: 2 channels x 4 mel bins
            audio_out_channels=8,
            audio_num_heads=1,
            audio_head_dim=64,
            num_layers=2,
            caption_channels=TEXT_WIDTH,
        ),
        "connectors": LTX2ConnectorsConfig(
            caption_channels=TEXT_WIDTH,
            text_proj_in_factor=TEXT_LAYERS + 1,
            **{f"video_{k}": v for k, v in side.items()},
            **{f"audio_{k}": v for k, v in side.items()},
        ),
        "vae": LTX2VideoVAEConfig(
            latent_channels=8, encoder_layers=(2, 1, 1, 1, 1), decoder_base_channels=8, decoder_layers=(1, 2, 1, 1)
        ),
        "audio_vae": LTX2AudioVAEConfig(base_channels=8, num_res_blocks=1, latent_channels=2, mel_bins=16),
        "vocoder": LTX2VocoderConfig(
            in_channels=32, hidden_channels=32, resblock_kernel_sizes=(3,), resblock_dilations=((1, 3, 5),)
        ),
    }


def tiny_configs_23() -> dict:
    """LTX-2.3 at tiny sizes: gated attentions and the text cross-attention's AdaLN in the DiT (no caption
    projection: the connectors output the stream widths), per-stream text projections, the four-upsampler video
    VAE, and the BigVGAN vocoder with bandwidth extension. A single file carries no config, so the audio VAE has
    the release's 64 mel bins and the vocoder the release's kernels and rates (only its widths are tiny): the
    shapes alone give the models."""
    from dataclasses import replace

    from diffsynth.ltx2.audio_vae import LTX2AudioVAEConfig
    from diffsynth.ltx2.connectors import LTX2ConnectorsConfig
    from diffsynth.ltx2.dit import LTX2DiTConfig
    from diffsynth.ltx2.video_vae import LTX2VideoVAEConfig
    from diffsynth.ltx2.vocoder import LTX2VocoderWithBWEConfig, release_23_bwe, release_23_vocoder

    stream = dict(num_layers=1, num_registers=8)
    return {
        "dit": LTX2DiTConfig(
            in_channels=16,
            out_channels=16,
            num_heads=1,
            head_dim=128,
            audio_in_channels=16,  # audio latents: 1 channel x 16 mel bins, as wide as the video's (the trainer
            audio_out_channels=16,  # joins both streams' tokens)
            audio_num_heads=1,
            audio_head_dim=64,
            num_layers=2,
            caption_channels=TEXT_WIDTH_23,  # unused: 2.3 has no caption projection
            gated_attention=True,
            cross_attention_adaln=True,
            caption_projection=False,
        ),
        "connectors": LTX2ConnectorsConfig(
            caption_channels=TEXT_WIDTH_23,
            text_proj_in_factor=TEXT_LAYERS + 1,
            per_modality_projections=True,
            projection_bias=True,
            video_gated_attention=True,
            audio_gated_attention=True,
            video_num_heads=1,
            video_head_dim=128,
            audio_num_heads=1,
            audio_head_dim=64,
            **{f"video_{k}": v for k, v in stream.items()},
            **{f"audio_{k}": v for k, v in stream.items()},
        ),
        "vae": LTX2VideoVAEConfig.ltx23(
            latent_channels=16, decoder_base_channels=8, encoder_layers=(1, 1, 1, 1, 1), decoder_layers=(1, 1, 1, 1, 1)
        ),
        "audio_vae": LTX2AudioVAEConfig(  # diffusers sizes the statistics by base_channels: 1 x 64 / 4
            base_channels=16, num_res_blocks=1, latent_channels=1, mel_bins=64
        ),
        "vocoder": LTX2VocoderWithBWEConfig(
            vocoder=replace(
                release_23_vocoder(), hidden_channels=64, resblock_kernel_sizes=(3,), resblock_dilations=((1, 3, 5),)
            ),
            bwe=replace(
                release_23_bwe(), hidden_channels=32, resblock_kernel_sizes=(3,), resblock_dilations=((1, 3, 5),)
            ),
        ),
    }


def tiny_configs_25() -> dict:
    """LTX-2.5 at tiny sizes: 2.3's models, the DiT without its video feed-forward bias and with the keyframe
    embedding, and connectors reading the tiny Gemma-4's `TEXT_WIDTH_25 x (TEXT_LAYERS + 1)` states (a diffusers
    folder's config.json gives them)."""
    from dataclasses import replace

    configs = tiny_configs_23()
    configs["dit"] = replace(configs["dit"], ff_bias=False, keyframes_abs_pos_embedding=True)
    configs["connectors"] = replace(
        configs["connectors"], caption_channels=TEXT_WIDTH_25, text_proj_in_factor=TEXT_LAYERS_25 + 1
    )
    return configs


def gemma_config(vocab_size: int, width: int = TEXT_WIDTH):
    from transformers import Gemma3Config

    text = dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],  # both kinds, as in the 12B (5 local : 1 global)
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=8,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


def tiny_gemma4_json(**text_overrides) -> dict:
    """The one place tiny Gemma 4 sizes live: 6 layers alternating sliding (window 4) and global (head 16, one
    key/value head, keys as values), the last two reusing keys/values; vision and audio embedders to drop."""
    text = dict(
        model_type="gemma4_unified_text",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 3,
        max_position_embeddings=1024,
    )
    text.update(text_overrides)
    vision = dict(patch_size=2, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=8, output_proj_dims=32)
    return dict(
        model_type="gemma4_unified", text_config=text, vision_config=vision, audio_config={"audio_embed_dim": 8}
    )


def gemma4_reference(config_json: dict, seed: int = 0):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    config = Gemma4UnifiedConfig(**{k: v for k, v in config_json.items() if k != "model_type"})
    model = Gemma4UnifiedForConditionalGeneration(config)
    with torch.no_grad():  # layer_scalar is a buffer (random_weights fills parameters): make it matter
        for i, layer in enumerate(model.model.language_model.layers):
            layer.layer_scalar.fill_(0.5 + 0.25 * i)
    return random_weights(model, seed, scale=0.2, is_norm=lambda name, p: "norm" in name).eval()


# weight scales that keep activations in range (the vocoder's tanh unsaturated, the frames mostly unclamped)
SCALES = {"dit": 0.2, "connectors": 0.2, "vae": 0.05, "audio_vae": 0.1, "vocoder": 0.2}
SCALES_23 = {**SCALES, "vocoder": 0.1}  # the BigVGAN vocoder saturates its clamp at 0.2


def tiny_models(seed: int = 0, version: str = "2.0") -> dict[str, torch.nn.Module]:
    """Our five LTX models with seeded random weights and statistics, by pipeline slot."""
    from diffsynth.ltx2.audio_vae import LTX2AudioVAE
    from diffsynth.ltx2.connectors import LTX2TextConnectors
    from diffsynth.ltx2.dit import LTX2DiT
    from diffsynth.ltx2.video_vae import LTX2VideoVAE
    from diffsynth.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    classes = {
        "dit": LTX2DiT,
        "connectors": LTX2TextConnectors,
        "vae": LTX2VideoVAE,
        "audio_vae": LTX2AudioVAE,
        "vocoder": LTX2VocoderWithBWE if version in ("2.3", "2.5") else LTX2Vocoder,
    }
    models = {}
    for i, (slot, config) in enumerate(tiny_configs(version).items()):
        scale = (SCALES_23 if version in ("2.3", "2.5") else SCALES)[slot]
        model = random_weights(classes[slot](config).eval(), seed + i, scale=scale)
        stats = getattr(model, "per_channel_statistics", None)
        if stats is not None:
            generator = torch.Generator().manual_seed(seed + 10 + i)
            mean, std = stats.get_buffer("mean-of-means"), stats.get_buffer("std-of-means")
            mean.copy_(0.3 * torch.randn(mean.shape, generator=generator))
            std.copy_(0.5 + torch.rand(std.shape, generator=generator))
        models[slot] = model
    return models


def single_file_state(models: dict[str, torch.nn.Module], clone: bool = True) -> dict[str, torch.Tensor]:
    """The five models as `ltx-2-19b-dev.safetensors` lays them out: DiT and connectors under
    `model.diffusion_model.` (the aggregate projection at the top level), then `vae.` (with the three
    statistics nobody reads), `audio_vae.` and `vocoder.`."""
    from diffsynth.ltx2.connectors_formats import ours_to_original
    from diffsynth.ltx2.video_vae_formats import UNUSED_STATISTICS

    state = {f"model.diffusion_model.{k}": v for k, v in models["dit"].state_dict().items()}
    state.update(ours_to_original(models["connectors"].state_dict()))
    for prefix in ("vae", "audio_vae", "vocoder"):
        state.update({f"{prefix}.{k}": v for k, v in models[prefix].state_dict().items()})
    channels = models["vae"].config.latent_channels
    device = next(models["vae"].parameters()).device
    state.update(
        {f"vae.{name}": torch.full((channels,), 2.0 + i, device=device) for i, name in enumerate(UNUSED_STATISTICS)}
    )
    if not clone:  # e.g. meta tensors
        return state
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def build_tiny_base(base: Path, seed: int = 0, version: str = "2.0") -> Path:
    """Write the tiny model base (see the module docstring); returns `base`. `version="2.3"` writes
    `Lightricks/LTX-2.3/ltx-2.3-22b-dev.safetensors` instead, with a Gemma of the real 12B's width (3840):
    LTX-2.3's per-stream projections read `width x layers` features, which a file without a config splits
    at Gemma-3-12B's width."""
    from transformers import Gemma3ForConditionalGeneration

    from diffsynth.runtime.testing.tokenizers import build_tiny_gemma_tokenizer

    gemma = base / GEMMA_REPO
    tokenizer = build_tiny_gemma_tokenizer(gemma, texts=CAPTIONS * 4)
    torch.manual_seed(seed)
    width = TEXT_WIDTH_23 if version == "2.3" else TEXT_WIDTH
    text = random_weights(Gemma3ForConditionalGeneration(gemma_config(len(tokenizer), width)), seed + 20)
    text.save_pretrained(gemma)
    repo, name = (LTX23_REPO, SINGLE_FILE_23) if version == "2.3" else (LTX_REPO, SINGLE_FILE)
    (base / repo).mkdir(parents=True, exist_ok=True)
    save_file(single_file_state(tiny_models(seed, version)), str(base / repo / name))
    return base


def our_pipeline(base: Path, version: str = "2.0", **kwargs):
    """Our pipeline from the tiny base through ModelConfig paths (no preset defaults), fp32 on CPU."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.hub import ModelConfig

    gemma = base / GEMMA_REPO
    single = base / LTX23_REPO / SINGLE_FILE_23 if version == "2.3" else base / LTX_REPO / SINGLE_FILE
    return LTX2Pipeline.from_pretrained(
        [
            ModelConfig(path=str(single)),
            ModelConfig(path=sorted(str(p) for p in gemma.glob("model*.safetensors"))),
        ],
        tokenizer_config=ModelConfig(path=str(gemma)),
        device="cpu",
        torch_dtype=torch.float32,
        **kwargs,
    )


# ----------------------------------------------------------------------------------- LTX-2.5 (diffusers folder)
DIFFUSERS_CLASSES = {  # pipeline slot -> (folder, diffusers class name) of an LTX-2.5 diffusers folder
    "dit": ("transformer", "LTX2VideoTransformer3DModel"),
    "connectors": ("connectors", "LTX2TextConnectors"),
    "vae": ("vae", "AutoencoderKLLTX2Video"),
    "audio_vae": ("audio_vae", "AutoencoderKLLTX2Audio"),
    "vocoder": ("vocoder", "LTX2VocoderWithBWE"),
}


def write_tiny_25_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny LTX-2.5 diffusers folder (`Lightricks/LTX-2.5-Diffusers`' layout), written without diffusers: each LTX
    model's weights in diffusers names (our converters) with the config.json diffusers would write, the tiny Gemma 4
    (`Gemma4UnifiedForConditionalGeneration`) under `text_encoder/`, a tokenizer under `tokenizer/`. The DiT's keyframe
    embedding is zero here (its init): diffusers' text-to-video pipeline does not mark the first frame (ltx-core
    does; see test_ltx23.py), so the comparison leaves it out."""
    from diffsynth.ltx2 import audio_vae_formats, connectors_formats, dit_formats, video_vae_formats, vocoder_formats
    from diffsynth.runtime.testing.tokenizers import build_tiny_gemma_tokenizer

    formats = {
        "dit": dit_formats,
        "connectors": connectors_formats,
        "vae": video_vae_formats,
        "audio_vae": audio_vae_formats,
        "vocoder": vocoder_formats,
    }
    models = tiny_models(seed, version="2.5")
    with torch.no_grad():
        models["dit"].keyframes_abs_pos_embedding.zero_()
    configs = diffusers_configs("2.5")
    for slot, (name, class_name) in DIFFUSERS_CLASSES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        state = formats[slot].ours_to_diffusers(models[slot].state_dict())
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(folder / name / "diffusion_pytorch_model.safetensors")
        )
        config = {"_class_name": class_name, **configs[slot]}
        (folder / name / "config.json").write_text(json.dumps(config, default=list))
    tokenizer = build_tiny_gemma_tokenizer(folder / "tokenizer", texts=CAPTIONS * 4)
    gemma4_reference(tiny_gemma4_json(vocab_size=len(tokenizer)), seed + 20).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    return folder


# ----------------------------------------------------------------------------------- LTX-2.5 (split files)
GEMMA_VERSION_25 = "gemma4-12b-ltx-v1"
SPLIT_DURATION_HEAD = dict(hidden_dim=16, num_queries=1, num_heads=2, mlp_dim=16)  # 2 heads: only metadata says


def ltx_core_transformer_config(dit, connectors) -> dict:
    """ltx-core's `config.transformer` (the metadata of the authors' transformer file) for our DiT and connectors."""
    return dict(
        num_attention_heads=dit.num_heads, attention_head_dim=dit.head_dim, in_channels=dit.in_channels,
        out_channels=dit.out_channels, num_layers=dit.num_layers, cross_attention_dim=dit.dim, norm_eps=dit.norm_eps,
        positional_embedding_theta=dit.rope_theta, positional_embedding_max_pos=list(dit.rope_max_pos),
        timestep_scale_multiplier=dit.timestep_scale_multiplier, audio_num_attention_heads=dit.audio_num_heads,
        audio_attention_head_dim=dit.audio_head_dim, audio_in_channels=dit.audio_in_channels,
        audio_out_channels=dit.audio_out_channels, audio_cross_attention_dim=dit.audio_dim,
        audio_positional_embedding_max_pos=[dit.audio_rope_max_pos],
        av_ca_timestep_scale_multiplier=dit.av_ca_timestep_scale_multiplier, rope_type=dit.rope_type,
        frequencies_precision="float64" if dit.rope_double_precision else "float32",
        apply_gated_attention=dit.gated_attention, cross_attention_adaln=dit.cross_attention_adaln,
        use_prompt_adaln_single=dit.prompt_adaln_single, ff_bias=dit.ff_bias, audio_ff_bias=dit.audio_ff_bias,
        use_keyframes_abs_pos_embedding=dit.keyframes_abs_pos_embedding, caption_proj_before_connector=True,
        caption_projection_first_linear=False, caption_proj_input_norm=False, caption_projection_second_linear=False,
        connector_num_attention_heads=connectors.video_num_heads, connector_attention_head_dim=connectors.video_head_dim,
        connector_num_layers=connectors.video_num_layers, audio_connector_num_attention_heads=connectors.audio_num_heads,
        audio_connector_attention_head_dim=connectors.audio_head_dim,
        audio_connector_num_layers=connectors.audio_num_layers,
        connector_positional_embedding_max_pos=[connectors.rope_max_pos],
        connector_apply_gated_attention=connectors.video_gated_attention,
    )  # fmt: skip


def ltx_core_vae_config(vae) -> dict:
    """ltx-core's convolutional `config.vae` for our video VAE config (its block lists from the pixel side)."""
    names = {"space": "compress_space", "time": "compress_time", "all": "compress_all"}
    decoder = [("res_x", {"num_layers": vae.decoder_layers[0]})]
    for i, kind in enumerate(vae.decoder_upsamples):
        params = {"residual": vae.decoder_upsample_residual[i], "multiplier": vae.decoder_width_divisors[i]}
        decoder += [(names[kind], params), ("res_x", {"num_layers": vae.decoder_layers[i + 1]})]
    encoder = [("res_x", {"num_layers": vae.encoder_layers[0]})]
    for i, kind in enumerate(vae.encoder_downsamples):
        encoder += [(names[kind], {"multiplier": vae.encoder_width_multipliers[i]})]
        encoder += [("res_x", {"num_layers": vae.encoder_layers[i + 1]})]
    return dict(
        _class_name="CausalVideoAutoencoder", dims=3, in_channels=vae.in_channels, out_channels=vae.in_channels,
        latent_channels=vae.latent_channels, patch_size=vae.patch_size, encoder_blocks=encoder,
        decoder_blocks=decoder[::-1], decoder_base_channels=vae.decoder_base_channels, causal_decoder=vae.decoder_causal,
        spatial_padding_mode=vae.decoder_padding_mode, encoder_spatial_padding_mode=vae.encoder_padding_mode,
        timestep_conditioning=False, norm_layer="pixel_norm", latent_log_var="uniform",
    )  # fmt: skip


def _comfy_gemma_name(key: str) -> str:
    """ltx-core's packing of a Gemma 4 key into its text encoder file (ComfyUI's names)."""
    for theirs, ours in (
        ("model.language_model.", "model."),
        ("model.vision_embedder.", "vision_model."),
        ("model.embed_vision.", "multi_modal_projector."),
        ("model.embed_audio.", "audio_projector."),
    ):
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def _uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def write_tiny_25_split(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The tiny LTX-2.5 models of `write_tiny_25_folder(seed=seed)` (same weights, same Gemma 4 and tokenizer) as
    the authors' split files (`Lightricks/LTX-2.5`, keys by `split_files.FILES`), with the metadata the authors'
    packer writes: ltx-core's `config` JSON, and in the text encoder file `gemma_config` (with its
    `gemma_version`), the tokenizer as a uint8 `tokenizer_json` tensor and sidecars as `hf_asset__*` tensors.
    Also: the diffusion-decoder video VAE file (the same encoder and a tiny diffusion decoder, `tiny_diffusion_decoder`,
    in the authors' names: fused qkv, gates, a preview head), both latent upsamplers, the distilled LoRA and a duration
    head with 2 pooler heads (which only the metadata gives); one transformer file (the dev one). Returns the
    written paths by `FILES` key."""
    import shutil

    from safetensors import safe_open

    from diffsynth.ltx2.connectors_formats import ours_to_original
    from diffsynth.ltx2.duration_head import LTX2DurationHead, LTX2DurationHeadConfig
    from diffsynth.ltx2.split_files import FILES
    from diffsynth.ltx2.video_vae_formats import UNUSED_STATISTICS
    from diffsynth.runtime.testing.tokenizers import build_tiny_gemma_tokenizer

    paths = {name: folder / rel for name, rel in FILES.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(name: str, state: dict, **metadata) -> None:
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        state = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(state, str(paths[name]), metadata={"format": "pt", **meta})

    models = tiny_models(seed, version="2.5")
    with torch.no_grad():
        models["dit"].keyframes_abs_pos_embedding.zero_()
    dit, connectors = models["dit"].config, models["connectors"].config
    transformer = ltx_core_transformer_config(dit, connectors)
    scheduler = {"sampler": "LinearQuadratic"}
    version = {"model_version": "2.5.0", "gemma_source_checkpoint": {"gemma_version": GEMMA_VERSION_25}}
    # the transformer: DiT and connector blocks; the projections go to the text encoder file
    wired = ours_to_original(models["connectors"].state_dict())
    state = {f"model.diffusion_model.{k}": v for k, v in models["dit"].state_dict().items()}
    state.update({k: v for k, v in wired.items() if k.startswith("model.diffusion_model.")})
    config = {"transformer": transformer, "scheduler": scheduler}
    write("transformer_dev", state, config=config, **version)
    # the text encoder: Gemma 4 flattened as ComfyUI names it, the projections, tokenizer and sidecars
    root = folder / "_gemma_root"
    tokenizer = build_tiny_gemma_tokenizer(root, texts=CAPTIONS * 4)
    gemma4_reference(tiny_gemma4_json(vocab_size=len(tokenizer)), seed + 20).save_pretrained(root)
    with safe_open(str(root / "model.safetensors"), framework="pt") as f:
        state = {_comfy_gemma_name(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state.update({k: v for k, v in wired.items() if k.startswith("text_embedding_projection.")})
    state["tokenizer_json"] = _uint8((root / "tokenizer.json").read_bytes())
    sidecars = {p.name: p.read_bytes() for p in root.glob("*.json") if p.name not in ("config.json", "tokenizer.json")}
    sidecars["processor_config.json"] = json.dumps({"processor_class": "Gemma4UnifiedProcessor"}).encode()
    state.update({f"hf_asset__{name}": _uint8(data) for name, data in sidecars.items()})
    gemma = {**json.loads((root / "config.json").read_text()), "gemma_version": GEMMA_VERSION_25}
    write("text_encoder", state, gemma_config=gemma)
    shutil.rmtree(root)
    # the video VAEs: bare encoder/decoder keys; the diffusion one with stand-in decoder tensors
    vae = models["vae"]
    channels = vae.config.latent_channels
    state = dict(vae.state_dict())
    state.update({name: torch.full((channels,), 2.0 + i) for i, name in enumerate(UNUSED_STATISTICS)})
    write("video_vae_conv", state, config={"vae": ltx_core_vae_config(vae.config)})
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    decoder = tiny_diffusion_decoder(channels, seed + 30, statistics=vae.per_channel_statistics)
    state.update(diffusion_decoder_file_state(decoder, seed + 31))
    encoder = {k: v for k, v in ltx_core_vae_config(vae.config).items() if "decoder" not in k}
    diffusion = {"_class_name": "CausalDiffusionVAE", "encoder": encoder, **ltx_core_diffusion_decoder_config(decoder)}
    write("video_vae", state, config={"vae": diffusion})
    # the audio VAE and vocoder, under the 2.x single files' prefixes
    state = {f"{p}.{k}": v for p in ("audio_vae", "vocoder") for k, v in models[p].state_dict().items()}
    audio = models["audio_vae"].config
    ddconfig = {"ch": audio.base_channels, "z_channels": audio.latent_channels, "mel_bins": audio.mel_bins}
    write("audio_vae", state, config={"audio_vae": {"model": {"params": {"ddconfig": ddconfig}}}, "vocoder": {}})
    # the latent upsamplers (ltx-core's flat config), the distilled LoRA, the duration head
    for name, temporal in (("spatial_upsampler", False), ("temporal_upsampler", True)):
        model = tiny_upsampler(**UPSAMPLER_23, temporal=temporal)
        c = model.config
        fields = ("in_channels", "mid_channels", "num_blocks_per_stage", "dims", "spatial_upsample")
        fields += ("temporal_upsample", "spatial_scale", "rational_resampler")
        write(name, model.state_dict(), config={k: getattr(c, k) for k in fields})
    write("distilled_lora", lora_state(models["dit"]))
    head_config = LTX2DurationHeadConfig(video_dim=dit.dim, audio_dim=dit.audio_dim, **SPLIT_DURATION_HEAD)
    head = random_weights(LTX2DurationHead(head_config).eval(), seed + 40, scale=0.2)
    pooler = dict(
        pooler_hidden_dim=head_config.hidden_dim, num_queries=head_config.num_queries,
        num_pooler_heads=head_config.num_heads, mlp_hidden=head_config.mlp_dim,
    )  # fmt: skip
    state = {f"duration_head.{k}": v for k, v in head.state_dict().items()}
    write("duration_head", state, config={"transformer": transformer, "duration_head": pooler})
    return {name: path for name, path in paths.items() if path.exists()}  # one transformer: the dev one


def tiny_diffusion_decoder(latent_channels: int = 16, seed: int = 30, statistics=None):
    """A tiny LTX-2.5 diffusion video decoder at the release's compression (32 x 32 x 8: 4x4 patches and its four
    upsamplers) for the tiny VAEs' latents, random weights and positive latent statistics, or the VAE's
    `statistics` (the two share one latent space, and the authors' file one set of statistics)."""
    from diffsynth.ltx2.diffusion_decoder import LTX2DiffusionDecoder, LTX2DiffusionDecoderConfig

    config = LTX2DiffusionDecoderConfig(
        latent_channels=latent_channels, head_dim=8, stage_channels=(32, 16, 16, 16, 16), stage_depths=(1, 1, 1, 1, 1),
        stage_kernels=((3, 1, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)), upsample_reductions=(2, 1, 1, 1),
        stage5_kernel=(3, 5, 5), t_emb_dim=32,
    )  # fmt: skip
    model = randomized_decoder(LTX2DiffusionDecoder(config), seed)
    if statistics is not None:
        model.per_channel_statistics.load_state_dict(statistics.state_dict())
    return model


def randomized_decoder(model, seed: int = 0):
    """A diffusion decoder's every tensor random (the zero-initialised tables included), its statistics positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("std-of-means"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


def diffusion_decoder_file_state(decoder, seed: int = 31) -> dict[str, torch.Tensor]:
    """`decoder` in the authors' file names (bare `decoder.*`, shared `per_channel_statistics.*`), with what their
    file has and ours folds or drops: per-block gates of ones (folding them changes nothing) and a preview head."""
    from diffsynth.ltx2.diffusion_decoder_formats import ours_to_authors

    state = ours_to_authors(decoder.state_dict())
    width = decoder.config.stage5_width
    for i in range(decoder.config.stage_depths[-1]):
        for gate in ("gate_msa", "gate_mlp", "gate_ctx"):
            state[f"decoder.diff_blocks.{i}.{gate}"] = torch.ones(width)
    state["decoder.coarse_head.weight"] = torch.randn(4, width, generator=torch.Generator().manual_seed(seed))
    return state


def ltx_core_diffusion_decoder_config(decoder) -> dict:
    """The `vae` metadata fields ltx-core reads for a diffusion decoder (`decoder` and `model_output_type`)."""
    c = decoder.config
    return {
        "model_output_type": c.model_output_type,
        "decoder": {
            "in_channels": c.latent_channels, "patch_size": c.patch_size, "head_dim": c.head_dim,
            "stage_channels": list(c.stage_channels), "stage_depths": list(c.stage_depths),
            "stage_kernels": [list(k) for k in (*c.stage_kernels, c.stage5_kernel)],
            "upsamples": [[list(s), r] for s, r in zip(c.upsample_strides, c.upsample_reductions, strict=True)],
            "stage5_kernel": list(c.stage5_kernel), "t_emb_dim": c.t_emb_dim,
            "default_num_inference_steps": c.num_steps, "timestep_scale_multiplier": c.timestep_scale_multiplier,
        },
    }  # fmt: skip


# ----------------------------------------------------------------------------------- two-stage files
LORA_RANK = 4
UPSAMPLER_FILE, DISTILLED_LORA_FILE = (
    "ltx-2-spatial-upscaler-x2-1.0.safetensors",
    "ltx-2-19b-distilled-lora-384.safetensors",
)


def tiny_upsampler(seed: int = 7, in_channels: int = 8, rational_resampler: bool = True, temporal: bool = False):
    """A spatial x2 latent upsampler for the tiny video VAE's latent channels, random weights; LTX-2.3's
    (`ltx-2.3-spatial-upscaler-x2-1.1`) doubles by a conv and pixel shuffle (`rational_resampler=False`);
    `temporal` makes the temporal x2 one instead (LTX-2.5's `latent-temporal-upscaler-x2`)."""
    from diffsynth.ltx2.upsampler import LTX2LatentUpsampler, LTX2LatentUpsamplerConfig

    config = LTX2LatentUpsamplerConfig(
        in_channels=in_channels, mid_channels=32, num_blocks_per_stage=1, rational_resampler=rational_resampler,
        spatial_upsample=not temporal, temporal_upsample=temporal,
    )  # fmt: skip
    model = LTX2LatentUpsampler(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=generator))
    return model


UPSAMPLER_23 = dict(in_channels=16, rational_resampler=False)  # for `tiny_configs_23`'s 16 latent channels


def fuse_lora(transformer, converted: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A on a diffusers transformer, from diffusers' own renaming of the LoRA keys (its loader
    needs peft)."""
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                up = converted[key.replace("lora_A", "lora_B")]
                modules[name].weight += scale * up @ down


def lora_state(dit, prefix: str = "diffusion_model.", seed: int = 11) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA on every Linear the DiT declares as a LoRA target, in ltx-core names (ComfyUI's
    `diffusion_model.` layout, as `ltx-2-19b-distilled-lora-384.safetensors`), plus the text projection."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in dit.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in dit.lora_target_modules):
            out_f, in_f = module.weight.shape
            state[f"{prefix}{name}.lora_A.weight"] = 0.1 * torch.randn(LORA_RANK, in_f, generator=generator)
            state[f"{prefix}{name}.lora_B.weight"] = 0.1 * torch.randn(out_f, LORA_RANK, generator=generator)
    return state


def write_two_stage_files(folder: Path, dit, version: str = "2.0") -> tuple[Path, Path]:
    """The tiny upsampler and a distilled-LoRA stand-in for `dit`, under the released file names in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    upsampler = tiny_upsampler(**UPSAMPLER_23) if version == "2.3" else tiny_upsampler()
    save_file(upsampler.state_dict(), str(folder / UPSAMPLER_FILE))
    save_file(lora_state(dit), str(folder / DISTILLED_LORA_FILE))
    return folder / UPSAMPLER_FILE, folder / DISTILLED_LORA_FILE


# ----------------------------------------------------------------------------------- diffusers (tests only)
def _kinds(kinds) -> tuple[str, ...]:
    names = {"space": "spatial", "time": "temporal", "all": "spatiotemporal"}
    return tuple(names[k] for k in kinds)


def diffusers_configs(version: str = "2.0") -> dict[str, dict]:
    """The diffusers constructor arguments of `tiny_configs(version)`, by pipeline slot."""
    c = tiny_configs(version)
    dit, vae, audio, vocoder, conn = c["dit"], c["vae"], c["audio_vae"], c["vocoder"], c["connectors"]
    configs = {
        "dit": dict(
            in_channels=dit.in_channels,
            out_channels=dit.out_channels,
            num_attention_heads=dit.num_heads,
            attention_head_dim=dit.head_dim,
            cross_attention_dim=dit.dim,
            audio_in_channels=dit.audio_in_channels,
            audio_out_channels=dit.audio_out_channels,
            audio_num_attention_heads=dit.audio_num_heads,
            audio_attention_head_dim=dit.audio_head_dim,
            audio_cross_attention_dim=dit.audio_dim,
            num_layers=dit.num_layers,
            caption_channels=dit.caption_channels,
            rope_type=dit.rope_type,
        ),
        "vae": diffusers_vae_config(vae),
        "audio_vae": dict(
            base_channels=audio.base_channels,
            ch_mult=audio.ch_mult,
            num_res_blocks=audio.num_res_blocks,
            latent_channels=audio.latent_channels,
            mel_bins=audio.mel_bins,
        ),
        "vocoder": diffusers_bwe_vocoder_config(vocoder)
        if version in ("2.3", "2.5")
        else dict(
            in_channels=vocoder.in_channels,
            hidden_channels=vocoder.hidden_channels,
            out_channels=vocoder.out_channels,
            upsample_kernel_sizes=list(vocoder.upsample_kernel_sizes),
            upsample_factors=list(vocoder.upsample_rates),
            resnet_kernel_sizes=list(vocoder.resblock_kernel_sizes),
            resnet_dilations=[list(d) for d in vocoder.resblock_dilations],
        ),
        "connectors": dict(
            caption_channels=conn.caption_channels,
            text_proj_in_factor=conn.text_proj_in_factor,
            video_connector_num_attention_heads=conn.video_num_heads,
            video_connector_attention_head_dim=conn.video_head_dim,
            video_connector_num_layers=conn.video_num_layers,
            video_connector_num_learnable_registers=conn.video_num_registers,
            audio_connector_num_attention_heads=conn.audio_num_heads,
            audio_connector_attention_head_dim=conn.audio_head_dim,
            audio_connector_num_layers=conn.audio_num_layers,
            audio_connector_num_learnable_registers=conn.audio_num_registers,
            rope_type=conn.rope_type,
        ),
    }
    if version in ("2.3", "2.5"):
        configs["dit"].update(
            gated_attn=True,
            cross_attn_mod=True,
            audio_gated_attn=True,
            audio_cross_attn_mod=True,
            use_prompt_embeddings=False,
            perturbed_attn=True,  # the released 2.3 config's: diffusers' STG pass needs it
        )
        if version == "2.5":
            configs["dit"].update(ff_bias=False, use_keyframes_abs_pos_embedding=True)
        configs["connectors"].update(
            per_modality_projections=True,
            proj_bias=True,
            video_gated_attn=True,
            audio_gated_attn=True,
            video_hidden_dim=dit.dim,
            audio_hidden_dim=dit.audio_dim,
        )
    return configs


def diffusers_vae_config(vae) -> dict:
    """diffusers `AutoencoderKLLTX2Video` arguments of our video VAE config (diffusers lists the decoder from the
    pixel side, each entry the width going into an upsampler)."""
    return dict(
        latent_channels=vae.latent_channels,
        block_out_channels=vae.encoder_widths[1:],
        decoder_block_out_channels=tuple(reversed(vae.decoder_widths[:-1])),
        layers_per_block=vae.encoder_layers,
        decoder_layers_per_block=tuple(reversed(vae.decoder_layers)),
        decoder_spatio_temporal_scaling=(True,) * len(vae.decoder_upsamples),
        decoder_inject_noise=(False,) * len(vae.decoder_layers),
        downsample_type=_kinds(vae.encoder_downsamples),
        upsample_type=_kinds(vae.decoder_upsamples),
        upsample_residual=tuple(reversed(vae.decoder_upsample_residual)),
        upsample_factor=tuple(reversed(vae.decoder_width_divisors)),
        decoder_causal=vae.decoder_causal,
        decoder_spatial_padding_mode=vae.decoder_padding_mode,
        spatial_compression_ratio=vae.spatial_compression,
        temporal_compression_ratio=vae.temporal_compression,
    )


def diffusers_bwe_vocoder_config(config) -> dict:
    """diffusers `LTX2VocoderWithBWE` arguments of our `LTX2VocoderWithBWEConfig`."""

    def generator(c, prefix: str = "") -> dict:
        return {
            f"{prefix}in_channels": c.in_channels,
            f"{prefix}hidden_channels": c.hidden_channels,
            f"{prefix}out_channels": c.out_channels,
            f"{prefix}upsample_kernel_sizes": list(c.upsample_kernel_sizes),
            f"{prefix}upsample_factors": list(c.upsample_rates),
            f"{prefix}resnet_kernel_sizes": list(c.resblock_kernel_sizes),
            f"{prefix}resnet_dilations": [list(d) for d in c.resblock_dilations],
            f"{prefix}act_fn": "snakebeta",
            f"{prefix}antialias": True,
            f"{prefix}final_act_fn": c.final_activation,
            f"{prefix}final_bias": c.final_bias,
        }

    return {
        **generator(config.vocoder),
        **generator(config.bwe, "bwe_"),
        "filter_length": config.n_fft,
        "hop_length": config.stft_hop_length,
        "window_length": config.n_fft,
        "num_mel_channels": config.mel_bins,
        "input_sampling_rate": config.vocoder.sampling_rate,
        "output_sampling_rate": config.bwe.sampling_rate,
    }


# the authors shift the schedule as for 4096 tokens at any size: equal shifts make diffusers' mu that constant
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    use_dynamic_shifting=True,
    base_shift=2.05,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
    time_shift_type="exponential",
)


def diffusers_models(pipe, version: str = "2.0") -> dict:
    """diffusers modules holding the weights of `pipe`'s five LTX models (our converters, strict loads)."""
    import diffusers
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    from diffsynth.ltx2 import audio_vae_formats, connectors_formats, dit_formats, video_vae_formats, vocoder_formats

    classes = {
        "dit": (diffusers.LTX2VideoTransformer3DModel, dit_formats),
        "vae": (diffusers.AutoencoderKLLTX2Video, video_vae_formats),
        "audio_vae": (diffusers.AutoencoderKLLTX2Audio, audio_vae_formats),
        "vocoder": (LTX2VocoderWithBWE if version in ("2.3", "2.5") else LTX2Vocoder, vocoder_formats),
        "connectors": (LTX2TextConnectors, connectors_formats),
    }
    configs = diffusers_configs(version)
    models = {}
    for slot, (cls, formats) in classes.items():
        model = cls(**configs[slot]).eval()
        model.load_state_dict(formats.ours_to_diffusers(getattr(pipe, slot).state_dict()), strict=True)
        models[slot] = model
    return models


def reference_pipeline(pipe, base: Path, version: str = "2.0"):
    """diffusers' `LTX2Pipeline` with `pipe`'s LTX weights and the tiny base's Gemma and tokenizer."""
    import diffusers
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    models = diffusers_models(pipe, version)
    gemma = base / GEMMA_REPO
    return diffusers.LTX2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=models["vae"],
        audio_vae=models["audio_vae"],
        text_encoder=Gemma3ForConditionalGeneration.from_pretrained(gemma).eval(),
        tokenizer=AutoTokenizer.from_pretrained(gemma),
        connectors=models["connectors"],
        transformer=models["dit"],
        vocoder=models["vocoder"],
    )


def conditioned_reference(pipe, base: Path, pipeline_class, version: str = "2.0"):
    """A diffusers LTX-2 pipeline of `pipeline_class` (the condition or in-context one) with `pipe`'s weights, and
    the 3 sigmas (1 down to 1/3, shift mu 2.05, terminal 0) both sides then run."""
    import inspect

    import numpy as np

    components = reference_pipeline(pipe, base, version).components
    accepted = inspect.signature(pipeline_class.__init__).parameters
    reference = pipeline_class(**{k: v for k, v in components.items() if k in accepted})
    reference.set_progress_bar_config(disable=True)
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=2.05)
    return reference, reference.scheduler.sigmas.clone()


def diffusers_call(
    num_frames: int, steps: int = 3, cfg: float = 3.0, audio_cfg: float = 5.0, seed: int = 3, version: str = "2.0"
) -> dict:
    """What the conditioned parity tests pass to a diffusers LTX-2 pipeline besides their conditions: CAPTIONS[0]
    against CAPTIONS[3] at the tiny size and 24 fps, CFG without rescale, no STG or modality isolation (as our
    `stg_scale=0, modality_scale=1, guidance_rescale=0`), the version's audio<->video modulation (2.0:
    `use_cross_timestep=False`, 2.3: True, as our DiT's `cross_modal_mode`), numpy frames."""
    return dict(
        prompt=CAPTIONS[0], negative_prompt=CAPTIONS[3], height=HEIGHT, width=WIDTH, num_frames=num_frames,
        frame_rate=24.0, num_inference_steps=steps, guidance_scale=cfg, audio_guidance_scale=audio_cfg,
        guidance_rescale=0.0, audio_guidance_rescale=0.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
        audio_modality_scale=1.0, use_cross_timestep=version != "2.0", generator=torch.Generator().manual_seed(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np", return_dict=False,
    )  # fmt: skip


def diffusers_prompt_embeds(text_encoder, tokenizer, prompts, max_sequence_length):
    """diffusers' `LTX2Pipeline._get_gemma_prompt_embeds` on a text encoder and tokenizer, on the CPU."""
    import types

    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    holder = types.SimpleNamespace(
        tokenizer=tokenizer, text_encoder=text_encoder, _execution_device=torch.device("cpu")
    )
    return LTX2Pipeline._get_gemma_prompt_embeds(
        holder, prompts, max_sequence_length=max_sequence_length, device=torch.device("cpu"), dtype=torch.float32
    )


def write_diffusers_folder(pipe, base: Path, folder: Path) -> Path:
    """`pipe`'s models as a diffusers-style folder (`transformer/`, `vae/`, ..., `text_encoder/`, `tokenizer/`)."""
    import shutil

    names = {"dit": "transformer", "vae": "vae", "audio_vae": "audio_vae", "vocoder": "vocoder"}
    names["connectors"] = "connectors"
    for slot, model in diffusers_models(pipe).items():
        model.save_pretrained(folder / names[slot])
    gemma = base / GEMMA_REPO
    shutil.copytree(gemma, folder / "text_encoder", ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    shutil.copytree(gemma, folder / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    return folder


def decoded_sound(waveform: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The part of our sound that a reference's (diffusers', the authors') stands for: they return the audio
    decoder's `4 L - 3` mel frames, a few tens of milliseconds short of the clip; we zero-pad the end to the
    video's duration (`LTX2Pipeline.finish`). Checks the padding is zeros and returns the first samples."""
    samples = reference.shape[-1]
    assert waveform.shape[:-1] == reference.shape[:-1] and waveform.shape[-1] >= samples
    assert not waveform[..., samples:].any(), "the padding past the decoded sound must be silence"
    return waveform[..., :samples]
