"""`diffsynth generate` with LTX-2: the preset found offline, the video written with its sound as one mp4."""

from __future__ import annotations

import av
import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest

from diffsynth.runtime.cli import main

FAST = ["--height", str(repo_module.HEIGHT), "--width", str(repo_module.WIDTH), "--num-frames", str(repo_module.FRAMES)]
FAST += ["--steps", "1", "--device", "cpu", "--dtype", "float32", "--fps", "12"]


def test_generate_writes_frames_and_sound_to_one_mp4(tiny_ltx2_base, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "clip.mp4"
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", repo_module.CAPTIONS[0], "--output", str(out)]
    assert main([*args, *FAST]) == 0
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert float(video.average_rate) == 12  # --fps is the rate the model placed the frames at, too
        assert sum(1 for _ in container.decode(video=0)) == repo_module.FRAMES
        assert audio.channels == 2 and audio.rate == 24000


def test_generate_refuses_an_image_file_for_a_video_model(tiny_ltx2_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", "a cat", "--output", str(tmp_path / "x.png")]
    assert main([*args, *FAST]) == 2
    assert "--output must name an .mp4 file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_image_to_video_from_the_command_line(tiny_ltx2_base, tmp_path, monkeypatch):
    """`--input-image` is LTX-2's first frame (no denoising strength there)."""
    from PIL import Image

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    image = tmp_path / "first.png"
    Image.new("RGB", (repo_module.WIDTH, repo_module.HEIGHT), (200, 30, 30)).save(image)
    out = tmp_path / "i2v.mp4"
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", repo_module.CAPTIONS[0], "--output", str(out)]
    assert main([*args, "--input-image", str(image), *FAST]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == repo_module.FRAMES


def test_generate_with_the_two_stage_preset(tiny_ltx2_base, tiny_ltx2_pipe, tmp_path, monkeypatch):
    """`--model Lightricks/LTX-2:two-stage` finds the upsampler and the distilled LoRA under the preset's file
    names (offline) and writes the full-size video: the first stage ran at half of it."""
    repo_module.write_two_stage_files(tiny_ltx2_base / repo_module.LTX_REPO, tiny_ltx2_pipe.dit)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    out = tmp_path / "two-stage.mp4"
    size = ["--height", str(2 * repo_module.HEIGHT), "--width", str(2 * repo_module.WIDTH)]
    args = [
        "generate",
        "--model",
        "Lightricks/LTX-2:two-stage",
        "--prompt",
        repo_module.CAPTIONS[1],
        "--output",
        str(out),
    ]
    assert main([*args, *FAST, *size]) == 0  # the later --height / --width win
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert (video.height, video.width) == (2 * repo_module.HEIGHT, 2 * repo_module.WIDTH)
        assert sum(1 for _ in container.decode(video=0)) == repo_module.FRAMES


def test_generate_audio_to_video_from_the_command_line(tiny_ltx2_base, tmp_path, monkeypatch):
    """`--input-audio` is LTX-2's `retake_audio`: the mp4 carries the given sound."""
    import torch

    from diffsynth.runtime.media import load_audio, save_audio

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    sound = tmp_path / "voice.wav"
    save_audio(0.3 * torch.sin(torch.arange(24000) / 24000 * 2 * torch.pi * 440).expand(2, -1), sound, 24000)
    out = tmp_path / "a2v.mp4"
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", repo_module.CAPTIONS[0], "--output", str(out)]
    assert main([*args, "--input-audio", str(sound), *FAST]) == 0
    with av.open(str(out)) as container:
        assert container.streams.audio[0].rate == 24000
    waveform, rate = load_audio(out)
    spectrum = torch.fft.rfft(waveform[0]).abs()
    peak = spectrum.argmax().item() * rate / waveform.shape[1]
    assert abs(peak - 440) < 5  # the given tone, not the tiny model's sound


def test_generate_sound_for_a_video_from_the_command_line(tiny_ltx2_base, tmp_path, monkeypatch):
    """`--input-video` is LTX-2's `retake_video` without regions: the video is kept, so two seeds give the same
    frames, and the sound is made for it, so they give different sound."""
    import numpy as np
    from PIL import Image

    from diffsynth.runtime.media import load_audio, load_video, save_video

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    h, w = repo_module.HEIGHT, repo_module.WIDTH
    frames = [Image.new("RGB", (w, h), (20 * k, 100, 250 - 20 * k)) for k in range(repo_module.FRAMES)]
    given = tmp_path / "given.mp4"
    save_video(frames, given, fps=12)
    outs = [tmp_path / "v2a-0.mp4", tmp_path / "v2a-1.mp4"]
    for seed, out in enumerate(outs):
        args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", repo_module.CAPTIONS[2], "--output", str(out)]
        assert main([*args, "--input-video", str(given), "--seed", str(seed), *FAST]) == 0
    videos = [np.stack([np.asarray(f) for f in load_video(out)]) for out in outs]
    sounds = [load_audio(out)[0] for out in outs]
    assert videos[0].shape[0] == repo_module.FRAMES and np.array_equal(videos[0], videos[1])
    assert (sounds[0] - sounds[1]).abs().max() > 1e-3


def test_a_retake_without_fps_is_timed_at_the_input_videos_rate(tiny_ltx2_base, tmp_path, monkeypatch):
    """Without `--fps` the pipeline places the --input-video's frames at the file's rate, and the mp4 plays them at
    it: a 12 fps file's sound lasts `frames / 12` seconds, not `frames / 24` (the default)."""
    from PIL import Image

    from diffsynth.runtime.media import load_audio, save_video

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    h, w = repo_module.HEIGHT, repo_module.WIDTH
    frames = [Image.new("RGB", (w, h), (20 * k, 100, 250 - 20 * k)) for k in range(repo_module.FRAMES)]
    given, out = tmp_path / "given.mp4", tmp_path / "v2a.mp4"
    save_video(frames, given, fps=12)
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", repo_module.CAPTIONS[2], "--output", str(out)]
    assert main([*args, "--input-video", str(given), *FAST[: FAST.index("--fps")]]) == 0
    sound, rate = load_audio(out)
    assert sound.shape[-1] / rate == pytest.approx(repo_module.FRAMES / 12, abs=0.05)
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == 12  # the mp4 plays the frames at it too


@pytest.mark.parametrize(
    "flags, given, refusal",
    [
        (["--dfr", "--temporal-rounds", "1"], {"use_dfr_pipeline": True, "temporal_upsample_rounds": 1},
         "use_dfr_pipeline needs an LTX-2.5 DiT"),
        (["--hq"], {"use_hq_pipeline": True}, "latent upsampler"),
    ],
)  # fmt: skip
def test_recipe_flags_reach_the_pipeline(tiny_ltx2_base, tmp_path, monkeypatch, capsys, flags, given, refusal):
    """`--dfr` / `--temporal-rounds` become `use_dfr_pipeline` / `temporal_upsample_rounds` (an LTX-2.0 DiT is
    refused by name: DFR needs LTX-2.5's keyframe embedding); `--hq` becomes `use_hq_pipeline` (the preset has no
    upsampler, which the pipeline names)."""
    import functools

    from diffsynth.ltx2.pipeline import LTX2Pipeline

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    seen, real = {}, LTX2Pipeline.__call__

    @functools.wraps(real)  # the CLI reads the signature to know which options the pipeline takes
    def spy(self, prompt, **kwargs):
        seen.update(kwargs)
        return real(self, prompt, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "__call__", spy)
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")]
    assert main([*args, *FAST, *flags]) == 2
    assert {k: seen[k] for k in given} == given
    assert refusal in capsys.readouterr().err


def test_prompt_enhancer_flag_loads_it_and_enhances(tiny_ltx2_base, tmp_path, monkeypatch):
    """`--prompt-enhancer SOURCE`: a hub id becomes a `ModelConfig` (a path stays a path) for `load_prompt_enhancer`,
    and the call gets `enhance_prompt=True`, so the enhanced prompt is the one encoded."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.hub import ModelConfig

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    loaded, encoded = [], []
    monkeypatch.setattr(LTX2Pipeline, "load_prompt_enhancer", lambda self, source: loaded.append(source))
    monkeypatch.setattr(
        LTX2Pipeline, "enhance_prompts", lambda self, prompts, images, seed: ["rewritten"] * len(prompts)
    )
    real_encode = LTX2Pipeline.encode_prompt
    monkeypatch.setattr(
        LTX2Pipeline,
        "encode_prompt",
        lambda self, prompts, *a: encoded.append(prompts) or real_encode(self, prompts, *a),
    )
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")]
    assert main([*args, *FAST, "--prompt-enhancer", "google/gemma-4-E2B-it"]) == 0
    assert loaded == [ModelConfig(model_id="google/gemma-4-E2B-it")] and encoded[0] == ["rewritten"]
    assert main([*args, *FAST, "--prompt-enhancer", str(tmp_path)]) == 0
    assert loaded[1] == str(tmp_path)


def test_control_video_flag_is_the_ic_loras_reference(tiny_ltx2_base, tmp_path, monkeypatch):
    """`--control-video FILE` reaches the pipeline as `in_context_videos=[FILE]` (an IC-LoRA's control video,
    whose tokens then change the video: see test_in_context.py)."""
    import functools

    from PIL import Image

    from diffsynth.ltx2.pipeline import LTX2Pipeline
    from diffsynth.runtime.media import save_video

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    h, w = repo_module.HEIGHT, repo_module.WIDTH
    control = tmp_path / "depth.mp4"
    save_video([Image.new("RGB", (w, h), (30 * k, 200, 90)) for k in range(repo_module.FRAMES)], control, fps=12)
    seen, real = [], LTX2Pipeline.__call__

    @functools.wraps(real)  # the CLI reads the signature to know which options the pipeline takes
    def spy(self, prompt, **kwargs):
        seen.append(kwargs.get("in_context_videos"))
        return real(self, prompt, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "__call__", spy)
    args = ["generate", "--model", "Lightricks/LTX-2", "--prompt", repo_module.CAPTIONS[0], "--seed", "2", *FAST]
    assert main([*args, "--output", str(tmp_path / "ic.mp4"), "--control-video", str(control)]) == 0
    assert main([*args, "--output", str(tmp_path / "plain.mp4")]) == 0
    assert seen == [[str(control)], None]
