"""LTX-2.5's DFR pipeline (the authors' "detail-fidelity rendering", ltx-pipelines' `DFRPipeline`).

Two distilled passes, no guidance:

1. at half the size, the video is generated together with *keyframe slots*: one extra latent frame at the end of
   each 24- or 32-frame segment (`dfr_layout.py`), whose tokens hold a single video frame (time extent of one
   frame, and the DiT's learned `keyframes_abs_pos_embedding` added, as on the first latent frame);
2. the video latents and the slots are doubled by the x2 latent upsampler and re-denoised at full size from
   sigma 0.909375, the slots seeded with the upsampled ones; with the detailing IC-LoRA, the first pass's
   half-size video is read beside them as a clean reference (positions scaled by its downscale factor);
3. optionally, temporal refine rounds (`refine_round`), each doubling the frame rate: the temporal x2 upsampler,
   then windows cut at the carried keyframes re-denoised with Euler-ancestral steps, new slots midway.

The sound is the first pass's: the second pass runs the audio stream too (the video needs the cross-modal
attention) but its result is dropped. The clip is generated on the padded canvas and cut to `num_frames`.

Every token of a pass lives in one sequence, `[canvas | given keyframes | slots | reference]`, each with a
conditioning strength (0: generated, 1: kept as given). A token of strength `s` is seen by the DiT at timestep
`(1 - s) * sigma`, and each step's clean estimate is pulled to its given latent by `s` (`denoise_pass`), so a
given first frame, a keyframe at `s < 1` and the reference all follow one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import h264_frame, pil_to_tensor
from diffsynth.runtime.pipeline import seeded_generator
from diffsynth.runtime.vram import module_dtype

from .audio_vae import pack_latents, unpack_latents
from .dfr_layout import resolve_canvas, temporal_tiles, trim_canvas
from .dit import audio_positions, keyframe_positions, video_positions
from .framing import fit_image

DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)  # ltx-pipelines' table
STAGE_2_SIGMAS = DISTILLED_SIGMAS[5:]
TEMPORAL_SIGMAS = DISTILLED_SIGMAS[4:]  # the refine rounds densify a finished canvas: the table from its fifth value
TEMPORAL_ETA = 0.5  # the rounds' Euler-ancestral noise fraction
ANCHOR_STRENGTH = 0.95  # keyframes carried into a round, pinned just short of clean
MAX_CONDITIONING_FPS, SNAP_ABOVE_FPS = 60.0, 30.0
DETAILING_DOWNSCALE = 2  # the detailing IC-LoRA's reference factor when its file declares none
DETAILING_LORA_NAME, DISTILLED_LORA_NAME = "dfr_detailing", "dfr_distilled"
TIMESTEP_SCALE = 1000.0


def conditioning_fps(frame_rate: float) -> float:
    """The frame rate the DiT is told (RoPE time): above 30 fps the authors condition at 60, as the model was
    trained around 24-30 and 60 fps; the clip is still played (and its sound cut) at `frame_rate`."""
    return MAX_CONDITIONING_FPS if frame_rate > SNAP_ABOVE_FPS else float(frame_rate)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    return latents.flatten(2).transpose(1, 2)  # [B, C, F, H, W] -> [B, F*H*W, C]


def _unpack(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, (frames, height, width))


@dataclass
class DFRTokens:
    """One pass's video token sequence `[canvas | keyframes | slots | reference]`: the current values `tokens`
    `[B, N, C]`, the given latents `clean` (zeros where generated), each token's conditioning `strength`
    `[B, N, 1]`, the one-frame marker `marked` `[B, N]` (the first latent frame and the slots), positions
    `coords` `[B, 3, N, 2]`; `grid` is the canvas's latent `(frames, height, width)`, `slots` the slots' place."""

    tokens: torch.Tensor
    clean: torch.Tensor
    strength: torch.Tensor
    marked: torch.Tensor
    coords: torch.Tensor
    grid: tuple[int, int, int]
    slots: slice | None = None

    def video(self) -> torch.Tensor:
        """The canvas's latents `[B, C, f, h, w]`."""
        f, h, w = self.grid
        return _unpack(self.tokens[:, : f * h * w], f, h, w)

    def slot_latents(self) -> torch.Tensor | None:
        """The slots' latents `[B, C, K, h, w]` (None without slots)."""
        if self.slots is None:
            return None
        _, h, w = self.grid
        tokens = self.tokens[:, self.slots]
        return _unpack(tokens, tokens.shape[1] // (h * w), h, w)

    def noised(self, noise: torch.Tensor, level: float) -> DFRTokens:
        """Every token noised to `level` (`noise` over the whole sequence), then the given ones put back by their
        strength: the sequence a pass starts from."""
        tokens = noise * level + self.tokens * (1.0 - level)
        tokens = self.clean * self.strength + tokens * (1.0 - self.strength)
        return DFRTokens(tokens, self.clean, self.strength, self.marked, self.coords, self.grid, self.slots)


def build_tokens(
    config,
    batch: int,
    grid: tuple[int, int, int],
    fps: float,
    device,
    *,
    canvas: torch.Tensor | None = None,
    first: tuple[torch.Tensor, float] | None = None,
    keyframes: Sequence[tuple[int, torch.Tensor, float]] = (),
    slot_frames: Sequence[int] = (),
    slot_seeds: torch.Tensor | None = None,
    reference: tuple[torch.Tensor, int] | None = None,
) -> DFRTokens:
    """The sequence of one pass (before noise), from normalised latents: `canvas` `[B, C, f, h, w]` (zeros when
    None), `first` (a first-frame latent `[1 or B, C, 1, h, w]` and its strength: it replaces the canvas's first
    frame), `keyframes` (video frame, latent `[1 or B, C, 1, h, w]`, strength) appended at their frames, one slot
    per frame of `slot_frames` (seeded by `slot_seeds` `[B, C, K, h, w]`, else zeros), and `reference` (latents
    `[1 or B, C, F', h', w']` and the factor its size is below the canvas's), kept clean."""
    f, h, w = grid
    channels = config.in_channels
    tokens = torch.zeros(batch, f * h * w, channels, device=device) if canvas is None else _pack(canvas.float())
    clean = torch.zeros_like(tokens)
    strength = torch.zeros(batch, tokens.shape[1], 1, device=device)
    marked = torch.zeros(batch, tokens.shape[1], device=device)
    marked[:, : h * w] = 1.0  # the causal first latent frame holds one video frame, like a slot
    coords = [video_positions(config, batch, f, h, w, fps, device)]
    if first is not None:
        latent, s = first
        given = _pack(latent.float()).expand(batch, -1, -1)
        clean[:, : given.shape[1]] = given
        strength[:, : given.shape[1]] = float(s)
    parts = [(tokens, clean, strength, marked)]

    def append(values, given, s: float, mark: float, positions):
        n = given.shape[1]
        parts.append(
            (
                values,
                given,
                torch.full((batch, n, 1), float(s), device=device),
                torch.full((batch, n), mark, device=device),
            )
        )
        coords.append(positions.expand(batch, -1, -1, -1))

    for frame, latent, s in keyframes:
        given = _pack(latent.float()).expand(batch, -1, -1)
        append(torch.zeros_like(given), given, s, 0.0, keyframe_positions(config, h, w, int(frame), fps, device))
    slots = None
    if slot_frames:
        start = sum(p[0].shape[1] for p in parts)
        if slot_seeds is None:
            seeds = torch.zeros(batch, len(slot_frames) * h * w, channels, device=device)
        else:
            if slot_seeds.shape[2] != len(slot_frames):
                raise ConfigError(f"{slot_seeds.shape[2]} slot seeds for {len(slot_frames)} slot frames")
            seeds = _pack(slot_seeds.float())
        slots = slice(start, start + seeds.shape[1])
        positions = torch.cat([keyframe_positions(config, h, w, int(p), fps, device) for p in slot_frames], dim=2)
        append(seeds, torch.zeros_like(seeds), 0.0, 1.0, positions)
    if reference is not None:
        latent, factor = reference
        given = _pack(latent.float()).expand(batch, -1, -1)
        positions = video_positions(config, 1, *latent.shape[2:], fps, device).clone()
        positions[:, 1:] *= factor
        append(torch.zeros_like(given), given, 1.0, 0.0, positions)
    tokens, clean, strength, marked = (torch.cat(column, dim=1) for column in zip(*parts, strict=True))
    return DFRTokens(tokens, clean, strength, marked, torch.cat(coords, dim=2), grid, slots)


def ancestral_step(x, estimate, sigma: float, following: float, eta: float, noise) -> torch.Tensor:
    """One Euler-ancestral step of a rectified flow (ComfyUI's RF variant, diffusers' `LTXEulerAncestralRFScheduler`):
    a deterministic step down to `sigma_down` (`eta` of the way below `following`), then fresh noise (`noise()`
    draws it) scaled to land at `following`. The last step (to 0) returns the clean estimate."""
    if following == 0.0:
        return estimate
    down = following * (1.0 + (following / sigma - 1.0) * eta)
    x = (down / sigma) * x + (1.0 - down / sigma) * estimate
    renoise = max(following**2 - down**2 * (1.0 - following) ** 2 / ((1.0 - down) ** 2 + 1e-12), 0.0) ** 0.5
    return ((1.0 - following) / ((1.0 - down) + 1e-12)) * x + noise() * renoise


def denoise_pass(
    dit, seq: DFRTokens, audio: torch.Tensor, sigmas, text, fps: float, freeze_audio: bool, progress, ancestral=None
):
    """Euler steps over `sigmas` (terminal 0 appended) without guidance. Each token is seen at `(1 - strength) *
    sigma`; its clean estimate, computed at that level, is pulled to its given latent by its strength before the
    step, so given tokens stay. `audio` (normalised `[B, C, L, M]`) is stepped too unless `freeze_audio` (then it
    is read clean). `ancestral` = (eta, noise draw) takes Euler-ancestral steps instead (`ancestral_step`), after
    which the given tokens are put back (the fresh noise reaches every token). Returns the final sequence and
    audio."""
    schedule = [float(s) for s in sigmas] + [0.0]
    dtype = module_dtype(dit)
    b = seq.tokens.shape[0]
    device = seq.tokens.device
    free = 1.0 - seq.strength  # [B, N, 1]
    audio_coords = audio_positions(dit.config, b, audio.shape[2], device)
    x = seq.tokens.float()
    for i in progress(range(len(schedule) - 1)):
        sigma, following = schedule[i], schedule[i + 1]
        t = torch.full((b,), sigma * TIMESTEP_SCALE, device=device)
        video_t = t[:, None] * free[..., 0]
        audio_t = torch.zeros_like(t) if freeze_audio else t
        v_video, v_audio = dit(
            x.to(dtype),
            pack_latents(audio).to(dtype),
            text.video.to(dtype),
            text.audio.to(dtype),
            video_t,
            audio_timestep=audio_t,
            sigma=t,
            audio_sigma=audio_t,
            video_context_mask=text.mask,
            audio_context_mask=text.mask,
            video_coords=seq.coords,
            audio_coords=audio_coords,
            keyframes_mask=seq.marked,
        )
        estimate = x - v_video.float() * (video_t / TIMESTEP_SCALE)[..., None]
        estimate = estimate * free + seq.clean * seq.strength
        if ancestral is None:
            x = x + (following - sigma) * (x - estimate) / sigma
        else:
            x = ancestral_step(x, estimate, sigma, following, *ancestral)
            x = x * free + seq.clean * seq.strength
        if not freeze_audio:
            audio = audio + (following - sigma) * unpack_latents(v_audio.float(), audio.shape[3])
    return DFRTokens(x, seq.clean, seq.strength, seq.marked, seq.coords, seq.grid, seq.slots), audio


@dataclass
class DFRImages:
    """The images a DFR call is conditioned on: first frames (one per prompt, or one for all) at `strength`, and
    keyframes `(image, video frame)`; both re-compressed with H.264 at `crf` (0 = as given) before encoding."""

    first: list[Image.Image] | None
    keyframes: Sequence[tuple[Image.Image, int]]
    strength: float
    crf: int

    def encode(self, pipe, height: int, width: int):
        """`(first, keyframes)` as `build_tokens` takes them, encoded at `height` x `width`."""

        if self.first is None and not self.keyframes:
            return None, []
        pipe.load_models_to_device(["vae"])

        def latent(images):
            fitted = [fit_image(image, height, width) for image in images]
            fitted = [h264_frame(image, self.crf) for image in fitted] if self.crf else fitted
            pixels = pil_to_tensor(fitted, dtype=module_dtype(pipe.vae), device=pipe.device)
            return pipe.vae.encode(pixels[:, :, None]).float()  # [n, C, 1, h, w]

        first = None if self.first is None else (latent(self.first), self.strength)
        keyframes = [(frame, latent([image]), 1.0) for image, frame in self.keyframes]
        return first, keyframes


def draw_noise(shape, generator, rand_device, device) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn from `generator` on `rand_device` (None: unseeded)."""
    return torch.randn(shape, generator=generator, device=torch.device(rand_device)).to(device)


def run_pass(
    pipe,
    text,
    *,
    height: int,
    width: int,
    canvas_frames: int,
    frame_rate: float,
    sigmas,
    generator,
    rand_device: str,
    images: DFRImages,
    slot_frames: Sequence[int],
    canvas: torch.Tensor | None = None,
    slot_seeds: torch.Tensor | None = None,
    reference: tuple[torch.Tensor, int] | None = None,
    keyframe_latents: Sequence[tuple[int, torch.Tensor, float]] = (),
    audio: torch.Tensor | None = None,
    freeze_audio: bool = False,
    progress_bar: bool = True,
) -> tuple[DFRTokens, torch.Tensor]:
    """One DFR pass at `height` x `width` over the canvas (diffusers' `LTX2DFRPipeline` call): the sequence is
    built (`build_tokens`), noised to `sigmas[0]` with noise drawn over every token, then the audio (fresh noise,
    or `audio` re-noised to `sigmas[0]`, or kept when frozen; its noise is drawn either way), and denoised.
    The sound covers the canvas at the playback `frame_rate`; the DiT is told `conditioning_fps(frame_rate)`."""
    batch = text.video.shape[0]
    fps = conditioning_fps(frame_rate)
    tc, sc = pipe.vae.temporal_compression, pipe.vae.spatial_compression
    grid = ((canvas_frames - 1) // tc + 1, height // sc, width // sc)
    first, keyframes = images.encode(pipe, height, width)
    keyframes = [*keyframes, *keyframe_latents]  # encoded keyframes (video frame, latent, strength) after the images'
    seq = build_tokens(
        pipe.dit.config, batch, grid, fps, pipe.device, canvas=canvas, first=first, keyframes=keyframes,
        slot_frames=slot_frames, slot_seeds=slot_seeds, reference=reference,
    )  # fmt: skip
    level = float(sigmas[0])
    seq = seq.noised(draw_noise(seq.tokens.shape, generator, rand_device, pipe.device), level)
    shape = pipe.audio_latent_shape(batch, canvas_frames, frame_rate) if audio is None else audio.shape
    b, c, length, bins = shape
    noise = unpack_latents(draw_noise((b, length, c * bins), generator, rand_device, pipe.device), bins)
    if audio is None:
        audio = noise
    else:
        audio_level = 0.0 if freeze_audio else level
        audio = noise * audio_level + audio.float() * (1.0 - audio_level)
    pipe.load_models_to_device(["dit"])
    return denoise_pass(pipe.dit, seq, audio, sigmas, text, fps, freeze_audio, lambda r: pipe.progress(r, progress_bar))


def audio_window(tokens, first_frame: int, frames: int, playback_fps: float, source_seconds: float, length: int):
    """The part of the first pass's sound `tokens` `[B, L, D]` (covering `source_seconds`) that plays with video
    frames `first_frame` .. `first_frame + frames` at `playback_fps`, resampled linearly to `length` latent frames."""
    total = tokens.shape[1]
    start = first_frame / playback_fps / source_seconds * total
    span = frames / playback_fps / source_seconds * total
    where = (start + span / length * torch.arange(length, dtype=torch.float32, device=tokens.device)).clamp(
        0, total - 1
    )
    low = where.floor().long()
    high = (low + 1).clamp(max=total - 1)
    weight = (where - low).to(tokens.dtype).view(1, -1, 1)
    return tokens[:, low] * (1 - weight) + tokens[:, high] * weight


@dataclass
class RefineState:
    """What a temporal round takes and gives: the canvas's normalised latents, its `frames` and playback `fps`,
    and the keyframes carried between rounds (`positions` on the canvas, `latents` `[B, C, K, h, w]`)."""

    video: torch.Tensor
    frames: int
    fps: float
    positions: list[int]
    latents: torch.Tensor


def refine_round(
    pipe, text, state: RefineState, *, round_index: int, sound, encoded, seed: int, generator, rand_device: str,
    sigmas=TEMPORAL_SIGMAS, progress_bar: bool = True,
) -> RefineState:  # fmt: skip
    """One temporal refine round (the authors' `DFRPipeline` rounds; diffusers' `LTX2DFRTemporalRefinePipeline`):
    the temporal x2 upsampler doubles the canvas (`2 (F - 1) + 1` frames at twice the rate), which is cut into
    `2 ** round_index` windows at the carried keyframes (`temporal_tiles`). Each window is re-denoised from
    `sigmas[0]` with Euler-ancestral steps (eta 0.5, noise seeded `seed + 1000 * round + window`), its seams pinned
    at strength 0.95, its images (`encoded`, at their frames times `2 ** round_index`) given, new slots generated
    midway between its seams, and the first pass's sound (`sound` = (tokens, seconds)) read frozen for its time
    span. The windows are stitched without their context frames; their slots join the carried keyframes."""
    tc = pipe.vae.temporal_compression
    video = pipe.upsample_latents(state.video, pipe.temporal_upsampler)
    frames, fps = 2 * (state.frames - 1) + 1, 2 * state.fps
    cfps = conditioning_fps(fps)
    seams = [2 * p for p in state.positions]
    carried = {p: state.latents[:, :, i : i + 1] for i, p in enumerate(seams)}
    scale = 2**round_index
    first, keyframes = encoded
    images = ([(0, *first)] if first is not None else []) + [(frame, latent, s) for frame, latent, s in keyframes]
    tokens, seconds = sound
    per_second = pipe.audio_vae.config.latents_per_second
    batch, bins = text.video.shape[0], pipe.audio_vae.config.latent_mel_bins
    parts, made = [], {}
    tiles = temporal_tiles(seams, frames, scale, tc)
    for index, tile in enumerate(tiles):
        window = video[:, :, tile.start : tile.end]
        window_frames = (tile.end - tile.start - 1) * tc + 1
        local = [(f * scale - tile.first_frame, latent, s) for f, latent, s in images]
        local = [item for item in local if 0 <= item[0] <= tile.last_frame - tile.first_frame]
        given_first = next(((latent, s) for f, latent, s in local if f == 0), None)
        pinned = [item for item in local if item[0] != 0]
        pinned += [(p - tile.first_frame, carried[p], ANCHOR_STRENGTH) for p in tile.anchors]
        slots = [p - tile.first_frame for p in tile.slots]
        seeds = [min(round(p / tc), window.shape[2] - 1) for p in slots]
        seq = build_tokens(
            pipe.dit.config, batch, window.shape[2:], cfps, pipe.device, canvas=window, first=given_first,
            keyframes=pinned, slot_frames=slots,
            slot_seeds=torch.cat([window[:, :, i : i + 1] for i in seeds], dim=2) if seeds else None,
        )  # fmt: skip
        seq = seq.noised(draw_noise(seq.tokens.shape, generator, rand_device, pipe.device), float(sigmas[0]))
        length = round(window_frames / cfps * per_second)
        audio = unpack_latents(audio_window(tokens, tile.first_frame, window_frames, fps, seconds, length), bins)
        draws, _ = seeded_generator(seed + 1000 * round_index + index, rand_device)
        noise = lambda shape=seq.tokens.shape, g=draws: draw_noise(shape, g, rand_device, pipe.device)  # noqa: E731
        pipe.load_models_to_device(["dit"])
        seq, _ = denoise_pass(
            pipe.dit, seq, audio, sigmas, text, cfps, True, lambda r: pipe.progress(r, progress_bar),
            (TEMPORAL_ETA, noise),
        )  # fmt: skip
        parts.append(seq.video()[:, :, tile.lead :])
        if tile.slots:
            latents = seq.slot_latents()
            for i, p in enumerate(tile.slots):
                made.setdefault(p, latents[:, :, i : i + 1])  # a slot in a later window's context: the first wins
    carried.update(made)
    positions = sorted(carried)
    latents = torch.cat([carried[p] for p in positions], dim=2)
    return RefineState(torch.cat(parts, dim=2), frames, fps, positions, latents)


def check_sigmas(sigmas, name: str) -> tuple[float, ...]:
    """A pass's schedule: decreasing numbers in (0, 1], without the terminal 0 (dropped when given)."""
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if values and values[-1] == 0.0:
        values = values[:-1]
    if (
        not values
        or any(not 0.0 < s <= 1.0 for s in values)
        or any(a <= b for a, b in zip(values[:-1], values[1:], strict=True))
    ):
        raise ConfigError(f"{name}={values!r} is not accepted: give decreasing sigmas in (0, 1]")
    return tuple(values)


def generate(
    pipe,
    text,
    *,
    height: int,
    width: int,
    num_frames: int,
    frame_rate: float,
    generator,
    rand_device: str,
    images: DFRImages,
    stage_1_sigmas=DISTILLED_SIGMAS,
    stage_2_sigmas=STAGE_2_SIGMAS,
    loras=(),
    detailing=None,
    temporal_rounds: int = 0,
    seed: int = 0,
    progress_bar: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' DFR recipe: the half-size pass with slots, the x2 upsampler on the video and the slots, and
    the full-size pass seeded from both (with the detailing reference when `detailing` = (LoRA weights, scale,
    factor) is given with a scale other than 0; scale 0 is no detailing at all), then `temporal_rounds` refine rounds
    (`refine_round`, each doubling the frame rate; `seed` seeds their ancestral noise). `loras` are (weights, scale,
    name) attached for every pass (the distilled LoRA on the full model). Returns the normalised video latents cut to
    `(num_frames - 1) * 2 ** temporal_rounds + 1` frames and the first pass's audio latents."""
    canvas_frames, _, slot_frames = resolve_canvas(num_frames, pipe.vae.temporal_compression)
    common = dict(
        canvas_frames=canvas_frames, frame_rate=frame_rate, generator=generator, rand_device=rand_device, images=images
    )
    with pipe.stage_loras(loras):
        seq, audio = run_pass(
            pipe, text, height=height // 2, width=width // 2, sigmas=stage_1_sigmas, slot_frames=slot_frames,
            progress_bar=progress_bar, **common,
        )  # fmt: skip
    half = seq.video()
    video, slots = pipe.upsample_latents(half), pipe.upsample_latents(seq.slot_latents())
    stage_2 = list(loras)
    reference = None
    if detailing is not None and detailing[1] != 0.0:  # at strength 0 the pass runs as without it: no reference
        weights, scale, factor = detailing
        stage_2.append((weights, scale, DETAILING_LORA_NAME))
        reference = (half, factor)
    with pipe.stage_loras(stage_2):
        seq, _ = run_pass(
            pipe, text, height=height, width=width, sigmas=stage_2_sigmas, slot_frames=slot_frames, canvas=video,
            slot_seeds=slots, reference=reference, audio=audio, progress_bar=progress_bar, **common,
        )  # fmt: skip
    video = seq.video()
    if temporal_rounds:
        state = RefineState(video, canvas_frames, float(frame_rate), list(slot_frames), seq.slot_latents())
        sound = (pack_latents(audio), canvas_frames / frame_rate)
        encoded = images.encode(pipe, height, width)
        with pipe.stage_loras(loras):
            for index in range(1, temporal_rounds + 1):
                state = refine_round(
                    pipe, text, state, round_index=index, sound=sound, encoded=encoded, seed=seed,
                    generator=generator, rand_device=rand_device, progress_bar=progress_bar,
                )  # fmt: skip
        video = state.video
    return trim_canvas(video, (num_frames - 1) * 2**temporal_rounds + 1, pipe.vae.temporal_compression), audio
