"""Images, videos and audio in and out of pipelines: PIL images, H.264 mp4 through `av`, PCM16 wav.

Pixel tensors are [-1, 1] with channels first ([B, 3, H, W], videos [B, 3, F, H, W]), the range the VAEs
work in; `tensor_to_output` turns them into what users asked for ("pil", "np" channels-last in [0, 1],
"pt" in [0, 1]). Audio waveforms are float [C, N] in [-1, 1].
"""

from __future__ import annotations

import logging
import math
import os
import wave
from collections.abc import Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
PathLike = str | os.PathLike


@contextmanager
def damaged_as_config_error(path: Path, what: str):
    """PIL's and PyAV's errors while reading `path` (OSError, av.error.FFmpegError) as a ConfigError naming it."""
    import av

    try:
        yield
    except (OSError, av.error.FFmpegError) as error:
        raise ConfigError(f"{path} cannot be read as {what}: the file is damaged or is not {what} ({error})") from error


def _existing(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    return path


# ----------------------------------------------------------------------------------- images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # files read as one image
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mkv", ".gif")  # files read as frames (`load_video`)


def load_image(image: PathLike | Image.Image, mode: str = "RGB", *, name: str | None = None) -> Image.Image:
    """A PIL image in `mode` ("RGB", or "RGBA" for models that read transparency) from a path or an image
    (any mode: RGBA, L, P ... are converted; RGB gains an opaque alpha), turned upright as its EXIF orientation
    says (a phone's portrait photo is stored sideways with a tag saying so; diffusers' `load_image` does the same).
    Grey images deeper than 8 bits are scaled to 8 bits first (`eight_bit`): 16-bit ones (modes I;16*, and I with
    values in 0..65535, as a 16-bit PNG can open) keep their top 8 bits, float ones (mode F) must hold 0..1.
    A damaged or truncated file is a ConfigError naming it; a missing file, an unreadable deep image or another type
    of value (a list, an array, a tensor) one naming `name`, the caller's argument (e.g.
    "controlnet_inputs[0].image"), where given."""
    if mode not in ("RGB", "RGBA"):
        raise ConfigError(f"load_image mode={mode!r} is not accepted; use 'RGB' or 'RGBA'")
    if isinstance(image, Image.Image):
        image = eight_bit(upright(image), name or "the image")
        return image if image.mode == mode else image.convert(mode)
    if not isinstance(image, (str, os.PathLike)):
        what = name if name is not None else "an image"
        raise ConfigError(f"{what} must be a file path or a PIL.Image, got {type(image).__name__}")
    path = _existing(image, name or "image")
    try:
        opened = Image.open(path)
    except Image.UnidentifiedImageError:
        hint = "; it is a video: read its frames with load_video" if path.suffix.lower() in VIDEO_SUFFIXES else ""
        raise ConfigError(f"{path} is not an image PIL can read ({', '.join(IMAGE_SUFFIXES)}){hint}") from None
    except OSError as error:
        raise ConfigError(f"{path} cannot be read as a picture: the file is damaged or is not one ({error})") from error
    with opened:
        try:
            return eight_bit(upright(opened), str(path)).convert(mode)
        except OSError as error:  # PIL decodes lazily: a truncated file fails here
            raise ConfigError(
                f"{path} cannot be read as a picture: the file is damaged or truncated ({error})"
            ) from error


def load_images(images, name: str) -> list[Image.Image] | None:
    """One image or a list of them (paths or PIL images) as RGB images, read before any model runs: None stays
    None, and a bad item is named as the caller's argument `name` (`name[i]` in a list)."""
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        return [load_image(images, name=name)]
    return [load_image(image, name=f"{name}[{i}]") for i, image in enumerate(images)]


def eight_bit(image: Image.Image, name: str) -> Image.Image:
    """`image` as 8-bit grey (mode L) when it is a deeper grey image, else itself. PIL's own `convert` clips such
    values to 0..255 (a 16-bit mid-grey turns white). Modes I;16, I;16B, I;16L, I;16N keep their top 8 bits; mode I
    is read as 16-bit (0..65535, how a 16-bit PNG can open) and refused when its values fall outside that; mode F
    is read as 0..1 (0 black, 1 white) and refused otherwise. `name` (the file) is named in errors."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint16) >> 8
    elif image.mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise ConfigError(
                f"{name}: a 32-bit integer image (mode I) with values {low}..{high}; it is read as 16-bit "
                f"(0..65535), so scale it to 8 bits (mode L) first"
            )
        array = np.asarray(image).astype(np.int64) >> 8
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        finite = bool(np.isfinite(array).all())
        if not (finite and array.min() >= 0.0 and array.max() <= 1.0):
            values = f"{float(array.min()):g}..{float(array.max()):g}" if finite else "NaN or infinite"
            raise ConfigError(
                f"{name}: a float image (mode F) with values {values}; it is read as 0 (black) to 1 (white), "
                f"so scale it to that range or to 8 bits (mode L) first"
            )
        array = np.round(array * 255.0)
    else:
        return image
    return Image.fromarray(array.astype(np.uint8))  # 2-D uint8: mode L


EXIF_ORIENTATION = 0x0112  # the EXIF tag of how the stored pixels are turned
SIDEWAYS = (5, 6, 7, 8)  # orientations whose upright picture swaps width and height


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says (the image itself when it has none)."""
    from PIL import ImageOps

    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `image` once upright, from its header (no pixels decoded)."""
    sideways = image.getexif().get(EXIF_ORIENTATION, 1) in SIDEWAYS
    return (image.height, image.width) if sideways else image.size


def area_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels with the aspect ratio of `width x height`, multiples of 32 (the
    size DiffSynth-Studio's edit pipelines resize images to)."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    return round(new_width / 32) * 32, round(new_width / ratio / 32) * 32


def save_image(image: Image.Image, path: PathLike) -> None:
    """Write `image`; the format follows the file extension; parent folders are created."""
    if not isinstance(image, Image.Image):
        raise ConfigError(f"save_image takes a PIL.Image, got {type(image).__name__} (see tensor_to_pil)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def pil_to_tensor(
    images: Image.Image | Sequence[Image.Image],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    mode: str = "RGB",
) -> torch.Tensor:
    """[B, 3, H, W] (mode "RGBA": [B, 4, H, W]) in [-1, 1] from one image or a list of images of one size."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ConfigError("pil_to_tensor got an empty list of images")
    images = [load_image(im, mode) for im in images]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ConfigError(f"images in one batch must share a size (width, height), got {sorted(sizes)}")
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels.to(device=device, dtype=dtype)


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 array with the same layout."""
    scaled = ((pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).cpu().numpy()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from [B, 3, H, W] (or one [3, H, W]) in [-1, 1]; 4 channels give RGBA images."""
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] not in (3, 4):
        raise ConfigError(
            f"tensor_to_pil takes [B, 3 or 4, H, W] or [3 or 4, H, W] in [-1, 1], got {tuple(images.shape)}"
        )
    return [Image.fromarray(a) for a in _to_uint8(images).transpose(0, 2, 3, 1)]


def tensor_to_output(images: torch.Tensor, output_type: str = "pil"):
    """What a pipeline returns for decoded pixels [B, 3, H, W] or videos [B, 3, F, H, W] in [-1, 1]:
    "pil": a list of B images (videos: B lists of frames); "np": float32 [B, H, W, 3] / [B, F, H, W, 3]
    in [0, 1]; "pt": float32 in [0, 1] in the input layout. Images with 4 channels (RGBA) keep them."""
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    rgba_image = images.dim() == 4 and images.shape[1] == 4
    if images.dim() not in (4, 5) or (images.shape[1] != 3 and not rgba_image):
        raise ConfigError(
            f"decoded pixels must be [B, 3 or 4, H, W] or [B, 3, F, H, W] in [-1, 1], got {tuple(images.shape)}"
        )
    if output_type == "pil":
        if images.dim() == 4:
            return tensor_to_pil(images)
        return [tensor_to_pil(video.transpose(0, 1)) for video in images]
    unit = (images.detach().float().clamp(-1, 1) + 1.0) / 2.0
    if output_type == "pt":
        return unit
    channels_last = unit.permute(0, 2, 3, 1) if unit.dim() == 4 else unit.permute(0, 2, 3, 4, 1)
    return channels_last.cpu().numpy()


# ----------------------------------------------------------------------------------- video
def _frames_uint8(frames) -> list[np.ndarray]:
    """HxWx3 uint8 arrays from a list of PIL images or an array/tensor [F, H, W, 3] or [3, F, H, W]
    (uint8, or floats in [0, 1])."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ConfigError("the list of video frames is empty")
        if all(isinstance(f, Image.Image) for f in frames):
            arrays = [np.asarray(load_image(f), dtype=np.uint8) for f in frames]
        else:
            arrays = list(_frames_uint8(np.stack([np.asarray(f) for f in frames])))
    elif isinstance(frames, (np.ndarray, torch.Tensor)):
        array = frames.detach().float().cpu().numpy() if isinstance(frames, torch.Tensor) else frames
        if array.ndim == 4 and array.shape[-1] != 3 and array.shape[0] == 3:
            array = array.transpose(1, 2, 3, 0)  # [3, F, H, W] -> [F, H, W, 3]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ConfigError(
                f"video frames must be a list of PIL images or an array [F, H, W, 3] / [3, F, H, W], "
                f"got shape {tuple(array.shape)}"
            )
        if array.shape[0] == 0:
            raise ConfigError("the video has no frames (first dimension is 0)")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        arrays = list(array)
    else:
        raise ConfigError(
            f"video frames must be a list of PIL images, an ndarray or a tensor, got {type(frames).__name__}"
        )
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ConfigError(f"all video frames must share one size, got {sorted(sizes)}")
    return arrays


def _even(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """H.264 in yuv420p needs even sizes: odd ones get their last row/column repeated once."""
    h, w = arrays[0].shape[:2]
    pad_h, pad_w = h % 2, w % 2
    if not (pad_h or pad_w):
        return arrays
    logger.warning("video size %dx%d is odd; repeating the edge to %dx%d for H.264", w, h, w + pad_w, h + pad_h)
    return [np.pad(a, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") for a in arrays]


def quality_to_crf(quality: float) -> int:
    """imageio's 0-10 quality scale (10 best, DiffSynth-Studio's default 5) as an x264 CRF (51 worst), at least 1:
    CRF 0 (lossless) makes x264 write the High 4:4:4 Predictive profile, which browsers and QuickTime do not play,
    so quality 9.9 and 10 give CRF 1 (High profile)."""
    if not 0 <= quality <= 10:
        raise ConfigError(f"quality must be between 0 (smallest file) and 10 (best), got {quality}")
    return max(1, int((1.0 - quality / 10.0) * 51))


def _rate(fps: float) -> Fraction:
    if not fps or fps <= 0:
        raise ConfigError(f"fps must be a positive number, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def _add_video_stream(
    container, arrays: list[np.ndarray], fps: float, quality: float, suffix: str = ".mp4", lossless: bool = False
):
    """H.264 (VP9 in a `.webm`), yuv420p, at the CRF `quality` maps to (CRF 0 / VP9 lossless when `lossless`)."""
    import av

    options = {"crf": "0" if lossless else str(quality_to_crf(quality))}
    if suffix == ".webm":
        codec = "libvpx-vp9"
        options["b:v"] = "0"  # constant quality: the CRF alone sets the rate
        if lossless:
            options["lossless"] = "1"
    else:
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
    if codec not in av.codecs_available:
        raise ConfigError(f"this PyAV build has no {codec} encoder to write {suffix} videos; write .mp4 instead")
    stream = container.add_stream(codec, rate=_rate(fps))
    stream.height, stream.width = arrays[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    stream.options = options
    return stream


def _encode_video(container, stream, arrays: list[np.ndarray]) -> None:
    import av

    for i, array in enumerate(arrays):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
        frame.pts = i
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def h264_frame(image: Image.Image, crf: int) -> Image.Image:
    """`image` after one trip through H.264 at `crf` (x264, preset veryfast, yuv420p; odd sizes lose their last
    row / column): how video models trained on compressed clips (LTX-2) want a conditioning image to look."""
    import io

    import av

    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ConfigError(f"crf must be an integer from 0 (lossless) to 51, got {crf!r}")
    array = np.asarray(image.convert("RGB"))
    array = np.ascontiguousarray(array[: array.shape[0] // 2 * 2, : array.shape[1] // 2 * 2])
    with io.BytesIO() as buffer:
        with av.open(buffer, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=1, options={"crf": str(crf), "preset": "veryfast"})
            stream.height, stream.width = array.shape[:2]
            frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(frame))
            container.mux(stream.encode())
        data = buffer.getvalue()
    with io.BytesIO(data) as buffer, av.open(buffer) as container:
        return Image.fromarray(next(container.decode(video=0)).to_ndarray(format="rgb24"))


def save_video(frames, path: PathLike, fps: float = 16, quality: float = 5, *, lossless: bool = False) -> None:
    """Write frames (list of PIL, or [F, H, W, 3] / [3, F, H, W] uint8 or [0, 1] floats) as a video whose format
    follows the suffix: H.264 in `.mp4` / `.mov` / `.mkv` / `.avi`, VP9 in `.webm`, an animated `.gif` (256
    colours per frame, every frame kept, identical ones too; `quality` unused). The best `quality` (10) is x264
    CRF 1, which players take; `lossless` writes CRF 0 instead (exact luma, for masks and tests; x264 then uses the
    High 4:4:4 Predictive profile, which browsers and QuickTime do not play) and ignores `quality`."""
    import av

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(
            f"save_video writes {', '.join(VIDEO_SUFFIXES)} files; {path} ends in {suffix or 'no suffix'}"
        )
    if suffix == ".gif":
        _save_gif(_frames_uint8(frames), path, fps)
        return
    arrays = _even(_frames_uint8(frames))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = _add_video_stream(container, arrays, fps, quality, suffix, lossless)
        _encode_video(container, stream, arrays)
    logger.info("wrote %d frames to %s", len(arrays), path)


def _save_gif(arrays: list[np.ndarray], path: Path, fps: float) -> None:
    """An animated GIF looping forever, every frame whole with its own adaptive palette. GIF times frames in
    hundredths of a second, so the rate is rounded. Written frame by frame with Pillow's GIF pieces (`getheader`,
    `getdata`) because `Image.save` folds a run of identical frames into one shown as long, and the file would read
    back with fewer frames than were written."""
    from PIL import GifImagePlugin

    _rate(fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = round(1000 / fps)
    images = [Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE) for a in arrays]
    header, _ = GifImagePlugin.getheader(images[0], info={"loop": 0, "duration": duration})
    with open(path, "wb") as out:
        out.write(b"".join(header))
        for image in images:
            out.write(b"".join(GifImagePlugin.getdata(image, duration=duration, include_color_table=True)))
        out.write(b";")  # the GIF trailer
    logger.info("wrote %d frames to %s", len(arrays), path)


def load_video(
    path: PathLike,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    *,
    start: int = 0,
    fps: float | None = None,
) -> list[Image.Image]:
    """`num_frames` frames (all when None) from frame `start` as RGB images, resized to height x width when given
    (one of them alone keeps the aspect ratio). With `fps` the video is read on its timeline at that rate: frame k
    is the one on screen at time k / fps (by the frames' timestamps, so a variable-rate phone clip too), and a
    30 fps clip read at 16 fps moves at its real speed. Only the frames returned are kept while decoding."""
    import av

    path = _existing(path, "video")
    if (num_frames is not None and num_frames < 1) or start < 0 or (fps is not None and not fps > 0):
        raise ConfigError(
            f"{path}: num_frames={num_frames}, start={start}, fps={fps}: use num_frames >= 1, start >= 0, fps > 0"
        )
    wanted = None if num_frames is None else list(range(start, start + num_frames))
    if fps is not None:
        times, end = video_frame_times(path)
        length = resampled_length(end, fps)
        count = length - start if num_frames is None else num_frames
        if count < 1 or start + count > length:
            raise ConfigError(
                f"{path} lasts {end:.4g} s, {length} frames at {fps:g} fps; {count if count > 0 else 'frames'} from "
                f"frame {start} need {start + max(count, 1)}"
            )
        wanted = frame_indices(count, start=start, times=times, fps=fps)
    keep = None if wanted is None else set(wanted)
    picked: dict[int, Image.Image] = {}
    decoded = 0
    with damaged_as_config_error(path, "a video"), av.open(str(path)) as container:
        if not container.streams.video:
            raise ConfigError(f"{path} holds no video stream")
        for index, frame in enumerate(container.decode(video=0)):
            decoded = index + 1
            if (keep is None and index >= start) or (keep is not None and index in keep):
                picked[index] = upright_frame(frame)
            if wanted is not None and index >= wanted[-1]:
                break
    if not decoded:
        raise ConfigError(f"{path} holds no decodable video frames")
    if wanted is None:
        if not picked:
            raise ConfigError(f"{path} has {decoded} frames; none from frame {start}")
        frames = [picked[i] for i in sorted(picked)]
    elif len(picked) < len(keep):
        if start == 0 and fps is None:
            raise ConfigError(f"{path} has {decoded} frames, fewer than num_frames={num_frames}")
        raise ConfigError(f"{path} has {decoded} frames; {num_frames} frames from frame {start} need {wanted[-1] + 1}")
    else:
        frames = [picked[i] for i in wanted]
    if height is None and width is None:
        return frames
    w0, h0 = frames[0].size
    if height is None:
        height = round(h0 * width / w0)
    if width is None:
        width = round(w0 * height / h0)
    return [f.resize((int(width), int(height)), Image.BICUBIC) for f in frames]


QUARTER_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def upright_frame(frame) -> Image.Image:
    """A decoded `av.VideoFrame` as an RGB image turned as its display matrix says, the nearest quarter turn (a
    phone's portrait clip is stored sideways with a rotation tag, which players and ffmpeg obey; flips in the matrix
    are not applied). PyAV before 14 gives no `frame.rotation`: the frame is returned as stored."""
    image = frame.to_image().convert("RGB")
    turn = QUARTER_TURNS.get(round((getattr(frame, "rotation", 0) or 0) / 90) % 4)  # counter-clockwise degrees
    return image if turn is None else image.transpose(turn)


def video_size(path: PathLike) -> tuple[int, int]:
    """(width, height) of a video's frames as `load_video` returns them: upright, after the rotation its display
    matrix gives (the first frame is decoded to read it)."""
    import av

    path = _existing(path, "video")
    with damaged_as_config_error(path, "a video"), av.open(str(path)) as container:
        if not container.streams.video:
            raise ConfigError(f"{path} holds no video stream")
        frame = next(container.decode(video=0), None)
    if frame is None:
        raise ConfigError(f"{path} holds no decodable video frames")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
    return (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)


def video_frame_times(path: PathLike) -> tuple[list[float], float]:
    """A video file's frames' presentation times in seconds from its first frame, in order, and the time its last
    frame ends, from the packets' timestamps (no decoding); a stream without timestamps counts at its average
    rate."""
    import av

    path = _existing(path, "video")
    with damaged_as_config_error(path, "a video"), av.open(str(path)) as container:
        if not container.streams.video:
            raise ConfigError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        packets = [(p.pts, p.duration) for p in container.demux(stream) if p.size]
        base = stream.time_base
    if not packets:
        raise ConfigError(f"{path} holds no video frames")
    if any(pts is None for pts, _ in packets) or base is None:
        if rate is None:
            raise ConfigError(f"{path}: its video stream gives neither timestamps nor a frame rate")
        return [k / rate for k in range(len(packets))], len(packets) / rate
    packets.sort()
    first = packets[0][0]
    times = [float((pts - first) * base) for pts, _ in packets]
    last = float(packets[-1][1] * base) if packets[-1][1] else (1 / rate if rate else 0.0)
    return times, times[-1] + last


def frame_indices(
    count: int, *, start: int = 0, times: Sequence[float] | None = None, fps: float | None = None
) -> list[int]:
    """The file's frame numbers of `count` frames from frame `start`: `start, start + 1, ...`, or with `fps` (and
    the file's frame `times`, `video_frame_times`) on a timeline resampled to `fps`: frame k is the file's frame on
    screen at time k / fps (the last one begun by then), repeated or skipped as the rates differ."""
    if fps is None or times is None:
        return list(range(start, start + count))
    picked, j = [], 0
    for k in range(start, start + count):
        moment = k / fps + 1e-6
        while j + 1 < len(times) and times[j + 1] <= moment:
            j += 1
        picked.append(j)
    return picked


def resampled_length(end: float, fps: float) -> int:
    """How many frames a video lasting `end` seconds (`video_frame_times`) has on a timeline at `fps`: the k with
    k / fps before its end."""
    return max(0, math.ceil(end * fps - 1e-6))


def video_header_frames(path: PathLike) -> int | None:
    """The frame count a video file's header states (MP4 and MOV keep one; WebM does not: None), without reading
    the file through."""
    import av

    path = _existing(path, "video")
    with damaged_as_config_error(path, "a video"), av.open(str(path)) as container:
        if not container.streams.video:
            raise ConfigError(f"{path} holds no video stream")
        return int(container.streams.video[0].frames) or None


def video_frame_count(path: PathLike) -> int:
    """The frames a video file holds, from its packets (no decoding; a container that lists no count, such as
    WebM, is counted the same way)."""
    return len(video_frame_times(path)[0])


def video_frame_rate(path: PathLike) -> float:
    """The average frame rate of a video file's first video stream."""
    import av

    path = _existing(path, "video")
    with damaged_as_config_error(path, "a video"), av.open(str(path)) as container:
        if not container.streams.video:
            raise ConfigError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ConfigError(f"{path}: its video stream gives no frame rate")
    return float(rate)


def load_frames(video, what: str) -> list[Image.Image]:
    """A video given as a file or as a non-empty list of frames (PIL images or paths), as RGB images;
    anything else is refused naming `what` (the argument)."""
    if isinstance(video, (str, os.PathLike)):
        return load_video(video)
    if isinstance(video, Sequence) and len(video) > 0:
        return [load_image(frame) for frame in video]
    raise ConfigError(f"{what} must be a video file or a non-empty list of frames (PIL images or paths)")


# ----------------------------------------------------------------------------------- audio
def _waveform(waveform) -> np.ndarray:
    """float32 [C, N] from a tensor or array [C, N] or [N]."""
    array = waveform.detach().float().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ConfigError(f"a waveform must be [channels, samples] or [samples], got shape {tuple(array.shape)}")
    return array.astype(np.float32)


def _sample_rate(sample_rate) -> int:
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ConfigError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    return int(sample_rate)


def save_audio(waveform, path: PathLike, sample_rate: int) -> None:
    """Write a float waveform in [-1, 1] as 16-bit PCM wav (value k/32768 is stored as k exactly)."""
    array = _waveform(waveform)
    sample_rate = _sample_rate(sample_rate)
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise ConfigError(f"save_audio writes .wav files; got {path} (use mux_video_audio for mp4 with sound)")
    pcm = np.clip(np.round(array * 32768.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(pcm.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.T.tobytes())


def load_audio(path: PathLike) -> tuple[torch.Tensor, int]:
    """(float32 waveform [C, N] in [-1, 1], sample rate): PCM wav directly, anything else through av. A damaged or
    truncated file (fewer samples than its header states) is a ConfigError naming it."""
    path = _existing(path, "audio")
    try:
        with wave.open(str(path), "rb") as src:
            width, channels, rate = src.getsampwidth(), src.getnchannels(), src.getframerate()
            expected = src.getnframes()
            raw = src.readframes(expected)
    except (wave.Error, EOFError):
        return _load_audio_av(path)
    frame_bytes = width * channels
    if expected * frame_bytes > 0xFFFFFFFF - frame_bytes:  # size left at its placeholder (a streamed wav): read all
        raw = raw[: len(raw) // frame_bytes * frame_bytes]
    elif len(raw) != expected * frame_bytes:
        raise ConfigError(
            f"{path} cannot be read as a sound file: it is damaged or truncated: its header states {expected} samples "
            f"per channel, "
            f"it holds {len(raw) / frame_bytes:g}"
        )
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24-bit
        samples = ints.astype(np.float32) / float(2**23)
    else:
        return _load_audio_av(path)
    return torch.from_numpy(samples.reshape(-1, channels).T.copy()), rate


def _load_audio_av(path: Path) -> tuple[torch.Tensor, int]:
    import av

    chunks: list[np.ndarray] = []
    with damaged_as_config_error(path, "a sound file"), av.open(str(path)) as container:
        if not container.streams.audio:
            raise ConfigError(f"{path} holds no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate
        stated = None if stream.duration is None else round(stream.duration * stream.time_base * rate)
        resampler = av.AudioResampler(format="fltp")
        for frame in container.decode(audio=0):
            for planar in resampler.resample(frame):
                chunks.append(planar.to_ndarray())
    if not chunks:
        raise ConfigError(f"{path} holds no decodable audio")
    samples = np.concatenate(chunks, axis=1).astype(np.float32)
    return torch.from_numpy(_without_end_padding(samples, stated, chunks[-1].shape[1])), int(rate)


def _without_end_padding(samples: np.ndarray, stated: int | None, last_frame: int) -> np.ndarray:
    """`samples` cut to the `stated` length (the stream's duration x rate), when the cut falls inside the last
    decoded frame: codecs such as AAC fill their last frame with silence past the end (2.0 s at 16 kHz decodes to
    32768 samples, not 32000). A length that would cut more is an estimate (an mp3's, from its bitrate): kept."""
    if stated is not None and 0 < samples.shape[1] - stated <= last_frame:
        return samples[:, :stated]
    return samples


def resample_audio(waveform: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """`waveform` `[C, N]` (1 or 2 channels) from `rate` to `target` Hz with libswresample (through `av`),
    float32 on the CPU; as it is when the rates agree."""
    rate, target = _sample_rate(rate), _sample_rate(target)
    if rate == target:
        return waveform
    import av

    array = _waveform(waveform)
    if array.shape[0] not in (1, 2):
        raise ConfigError(f"resample_audio takes mono or stereo waveforms, got {array.shape[0]} channels")
    layout = "mono" if array.shape[0] == 1 else "stereo"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=target)
    chunks = [out.to_ndarray() for item in (frame, None) for out in resampler.resample(item)]
    return torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32))


def mux_video_audio(frames, waveform, sample_rate: int, path: PathLike, fps: float = 16, quality: float = 5) -> None:
    """Write an mp4 with the frames as H.264 and the waveform ([C, N] or [N], 1 or 2 channels) as AAC."""
    import av

    if Path(path).suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise ConfigError(f"mux_video_audio writes .mp4, .mov or .mkv files (H.264 and AAC); got {path}")

    arrays = _even(_frames_uint8(frames))
    audio = np.clip(_waveform(waveform), -1.0, 1.0)
    sample_rate = _sample_rate(sample_rate)
    if audio.shape[0] not in (1, 2):
        raise ConfigError(f"mux_video_audio writes mono or stereo audio, got {audio.shape[0]} channels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    with av.open(str(path), mode="w") as container:
        video = _add_video_stream(container, arrays, fps, quality)
        sound = container.add_stream("aac", rate=sample_rate, layout=layout)
        _encode_video(container, video, arrays)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    logger.info("wrote %d frames and %.2f s of audio to %s", len(arrays), audio.shape[1] / sample_rate, path)
