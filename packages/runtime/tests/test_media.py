"""Images, output types, video and audio files."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import (
    frame_indices,
    h264_frame,
    load_audio,
    load_image,
    load_video,
    mux_video_audio,
    pil_to_tensor,
    quality_to_crf,
    resampled_length,
    save_audio,
    save_image,
    save_video,
    tensor_to_output,
    tensor_to_pil,
    video_frame_count,
    video_frame_times,
)


def random_image(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_image_file_and_tensor_round_trip(tmp_path):
    images = [random_image(0), random_image(1)]
    save_image(images[0], tmp_path / "sub" / "a.png")
    loaded = load_image(tmp_path / "sub" / "a.png")
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(images[0]))
    pixels = pil_to_tensor(images, dtype=torch.float32)
    assert pixels.shape == (2, 3, 10, 12) and pixels.min() >= -1 and pixels.max() <= 1
    # independent: pixel value p maps to p / 127.5 - 1
    want = torch.from_numpy(np.array(images[1])).permute(2, 0, 1).double() / 127.5 - 1
    torch.testing.assert_close(pixels[1].double(), want, rtol=0, atol=1e-6)
    back = tensor_to_pil(pixels)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, images, strict=True))


def test_load_image_converts_modes():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 128))
    assert load_image(rgba).mode == "RGB"
    assert load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_rgba_images_keep_their_alpha_through_tensors():
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8), mode="RGBA")
    pixels = pil_to_tensor([rgba, load_image(random_image(4), "RGBA")], mode="RGBA")
    assert pixels.shape == (2, 4, 10, 12)
    assert torch.equal(pixels[1, 3], torch.ones(10, 12))  # an RGB image is opaque
    back = tensor_to_output(pixels, "pil")
    assert back[0].mode == "RGBA" and np.array_equal(np.asarray(back[0]), np.asarray(rgba))
    assert tensor_to_output(pixels, "np").shape == (2, 10, 12, 4)
    with pytest.raises(ConfigError, match="mode='CMYK'"):
        load_image(rgba, "CMYK")


def test_output_types_and_ranges():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 6, 8, generator=g) * 2.4 - 1.2  # a little outside [-1, 1]: clamped
    pil = tensor_to_output(images, "pil")
    assert len(pil) == 2 and pil[0].size == (8, 6)
    arr = tensor_to_output(images, "np")
    assert arr.shape == (2, 6, 8, 3) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    pt = tensor_to_output(images, "pt")
    assert pt.shape == (2, 3, 6, 8) and pt.min() == 0 and pt.max() == 1
    torch.testing.assert_close(torch.from_numpy(arr).permute(0, 3, 1, 2), pt)
    torch.testing.assert_close(pt, ((images.clamp(-1, 1) + 1) / 2))
    np.testing.assert_allclose(np.asarray(pil[1]) / 255.0, arr[1], atol=0.5 / 255 + 1e-6)


def test_video_output_types():
    video = torch.rand(1, 3, 4, 6, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    frames = tensor_to_output(video, "pil")
    assert len(frames) == 1 and len(frames[0]) == 4 and frames[0][0].size == (8, 6)
    assert tensor_to_output(video, "np").shape == (1, 4, 6, 8, 3)
    assert tensor_to_output(video, "pt").shape == (1, 3, 4, 6, 8)
    np.testing.assert_allclose(
        np.asarray(frames[0][2]) / 255.0, tensor_to_output(video, "np")[0, 2], atol=0.5 / 255 + 1e-6
    )


def test_bad_output_type():
    with pytest.raises(ConfigError, match=r"output_type must be one of \['pil', 'np', 'pt'\], got 'latent'"):
        tensor_to_output(torch.zeros(1, 3, 2, 2), "latent")
    with pytest.raises(ConfigError, match=r"\[B, 3 or 4, H, W\].*\(1, 5, 2, 2\)"):
        tensor_to_output(torch.zeros(1, 5, 2, 2), "pil")


def smooth_frames(n: int, h: int = 32, w: int = 48) -> list[Image.Image]:
    """Flat colours per frame: H.264 keeps them within a few levels."""
    return [Image.new("RGB", (w, h), (20 + 40 * i, 200 - 30 * i, 90)) for i in range(n)]


def test_video_round_trip(tmp_path):
    frames = smooth_frames(6)
    save_video(frames, tmp_path / "v.mp4", fps=8, quality=9)
    with av.open(str(tmp_path / "v.mp4")) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
    back = load_video(tmp_path / "v.mp4")
    assert len(back) == 6 and back[0].size == (48, 32)
    for a, b in zip(frames, back, strict=True):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < 4
    first = load_video(tmp_path / "v.mp4", num_frames=2, height=16)
    assert len(first) == 2 and first[0].size == (24, 16)
    with pytest.raises(ConfigError, match="6 frames, fewer than num_frames=10"):
        load_video(tmp_path / "v.mp4", num_frames=10)


@pytest.mark.parametrize(("suffix", "codec"), [(".webm", "vp9"), (".gif", "gif"), (".mkv", "h264")])
def test_every_video_suffix_read_is_written(tmp_path, suffix, codec):
    """`.gif` and `.webm` are read as videos; writing them raised "'gif' format does not support 'libx264'"."""
    frames = smooth_frames(5)
    path = tmp_path / f"v{suffix}"
    save_video(frames, path, fps=10, quality=9)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == codec
    back = load_video(path)
    assert len(back) == 5 and back[0].size == (48, 32)
    for a, b in zip(frames, back, strict=True):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < 6


def test_a_video_suffix_that_is_not_written_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"save_video writes \.mp4.*\.gif files; .*v\.xyz ends in \.xyz"):
        save_video(smooth_frames(2), tmp_path / "v.xyz")
    with pytest.raises(ConfigError, match=r"mux_video_audio writes \.mp4, \.mov or \.mkv files"):
        mux_video_audio(smooth_frames(2), torch.zeros(2, 1600), 16000, tmp_path / "v.webm")


def test_load_image_of_a_video_or_other_file_is_named(tmp_path):
    """PIL's bare UnidentifiedImageError named neither the file nor what it is."""
    save_video(smooth_frames(2), tmp_path / "clip.mp4")
    with pytest.raises(ConfigError, match=r"clip\.mp4 is not an image PIL can read .*it is a video: .*load_video"):
        load_image(tmp_path / "clip.mp4")
    (tmp_path / "notes.png").write_text("not pixels")
    with pytest.raises(ConfigError, match=r"notes\.png is not an image PIL can read \(\.png"):
        load_image(tmp_path / "notes.png")


def test_load_image_names_the_callers_argument(tmp_path):
    """A list or array given for an image named no argument: `name` says which one; without it the old words."""
    wrong = r"^controlnet_inputs\[0\]\.image must be a file path or a PIL\.Image, got list"
    with pytest.raises(ConfigError, match=wrong):
        load_image([random_image(4)], name="controlnet_inputs[0].image")
    with pytest.raises(ConfigError, match=r"^input_image must be a file path or a PIL\.Image, got ndarray"):
        load_image(np.zeros((4, 4, 3), np.uint8), name="input_image")
    with pytest.raises(ConfigError, match=r"^input_image file .*nope\.png does not exist"):
        load_image(tmp_path / "nope.png", name="input_image")
    with pytest.raises(ConfigError, match=r"^an image must be a file path or a PIL\.Image, got list"):
        load_image([])


def test_video_from_arrays_and_odd_sizes(tmp_path):
    video = torch.zeros(3, 4, 15, 21)  # [3, F, H, W] in [0, 1], odd size
    video[0] = 1.0
    save_video(video, tmp_path / "t.mp4", fps=10)
    back = load_video(tmp_path / "t.mp4")
    assert len(back) == 4 and back[0].size == (22, 16)  # edge repeated to even sizes
    red = np.asarray(back[0], np.float32)
    assert red[..., 0].mean() > 230 and red[..., 1].mean() < 25
    array = np.full((3, 8, 8, 3), 128, np.uint8)
    save_video(array, tmp_path / "n.mp4")
    assert len(load_video(tmp_path / "n.mp4")) == 3


def test_video_errors(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        save_video([], tmp_path / "e.mp4")
    with pytest.raises(ConfigError, match="quality must be between 0"):
        save_video(smooth_frames(2), tmp_path / "q.mp4", quality=11)
    with pytest.raises(ConfigError, match=r"missing\.mp4 does not exist"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ConfigError, match=r"nope\.png does not exist"):
        load_image(tmp_path / "nope.png")
    assert quality_to_crf(10) == 1 and quality_to_crf(5) == 25 and quality_to_crf(0) == 51


def test_audio_round_trip_is_exact_for_pcm16_values(tmp_path):
    rng = np.random.default_rng(0)
    ints = rng.integers(-32768, 32768, size=(2, 1000))
    ints[0, :2] = (-32768, 32767)
    waveform = torch.from_numpy(ints / 32768.0).float()
    save_audio(waveform, tmp_path / "a.wav", sample_rate=22050)
    back, rate = load_audio(tmp_path / "a.wav")
    assert rate == 22050 and back.dtype == torch.float32
    assert torch.equal(back, waveform)
    mono = torch.tensor([0.0, 0.5, -0.25, 2.0])  # out of range: clipped to the largest value
    save_audio(mono, tmp_path / "m.wav", 8000)
    back, _ = load_audio(tmp_path / "m.wav")
    assert torch.equal(back, torch.tensor([[0.0, 0.5, -0.25, 32767 / 32768]]))
    with pytest.raises(ConfigError, match=r"writes \.wav"):
        save_audio(mono, tmp_path / "m.mp3", 8000)


def test_mux_video_audio_has_both_streams(tmp_path):
    rate = 16000
    t = torch.arange(rate) / rate
    tone = 0.4 * torch.sin(2 * torch.pi * 440 * t)
    mux_video_audio(smooth_frames(8), torch.stack([tone, tone]), rate, tmp_path / "av.mp4", fps=8)
    with av.open(str(tmp_path / "av.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac" and c.streams.audio[0].rate == rate
    assert len(load_video(tmp_path / "av.mp4")) == 8
    audio, got_rate = load_audio(tmp_path / "av.mp4")
    assert got_rate == rate and audio.shape[0] == 2 and audio.shape[1] >= rate
    # AAC is lossy and adds a short priming delay: compare energy, not samples
    assert abs(float(audio.pow(2).mean().sqrt()) - 0.4 / 2**0.5) < 0.03


def test_h264_frame_degrades_with_crf_and_keeps_the_even_size():
    """One H.264 round trip: an odd size loses its last row/column, a higher CRF loses more detail (CRF 10 keeps
    about the 4:2:0 chroma subsampling's error, a few levels of 255)."""
    smooth = random_image(3, size=(8, 6)).resize((67, 49), Image.BILINEAR)
    fine, coarse = h264_frame(smooth, 10), h264_frame(smooth, 45)
    assert fine.size == coarse.size == (66, 48)
    reference = np.asarray(smooth, dtype=np.float32)[:48, :66]
    fine_error = np.abs(np.asarray(fine, dtype=np.float32) - reference).mean()
    coarse_error = np.abs(np.asarray(coarse, dtype=np.float32) - reference).mean()
    assert fine_error < 6 and coarse_error > 2 * fine_error
    with pytest.raises(ConfigError, match="crf must be an integer from 0"):
        h264_frame(smooth, 60)


def sideways_photo(path, orientation: int = 6):
    """A 64x32 JPEG stored as a phone stores a portrait photo: pixels sideways, EXIF orientation `orientation`
    (6: turn 90 degrees clockwise to view). Its left half is red, its right half blue, as stored."""
    from PIL import Image

    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=100)
    return stored


def test_photos_are_turned_upright_as_their_exif_says(tmp_path):
    from PIL import Image, ImageOps

    from diffsynth.runtime.media import upright_size

    path = tmp_path / "portrait.jpg"
    stored = sideways_photo(path)
    loaded = load_image(path)
    assert loaded.size == (32, 64)  # upright: portrait
    top, bottom = loaded.getpixel((16, 4)), loaded.getpixel((16, 60))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # turned clockwise: the left on top
    reference = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # Pillow's own reading of the tag
    assert list(loaded.getdata()) == list(reference.getdata())
    with Image.open(path) as opened:
        assert upright_size(opened) == (32, 64)
    plain = tmp_path / "plain.png"
    stored.save(plain)  # no EXIF: as stored
    assert load_image(plain).size == (64, 32)


def numbered_video(path, count: int, fps: int, step: int = 10) -> None:
    """A video whose frame k is the gray level step * k: which file frame a reader returned shows in its pixels."""
    save_video([Image.new("RGB", (16, 16), (step * k,) * 3) for k in range(count)], path, fps=fps, quality=10)


def frame_numbers(frames, step: int = 10) -> list[int]:
    return [round(float(np.asarray(f, np.float32).mean()) / step) for f in frames]


def test_frames_from_a_start_and_at_another_rate(tmp_path):
    numbered_video(tmp_path / "v.mp4", 20, fps=30)
    assert video_frame_count(tmp_path / "v.mp4") == 20
    times, end = video_frame_times(tmp_path / "v.mp4")
    assert times == pytest.approx([k / 30 for k in range(20)]) and end == pytest.approx(20 / 30)
    assert frame_numbers(load_video(tmp_path / "v.mp4", num_frames=4, start=5)) == [5, 6, 7, 8]
    # at 15 fps every other frame of the 30 fps file; at 60 fps each frame twice
    assert frame_numbers(load_video(tmp_path / "v.mp4", num_frames=4, start=2, fps=15)) == [4, 6, 8, 10]
    assert frame_numbers(load_video(tmp_path / "v.mp4", num_frames=5, fps=60)) == [0, 0, 1, 1, 2]
    assert frame_numbers(load_video(tmp_path / "v.mp4", start=15)) == [15, 16, 17, 18, 19]
    assert len(load_video(tmp_path / "v.mp4", fps=16)) == resampled_length(end, 16) == 11  # 0.667 s at 16 fps
    with pytest.raises(ConfigError, match="lasts 0.6667 s, 10 frames at 15 fps; 4 from frame 9 need 13"):
        load_video(tmp_path / "v.mp4", num_frames=4, start=9, fps=15)
    with pytest.raises(ConfigError, match="has 20 frames; none from frame 20"):
        load_video(tmp_path / "v.mp4", start=20)


def test_a_variable_rate_video_is_read_by_its_timestamps(tmp_path):
    """Frames at 0, 100, ..., 500 ms, then a pause: 700, 800, ..., 1300 ms (as a phone records). Frame k at 10 fps
    is the one on screen at k / 10 s, and the file lasts 1.4 s."""
    stamps = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]  # in tenths of a second
    with av.open(str(tmp_path / "vfr.mp4"), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 10)
        stream.options = {"crf": "0"}
        for k, stamp in enumerate(stamps):
            frame = av.VideoFrame.from_image(Image.new("RGB", (16, 16), (10 * k,) * 3))
            frame.pts, frame.time_base = stamp, Fraction(1, 10)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    times, end = video_frame_times(tmp_path / "vfr.mp4")
    assert times == pytest.approx([t / 10 for t in stamps]) and end == pytest.approx(1.4)
    on_screen = [max(k for k, t in enumerate(stamps) if t <= moment) for moment in range(14)]
    assert frame_numbers(load_video(tmp_path / "vfr.mp4", fps=10)) == on_screen  # 5 shows twice, through the pause
    assert frame_indices(14, times=times, fps=10) == on_screen


def test_frame_indices_follow_the_timeline():
    """Frame k of the resampled video is the file's frame on screen at k / fps, for rates that do not divide."""
    for source, target in ((30, 16), (24, 16), (16, 24), (25, 30)):
        times = [k / source for k in range(200)]
        got = frame_indices(40, start=3, times=times, fps=target)
        assert got == [int((3 + k) / target * source + 1e-9) for k in range(40)]
        assert got == sorted(got)
        assert resampled_length(len(times) / source, target) == int(200 / source * target - 1e-9) + 1
    assert frame_indices(3, start=2) == [2, 3, 4]


def test_a_late_clip_keeps_only_its_frames(tmp_path, monkeypatch):
    """Reading frames 40..43 converts those four to pictures, not the forty before them."""
    numbered_video(tmp_path / "v.mp4", 48, fps=24, step=5)
    converted = []
    real = av.VideoFrame.to_image

    def counting(frame, *args, **kwargs):
        converted.append(frame.pts)
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_image", counting)
    assert frame_numbers(load_video(tmp_path / "v.mp4", num_frames=4, start=40), step=5) == [40, 41, 42, 43]
    assert len(converted) == 4


def test_deep_grey_images_are_scaled_to_eight_bits(tmp_path):
    """PIL's convert clipped 16-bit and float grey to 0..255: a 16-bit mid-grey PNG read white, a 0.5 float black."""
    half = np.full((4, 8), 32768, np.uint16)
    half[:, :4] = 0
    Image.fromarray(half).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "grey16.png"))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 7].tolist() == [128, 128, 128]
    big_endian = Image.frombytes("I;16B", (2, 1), bytes([0x80, 0x00, 0xFF, 0xFF]))
    assert np.asarray(load_image(big_endian))[0].tolist() == [[128] * 3, [255] * 3]
    as_int = Image.fromarray(half.astype(np.int32))  # mode I, as 16-bit PNGs open in some Pillow versions
    assert as_int.mode == "I" and np.asarray(load_image(as_int))[0, 7].tolist() == [128, 128, 128]
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert np.asarray(load_image(tmp_path / "half.tif", "RGBA"))[0, 0].tolist() == [128, 128, 128, 255]
    Image.fromarray(np.linspace(0, 255, 16, dtype=np.float32).reshape(4, 4)).save(tmp_path / "wide.tif")
    with pytest.raises(ConfigError, match=r"wide\.tif: a float image \(mode F\) with values 0\.\.255; it is read as 0"):
        load_image(tmp_path / "wide.tif")
    with pytest.raises(ConfigError, match=r"32-bit integer image \(mode I\) with values -5\.\.70000"):
        load_image(Image.fromarray(np.array([[-5, 70000]], np.int32)))


def test_quality_ten_writes_a_playable_high_profile(tmp_path):
    """quality >= 9.9 was CRF 0 (lossless), which x264 writes as High 4:4:4 Predictive: browsers do not play it."""
    frames = [random_image(k, (32, 32)) for k in range(3)]
    for quality in (9.9, 10):
        assert quality_to_crf(quality) == 1
        save_video(frames, tmp_path / f"q{quality}.mp4", fps=8, quality=quality)
        with av.open(str(tmp_path / f"q{quality}.mp4")) as c:
            context = c.streams.video[0].codec_context
            assert (context.profile, context.pix_fmt) == ("High", "yuv420p")
    save_video(frames, tmp_path / "exact.mp4", fps=8, lossless=True)  # asked for: CRF 0, exact luma
    with av.open(str(tmp_path / "exact.mp4")) as c:
        assert c.streams.video[0].codec_context.profile == "High 4:4:4 Predictive"
    grey = [Image.new("RGB", (32, 32), (k * 37,) * 3) for k in range(4)]
    save_video(grey, tmp_path / "grey.mp4", fps=8, lossless=True)
    back = np.stack([np.asarray(f, np.int16) for f in load_video(tmp_path / "grey.mp4")])
    assert np.abs(back - np.arange(4).reshape(4, 1, 1, 1) * 37).max() <= 1  # only the RGB <-> YUV rounding


def test_a_rotated_video_is_turned_upright(tmp_path):
    """A phone's portrait clip is stored landscape with a display matrix saying to turn it; players do."""
    from diffsynth.runtime.media import video_size

    path = tmp_path / "portrait.mp4"
    stored = np.zeros((3, 32, 64, 3), np.uint8)
    stored[:, :, :32, 2] = 255  # left half blue
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip(f"PyAV {av.__version__} cannot write a display rotation")
        stream.set_display_rotation(-90)  # counter-clockwise degrees: turn clockwise to show
        for k, array in enumerate(stored):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        rotation = getattr(next(container.decode(video=0)), "rotation", None)
    if rotation is None:
        pytest.skip(f"PyAV {av.__version__} does not read frame.rotation")
    assert rotation == -90
    frames = load_video(path)
    assert len(frames) == 3 and frames[0].size == (32, 64) == video_size(path)
    top, bottom = frames[0].getpixel((16, 4)), frames[0].getpixel((16, 60))
    assert top[2] > 200 and bottom[2] < 60  # turned clockwise: the stored left half is on top
    assert load_video(path, height=32)[0].size == (16, 32)
    save_video(stored, tmp_path / "plain.mp4", fps=8)
    assert load_video(tmp_path / "plain.mp4")[0].size == (64, 32) == video_size(tmp_path / "plain.mp4")


def test_damaged_media_are_config_errors_naming_the_file(tmp_path):
    """A truncated PNG raised a bare OSError without the file; broken videos and sound files PyAV's InvalidDataError."""
    from diffsynth.runtime.media import video_size

    random_image(0, (128, 128)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ConfigError, match=r"cut\.png cannot be read as a picture: the file is damaged or truncated"
    ) as error:
        load_image(tmp_path / "cut.png")
    assert isinstance(error.value.__cause__, OSError)
    (tmp_path / "text.mp4").write_bytes(b"not a video at all " * 20)
    for read in (load_video, video_frame_count, video_frame_times, video_size):
        with pytest.raises(
            ConfigError, match=r"text\.mp4 cannot be read as a video: the file is damaged or is not a video \("
        ):
            read(tmp_path / "text.mp4")
    save_video(np.zeros((4, 32, 32, 3), np.uint8), tmp_path / "clip.mp4")
    data = (tmp_path / "clip.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(ConfigError, match=r"cut\.mp4 cannot be read as a video: the file is damaged"):
        load_video(tmp_path / "cut.mp4")
    (tmp_path / "text.wav").write_bytes(b"not a sound either " * 20)
    with pytest.raises(
        ConfigError, match=r"text\.wav cannot be read as a sound file: the file is damaged or is not a sound"
    ):
        load_audio(tmp_path / "text.wav")
    save_audio(torch.zeros(2, 1001), tmp_path / "whole.wav", 16000)
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2 + 1])
    with pytest.raises(
        ConfigError, match=r"cut\.wav cannot be read as a sound file: .*truncated: its header states 1001 samples"
    ):
        load_audio(tmp_path / "cut.wav")


def test_a_gif_keeps_identical_frames(tmp_path):
    """Pillow's `save` folds a run of identical frames into one shown as long: 6 frames read back as 4."""
    frames = [Image.new("RGB", (16, 16), (red, 0, 0)) for red in (0, 0, 0, 100, 200, 200)]
    save_video(frames, tmp_path / "dup.gif", fps=10)
    back = load_video(tmp_path / "dup.gif")
    assert len(back) == 6 and video_frame_count(tmp_path / "dup.gif") == 6
    assert [img.getpixel((0, 0))[0] for img in back] == [0, 0, 0, 100, 200, 200]


def test_muxed_audio_reads_back_without_the_codecs_end_padding(tmp_path):
    """AAC fills its last frame past the end: 2.0 s at 16 kHz decoded to 32768 samples; the start stays aligned."""
    rate = 16000
    wave = torch.zeros(1, 2 * rate)
    wave[0, 8000:8400] = 0.8  # a click at 0.5 s
    mux_video_audio(smooth_frames(32, 32, 32), wave, rate, tmp_path / "click.mp4", fps=16)
    audio, got_rate = load_audio(tmp_path / "click.mp4")
    assert got_rate == rate and audio.shape == (1, 2 * rate)
    assert int((audio[0].abs() > 0.3).nonzero()[0]) == 8000
