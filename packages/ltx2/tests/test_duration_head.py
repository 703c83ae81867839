"""LTX-2.5's duration head (`duration_head.py`): module parity with diffusers' `LTX2DurationHead`, the full-size
key set, the authors' file, the frame count rule, and `num_frames` left out in the pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from diffsynth_ltx2_test_repo import CAPTIONS, write_tiny_25_folder
from safetensors.torch import save_file

from diffsynth.ltx2.duration_head import LTX2DurationHead, LTX2DurationHeadConfig, num_frames_from_seconds
from diffsynth.ltx2.duration_head_formats import LTX2_DURATION_HEAD_SPEC, diffusers_to_ours, ours_to_diffusers
from diffsynth.ltx2.pipeline import LTX2Pipeline
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_models

TINY = LTX2DurationHeadConfig(video_dim=24, audio_dim=12, hidden_dim=16, num_queries=2, num_heads=4, mlp_dim=8)


def random_head(config: LTX2DurationHeadConfig = TINY, seed: int = 0) -> LTX2DurationHead:
    head = LTX2DurationHead(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return head


def pinned(head: LTX2DurationHead, seconds: float) -> LTX2DurationHead:
    """The head made to predict `seconds` for any prompt (its last layer a constant)."""
    with torch.no_grad():
        head.mlp_out.weight.zero_()
        head.mlp_out.bias.fill_(math.log(seconds))
    return head


@pytest.mark.parity
def test_matches_diffusers_duration_head():
    """Seconds from the video stream, the audio stream and both, against diffusers' head with the same weights."""
    from diffusers.pipelines.ltx2.duration_head import LTX2DurationHead as Reference

    reference = Reference(
        video_cross_attention_dim=TINY.video_dim, audio_cross_attention_dim=TINY.audio_dim,
        pooler_hidden_dim=TINY.hidden_dim, num_queries=TINY.num_queries, num_pooler_heads=TINY.num_heads,
        mlp_hidden_dim=TINY.mlp_dim,
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    ours = LTX2DurationHead(TINY).eval()
    ours.load_state_dict(diffusers_to_ours(reference.state_dict()), strict=True)
    assert set(ours_to_diffusers(ours.state_dict())) == set(reference.state_dict())
    video, audio = (
        torch.randn(2, 7, TINY.video_dim, generator=generator),
        torch.randn(2, 5, TINY.audio_dim, generator=generator),
    )
    for got, want in (
        (ours(video, audio), reference(video, audio)),
        (ours(video=video), reference(video_tokens=video)),
        (ours(audio=audio), reference(audio_tokens=audio)),
    ):
        assert (
            got.shape == (2,) and (got - want).abs().max() < 1e-6 * want.abs().max() and (got - got[0]).abs().max() > 0
        )


@pytest.mark.parity
def test_frame_counts_equal_diffusers():
    """`num_frames_from_seconds` against diffusers' `predict_num_frames` on a head pinned to each duration."""
    from diffusers.pipelines.ltx2.duration_head import LTX2DurationHead as Reference

    reference = Reference(
        video_cross_attention_dim=8, audio_cross_attention_dim=8, pooler_hidden_dim=8, mlp_hidden_dim=8
    )
    tokens = torch.randn(1, 3, 8)
    for seconds in (0.2, 0.9, 1.0, 1.3, 2.71, 4.99, 5.0, 7.123, 19.99, 20.0, 33.0):
        for fps in (24.0, 25.0, 30.0, 60.0):
            for low, high in ((1.0, 20.0), (2.0, 8.0)):
                with torch.no_grad():
                    reference.mlp_out.weight.zero_()
                    reference.mlp_out.bias.fill_(math.log(seconds))
                want = reference.predict_num_frames(
                    tokens, frame_rate=fps, temporal_compression_ratio=8, min_seconds=low, max_seconds=high
                )
                assert num_frames_from_seconds(seconds, fps, low, high) == want, (seconds, fps, low, high)


def test_frame_count_rule():
    """On the 8k + 1 grid, within the bounds, the largest such count not above the clamped frames."""
    for seconds in (0.1, 1.0, 2.5, 5.04, 12.0, 40.0):
        frames = num_frames_from_seconds(seconds, 24.0, 1.0, 20.0)
        clamped = max(24, min(round(seconds * 24), 480))
        assert (frames - 1) % 8 == 0 and 24 <= frames <= 480
        assert frames <= clamped < frames + 8 or frames == 25  # 24 frames floors to 17, under the minimum: 25
    with pytest.raises(ConfigError, match="min_seconds"):
        num_frames_from_seconds(3.0, 24.0, 5.0, 2.0)


@pytest.mark.parity
def test_released_head_has_diffusers_keys_and_shapes():
    from diffusers.pipelines.ltx2.duration_head import LTX2DurationHead as Reference

    with torch.device("meta"):
        ours, reference = LTX2DurationHead(), Reference()
    converted = ours_to_diffusers(ours.state_dict())
    want = reference.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in want.items()}


def test_authors_file_loads_strictly(tmp_path):
    """`duration_head.*` keys (ltx-core's names) load into the head, the config from the shapes; a wrong shape is
    named."""
    head = random_head()
    path = tmp_path / "ltx-2.5-duration-head-bf16.safetensors"
    save_file({f"duration_head.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(path))
    (loaded,) = load_models([str(path)], torch_dtype=torch.float32, device="cpu")
    assert loaded.spec == LTX2_DURATION_HEAD_SPEC.name and loaded.module.config == TINY
    video = torch.randn(1, 4, TINY.video_dim)
    torch.testing.assert_close(loaded.module(video), head(video), atol=0, rtol=1e-6)
    broken = {f"duration_head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    broken["duration_head.mlp_hidden.weight"] = torch.zeros(TINY.mlp_dim, 3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(Exception, match="mlp_hidden"):
        load_models([str(tmp_path / "broken.safetensors")], torch_dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="video tokens"):
        head(torch.randn(1, 4, 5))


@pytest.fixture(scope="module")
def ltx25_with_head(tmp_path_factory):
    folder = write_tiny_25_folder(tmp_path_factory.mktemp("tiny-duration") / "Lightricks/LTX-2.5-Diffusers")
    pipe = LTX2Pipeline.from_pretrained(str(folder), device="cpu", torch_dtype=torch.float32)
    text = pipe.encode_prompt([CAPTIONS[0]], 16)
    config = LTX2DurationHeadConfig(video_dim=text.video.shape[-1], audio_dim=text.audio.shape[-1], hidden_dim=16)
    head = pinned(random_head(config), 0.9)  # 0.9 s at 24 fps: 22 frames, clamped to the 1 s minimum -> 25
    path = folder.parent.parent / "ltx-2.5-duration-head-bf16.safetensors"
    save_file({f"duration_head.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(path))
    return LTX2Pipeline.from_pretrained(
        str(folder), device="cpu", torch_dtype=torch.float32, model_configs=[ModelConfig(path=str(path))]
    )


def test_pipeline_predicts_num_frames_when_left_out(ltx25_with_head):
    pipe = ltx25_with_head
    assert isinstance(pipe.duration_head, LTX2DurationHead)
    settings = dict(height=64, width=64, num_inference_steps=1, seed=0, max_sequence_length=16, output_type="pt",
                    progress_bar=False, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0)  # fmt: skip
    assert pipe.predict_num_frames(CAPTIONS[0], 16, 24.0, 1.0, 20.0) == 25
    frames, _ = pipe(CAPTIONS[0], **settings)
    assert frames.shape[2] == 25
    assert pipe.predict_num_frames(CAPTIONS[0], 16, 24.0, 0.2, 20.0) == 17  # 22 frames floored to the grid
    frames, _ = pipe(CAPTIONS[0], num_frames=9, **settings)  # given: used as is
    assert frames.shape[2] == 9


def authors_seconds(head: LTX2DurationHead, video, audio) -> float:
    """ltx-core's `DurationHead.forward`, re-written on torch's multi-head attention: a stream given as None is
    left out of the pooled tokens (its projection and modality embedding unused)."""
    groups = []
    if video is not None:
        groups.append(head.video_input_proj(video) + head.video_modality_emb)
    if audio is not None:
        groups.append(head.audio_input_proj(audio) + head.audio_modality_emb)
    tokens = torch.cat(groups, dim=1).transpose(0, 1)  # [L, B, D]
    pooler = head.attention_pooler
    queries = pooler.query_tokens[:, None].expand(-1, tokens.shape[1], -1)
    attention = pooler.cross_attn
    pooled, _ = torch.nn.functional.multi_head_attention_forward(
        queries, tokens, tokens, tokens.shape[-1], attention.heads, attention.in_proj_weight, attention.in_proj_bias,
        None, None, False, 0.0, attention.out_proj.weight, attention.out_proj.bias, need_weights=False,
    )  # fmt: skip
    hidden = torch.nn.functional.gelu(head.mlp_hidden(pooled.transpose(0, 1).flatten(1)), approximate="tanh")
    return float(head.mlp_out(hidden).squeeze(-1).exp()[0])


def test_text_to_audio_predicts_from_the_audio_stream_only(ltx25_with_head, monkeypatch):
    """`generate_audio` with `num_frames` left out: the clip length from the audio connector's output alone, as
    ltx-pipelines' text-to-audio (`resolve_num_frames(..., video_encoding=None, audio_encoding=...)`)."""
    pipe = ltx25_with_head
    text = pipe.encode_prompt([CAPTIONS[0]], 16)
    config = LTX2DurationHeadConfig(video_dim=text.video.shape[-1], audio_dim=text.audio.shape[-1], hidden_dim=16)
    head = random_head(config, seed=0).requires_grad_(False)  # as a loaded model
    with torch.no_grad():
        head.mlp_out.bias.fill_(math.log(4.0))  # this head: 5.3 s from both streams, 7.4 s from the audio alone
    monkeypatch.setattr(pipe, "duration_head", head)
    with torch.no_grad():
        audio_only = num_frames_from_seconds(authors_seconds(head, None, text.audio), 24.0)
        both = num_frames_from_seconds(authors_seconds(head, text.video, text.audio), 24.0)
    assert audio_only != both
    assert pipe.predict_num_frames(CAPTIONS[0], 16, 24.0, 1.0, 20.0, video=False) == audio_only
    lengths = []
    real = type(pipe).audio_latent_shape

    def spy(self, batch, num_frames, frame_rate):
        lengths.append(num_frames)
        return real(self, batch, num_frames, frame_rate)

    monkeypatch.setattr(type(pipe), "audio_latent_shape", spy)
    pipe.generate_audio(CAPTIONS[0], num_inference_steps=1, seed=0, max_sequence_length=16, progress_bar=False)
    assert lengths == [audio_only]
