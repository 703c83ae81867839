"""Shared fixtures of the Wan tests: a tiny offline umT5 tokenizer, tiny encoder configs and tiny random
repos laid out like the Wan-AI hub repos.

A tiny repo holds the authors' file names and layouts: `diffusion_pytorch_model.safetensors` (original
DiT keys) with its `config.json` at the root (or under `high_noise_model/` and `low_noise_model/` for
the A14B experts), `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`,
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` for I2V, and the `google/umt5-xxl/`
tokenizer. The encoder files are written in the authors' layouts through the inverse of our mapping
(built independently here from the formats notes), so loading them exercises the real conversion.

Everything heavy is imported inside the builders, so the encoder tests run even while other modules
of the family are being written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from diffsynth.runtime.testing.weights import random_weights

CAPTIONS = [
    "a red circle on a blue background",
    "a small green square in the top left corner",
    "a yellow triangle on a black background",
    "bad quality, blurry, static",
    "一只小狗在草地上奔跑",
]

# The only place tiny encoder sizes live.
TINY_UMT5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
)
TINY_CLIP = dict(  # 2 heads of 64: what the shapes-only config derivation gives for width 128
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
TINY_VAE = dict(base_dim=8)  # Wan 2.1 layout (4 stages, 2 res blocks, z 16: the released latent statistics)
TINY_VAE_22 = dict(variant="2.2", base_dim=16, decoder_base_dim=16)  # z 48, 16x spatial, residual stages
TINY_DIT = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_len=512)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
TOKENIZER_DIR = "google/umt5-xxl"


# ----------------------------------------------------------------------------------------- helpers
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights everywhere (norm weights near 1), so no path hides behind a zero init."""
    return random_weights(
        module, seed, scale=0.2, is_norm=lambda name, p: (p.dim() == 1 and "norm" in name) or name.endswith("gamma")
    )


def build_umt5_tokenizer(directory, texts=None, vocab_size: int = 200):
    """A umT5-shaped tokenizer trained offline: sentencepiece-style unigram, `<pad>`=0, `</s>`=1, `<unk>`=2,
    `</s>` appended, right padding (what the Wan pipelines rely on; only the vocabulary is tiny)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(list(texts or CAPTIONS) * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=512,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def umt5_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `UMT5EncoderModel` names -> the authors' `T5Encoder` names (formats notes, section 4)."""
    parts = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"]}
    for key, value in state.items():
        if key.startswith("encoder.block."):
            index, rest = key[len("encoder.block.") :].split(".", 1)
            out[f"blocks.{index}.{parts[rest]}"] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers `CLIPVisionModel` names -> the authors' open-clip file: `visual.*` with fused qkv, plus
    a (random, unused) text tower, projection head and logit scale, as in the released file."""
    g = torch.Generator().manual_seed(seed)
    d = state["embeddings.class_embedding"].shape[0]
    out = {
        "visual.cls_embedding": state["embeddings.class_embedding"].reshape(1, 1, d),
        "visual.pos_embedding": state["embeddings.position_embedding.weight"][None],
        "visual.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
        "visual.pre_norm.weight": state["pre_layrnorm.weight"],
        "visual.pre_norm.bias": state["pre_layrnorm.bias"],
        "visual.post_norm.weight": state["post_layernorm.weight"],
        "visual.post_norm.bias": state["post_layernorm.bias"],
        "visual.head": torch.randn(d, 16, generator=g),
        "log_scale": torch.tensor(4.6052),
        "textual.token_embedding.weight": torch.randn(50, 16, generator=g),
        "textual.blocks.0.attn.q.weight": torch.randn(16, 16, generator=g),
    }
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.to_qkv.{p}"] = torch.cat([state[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[dst + f"attn.proj.{p}"] = state[src + f"self_attn.out_proj.{p}"]
            out[dst + f"norm1.{p}"] = state[src + f"layer_norm1.{p}"]
            out[dst + f"norm2.{p}"] = state[src + f"layer_norm2.{p}"]
            out[dst + f"mlp.0.{p}"] = state[src + f"mlp.fc1.{p}"]
            out[dst + f"mlp.2.{p}"] = state[src + f"mlp.fc2.{p}"]
    return out


def tiny_umt5(vocab_size: int, seed: int = 3):
    """A random transformers `UMT5EncoderModel` at the tiny size (the reference for our loads)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return randomize(UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TINY_UMT5)), seed).eval()


def tiny_clip(seed: int = 4):
    """A random transformers `CLIPVisionModel` at the tiny size."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return randomize(CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)), seed).eval()


# ----------------------------------------------------------------------------------------- DiffSynth-Studio's code
STUDIO_MIRROR = Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")


def studio_source(path: str) -> str:
    """A file of DiffSynth-Studio (its git mirror's HEAD), for tests that check our models against its; skips the
    test where the mirror or the file is absent (CI machines have no mirror)."""
    if not (STUDIO_MIRROR / "HEAD").exists() and not (STUDIO_MIRROR / ".git").exists():
        pytest.skip("the DiffSynth-Studio git mirror is not on this machine")
    out = subprocess.run(["git", "-C", str(STUDIO_MIRROR), "show", f"HEAD:{path}"], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"{path} is not in the DiffSynth-Studio mirror")
    return out.stdout


# ----------------------------------------------------------------------------------------- tiny repos
def _save_dit(folder: Path, kind: str, z_dim: int, seed: int, image_dim: int | None = None) -> None:
    """A tiny DiT in the original layout with the authors' style `config.json` ("vace": a T2V DiT with
    control blocks after both layers, written as the authors' `VaceWanModel` config)."""
    from safetensors.torch import save_file

    from diffsynth.wan.dit import WanDiT, WanDiTConfig

    fields = dict(TINY_DIT, in_dim=z_dim, out_dim=z_dim, text_dim=TINY_UMT5["d_model"], model_type=kind)
    if kind == "i2v":
        fields.update(in_dim=2 * z_dim + 4, has_image_input=image_dim is not None, image_dim=image_dim or 1280)
    if kind == "vace":
        fields.update(model_type="t2v", vace_layers=(0, 1), vace_in_dim=2 * z_dim + 64)
    if kind == "fun_control":  # Wan2.1-Fun-V1.1-Control: noise + control + image latent, CLIP, ref_conv
        fields.update(model_type="i2v", in_dim=3 * z_dim, has_image_input=True, image_dim=image_dim, ref_conv=True)
    if kind == "fun_control_a14b":  # a Wan2.2-Fun-A14B-Control expert: noise + control + mask + image latent
        fields.update(model_type="i2v", in_dim=3 * z_dim + 4, ref_conv=True)
    if kind == "fun_camera":  # Wan2.1-Fun-V1.1-Control-Camera: noise + first-frame latent, CLIP, camera adapter
        fields.update(
            model_type="i2v", in_dim=2 * z_dim, has_image_input=True, image_dim=image_dim, camera_adapter_dim=24
        )
    model = randomize(WanDiT(WanDiTConfig(**fields)), seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )
    config_json = {"_class_name": "WanModel", **{k: v for k, v in fields.items() if k != "has_image_input"}}
    if kind == "vace":
        config_json.update(_class_name="VaceWanModel", model_type="vace", vace_layers=list(fields["vace_layers"]))
    if kind in ("fun_control", "fun_control_a14b"):
        config_json.update(model_type="i2v", add_ref_conv=config_json.pop("ref_conv"))
    if kind == "fun_camera":  # as PAI's config.json: the adapter named by its own fields
        config_json.update(add_control_adapter=True, in_dim_control_adapter=config_json.pop("camera_adapter_dim"))
    config_json["patch_size"] = [1, 2, 2]
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))


def _save_vae(root: Path, fields: dict, seed: int) -> None:
    from diffsynth.runtime.models.wan_vae import WanVAE, WanVAEConfig

    model = randomize(WanVAE(WanVAEConfig(**fields)), seed)
    name = "Wan2.2_VAE.pth" if fields.get("variant") == "2.2" else "Wan2.1_VAE.pth"
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, root / name)


def build_tiny_repo(root: Path, kind: str = "t2v") -> Path:
    """`kind`: "t2v" (Wan2.1-T2V), "i2v" (Wan2.1-I2V, with CLIP), "a14b" (Wan2.2-T2V-A14B experts),
    "i2v_a14b" (Wan2.2-I2V-A14B: y channels, no CLIP), "ti2v" (Wan2.2-TI2V-5B with the 2.2 VAE), "vace"
    (Wan2.1-VACE: a T2V DiT with the control branch), "vace_a14b" (Wan2.2-VACE-Fun-A14B: two such experts),
    "fun_control" (Wan2.1-Fun-V1.1-Control: control channels, CLIP and a reference input), "fun_a14b"
    (Wan2.2-Fun-A14B-Control: two experts, control + mask + image channels, a reference input, no CLIP),
    "fun_camera" (Wan2.1-Fun-V1.1-Control-Camera: the first frame's latent, CLIP and the camera adapter)."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_umt5_tokenizer(root / TOKENIZER_DIR)
    torch.save(umt5_to_original(tiny_umt5(len(tokenizer)).state_dict()), root / T5_FILE)
    if kind == "ti2v":
        _save_vae(root, TINY_VAE_22, seed=2)
        _save_dit(root, "ti2v", z_dim=48, seed=1)
        return root
    _save_vae(root, TINY_VAE, seed=2)
    if kind in ("t2v", "vace"):
        _save_dit(root, kind, z_dim=16, seed=1)
    elif kind in ("i2v", "fun_control", "fun_camera"):
        _save_dit(root, kind, z_dim=16, seed=1, image_dim=TINY_CLIP["hidden_size"])
        torch.save(clip_to_original(tiny_clip().state_dict()), root / CLIP_FILE)
    elif kind in ("a14b", "i2v_a14b", "vace_a14b", "fun_a14b"):
        expert = {"a14b": "t2v", "i2v_a14b": "i2v", "vace_a14b": "vace", "fun_a14b": "fun_control_a14b"}[kind]
        _save_dit(root / "high_noise_model", expert, z_dim=16, seed=1)
        _save_dit(root / "low_noise_model", expert, z_dim=16, seed=5)
    else:
        raise ValueError(f"unknown tiny repo kind {kind!r}")
    return root


@pytest.fixture(scope="session")
def umt5_tokenizer(tmp_path_factory):
    return build_umt5_tokenizer(tmp_path_factory.mktemp("umt5-tokenizer"))


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """Tiny Wan2.1-T2V-style repo."""
    torch.manual_seed(0)
    return build_tiny_repo(tmp_path_factory.mktemp("tiny-wan-t2v"), "t2v")


@pytest.fixture(scope="session")
def tiny_repo_factory(tmp_path_factory):
    """`make(kind)` builds (once per session) a tiny repo of that kind (see `build_tiny_repo`)."""
    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_repo(tmp_path_factory.mktemp(f"tiny-wan-{kind}"), kind)
        return built[kind]

    return make


@pytest.fixture(scope="session")
def tiny_sizes():
    """The tiny encoder sizes and helpers, for tests that build their own reference models."""
    import types

    return types.SimpleNamespace(
        umt5=TINY_UMT5,
        clip=TINY_CLIP,
        tiny_umt5=tiny_umt5,
        tiny_clip=tiny_clip,
        umt5_to_original=umt5_to_original,
        clip_to_original=clip_to_original,
        randomize=randomize,
        captions=CAPTIONS,
    )
