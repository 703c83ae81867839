"""A tiny random FLUX.1 repo laid out like the hub, built offline.

`transformer/` (diffusers layout + config.json), `vae/` (diffusers), `text_encoder/` (CLIP, the hub's
`text_model.*` file names), `text_encoder_2/` (T5 in two shards with an index, `shared.weight` only,
as the hub stores it), `tokenizer/` (CLIP BPE), `tokenizer_2/` (T5 unigram) and `scheduler/`, so
both our `from_pretrained` and diffusers' classes load the same folder. `bfl_copy` lays the same
weights out like the preset expects (`flux1-dev.safetensors` + `ae.safetensors` at the root).
It also loads `helpers.py` as the module `diffsynth_flux_test_helpers`, which the test modules import from.

The DiT keeps FLUX.1's head width (128, RoPE axes 16/56/56) so files without a config.json (BFL
single files) derive the right config; everything else is tiny.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.testing.hub_configs import tiny_vae_config_json
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

helpers = load_beside(__file__, "helpers.py", "diffsynth_flux_test_helpers")


flux2_repo = load_beside(__file__, "flux2_repo.py", "diffsynth_flux2_test_repo")
step1x_repo = load_beside(__file__, "step1x_repo.py", "diffsynth_step1x_test_repo")

CAPTIONS = [
    "a red circle on a blue background",
    "a small green square in the top left corner",
    "a yellow triangle on a black background",
    "bad quality, blurry",
]

DIT_CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

VAE_CONFIG = tiny_vae_config_json(  # FLUX.1's VAE normalisation
    "AutoencoderKL",
    16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

CLIP_CONFIG = {  # vocab_size and token ids are filled in from the tokenizer
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
}

T5_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}

SCHEDULER_CONFIG = {  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


# ----------------------------------------------------------------------------------------- tokenizers
def build_clip_tokenizer(directory: Path):
    """A character-level CLIP BPE (byte alphabet, each also as a word end), specials last as in CLIP."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(str(directory))
    return CLIPTokenizer.from_pretrained(str(directory))


def build_t5_tokenizer(directory: Path):
    """A T5 unigram with <pad>=0, </s>=1, <unk>=2, single characters and a few words; no sentinels."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(ch, -5.0), ("\u2581" + ch, -5.5)]
    words = sorted({w.strip(",") for caption in CAPTIONS for w in caption.split()})
    pieces += [("\u2581" + w, -3.0) for w in words]
    T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(str(directory))
    return T5Tokenizer.from_pretrained(str(directory))


# ----------------------------------------------------------------------------------------- models
def _write(folder: Path, config_json: dict | None, state: dict, filename: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / filename))


def _save_t5_shards(folder: Path, state: dict) -> None:
    """Two shards and an index, `shared.weight` only (the tied copy is not stored), like the hub."""
    keys = [k for k in state if k != "encoder.embed_tokens.weight"]
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:]), strict=True):
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_tiny_repo(root: Path) -> Path:
    from diffsynth.flux.flux1.encoder_formats import CLIP_TEXT_SPEC, T5_ENCODER_SPEC
    from diffsynth.flux.flux1.formats import FLUX1_DIT_SPEC, ours_to_diffusers
    from diffsynth.runtime.models.autoencoder_kl import AUTOENCODER_KL_SPEC

    clip_tok = build_clip_tokenizer(root / "tokenizer")
    t5_tok = build_t5_tokenizer(root / "tokenizer_2")
    clip_config = dict(
        CLIP_CONFIG,
        vocab_size=len(clip_tok),
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    t5_config = dict(T5_CONFIG, vocab_size=len(t5_tok))

    dit = random_weights(
        FLUX1_DIT_SPEC.build(FLUX1_DIT_SPEC.config_from_state({}, DIT_CONFIG)),
        1,
        scale=0.05,
        is_norm=lambda name, p: name.endswith(".scale"),
    )
    _write(root / "transformer", DIT_CONFIG, ours_to_diffusers(dit.state_dict()), "diffusion_pytorch_model.safetensors")
    vae = random_weights(AUTOENCODER_KL_SPEC.build(AUTOENCODER_KL_SPEC.config_from_state({}, VAE_CONFIG)), 2)
    _write(root / "vae", VAE_CONFIG, vae.state_dict(), "diffusion_pytorch_model.safetensors")

    from transformers import CLIPTextConfig, T5Config

    clip = random_weights(CLIP_TEXT_SPEC.build(CLIPTextConfig(**clip_config)), 3, scale=0.2)
    clip_file = {"text_model." + k: v for k, v in clip.state_dict().items()}  # the hub's transformers 4.x names
    _write(root / "text_encoder", clip_config, clip_file, "model.safetensors")
    t5 = random_weights(T5_ENCODER_SPEC.build(T5Config(**t5_config)), 4, scale=0.2)
    (root / "text_encoder_2").mkdir(parents=True, exist_ok=True)
    (root / "text_encoder_2" / "config.json").write_text(json.dumps(t5_config, indent=2))
    _save_t5_shards(root / "text_encoder_2", t5.state_dict())

    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    return root


def bfl_copy(repo: Path, target: Path, dit_file: str = "flux1-dev.safetensors") -> Path:
    """The tiny repo as the presets fetch it: BFL single-file DiT and `ae.safetensors` at the root."""
    from diffsynth.flux.flux1.formats import diffusers_to_ours
    from diffsynth.runtime.checkpoint import open_checkpoint

    target.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(repo / name, target / name)
    dit = open_checkpoint(str(repo / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(diffusers_to_ours({k: dit[k] for k in dit}), str(target / dit_file))
    # the loader recognises files by their keys: diffusers VAE names in `ae.safetensors` load the same
    shutil.copy(repo / "vae" / "diffusion_pytorch_model.safetensors", target / "ae.safetensors")
    return target


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return build_tiny_repo(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_repo):
    return helpers.our_pipeline(tiny_repo)


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, dict]:
    """The tiny config.json dicts (test modules cannot import conftest under importlib mode)."""
    return {"dit": DIT_CONFIG, "vae": VAE_CONFIG, "clip": CLIP_CONFIG, "t5": T5_CONFIG}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead (seconds per call on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' VAE posteriors return their mean when sampled: diffusers encodes condition images (control,
    Fill) with a posterior sample where ours (as DiffSynth-Studio) take the mean, so parity runs compare means."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


@pytest.fixture(scope="session")
def bfl_repo_base(tiny_repo, tmp_path_factory) -> Path:
    """A model base path holding `black-forest-labs/FLUX.1-dev` laid out as the preset fetches it."""
    base = tmp_path_factory.mktemp("models")
    bfl_copy(tiny_repo, base / "black-forest-labs" / "FLUX.1-dev")
    return base


@pytest.fixture(scope="session")
def tiny_klein_repo(tmp_path_factory) -> Path:
    """A tiny FLUX.2-klein repo (see `flux2_repo.py`)."""
    torch.manual_seed(0)
    return flux2_repo.build_tiny_klein_repo(tmp_path_factory.mktemp("tiny-flux2-klein"))


@pytest.fixture(scope="session")
def tiny_klein_pipe(tiny_klein_repo):
    return flux2_repo.our_pipeline(tiny_klein_repo)


@pytest.fixture(scope="session")
def step1x_base(tiny_repo, tmp_path_factory) -> Path:
    """A model base path holding the tiny `stepfun-ai/Step1X-Edit` and Qwen2.5-VL-7B-Instruct (`step1x_repo.py`)."""
    vae = tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"
    return step1x_repo.build_step1x_base(tmp_path_factory.mktemp("step1x-models"), vae)
