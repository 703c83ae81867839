"""The authors' STG and modality-isolation guidance: the DiT's attention-skip hooks (which blocks and rows
they change, and that unused hooks change nothing), the batched guidance passes against separate calls,
the settings, and parity with diffusers' `LTX2Pipeline` (fp32, tiny repo) with each term on."""

from __future__ import annotations

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import numpy as np
import pytest
import torch

from diffsynth.ltx2.dit import AttentionSkip, LTX2DiT, LTX2DiTConfig
from diffsynth.ltx2.pipeline import LTX2Guidance, LTX2Pipeline, ltx2_velocity
from diffsynth.ltx2.presets import PRESETS
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.weights import random_weights

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


# ----------------------------------------------------------------------------------------- DiT hooks
def tiny_dit(layers: int = 3) -> LTX2DiT:
    cfg = LTX2DiTConfig(
        in_channels=4,
        out_channels=4,
        num_heads=2,
        head_dim=8,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_heads=2,
        audio_head_dim=4,
        num_layers=layers,
        caption_channels=16,
    )
    return random_weights(LTX2DiT(cfg), 0, scale=0.2).eval()


def dit_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    args = (
        torch.randn(batch, 2 * 3 * 3, 4, generator=g),  # video tokens, latent grid 2 x 3 x 3
        torch.randn(batch, 7, 4, generator=g),  # audio tokens
        torch.randn(batch, 5, 16, generator=g),
        torch.randn(batch, 5, 16, generator=g),
        1000 * torch.rand(batch, generator=g),
    )
    return args, dict(num_frames=2, height=3, width=3, fps=24.0)


def block_io(dit: LTX2DiT, args, kwargs, **extra):
    """Each block's (inputs, outputs) and the model output of one call."""
    seen = []
    hooks = [
        block.register_forward_hook(lambda m, i, o: seen.append((i, o)), with_kwargs=False)
        for block in dit.transformer_blocks
    ]
    try:
        with torch.no_grad():
            out = dit(*args, **kwargs, **extra)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("kind", ["video_self", "audio_self"])
def test_stg_changes_exactly_the_perturbed_block(kind):
    """Block 1's self-attention skipped: re-running every block, unperturbed, on the inputs it saw gives its
    output again bit for bit, except block 1, whose output is what it gives with that attention as
    `to_out(to_v(x))` (checked on the attention itself)."""
    dit = tiny_dit()
    args, kwargs = dit_inputs()
    seen, out = block_io(dit, args, kwargs, skips=[AttentionSkip(kind, blocks=(1,))])
    _, plain = block_io(dit, args, kwargs)
    with torch.no_grad():
        for i, (block, (inputs, outputs)) in enumerate(zip(dit.transformer_blocks, seen, strict=True)):
            again = block(*inputs[:3])
            same = all(torch.equal(a, b) for a, b in zip(again, outputs, strict=True))
            assert same == (i != 1), i
        stream = 0 if kind == "video_self" else 1
        other = 1 - stream
        assert (out[stream] - plain[stream]).abs().max() > 1e-3
        # the changed block's own stream output differs; the attention outputs its values
        attn = dit.transformer_blocks[1].attn1 if kind == "video_self" else dit.transformer_blocks[1].audio_attn1
        x = torch.randn(2, 6, attn.to_q.in_features)
        torch.testing.assert_close(attn(x, keep=False), attn.to_out[0](attn.to_v(x)), atol=0, rtol=0)
        assert (attn(x) - attn(x, keep=False)).abs().max() > 1e-3
        assert (out[other] - plain[other]).abs().max() > 0  # the streams talk, so the other one moves too


def test_skips_act_on_their_rows_only():
    """Rows a skip names change; the others equal the plain call bit for bit, and a skipped row equals that
    sample skipped alone."""
    dit = tiny_dit()
    args, kwargs = dit_inputs(batch=3)
    skips = [
        AttentionSkip("video_self", (1,), (1,)),
        AttentionSkip("a2v", None, (2,)),
        AttentionSkip("v2a", None, (2,)),
    ]
    with torch.no_grad():
        plain = dit(*args, **kwargs)
        mixed = dit(*args, **kwargs, skips=skips)
        for stream in (0, 1):
            torch.testing.assert_close(mixed[stream][0], plain[stream][0], atol=0, rtol=0)
            assert (mixed[stream][1:] - plain[stream][1:]).abs().amax(dim=(1, 2)).min() > 1e-4
        alone_1 = [AttentionSkip("video_self", (1,), (0,))]
        for row, alone in ((1, alone_1), (2, [AttentionSkip(k, None, (0,)) for k in ("a2v", "v2a")])):
            one = dit(*(a[row : row + 1] for a in args), **kwargs, skips=alone)
            for stream in (0, 1):
                torch.testing.assert_close(mixed[stream][row : row + 1], one[stream], atol=1e-5, rtol=0)


def test_isolated_streams_do_not_read_each_other():
    """Without the audio<->video attentions the video output ignores the audio input and vice versa."""
    dit = tiny_dit()
    args, kwargs = dit_inputs()
    other_audio = (args[0], torch.randn_like(args[1]), *args[2:])
    other_video = (torch.randn_like(args[0]), *args[1:])
    isolate = [AttentionSkip("a2v"), AttentionSkip("v2a")]
    with torch.no_grad():
        base = dit(*args, **kwargs, skips=isolate)
        torch.testing.assert_close(dit(*other_audio, **kwargs, skips=isolate)[0], base[0], atol=0, rtol=0)
        torch.testing.assert_close(dit(*other_video, **kwargs, skips=isolate)[1], base[1], atol=0, rtol=0)
        assert (dit(*other_audio, **kwargs)[0] - dit(*args, **kwargs)[0]).abs().max() > 1e-4  # they do otherwise


def test_unused_hooks_leave_the_output_bit_identical():
    """Skips that name no block or no row, and an empty list, give the plain output exactly."""
    dit = tiny_dit()
    args, kwargs = dit_inputs()
    with torch.no_grad():
        plain = dit(*args, **kwargs)
        for skips in ([], [AttentionSkip("video_self", blocks=())], [AttentionSkip("a2v", samples=())]):
            got = dit(*args, **kwargs, skips=skips)
            assert all(torch.equal(a, b) for a, b in zip(got, plain, strict=True)), skips


def test_gradient_checkpointing_passes_the_skips():
    dit = tiny_dit()
    args, kwargs = dit_inputs()
    skips = [AttentionSkip("video_self", (0,), (1,)), AttentionSkip("v2a", None, (0,))]
    expected = dit(*args, **kwargs, skips=skips)
    dit.gradient_checkpointing = True
    got = dit(*args, **kwargs, skips=skips)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "skip, match",
    [
        (AttentionSkip("text"), "kind in"),
        (AttentionSkip("video_self", blocks=(3,)), r"blocks=\[3\]"),
        (AttentionSkip("a2v", samples=(2,)), r"samples=\[2\]"),
    ],
)
def test_bad_skips_raise_naming_the_field(skip, match):
    dit = tiny_dit()
    args, kwargs = dit_inputs()
    with pytest.raises(ValueError, match=match):
        dit(*args, **kwargs, skips=[skip])


# ----------------------------------------------------------------------------------------- pipeline
def run(pipe, prompt=CAPTIONS[0], **kwargs):
    return pipe(prompt, **{**FAST, "seed": 0, "output_type": "pt", **kwargs})


@pytest.mark.parametrize("use_cfg", [True, False], ids=["cfg", "no-cfg"])
def test_batched_passes_equal_separate_calls(tiny_ltx2_pipe, use_cfg):
    """`predict` runs prompt, negative, perturbed and isolated passes as one batch; the result is the four
    single calls combined by the authors' rule (cond + (cfg-1)(cond-uncond) + stg(cond-ptb) + (mod-1)(cond-iso))."""
    pipe = tiny_ltx2_pipe
    text = pipe.encode_prompt(CAPTIONS[:1], FAST["max_sequence_length"])
    negative = pipe.encode_prompt(CAPTIONS[3:], FAST["max_sequence_length"])
    video, audio = pipe.prepare_latents(1, F, H, W, 24.0, generator=1, rand_device="cpu")
    sigma = torch.tensor(0.6)
    g = LTX2Guidance(1.5, 2.0, 3.0, 2.5, (1,))
    both = text.cat(negative) if use_cfg else text
    with torch.no_grad():
        got = pipe.predict(video, audio, sigma, both, 24.0, use_cfg, 3.0, 6.0, 0.0, guidance=g)
        cond = ltx2_velocity(pipe.dit, video, audio, sigma, text, 24.0)
        uncond = ltx2_velocity(pipe.dit, video, audio, sigma, negative, 24.0)
        stg = [AttentionSkip("video_self", (1,)), AttentionSkip("audio_self", (1,))]
        ptb = ltx2_velocity(pipe.dit, video, audio, sigma, text, 24.0, skips=stg)
        isolate = [AttentionSkip("a2v"), AttentionSkip("v2a")]
        iso = ltx2_velocity(pipe.dit, video, audio, sigma, text, 24.0, skips=isolate)
    for s, (cfg, stg_scale, mod) in enumerate(((3.0, 1.5, 3.0), (6.0, 2.0, 2.5))):
        expected = cond[s] + stg_scale * (cond[s] - ptb[s]) + (mod - 1) * (cond[s] - iso[s])
        if use_cfg:
            expected = expected + (cfg - 1) * (cond[s] - uncond[s])
        # batch 4 and batch 1 take different float32 matmul paths (~7e-6 relative, times the scales)
        torch.testing.assert_close(got[s], expected, atol=2e-4, rtol=0)
        for extra in (ptb, iso):  # each pass changes the prediction
            assert (cond[s] - extra[s]).abs().max() > 1e-3


def test_guidance_settings_and_defaults(tiny_ltx2_pipe, monkeypatch):
    """Without a preset the authors' STG 1 and modality 3 on both streams, block 29 (dropped: the tiny DiT has
    2 blocks); an explicit video scale sets both streams unless the audio one is given; distilled runs
    neither; explicit blocks must exist."""
    seen = []
    real = LTX2Pipeline.predict

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "predict", spy)
    one = dict(num_inference_steps=1)
    run(tiny_ltx2_pipe, **one)
    run(tiny_ltx2_pipe, **one, stg_scale=2.0, modality_scale=1.5, spatio_temporal_guidance_blocks=[1])
    run(tiny_ltx2_pipe, **one, stg_scale=2.0, audio_stg_scale=0.0, audio_modality_scale=1.0)
    run(tiny_ltx2_pipe, use_distilled_pipeline=True, use_two_stage_pipeline=False, num_inference_steps=8)
    assert seen[:3] == [
        LTX2Guidance(1.0, 1.0, 3.0, 3.0, ()),
        LTX2Guidance(2.0, 2.0, 1.5, 1.5, (1,)),
        LTX2Guidance(2.0, 0.0, 3.0, 1.0, ()),
    ]
    assert set(seen[3:]) == {LTX2Guidance(0.0, 0.0, 1.0, 1.0, ())} and len(seen) == 11
    assert not seen[0].stg and seen[0].isolation and not seen[3].isolation
    assert not seen[2].stg  # the default block is past the tiny DiT's depth
    assert [s.kind for s in LTX2Guidance(2.0, 0.0, blocks=(1,)).stg_skips(range(2))] == ["video_self"]
    preset = PRESETS["Lightricks/LTX-2"].defaults
    assert (preset["stg_scale"], preset["audio_stg_scale"], preset["modality_scale"]) == (1.0, 1.0, 3.0)
    assert preset["audio_modality_scale"] == 3.0 and tuple(preset["spatio_temporal_guidance_blocks"]) == (29,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatio_temporal_guidance_blocks=[2]), r"spatio_temporal_guidance_blocks=\[2\].*\[0, 2\)"),
        (dict(spatio_temporal_guidance_blocks=[True]), r"spatio_temporal_guidance_blocks=\[True\]"),
        (dict(stg_scale="1"), r"stg_scale='1'"),
        (dict(audio_modality_scale=None, modality_scale=[3.0]), r"modality_scale=\[3.0\]"),
    ],
)
def test_bad_guidance_settings_are_refused(tiny_ltx2_pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run(tiny_ltx2_pipe, **kwargs)


# ----------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def reference(tiny_ltx2_pipe, tiny_ltx2_base):
    """diffusers' pipeline with a transformer built with `perturbed_attn=True`: without it diffusers' blocks
    ignore the STG blocks (its default config, and the LTX-2.0 one, leave it False)."""
    diffusers = pytest.importorskip("diffusers")
    pipe = repo_module.reference_pipeline(tiny_ltx2_pipe, tiny_ltx2_base)
    dit = diffusers.LTX2VideoTransformer3DModel(**repo_module.diffusers_configs()["dit"], perturbed_attn=True)
    dit.load_state_dict(pipe.transformer.state_dict(), strict=True)
    pipe.register_modules(transformer=dit.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


STG = dict(stg_scale=1.0, audio_stg_scale=1.5)
NO_STG = dict(stg_scale=0.0, audio_stg_scale=0.0)
MODALITY = dict(modality_scale=3.0, audio_modality_scale=2.0)
NO_MODALITY = dict(modality_scale=1.0, audio_modality_scale=1.0)


@pytest.mark.parity
@pytest.mark.parametrize(
    "terms, rescale",
    [
        ({**STG, **NO_MODALITY}, 0.7),
        ({**NO_STG, **MODALITY}, 0.7),
        ({**STG, **MODALITY}, 0.0),
        ({**STG, **MODALITY}, 0.7),
    ],
    ids=["stg", "modality", "both-plain", "both"],
)
def test_matches_diffusers(tiny_ltx2_pipe, reference, terms, rescale):
    """Frames and waveform against diffusers' `LTX2Pipeline` with STG (block 1 of the tiny 2) and / or
    modality guidance on top of CFG: same weights, noise and sigmas (as test_pipeline's parity test).
    diffusers runs each pass alone; ours batches them."""
    steps = 3
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=2.05)
    sigmas = reference.scheduler.sigmas.clone()
    cfg = dict(cfg_scale=3.0, audio_cfg_scale=5.0, guidance_rescale=rescale)
    frames, audio = tiny_ltx2_pipe(
        CAPTIONS[0],
        negative_prompt=CAPTIONS[3],
        seed=3,
        output_type="np",
        sigmas=sigmas,
        spatio_temporal_guidance_blocks=[1],
        **cfg,
        **terms,
        **FAST,
    )
    expected_frames, expected_audio = reference(
        prompt=CAPTIONS[0],
        negative_prompt=CAPTIONS[3],
        height=H,
        width=W,
        num_frames=F,
        frame_rate=24.0,
        num_inference_steps=steps,
        guidance_scale=cfg["cfg_scale"],
        audio_guidance_scale=cfg["audio_cfg_scale"],
        guidance_rescale=rescale,
        audio_guidance_rescale=rescale,
        spatio_temporal_guidance_blocks=[1],
        **terms,
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=FAST["max_sequence_length"],
        output_type="np",
        return_dict=False,
    )
    assert frames.shape == expected_frames.shape == (1, F, H, W, 3)
    inside = ((expected_frames > 0.01) & (expected_frames < 0.99)).mean()
    assert inside > 0.5 and expected_frames.std() > 0.05  # mostly unclamped, not flat: the comparison counts
    assert (expected_audio.abs() < 0.95).float().mean() > 0.9 and expected_audio.std() > 0.01
    frame_diff = np.abs(frames - expected_frames).max()
    audio_diff = (repo_module.decoded_sound(audio.waveform, expected_audio) - expected_audio).abs().max().item()
    plain_frames, plain_audio = tiny_ltx2_pipe(
        CAPTIONS[0],
        negative_prompt=CAPTIONS[3],
        seed=3,
        output_type="np",
        sigmas=sigmas,
        stg_scale=0.0,
        modality_scale=1.0,
        **cfg,
        **FAST,
    )
    print(f"parity {terms} rescale {rescale}: frames max abs {frame_diff:.3g}, audio max abs {audio_diff:.3g}")
    assert frame_diff <= 1e-5 and audio_diff <= 1e-5
    # the terms change the result far beyond the tolerance, so the comparison tests them
    assert np.abs(plain_frames - frames).max() > 1e-3 and (plain_audio.waveform - audio.waveform).abs().max() > 1e-4
