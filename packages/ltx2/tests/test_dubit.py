"""Dub-It (`dubit.py`, `LTX2Pipeline.dub_video`): the reference sound's tokens and positions, the model call with
appended audio reference tokens, and the two stages on a tiny model: the clip's length and rate from the source,
what each stage's DiT calls receive, the new sound kept through stage 2, and bad input."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2.audio_vae import pack_latents
from diffsynth.ltx2.dit import audio_positions
from diffsynth.ltx2.dubit import REFERENCE_GAP, audio_reference, encode_whole_track, frame_count
from diffsynth.ltx2.pipeline import LTX2Keyframes, ltx2_velocity
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_audio, mux_video_audio

CAPTIONS = repo_module.CAPTIONS
SIZE = dict(height=128, width=128)  # stage 1 at 64 x 64
FPS = 12


@pytest.fixture(scope="module")
def dub_pipe(tiny_ltx2_base, tiny_ltx2_pipe, tmp_path_factory):
    """The tiny LTX-2 model with the latent upsampler and a do-nothing IC-LoRA declaring a reference factor of 2."""
    upsampler, _ = repo_module.write_two_stage_files(tiny_ltx2_base / "dubit", tiny_ltx2_pipe.dit)
    pipe = repo_module.our_pipeline(tiny_ltx2_base, model_configs=[ModelConfig(path=str(upsampler))])
    lora = tmp_path_factory.mktemp("dubit-lora") / "ic-lora.safetensors"
    state = {k: torch.zeros_like(v) for k, v in repo_module.lora_state(pipe.dit).items()}
    save_file(state, str(lora), metadata={"reference_downscale_factor": "2"})
    pipe.load_lora(str(lora), fuse=False)
    return pipe


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 13-frame clip at 12 fps with a stereo sound track."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(13)]
    t = torch.arange(int(48000 * 13 / FPS)) / 48000
    waveform = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 220 * t)]) * 0.5
    path = tmp_path_factory.mktemp("dubit-source") / "clip.mp4"
    mux_video_audio(frames, waveform, 48000, str(path), fps=FPS)
    return path


def test_frame_count_rounds_down_to_the_grid():
    assert [frame_count(n) for n in (1, 8, 9, 16, 17, 121, 130)] == [1, 1, 9, 9, 17, 121, 129]
    with pytest.raises(ConfigError, match="no frames"):
        frame_count(0)


def test_reference_sound_ends_before_the_clip(tiny_ltx2_pipe):
    latents = torch.randn(1, 2, 7, 4)
    reference = audio_reference(tiny_ltx2_pipe, latents)
    own = audio_positions(tiny_ltx2_pipe.dit.config, 1, 7)
    assert torch.equal(reference.tokens, pack_latents(latents))
    torch.testing.assert_close(reference.coords, own - own[..., 1].max() - REFERENCE_GAP)
    assert float(reference.coords[..., 1].max()) == pytest.approx(-REFERENCE_GAP)


def test_audio_references_join_the_audio_tokens_clean(tiny_ltx2_pipe, monkeypatch):
    """The model call appends the reference tokens after the audio's at timestep 0 with their positions, and
    returns the audio's velocities only."""
    pipe, seen = tiny_ltx2_pipe, []
    real = type(pipe.dit).forward

    def spy(self, video, audio, *args, **kwargs):
        seen.append((audio.clone(), kwargs["audio_timestep"].clone(), kwargs["audio_coords"].clone()))
        return real(self, video, audio, *args, **kwargs)

    monkeypatch.setattr(type(pipe.dit), "forward", spy)
    text = pipe.encode_prompt(CAPTIONS[:1], repo_module.MAX_SEQUENCE_LENGTH)
    video, audio = pipe.prepare_latents(1, 9, 64, 64, 24.0, generator=1, rand_device="cpu")
    reference = audio_reference(pipe, torch.randn(1, 2, 5, 4))
    with torch.no_grad():
        v_video, v_audio = ltx2_velocity(pipe.dit, video, audio, 0.6, text, 24.0, audio_references=reference)
    tokens, timestep, coords = seen[0]
    n = audio.shape[2]
    assert v_audio.shape == audio.shape and tokens.shape[1] == n + 5
    torch.testing.assert_close(tokens[:, n:], reference.tokens)
    assert torch.all(timestep[:, :n] == 600) and torch.all(timestep[:, n:] == 0)
    torch.testing.assert_close(coords[:, :, n:], reference.coords)
    without = LTX2Keyframes(reference.tokens, reference.coords + 100.0)  # far away in time: a different call
    with torch.no_grad():
        _, moved = ltx2_velocity(pipe.dit, video, audio, 0.6, text, 24.0, audio_references=without)
    assert (moved - v_audio).abs().max() > 1e-5


def test_dub_video_runs_two_stages_on_the_source(dub_pipe, source, monkeypatch):
    """9 frames (13 rounded down) at the source's 12 fps; stage 1 at half size reads the video reference (factor 2)
    and the source's sound; stage 2 at full size keeps the new sound (timestep 0, unchanged) and hears it."""
    calls = []
    real = type(dub_pipe).denoise

    def spy(self, video, audio, *args, **kwargs):
        out = real(self, video, audio, *args, **kwargs)
        calls.append((video.shape, audio.clone(), args[6], kwargs.get("audio_references"), out))
        return out

    monkeypatch.setattr(type(dub_pipe), "denoise", spy)
    frames, sound = dub_pipe.dub_video(CAPTIONS[0], source, seed=0, max_sequence_length=16, progress_bar=False, **SIZE)
    assert len(frames) == 9 and frames[0].size == (128, 128)
    (shape_1, _, references_1, sound_1, (_, audio_1)), (shape_2, audio_in_2, references_2, sound_2, (_, audio_2)) = (
        calls
    )
    assert shape_1[2:] == (2, 2, 2) and shape_2[2:] == (2, 4, 4)
    assert len(references_1) == 2 * 1 * 1 and len(references_2) == 2 * 2 * 2  # the source at 32 and 64 pixels
    expected_length = dub_pipe.audio_latent_shape(1, 9, FPS)[2]
    assert audio_1.shape[2] == expected_length
    # the reference is the source's whole sound (13 frames' worth), not cut to the 9-frame clip: the authors'
    # `_encode_reference_audio_vae_latent` encodes the whole decoded track
    whole = encode_whole_track(dub_pipe, *load_audio(source))
    assert len(sound_1) == whole.shape[2] > expected_length
    torch.testing.assert_close(sound_1.tokens, pack_latents(whole))
    torch.testing.assert_close(audio_in_2, audio_1, atol=0, rtol=0)  # stage 2 starts from the new sound
    torch.testing.assert_close(audio_2, audio_1, atol=0, rtol=0)  # and keeps it
    torch.testing.assert_close(sound_2.tokens, pack_latents(audio_1))
    assert sound.waveform.shape[-1] == round(9 / FPS * sound.sample_rate)  # as long as the video, to the sample


def test_reference_sound_is_the_whole_track(dub_pipe, tmp_path, monkeypatch):
    """A source whose sound outlasts its 9 frames (3 s): the reference holds all of it (about 75 latent frames at
    25 a second), where cutting it to the clip's 0.75 s gave 19."""
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(9)]
    t = torch.arange(48000 * 3) / 48000
    path = tmp_path / "long-sound.mp4"
    mux_video_audio(frames, (torch.sin(2 * torch.pi * 330 * t) * 0.5)[None], 48000, str(path), fps=FPS)
    seen = []
    real = audio_reference

    def spy(pipe, latents):
        seen.append(latents.shape[2])
        return real(pipe, latents)

    monkeypatch.setattr("diffsynth.ltx2.dubit.audio_reference", spy)
    dub_pipe.dub_video(CAPTIONS[0], path, seed=0, max_sequence_length=16, output_type="pt", progress_bar=False, **SIZE)
    assert seen[0] >= 74 and seen[1] == dub_pipe.audio_latent_shape(1, 9, FPS)[2]


def test_enhancer_sees_no_image(dub_pipe, source):
    """As the authors' Dub-It (`images=[]`): the enhancer gets no image, so it writes a text-to-video prompt."""
    seen = []

    class Stop(Exception):
        pass

    def spy(prompts, images, seed=None):
        seen.append((prompts, images, seed))
        raise Stop

    dub_pipe.enhance_prompts = spy
    try:
        with pytest.raises(Stop):
            dub_pipe.dub_video(CAPTIONS[0], source, seed=3, enhance_prompt=True, progress_bar=False, **SIZE)
    finally:
        del dub_pipe.enhance_prompts
    assert seen == [([CAPTIONS[0]], [None], 3)]


def test_bad_input(dub_pipe, tiny_ltx2_pipe, source):
    with pytest.raises(ConfigError, match="one prompt"):
        dub_pipe.dub_video(CAPTIONS[:2], source, **SIZE)
    with pytest.raises(ConfigError, match="a video file with sound"):
        dub_pipe.dub_video(CAPTIONS[0], [Image.new("RGB", (64, 64))], **SIZE)
    with pytest.raises(ConfigError, match="latent upsampler"):
        tiny_ltx2_pipe.dub_video(CAPTIONS[0], source, **SIZE)


def test_cli_dub_video_writes_the_clip_with_its_new_sound(dub_pipe, source, tmp_path, capsys):
    """`--dub-video FILE`: the re-voiced clip and its new sound in one mp4, at the source's frame rate."""
    import av

    from diffsynth.runtime.cli import _dub_video, build_parser

    args = ["generate", "--prompt", CAPTIONS[0], "--dub-video", str(source), "--height", "128", "--width", "128"]
    parsed = build_parser().parse_args([*args, "--output", str(tmp_path / "dubbed.mp4"), "--seed", "0"])
    assert _dub_video(dub_pipe, parsed) == 0
    with av.open(str(tmp_path / "dubbed.mp4")) as container:
        assert float(container.streams.video[0].average_rate) == FPS and container.streams.audio
        assert sum(1 for _ in container.decode(video=0)) == 9
    with pytest.raises(ConfigError, match="must name an .mp4 file"):
        _dub_video(dub_pipe, build_parser().parse_args([*args, "--output", str(tmp_path / "dubbed.wav")]))
