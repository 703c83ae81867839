"""DiffSynth-Studio's `DiffSynth-Studio/LTX-2-Repackage` (`repackage.py`): the tiny single file cut as Studio's
`split_model_statedicts.py` cuts the real one (same keys, one file a part) loads to the same models and the same
video; the video VAE's decoder alone does text-to-video and refuses image conditioning; the full-size key list
splits into the seven files, each recognised, the VAE halves building the released VAEs on meta."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2.audio_vae import LTX2AudioVAEConfig
from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.ltx2.repackage import (
    KIND_PREFIXES,
    REPO,
    LTX2AudioDecoderVAE,
    LTX2VideoDecoderVAE,
    repack_kind,
    vae_from_halves,
)
from diffsynth.ltx2.video_vae import LTX2VideoVAE, LTX2VideoVAEConfig
from diffsynth.runtime.checkpoint import open_checkpoint
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

DATA = Path(__file__).parent / "data"
FAST = dict(
    height=repo_module.HEIGHT,
    width=repo_module.WIDTH,
    num_frames=repo_module.FRAMES,
    num_inference_steps=2,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    progress_bar=False,
    seed=0,
    output_type="pt",
)
# the files of Studio's LTX-2 examples, in their order (no audio VAE encoder)
EXAMPLE_FILES = ("transformer", "text_encoder_post_modules", "video_vae_decoder", "audio_vae_decoder", "audio_vocoder")
SLOTS = ("dit", "connectors", "vae", "audio_vae", "vocoder")


def split_like_studio(state: dict) -> dict[str, dict]:
    """The single file's keys by repack file: those under its prefixes (the VAEs' statistics in both halves), the
    DiT without the connectors."""
    connectors = KIND_PREFIXES["text_encoder_post_modules"][1:]
    return {
        kind: {k: v for k, v in state.items() if k.startswith(prefixes)}
        if kind != "transformer"
        else {k: v for k, v in state.items() if k.startswith(prefixes) and not k.startswith(connectors)}
        for kind, prefixes in KIND_PREFIXES.items()
    }


@pytest.fixture(scope="module")
def repack(tiny_ltx2_base, tmp_path_factory) -> Path:
    """A model base holding the tiny repack at `DiffSynth-Studio/LTX-2-Repackage/`."""
    single = open_checkpoint(str(tiny_ltx2_base / repo_module.LTX_REPO / repo_module.SINGLE_FILE))
    base = tmp_path_factory.mktemp("repack-base")
    folder = base / REPO
    folder.mkdir(parents=True)
    for kind, part in split_like_studio({k: single[k] for k in single}).items():
        save_file({k: v.contiguous() for k, v in part.items()}, str(folder / f"{kind}.safetensors"))
    return base


def studio_configs(base: Path, files=EXAMPLE_FILES + ("video_vae_encoder",)) -> list[ModelConfig]:
    local = dict(local_model_path=str(base), skip_download=True)
    return [ModelConfig(model_id=REPO, origin_file_pattern=f"{name}.safetensors", **local) for name in files]


def load(configs: list[ModelConfig], gemma_base: Path) -> LTX2Pipeline:
    gemma = gemma_base / repo_module.GEMMA_REPO
    return LTX2Pipeline.from_pretrained(
        [*configs, ModelConfig(path=sorted(str(p) for p in gemma.glob("model*.safetensors")))],
        tokenizer_config=ModelConfig(path=str(gemma)),
        device="cpu",
        torch_dtype=torch.float32,
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_studio_example_configs_give_the_single_files_models_and_video(repack, tiny_ltx2_base, tiny_ltx2_pipe):
    """Studio's example `ModelConfig`s (the video VAE's encoder given last, in a config of its own) give the five
    models of the single file, the video VAE whole again, and the same 2-step video and audio."""
    pipe = load(studio_configs(repack), tiny_ltx2_base)
    for slot in ("dit", "connectors", "vae", "vocoder"):
        assert same_weights(getattr(pipe, slot), getattr(tiny_ltx2_pipe, slot)), slot
        assert getattr(pipe, slot).config == getattr(tiny_ltx2_pipe, slot).config, slot
    assert type(pipe.vae) is LTX2VideoVAE and isinstance(pipe.audio_vae, LTX2AudioDecoderVAE)
    frames, audio = pipe(repo_module.CAPTIONS[0], **FAST)
    expected_frames, expected_audio = tiny_ltx2_pipe(repo_module.CAPTIONS[0], **FAST)
    assert torch.equal(frames, expected_frames) and torch.equal(audio.waveform, expected_audio.waveform)


def test_local_folder_of_all_files_gives_the_single_files_models(repack, tiny_ltx2_base, tiny_ltx2_pipe):
    """One `ModelConfig(path=folder)` with all seven files: both VAEs whole, every weight the single file's."""
    pipe = load([ModelConfig(path=str(repack / REPO))], tiny_ltx2_base)
    for slot in SLOTS:
        assert same_weights(getattr(pipe, slot), getattr(tiny_ltx2_pipe, slot)), slot
        assert getattr(pipe, slot).config == getattr(tiny_ltx2_pipe, slot).config, slot


def test_video_decoder_alone_does_text_to_video_and_refuses_an_image(repack, tiny_ltx2_base, tiny_ltx2_pipe):
    pipe = load(studio_configs(repack, EXAMPLE_FILES), tiny_ltx2_base)
    assert isinstance(pipe.vae, LTX2VideoDecoderVAE) and not hasattr(pipe.vae, "encoder")
    frames, _ = pipe(repo_module.CAPTIONS[0], **FAST)
    assert torch.equal(frames, tiny_ltx2_pipe(repo_module.CAPTIONS[0], **FAST)[0])
    image = Image.new("RGB", (repo_module.WIDTH, repo_module.HEIGHT), (120, 60, 30))
    with pytest.raises(ConfigError, match="video_vae_encoder.safetensors"):
        pipe(repo_module.CAPTIONS[0], input_images=[image], **FAST)


def test_video_encoder_alone_names_the_decoder_file_and_stays_a_module(repack, tiny_ltx2_base):
    """Not taken for LTX-2.5's encoder-only VAE (whose decoder is the diffusion decoder): the error names the
    repack's decoder file; and `.half()` is still `nn.Module.half` on every half VAE."""
    files = ("transformer", "text_encoder_post_modules", "video_vae_encoder", "audio_vae_decoder", "audio_vocoder")
    pipe = load(studio_configs(repack, files), tiny_ltx2_base)
    with pytest.raises(ConfigError, match="video_vae_decoder.safetensors"):
        pipe(repo_module.CAPTIONS[0], **FAST)
    for module in (pipe.vae, pipe.audio_vae):
        assert module.half() is module and next(module.parameters()).dtype == torch.float16


def test_half_files_are_loaded_strictly(repack, tmp_path):
    """A decoder file lacking a key, halves whose statistics differ, and two transformers are refused by name."""
    decoder = dict(open_checkpoint(str(repack / REPO / "video_vae_decoder.safetensors")))
    encoder = dict(open_checkpoint(str(repack / REPO / "video_vae_encoder.safetensors")))
    lacking = {k: v for k, v in decoder.items() if k != "vae.decoder.conv_out.conv.bias"}
    with pytest.raises(ConfigError, match=r"missing .*decoder\.conv_out\.conv\.bias"):
        vae_from_halves({"decoder": lacking}, label="cut.safetensors")
    other = {
        **decoder,
        "vae.per_channel_statistics.mean-of-means": decoder["vae.per_channel_statistics.mean-of-means"] + 1,
    }
    with pytest.raises(ConfigError, match="mean-of-means"):
        vae_from_halves({"encoder": encoder, "decoder": other}, label="pair")
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("transformer", "transformer_distilled"):
        shutil.copy(repack / REPO / "transformer.safetensors", folder / f"{name}.safetensors")
    with pytest.raises(ConfigError, match="transformer_distilled.safetensors.* are all transformer files"):
        LTX2Pipeline.from_pretrained([ModelConfig(path=str(folder))], device="cpu", torch_dtype=torch.float32)


def test_full_size_keys_split_into_the_seven_files_and_build_the_released_vaes():
    """The real file's key list (`data/ltx2_full.json`) cut as Studio cuts it: every key in one file, each file
    recognised as its kind, and the VAE halves building the released VAEs on meta (one half: that half)."""
    full = {k: torch.empty(v, device="meta") for k, v in json.loads((DATA / "ltx2_full.json").read_text()).items()}
    parts = split_like_studio(full)
    assert set().union(*parts.values()) == set(full)
    assert {kind: repack_kind(list(part)) for kind, part in parts.items()} == {k: k for k in KIND_PREFIXES}
    halves = {side: parts[f"video_vae_{side}"] for side in ("encoder", "decoder")}
    assert vae_from_halves(halves).config == LTX2VideoVAEConfig()
    audio = vae_from_halves({side: parts[f"audio_vae_{side}"] for side in ("encoder", "decoder")})
    assert audio.config == LTX2AudioVAEConfig()
    decoder = vae_from_halves({"decoder": halves["decoder"]})
    released = LTX2VideoVAEConfig()
    assert all(getattr(decoder.config, f) == getattr(released, f) for f in vars(released) if not f.startswith("enc"))
    assert vae_from_halves({"decoder": parts["audio_vae_decoder"]}).config == LTX2AudioVAEConfig()
    assert vae_from_halves({"encoder": halves["encoder"]}).config.encoder_layers == released.encoder_layers
