"""LTX-2 image-to-video (first-frame conditioning) on the tiny random repo: parity with diffusers'
`LTX2ImageToVideoPipeline` (fp32, same noise, with and without CFG), the clean first latent frame, the
per-token timesteps the DiT gets, the image arguments and their errors."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.ltx2.pipeline import LTX2Pipeline, fit_image
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor

CAPTIONS = repo_module.CAPTIONS
F, H, W = repo_module.FRAMES, repo_module.HEIGHT, repo_module.WIDTH
FAST = dict(
    height=H,
    width=W,
    num_frames=F,
    num_inference_steps=2,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    image_crf=0,  # the picture as given; `test_h264_recompression_*` cover the default CRF 33
    progress_bar=False,
)
OFF = dict(stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0)  # CFG only
STG_BLOCK = 1  # of the tiny DiT's 2 (the release perturbs block 29 of 48)


def picture(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A smooth random RGB picture (bilinear-upsampled noise), `size` = (width, height)."""
    generator = np.random.default_rng(seed)
    small = generator.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def run(pipe, prompt=CAPTIONS[0], **kwargs):
    settings = {**FAST, "seed": 0, "output_type": "pt", **kwargs}
    return pipe(prompt, **settings)


def final_latents(pipe, monkeypatch, **kwargs) -> torch.Tensor:
    """The video latents `pipe` hands to the VAE decoder at the end of a run."""
    seen = []
    real = type(pipe.vae).decode

    def spy(vae, latents, **decode_kwargs):
        seen.append(latents.clone())
        return real(vae, latents, **decode_kwargs)

    monkeypatch.setattr(type(pipe.vae), "decode", spy)
    run(pipe, **kwargs)
    monkeypatch.undo()
    return seen[-1]


def encoded(pipe, image: Image.Image) -> torch.Tensor:
    """The clean first-frame latent `[1, C, 1, h, w]` of `image` at the video size."""
    with torch.no_grad():
        return pipe.vae.encode(pil_to_tensor(fit_image(image, H, W))[:, :, None]).float()


# ----------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def reference(tiny_ltx2_pipe, tiny_ltx2_base):
    """diffusers' image-to-video pipeline on our weights; its transformer is built with `perturbed_attn=True`
    (else its STG pass is unperturbed; see test_guidance.py)."""
    diffusers = pytest.importorskip("diffusers")
    t2v = repo_module.reference_pipeline(tiny_ltx2_pipe, tiny_ltx2_base)
    dit = diffusers.LTX2VideoTransformer3DModel(**repo_module.diffusers_configs()["dit"], perturbed_attn=True)
    dit.load_state_dict(t2v.transformer.state_dict(), strict=True)
    pipe = diffusers.LTX2ImageToVideoPipeline(
        **{k: getattr(t2v, k) for k in ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer")},
        connectors=t2v.connectors,
        transformer=dit.eval(),
        vocoder=t2v.vocoder,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parity
@pytest.mark.parametrize(
    "guidance",
    [
        dict(cfg_scale=1.0, audio_cfg_scale=1.0, guidance_rescale=0.0),
        dict(cfg_scale=3.0, audio_cfg_scale=5.0, guidance_rescale=0.7),
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
    ids=["no-cfg", "cfg-rescale", "cfg-stg-modality"],
)
def test_matches_diffusers(tiny_ltx2_pipe, reference, guidance):
    """Frames and waveform against diffusers' `LTX2ImageToVideoPipeline` on the same weights, the same
    noise (seed 3 on a CPU generator: video noise first, then audio) and the same sigmas. The picture is
    96x96 for a 64x64 video: same aspect, so our centre crop is a no-op and both resize it bilinearly.
    H.264 re-compression of the picture is off on both sides (`image_crf=0`: diffusers compresses the 96x96
    picture before resizing, we the fitted one; see the CRF test below for pictures of the video's size), and
    `use_cross_timestep=False` is LTX-2.0's audio<->video modulation (every DiT timestep is the token's
    own, as in ltx-core's release and in our DiT); diffusers' default gives the conditioned tokens the
    global timestep in those modulations instead. The STG and modality-isolation passes join the guidance
    batch with the same per-token timesteps."""
    steps = 3
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=2.05)
    sigmas = reference.scheduler.sigmas.clone()
    image = picture(1)
    guidance = {**OFF, **guidance}
    common = dict(negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, **FAST)
    ours = dict(guidance, spatio_temporal_guidance_blocks=[STG_BLOCK])
    frames, audio = tiny_ltx2_pipe(CAPTIONS[0], input_images=[image], **ours, **common)
    expected_frames, expected_audio = reference(
        image=image,
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
        stg_scale=guidance["stg_scale"],
        audio_stg_scale=guidance["audio_stg_scale"],
        modality_scale=guidance["modality_scale"],
        audio_modality_scale=guidance["audio_modality_scale"],
        spatio_temporal_guidance_blocks=[STG_BLOCK],
        use_cross_timestep=False,
        image_crf=0,
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"],
        output_type="np",
        return_dict=False,
    )
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3)
    assert expected_audio.shape == (1, 2, 33 * 240) and audio.waveform.shape == (1, 2, round(F / 24.0 * 24000))
    inside = ((expected_frames > 0.01) & (expected_frames < 0.99)).mean()
    assert inside > 0.5 and expected_frames.std() > 0.05  # mostly unclamped, not flat: the comparison counts
    assert expected_audio.std() > 0.01
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    # the comparison tells conditioning apart: text-to-video from the same noise is far from both
    t2v_frames, _ = tiny_ltx2_pipe(CAPTIONS[0], **ours, **common)
    gap = np.abs(t2v_frames - expected_frames).max()
    print(f"i2v parity {guidance}: frames {frame_diff:.3g}, audio {audio_diff:.3g} (t2v gap {gap:.3g})")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5
    assert gap > 1e-2


@pytest.mark.parity
def test_h264_recompression_matches_diffusers_default(tiny_ltx2_pipe, reference):
    """The authors' default: the first frame goes through H.264 at CRF 33 before encoding (diffusers'
    `image_crf=None` resolves to it for Gemma-3 models). A picture of the video's size, so both compress the
    same pixels; the result differs from the uncompressed run, so the comparison sees the step."""
    steps = 3
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=2.05)
    sigmas = reference.scheduler.sigmas.clone()
    image = picture(4, size=(W, H))
    settings = {**FAST, "image_crf": None}
    common = dict(negative_prompt=CAPTIONS[3], seed=3, output_type="np", sigmas=sigmas, **settings)
    frames, audio = tiny_ltx2_pipe(
        CAPTIONS[0], input_images=[image], **OFF, cfg_scale=1.0, audio_cfg_scale=1.0, **common
    )
    expected_frames, expected_audio = reference(
        image=image,
        prompt=CAPTIONS[0],
        height=H,
        width=W,
        num_frames=F,
        frame_rate=24.0,
        num_inference_steps=steps,
        guidance_scale=1.0,
        audio_guidance_scale=1.0,
        guidance_rescale=0.7,
        audio_guidance_rescale=0.7,
        stg_scale=0.0,
        audio_stg_scale=0.0,
        modality_scale=1.0,
        audio_modality_scale=1.0,
        use_cross_timestep=False,
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"],
        output_type="np",
        return_dict=False,
    )
    assert np.abs(frames - expected_frames).max() <= 1e-5
    assert (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item() <= 1e-5
    uncompressed, _ = tiny_ltx2_pipe(
        CAPTIONS[0], input_images=[image], **OFF, cfg_scale=1.0, audio_cfg_scale=1.0, **{**common, "image_crf": 0}
    )
    assert np.abs(uncompressed - expected_frames).max() > 1e-4


def test_h264_recompression_is_what_gets_encoded(tiny_ltx2_pipe, monkeypatch):
    """With CRF 33 the first latent frame is the encoding of the H.264 round trip of the fitted picture."""
    from diffsynth.runtime.media import h264_frame

    image = picture(5)
    latents = final_latents(tiny_ltx2_pipe, monkeypatch, input_images=[image], image_crf=33)
    with torch.no_grad():
        compressed = h264_frame(fit_image(image, H, W), 33)
        clean = tiny_ltx2_pipe.vae.encode(pil_to_tensor(compressed)[:, :, None]).float()
    torch.testing.assert_close(latents[:, :, :1], clean, atol=0, rtol=0)
    assert (clean - encoded(tiny_ltx2_pipe, image)).abs().max() > 1e-4  # the compression changes the latent


# ----------------------------------------------------------------------------------------- conditioning
def test_first_latent_frame_is_the_encoded_image(tiny_ltx2_pipe, monkeypatch):
    """The latents decoded at the end keep the image's latent exactly as their first frame, whatever the
    seed; the other frames follow the seed, and without the image the first frame is something else."""
    image = picture(2)
    clean = encoded(tiny_ltx2_pipe, image)
    a = final_latents(tiny_ltx2_pipe, monkeypatch, input_images=[image], seed=1, negative_prompt=CAPTIONS[3])
    b = final_latents(tiny_ltx2_pipe, monkeypatch, input_images=[image], seed=2, negative_prompt=CAPTIONS[3])
    plain = final_latents(tiny_ltx2_pipe, monkeypatch, seed=1, negative_prompt=CAPTIONS[3])
    torch.testing.assert_close(a[:, :, :1], clean, atol=0, rtol=0)
    torch.testing.assert_close(b[:, :, :1], clean, atol=0, rtol=0)
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-2  # the rest is generated
    assert (plain[:, :, :1] - clean).abs().max() > 0.1  # dropping the image loses it
    other = encoded(tiny_ltx2_pipe, picture(3))
    assert (other - clean).abs().max() > 1e-2  # the latent depends on the picture


def test_dit_sees_the_first_frame_clean(tiny_ltx2_pipe, monkeypatch):
    """Per-token video timesteps: 0 on the first latent frame's tokens, sigma * 1000 elsewhere, in every
    row of the guidance batch (prompt, negative prompt, modality-isolated pass); the audio keeps the
    step's timestep."""
    calls = []
    dit = tiny_ltx2_pipe.dit
    real = type(dit).forward

    def spy(module, video, audio, vctx, actx, timestep, **kwargs):
        calls.append((torch.as_tensor(timestep).clone(), torch.as_tensor(kwargs["audio_timestep"]).clone()))
        return real(module, video, audio, vctx, actx, timestep, **kwargs)

    monkeypatch.setattr(type(dit), "forward", spy)
    sigmas = [0.9, 0.4]
    run(
        tiny_ltx2_pipe,
        input_image=picture(4),
        negative_prompt=CAPTIONS[3],
        cfg_scale=3.0,
        modality_scale=3.0,
        sigmas=sigmas,
    )
    tokens_per_frame = (H // 32) * (W // 32)
    assert len(calls) == 2
    for (video_t, audio_t), sigma in zip(calls, sigmas, strict=True):
        assert video_t.shape == (3, (F // 8 + 1) * tokens_per_frame)
        assert (video_t[:, :tokens_per_frame] == 0).all()
        torch.testing.assert_close(
            video_t[:, tokens_per_frame:], torch.full_like(video_t[:, tokens_per_frame:], sigma * 1000)
        )
        torch.testing.assert_close(audio_t.flatten(), torch.full((3,), sigma * 1000.0))


def test_image_arguments_agree(tiny_ltx2_pipe, tmp_path):
    """`input_images=[img]` (DiffSynth-Studio), `input_image=img` (ours) and a file path give one video."""
    image = picture(5, size=(64, 64))
    path = tmp_path / "first.png"
    image.save(path)
    a = run(tiny_ltx2_pipe, input_images=[image], num_inference_steps=1)
    b = run(tiny_ltx2_pipe, input_image=str(path), num_inference_steps=1)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1].waveform, b[1].waveform, atol=0, rtol=0)


def test_one_image_per_prompt(tiny_ltx2_pipe, monkeypatch):
    images = [picture(6), picture(7)]
    latents = final_latents(tiny_ltx2_pipe, monkeypatch, prompt=CAPTIONS[:2], input_image=images)
    clean = [encoded(tiny_ltx2_pipe, image) for image in images]
    assert (clean[0] - clean[1]).abs().max() > 1e-2  # a swap would show
    for i in range(2):  # batch 2 and batch 1 take different float32 paths through the encoder (~5e-6)
        torch.testing.assert_close(latents[i : i + 1, :, :1], clean[i], atol=2e-5, rtol=0)


def test_fit_image_crops_the_centre_to_the_aspect_ratio():
    """A 3:1 picture (red | green | blue thirds) fitted to a square keeps only the green middle."""
    stripes = np.zeros((64, 192, 3), dtype=np.uint8)
    stripes[:, :64, 0] = stripes[:, 64:128, 1] = stripes[:, 128:, 2] = 255
    fitted = np.asarray(fit_image(Image.fromarray(stripes), 32, 32))
    assert fitted.shape == (32, 32, 3)
    assert (fitted[..., 1] == 255).all() and (fitted[..., [0, 2]] == 0).all()
    same = picture(8, size=(64, 64))
    assert fit_image(same, 64, 64) is same  # already the video size: untouched


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_images=[picture(0)], input_image=picture(0)), r"not both"),
        (dict(input_images=[picture(0)], input_images_indexes=[9]), r"input_images_indexes=\[9\].*\[0, 8\]"),
        (dict(input_images=[picture(0), picture(1)], input_images_indexes=[0, 0]), r"distinct"),
        (dict(input_images=[picture(0), picture(1)], input_images_indexes=[0]), r"2 images.*1 frame indexes"),
        (dict(input_image=[picture(0)] * 3), r"input_image has 3 images for 1 prompts"),
        (dict(input_image=torch.zeros(3, 64, 64)), r"file path or a PIL.Image, got Tensor"),
        (dict(input_image="/no/such/picture.png"), r"picture.png does not exist"),
    ],
    ids=["both", "index", "repeated", "two-images", "count", "tensor", "missing-file"],
)
def test_bad_images_are_refused(tiny_ltx2_pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run(tiny_ltx2_pipe, **kwargs)


def test_text_to_video_is_unchanged_by_the_new_arguments(tiny_ltx2_pipe, monkeypatch):
    """Without an image nothing is masked: `predict` gets no mask and the schedule steps every frame."""
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("denoise_mask"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    run(tiny_ltx2_pipe, num_inference_steps=1)
    run(tiny_ltx2_pipe, num_inference_steps=1, input_image=picture(9))
    assert seen[0] is None and seen[1].shape == (1, 1, F // 8 + 1, H // 32, W // 32)
    assert seen[1][:, :, 0].eq(0).all() and seen[1][:, :, 1:].eq(1).all()


def test_vram_managed_pipeline_encodes_the_image_too(tiny_ltx2_base, tiny_ltx2_pipe):
    """Under the VRAM manager with every unit streamed the image stage activates the VAE itself."""
    managed = repo_module.our_pipeline(tiny_ltx2_base, vram_limit=0)
    got = run(managed, input_image=picture(10), num_inference_steps=1)
    expected = run(tiny_ltx2_pipe, input_image=picture(10), num_inference_steps=1)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1].waveform, expected[1].waveform, atol=0, rtol=0)
