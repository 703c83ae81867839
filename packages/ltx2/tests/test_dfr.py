"""LTX-2.5's DFR pipeline (`use_dfr_pipeline`, `dfr.py`): the slot layout, one pass against diffusers'
`LTX2DFRPipeline` (text-to-video with slots; a second pass seeded from given latents with a first frame, a pinned
keyframe, a reference and frozen sound), the authors' whole recipe against diffusers' stages composed the same way,
and the invariants and refusals without diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffsynth_ltx2_test_repo import CAPTIONS, UPSAMPLER_23, fuse_lora, lora_state, tiny_upsampler, write_tiny_25_folder
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2 import dfr
from diffsynth.ltx2.dfr_layout import resolve_canvas, segment_length, temporal_tiles, trim_canvas
from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.lora import list_loras

H = W = 64  # one pass: 2 x 2 latents
MAX_LEN = 32
SLOT_FRAMES = 9  # a 9-frame clip: the canvas is 25 frames (one 24-frame segment), one slot at frame 24


def picture(seed: int, size=(W, H)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.BILINEAR)


# ------------------------------------------------------------------------------------------------- slot layout
@pytest.mark.parametrize("frames", [9, 17, 25, 33, 41, 49, 57, 73, 97, 121, 161, 241])
def test_canvas_pads_least_to_whole_segments(frames):
    """The canvas is the smallest padding of `frames - 1` to whole 24- or 32-frame segments (the longer on a tie),
    with one slot at the end of each segment and none at frame 0."""
    canvas, segment, slots = resolve_canvas(frames)
    pads = {s: (s - (frames - 1) % s) % s for s in (24, 32)}
    assert segment in pads and pads[segment] == min(pads.values())
    if pads[24] == pads[32]:
        assert segment == 32
    assert canvas == frames + pads[segment] and (canvas - 1) % segment == 0
    assert slots == [segment * (i + 1) for i in range((canvas - 1) // segment)] and slots[-1] == canvas - 1
    assert segment_length(frames - 1) == segment


def test_canvas_refuses_frames_off_the_latent_grid():
    for frames in (1, 8, 10, 20):
        with pytest.raises(ConfigError, match="num_frames"):
            resolve_canvas(frames)
    latents = torch.randn(1, 4, 13, 2, 2)
    assert torch.equal(trim_canvas(latents, 81), latents[:, :, :11])


@pytest.mark.parity
def test_canvas_equals_diffusers():
    layout = pytest.importorskip("diffusers.pipelines.ltx2.dfr_layout")
    for frames in range(9, 400, 8):
        assert resolve_canvas(frames) == layout.resolve_canvas(frames)


@pytest.mark.parametrize(
    ("seams", "frames", "tiles"),
    [([48, 96], 97, 2), ([48, 96, 144], 145, 2), ([64, 128, 192, 256], 257, 4), ([48], 49, 2)],
)
def test_temporal_tiles_cover_the_canvas_once(seams, frames, tiles):
    """Stitched without their context frames, the windows cover every latent frame once; each starts on frame 0 or a
    seam it keeps (in its context), ends on a seam, and makes one slot midway between each pair of its marks."""
    plan = temporal_tiles(seams, frames, tiles)
    assert len(plan) == min(tiles, len(seams))
    kept = [i for tile in plan for i in range(tile.start + tile.lead, tile.end)]
    assert kept == list(range((frames - 1) // 8 + 1))
    for tile in plan:
        assert tile.first_frame == 8 * tile.start and tile.last_frame == 8 * (tile.end - 1) and tile.last_frame in seams
        assert tile.first_frame == 0 or tile.first_frame in seams
        marks = [tile.first_frame, *(p for p in seams if tile.first_frame < p <= tile.last_frame)]
        assert list(tile.slots) == [(a + b) // 2 for a, b in zip(marks[:-1], marks[1:], strict=True)]
    with pytest.raises(ConfigError, match="last keyframe seam"):
        temporal_tiles(seams[:-1] or [8], frames, tiles)


@pytest.mark.parity
def test_temporal_tiles_equal_diffusers():
    layout = pytest.importorskip("diffusers.pipelines.ltx2.dfr_layout")
    for frames in range(9, 200, 8):
        canvas, _, positions = resolve_canvas(frames)
        seams, doubled = [2 * p for p in positions], 2 * (canvas - 1) + 1
        for tiles in (1, 2, 4):
            ours = temporal_tiles(seams, doubled, tiles)
            theirs = layout.temporal_tile_plan(seams, doubled, tiles)
            assert [(t.start, t.end, t.lead, t.first_frame, t.last_frame, t.anchors, t.slots) for t in ours] == [
                (t.interval.start, t.interval.end, t.interval.left_ramp, t.pixel_start, t.pixel_end, t.anchors, t.slots)
                for t in theirs
            ]


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dfr_folder(tmp_path_factory):
    """The tiny LTX-2.5 diffusers folder, an x2 upsampler for its latents, a distilled-LoRA stand-in and a detailing
    IC-LoRA stand-in (declaring its reference factor as the authors' file does)."""
    root = tmp_path_factory.mktemp("tiny-dfr")
    folder = write_tiny_25_folder(root / "Lightricks/LTX-2.5-Diffusers")
    extras = root / "extras"
    extras.mkdir()
    save_file(tiny_upsampler(**UPSAMPLER_23).state_dict(), str(extras / "upsampler.safetensors"))
    save_file(
        tiny_upsampler(9, **UPSAMPLER_23, temporal=True).state_dict(), str(extras / "temporal-upsampler.safetensors")
    )
    pipe = LTX2Pipeline.from_pretrained(str(folder), device="cpu", torch_dtype=torch.float32)
    save_file(lora_state(pipe.dit, seed=11), str(extras / "distilled-lora.safetensors"))
    detailing = lora_state(pipe.dit, seed=12)
    save_file(detailing, str(extras / "detailing.safetensors"), metadata={"reference_downscale_factor": "2"})
    return folder


@pytest.fixture(scope="module")
def dfr_pipe(dfr_folder):
    pipe = LTX2Pipeline.from_pretrained(
        str(dfr_folder), device="cpu", torch_dtype=torch.float32,
        model_configs=[
            ModelConfig(path=str(dfr_folder.parent.parent / "extras/upsampler.safetensors")),
            ModelConfig(path=str(dfr_folder.parent.parent / "extras/temporal-upsampler.safetensors")),
        ],
        stage2_lora_config=str(dfr_folder.parent.parent / "extras/distilled-lora.safetensors"),
    )  # fmt: skip
    embedding = pipe.dit.keyframes_abs_pos_embedding
    with torch.no_grad():
        embedding.copy_(0.5 * torch.randn(embedding.shape, generator=torch.Generator().manual_seed(5)))
    return pipe


def diffusers_upsampler(model, temporal: bool):
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    reference = LTX2LatentUpsamplerModel(
        in_channels=UPSAMPLER_23["in_channels"], mid_channels=32, num_blocks_per_stage=1, use_rational_resampler=False,
        spatial_upsample=not temporal, temporal_upsample=temporal,
    ).eval()  # fmt: skip
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def reference_pipeline(folder, pipe):
    """diffusers' `LTX2DFRPipeline` from the same folder, with our keyframe embedding and a scheduler that takes
    the sigmas as given."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE
    from transformers import AutoTokenizer, Gemma4UnifiedForConditionalGeneration

    transformer = diffusers.LTX2VideoTransformer3DModel.from_pretrained(folder / "transformer").eval()
    with torch.no_grad():
        transformer.keyframes_abs_pos_embedding.copy_(pipe.dit.keyframes_abs_pos_embedding)
    reference = diffusers.LTX2DFRPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=diffusers.AutoencoderKLLTX2Video.from_pretrained(folder / "vae").eval(),
        audio_vae=diffusers.AutoencoderKLLTX2Audio.from_pretrained(folder / "audio_vae").eval(),
        text_encoder=Gemma4UnifiedForConditionalGeneration.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        connectors=LTX2TextConnectors.from_pretrained(folder / "connectors").eval(),
        transformer=transformer,
        vocoder=LTX2VocoderWithBWE.from_pretrained(folder / "vocoder").eval(),
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def raw_video(reference, normalised):
    """Our normalised video latents in diffusers' public (raw) form."""
    vae = reference.vae
    return reference._denormalize_latents(normalised, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)


def normalised_video(reference, raw):
    vae = reference.vae
    return reference._normalize_latents(raw.float(), vae.latents_mean, vae.latents_std, vae.config.scaling_factor)


def packed_audio(reference, raw):
    """diffusers' public audio latents `[B, C, L, M]` -> normalised tokens `[B, L, C * M]`, as ours pack them."""
    vae = reference.audio_vae
    return reference._normalize_audio_latents(reference._pack_audio_latents(raw), vae.latents_mean, vae.latents_std)


def compare(label: str, got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert got.shape == want.shape, f"{label}: {tuple(got.shape)} vs {tuple(want.shape)}"
    assert want.abs().max() > 0.1, f"{label}: the reference is near zero"
    diff = (got.float() - want.float()).abs().max().item()
    print(f"DFR parity, {label}: max abs {diff:.3g} (values up to {want.abs().max().item():.3g})")
    bound = tolerance * max(1.0, want.abs().max().item())  # float32 rounding grows with the values' size
    assert diff <= bound, f"{label}: max abs difference {diff:.3g}"


# ------------------------------------------------------------------------------------------------- one pass
@pytest.mark.parity
def test_text_to_video_pass_with_slots_matches_diffusers(dfr_folder, dfr_pipe):
    """One pass from noise with the slot of a 9-frame clip (canvas 25 frames): the canvas, the slot and the sound
    against `LTX2DFRPipeline` with `output_type="latent"`, same seed and sigmas."""
    reference = reference_pipeline(dfr_folder, dfr_pipe)
    sigmas = list(dfr.DISTILLED_SIGMAS[::3])
    video, audio, slots, positions = reference(
        prompt=CAPTIONS[0], height=H, width=W, num_frames=SLOT_FRAMES, frame_rate=24.0, sigmas=sigmas,
        generator=torch.Generator().manual_seed(3), max_sequence_length=MAX_LEN, output_type="latent",
        return_dict=False,
    )  # fmt: skip
    canvas, _, slot_frames = resolve_canvas(SLOT_FRAMES)
    assert positions == slot_frames == [24]
    text = dfr_pipe.encode_prompt([CAPTIONS[0]], MAX_LEN)
    seq, got_audio = dfr.run_pass(
        dfr_pipe, text, height=H, width=W, canvas_frames=canvas, frame_rate=24.0, sigmas=sigmas,
        generator=torch.Generator().manual_seed(3), rand_device="cpu", images=dfr.DFRImages(None, [], 1.0, 0),
        slot_frames=slot_frames, progress_bar=False,
    )  # fmt: skip
    compare("canvas", seq.video(), normalised_video(reference, video))
    compare("slot", seq.slot_latents(), normalised_video(reference, slots))
    from diffsynth.ltx2.audio_vae import pack_latents

    compare("audio", pack_latents(got_audio), packed_audio(reference, audio))


@pytest.mark.parity
def test_seeded_pass_with_conditions_matches_diffusers(dfr_folder, dfr_pipe):
    """A second-pass call: the canvas, slot and sound seeded from given latents, a first frame (strength 0.8), a
    keyframe latent pinned at frame 8 (strength 0.95, as the authors' temporal anchors), the half-size reference
    (factor 2) and the sound frozen, from sigma 0.909375."""
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    from diffsynth.ltx2.audio_vae import pack_latents, unpack_latents

    reference = reference_pipeline(dfr_folder, dfr_pipe)
    g = torch.Generator().manual_seed(21)
    canvas, _, slot_frames = resolve_canvas(SLOT_FRAMES)
    channels, (h, w) = dfr_pipe.dit.config.in_channels, (H // 32, W // 32)
    latents, slot_seeds = torch.randn(1, channels, 4, h, w, generator=g), torch.randn(1, channels, 1, h, w, generator=g)
    half, pinned = torch.randn(1, channels, 4, 1, 1, generator=g), torch.randn(1, channels, 1, h, w, generator=g)
    batch, length, bins = 1, dfr_pipe.audio_latent_shape(1, canvas, 24.0)[2], dfr_pipe.audio_vae.config.latent_mel_bins
    tokens = torch.randn(batch, length, dfr_pipe.dit.config.audio_in_channels, generator=g)
    vae = reference.audio_vae
    raw_audio = reference._unpack_audio_latents(
        reference._denormalize_audio_latents(tokens, vae.latents_mean, vae.latents_std), length, num_mel_bins=bins
    )
    first = picture(1)
    sigmas = list(dfr.STAGE_2_SIGMAS)
    video, audio, slots, _ = reference(
        prompt=CAPTIONS[1], conditions=[LTX2VideoCondition(frames=first, index=0, strength=0.8, crf=0)],
        height=H, width=W, num_frames=SLOT_FRAMES, frame_rate=24.0, sigmas=sigmas,
        latents=raw_video(reference, latents), keyframes_latents=raw_video(reference, slot_seeds),
        reference_latents=raw_video(reference, half), reference_downscale_factor=2,
        guidance_keyframe_latents=raw_video(reference, pinned), guidance_keyframe_positions=[8],
        guidance_keyframe_strength=0.95, audio_latents=raw_audio, freeze_audio=True,
        generator=torch.Generator().manual_seed(4), max_sequence_length=MAX_LEN, output_type="latent",
        return_dict=False,
    )  # fmt: skip
    text = dfr_pipe.encode_prompt([CAPTIONS[1]], MAX_LEN)
    seq, got_audio = dfr.run_pass(
        dfr_pipe, text, height=H, width=W, canvas_frames=canvas, frame_rate=24.0, sigmas=sigmas,
        generator=torch.Generator().manual_seed(4), rand_device="cpu", images=dfr.DFRImages([first], [], 0.8, 0),
        slot_frames=slot_frames, canvas=latents, slot_seeds=slot_seeds, reference=(half, 2),
        keyframe_latents=[(8, pinned, 0.95)], audio=unpack_latents(tokens, bins), freeze_audio=True,
        progress_bar=False,
    )  # fmt: skip
    compare("seeded canvas", seq.video(), normalised_video(reference, video))
    compare("seeded slot", seq.slot_latents(), normalised_video(reference, slots))
    compare("frozen audio", pack_latents(got_audio), packed_audio(reference, audio))
    torch.testing.assert_close(pack_latents(got_audio), tokens, atol=0, rtol=0)  # frozen: the given sound


# ------------------------------------------------------------------------------------------------- temporal rounds
def temporal_reference(reference, pipe):
    """diffusers' `LTX2DFRTemporalRefinePipeline` on the reference's models, with our temporal upsampler's weights."""
    import diffusers

    return diffusers.LTX2DFRTemporalRefinePipeline(
        scheduler=diffusers.LTXEulerAncestralRFScheduler(eta=0.5), vae=reference.vae, audio_vae=reference.audio_vae,
        text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, connectors=reference.connectors,
        transformer=reference.transformer, vocoder=reference.vocoder,
        temporal_latent_upsampler=diffusers_upsampler(pipe.temporal_upsampler, temporal=True),
    )  # fmt: skip


@pytest.mark.parity
@pytest.mark.parametrize("round_index", [1, 2])
def test_temporal_round_matches_diffusers(dfr_folder, dfr_pipe, round_index):
    """One refine round on given latents (a 41-frame clip: canvas 49, seams at 24 and 48; round 2 starts from the
    carried keyframes round 1 leaves on its 97 frames) with a first frame and a keyframe image: the stitched canvas
    and the carried keyframes against `LTX2DFRTemporalRefinePipeline`, same seed (ancestral noise included)."""
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    reference = reference_pipeline(dfr_folder, dfr_pipe)
    temporal = temporal_reference(reference, dfr_pipe)
    temporal.set_progress_bar_config(disable=True)
    source, _, positions = resolve_canvas(41)
    canvas, fps = source, 24.0
    for _ in range(round_index - 1):
        canvas, fps = 2 * (canvas - 1) + 1, 2 * fps
        positions = sorted({2 * p for p in positions} | {p + 24 * 2 ** (round_index - 2) for p in [0, *positions[:-1]]})
    g = torch.Generator().manual_seed(30 + round_index)
    channels, (h, w) = dfr_pipe.dit.config.in_channels, (H // 32, W // 32)
    video = torch.randn(1, channels, (canvas - 1) // 8 + 1, h, w, generator=g)
    carry = torch.randn(1, channels, len(positions), h, w, generator=g)
    length = dfr_pipe.audio_latent_shape(1, source, 24.0)[2]
    tokens = torch.randn(1, length, dfr_pipe.dit.config.audio_in_channels, generator=g)
    vae = reference.audio_vae
    raw_audio = reference._unpack_audio_latents(
        reference._denormalize_audio_latents(tokens, vae.latents_mean, vae.latents_std), length,
        num_mel_bins=dfr_pipe.audio_vae.config.latent_mel_bins,
    )  # fmt: skip
    first, key = picture(1), picture(2)
    got = dfr.refine_round(
        dfr_pipe, dfr_pipe.encode_prompt([CAPTIONS[0]], MAX_LEN),
        dfr.RefineState(video, canvas, fps, list(positions), carry), round_index=round_index,
        sound=(tokens, source / 24.0), encoded=dfr.DFRImages([first], [(key, 9)], 1.0, 0).encode(dfr_pipe, H, W),
        seed=3, generator=torch.Generator().manual_seed(3), rand_device="cpu", progress_bar=False,
    )  # fmt: skip
    want_video, _, want_keys, want_positions = temporal(
        prompt=CAPTIONS[0], latents=raw_video(reference, video), keyframes_latents=raw_video(reference, carry),
        keyframe_positions=list(positions), audio_latents=raw_audio, height=H, width=W, num_frames=canvas,
        frame_rate=fps, source_seconds=source / 24.0, condition_num_frames=41, round_index=round_index,
        conditions=[LTX2VideoCondition(frames=first, index=0, crf=0), LTX2VideoCondition(frames=key, index=2, crf=0)],
        generator=torch.Generator().manual_seed(3), max_sequence_length=MAX_LEN, output_type="latent",
        return_dict=False,
    )  # fmt: skip
    assert got.frames == 2 * (canvas - 1) + 1 and got.positions == want_positions
    assert len(got.positions) == 2 * len(positions)  # a new slot between each pair of seams
    compare(f"round {round_index} canvas", got.video, normalised_video(reference, want_video))
    compare(f"round {round_index} keyframes", got.latents, normalised_video(reference, want_keys))


# ------------------------------------------------------------------------------------------------- the recipe
def diffusers_recipe(folder, pipe, frames: int, detailing: bool, rounds: int = 0):
    """The authors' DFRPipeline composed from diffusers' stages: `LTX2DFRPipeline` at half size to latents,
    `LTX2LatentUpsamplePipeline` on the video and on the slots, `LTX2DFRPipeline` at full size seeded from them
    (with the detailing LoRA fused and the half-size video as reference when `detailing`), then `rounds` of
    `LTX2DFRTemporalRefinePipeline`, one generator throughout; the first stage's sound, cut to the clip."""
    import diffusers
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    reference = reference_pipeline(folder, pipe)
    generator = torch.Generator().manual_seed(3)
    common = dict(
        prompt=CAPTIONS[0], num_frames=frames, frame_rate=24.0, generator=generator, max_sequence_length=MAX_LEN,
        return_dict=False,
    )  # fmt: skip
    video, audio, slots, positions = reference(
        height=H, width=W, sigmas=list(dfr.DISTILLED_SIGMAS), output_type="latent", **common
    )
    upsampler = LTX2LatentUpsamplerModel(
        in_channels=UPSAMPLER_23["in_channels"], mid_channels=32, num_blocks_per_stage=1, use_rational_resampler=False
    ).eval()
    upsampler.load_state_dict(pipe.upsampler.state_dict(), strict=True)
    upsample = diffusers.LTX2LatentUpsamplePipeline(vae=reference.vae, latent_upsampler=upsampler)
    up_video = upsample(latents=video, output_type="latent", return_dict=False)[0]
    up_slots = upsample(latents=slots, output_type="latent", return_dict=False)[0]
    extra = {}
    if detailing:
        weights = diffusers.LTX2Pipeline.lora_state_dict(str(folder.parent.parent / "extras/detailing.safetensors"))
        fuse_lora(reference.transformer, weights, 1.0)
        extra = dict(reference_latents=video, reference_downscale_factor=2)
    stage_2 = dict(
        height=2 * H, width=2 * W, sigmas=list(dfr.STAGE_2_SIGMAS), latents=up_video, keyframes_latents=up_slots,
        keyframe_positions=positions, audio_latents=audio, **common, **extra,
    )  # fmt: skip
    sound = reference.vocoder(reference.audio_vae.decode(audio, return_dict=False)[0])
    rate = reference.vocoder.config.output_sampling_rate
    if not rounds:
        return reference(output_type="np", **stage_2)[0], sound[..., : round(frames / 24.0 * rate)]
    video, _, keys, positions = reference(output_type="latent", **stage_2)
    temporal = temporal_reference(reference, pipe)
    canvas, fps = resolve_canvas(frames)[0], 24.0
    for index in range(1, rounds + 1):
        video, _, keys, positions = temporal(
            prompt=CAPTIONS[0], latents=video, keyframes_latents=keys, keyframe_positions=positions,
            audio_latents=audio, height=2 * H, width=2 * W, num_frames=canvas, frame_rate=fps,
            source_seconds=resolve_canvas(frames)[0] / 24.0, condition_num_frames=frames, round_index=index,
            generator=generator, max_sequence_length=MAX_LEN, output_type="latent", return_dict=False,
        )  # fmt: skip
        canvas, fps = 2 * (canvas - 1) + 1, 2 * fps
    target = (frames - 1) * 2**rounds + 1
    with torch.no_grad():
        pixels = reference.vae.decode(trim_canvas(video, target), None, return_dict=False)[0]
    frames_out = reference.video_processor.postprocess_video(pixels, output_type="np")
    return frames_out, sound[..., : round(target / fps * rate)]


@pytest.mark.parity
@pytest.mark.parametrize("detailing", [False, True], ids=["plain", "detailing"])
def test_recipe_matches_diffusers_stages(dfr_folder, dfr_pipe, detailing):
    """`use_dfr_pipeline=True` with the distilled DiT (no LoRA): frames and sound against the diffusers stages
    composed as the authors' pipeline runs them; with `detailing_lora` the second pass reads the first's video."""
    frames = 17
    extra = {"detailing_lora": str(dfr_folder.parent.parent / "extras/detailing.safetensors")} if detailing else {}
    got_frames, got_audio = dfr_pipe(
        CAPTIONS[0], use_dfr_pipeline=True, use_distilled_pipeline=True, height=2 * H, width=2 * W, num_frames=frames,
        seed=3, max_sequence_length=MAX_LEN, output_type="np", progress_bar=False, **extra,
    )  # fmt: skip
    want_frames, want_audio = diffusers_recipe(dfr_folder, dfr_pipe, frames, detailing)
    assert got_frames.shape == want_frames.shape == (1, frames, 2 * H, 2 * W, 3) and want_frames.std() > 0.05
    diff = np.abs(got_frames - want_frames).max()
    audio_diff = (got_audio.waveform - want_audio).abs().max().item()
    print(f"DFR recipe parity ({'detailing' if detailing else 'plain'}): frames {diff:.3g}, audio {audio_diff:.3g}")
    assert got_audio.waveform.shape == want_audio.shape and diff <= 1e-5 and audio_diff <= 1e-5
    assert not list_loras(dfr_pipe.dit)  # the detailing LoRA was attached for the second pass only
    if detailing:  # the reference and the LoRA change the second pass
        plain, _ = dfr_pipe(
            CAPTIONS[0], use_dfr_pipeline=True, use_distilled_pipeline=True, height=2 * H, width=2 * W,
            num_frames=frames, seed=3, max_sequence_length=MAX_LEN, output_type="np", progress_bar=False,
        )  # fmt: skip
        assert np.abs(plain - got_frames).max() > 1e-3


@pytest.mark.parity
def test_recipe_with_a_temporal_round_matches_diffusers_stages(dfr_folder, dfr_pipe):
    """`temporal_upsample_rounds=1`: twice the frames (`(F - 1) * 2 + 1`, for twice the frame rate) and the first
    pass's sound cut to their duration, against the diffusers stages and refine round composed the same way."""
    frames = 17
    got_frames, got_audio = dfr_pipe(
        CAPTIONS[0], use_dfr_pipeline=True, use_distilled_pipeline=True, temporal_upsample_rounds=1, height=2 * H,
        width=2 * W, num_frames=frames, seed=3, max_sequence_length=MAX_LEN, output_type="np", progress_bar=False,
    )  # fmt: skip
    want_frames, want_audio = diffusers_recipe(dfr_folder, dfr_pipe, frames, detailing=False, rounds=1)
    assert got_frames.shape == want_frames.shape == (1, 2 * frames - 1, 2 * H, 2 * W, 3)
    diff = np.abs(got_frames - want_frames).max()
    audio_diff = (got_audio.waveform - want_audio).abs().max().item()
    print(f"DFR recipe parity (one temporal round): frames {diff:.3g}, audio {audio_diff:.3g}")
    assert got_audio.waveform.shape == want_audio.shape and diff <= 1e-5 and audio_diff <= 1e-5


# ------------------------------------------------------------------------------------------------- invariants
def test_given_tokens_stay_and_slots_are_made(dfr_pipe):
    """In a pass, a first frame at strength 1 and the reference come out exactly as given; the slot and the rest of
    the canvas are generated (they change)."""
    g = torch.Generator().manual_seed(8)
    channels = dfr_pipe.dit.config.in_channels
    canvas, _, slot_frames = resolve_canvas(17)
    half = torch.randn(1, channels, 5, 1, 1, generator=g)
    text = dfr_pipe.encode_prompt([CAPTIONS[2]], MAX_LEN)
    images = dfr.DFRImages([picture(3)], [], 1.0, 0)
    seq, _ = dfr.run_pass(
        dfr_pipe, text, height=H, width=W, canvas_frames=canvas, frame_rate=24.0, sigmas=dfr.STAGE_2_SIGMAS,
        generator=g, rand_device="cpu", images=images, slot_frames=slot_frames, reference=(half, 2),
        progress_bar=False,
    )  # fmt: skip
    first, _ = images.encode(dfr_pipe, H, W)
    torch.testing.assert_close(seq.video()[:, :, :1], first[0], atol=1e-6, rtol=0)
    given = half.flatten(2).transpose(1, 2)  # the reference's tokens close the sequence
    torch.testing.assert_close(seq.tokens[:, -given.shape[1] :], given, atol=1e-6, rtol=0)
    assert seq.slot_latents().shape == (1, channels, len(slot_frames), H // 32, W // 32)
    assert seq.slot_latents().abs().max() > 0.1 and seq.video()[:, :, 1:].std() > 0.1
    assert seq.marked[0, : (H // 32) * (W // 32)].eq(1).all() and seq.marked[0, seq.slots].eq(1).all()
    assert seq.marked.sum() == (H // 32) * (W // 32) * (1 + len(slot_frames))  # the reference is not marked


def test_recipe_output_and_distilled_lora(dfr_pipe):
    """The full model's DFR attaches the distilled LoRA for the passes and takes it out after: `num_frames` frames,
    the sound cut to their duration, and a different result from the distilled DiT's."""
    settings = dict(
        use_dfr_pipeline=True, height=2 * H, width=2 * W, num_frames=17, frame_rate=24.0, seed=1,
        max_sequence_length=MAX_LEN, output_type="pt", progress_bar=False,
    )  # fmt: skip
    assert dfr_pipe.temporal_upsampler.config.temporal_upsample and dfr_pipe.upsampler.config.spatial_upsample
    assert dfr_pipe.model_configs["temporal_upsampler"].path.endswith("temporal-upsampler.safetensors")
    assert dfr_pipe.model_configs["upsampler"].path.endswith("extras/upsampler.safetensors")
    frames, audio = dfr_pipe(CAPTIONS[0], **settings)
    assert frames.shape == (1, 3, 17, 2 * H, 2 * W)
    assert audio.waveform.shape == (1, 2, round(17 / 24.0 * dfr_pipe.sample_rate))
    assert not list_loras(dfr_pipe.dit)
    plain, _ = dfr_pipe(CAPTIONS[0], use_distilled_pipeline=True, **settings)
    assert (plain - frames).abs().max() > 1e-3
    again, _ = dfr_pipe(CAPTIONS[0], **settings)
    torch.testing.assert_close(again, frames, atol=0, rtol=0)


def test_refusals(dfr_pipe, tiny_ltx23_pipe):
    settings = dict(use_dfr_pipeline=True, use_distilled_pipeline=True, height=2 * H, width=2 * W, num_frames=9)
    with pytest.raises(ConfigError, match="cfg_scale"):
        dfr_pipe(CAPTIONS[0], cfg_scale=3.0, **settings)
    with pytest.raises(ConfigError, match="in_context_videos"):
        dfr_pipe(CAPTIONS[0], in_context_videos=[[picture(1)] * 9], **settings)
    with pytest.raises(ConfigError, match="multiples of 64"):
        dfr_pipe(CAPTIONS[0], **{**settings, "height": 96})
    with pytest.raises(ConfigError, match="LTX-2.5"):
        tiny_ltx23_pipe(CAPTIONS[0], **settings)
    with pytest.raises(ConfigError, match="sigmas"):
        dfr_pipe(CAPTIONS[0], sigmas=[0.5, 0.9], **settings)
    with pytest.raises(ConfigError, match="temporal_upsample_rounds=3"):
        dfr_pipe(CAPTIONS[0], temporal_upsample_rounds=3, **settings)
    with pytest.raises(ConfigError, match="use_dfr_pipeline=True"):
        dfr_pipe(CAPTIONS[0], temporal_upsample_rounds=1, num_frames=9)


@pytest.mark.parity
def test_released_temporal_upsampler_has_diffusers_keys_and_shapes():
    """LTX-2.5's temporal x2 upsampler (128 channels, 512 wide, 4 blocks a stage, 3-D): ours and diffusers' on the
    meta device hold the same keys and shapes, and the shapes alone say it is the temporal one."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    from diffsynth.ltx2.upsampler import LTX2LatentUpsampler, LTX2LatentUpsamplerConfig
    from diffsynth.ltx2.upsampler_formats import config_from_state

    fields = dict(in_channels=128, mid_channels=512, num_blocks_per_stage=4, dims=3)
    with torch.device("meta"):
        ours = LTX2LatentUpsampler(LTX2LatentUpsamplerConfig(**fields, spatial_upsample=False, temporal_upsample=True))
        theirs = LTX2LatentUpsamplerModel(**fields, spatial_upsample=False, temporal_upsample=True)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    derived = config_from_state(ours.state_dict())
    assert derived.temporal_upsample and not derived.spatial_upsample and derived.mid_channels == 512


def test_vram_managed_dfr_gives_the_same_video(dfr_folder, dfr_pipe):
    """Every model under the VRAM manager with every unit streamed (the two upsamplers included): the DFR recipe with
    a temporal round gives the unmanaged frames and sound (to float rounding: the streamed layers compute in
    another order)."""
    extras = dfr_folder.parent.parent / "extras"
    managed = LTX2Pipeline.from_pretrained(
        str(dfr_folder), device="cpu", torch_dtype=torch.float32, vram_limit=0,
        model_configs=[ModelConfig(path=str(extras / "upsampler.safetensors")),
                       ModelConfig(path=str(extras / "temporal-upsampler.safetensors"))],
    )  # fmt: skip
    with torch.no_grad():
        managed.dit.keyframes_abs_pos_embedding.copy_(dfr_pipe.dit.keyframes_abs_pos_embedding)
    assert {"upsampler", "temporal_upsampler"} <= set(managed.vram_handles)
    settings = dict(
        use_dfr_pipeline=True, use_distilled_pipeline=True, temporal_upsample_rounds=1, height=2 * H, width=2 * W,
        num_frames=9, seed=4, max_sequence_length=MAX_LEN, output_type="pt", progress_bar=False,
    )  # fmt: skip
    got, want = managed(CAPTIONS[1], **settings), dfr_pipe(CAPTIONS[1], **settings)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1].waveform, want[1].waveform, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        {"negative_prompt": "blurry"},
        {"stg_scale": 1.0},
        {"audio_stg_scale": 1.0},
        {"modality_scale": 3.0},
        {"audio_modality_scale": 3.0},
        {"guidance_rescale": 0.5},
        {"audio_guidance_rescale": 0.5},
        {"spatio_temporal_guidance_blocks": [0]},
        {"num_inference_steps": 2},
        {"audio_cfg_scale": 5.0},
    ],
    ids=lambda extra: next(iter(extra)),
)
def test_arguments_dfr_does_not_read_are_refused_by_name(dfr_pipe, extra):
    """DFR runs without guidance on fixed sigma tables: a guidance argument, a negative prompt or a step count
    would change nothing, so each is refused naming it (before any model runs)."""
    settings = dict(use_dfr_pipeline=True, use_distilled_pipeline=True, height=2 * H, width=2 * W, num_frames=9)
    name = next(iter(extra))
    with pytest.raises(ConfigError, match=f"use_dfr_pipeline does not take {name}"):
        dfr_pipe(CAPTIONS[0], **settings, **extra)


def test_detailing_at_strength_zero_is_no_detailing(dfr_folder, dfr_pipe):
    """`detailing_lora_strength=0` runs the second pass as without `detailing_lora`: no LoRA, no reference."""
    settings = dict(
        use_dfr_pipeline=True, use_distilled_pipeline=True, height=2 * H, width=2 * W, num_frames=9, seed=1,
        max_sequence_length=MAX_LEN, output_type="pt", progress_bar=False,
    )  # fmt: skip
    detailing = str(dfr_folder.parent.parent / "extras/detailing.safetensors")
    plain, plain_audio = dfr_pipe(CAPTIONS[0], **settings)
    off, off_audio = dfr_pipe(CAPTIONS[0], detailing_lora=detailing, detailing_lora_strength=0.0, **settings)
    torch.testing.assert_close(off, plain, atol=0, rtol=0)
    torch.testing.assert_close(off_audio.waveform, plain_audio.waveform, atol=0, rtol=0)
    on, _ = dfr_pipe(CAPTIONS[0], detailing_lora=detailing, detailing_lora_strength=1.0, **settings)
    assert (on - plain).abs().max() > 1e-3
