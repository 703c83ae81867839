"""HDR IC-LoRA video-to-video (`hdr.py`): LogC3 and the reflect-pad fitting against diffusers'
`LTX2VideoHDRProcessor`, one stage against diffusers' `LTX2HDRPipeline`, the decode's invariants, the embeddings
and the outputs (EXR frames, mp4 preview), the two-stage call and the preset.

The tiny LTX-2.3 models here have their audio->video attentions' output projections at zero: diffusers runs the
audio stream on noise beside the video (its transformer needs audio inputs), the authors and we leave it out; with
those projections at zero the video cannot see the audio, so both compute the same video."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.ltx2 import hdr
from diffsynth.ltx2.hdr import LTX2HDRPipeline, fit_reflect_pad, load_prompt_embeddings, logc3_decode, logc3_encode
from diffsynth.ltx2.presets import HDR_LORA, HDR_REPO, PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import load_video, save_video

DISTILLED_FILE, UPSAMPLER_FILE = "ltx-2.3-22b-distilled-1.1.safetensors", "ltx-2.3-spatial-upscaler-x2-1.1.safetensors"
F = 17  # 3 latent frames


def sdr_video(seed: int, size: tuple[int, int], frames: int = F) -> list[Image.Image]:
    """Smooth random frames of `size` (width, height), slowly changing."""
    rng = np.random.default_rng(seed)
    start, end = rng.integers(0, 256, size=(2, 4, 4, 3))
    return [
        Image.fromarray(((1 - k / frames) * start + k / frames * end).astype(np.uint8)).resize(size, Image.BILINEAR)
        for k in range(frames)
    ]


def embeddings(dit_config, seed: int = 5, tokens: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "video_context": torch.randn(1, tokens, dit_config.dim, generator=generator),
        "audio_context": torch.randn(1, tokens, dit_config.audio_dim, generator=generator),
    }


@pytest.fixture(scope="module")
def hdr_base(tmp_path_factory):
    """A model base with a tiny LTX-2.3 single file under the distilled file's name (no Gemma) and the x2
    upsampler, as `Lightricks/LTX-2.3` holds them."""
    base = tmp_path_factory.mktemp("tiny-hdr-models")
    models = repo_module.tiny_models(0, "2.3")
    with torch.no_grad():
        for block in models["dit"].transformer_blocks:
            block.audio_to_video_attn.to_out[0].weight.zero_()
            block.audio_to_video_attn.to_out[0].bias.zero_()
    folder = base / repo_module.LTX23_REPO
    folder.mkdir(parents=True)
    save_file(repo_module.single_file_state(models), str(folder / DISTILLED_FILE))
    save_file(repo_module.tiny_upsampler(**repo_module.UPSAMPLER_23).state_dict(), str(folder / UPSAMPLER_FILE))
    return base


@pytest.fixture(scope="module")
def hdr_pipe(hdr_base):
    folder = hdr_base / repo_module.LTX23_REPO
    configs = [ModelConfig(path=str(folder / DISTILLED_FILE)), ModelConfig(path=str(folder / UPSAMPLER_FILE))]
    return LTX2HDRPipeline.from_pretrained(configs, device="cpu", torch_dtype=torch.float32)


# ----------------------------------------------------------------------------------------- diffusers parity
@pytest.mark.parity
def test_logc3_and_reflect_pad_match_diffusers_processor():
    """LogC3 decoding, the reflect-pad fitting (shrinking, padding by reflection or, when the pad is not smaller
    than the picture, by repetition) and the reference preprocessing of PIL frames equal
    `LTX2VideoHDRProcessor`'s; diffusers does not clamp the linear light at 0, we do (as the authors)."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.image_processor import LTX2VideoHDRProcessor

    processor = LTX2VideoHDRProcessor()
    codes = torch.linspace(-0.1, 1.1, 4001)
    expected = LTX2VideoHDRProcessor._logc3_decompress(codes)
    decode_diff = (logc3_decode(codes) - expected.clamp(min=0)).abs().max().item()
    assert decode_diff == 0.0 and expected.min() < 0  # only the clamp differs
    decoded = torch.rand(1, 3, 2, 4, 5) * 2 - 1
    post = processor.postprocess_hdr_video(decoded, output_type="pt")  # [B, F, H, W, C]
    torch.testing.assert_close(logc3_decode((decoded + 1) / 2).permute(0, 2, 3, 4, 1), post.clamp(min=0))

    generator = torch.Generator().manual_seed(0)
    pad_diff = 0.0
    for source, target in [((48, 64), (64, 64)), ((96, 128), (64, 64)), ((30, 20), (64, 40)), ((64, 96), (32, 32))]:
        video = torch.rand(1, 3, 2, *source, generator=generator) * 2 - 1
        got, want = fit_reflect_pad(video, *target), processor._resize_and_reflect_pad_video(video, *target)
        assert got.shape == want.shape == (1, 3, 2, *target)
        pad_diff = max(pad_diff, (got - want).abs().max().item())
    frames = sdr_video(1, (128, 96), frames=9)  # a multiple of 32 wide and high: diffusers would round otherwise
    want = processor.preprocess_reference_video_hdr(frames, 64, 64)
    got = hdr.reference_pixels(frames, 9, 8, 64, 64)
    preprocess_diff = (got - want).abs().max().item()
    print(f"HDR processor parity: decode {decode_diff:.3g}, reflect pad {pad_diff:.3g}, frames {preprocess_diff:.3g}")
    assert pad_diff <= 1e-6 and preprocess_diff <= 1e-5


def diffusers_hdr_pipeline(diffusers, pipe):
    """diffusers' `LTX2HDRPipeline` on our tiny models' weights (no text encoder), constant-shift Euler steps."""
    models = repo_module.diffusers_models(pipe, "2.3")
    reference = diffusers.LTX2HDRPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0),
        vae=models["vae"], audio_vae=models["audio_vae"], text_encoder=None, tokenizer=None,
        connectors=models["connectors"], transformer=models["dit"], vocoder=models["vocoder"],
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parity
def test_one_stage_matches_diffusers_hdr_pipeline(hdr_pipe):
    """diffusers' `LTX2HDRPipeline` (one call: one stage) and ours with `use_two_stage_pipeline=False`: same
    weights, embeddings, seed and the distilled sigmas; a 128x96 reference shrunk and reflect-padded to 64x64; both
    draw the noise over the video's and the reference's tokens. Linear HDR frames compared (diffusers' clamped at
    0, as ours)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.pipeline_ltx2_hdr_lora import LTX2HDRReferenceCondition

    reference = diffusers_hdr_pipeline(diffusers, hdr_pipe)
    context = embeddings(hdr_pipe.dit.config)
    video = sdr_video(4, (128, 96))
    expected, _ = reference(
        reference_conditions=[LTX2HDRReferenceCondition(frames=video)], connector_video_embeds=context["video_context"],
        connector_audio_embeds=context["audio_context"], height=64, width=64, num_frames=F, frame_rate=24.0,
        num_inference_steps=8, sigmas=list(hdr.STAGE_1_SIGMAS[:-1]), guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3), output_type="pt", return_dict=False,
    )  # fmt: skip
    common = dict(height=64, width=64, num_frames=F, frame_rate=24.0, use_two_stage_pipeline=False)
    got = hdr_pipe(video, prompt_embeddings=context, seed=3, output_type="np", progress_bar=False, **common)
    other = hdr_pipe(sdr_video(9, (128, 96)), prompt_embeddings=context, seed=3, output_type="np", **common)
    expected = expected.clamp(min=0).numpy()
    assert got.shape == expected.shape == (1, F, 64, 64, 3) and expected.std() > 0.05
    diff, gap = np.abs(got - expected).max(), np.abs(other - expected).max()
    relative = (np.abs(got - expected) / (1.0 + expected)).max()
    codes = (logc3_encode(torch.from_numpy(got)) - logc3_encode(torch.from_numpy(expected))).abs().max().item()
    print(
        f"HDR one-stage parity: linear max abs diff {diff:.3g} (values up to {expected.max():.3g}; relative "
        f"{relative:.3g}), LogC3 codes {codes:.3g}; another reference: {gap:.3g}"
    )
    assert codes <= 2e-6 and relative <= 2e-5 and gap > 1e-2  # the reference is seen


@pytest.mark.parity
def test_two_stages_match_diffusers_recipe(hdr_pipe):
    """Our default two stages against diffusers' documented two-call recipe: `LTX2HDRPipeline` at half size to
    latents, `LTX2LatentUpsamplePipeline`, then `LTX2HDRPipeline` again at full size from the upsampled latents
    with the authors' 2 stage-2 sigmas, noised to 0.909375 by a fresh generator of the same seed (the authors'
    stage-2 tile 0); the reference at each stage's size."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
    from diffusers.pipelines.ltx2.pipeline_ltx2_hdr_lora import LTX2HDRReferenceCondition

    reference = diffusers_hdr_pipeline(diffusers, hdr_pipe)
    upsampler = LTX2LatentUpsamplerModel(
        in_channels=repo_module.UPSAMPLER_23["in_channels"], mid_channels=32, num_blocks_per_stage=1,
        use_rational_resampler=False,
    ).eval()  # fmt: skip
    upsampler.load_state_dict(hdr_pipe.upsampler.state_dict(), strict=True)
    context, video = embeddings(hdr_pipe.dit.config), sdr_video(4, (128, 96))
    common = dict(
        reference_conditions=[LTX2HDRReferenceCondition(frames=video)], connector_video_embeds=context["video_context"],
        connector_audio_embeds=context["audio_context"], num_frames=F, frame_rate=24.0, guidance_scale=1.0,
        return_dict=False,
    )  # fmt: skip
    latents, _ = reference(
        height=64, width=64, num_inference_steps=8, sigmas=list(hdr.STAGE_1_SIGMAS[:-1]),
        generator=torch.Generator().manual_seed(3), output_type="latent", **common,
    )  # fmt: skip
    upscaled = diffusers.LTX2LatentUpsamplePipeline(vae=reference.vae, latent_upsampler=upsampler)(
        latents=latents, output_type="latent", return_dict=False
    )[0]
    expected, _ = reference(
        latents=upscaled, height=128, width=128, num_inference_steps=2, sigmas=list(hdr.STAGE_2_SIGMAS[:-1]),
        noise_scale=hdr.STAGE_2_SIGMAS[0], generator=torch.Generator().manual_seed(3), output_type="pt", **common,
    )  # fmt: skip
    got = hdr_pipe(video, prompt_embeddings=context, height=128, width=128, num_frames=F, frame_rate=24.0, seed=3)
    expected = expected.clamp(min=0).permute(0, 4, 1, 2, 3)
    assert got.shape == expected.shape == (1, 3, F, 128, 128) and expected.std() > 0.05
    codes = (logc3_encode(got) - logc3_encode(expected)).abs().max().item()
    relative = ((got - expected).abs() / (1.0 + expected)).max().item()
    print(f"HDR two-stage parity: linear max abs diff {(got - expected).abs().max():.3g}, LogC3 codes {codes:.3g}")
    assert codes <= 2e-6 and relative <= 2e-5


# ----------------------------------------------------------------------------------------- LogC3 and fitting
def test_logc3_decode_is_monotonic_and_inverts_encode():
    codes = torch.linspace(0, 1, 20001, dtype=torch.float64)
    linear = logc3_decode(codes)
    assert torch.all(linear[1:] >= linear[:-1]) and torch.all(linear >= 0)
    above = codes >= logc3_encode(torch.zeros(1)).item()
    assert torch.all(linear[above][1:] > linear[above][:-1])  # strictly increasing where it is an inverse
    torch.testing.assert_close(logc3_encode(linear[above]).double(), codes[above], atol=2e-6, rtol=0)
    x = torch.cat([torch.linspace(0, 1, 1001), torch.linspace(1, 55, 541)])
    torch.testing.assert_close(logc3_decode(logc3_encode(x)), x, atol=1e-5, rtol=2e-5)
    cut = torch.tensor([hdr.LOGC3_CUT - 1e-7, hdr.LOGC3_CUT + 1e-7])
    assert abs(logc3_encode(cut)[1] - logc3_encode(cut)[0]) < 1e-5  # the two pieces meet at the cut
    assert 55.0 < logc3_decode(torch.ones(1)).item() < 55.2  # the brightest code
    assert logc3_decode(torch.tensor([-1.0, 0.0, 2.0])).tolist() == pytest.approx([0.0, 0.0, 55.08], abs=0.01)


def test_fit_reflect_pad_keeps_the_picture_and_mirrors_the_edges():
    video = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(1, 2, 3, 4, 6)  # [B, C, F, H, W]
    padded = fit_reflect_pad(video, 6, 8)  # larger target: no resize, pad 2 rows and 2 columns
    assert padded.shape == (1, 2, 3, 6, 8)
    assert torch.equal(padded[..., :4, :6], video)
    assert torch.equal(padded[..., 4, :6], video[..., 2, :]) and torch.equal(padded[..., 5, :6], video[..., 1, :])
    assert torch.equal(padded[..., :4, 6], video[..., :, 4])
    shrunk = fit_reflect_pad(torch.rand(1, 3, 1, 96, 128), 64, 64)  # shrunk to 48 x 64, 16 rows mirrored
    assert shrunk.shape == (1, 3, 1, 64, 64) and torch.equal(shrunk[..., 48, :], shrunk[..., 46, :])
    repeated = fit_reflect_pad(torch.rand(1, 3, 1, 2, 4), 6, 4)  # pad 4 >= 2 rows: the edge repeated
    assert torch.equal(repeated[..., 5, :], repeated[..., 1, :])
    assert hdr.aligned_size(1080, 1920) == (1088, 1920) and hdr.aligned_size(48, 80, 32) == (64, 96)
    with pytest.raises(ConfigError, match="too small"):
        hdr.aligned_size(20, 20, 16)


def test_reference_frames_are_cut_to_the_vae_grid_and_doubled():
    frames = sdr_video(2, (48, 32), frames=12)
    assert hdr.reference_pixels(frames, 11, 8, 32, 32).shape == (1, 3, 9, 32, 32)  # 11 -> 9 (8k + 1)
    doubled = hdr.reference_pixels(frames, 17, 8, 32, 32, doubled=True)  # 9 frames shown twice, cut to 17
    assert doubled.shape == (1, 3, 17, 32, 32) and torch.equal(doubled[:, :, 0], doubled[:, :, 1])
    single = hdr.reference_pixels(frames, 9, 8, 32, 32)
    assert torch.equal(doubled[:, :, 16], single[:, :, 8])
    whole = torch.from_numpy(np.stack([np.asarray(f) for f in frames[:9]])).permute(3, 0, 1, 2)[None]
    torch.testing.assert_close(single, fit_reflect_pad(whole.float() / 127.5 - 1, 32, 32))  # frame by frame


def test_float32_weights_casts_for_the_decode_and_restores():
    """The float32 decode casts only non-float32 tensors and gives each its own storage back afterwards."""
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    module.register_buffer("statistics", torch.ones(2))
    pointers = {name: t.data_ptr() for name, t in [*module.named_parameters(), *module.named_buffers()]}
    with hdr.float32_weights(module):
        assert {t.dtype for t in [*module.parameters(), *module.buffers()]} == {torch.float32}
        assert module(torch.ones(1, 3)).dtype == torch.float32
    assert module.weight.dtype == module.bias.dtype == torch.bfloat16 and module.statistics.dtype == torch.float32
    assert {name: t.data_ptr() for name, t in [*module.named_parameters(), *module.named_buffers()]} == pointers


# ----------------------------------------------------------------------------------------- embeddings
def test_prompt_embeddings_from_a_file_or_a_dict(hdr_pipe, tmp_path):
    config = hdr_pipe.dit.config
    context = embeddings(config)
    path = tmp_path / "hdr_scene_emb.safetensors"
    save_file({"video_context": context["video_context"][0], "audio_context": context["audio_context"]}, str(path))
    for source in (path, str(path), context, ModelConfig(path=str(path))):
        text = load_prompt_embeddings(source, config)
        assert text.video.shape == (1, 7, config.dim) and text.audio.shape == (1, 7, config.audio_dim)
        assert text.mask is None and torch.equal(text.video, context["video_context"])

    save_file({"video_context": context["video_context"]}, str(tmp_path / "only-video.safetensors"))
    with pytest.raises(ConfigError, match=r"only-video.safetensors has no 'audio_context' tensor.*video_context"):
        load_prompt_embeddings(tmp_path / "only-video.safetensors", config)
    with pytest.raises(ConfigError, match=r"prompt_embeddings: 'video_context' must be a tensor \[tokens, width\]"):
        load_prompt_embeddings({**context, "video_context": torch.zeros(2, 7, config.dim)}, config)
    with pytest.raises(ConfigError, match=r"'audio_context' is 8 wide but the loaded DiT reads 64"):
        load_prompt_embeddings({**context, "audio_context": torch.zeros(7, 8)}, config)
    with pytest.raises(ConfigError, match="missing.safetensors is not a file"):
        load_prompt_embeddings(tmp_path / "missing.safetensors", config)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="broken.safetensors is not a readable .safetensors file"):
        load_prompt_embeddings(tmp_path / "broken.safetensors", config)
    with pytest.raises(ConfigError, match="a .safetensors path or a dict of tensors"):
        load_prompt_embeddings(42, config)


def test_call_errors_name_the_argument(hdr_pipe):
    video, context = sdr_video(1, (64, 64), frames=9), embeddings(hdr_pipe.dit.config)
    with pytest.raises(ConfigError, match="reference_video is required"):
        hdr_pipe(None, prompt_embeddings=context)
    with pytest.raises(ConfigError, match="prompt_embeddings is required"):
        hdr_pipe(video)
    with pytest.raises(ConfigError, match="output_type='pil' is not accepted for HDR frames"):
        hdr_pipe(video, prompt_embeddings=context, output_type="pil")
    with pytest.raises(ConfigError, match="reference_video must be a video file or a non-empty list"):
        hdr_pipe([], prompt_embeddings=context)
    with pytest.raises(ConfigError, match="reference_video: missing.mp4 is not a file"):
        hdr_pipe("missing.mp4", prompt_embeddings=context)
    with pytest.raises(ConfigError, match="reference_downscale_factor=4: 64x64 / 4 must be a multiple of 32"):
        hdr_pipe(video, prompt_embeddings=context, reference_downscale_factor=4, use_two_stage_pipeline=False)


# ----------------------------------------------------------------------------------------- the pipeline
def spy_dit(pipe, monkeypatch) -> list:
    seen = []
    real = type(pipe.dit).forward

    def spy(self, video, audio, video_text, audio_text, timestep, **kwargs):
        seen.append((video.shape[1], audio.shape[1], timestep.clone()))
        return real(self, video, audio, video_text, audio_text, timestep, **kwargs)

    monkeypatch.setattr(type(pipe.dit), "forward", spy)
    return seen


def test_two_stage_call_gives_linear_hdr_frames(hdr_pipe, tmp_path, monkeypatch):
    """A 80x48 mp4 reference: generated at 128x64 (stage 1 at 64x32 with the reference shrunk and padded, 8 steps;
    stage 2 at 128x64, 2 steps), cropped back to 80x48, at the file's frame rate; video tokens only (no audio), the
    reference's clean. The frames are float, >= 0 and above 1 somewhere (the decoded range is LogC3's)."""
    path = tmp_path / "sdr.mp4"
    save_video(sdr_video(3, (80, 48), frames=12), path, fps=25)
    seen = spy_dit(hdr_pipe, monkeypatch)
    frames = hdr_pipe(str(path), prompt_embeddings=embeddings(hdr_pipe.dit.config), seed=0, progress_bar=False)
    assert frames.shape == (1, 3, 9, 48, 80) and frames.dtype == torch.float32  # 12 frames -> 9 (8k + 1)
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() > 1
    stage_1, stage_2 = 2 * 1 * 2, 2 * 2 * 4  # latent frames x rows x columns
    assert [s[0] for s in seen] == [2 * stage_1] * 8 + [2 * stage_2] * 2 and all(s[1] == 0 for s in seen)
    assert all(torch.all(t[:, n // 2 :] == 0) and torch.all(t[:, : n // 2] > 0) for n, _, t in seen)
    again = hdr_pipe(str(path), prompt_embeddings=embeddings(hdr_pipe.dit.config), seed=0, output_type="np")
    np.testing.assert_array_equal(again, frames.permute(0, 2, 3, 4, 1).numpy())


def test_high_quality_doubles_the_generated_frames(hdr_pipe, monkeypatch):
    """`high_quality`: 2N - 1 frames generated from the doubled reference, every other one returned."""
    seen = spy_dit(hdr_pipe, monkeypatch)
    video, context = sdr_video(6, (64, 64), frames=9), embeddings(hdr_pipe.dit.config)
    frames = hdr_pipe(video, prompt_embeddings=context, seed=1, high_quality=True, use_two_stage_pipeline=False)
    assert frames.shape == (1, 3, 9, 64, 64) and frames.min() >= 0
    assert seen[0][0] == 2 * (3 * 2 * 2)  # 17 frames: 3 latent frames, for the video and the reference


# ----------------------------------------------------------------------------------------- outputs
def test_exr_frames_and_preview(tmp_path):
    """EXR frames decode (FFmpeg's EXR decoder) to the frames at half precision; the mp4 preview is the clipped,
    sRGB-encoded picture."""
    import av

    rng = np.random.default_rng(0)
    linear = torch.from_numpy(rng.uniform(0, 40, size=(1, 3, 2, 6, 10)).astype(np.float32))
    paths = hdr.save_exr_frames(linear, tmp_path / "exr")
    assert [p.name for p in paths] == ["frame_00000.exr", "frame_00001.exr"]
    with av.open(str(paths[1])) as container:
        frame = next(container.decode(video=0))
    assert frame.format.name == "gbrpf16le"
    g, b, r = (np.frombuffer(bytes(p), np.float16).reshape(6, -1)[:, :10] for p in frame.planes)
    want = linear[0, :, 1].numpy().astype(np.float16)
    np.testing.assert_array_equal(np.stack([r, g, b]), want)

    assert hdr.tone_map(np.array([0.0, 0.0031308, 1.0, 7.0])) == pytest.approx([0.0, 0.04045, 1.0, 1.0], abs=1e-5)
    ramp = torch.linspace(0, 50, 101)
    mapped = hdr.tone_map(ramp, exposure=-1.0, method="reinhard")
    assert torch.all(mapped[1:] > mapped[:-1]) and mapped.max() < 1
    np.testing.assert_allclose(hdr.tone_map(ramp.numpy(), 1.0), hdr.tone_map(ramp, 1.0).numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="method='aces'"):
        hdr.tone_map(ramp, method="aces")
    flat = torch.full((1, 3, 3, 16, 16), 0.2)
    hdr.save_hdr_preview(flat, tmp_path / "preview.mp4", fps=24)
    frames = load_video(tmp_path / "preview.mp4")
    assert len(frames) == 3 and abs(np.asarray(frames[0]).mean() - 255 * hdr.tone_map(0.2)) < 3
    with pytest.raises(ConfigError, match="HDR frames must be"):
        hdr.save_exr_frames(torch.zeros(2, 3, 4), tmp_path / "bad")


# ----------------------------------------------------------------------------------------- preset and LoRA
def test_hdr_preset_is_one_call(hdr_base, hdr_pipe, tmp_path, monkeypatch):
    """`LTX2HDRPipeline.from_pretrained("Lightricks/LTX-2.3:hdr")`, offline from a model base: the distilled file
    and the upsampler (no Gemma), the HDR IC-LoRA fetched and fused, the embeddings found at the call; the same
    frames as the path-built pipeline given the same LoRA and embeddings."""
    preset = PRESETS["Lightricks/LTX-2.3:hdr"]
    assert [f.origin_file_pattern for f in preset.files] == [DISTILLED_FILE, UPSAMPLER_FILE]
    assert preset.tokenizer is None
    repo = hdr_base / HDR_REPO
    repo.mkdir(parents=True, exist_ok=True)
    lora = repo_module.lora_state(hdr_pipe.dit, seed=12)
    save_file(lora, str(repo / HDR_LORA), metadata={"hdr_transform": "logc3"})
    context = embeddings(hdr_pipe.dit.config)
    save_file(context, str(repo / "hdr_scene_emb.safetensors"))
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(hdr_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = LTX2HDRPipeline.from_pretrained("Lightricks/LTX-2.3:hdr", device="cpu", torch_dtype=torch.float32)
    assert pipe.text_encoder is None and pipe.fused_loras and "hdr_lora" not in pipe.defaults
    video = sdr_video(7, (64, 64), frames=9)
    got = pipe(video, seed=2, progress_bar=False)
    folder = hdr_base / repo_module.LTX23_REPO
    configs = [ModelConfig(path=str(folder / DISTILLED_FILE)), ModelConfig(path=str(folder / UPSAMPLER_FILE))]
    by_path = LTX2HDRPipeline.from_pretrained(configs, device="cpu", torch_dtype=torch.float32)
    without = by_path(video, prompt_embeddings=context, seed=2)
    by_path.load_lora(str(repo / HDR_LORA))
    expected = by_path.generate_hdr(video, prompt_embeddings=str(repo / "hdr_scene_emb.safetensors"), seed=2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (without - expected).abs().max() > 1e-3  # the LoRA is applied

    acescct = tmp_path / "acescct.safetensors"
    save_file(lora, str(acescct), metadata={"hdr_transform": "acescct"})
    with pytest.raises(ConfigError, match="only LogC3"):
        by_path.load_lora(str(acescct))

    # the CLI: the preset names its pipeline class; EXR frames beside the tone-mapped preview, at the source's rate
    from diffsynth.runtime.cli import main
    from diffsynth.runtime.media import save_video, video_frame_rate

    save_video(video, tmp_path / "sdr.mp4", fps=12, lossless=True)
    args = ["generate", "--model", "Lightricks/LTX-2.3:hdr", "--input-video", str(tmp_path / "sdr.mp4")]
    args += ["--device", "cpu", "--dtype", "float32", "--seed", "2"]
    assert main([*args, "--output", str(tmp_path / "hdr.mp4")]) == 0
    assert len(list((tmp_path / "hdr_exr").glob("frame_*.exr"))) == 9
    assert video_frame_rate(tmp_path / "hdr.mp4") == 12
    assert main([*args, "--output", str(tmp_path / "hdr.png")]) == 2  # the preview is an mp4


def test_the_hdr_preset_names_its_pipeline_class():
    """The `:hdr` preset has no text encoder: `LTX2Pipeline` refuses it early, naming `LTX2HDRPipeline`."""
    from diffsynth.ltx2.pipeline import LTX2Pipeline

    with pytest.raises(ConfigError, match="load it with diffsynth.ltx2.LTX2HDRPipeline"):
        LTX2Pipeline.from_pretrained("Lightricks/LTX-2.3:hdr", torch_dtype="float32", device="cpu")
