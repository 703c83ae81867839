"""`LTX2Pipeline` on a tiny random repo: parity with diffusers' `LTX2Pipeline` (fp32, same initial noise),
batched CFG, sizes, seeds, the single-file layout, presets and the VRAM manager."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffsynth.ltx2.pipeline import LTX2Pipeline, LTX2Text, ltx2_velocity
from diffsynth.ltx2.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.schedulers import FlowMatchScheduler

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH
FAST = dict(
    height=H,
    width=W,
    num_frames=F,
    num_inference_steps=2,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    progress_bar=False,
)
DATA = Path(__file__).parent / "data"


def run(pipe, prompt=CAPTIONS[0], **kwargs):
    settings = {**FAST, "seed": 0, "output_type": "pt", **kwargs}
    return pipe(prompt, **settings)


def reference_sigmas(reference, steps: int) -> torch.Tensor:
    """The schedule diffusers' pipeline builds (linspace(1, 1/N) shifted with mu, then stretched)."""
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=2.05)
    return reference.scheduler.sigmas.clone()


# ----------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def reference(tiny_ltx2_pipe, tiny_ltx2_base):
    pytest.importorskip("diffusers")
    pipe = repo_module.reference_pipeline(tiny_ltx2_pipe, tiny_ltx2_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parity
def test_schedule_matches_diffusers(reference):
    """Our `ltx2` template at the authors' 4096-token shift is diffusers' scheduler with that mu."""
    ours = FlowMatchScheduler("ltx2")
    for steps in (3, 40):
        ours.set_timesteps(steps, image_seq_len=4096)
        torch.testing.assert_close(ours.sigmas, reference_sigmas(reference, steps), atol=3e-7, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize(
    "guidance",
    [
        dict(cfg_scale=1.0, audio_cfg_scale=1.0, guidance_rescale=0.0),
        dict(cfg_scale=3.0, audio_cfg_scale=5.0, guidance_rescale=0.0),
        dict(cfg_scale=3.0, audio_cfg_scale=5.0, guidance_rescale=0.7),
    ],
    ids=["no-cfg", "cfg", "cfg-rescale"],
)
def test_matches_diffusers(tiny_ltx2_pipe, reference, guidance):
    """Frames and waveform against diffusers' `LTX2Pipeline` on the same weights (through our converters,
    strict loads), Gemma and tokenizer, the same noise (the same seed
    on a CPU generator: video noise first, then audio) and the same sigmas (compared on their own above;
    a 1e-7 sigma difference moves the timestep embedding by 1e-4, which would hide the rest)."""
    pytest.importorskip("diffusers")
    steps = 3
    sigmas = reference_sigmas(reference, steps)
    frames, audio = tiny_ltx2_pipe(
        CAPTIONS[0],
        negative_prompt=CAPTIONS[3],
        seed=3,
        output_type="np",
        sigmas=sigmas,
        stg_scale=0.0,
        modality_scale=1.0,
        **guidance,
        **FAST,
    )  # sigmas set the step count (3); STG and modality guidance: test_guidance.py
    expected_frames, expected_audio = reference(
        prompt=CAPTIONS[0],
        negative_prompt=CAPTIONS[3],
        height=H,
        width=W,
        num_frames=F,
        frame_rate=24.0,
        num_inference_steps=steps,
        guidance_scale=guidance["cfg_scale"],
        audio_guidance_scale=guidance["audio_cfg_scale"],
        guidance_rescale=guidance["guidance_rescale"],
        audio_guidance_rescale=guidance["guidance_rescale"],
        stg_scale=0.0,
        audio_stg_scale=0.0,
        modality_scale=1.0,
        audio_modality_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"],
        output_type="np",
        return_dict=False,
    )
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3)
    assert expected_audio.shape == (1, 2, 33 * 240)  # 9 latents -> 33 mel frames
    assert audio.waveform.shape == (1, 2, round(F / 24.0 * 24000))  # zero-padded to the video's duration
    assert audio.sample_rate == 24000
    inside = ((expected_frames > 0.01) & (expected_frames < 0.99)).mean()
    assert inside > 0.5 and expected_frames.std() > 0.05  # mostly unclamped, not flat: the comparison counts
    assert (expected_audio.abs() < 0.95).float().mean() > 0.9 and expected_audio.std() > 0.01  # tanh mostly unsaturated
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"parity {guidance}: frames max abs {frame_diff:.3g}, audio max abs {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


# ----------------------------------------------------------------------------------------- guidance
def test_batched_cfg_equals_two_passes(tiny_ltx2_pipe):
    """`predict` runs prompt and negative prompt as one batch; the result is the two single passes guided."""
    pipe = tiny_ltx2_pipe
    text = pipe.encode_prompt(CAPTIONS[:1], FAST["max_sequence_length"])
    negative = pipe.encode_prompt(CAPTIONS[3:], FAST["max_sequence_length"])
    video, audio = pipe.prepare_latents(1, F, H, W, 24.0, generator=1, rand_device="cpu")
    sigma = torch.tensor(0.6)
    with torch.no_grad():
        got_v, got_a = pipe.predict(video, audio, sigma, text.cat(negative), 24.0, True, 3.0, 6.0, 0.0)
        pos_v, pos_a = ltx2_velocity(pipe.dit, video, audio, sigma, text, 24.0)
        neg_v, neg_a = ltx2_velocity(pipe.dit, video, audio, sigma, negative, 24.0)
    # batch 2 and batch 1 take different float32 matmul paths (~7e-6 relative, times the scale)
    torch.testing.assert_close(got_v, neg_v + 3.0 * (pos_v - neg_v), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_a, neg_a + 6.0 * (pos_a - neg_a), atol=1e-4, rtol=0)
    assert (pos_v - neg_v).abs().max() > 1e-3 and (pos_a - neg_a).abs().max() > 1e-3  # the prompts matter


def test_first_block_cache_in_the_pipeline(tiny_ltx2_pipe):
    """CFG, STG (block 1) and modality isolation share one batched DiT call per step, so the cache sees one call
    per step. Threshold 0 reuses nothing (same video and audio); a loose one reuses the later steps' blocks for
    both streams; turning it off gives the uncached result again."""
    pipe = tiny_ltx2_pipe
    options = dict(num_inference_steps=2, negative_prompt=CAPTIONS[3], spatio_temporal_guidance_blocks=[1])
    plain = run(pipe, **options)
    caches = pipe.enable_first_block_cache(0.0)
    try:
        assert list(caches) == ["dit"] and pipe.step_caches() == caches
        exact = run(pipe, **options)
        assert (caches["dit"].calls, caches["dit"].skipped) == (2, 0)
        torch.testing.assert_close(exact[0], plain[0], atol=0, rtol=0)
        torch.testing.assert_close(exact[1].waveform, plain[1].waveform, atol=0, rtol=0)
        loose = pipe.enable_first_block_cache(1e9)["dit"]
        approx = run(pipe, **options)
        assert (loose.calls, loose.skipped) == (2, 1)
        assert (approx[0] - plain[0]).abs().max() > 1e-4 and (approx[1].waveform - plain[1].waveform).abs().max() > 0
    finally:
        pipe.disable_first_block_cache()
    assert pipe.step_caches() == {} and pipe.dit.step_cache is None
    again = run(pipe, **options)
    torch.testing.assert_close(again[0], plain[0], atol=0, rtol=0)
    torch.testing.assert_close(again[1].waveform, plain[1].waveform, atol=0, rtol=0)


def test_guidance_scales_act_per_stream(tiny_ltx2_pipe):
    """An explicit `cfg_scale` alone guides both streams; `audio_cfg_scale` changes the audio guidance."""
    both = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3], cfg_scale=3.0)
    split = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3], cfg_scale=3.0, audio_cfg_scale=3.0)
    torch.testing.assert_close(both[0], split[0], atol=0, rtol=0)
    torch.testing.assert_close(both[1].waveform, split[1].waveform, atol=0, rtol=0)
    louder = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3], cfg_scale=3.0, audio_cfg_scale=8.0)
    assert (louder[1].waveform - both[1].waveform).abs().max() > 1e-4


def test_default_guidance_is_the_authors(tiny_ltx2_pipe, monkeypatch):
    """Without a preset: CFG 3 (video) / 7 (audio) and rescale 0.7; an explicit cfg_scale sets both streams;
    the distilled mode turns CFG off."""
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, *args, **kwargs):
        seen.append(args[5:])  # use_cfg, scale, audio_scale, rescale
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    run(tiny_ltx2_pipe, num_inference_steps=1)
    run(tiny_ltx2_pipe, num_inference_steps=1, cfg_scale=2.0)
    run(tiny_ltx2_pipe, num_inference_steps=1, cfg_scale=2.0, audio_cfg_scale=1.0, guidance_rescale=0.0)
    assert seen == [(True, 3.0, 7.0, 0.7), (True, 2.0, 2.0, 0.7), (True, 2.0, 1.0, 0.0)]


def test_without_cfg_the_negative_prompt_is_not_used(tiny_ltx2_pipe):
    a = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3], cfg_scale=1.0, audio_cfg_scale=1.0)
    b = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[2], cfg_scale=1.0, audio_cfg_scale=1.0)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    c = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[2], cfg_scale=3.0)
    assert (c[0] - b[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------- sizes and inputs
def test_sizes_are_rounded_with_a_warning(tiny_ltx2_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        frames, audio = run(tiny_ltx2_pipe, num_frames=11, height=70, width=50, num_inference_steps=1)
    assert frames.shape == (1, 3, 9, 64, 64)
    assert "num_frames=11 rounded to 9" in caplog.text and "rounded to 64x64" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=0), r"num_frames=0 .*8k \+ 1"),
        (dict(num_frames=9.0), r"num_frames=9.0"),
        (dict(height=16), r"height=16 .*multiple of 32"),
        (dict(width=-32), r"width=-32"),
        (dict(frame_rate=0), r"frame_rate=0"),
        (dict(guidance_rescale=1.5), r"guidance_rescale=1.5"),
        (dict(output_type="latent"), r"output_type='latent'"),
        (dict(latents=torch.zeros(1, 8, 2, 2, 3)), r"latents must be a tensor of shape \(1, 8, 2, 2, 2\)"),
        (dict(audio_latents=torch.zeros(1, 2, 8, 4)), r"audio_latents must be a tensor of shape \(1, 2, 9, 4\)"),
        (dict(max_sequence_length=0), r"max_sequence_length=0"),
        (dict(tile_size_in_pixels=100), r"tile_size_in_pixels=100 must be a non-negative multiple"),
        (dict(tile_size_in_pixels=64, tile_overlap_in_pixels=64), r"smaller than tile_size_in_pixels=64"),
        (dict(stage2_spatial_upsample_factor=4), r"stage2_spatial_upsample_factor=4"),
        (dict(denoising_strength=0.5), r"use retake_video"),
        (dict(rand_device="tpu"), r"rand_device='tpu' is not accepted; use cpu, cuda, cuda:N or mps"),
        (dict(rand_device="disk", seed=None), r"rand_device='disk' is not accepted"),
    ],
)
def test_bad_inputs_are_refused(tiny_ltx2_pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run(tiny_ltx2_pipe, **kwargs)


def test_diffsynth_studio_tile_settings_in_pixels(tiny_ltx2_pipe, monkeypatch, caplog):
    """`tile_size_in_pixels` / `tile_overlap_in_pixels` become the VAE's tiles in latent cells; a clip longer than
    `tile_size_in_frames` is decoded whole in time, with a warning."""
    pipe, seen = tiny_ltx2_pipe, {}
    cell = pipe.vae.spatial_compression
    real = type(pipe.vae).decode

    def spy(self, z, **kwargs):
        seen.update(kwargs)
        return real(self, z, **kwargs)

    monkeypatch.setattr(type(pipe.vae), "decode", spy)
    pixels = dict(tile_size_in_pixels=4 * cell, tile_overlap_in_pixels=cell, tile_size_in_frames=F - 1)
    with caplog.at_level(logging.WARNING):
        run(pipe, tiled=True, num_inference_steps=1, **pixels)
    assert (seen["tile_size"], seen["tile_stride"]) == (4, 3)
    assert f"decodes the {F} frames whole in time" in caplog.text


def test_empty_prompt_is_refused(tiny_ltx2_pipe):
    with pytest.raises(ConfigError, match="prompt is empty"):
        run(tiny_ltx2_pipe, prompt=" ")


def test_audio_covers_the_video_duration(tiny_ltx2_pipe):
    """L = round(frames / fps * 25) latent frames: 9 frames at 24 fps -> 9; at 8 fps -> 28; the sound (4 L - 3
    mel frames decoded) is zero-padded to the video's duration."""
    assert tiny_ltx2_pipe.audio_latent_shape(2, 9, 24.0) == (2, 2, 9, 4)
    assert tiny_ltx2_pipe.audio_latent_shape(1, 9, 8.0) == (1, 2, 28, 4)
    frames, audio = run(tiny_ltx2_pipe, frame_rate=8.0, num_inference_steps=1)
    assert audio.waveform.shape == (1, 2, round(9 / 8.0 * 24000))
    assert audio.waveform[..., (28 * 4 - 3) * 240 - 1].any() and not audio.waveform[..., (28 * 4 - 3) * 240 :].any()


# ----------------------------------------------------------------------------------------- seeds
def test_seeded_runs_repeat_and_differ_by_seed(tiny_ltx2_pipe):
    a, b, c = (run(tiny_ltx2_pipe, seed=s) for s in (5, 5, 6))
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1].waveform, b[1].waveform, atol=0, rtol=0)
    assert (a[0] - c[0]).abs().max() > 1e-3 and (a[1].waveform - c[1].waveform).abs().max() > 1e-4


def test_given_latents_replace_the_seeded_noise(tiny_ltx2_pipe):
    video, audio = tiny_ltx2_pipe.prepare_latents(1, F, H, W, 24.0, generator=5, rand_device="cpu")
    assert video.shape == (1, 8, 2, 2, 2) and audio.shape == (1, 2, 9, 4)
    seeded = run(tiny_ltx2_pipe, seed=5)
    given = run(tiny_ltx2_pipe, seed=None, latents=video, audio_latents=audio)
    torch.testing.assert_close(given[0], seeded[0], atol=0, rtol=0)
    torch.testing.assert_close(given[1].waveform, seeded[1].waveform, atol=0, rtol=0)


def test_outputs_for_one_prompt_and_a_batch(tiny_ltx2_pipe):
    frames, audio = run(tiny_ltx2_pipe, output_type="pil", num_inference_steps=1)
    assert len(frames) == F and frames[0].size == (W, H)
    waveform, rate = audio  # unpacks like (waveform, sample_rate)
    assert waveform.shape == (2, 9000) and rate == 24000  # 9 frames at 24 fps
    frames, audio = run(tiny_ltx2_pipe, prompt=CAPTIONS[:2], output_type="np", num_inference_steps=1)
    assert frames.shape == (2, F, H, W, 3) and audio.waveform.shape == (2, 2, 9000)


def test_text_batches_concatenate():
    a = LTX2Text(torch.zeros(1, 4, 2), torch.zeros(1, 4, 3), torch.ones(1, 4, dtype=torch.int64))
    b = LTX2Text(torch.ones(2, 4, 2), torch.ones(2, 4, 3), None)
    both = a.cat(b)
    assert both.video.shape == (3, 4, 2) and both.mask.shape == (3, 4) and both.mask.all()
    with pytest.raises(ConfigError, match="differ in shape"):
        a.cat(LTX2Text(torch.zeros(1, 5, 2), torch.zeros(1, 5, 3)))


# ----------------------------------------------------------------------------------------- single file, presets
def test_single_file_loads_all_five_models(tiny_ltx2_base, tiny_ltx2_pipe):
    """The fixture's one file in the released layout (its keys a subset of the real file's: fewer blocks,
    same names) gives all five LTX models through from_pretrained, with the configs we built them with."""
    path = tiny_ltx2_base / repo_module.LTX_REPO / repo_module.SINGLE_FILE
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    released = set(json.loads((DATA / "ltx2_full.json").read_text()))
    assert keys - released == set()
    models = repo_module.tiny_models()
    for slot, config in repo_module.tiny_configs().items():
        assert tiny_ltx2_pipe.model_configs[slot].path == str(path)
        model = getattr(tiny_ltx2_pipe, slot)
        assert model.config == config
        expected = models[slot].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parity
def test_diffusers_folder_loads_the_same_models(tiny_ltx2_base, tiny_ltx2_pipe, tmp_path):
    """The diffusers layout (`transformer/`, `connectors/`, `vae/`, `audio_vae/`, `vocoder/`, `text_encoder/`,
    `tokenizer/`, each with its config.json) gives the same weights and the same output."""
    pytest.importorskip("diffusers")
    folder = repo_module.write_diffusers_folder(tiny_ltx2_pipe, tiny_ltx2_base, tmp_path / "LTX-2")
    pipe = LTX2Pipeline.from_pretrained(str(folder), device="cpu", torch_dtype=torch.float32)
    for slot in set(LTX2Pipeline.model_slots) - set(LTX2Pipeline.optional_slots):
        ours, theirs = getattr(pipe, slot).state_dict(), getattr(tiny_ltx2_pipe, slot).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), slot
    got, expected = run(pipe, negative_prompt=CAPTIONS[3]), run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3])
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)


def test_preset_resolves_to_the_single_file_and_gemma(tiny_ltx2_base, tiny_ltx2_pipe, monkeypatch):
    """`from_pretrained("Lightricks/LTX-2")` with downloads off finds both repos in the model base and takes
    the authors' defaults: the same output as the path-built pipeline given those settings."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx2_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = LTX2Pipeline.from_pretrained("Lightricks/LTX-2", device="cpu", torch_dtype=torch.float32)
    assert pipe.defaults == dict(PRESETS["Lightricks/LTX-2"].defaults)
    assert pipe.defaults["num_inference_steps"] == 40 and pipe.defaults["audio_cfg_scale"] == 7.0
    explicit = dict(cfg_scale=3.0, audio_cfg_scale=7.0, guidance_rescale=0.7, frame_rate=24.0)
    got = run(pipe, negative_prompt=CAPTIONS[3])
    expected = run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3], **explicit)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)


def test_released_file_loads_whole_on_meta():
    """The full `ltx-2-19b-dev.safetensors` key list (meta tensors) splits into the five LTX models with no
    key left over, each built with the released config (strict key check on the meta device)."""
    from diffsynth.ltx2.formats import FAMILY
    from diffsynth.runtime.loading import load_models

    shapes = json.loads((DATA / "ltx2_full.json").read_text())
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    loaded = load_models(meta, specs=FAMILY.specs)
    assert sorted(item.role for item in loaded) == ["audio_vae", "connectors", "dit", "vae", "vocoder"]
    for item in loaded:
        assert item.config == type(item.config)(), item.role  # every config class defaults to the release


def test_family_is_installed_with_presets():
    from diffsynth.runtime.registry import find_preset, installed_families

    family = installed_families()["ltx2"]
    assert family.pipeline_class() is LTX2Pipeline
    roles = {"dit", "connectors", "vae", "audio_vae", "vocoder", "text_encoder", "upsampler", "duration_head"}
    roles |= {"diffusion_decoder"}  # LTX-2.5's
    assert {s.role for s in family.specs} == roles
    fam, preset = find_preset("Lightricks/LTX-2")
    assert fam is family and preset.defaults["num_inference_steps"] == 40
    assert [f.origin_file_pattern for f in preset.files][0] == "ltx-2-19b-dev.safetensors"
    _, distilled = find_preset("Lightricks/LTX-2:distilled")
    assert distilled.defaults["use_distilled_pipeline"] is True
    with pytest.raises(ConfigError, match="Lightricks/LTX-2"):
        LTX2Pipeline.from_pretrained("Lightricks/LTX-3")


def test_distilled_mode_runs_the_fixed_table_without_cfg(tiny_ltx2_pipe, monkeypatch):
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, video, audio, sigma, text, *args, **kwargs):
        seen.append((float(sigma), text.video.shape[0]))
        assert not kwargs["guidance"].stg and not kwargs["guidance"].isolation  # no STG / modality passes
        return real(self, video, audio, sigma, text, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    run(tiny_ltx2_pipe, use_distilled_pipeline=True, use_two_stage_pipeline=False, num_inference_steps=8)
    table = FlowMatchScheduler("ltx2_distilled")
    table.set_timesteps(8)
    assert [s for s, _ in seen] == pytest.approx(table.sigmas[:-1].tolist())
    assert {b for _, b in seen} == {1}  # no negative pass


# ----------------------------------------------------------------------------------------- VRAM manager
def test_vram_managed_pipeline_gives_the_same_output(tiny_ltx2_base, tiny_ltx2_pipe):
    """Every model under the VRAM manager with every unit streamed: stages activate what they use in time."""
    managed = repo_module.our_pipeline(tiny_ltx2_base, vram_limit=0)
    assert sorted(managed.vram_handles) == sorted(set(LTX2Pipeline.model_slots) - set(LTX2Pipeline.optional_slots))
    got, expected = run(managed, negative_prompt=CAPTIONS[3]), run(tiny_ltx2_pipe, negative_prompt=CAPTIONS[3])
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)
