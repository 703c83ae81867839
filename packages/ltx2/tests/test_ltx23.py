"""LTX-2.3 (22B) and LTX-2.5 through `LTX2Pipeline` on tiny random models. LTX-2.3 from a tiny
`ltx-2.3-22b-dev.safetensors`: the single file gives the 2.3 models; parity with diffusers' `LTX2Pipeline`,
`LTX2ImageToVideoPipeline`, `LTX2ConditionPipeline`, `LTX2InContextPipeline` and the two-stage recipe built from the
same 2.3 weights; 48 kHz sound; the authors' 2.3 defaults (preset and without one); audio-to-video; training; the
released file's split on the meta device; the VRAM manager. LTX-2.5: its DiT marks the first latent frame, and a
tiny LTX-2.5 diffusers folder (Gemma 4) loads and matches diffusers' `LTX2Pipeline`. The per-model parity (DiT,
connectors, video VAE, vocoder, Gemma 4) is in each model's own test module."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.ltx2.presets import PRESETS
from diffsynth.ltx2.vocoder import LTX2VocoderWithBWE

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
OFF = dict(stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0)  # CFG only
DECODED = 33 * 480  # 9 audio latents -> 33 mel frames -> 480 samples each at 48 kHz
SAMPLES = 18000  # 9 frames at 24 fps: the sound zero-padded to the video's duration


def run(pipe, prompt=CAPTIONS[0], **kwargs):
    settings = {**FAST, "seed": 0, "output_type": "pt", **kwargs}
    return pipe(prompt, **settings)


def picture(seed: int) -> Image.Image:
    """A smooth random 96x96 RGB picture (bilinear-upsampled noise)."""
    small = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((96, 96), Image.BILINEAR)


def test_single_file_gives_the_23_models(tiny_ltx23_pipe):
    """The file alone (no config) gives each model's 2.3 architecture, and the pipeline takes the authors' 2.3
    defaults (30 steps, STG at block 28) and the vocoder's 48 kHz."""
    pipe = tiny_ltx23_pipe
    dit = pipe.dit.config
    assert dit.gated_attention and dit.cross_attention_adaln and not dit.caption_projection
    assert dit.cross_modal_mode == "cross"
    assert pipe.connectors.config.per_modality_projections
    assert pipe.vae.config.decoder_upsamples == ("all", "all", "time", "space")
    assert isinstance(pipe.vocoder, LTX2VocoderWithBWE) and pipe.sample_rate == 48000
    assert pipe.is_ltx23 and pipe.default_steps == 30 and pipe.default_stg_blocks == (28,)
    expected = repo_module.tiny_models(version="2.3")
    for slot, model in expected.items():
        ours = getattr(pipe, slot).state_dict()
        assert ours.keys() == model.state_dict().keys(), slot
        assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items()), slot


def test_generates_video_and_48k_sound(tiny_ltx23_pipe):
    frames, audio = run(tiny_ltx23_pipe, negative_prompt=CAPTIONS[3])
    assert frames.shape == (1, 3, F, H, W) and torch.isfinite(frames).all() and frames.std() > 0.05
    assert audio.sample_rate == 48000 and audio.waveform.shape == (1, 2, SAMPLES)
    assert audio.waveform.abs().max() <= 1.0 and audio.waveform.std() > 0.01


def test_the_23_defaults_apply_without_a_preset(tiny_ltx23_pipe, tiny_ltx2_pipe, monkeypatch):
    """Loaded from paths (no preset), a 2.3 DiT runs the authors' 30 steps (2.0: 40) and would perturb block 28
    (2.0: 29; past the tiny DiTs' 2 blocks, so dropped here)."""
    calls = []
    real = LTX2Pipeline.predict

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    settings = {k: v for k, v in FAST.items() if k != "num_inference_steps"}
    tiny_ltx23_pipe(CAPTIONS[0], seed=0, output_type="pt", cfg_scale=1.0, audio_cfg_scale=1.0, **OFF, **settings)
    assert len(calls) == 30  # one unguided pass per step
    assert (tiny_ltx23_pipe.default_steps, tiny_ltx23_pipe.default_stg_blocks) == (30, (28,))
    assert (tiny_ltx2_pipe.default_steps, tiny_ltx2_pipe.default_stg_blocks) == (40, (29,))


def test_preset_resolves_to_the_23_file(tiny_ltx23_base, tiny_ltx23_pipe, monkeypatch):
    """`from_pretrained("Lightricks/LTX-2.3")` with downloads off finds the 2.3 file and Gemma, with the authors'
    2.3 settings: the same output as the path-built pipeline given them."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_ltx23_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = LTX2Pipeline.from_pretrained("Lightricks/LTX-2.3", device="cpu", torch_dtype=torch.float32)
    assert pipe.defaults == dict(PRESETS["Lightricks/LTX-2.3"].defaults)
    assert pipe.defaults["num_inference_steps"] == 30 and pipe.defaults["spatio_temporal_guidance_blocks"] == (28,)
    explicit = dict(cfg_scale=3.0, audio_cfg_scale=7.0, guidance_rescale=0.7, frame_rate=24.0)
    got = run(pipe, negative_prompt=CAPTIONS[3])
    expected = run(tiny_ltx23_pipe, negative_prompt=CAPTIONS[3], **explicit)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)


def test_joyai_echo_preset_is_one_distilled_stage_of_its_single_file(
    tiny_ltx23_base, tiny_ltx23_pipe, monkeypatch, tmp_path
):
    """`jd-opensource/JoyAI-Echo` finds its one file (every LTX-2.3 model) and Gemma, and runs the distilled table
    without CFG in one stage, as DiffSynth-Studio's example: the path-built pipeline given those settings."""
    base = tmp_path / "models"  # the tiny LTX-2.3 file under JoyAI-Echo's name, beside the same Gemma
    (base / repo_module.GEMMA_REPO).parent.mkdir(parents=True)
    (base / repo_module.GEMMA_REPO).symlink_to(tiny_ltx23_base / repo_module.GEMMA_REPO)
    (base / "jd-opensource" / "JoyAI-Echo").mkdir(parents=True)
    single = tiny_ltx23_base / repo_module.LTX23_REPO / repo_module.SINGLE_FILE_23
    (base / "jd-opensource" / "JoyAI-Echo" / "JoyAI-Echo-release.safetensors").symlink_to(single)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = LTX2Pipeline.from_pretrained("jd-opensource/JoyAI-Echo", device="cpu", torch_dtype=torch.float32)
    assert pipe.is_ltx23 and pipe.upsampler is None  # one stage: no upsampler is fetched
    calls, real = [], LTX2Pipeline.predict
    monkeypatch.setattr(LTX2Pipeline, "predict", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    sizes = {k: FAST[k] for k in ("height", "width", "num_frames", "max_sequence_length", "progress_bar")}
    got = pipe(CAPTIONS[0], seed=0, output_type="pt", **sizes)
    assert len(calls) == 8  # the distilled table, one unguided pass a step, no second stage
    expected = tiny_ltx23_pipe(CAPTIONS[0], seed=0, output_type="pt", use_distilled_pipeline=True,
                               use_two_stage_pipeline=False, frame_rate=24.0, **sizes)  # fmt: skip
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)


def test_released_file_splits_on_meta():
    """A full-size LTX-2.3 single file (our five release-config models on the meta device, in the file's layout)
    splits into the five models with no key left over, each with its released 2.3 config; the DiT holds ~19B
    parameters (22B with the connectors, VAEs and vocoder is the model's name)."""
    from diffsynth.ltx2.audio_vae import LTX2AudioVAE, LTX2AudioVAEConfig
    from diffsynth.ltx2.connectors import LTX2ConnectorsConfig, LTX2TextConnectors
    from diffsynth.ltx2.dit import LTX2DiT, LTX2DiTConfig
    from diffsynth.ltx2.formats import FAMILY
    from diffsynth.ltx2.video_vae import LTX2VideoVAE, LTX2VideoVAEConfig
    from diffsynth.ltx2.vocoder import LTX2VocoderWithBWEConfig
    from diffsynth.runtime.loading import load_models

    released = {
        "dit": LTX2DiTConfig.ltx23(),
        "connectors": LTX2ConnectorsConfig.ltx23(),
        "vae": LTX2VideoVAEConfig.ltx23(),
        "audio_vae": LTX2AudioVAEConfig(),
        "vocoder": LTX2VocoderWithBWEConfig(),
    }
    classes = {
        "dit": LTX2DiT,
        "connectors": LTX2TextConnectors,
        "vae": LTX2VideoVAE,
        "audio_vae": LTX2AudioVAE,
        "vocoder": LTX2VocoderWithBWE,
    }
    with torch.device("meta"):
        models = {slot: classes[slot](config) for slot, config in released.items()}
    state = repo_module.single_file_state(models, clone=False)
    loaded = load_models(state, specs=FAMILY.specs)
    assert sorted(item.role for item in loaded) == ["audio_vae", "connectors", "dit", "vae", "vocoder"]
    for item in loaded:
        assert item.config == released[item.role], item.role
    assert 18e9 < sum(p.numel() for p in models["dit"].parameters()) < 20e9


# ----------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def reference(tiny_ltx23_pipe, tiny_ltx23_base):
    """diffusers' `LTX2Pipeline` with the tiny 2.3 weights (its transformer, as the released 2.3 config, built with
    `perturbed_attn=True`, so its STG pass perturbs)."""
    pytest.importorskip("diffusers")
    pipe = repo_module.reference_pipeline(tiny_ltx23_pipe, tiny_ltx23_base, version="2.3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_sigmas(reference, steps: int) -> torch.Tensor:
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=2.05)
    return reference.scheduler.sigmas.clone()


def _check(frames, audio, expected_frames, expected_audio, label: str) -> None:
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3)
    assert audio.sample_rate == 48000 and audio.waveform.shape == (1, 2, SAMPLES)
    assert expected_audio.shape == (1, 2, DECODED)
    inside = ((expected_frames > 0.01) & (expected_frames < 0.99)).mean()
    assert inside > 0.5 and expected_frames.std() > 0.05  # mostly unclamped, not flat: the comparison counts
    assert (expected_audio.abs() < 0.95).float().mean() > 0.9 and expected_audio.std() > 0.01  # not clamped
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"LTX-2.3+ parity ({label}): frames max abs {frame_diff:.3g}, audio max abs {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize(
    "guidance",
    [
        dict(cfg_scale=3.0, audio_cfg_scale=5.0, guidance_rescale=0.0, **OFF),
        dict(
            cfg_scale=3.0,
            audio_cfg_scale=5.0,
            guidance_rescale=0.7,
            stg_scale=1.0,
            audio_stg_scale=1.5,
            modality_scale=3.0,
            audio_modality_scale=2.0,
        ),
    ],
    ids=["cfg", "cfg-rescale-stg-modality"],
)
def test_matches_diffusers(tiny_ltx23_pipe, reference, guidance):
    """Frames and 48 kHz waveform against diffusers' `LTX2Pipeline` on the same 2.3 weights (our converters,
    strict loads), Gemma, noise and sigmas; diffusers' default `use_cross_timestep=True` is our 2.3 DiT's
    `cross_modal_mode` "cross". STG perturbs block 1 of the tiny 2."""
    steps = 3
    sigmas = _reference_sigmas(reference, steps)
    common = dict(negative_prompt=CAPTIONS[3], output_type="np", **guidance)
    frames, audio = tiny_ltx23_pipe(
        CAPTIONS[0], seed=3, sigmas=sigmas, spatio_temporal_guidance_blocks=[1], **common, **FAST
    )
    rescale = guidance["guidance_rescale"]
    expected_frames, expected_audio = reference(
        prompt=CAPTIONS[0],
        height=H,
        width=W,
        num_frames=F,
        frame_rate=24.0,
        num_inference_steps=steps,
        guidance_scale=guidance["cfg_scale"],
        audio_guidance_scale=guidance["audio_cfg_scale"],
        guidance_rescale=rescale,
        audio_guidance_rescale=rescale,
        **{k: guidance[k] for k in OFF},
        spatio_temporal_guidance_blocks=[1],
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"],
        negative_prompt=CAPTIONS[3],
        output_type="np",
        return_dict=False,
    )
    _check(frames, audio, expected_frames, expected_audio, str(guidance))


@pytest.mark.parity
def test_image_to_video_matches_diffusers(tiny_ltx23_pipe, reference):
    """First-frame conditioning against diffusers' `LTX2ImageToVideoPipeline` with its default
    `use_cross_timestep=True`: the conditioned tokens' own timestep is 0, so the audio<->video modulation's
    source (the other stream's sigma) matters here, unlike in text-to-video. H.264 re-compression off on both
    sides (`image_crf=0`; see test_image_to_video.py)."""
    import diffusers

    i2v = diffusers.LTX2ImageToVideoPipeline(**reference.components)
    i2v.set_progress_bar_config(disable=True)
    steps = 3
    sigmas = _reference_sigmas(i2v, steps)
    image = picture(1)
    frames, audio = tiny_ltx23_pipe(
        CAPTIONS[0],
        input_images=[image],
        image_crf=0,
        negative_prompt=CAPTIONS[3],
        seed=3,
        output_type="np",
        sigmas=sigmas,
        cfg_scale=3.0,
        audio_cfg_scale=5.0,
        guidance_rescale=0.0,
        **OFF,
        **FAST,
    )
    expected_frames, expected_audio = i2v(
        image=image,
        prompt=CAPTIONS[0],
        negative_prompt=CAPTIONS[3],
        height=H,
        width=W,
        num_frames=F,
        frame_rate=24.0,
        num_inference_steps=steps,
        guidance_scale=3.0,
        audio_guidance_scale=5.0,
        guidance_rescale=0.0,
        audio_guidance_rescale=0.0,
        **OFF,
        image_crf=0,
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"],
        output_type="np",
        return_dict=False,
    )
    _check(frames, audio, expected_frames, expected_audio, "image-to-video")


def _two_stage_recipe(reference, pipe, lora_file):
    """diffusers' documented two-stage recipe (as test_two_stage.py runs it for 2.0) on the 2.3 weights: half size
    with CFG to latents, `LTX2LatentUpsamplePipeline` with the 2.3-style upsampler, then the distilled LoRA at 0.8
    and the 3 stage-2 sigmas without guidance; one generator through both stages."""
    import diffusers
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
    from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES

    generator = torch.Generator().manual_seed(3)
    common = dict(
        prompt=CAPTIONS[0], negative_prompt=CAPTIONS[3], num_frames=F, frame_rate=24.0, **OFF,
        guidance_rescale=0.0, audio_guidance_rescale=0.0, generator=generator,
        max_sequence_length=FAST["max_sequence_length"], return_dict=False,
    )  # fmt: skip
    video, audio = reference(
        height=H, width=W, num_inference_steps=3, guidance_scale=3.0, audio_guidance_scale=5.0,
        output_type="latent", **common,
    )  # fmt: skip
    up = repo_module.UPSAMPLER_23
    upsampler = LTX2LatentUpsamplerModel(
        in_channels=up["in_channels"], mid_channels=32, num_blocks_per_stage=1, use_rational_resampler=False
    ).eval()
    upsampler.load_state_dict(pipe.upsampler.state_dict(), strict=True)
    upscaled = diffusers.LTX2LatentUpsamplePipeline(vae=reference.vae, latent_upsampler=upsampler)(
        latents=video, output_type="latent", return_dict=False
    )[0]
    repo_module.fuse_lora(reference.transformer, diffusers.LTX2Pipeline.lora_state_dict(str(lora_file)), 0.8)
    reference.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        reference.scheduler.config, use_dynamic_shifting=False, shift_terminal=None
    )
    return reference(
        latents=upscaled, audio_latents=audio, height=2 * H, width=2 * W, num_inference_steps=3,
        noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0], sigmas=STAGE_2_DISTILLED_SIGMA_VALUES, guidance_scale=1.0,
        audio_guidance_scale=1.0, output_type="np", **common,
    )  # fmt: skip


@pytest.mark.parity
def test_two_stage_matches_diffusers_recipe(tiny_ltx23_base, tiny_ltx23_pipe):
    """The authors' two-stage pipeline on 2.3 (its conv + pixel-shuffle x2 upsampler, the distilled LoRA in stage
    2) against diffusers' documented recipe on the same weights."""
    pytest.importorskip("diffusers")
    from diffsynth.runtime.hub import ModelConfig

    upsampler, lora = repo_module.write_two_stage_files(tiny_ltx23_base / "two-stage", tiny_ltx23_pipe.dit, "2.3")
    pipe = repo_module.our_pipeline(
        tiny_ltx23_base, version="2.3", model_configs=[ModelConfig(path=str(upsampler))], stage2_lora_config=str(lora)
    )
    assert not pipe.upsampler.config.rational_resampler
    reference = repo_module.reference_pipeline(tiny_ltx23_pipe, tiny_ltx23_base, version="2.3")
    reference.set_progress_bar_config(disable=True)
    sigmas = _reference_sigmas(reference, 3)
    frames, audio = pipe(
        CAPTIONS[0], negative_prompt=CAPTIONS[3], seed=3, cfg_scale=3.0, audio_cfg_scale=5.0, sigmas=sigmas,
        guidance_rescale=0.0, **OFF, use_two_stage_pipeline=True, output_type="np",
        **{**FAST, "height": 2 * H, "width": 2 * W},
    )  # fmt: skip
    expected_frames, expected_audio = _two_stage_recipe(reference, pipe, lora)
    assert frames.shape == expected_frames.shape == (1, F, 2 * H, 2 * W, 3) and expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"LTX-2.3 two-stage parity: frames max abs {frame_diff:.3g}, audio max abs {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_keyframes_match_diffusers_condition_pipeline(tiny_ltx23_base, tiny_ltx23_pipe, strength):
    """A first frame (at `strength`) and a keyframe at video frame 9 against diffusers' `LTX2ConditionPipeline`
    (as test_keyframes.py for 2.0), with its 2.3 audio<->video modulation (`use_cross_timestep=True`)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    frames_17 = 17
    reference, sigmas = repo_module.conditioned_reference(
        tiny_ltx23_pipe, tiny_ltx23_base, diffusers.LTX2ConditionPipeline, version="2.3"
    )
    first, key = picture(1).resize((W, H)), picture(2).resize((W, H))
    conditions = [
        LTX2VideoCondition(frames=first, index=0, strength=strength, crf=0),
        LTX2VideoCondition(frames=key, index=2, crf=0),
    ]
    expected_frames, expected_audio = reference(
        conditions=conditions, **repo_module.diffusers_call(frames_17, version="2.3")
    )
    frames, audio = tiny_ltx23_pipe(
        CAPTIONS[0], input_images=[first, key], input_images_indexes=[0, 9], input_images_strength=strength,
        image_crf=0, negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, cfg_scale=3.0,
        audio_cfg_scale=5.0, guidance_rescale=0.0, **OFF, **{**FAST, "num_frames": frames_17},
    )  # fmt: skip
    assert frames.shape == expected_frames.shape == (1, frames_17, H, W, 3) and expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"LTX-2.3 keyframe parity (strength {strength}): frames {frame_diff:.3g}, audio {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


@pytest.mark.parity
def test_in_context_video_matches_diffusers(tiny_ltx23_base, tiny_ltx23_pipe):
    """An IC-LoRA control video at half size (`in_context_downsample_factor=2`) against diffusers'
    `LTX2InContextPipeline` on the 2.3 weights (as test_in_context.py for 2.0)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    frames_17 = 17
    reference, sigmas = repo_module.conditioned_reference(
        tiny_ltx23_pipe, tiny_ltx23_base, diffusers.LTX2InContextPipeline, version="2.3"
    )
    control = [picture(k).resize((W // 2, H // 2)) for k in range(frames_17)]
    expected_frames, expected_audio = reference(
        reference_conditions=[LTX2ReferenceCondition(frames=control)],
        reference_downscale_factor=2,
        **repo_module.diffusers_call(frames_17, version="2.3"),
    )
    frames, audio = tiny_ltx23_pipe(
        CAPTIONS[0], in_context_videos=[control], in_context_downsample_factor=2, negative_prompt=CAPTIONS[3],
        seed=3, output_type="np", sigmas=sigmas, cfg_scale=3.0, audio_cfg_scale=5.0, guidance_rescale=0.0, **OFF,
        **{**FAST, "num_frames": frames_17},
    )  # fmt: skip
    assert frames.shape == expected_frames.shape == (1, frames_17, H, W, 3) and expected_frames.std() > 0.05
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    print(f"LTX-2.3 in-context parity: frames {frame_diff:.3g}, audio {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5


def test_audio_to_video_keeps_the_given_sound(tiny_ltx23_pipe, monkeypatch):
    """Audio-to-video on 2.3: the given sound is encoded, kept clean through the steps (audio timestep 0, hence
    the audio stream's sigma 0 for its text AdaLN and the video's cross-modal AdaLN) and returned as given."""
    seen = []
    real = type(tiny_ltx23_pipe.dit).forward

    def spy(dit, *args, **kwargs):
        seen.append(kwargs["audio_timestep"].clone())
        return real(dit, *args, **kwargs)

    monkeypatch.setattr(type(tiny_ltx23_pipe.dit), "forward", spy)
    sound = 0.3 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(5))
    frames, audio = run(tiny_ltx23_pipe, retake_audio=sound, audio_sample_rate=16000, negative_prompt=CAPTIONS[3])
    assert frames.shape == (1, 3, F, H, W)
    assert all(float(t.abs().max()) == 0.0 for t in seen) and len(seen) == 2
    torch.testing.assert_close(audio.waveform[0], sound[:, : audio.waveform.shape[-1]], atol=0, rtol=0)
    assert audio.sample_rate == 16000


# ----------------------------------------------------------------------------------------- VRAM manager
def test_vram_managed_pipeline_gives_the_same_output(tiny_ltx23_base):
    """Every 2.3 model under the VRAM manager with every unit streamed gives the resident pipeline's output,
    bit for bit. The resident weights are copied out of the file's memory map first: CPU matmuls on the mapped
    tensors (at unaligned offsets) take another kernel path and move the audio latents by ~1e-5, whereas the
    manager's streamed copies are aligned."""
    managed = repo_module.our_pipeline(tiny_ltx23_base, version="2.3", vram_limit=0)
    resident = repo_module.our_pipeline(tiny_ltx23_base, version="2.3")
    for slot in resident.model_slots:
        for p in getattr(resident, slot).parameters() if getattr(resident, slot) is not None else ():
            p.data = p.data.clone()
    got, expected = run(managed, negative_prompt=CAPTIONS[3]), run(resident, negative_prompt=CAPTIONS[3])
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------- training
def test_training_velocity_is_the_pipelines_prediction(tiny_ltx23_base, tiny_ltx23_pipe):
    """`LTX2TrainingTask` on the 2.3 file: its encodings feed a joined velocity equal to the pipeline's per-step
    prediction on the same noisy latents and noise levels (as test_training.py checks for 2.0)."""
    from diffsynth.ltx2.audio_vae import pack_latents
    from diffsynth.ltx2.pipeline import LTX2Text, pack_video
    from diffsynth.ltx2.training import LTX2TrainingTask
    from diffsynth.runtime.hub import ModelConfig

    gemma = tiny_ltx23_base / repo_module.GEMMA_REPO
    configs = [
        ModelConfig(path=str(tiny_ltx23_base / repo_module.LTX23_REPO / repo_module.SINGLE_FILE_23)),
        ModelConfig(path=sorted(str(p) for p in gemma.glob("model*.safetensors"))),
    ]
    max_len = repo_module.MAX_SEQUENCE_LENGTH
    task = LTX2TrainingTask.from_pretrained(
        configs, torch_dtype=torch.float32, device="cpu", max_sequence_length=max_len
    )
    rows = []
    for seed in (6, 7):
        g = torch.Generator().manual_seed(seed)
        video = torch.rand(3, F, H, W, generator=g) * 2 - 1
        sound = 0.3 * torch.randn(2, int(F / 24 * 16000), generator=g)
        rows.append({"prompt": CAPTIONS[seed % 3], "video": video, "audio": sound, "audio_sample_rate": 16000})
    samples = task.encode(rows)
    batch = task.collate(samples)
    noisy = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(8))
    sigma = torch.tensor([0.3, 0.8])
    pipe = tiny_ltx23_pipe
    got = task.velocity(pipe.dit, batch, noisy, sigma)
    f, h, w = samples[0]["video_shape"].tolist()
    channels, length, bins = samples[0]["audio_shape"].tolist()
    text = pipe.encode_prompt([CAPTIONS[0], CAPTIONS[1]], max_len)
    for i in range(2):
        video = noisy[i, : f * h * w].T.reshape(1, -1, f, h, w)
        audio = noisy[i, f * h * w :].reshape(length, channels, bins).transpose(0, 1)[None]
        one = LTX2Text(text.video[i : i + 1], text.audio[i : i + 1], text.mask[i : i + 1])
        v_video, v_audio = pipe.predict(video, audio, sigma[i], one, 24.0, False, 1.0, 1.0, 0.0)
        expected = torch.cat([pack_video(v_video)[0], pack_latents(v_audio)[0]])
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=2e-5)  # velocities reach ~20 here


# ----------------------------------------------------------------------------------------- LTX-2.5's DiT
def test_ltx25_dit_marks_the_first_latent_frame(tiny_ltx23_pipe):
    """An LTX-2.5 DiT (keyframe embedding, no video feed-forward bias): every call adds the learned keyframe vector
    to the first latent frame's tokens, which hold one pixel frame (ltx-core's `_first_frame_keyframes_mask`), and
    to no other token."""
    from dataclasses import replace

    from diffsynth.ltx2.dit import LTX2DiT, audio_positions, video_positions
    from diffsynth.ltx2.pipeline import LTX2Text, ltx2_velocity, pack_video
    from diffsynth.runtime.testing.weights import random_weights

    config = replace(tiny_ltx23_pipe.dit.config, ff_bias=False, keyframes_abs_pos_embedding=True)
    dit = random_weights(LTX2DiT(config).eval(), 5, scale=0.2)
    g = torch.Generator().manual_seed(6)
    video = torch.randn(1, config.in_channels, 2, 2, 2, generator=g)
    audio = torch.randn(1, 1, 9, config.audio_in_channels, generator=g)
    text = LTX2Text(torch.randn(1, 4, config.dim, generator=g), torch.randn(1, 4, config.audio_dim, generator=g), None)
    with torch.no_grad():
        got, _ = ltx2_velocity(dit, video, audio, 0.6, text)
        marked = torch.zeros(1, 8)
        marked[:, :4] = 1.0  # 2 x 2 tokens a latent frame
        call = dict(
            audio_timestep=torch.full((1,), 600.0),
            video_coords=video_positions(config, 1, 2, 2, 2, 24.0),
            audio_coords=audio_positions(config, 1, 9),
        )
        args = (pack_video(video), audio.transpose(1, 2).flatten(2), text.video, text.audio, torch.full((1,), 600.0))
        want, _ = dit(*args, keyframes_mask=marked, **call)
        unmarked, _ = dit(*args, **call)
    torch.testing.assert_close(pack_video(got), want, atol=1e-6, rtol=0)
    assert (pack_video(got) - unmarked).abs().max() > 1e-3  # the marker changes the result


# ----------------------------------------------------------------------------------------- LTX-2.5 (diffusers folder)
@pytest.fixture(scope="module")
def ltx25_folder(tmp_path_factory):
    return repo_module.write_tiny_25_folder(tmp_path_factory.mktemp("tiny-ltx25") / "Lightricks/LTX-2.5-Diffusers")


@pytest.fixture(scope="module")
def ltx25_pipe(ltx25_folder):
    return LTX2Pipeline.from_pretrained(str(ltx25_folder), device="cpu", torch_dtype=torch.float32)


def test_ltx25_folder_gives_the_25_models(ltx25_pipe):
    """LTX-2.5's diffusers folder: the Gemma 4 text encoder, connectors reading its 7 x 32 states, the DiT without
    its video feed-forward bias and with the keyframe embedding, the 2.3 VAEs and vocoder; the authors' 2.4+
    defaults (30 steps, STG at block 28, image CRF 18)."""
    from diffsynth.ltx2.gemma4_text_encoder import Gemma4TextEncoder

    pipe = ltx25_pipe
    assert isinstance(pipe.text_encoder, Gemma4TextEncoder)
    dit = pipe.dit.config
    assert not dit.ff_bias and dit.audio_ff_bias and dit.keyframes_abs_pos_embedding and dit.cross_attention_adaln
    connectors = pipe.connectors.config
    assert (connectors.caption_channels, connectors.text_proj_in_factor) == (32, 7)
    assert isinstance(pipe.vocoder, LTX2VocoderWithBWE) and pipe.sample_rate == 48000
    assert (pipe.default_steps, pipe.default_stg_blocks, pipe.default_image_crf) == (30, (28,), 18)
    frames, audio = run(pipe, negative_prompt=CAPTIONS[3])
    assert frames.shape == (1, 3, F, H, W) and audio.waveform.shape == (1, 2, SAMPLES)


def test_ltx25_preset_resolves_to_the_folder(ltx25_folder, ltx25_pipe, monkeypatch):
    """`from_pretrained("Lightricks/LTX-2.5-Diffusers")` with downloads off reads each model folder (weights and
    config.json) and the tokenizer from the model base: the same output as the folder path."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(ltx25_folder.parent.parent))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = LTX2Pipeline.from_pretrained("Lightricks/LTX-2.5-Diffusers", device="cpu", torch_dtype=torch.float32)
    got, expected = run(pipe, negative_prompt=CAPTIONS[3]), run(ltx25_pipe, negative_prompt=CAPTIONS[3])
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)


@pytest.mark.parity
def test_ltx25_matches_diffusers(ltx25_folder, ltx25_pipe):
    """Frames and sound against diffusers' `LTX2Pipeline` built from the same folder (each model by its own
    `from_pretrained`, so the folder is also one diffusers reads), Gemma 4 included; same noise and sigmas."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE as DiffusersBWE
    from transformers import AutoTokenizer, Gemma4UnifiedForConditionalGeneration

    f = ltx25_folder
    reference = diffusers.LTX2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**repo_module.SCHEDULER_CONFIG),
        vae=diffusers.AutoencoderKLLTX2Video.from_pretrained(f / "vae").eval(),
        audio_vae=diffusers.AutoencoderKLLTX2Audio.from_pretrained(f / "audio_vae").eval(),
        text_encoder=Gemma4UnifiedForConditionalGeneration.from_pretrained(f / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(f / "tokenizer"),
        connectors=LTX2TextConnectors.from_pretrained(f / "connectors").eval(),
        transformer=diffusers.LTX2VideoTransformer3DModel.from_pretrained(f / "transformer").eval(),
        vocoder=DiffusersBWE.from_pretrained(f / "vocoder").eval(),
    )
    reference.set_progress_bar_config(disable=True)
    sigmas = _reference_sigmas(reference, 3)
    frames, audio = ltx25_pipe(
        CAPTIONS[0], negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, cfg_scale=3.0,
        audio_cfg_scale=5.0, guidance_rescale=0.0, **OFF, **FAST,
    )  # fmt: skip
    expected_frames, expected_audio = reference(
        prompt=CAPTIONS[0], negative_prompt=CAPTIONS[3], height=H, width=W, num_frames=F, frame_rate=24.0,
        num_inference_steps=3, guidance_scale=3.0, audio_guidance_scale=5.0, guidance_rescale=0.0,
        audio_guidance_rescale=0.0, **OFF, generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"], output_type="np", return_dict=False,
    )  # fmt: skip
    _check(frames, audio, expected_frames, expected_audio, "LTX-2.5 diffusers folder")
