"""The pipeline with LTX-2.5's diffusion decoder loaded (`decoding.py`): it decodes the final latents instead of the
video VAE, from the call's generator and in the call's tiles; `use_diffusion_decoder=False` keeps the VAE; asked
for without it, or with bad tiles, the call is refused naming what to do. A diffusers `diffusion_decoder/` folder
loads into the same slot."""

from __future__ import annotations

import json

import diffsynth_ltx2_test_repo as repo  # loaded by conftest
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2.decoding import diffusion_tiles
from diffsynth.ltx2.diffusion_decoder import DecoderTiles
from diffsynth.ltx2.diffusion_decoder_formats import DIFFUSERS_CLASS_NAME, ours_to_diffusers
from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.ltx2.video_vae import LTX2VideoEncoderVAE, LTX2VideoVAE
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_models

F32 = torch.float32
FAST = dict(
    height=64, width=64, num_frames=9, num_inference_steps=2, seed=0, max_sequence_length=16, output_type="pt",
    progress_bar=False, negative_prompt=repo.CAPTIONS[3],
)  # fmt: skip


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    return repo.write_tiny_25_split(tmp_path_factory.mktemp("tiny-ltx25-split"))


def pipeline(paths, with_decoder: bool = True, vram_limit: float | None = None, vaes=None) -> LTX2Pipeline:
    vaes = vaes or (["video_vae_conv", "video_vae"] if with_decoder else ["video_vae_conv"])
    names = ["text_encoder", *vaes, "audio_vae", "transformer_dev"]
    return LTX2Pipeline.from_pretrained(
        model_configs=[ModelConfig(path=str(paths[n])) for n in names], device="cpu", torch_dtype=F32,
        tokenizer_config=ModelConfig(path=str(paths["text_encoder"])), vram_limit=vram_limit,
    )  # fmt: skip


class Spy:
    """Wraps a module's `decode`, recording each call's arguments (and the generator's state as it was)."""

    def __init__(self, module):
        self.calls, self.inner = [], module.decode
        module.decode = self

    def __call__(self, latents, **kwargs):
        generator = kwargs.get("generator")
        state = None if generator is None else generator.get_state()
        self.calls.append((latents.clone(), state, kwargs))
        return self.inner(latents, **kwargs)


def test_the_loaded_decoder_decodes_from_the_calls_generator(split_files):
    pipe = pipeline(split_files)
    assert pipe.model_configs["diffusion_decoder"].path == str(split_files["video_vae"])
    decoder, vae = Spy(pipe.diffusion_decoder), Spy(pipe.vae)
    frames = pipe(repo.CAPTIONS[0], **FAST)[0]
    assert len(decoder.calls) == 1 and not vae.calls
    latents, state, kwargs = decoder.calls[0]
    assert state is not None and kwargs["tiles"] == DecoderTiles()
    # the frames are the decoder's output for those latents from that generator state
    replay = torch.Generator().set_state(state)
    with torch.no_grad():
        pixels = decoder.inner(latents, generator=replay, tiles=DecoderTiles())
    torch.testing.assert_close(frames, (pixels.clamp(-1, 1) + 1) / 2, rtol=0, atol=0)
    assert frames.shape == (1, 3, 9, 64, 64) and frames.std() > 0.05

    again = pipe(repo.CAPTIONS[0], **FAST)[0]
    torch.testing.assert_close(again, frames, rtol=0, atol=0)  # seeded: the decoder's noise too
    # the VAE on request: the same latents, other pixels
    with_vae = pipe(repo.CAPTIONS[0], use_diffusion_decoder=False, **FAST)[0]
    assert len(vae.calls) == 1 and len(decoder.calls) == 2
    torch.testing.assert_close(vae.calls[0][0], latents, rtol=0, atol=0)
    assert (with_vae - frames).abs().max() > 0.05


def test_the_diffusion_vae_file_alone_encodes_and_decodes(split_files):
    """As the authors' quick start: the diffusion-VAE file as the only video VAE. Its encoder is the VAE slot (the
    convolutional file's encoder exactly; image-to-video works), the diffusion decoder decodes, and the
    convolutional decoder, asked for, is refused before any work. With both files, in either order, the VAE slot
    holds the whole convolutional VAE."""
    alone = pipeline(split_files, vaes=["video_vae"])
    assert isinstance(alone.vae, LTX2VideoEncoderVAE) and alone.diffusion_decoder is not None
    both = pipeline(split_files)
    assert isinstance(both.vae, LTX2VideoVAE) and not isinstance(both.vae, LTX2VideoEncoderVAE)
    reverse = pipeline(split_files, vaes=["video_vae", "video_vae_conv"])
    assert not isinstance(reverse.vae, LTX2VideoEncoderVAE) and reverse.diffusion_decoder is not None
    video = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(alone.vae.encode(video), both.vae.encode(video), rtol=0, atol=0)
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    settings = {**FAST, "input_image": image, "image_crf": 0}
    torch.testing.assert_close(alone(repo.CAPTIONS[2], **settings)[0], both(repo.CAPTIONS[2], **settings)[0])
    alone.encode_prompt = None  # refused before any work
    with pytest.raises(ConfigError, match=r"use_diffusion_decoder=False needs the convolutional .*conv-bf16"):
        alone(repo.CAPTIONS[0], use_diffusion_decoder=False, **FAST)


def test_streamed_decoder_gives_the_same_video(split_files):
    """Under the VRAM manager with every unit streamed (each block of each decoder stage): the same frames."""
    managed = pipeline(split_files, vram_limit=0)
    assert "diffusion_decoder" in managed.vram_handles
    got, want = managed(repo.CAPTIONS[1], **FAST)[0], pipeline(split_files)(repo.CAPTIONS[1], **FAST)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tiles_follow_the_calls_arguments(split_files):
    pipe = pipeline(split_files)
    decoder = Spy(pipe.diffusion_decoder)
    pipe(repo.CAPTIONS[0], tile_size_in_pixels=32, tile_overlap_in_pixels=8, tile_size_in_frames=16, **FAST)
    # the frames' overlap: the default 24, capped at half the tile
    assert decoder.calls[0][2]["tiles"] == DecoderTiles(16, 8, 32, 24, 32, 24)


def test_refused_without_the_decoder_or_with_bad_tiles(split_files):
    pipe = pipeline(split_files, with_decoder=False)
    pipe.encode_prompt = None  # refused before any work
    with pytest.raises(ConfigError, match=r"use_diffusion_decoder=True needs .*ltx-2.5-video-vae-bf16"):
        pipe(repo.CAPTIONS[0], use_diffusion_decoder=True, **FAST)
    with pytest.raises(ConfigError, match="tile_overlap_in_pixels=64 must be an integer in"):
        diffusion_tiles(64, 64, None, None)
    with pytest.raises(ConfigError, match="tile_size_in_frames=0"):
        diffusion_tiles(None, None, 0, None)
    assert diffusion_tiles(None, None, None, None) == DecoderTiles()
    with pytest.raises(ConfigError, match="frames=8 needs 1 <= stride <= 8"):
        DecoderTiles(frames=8, frame_stride=9)


def test_a_diffusers_folder_loads_as_the_diffusion_decoder(tmp_path):
    """`diffusion_decoder/` of a diffusers LTX-2.5 folder (written without diffusers: our converter and the
    config.json diffusers writes) is recognised by the family's spec."""
    model = repo.tiny_diffusion_decoder(16, seed=5)
    c = model.config
    config = {
        "_class_name": DIFFUSERS_CLASS_NAME, "latent_channels": c.latent_channels, "patch_size": c.patch_size,
        "decoder_head_dim": c.head_dim, "decoder_stage_channels": c.stage_channels,
        "decoder_stage_depths": c.stage_depths, "decoder_stage_kernels": c.stage_kernels,
        "decoder_upsample_strides": c.upsample_strides, "decoder_upsample_channel_reductions": c.upsample_reductions,
        "decoder_stage5_kernel": c.stage5_kernel, "decoder_t_emb_dim": c.t_emb_dim,
        "spatial_compression_ratio": 32, "temporal_compression_ratio": 8,
    }  # fmt: skip
    folder = tmp_path / "diffusion_decoder"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in ours_to_diffusers(model.state_dict()).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (loaded,) = load_models(folder, F32)
    assert (loaded.role, loaded.layout, loaded.config) == ("diffusion_decoder", "diffusers", c)
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in model.state_dict().items())
