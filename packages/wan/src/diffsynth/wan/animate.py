"""Wan2.2-Animate: the DiT's face-motion modules, and what `WanVideoPipeline(animate_pose_video=...,
animate_face_video=..., animate_inpaint_video=..., animate_mask_video=...)` builds for it.

The Animate DiT is a Wan 2.1 I2V 14B DiT (36 input channels, CLIP image input) with four additions, named as
in the authors' checkpoint (`Wan-AI/Wan2.2-Animate-14B`, `wan/modules/animate/`):

- `pose_patch_embedding`: the pose video's VAE latent, patch-embedded and added to the video tokens of every
  latent frame after the first (the first latent frame is the character image);
- `motion_encoder` (the authors' `Generator`, a LIA-style encoder): each face crop (`motion_encoder_size`
  pixels square) -> a StyleGAN-like conv pyramid (`enc.net_app.convs`) -> five equalised linears (`enc.fc`) ->
  `motion_dim` coefficients over an orthonormalised basis (`dec.direction.weight`, QR in float32);
- `face_encoder`: causal 1-D convolutions over time (two of stride 2, so 4k - 3 face frames give k motion
  frames), split into `face_encoder_num_heads` token groups, plus a learned padding token per frame;
- `face_adapter.fuser_blocks`: after every `face_adapter_every`-th DiT block, a cross-attention from the video
  tokens of each latent frame to the face tokens of the same frame (a zero frame leads for the character
  image), added to the residual stream.

The pipeline follows the authors' `wan/animate.py` (and diffusers' `WanAnimatePipeline`): the video is made in
segments of `num_frames - 4` frames (the first latent frame of each is the character image); each later segment
starts from the last `animate_overlap_frames` generated frames. `y` is the character image's latent (mask 1)
then the segment's conditioning latent: zeros (animation) or the background video (replacement, mask = the
kept background), with the overlap frames first and marked given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffsynth.runtime.attention import attention
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import load_frames, load_image, pil_to_tensor
from diffsynth.runtime.pipeline import seeded_generator
from diffsynth.runtime.vram import module_dtype

# StyleGAN channel widths by resolution: the motion encoder's conv pyramid in the released checkpoint
RELEASED_MOTION_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)  # the anti-aliasing filter before each stride-2 convolution
FACE_EPS = 1e-6
MOTION_LINEARS = 5  # `enc.fc`: four style -> style linears, then style -> motion_dim


def motion_channels(size: int, given: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The conv pyramid's widths at resolutions `size, size / 2, ..., 4` (the released table unless given)."""
    if given:
        return tuple(given)
    return tuple(RELEASED_MOTION_CHANNELS.get(size >> i, 512) for i in range(int(math.log2(size)) - 1))


# ----------------------------------------------------------------------------------------- motion encoder
class FusedLeakyReLU(nn.Module):
    """Leaky ReLU (0.2) of `x + bias`, scaled by sqrt(2); the bias is stored `[1, C, 1, 1]` as released."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype), 0.2) * math.sqrt(2)


class Blur(nn.Module):
    """A fixed separable FIR filter (`kernel`, kept in the checkpoint) applied per channel after padding."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        taps = torch.tensor(BLUR_TAPS)
        kernel = taps[None, :] * taps[:, None]
        self.register_buffer("kernel", kernel / kernel.sum())
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        kernel = torch.flip(self.kernel, (0, 1)).to(x.dtype)  # a true convolution, as upfirdn2d computes it
        return F.conv2d(x, kernel[None, None].expand(c, 1, -1, -1), groups=c)


class EqualConv2d(nn.Module):
    """Conv2d whose weight is scaled by 1 / sqrt(fan_in) at run time (equalised learning rate)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale, self.stride, self.padding = 1 / math.sqrt(cin * kernel**2), stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, (self.weight * self.scale).to(x.dtype), bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear whose weight is scaled by 1 / sqrt(fan_in) at run time."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (self.weight * self.scale).to(x.dtype), self.bias.to(x.dtype))


def conv_layer(cin: int, cout: int, kernel: int, downsample: bool = False, activate: bool = True) -> nn.Sequential:
    """[Blur,] EqualConv2d[, FusedLeakyReLU]: the authors' `ConvLayer` (bias only through the activation)."""
    layers: list[nn.Module] = []
    if downsample:
        p = len(BLUR_TAPS) - 2 + kernel - 1
        layers += [Blur(((p + 1) // 2, p // 2)), EqualConv2d(cin, cout, kernel, stride=2, bias=False)]
    else:
        layers.append(EqualConv2d(cin, cout, kernel, padding=kernel // 2, bias=not activate))
    if activate:
        layers.append(FusedLeakyReLU(cout))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two 3 x 3 convolutions (the second halves the size) plus a blurred 1 x 1 stride-2 skip, over sqrt(2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_layer(cin, cin, 3)
        self.conv2 = conv_layer(cin, cout, 3, downsample=True)
        self.skip = conv_layer(cin, cout, 1, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Direction(nn.Module):
    """`weight` `[out_dim, motion_dim]`: its QR factor Q (float32) is the basis the motion coefficients weigh."""

    def __init__(self, out_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, motion_dim))

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        q = torch.linalg.qr((self.weight + 1e-8).float())[0]
        return (alpha.float() @ q.T).to(alpha.dtype)


class MotionEncoder(nn.Module):
    """Face crops `[N, 3, size, size]` in [-1, 1] -> motion vectors `[N, out_dim]` (`enc.net_app.convs`,
    `enc.fc`, `dec.direction`, as the authors' `Generator` nests them)."""

    def __init__(self, size: int, channels: tuple[int, ...], style_dim: int, motion_dim: int, out_dim: int):
        super().__init__()
        self.size = size
        convs = [conv_layer(3, channels[0], 1)]
        convs += [ResBlock(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        convs.append(EqualConv2d(channels[-1], style_dim, 4, bias=False))
        self.enc = nn.Module()
        self.enc.net_app = nn.Module()
        self.enc.net_app.convs = nn.ModuleList(convs)
        linears = [EqualLinear(style_dim, style_dim) for _ in range(MOTION_LINEARS - 1)]
        self.enc.fc = nn.Sequential(*linears, EqualLinear(style_dim, motion_dim))
        self.dec = nn.Module()
        self.dec.direction = Direction(out_dim, motion_dim)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        h = faces
        for conv in self.enc.net_app.convs:
            h = conv(h)
        return self.dec.direction(self.enc.fc(h.flatten(1)))


# ----------------------------------------------------------------------------------------- face encoder
class CausalConv1d(nn.Module):
    """Conv1d over time, padded on the left by replicating the first frame (`conv` as released)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    """Motion vectors `[B, F, in_dim]` -> face tokens `[B, T, heads + 1, dim]`, `T = ((F - 1) // 2) // 2 + 1`
    (F = 4T - 3 face frames for T latent frames): per head a token, plus the learned padding token."""

    def __init__(self, in_dim: int, hidden: int, heads: int, dim: int):
        super().__init__()
        self.heads = heads
        self.conv1_local = CausalConv1d(in_dim, hidden * heads)
        self.conv2 = CausalConv1d(hidden, hidden, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, stride=2)
        self.norm = nn.LayerNorm(hidden, eps=FACE_EPS, elementwise_affine=False)  # the three norms are alike
        self.out_proj = nn.Linear(hidden, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    @staticmethod
    def frames_out(face_frames: int) -> int:
        return ((face_frames - 1) // 2) // 2 + 1

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        b = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2))  # [B, heads * hidden, F]
        x = F.silu(self.norm(x.unflatten(1, (self.heads, -1)).flatten(0, 1).transpose(1, 2)))  # [B*heads, F, hid]
        for conv in (self.conv2, self.conv3):
            x = F.silu(self.norm(conv(x.transpose(1, 2)).transpose(1, 2)))
        x = self.out_proj(x).unflatten(0, (b, self.heads)).transpose(1, 2)  # [B, T, heads, dim]
        pad = self.padding_tokens.to(x.dtype).expand(b, x.shape[1], 1, -1)
        return torch.cat([x, pad], dim=2)


# ----------------------------------------------------------------------------------------- face adapter
class FaceBlock(nn.Module):
    """Cross-attention from the video tokens of each latent frame to that frame's face tokens (QK-RMSNorm per
    head, pre-LayerNorms without weights); returns the residual update."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.linear1_kv = nn.Linear(dim, 2 * dim)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=FACE_EPS)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=FACE_EPS)
        self.pre_norm_feat = nn.LayerNorm(dim, eps=FACE_EPS, elementwise_affine=False)
        self.pre_norm_motion = nn.LayerNorm(dim, eps=FACE_EPS, elementwise_affine=False)

    def forward(self, x: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """`x` `[B, S, dim]` float32 residual (S a multiple of the frames T), `motion` `[B, T, N, dim]`;
        the result is float32 `[B, S, dim]`."""
        b, t, n, dim = motion.shape
        dtype, heads = motion.dtype, self.num_heads
        q = self.linear1_q(self.pre_norm_feat(x.float()).to(dtype)).unflatten(-1, (heads, -1))
        kv = self.linear1_kv(self.pre_norm_motion(motion)).unflatten(-1, (2, heads, -1))  # [B, T, N, 2, H, D]
        q = self.q_norm(q).unflatten(1, (t, -1)).flatten(0, 1)  # [B*T, S/T, H, D]
        k = self.k_norm(kv[..., 0, :, :]).flatten(0, 1)  # [B*T, N, H, D]
        v = kv[..., 1, :, :].flatten(0, 1)
        out = attention(q, k, v).flatten(2).unflatten(0, (b, t)).flatten(1, 2)
        return self.linear2(out.to(dtype)).float()


class FaceAdapter(nn.Module):
    """`fuser_blocks`: one `FaceBlock` per `every` DiT blocks (after blocks 0, every, 2 every, ...)."""

    def __init__(self, dim: int, num_heads: int, count: int):
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(dim, num_heads) for _ in range(count))


# ----------------------------------------------------------------------------------------- pipeline inputs
@dataclass
class AnimateInputs:
    """The driving videos as RGB frames, each `frames` long (the pose video's length); `background` and
    `mask` only for replacement."""

    pose: list[Image.Image]
    faces: list[Image.Image]
    background: list[Image.Image] | None
    mask: list[Image.Image] | None
    overlap: int

    @property
    def frames(self) -> int:
        return len(self.pose)


def check_animate_inputs(pose, faces, background, mask, overlap, segment: int) -> AnimateInputs:
    """Load and check the `animate_*` arguments: pose and face videos of one length, background and mask
    together and at least that long, an overlap of 1 + 4k frames shorter than a segment."""
    if pose is None or faces is None:
        raise ConfigError(
            "this Wan model is Wan2.2-Animate: pass animate_pose_video and animate_face_video (the driving "
            "pose renders and face crops, one per frame) and input_image (the character)"
        )
    pose_frames, face_frames = load_frames(pose, "animate_pose_video"), load_frames(faces, "animate_face_video")
    if len(face_frames) != len(pose_frames):
        raise ConfigError(
            f"animate_face_video has {len(face_frames)} frames but animate_pose_video has {len(pose_frames)}: "
            "give one face crop per pose frame"
        )
    if (background is None) != (mask is None):
        raise ConfigError("replacement needs both animate_inpaint_video (the background) and animate_mask_video")
    bg_frames = mask_frames = None
    if background is not None:
        bg_frames = load_frames(background, "animate_inpaint_video")
        mask_frames = load_frames(mask, "animate_mask_video")
        for name, items in (("animate_inpaint_video", bg_frames), ("animate_mask_video", mask_frames)):
            if len(items) < len(pose_frames):
                raise ConfigError(f"{name} has {len(items)} frames, fewer than animate_pose_video's {len(pose_frames)}")
        bg_frames, mask_frames = bg_frames[: len(pose_frames)], mask_frames[: len(pose_frames)]
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 1 or overlap % 4 != 1:
        raise ConfigError(f"animate_overlap_frames={overlap!r} must be 1 + 4k frames (the authors use 1 or 5)")
    if overlap >= segment:
        raise ConfigError(
            f"animate_overlap_frames={overlap} must be shorter than a segment ({segment} frames = num_frames - 4)"
        )
    return AnimateInputs(pose_frames, face_frames, bg_frames, mask_frames, overlap)


def segment_starts(frames: int, segment: int, overlap: int) -> list[int]:
    """First frame of each segment: segments of `segment` frames, each after the first starting `overlap`
    frames before the previous one ends, until they cover `frames` (the last may run past it)."""
    step = segment - overlap
    count = max(1, -(-(frames - overlap) // step))
    return [i * step for i in range(count)]


def segment_noise(
    shape: tuple[int, ...], segments: int, seed: int | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """Each segment's noise `shape` (`[B, ...]`), drawn on `device` from one generator seeded with `seed`: with one
    segment, one draw of the batch (as the other Wan modes); with several, prompt b's noise for segment k is the
    generator's draw `b * segments + k` of one prompt's noise, so a prompt's video does not depend on the batch it
    is in (prompt 0's is the one-prompt call's: the k-th draw). The seed and device are checked as every mode's
    (`seeded_generator`: a seed of 1.5 or True, or a rand_device of disk, is refused by name) when it is called.
    The caller has shared an unseeded call's seed already when its pipeline is parallel (`shared_seed`): None here
    draws unseeded on this rank, never waiting for the others."""
    generator, device = seeded_generator(seed, device, parallel=False)
    return _segment_draws(shape, segments, generator, device)


def _segment_draws(
    shape: tuple[int, ...], segments: int, generator: torch.Generator | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """`segment_noise`'s draws from its checked `generator` (None: unseeded)."""
    if generator is None or segments == 1:
        for _ in range(segments):
            yield torch.randn(shape, generator=generator, device=device)
        return
    one, generators = (1, *shape[1:]), []
    for b in range(shape[0]):
        generators.append(torch.Generator(device).set_state(generator.get_state()))
        if b < shape[0] - 1:  # the next prompt starts where this one's draws end
            for _ in range(segments):
                torch.randn(one, generator=generator, device=device)
    for _ in range(segments):
        yield torch.cat([torch.randn(one, generator=g, device=device) for g in generators])


def reflect_pad(items: list, length: int) -> list:
    """`items` extended to `length` by bouncing back and forth over it (1 2 3 -> 1 2 3 2 1 2 ...)."""
    if len(items) == 1:
        return items * length
    period = 2 * (len(items) - 1)
    return [items[i % period if i % period < len(items) else period - i % period] for i in range(length)]


def fit_character(image: Image.Image, height: int, width: int) -> Image.Image:
    """The character image resized (bilinear, aspect kept) and centred on a black frame, as the authors'
    `padding_resize` does; an image of the frame's size is used as is."""
    image = load_image(image)
    if image.size == (width, height):
        return image
    wide = image.width / image.height > width / height
    w = width if wide else image.width * height // image.height
    h = height if not wide else image.height * width // image.width
    canvas = Image.new("RGB", (width, height), 0)
    canvas.paste(image.resize((w, h), Image.BILINEAR), ((width - w) // 2, (height - h) // 2))  # the authors' offset
    return canvas


def frames_tensor(items: list[Image.Image], height: int, width: int, dtype, device) -> torch.Tensor:
    """`[1, 3, F, height, width]` in [-1, 1], frames resized (bicubic) when their size differs."""
    resized = [im if im.size == (width, height) else im.resize((width, height), Image.BICUBIC) for im in items]
    return pil_to_tensor(resized, dtype, device).transpose(0, 1)[None]


def i2v_mask(given: torch.Tensor, temporal: int) -> torch.Tensor:
    """`[B, F, h, w]` per-pixel-frame "given" flags (F = 1 + temporal * (T - 1)) -> the DiT's `[B, temporal, T,
    h, w]` mask channels: the first frame stands for a whole latent frame."""
    first = given[:, :1].expand(-1, temporal, -1, -1)
    flags = torch.cat([first, given[:, 1:]], dim=1)
    return flags.unflatten(1, (-1, temporal)).transpose(1, 2)


def background_mask(mask: list[Image.Image], latent_hw: tuple[int, int], device) -> torch.Tensor:
    """`[1, F, h, w]`: 1 where the background is kept (mask black), from each mask frame's first channel,
    resampled (nearest) to the latent grid."""
    planes = np.stack([np.asarray(load_image(im), dtype=np.float32)[..., 0] for im in mask]) / np.float32(255.0)
    keep = 1 - torch.from_numpy(planes).to(device)
    return F.interpolate(keep[:, None], size=latent_hw, mode="nearest")[:, 0][None]


def segment_condition(
    pipe,
    inputs: AnimateInputs,
    start: int,
    segment: int,
    previous: torch.Tensor | None,
    batch: int,
    height: int,
    width: int,
    vae_kwargs: dict,
) -> torch.Tensor:
    """The conditioning after the character frame `[B, 4 + z, T, h, w]`: the mask channels and the latent of
    the segment's conditioning video (the `previous` segment's last frames, then zeros, or the background)."""
    vae, device = pipe.vae, pipe.device
    dtype, s, tc = module_dtype(vae), vae.spatial_compression, vae.temporal_compression
    overlap = inputs.overlap if previous is not None else 0
    if inputs.background is not None:
        video = frames_tensor(inputs.background[start : start + segment], height, width, dtype, device)
        video = video.expand(batch, -1, -1, -1, -1)
        given = background_mask(inputs.mask[start : start + segment], (height // s, width // s), device)
        given = given.expand(batch, -1, -1, -1).clone()
    else:
        video = torch.zeros(batch, 3, segment, height, width, dtype=dtype, device=device)
        given = torch.zeros(batch, segment, height // s, width // s, device=device)
    if overlap:
        video = torch.cat([previous[:, :, -overlap:].to(device=device, dtype=dtype), video[:, :, overlap:]], dim=2)
        given[:, :overlap] = 1
    latent = vae.encode(video, **vae_kwargs).float()
    return torch.cat([i2v_mask(given, tc).to(latent.dtype), latent], dim=1)


__all__ = [
    "RELEASED_MOTION_CHANNELS",
    "AnimateInputs",
    "FaceAdapter",
    "FaceBlock",
    "FaceEncoder",
    "MotionEncoder",
    "check_animate_inputs",
    "fit_character",
    "motion_channels",
    "reflect_pad",
    "segment_condition",
    "segment_noise",
    "segment_starts",
]
