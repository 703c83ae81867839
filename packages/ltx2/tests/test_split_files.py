"""LTX-2.5's split files (`Lightricks/LTX-2.5`, one file a component; `split_files.py`): each file is told apart,
loads strictly into our models with the configs its metadata gives, and gives the same models (configs and
tensors) as the same tiny weights in diffusers' layout (`write_tiny_25_folder`), the Gemma 4 config and tokenizer
read from the text encoder file; missing or unexpected keys are errors naming the file and the key."""

from __future__ import annotations

import json
from dataclasses import replace

import diffsynth_ltx2_test_repo as repo  # loaded by conftest
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from diffsynth.ltx2 import dit_formats, video_vae_formats
from diffsynth.ltx2.split_files import (
    FILES,
    configs_from_metadata,
    gemma_assets,
    gemma_tokenizer,
    load_split,
    load_video_encoder,
    split_kind,
    vae_fields,
)
from diffsynth.runtime.checkpoint import open_checkpoint
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.loading import load_models
from diffsynth.runtime.models.wan_vae import patchify

F32 = torch.float32
DIFFUSERS_FOLDERS = {"dit": "transformer", "connectors": "connectors", "text_encoder": "text_encoder"}
DIFFUSERS_FOLDERS.update(vae="vae", audio_vae="audio_vae", vocoder="vocoder")


@pytest.fixture(scope="module")
def tiny_25(tmp_path_factory):
    """The same tiny LTX-2.5 weights as a diffusers folder and as the authors' split files."""
    base = tmp_path_factory.mktemp("tiny-ltx25")
    return repo.write_tiny_25_folder(base / "diffusers"), repo.write_tiny_25_split(base / "split")


def diffusers_model(folder, slot: str):
    (loaded,) = load_models(folder / DIFFUSERS_FOLDERS[slot], F32)
    return loaded


def assert_same(split, reference) -> None:
    """Same config, same tensors (names and values, exactly)."""
    if hasattr(split.config, "to_json_string"):  # a transformers config (per-layer fields refuse `==`)
        assert split.config.to_json_string() == reference.config.to_json_string()
    else:
        assert split.config == reference.config
    ours, theirs = split.module.state_dict(), reference.module.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def rewrite(src, dst, drop: str | None = None, add: dict | None = None):
    """`src` saved as `dst` with one key dropped and/or keys added, metadata kept."""
    with safe_open(str(src), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118
        metadata = f.metadata()
    state.update(add or {})
    save_file(state, str(dst), metadata=metadata)
    return dst


# ----------------------------------------------------------------------------------------- recognition
def test_each_split_file_is_told_apart(tiny_25):
    folder, paths = tiny_25
    kinds = {name: split_kind(open_checkpoint(p), open_checkpoint(p).metadata) for name, p in paths.items()}
    assert kinds == {
        "transformer_dev": "transformer",
        "text_encoder": "text_encoder",
        "video_vae": "video_vae_diffusion",
        "video_vae_conv": "video_vae",
        "audio_vae": "audio_vae",
        "spatial_upsampler": "upsampler",
        "temporal_upsampler": "upsampler",
        "distilled_lora": "lora",
        "duration_head": "duration_head",
    }
    single = repo.single_file_state(repo.tiny_models(version="2.3"), clone=False)  # a 2.x single file is not one
    assert split_kind(single, {}) is None
    assert split_kind(open_checkpoint(folder / "vae"), {}) is None  # nor diffusers' vae/
    with pytest.raises(ConfigError, match=rf"{paths['distilled_lora']} is .*load_lora"):
        load_split(paths["distilled_lora"])
    with pytest.raises(ConfigError, match=rf"{paths['video_vae']} is the diffusion-decoder .*on its own"):
        load_split([paths["video_vae"], paths["duration_head"]])


# ----------------------------------------------------------------------------------------- same models
def test_transformer_and_text_encoder_load_as_the_diffusers_folder(tiny_25):
    folder, paths = tiny_25
    loaded = {m.role: m for m in load_split([paths["transformer_dev"], paths["text_encoder"]], F32)}
    assert {role: m.layout for role, m in loaded.items()} == {
        "dit": "original",
        "connectors": "original_2.3",
        "text_encoder": "ltx_split",
    }
    for role, model in loaded.items():
        assert_same(model, diffusers_model(folder, role))
    # the Gemma config comes from the metadata alone: hidden states equal those of the folder's model
    tokenizer = gemma_tokenizer(paths["text_encoder"])
    tokens = tokenizer(["a cat sings", repo.CAPTIONS[1]], padding=True, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    assert not mask.all()  # one prompt is left-padded
    reference = diffusers_model(folder, "text_encoder").module
    with torch.no_grad():
        for ours, theirs in zip(
            loaded["text_encoder"].module.hidden_states_at(ids, mask),
            reference.hidden_states_at(ids, mask),
            strict=True,
        ):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_gemma_config_and_tokenizer_come_from_the_file(tiny_25):
    folder, paths = tiny_25
    config, tokenizer_json, sidecars = gemma_assets(paths["text_encoder"])
    saved = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert config == {**saved, "gemma_version": repo.GEMMA_VERSION_25}
    assert json.loads(tokenizer_json)["model"]["type"] == "BPE"
    assert {"tokenizer_config.json", "processor_config.json"} <= set(sidecars)
    ours, theirs = gemma_tokenizer(paths["text_encoder"]), AutoTokenizer.from_pretrained(folder / "tokenizer")
    kwargs = dict(padding="max_length", max_length=repo.MAX_SEQUENCE_LENGTH, truncation=True)
    assert ours(repo.CAPTIONS, **kwargs).data == theirs(repo.CAPTIONS, **kwargs).data
    assert (ours.pad_token_id, ours.bos_token_id, ours.padding_side) == (0, 2, "left")


def test_vaes_upsamplers_and_duration_head(tiny_25):
    folder, paths = tiny_25
    (vae,) = load_split(paths["video_vae_conv"], F32)
    assert_same(vae, diffusers_model(folder, "vae"))
    audio = {m.role: m for m in load_split(paths["audio_vae"], F32)}
    assert sorted(audio) == ["audio_vae", "vocoder"]
    for role, model in audio.items():
        assert_same(model, diffusers_model(folder, role))
    for name, temporal in (("spatial_upsampler", False), ("temporal_upsampler", True)):
        (up,) = load_split(paths[name], F32)
        expected = repo.tiny_upsampler(**repo.UPSAMPLER_23, temporal=temporal)
        assert up.config == expected.config
        assert all(torch.equal(up.module.state_dict()[k], v) for k, v in expected.state_dict().items())
    (head,) = load_split(paths["duration_head"], F32)
    assert head.config.num_heads == repo.SPLIT_DURATION_HEAD["num_heads"]  # the metadata's; shapes say nothing
    (plain,) = load_models(paths["duration_head"], F32)
    assert plain.config.num_heads != head.config.num_heads


def test_diffusion_decoder_of_the_diffusion_vae_file(tiny_25):
    """The file's `decoder.*` (fused qkv, gates of ones, a preview head) and statistics load strictly as the
    diffusion decoder, with the metadata's config; its encoder as an encoder-only VAE (`roles` picks either)."""
    _, paths = tiny_25
    assert [m.role for m in load_split(paths["video_vae"], F32)] == ["vae", "diffusion_decoder"]
    (loaded,) = load_split(paths["video_vae"], F32, roles={"diffusion_decoder"})
    (vae,) = load_split(paths["video_vae_conv"], F32)
    expected = repo.tiny_diffusion_decoder(16, seed=30, statistics=vae.module.per_channel_statistics)
    assert (loaded.role, loaded.config) == ("diffusion_decoder", expected.config)
    state = loaded.module.state_dict()
    assert sorted(state) == sorted(expected.state_dict())
    assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())
    (encoder,) = load_split(paths["video_vae"], F32, roles={"vae"})
    assert type(encoder.module).__name__ == "LTX2VideoEncoderVAE" and not hasattr(encoder.module, "decoder")
    assert load_split(paths["video_vae"], F32, roles={"dit"}) == []


def test_video_encoder_of_the_diffusion_vae_file(tiny_25):
    folder, paths = tiny_25
    module, config = load_video_encoder(paths["video_vae"], F32)
    vae = diffusers_model(folder, "vae").module
    fields = ("latent_channels", "patch_size", "encoder_layers", "encoder_downsamples", "encoder_width_multipliers")
    assert all(getattr(config, f) == getattr(vae.config, f) for f in fields)
    video = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = module["encoder"](patchify(video, config.patch_size))[:, :-1]
        mean, std = module["per_channel_statistics"].stats(z, (1, -1, 1, 1, 1))
        torch.testing.assert_close((z - mean) / std, vae.encode(video), rtol=0, atol=0)


def test_text_encoder_file_packed_with_transformers_names(tiny_25, tmp_path):
    """Files packed before ComfyUI's renames keep `model.language_model.*` and the transformers embedder names."""
    folder, paths = tiny_25
    back = {"vision_model.": "model.vision_embedder.", "multi_modal_projector.": "model.embed_vision."}
    back.update({"audio_projector.": "model.embed_audio.", "model.": "model.language_model."})
    with safe_open(str(paths["text_encoder"]), framework="pt") as f:
        state, metadata = {}, f.metadata()
        for key in f.keys():  # noqa: SIM118
            old = next((p for p in back if key.startswith(p)), None)
            state[back[old] + key[len(old) :] if old else key] = f.get_tensor(key)
    save_file(state, str(tmp_path / "te.safetensors"), metadata=metadata)
    loaded = {m.role: m for m in load_split([paths["transformer_dev"], tmp_path / "te.safetensors"], F32)}
    assert loaded["text_encoder"].layout == "transformers"
    assert_same(loaded["text_encoder"], diffusers_model(folder, "text_encoder"))


# ----------------------------------------------------------------------------------------- metadata
def test_metadata_gives_what_shapes_cannot(tiny_25):
    _, paths = tiny_25
    dit, connectors = repo.tiny_configs("2.5")["dit"], repo.tiny_configs("2.5")["connectors"]
    transformer = repo.ltx_core_transformer_config(dit, connectors)
    transformer.update(num_attention_heads=2, attention_head_dim=64, positional_embedding_theta=500.0)
    metadata = {"config": json.dumps({"transformer": transformer})}
    meta = {k: v for k, v in open_checkpoint(paths["transformer_dev"]).meta_state_dict().items()}
    ours = {k.removeprefix(dit_formats.PREFIX): v for k, v in meta.items() if "embeddings_connector" not in k}
    config = dit_formats.config_from_state(ours, configs_from_metadata(metadata)["dit"])
    assert (config.num_heads, config.head_dim, config.rope_theta) == (2, 64, 500.0)
    assert config == replace(dit, num_heads=2, head_dim=64, rope_theta=500.0)
    # the conv decoder's residual flags, which the shapes leave to the released defaults
    vae_config = repo.tiny_configs("2.5")["vae"]
    flagged = replace(vae_config, decoder_upsample_residual=(True, False, False, False))
    state = {k: v for k, v in open_checkpoint(paths["video_vae_conv"]).meta_state_dict().items()}
    state = video_vae_formats.original_to_ours(state)
    assert video_vae_formats.config_from_state(state, None) == vae_config
    from_metadata = video_vae_formats.config_from_state(state, vae_fields(repo.ltx_core_vae_config(flagged)))
    assert from_metadata == flagged


# ----------------------------------------------------------------------------------------- errors
def test_connectors_need_both_files(tiny_25):
    folder, paths = tiny_25
    with pytest.raises(ConfigError, match=rf"{paths['transformer_dev']}.*{FILES['text_encoder']}"):
        load_split(paths["transformer_dev"], F32)
    with pytest.raises(ConfigError, match=str(paths["text_encoder"])):
        load_split(paths["text_encoder"], F32)
    (dit,) = load_split(paths["transformer_dev"], F32, roles={"dit"})
    assert_same(dit, diffusers_model(folder, "dit"))
    # the runtime's loader recognises each file whole too; building the connectors from one says where the rest is
    with pytest.raises(ConfigError, match="text encoder file"):
        load_models(paths["transformer_dev"], F32)
    (text,) = load_models(
        paths["text_encoder"], F32, roles={"text_encoder"}, config=gemma_assets(paths["text_encoder"])[0]
    )
    assert_same(text, diffusers_model(folder, "text_encoder"))
    with pytest.raises(ConfigError, match="gemma_config"):  # no config.json: the metadata is needed
        load_models(paths["text_encoder"], F32, roles={"text_encoder"})


@pytest.mark.parametrize(
    ("name", "drop", "add", "named"),
    [
        ("video_vae_conv", "encoder.conv_in.conv.bias", None, "encoder.conv_in.conv.bias"),
        ("video_vae_conv", None, {"decoder.extra.weight": torch.zeros(2)}, "decoder.extra.weight"),
        ("audio_vae", None, {"stray.weight": torch.zeros(2)}, "stray.weight"),
        ("text_encoder", "model.layers.1.mlp.up_proj.weight", None, "layers.1.mlp.up_proj.weight"),
        ("text_encoder", None, {"model.layers.0.self_attn.extra": torch.zeros(2)}, "model.layers.0.self_attn.extra"),
    ],
)
def test_missing_or_unexpected_key_names_file_and_key(tiny_25, tmp_path, name, drop, add, named):
    _, paths = tiny_25
    broken = rewrite(paths[name], tmp_path / paths[name].name, drop, add)
    sources = [paths["transformer_dev"], broken] if name == "text_encoder" else broken
    with pytest.raises(ConfigError) as caught:
        load_split(sources, F32)
    assert str(broken) in str(caught.value) and named in str(caught.value)


# ----------------------------------------------------------------------------------- the pipeline and presets
FAST = dict(
    height=64, width=64, num_frames=9, num_inference_steps=2, seed=0, max_sequence_length=16, output_type="pt",
    progress_bar=False, negative_prompt=repo.CAPTIONS[3],
)  # fmt: skip


def test_pipeline_from_the_split_files_equals_the_diffusers_folder(tiny_25):
    """`from_pretrained` with one `ModelConfig` per split file (the transformer and text encoder files apart, in
    either order; the tokenizer from the text encoder file): the same video and sound as the diffusers folder (the
    models are equal exactly; the outputs to float rounding, as the weights sit in memory differently)."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.hub import ModelConfig

    folder, paths = tiny_25
    expected = LTX2Pipeline.from_pretrained(str(folder), device="cpu", torch_dtype=F32)
    names = ("text_encoder", "video_vae_conv", "audio_vae", "transformer_dev")  # text encoder first: order is free
    pipe = LTX2Pipeline.from_pretrained(
        model_configs=[ModelConfig(path=str(paths[n])) for n in names], device="cpu", torch_dtype=F32,
        tokenizer_config=ModelConfig(path=str(paths["text_encoder"])),
    )  # fmt: skip
    got, want = pipe(repo.CAPTIONS[0], **FAST), expected(repo.CAPTIONS[0], **FAST)
    assert want[0].std() > 0.05 and want[1].waveform.std() > 1e-3
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1].waveform, want[1].waveform, atol=1e-5, rtol=0)


def test_presets_resolve_to_the_authors_files(tiny_25, monkeypatch):
    """`Lightricks/LTX-2.5:dfr` (downloads off) finds every file under the authors' folders: the dev DiT, both
    upsamplers in their slots, the duration head (the clip's length when `num_frames` is left out) and the
    distilled LoRA for the DFR passes; `:distilled` the distilled DiT; `:distilled-diffvae` (the authors' quick start)
    its encoder and diffusion decoder from the diffusion-VAE file."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline

    _, paths = tiny_25
    base = paths["text_encoder"].parents[1]  # <base>/text_encoders/...: the repo folder
    (base.parent / "Lightricks").mkdir(exist_ok=True)
    link = base.parent / "Lightricks" / "LTX-2.5"
    if not link.exists():
        link.symlink_to(base, target_is_directory=True)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base.parent))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = LTX2Pipeline.from_pretrained("Lightricks/LTX-2.5:dfr", device="cpu", torch_dtype=F32)
    assert pipe.upsampler.config.spatial_upsample and pipe.temporal_upsampler.config.temporal_upsample
    assert pipe.duration_head is not None and pipe.defaults["use_dfr_pipeline"] and "num_frames" not in pipe.defaults
    frames, audio = pipe(repo.CAPTIONS[0], height=128, width=128, seed=1, max_sequence_length=16, output_type="pt",
                         progress_bar=False)  # fmt: skip
    assert frames.shape[2] == pipe.predict_num_frames(repo.CAPTIONS[0], 16, 24.0, 1.0, 20.0)
    distilled_file = paths["transformer_dev"].with_name(FILES["transformer_distilled"].split("/")[-1])
    if not distilled_file.exists():  # a stand-in: the dev weights under the distilled file's name
        distilled_file.symlink_to(paths["transformer_dev"])
    distilled = LTX2Pipeline.from_pretrained("Lightricks/LTX-2.5:distilled", device="cpu", torch_dtype=F32)
    assert distilled.model_configs["dit"].origin_file_pattern == FILES["transformer_distilled"]
    assert distilled.defaults["use_distilled_pipeline"] and distilled.upsampler is not None
    assert distilled.diffusion_decoder is None
    quick = LTX2Pipeline.from_pretrained("Lightricks/LTX-2.5:distilled-diffvae", device="cpu", torch_dtype=F32)
    assert quick.model_configs["diffusion_decoder"].origin_file_pattern == FILES["video_vae"]
    assert quick.model_configs["vae"].origin_file_pattern == FILES["video_vae"]  # the encoder, from the same file
    assert quick.diffusion_decoder is not None and quick.defaults["use_distilled_pipeline"]


# ----------------------------------------------------------------------------------------- load-time checks
def with_metadata(src, dst, **changes):
    """`src` saved as `dst` with metadata entries replaced (JSON-encoded) or, given None, dropped."""
    with safe_open(str(src), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(state, str(dst), metadata=metadata)
    return dst


def test_text_encoder_of_another_gemma_version_is_refused(tiny_25, tmp_path):
    """ltx-core's `_check_gemma_version`: the transformer names the Gemma it was trained with
    (`gemma_source_checkpoint.gemma_version`); a text encoder file of another version is refused, by `load_split`
    and by the pipeline, naming both files and versions."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.hub import ModelConfig

    _, paths = tiny_25
    gemma = json.loads(safe_open(str(paths["text_encoder"]), "pt").metadata()["gemma_config"])
    other = with_metadata(paths["text_encoder"], tmp_path / "stock.safetensors",
                          gemma_config={**gemma, "gemma_version": "gemma4-12b-stock"})  # fmt: skip
    pattern = r"gemma_version='gemma4-12b-ltx-v1'.*stock.safetensors has gemma_version='gemma4-12b-stock'"
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_split([paths["transformer_dev"], other], F32)
    assert str(paths["transformer_dev"]) in str(caught.value)
    configs = [ModelConfig(path=str(paths["transformer_dev"])), ModelConfig(path=str(other))]
    with pytest.raises(ConfigError, match=pattern):
        LTX2Pipeline.from_pretrained(model_configs=configs, device="cpu", torch_dtype=F32)


def test_gemma_version_rule():
    """The rest of ltx-core's rule: from model_version 2.4 a transformer must name its Gemma; older ones take
    Gemma 3 only."""
    from diffsynth.ltx2.split_files import check_gemma_version

    gemma4, gemma3 = {"model_type": "gemma4_unified", "gemma_version": "v1"}, {"model_type": "gemma3"}
    check_gemma_version({"gemma_source_checkpoint": '{"gemma_version": "v1"}'}, gemma4, "dit.st", "te.st")
    check_gemma_version({"model_version": "2.3.0"}, gemma3, "dit.st", "te.st")
    check_gemma_version({"model_version": "2.5.0"}, {"model_type": "gemma4_unified"}, "dit.st", "te.st")  # warns
    with pytest.raises(ConfigError, match=r"dit.st: model_version='2.5.0' must name gemma_source_checkpoint"):
        check_gemma_version({"model_version": "2.5.0"}, gemma4, "dit.st", "te.st")
    with pytest.raises(ConfigError, match=r"takes a Gemma 3 text encoder, but te.st is model_type='gemma4_unified'"):
        check_gemma_version({"config": "{}"}, gemma4, "dit.st", "te.st")


def test_text_encoder_too_narrow_for_the_connectors_is_refused(tiny_ltx2_base, tiny_25):
    """A 2.x single file with LTX-2.5's text encoder file: the encoder's hidden states (width x (layers + 1)) do
    not fit the single file's connectors; refused at load, naming both files, not at the first call."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.hub import ModelConfig

    _, paths = tiny_25
    single = tiny_ltx2_base / repo.LTX_REPO / repo.SINGLE_FILE
    configs = [ModelConfig(path=str(single)), ModelConfig(path=str(paths["text_encoder"]))]
    pattern = r"gemma4-12b-with-proj.*gives 32 channels x 7 hidden states.*ltx-2-19b.*take 128 x 3"
    with pytest.raises(ConfigError, match=pattern):
        LTX2Pipeline.from_pretrained(model_configs=configs, device="cpu", torch_dtype=F32,
                                     tokenizer_config=ModelConfig(path=str(paths["text_encoder"])))  # fmt: skip


def test_unknown_role_and_missing_gemma_config_are_named(tiny_25, tmp_path):
    """A mistyped role is refused with the roles there are (it loaded nothing); a text encoder file without its
    `gemma_config` metadata is named with that key (the error named the transformer file)."""
    _, paths = tiny_25
    with pytest.raises(ConfigError, match=r"\['vea'\] is not a role.*'vae'"):
        load_split(paths["video_vae_conv"], F32, roles={"vea"})
    with pytest.raises(ConfigError, match=r"\['vea'\] is not a role"):
        load_split(paths["video_vae"], F32, roles={"vea"})
    bare = with_metadata(paths["text_encoder"], tmp_path / "bare.safetensors", gemma_config=None)
    with pytest.raises(ConfigError, match=r"bare.safetensors: no 'gemma_config' metadata"):
        load_split([paths["transformer_dev"], bare], F32)
