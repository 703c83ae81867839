"""LTX-2 audio-video DiT: conformance suite, behaviour, full-size keys on meta, formats, loading, VRAM manager,
and parity with diffusers' `LTX2VideoTransformer3DModel(rope_type="split")` on the same weights (fp32, CPU).

Inputs are built like diffusers' LTX-2 pipeline builds them: frame-major video tokens with latent sizes
(num_frames, height, width) and fps, audio tokens, connector outputs (3840-wide at full size) with a
keep-mask, and the scheduler's timesteps (sigma * 1000).

The LTX-2.3 section (tests named `test_ltx23_*`) runs the same kinds of checks on a tiny 2.3 DiT (gated
attention, text cross-attention AdaLN, no caption projection) and on LTX-2.5's switches, with parity against
diffusers' `LTX2VideoTransformer3DModel` built with the matching switches and `use_cross_timestep=True`.

`data/ltx2_full.json` is `/work/shared/formats/keys/ltx2_full.json` (every key and shape of
`ltx-2-19b-dev.safetensors`), `data/ltx2_transformer_diffusers.json` the diffusers `transformer/` keys.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.ltx2 import dit as dit_module
from diffsynth.ltx2.dit import AttentionSkip, LTX2DiT, LTX2DiTConfig, audio_positions, video_positions
from diffsynth.ltx2.dit_formats import (
    LTX2_DIT_SPEC,
    PREFIX,
    config_from_state,
    diffusers_config,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

DATA = Path(__file__).parent / "data"
LAYOUTS = {layout.name: layout for layout in LTX2_DIT_SPEC.layouts}
CONNECTORS = ("video_embeddings_connector.", "audio_embeddings_connector.")


# ------------------------------------------------------------------ tiny models and inputs
def tiny_config(**overrides) -> LTX2DiTConfig:
    """The one place tiny LTX-2 DiT sizes live (video 2 heads x 8, audio 2 heads x 4; Appendix A's sizes)."""
    fields = dict(
        in_channels=4,
        out_channels=4,
        num_heads=2,
        head_dim=8,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_heads=2,
        audio_head_dim=4,
        num_layers=2,
        caption_channels=16,
    )
    return LTX2DiTConfig(**{**fields, **overrides})


def make_dit(config: LTX2DiTConfig | None = None, seed: int = 0) -> LTX2DiT:
    return random_weights(LTX2DiT(config or tiny_config()), seed, scale=0.2)


GRID = (2, 4, 4)  # latent frames, height, width
AUDIO_FRAMES = 9
TEXT_LEN = 7
FPS = 25.0


def dit_inputs(batch=2, seed=1, config: LTX2DiTConfig | None = None, masked=True):
    """Positional inputs (video, audio, video_context, audio_context, timestep) and keyword inputs (masks,
    latent sizes, fps) of a DiT call, as the diffusers pipeline passes them."""
    cfg = config or tiny_config()
    g = torch.Generator().manual_seed(seed)
    f, h, w = GRID
    # LTX-2.3 connectors output the stream widths (no caption projection in the DiT)
    widths = (cfg.caption_channels,) * 2 if cfg.caption_projection else (cfg.dim, cfg.audio_dim)
    video = torch.randn(batch, f * h * w, cfg.in_channels, generator=g)
    audio = torch.randn(batch, AUDIO_FRAMES, cfg.audio_in_channels, generator=g)
    video_context = torch.randn(batch, TEXT_LEN, widths[0], generator=g)
    audio_context = torch.randn(batch, TEXT_LEN, widths[1], generator=g)
    timestep = 1000 * torch.rand(batch, generator=g)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    if masked:
        mask[-1, 4:] = False  # the last sample's prompt is shorter
    kwargs = dict(video_context_mask=mask, audio_context_mask=mask, num_frames=f, height=h, width=w, fps=FPS)
    return (video, audio, video_context, audio_context, timestep), kwargs


def expected_shapes(args, cfg: LTX2DiTConfig | None = None):
    cfg = cfg or tiny_config()
    video, audio = args[:2]
    return [(*video.shape[:2], cfg.out_channels), (*audio.shape[:2], cfg.audio_out_channels)]


def meta_state_from_keys(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((DATA / name).read_text())
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def meta_state(config: LTX2DiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return LTX2DiT(config).state_dict()


def shapes(state) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def dit_part_of_full_file() -> dict[str, list[int]]:
    full = json.loads((DATA / "ltx2_full.json").read_text())
    return {
        k[len(PREFIX) :]: v
        for k, v in full.items()
        if k.startswith(PREFIX) and not k[len(PREFIX) :].startswith(CONNECTORS)
    }


# ------------------------------------------------------------------ config
def test_default_config_is_the_released_19b_model():
    cfg = LTX2DiTConfig()
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.audio_dim, cfg.audio_num_heads, cfg.audio_head_dim) == (
        4096, 32, 128, 2048, 32, 64,
    )  # fmt: skip
    assert (cfg.in_channels, cfg.out_channels, cfg.audio_in_channels, cfg.audio_out_channels) == (128,) * 4
    assert (cfg.num_layers, cfg.caption_channels, cfg.rope_type, cfg.rope_theta) == (48, 3840, "split", 10000.0)
    assert cfg.rope_max_pos == (20, 2048, 2048) and cfg.audio_rope_max_pos == 20
    assert cfg.vae_scale_factors == (8, 32, 32) and (cfg.audio_sampling_rate, cfg.audio_hop_length) == (16000, 160)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": 7}, "head_dim"),
        ({"audio_head_dim": 5}, "audio_head_dim"),
        ({"num_layers": -1}, "num_layers"),
        ({"caption_channels": 0}, "caption_channels"),
        ({"rope_type": "rotary"}, "rope_type"),
        ({"rope_max_pos": (20, 2048)}, "rope_max_pos"),
        ({"rope_theta": 1.0}, "rope_theta"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"in_channels": True}, "in_channels"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# ------------------------------------------------------------------ conformance suite
def test_forward_shapes_and_dtype():
    args, kwargs = dit_inputs()
    cf.check_forward(make_dit, args, kwargs, expected_shapes=expected_shapes(args))


def test_forward_bfloat16_keeps_dtype_and_stays_close_to_float32():
    args, kwargs = dit_inputs()
    low_args = tuple(a.bfloat16() if a.is_floating_point() and a.dim() == 3 else a for a in args)
    lows = cf.check_forward(
        lambda: make_dit().to(torch.bfloat16), low_args, kwargs, expected_shapes=expected_shapes(args)
    )
    with torch.no_grad():
        fulls = make_dit().eval()(*args, **kwargs)
    for name, low, full in zip(("video", "audio"), lows, fulls, strict=True):
        error = ((low.float() - full).norm() / full.norm()).item()
        assert error < 0.03, f"{name}: bf16 relative error {error:.3g}"


def test_backward_reaches_every_parameter():
    args, kwargs = dit_inputs()
    cf.check_backward(make_dit, args, kwargs)


def test_gradient_checkpointing_gives_same_output_and_grads():
    args, kwargs = dit_inputs()
    cf.check_gradient_checkpointing(make_dit, args, kwargs, atol=1e-6)


def test_meta_build_and_assign_load_are_identical():
    args, kwargs = dit_inputs()
    cf.check_meta_load(make_dit, args, kwargs)


def test_declared_units_exist():
    cf.check_declared_units(make_dit)
    assert LTX2DiT.offload_units == LTX2DiT.compile_units == ("transformer_blocks",)


def test_spec_config_from_tiny_shapes_rebuilds_the_same_model():
    """Shapes give channels, widths, block count; head counts come from the json."""
    tiny = tiny_config()
    config_json = {"num_attention_heads": 2, "audio_num_attention_heads": 2}
    assert cf.check_spec_config(LTX2_DIT_SPEC, make_dit, config_json) == tiny


# ------------------------------------------------------------------ behaviour
def test_batch_equals_each_sample_alone():
    model = make_dit().eval()
    args, kwargs = dit_inputs(batch=3)
    mask = kwargs.pop("video_context_mask")
    kwargs.pop("audio_context_mask")
    with torch.no_grad():
        video, audio = model(*args, video_context_mask=mask, audio_context_mask=mask, **kwargs)
        for i in range(3):
            s = slice(i, i + 1)
            alone = model(*(a[s] for a in args), video_context_mask=mask[s], audio_context_mask=mask[s], **kwargs)
            torch.testing.assert_close(video[s], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(audio[s], alone[1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ first-block cache
STG_AND_ISOLATION = (AttentionSkip("video_self", (0, 1), (1,)), AttentionSkip("a2v", None, (0,)))


@pytest.mark.parametrize("skips", [(), STG_AND_ISOLATION], ids=["plain", "skips"])
def test_first_block_cache_hook(skips):
    args, kwargs = dit_inputs()
    kwargs["skips"] = list(skips)
    other = dit_inputs(seed=2)[0]
    cf.check_first_block_cache(make_dit, args, kwargs, other_args=other, blocks=("transformer_blocks",))


def test_first_block_cache_reuses_what_the_rest_added_to_both_streams():
    """A reused call = the first block's (video, audio) output + what the other blocks added to each stream
    on the full call, with STG / isolation skips in the first and the later blocks (a reference built by
    hand from the model's own pieces: hooks on the first and last block)."""
    from diffsynth.runtime.step_cache import FirstBlockCache

    model = make_dit(tiny_config(num_layers=3)).eval()
    (args1, kwargs), args2 = dit_inputs(), dit_inputs(seed=2)[0]
    kwargs["skips"] = [AttentionSkip("video_self", (0, 2), (1,)), AttentionSkip("v2a", (1,), (0,))]
    seen = {}
    blocks = model.transformer_blocks
    hooks = [
        blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o)),
        blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
    ]
    with torch.no_grad():
        model(*args1, **kwargs)
        rest = [last - first for last, first in zip(seen["last"], seen["first"], strict=True)]
        hooks[1].remove()  # the last block's output replaced by this call's first-block output + `rest`
        hooks[1] = blocks[-1].register_forward_hook(
            lambda m, i, o: tuple(f + r for f, r in zip(seen["first"], rest, strict=True))
        )
        want = model(*args2, **kwargs)
        for hook in hooks:
            hook.remove()
        full = model(*args2, **kwargs)

        cache = model.step_cache = FirstBlockCache(float("inf"))
        cache.begin_loop()
        for args in (args1, args2):
            cache.begin_step()
            got = model(*args, **kwargs)
    assert (cache.calls, cache.skipped) == (2, 1)
    for stream in range(2):
        assert (got[stream] - full[stream]).abs().max() > 1e-4  # the reuse is an approximation
        torch.testing.assert_close(got[stream], want[stream], atol=1e-6, rtol=0)


def test_masked_text_tokens_are_ignored_and_a_full_mask_equals_none():
    model = make_dit().eval()
    (video, audio, vctx, actx, t), kwargs = dit_inputs()
    changed_v, changed_a = vctx.clone(), actx.clone()
    changed_v[-1, 4:] += 5.0
    changed_a[-1, 4:] -= 5.0
    with torch.no_grad():
        base = model(video, audio, vctx, actx, t, **kwargs)
        moved = model(video, audio, changed_v, changed_a, t, **kwargs)
        unmasked = model(video, audio, changed_v, changed_a, t, **{**kwargs, "video_context_mask": None})
        full = torch.ones(2, TEXT_LEN)  # 0/1 float masks work too
        ones = model(video, audio, vctx, actx, t, **{**kwargs, "video_context_mask": full, "audio_context_mask": full})
        none = model(video, audio, vctx, actx, t, **{**kwargs, "video_context_mask": None, "audio_context_mask": None})
    for a, b in zip(base, moved, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (unmasked[0][-1] - base[0][-1]).abs().max() > 1e-4  # without the mask those tokens matter
    assert all(torch.equal(a, b) for a, b in zip(ones, none, strict=True))


def test_positions_built_from_sizes_equal_explicit_coordinates_and_matter():
    model = make_dit().eval()
    args, kwargs = dit_inputs()
    cfg = model.config
    coords = dict(
        video_coords=video_positions(cfg, 2, *GRID, FPS),
        audio_coords=audio_positions(cfg, 2, AUDIO_FRAMES),
        video_context_mask=kwargs["video_context_mask"],
        audio_context_mask=kwargs["audio_context_mask"],
    )
    with torch.no_grad():
        built = model(*args, **kwargs)
        explicit = model(*args, **coords)
        per_sample = model(*args, **{**coords, "video_coords": coords["video_coords"].clone()})  # not expanded
        other_fps = model(*args, **{**kwargs, "fps": 12.0})
        shifted = model(*args, **{**coords, "audio_coords": audio_positions(cfg, 2, AUDIO_FRAMES, shift=3)})
    assert all(torch.equal(a, b) for a, b in zip(built, explicit, strict=True))
    for a, b in zip(built, per_sample, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (other_fps[0] - built[0]).abs().max() > 1e-4  # fps moves the video time axis
    assert (shifted[1] - built[1]).abs().max() > 1e-4 and (shifted[0] - built[0]).abs().max() > 1e-5


def test_positions_are_pixel_and_second_bounds():
    cfg = LTX2DiTConfig()
    video = video_positions(cfg, 1, 2, 1, 2, fps=24.0)  # tokens (f, h, w): (0,0,0), (0,0,1), (1,0,0), (1,0,1)
    assert video.shape == (1, 3, 4, 2)
    # first latent frame covers pixel frame 0 only (causal), the second frames 1..8
    torch.testing.assert_close(video[0, 0, :, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]) / 24)
    torch.testing.assert_close(video[0, 0, :, 1], torch.tensor([1.0, 1.0, 9.0, 9.0]) / 24)
    torch.testing.assert_close(video[0, 2], torch.tensor([[0.0, 32.0], [32.0, 64.0], [0.0, 32.0], [32.0, 64.0]]))
    audio = audio_positions(cfg, 1, 3)  # 4 mel hops of 10 ms per latent frame, first one causal
    torch.testing.assert_close(audio[0, 0], torch.tensor([[0.0, 0.01], [0.01, 0.05], [0.05, 0.09]]))


def test_timestep_forms_are_equivalent_and_audio_timestep_drives_audio():
    model = make_dit().eval()
    (video, audio, vctx, actx, _), kwargs = dit_inputs()
    t = torch.tensor([300.0, 700.0])
    per_token = t[:, None].expand(2, video.shape[1])
    with torch.no_grad():
        base = model(video, audio, vctx, actx, t, **kwargs)
        tokens = model(video, audio, vctx, actx, per_token, audio_timestep=t, **kwargs)
        scalar = model(video, audio, vctx, actx, 500.0, **kwargs)
        vector = model(video, audio, vctx, actx, torch.full((2,), 500.0), **kwargs)
        other_audio = model(video, audio, vctx, actx, t, audio_timestep=torch.tensor([900.0, 100.0]), **kwargs)
    for a, b in zip(base, tokens, strict=True):  # same values, computed as [B, L] rows instead of [B, 1]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(scalar, vector, strict=True))
    assert (other_audio[1] - base[1]).abs().max() > 1e-4


def test_attention_goes_through_the_runtime_entry_point(monkeypatch):
    calls = []
    original = dit_module.attention

    def spy(q, k, v, mask=None, scale=None, **options):
        calls.append((tuple(q.shape), tuple(k.shape), mask is not None))
        return original(q, k, v, mask, scale, **options)

    monkeypatch.setattr(dit_module, "attention", spy)
    args, kwargs = dit_inputs()
    with torch.no_grad():
        make_dit()(*args, **kwargs)
    lv = GRID[0] * GRID[1] * GRID[2]
    per_block = [
        ((2, lv, 2, 8), (2, lv, 2, 8), False),  # video self
        ((2, AUDIO_FRAMES, 2, 4), (2, AUDIO_FRAMES, 2, 4), False),  # audio self
        ((2, lv, 2, 8), (2, TEXT_LEN, 2, 8), True),  # video <- text (masked)
        ((2, AUDIO_FRAMES, 2, 4), (2, TEXT_LEN, 2, 4), True),  # audio <- text
        ((2, lv, 2, 4), (2, AUDIO_FRAMES, 2, 4), False),  # audio -> video, at the audio width
        ((2, AUDIO_FRAMES, 2, 4), (2, lv, 2, 4), False),  # video -> audio
    ]
    assert calls == per_block * 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({0: torch.zeros(2, 32, 5)}, "video has shape"),
        ({1: torch.zeros(1, 9, 4)}, "audio has shape"),
        ({2: torch.zeros(2, 7, 15)}, "video_context has shape"),
        ({3: torch.zeros(3, 7, 16)}, "audio_context has shape"),
        ({4: torch.zeros(3)}, "timestep has shape"),
        ({"num_frames": 3}, "num_frames"),
        ({"video_context_mask": torch.ones(2, 6)}, "video_context_mask has shape"),
        ({"video_coords": torch.zeros(2, 3, 31, 2)}, "video_coords has shape"),
        ({"audio_coords": torch.zeros(2, 3, 9, 2)}, "audio_coords has shape"),
        ({4: torch.zeros(2, 32)}, "audio_timestep"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args, kwargs = dit_inputs()
    args = list(args)
    for key, value in change.items():
        if isinstance(key, int):
            args[key] = value
        else:
            kwargs[key] = value
    with pytest.raises(ValueError, match=message):
        make_dit()(*args, **kwargs)


# ------------------------------------------------------------------ full size, meta device
def test_released_model_has_exactly_the_dit_keys_and_shapes_of_the_official_file():
    official = dit_part_of_full_file()
    ours = shapes(meta_state(LTX2DiTConfig()))
    assert sorted(ours.keys() - official.keys()) == [] and sorted(official.keys() - ours.keys()) == []
    assert ours == official
    assert len(ours) == 3510 and round(sum(torch.Size(s).numel() for s in ours.values()) / 1e9, 2) == 18.88


def test_official_file_is_recognised_owning_the_dit_keys_only():
    full = meta_state_from_keys("ltx2_full.json")
    layout = LTX2_DIT_SPEC.match(full)
    assert layout is not None and layout.name == "original"
    owned = {k for k in full if layout.owns(k)}
    assert owned == {PREFIX + k for k in dit_part_of_full_file()}  # not the connectors, VAEs, vocoder
    ours = layout.to_ours(full)
    assert config_from_state(ours, None) == LTX2DiTConfig()


def test_diffusers_folder_converts_to_exactly_our_keys_and_shapes():
    diffusers = meta_state_from_keys("ltx2_transformer_diffusers.json")
    layout = LTX2_DIT_SPEC.match(diffusers)
    assert layout.name == "diffusers"
    ours = meta_state(LTX2DiTConfig())
    assert shapes(layout.to_ours(diffusers)) == shapes(ours)
    assert shapes(ours_to_diffusers(ours)) == json.loads((DATA / "ltx2_transformer_diffusers.json").read_text())
    assert config_from_state(layout.to_ours(diffusers), RELEASED_CONFIG_JSON) == LTX2DiTConfig()


# transformer/config.json fields of the released diffusers folder (LTX-2.0, split RoPE)
RELEASED_CONFIG_JSON = {
    "_class_name": "LTX2VideoTransformer3DModel",
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "vae_scale_factors": [8, 32, 32],
    "pos_embed_max_pos": 20,
    "base_height": 2048,
    "base_width": 2048,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "audio_scale_factor": 4,
    "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000,
    "audio_hop_length": 160,
    "num_layers": 48,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "caption_channels": 3840,
    "attention_bias": True,
    "attention_out_bias": True,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_offset": 1,
    "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000,
    "rope_type": "split",
}


def test_config_json_alone_gives_the_released_config():
    assert config_from_state({}, RELEASED_CONFIG_JSON) == LTX2DiTConfig()


# ------------------------------------------------------------------ formats and configs (tiny)
@pytest.mark.parametrize("name", ["original", "original_unprefixed"])
def test_original_layouts_round_trip(name):
    cf.check_layout_roundtrip(make_dit, LAYOUTS[name])


def test_diffusers_layout_inverts_ours_to_diffusers_exactly():
    cf.check_layout_roundtrip(make_dit, LAYOUTS["diffusers"], from_ours=ours_to_diffusers)
    ours = make_dit().state_dict()
    diffusers = ours_to_diffusers(ours)
    back = diffusers_to_ours(diffusers)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    assert (
        diffusers["transformer_blocks.1.audio_to_video_attn.norm_q.weight"]
        is ours["transformer_blocks.1.audio_to_video_attn.q_norm.weight"]
    )
    assert diffusers["av_cross_attn_audio_v2a_gate.linear.bias"] is ours["av_ca_v2a_gate_adaln_single.linear.bias"]


def test_unmapped_keys_are_errors_naming_them():
    diffusers = ours_to_diffusers(make_dit().state_dict())
    for rogue in ("transformer_blocks.0.attn1.to_gate.weight", "prompt_adaln.linear_2.weight"):
        with pytest.raises(KeyError, match=rogue):
            diffusers_to_ours({**diffusers, rogue: torch.zeros(1)})
    with pytest.raises(KeyError, match="video_embeddings_connector"):
        ours_to_diffusers({"video_embeddings_connector.learnable_registers": torch.zeros(1)})


def test_layouts_own_only_dit_keys():
    original = LAYOUTS["original"]
    assert original.owns(PREFIX + "transformer_blocks.3.attn1.to_q.weight")
    assert original.owns(PREFIX + "audio_scale_shift_table") and original.owns(PREFIX + "adaln_single.linear.bias")
    assert not original.owns(PREFIX + "video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight")
    assert not original.owns("vae.decoder.conv_in.conv.weight") and not original.owns("transformer_blocks.0.ff")
    assert not LAYOUTS["diffusers"].owns("video_connector.learnable_registers")


def test_heads_come_from_the_json_or_the_released_head_width():
    state = meta_state(tiny_config())
    with pytest.raises(ConfigError, match="num_heads"):  # widths 16 / 8 are not multiples of 128 / 64
        config_from_state(state, None)
    cfg = config_from_state(state, {"attention_head_dim": 8, "audio_attention_head_dim": 4})
    assert (cfg.num_heads, cfg.audio_num_heads) == (2, 2)
    wide = tiny_config(num_heads=1, head_dim=128, audio_num_heads=1, audio_head_dim=64)
    assert config_from_state(meta_state(wide), None) == wide


def test_config_json_that_contradicts_the_shapes_or_the_model_is_an_error():
    state = meta_state(LTX2DiTConfig())
    with pytest.raises(ConfigError, match="num_layers"):
        config_from_state(state, {**RELEASED_CONFIG_JSON, "num_layers": 47})
    with pytest.raises(ConfigError, match="caption_channels"):
        config_from_state(state, {**RELEASED_CONFIG_JSON, "caption_channels": 4096})
    with pytest.raises(ConfigError, match="num_heads"):
        config_from_state(state, {**RELEASED_CONFIG_JSON, "num_attention_heads": 16})
    with pytest.raises(ConfigError, match="audio_gated_attn"):  # one stream gated, the other not
        config_from_state({}, {**RELEASED_CONFIG_JSON, "gated_attn": True})
    with pytest.raises(ConfigError, match="gated_attention"):  # LTX-2.3 json, LTX-2.0 shapes
        config_from_state(state, {**RELEASED_CONFIG_JSON, "gated_attn": True, "audio_gated_attn": True})
    with pytest.raises(ConfigError, match="patch_size"):
        config_from_state({}, {**RELEASED_CONFIG_JSON, "patch_size": 2})
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        config_from_state({}, {**RELEASED_CONFIG_JSON, "cross_attention_dim": 2048})
    with pytest.raises(ConfigError, match="rope_type"):
        config_from_state({}, {**RELEASED_CONFIG_JSON, "rope_type": "rotary"})


# ------------------------------------------------------------------ loading files
def _file_config() -> LTX2DiTConfig:
    """Small, but with the released head widths (128 / 64), so an original file without a config derives it."""
    return tiny_config(num_heads=1, head_dim=128, audio_num_heads=1, audio_head_dim=64, num_layers=1)


def _diffusers_config_json(cfg: LTX2DiTConfig) -> dict:
    """What diffusers writes for a model of `cfg`'s sizes."""
    return {"_class_name": "LTX2VideoTransformer3DModel", **diffusers_config(cfg)}


def test_diffusers_config_is_the_released_json_and_reads_back():
    """`diffusers_config` of the released config states what diffusers' released `config.json` states, and
    reading a tiny model's back through `config_from_state` gives the same config."""
    released = diffusers_config(LTX2DiTConfig())
    for name, value in released.items():
        if name in RELEASED_CONFIG_JSON:
            want = RELEASED_CONFIG_JSON[name]
            assert (list(value) if isinstance(value, tuple) else value) == want, name
    cfg = tiny_config(rope_type="interleaved", rope_double_precision=False)
    assert config_from_state(meta_state(cfg), _diffusers_config_json(cfg)) == cfg


def _write_in_layout(model: LTX2DiT, cfg: LTX2DiTConfig, layout: str, folder):
    """`model`'s weights as a file in `layout` (the diffusers one with its config.json beside it)."""
    state = model.state_dict()
    if layout == "original":
        state = {PREFIX + k: v for k, v in state.items()}
    elif layout == "diffusers":
        state = ours_to_diffusers(state)
        (folder / "config.json").write_text(json.dumps(_diffusers_config_json(cfg)))
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["original", "original_unprefixed", "diffusers"])
def test_runtime_loader_builds_the_same_model_from_a_file_in_each_layout(layout, tmp_path):
    cfg = _file_config() if layout != "diffusers" else tiny_config()
    reference = make_dit(cfg, seed=4).eval()
    model = load_model(str(_write_in_layout(reference, cfg, layout, tmp_path)), specs=[LTX2_DIT_SPEC])
    assert isinstance(model, LTX2DiT) and model.config == cfg
    args, kwargs = dit_inputs(config=cfg)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(*args, **kwargs), reference(*args, **kwargs), strict=True))


def test_runtime_loader_takes_a_state_dict_with_the_heads_given_and_casts():
    reference = make_dit()
    config = {"num_attention_heads": 2, "audio_num_attention_heads": 2}
    model = load_model(reference.state_dict(), torch.bfloat16, specs=[LTX2_DIT_SPEC], config=config)
    assert model.config == tiny_config() and model.patchify_proj.weight.dtype == torch.bfloat16


def test_a_whole_ltx2_file_names_the_keys_no_installed_model_owns(tmp_path):
    """The connectors share the DiT's prefix: with only the DiT spec they are reported, not dropped."""
    state = {PREFIX + k: v for k, v in make_dit(_file_config()).state_dict().items()}
    state[PREFIX + "video_embeddings_connector.learnable_registers"] = torch.zeros(8, 16)
    path = tmp_path / "ltx-2-tiny.safetensors"
    save_file(state, str(path))
    with pytest.raises(UnknownModelError, match="video_embeddings_connector"):
        load_model(str(path), specs=[LTX2_DIT_SPEC])


# ------------------------------------------------------------------ VRAM manager
@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_vram_managed_dit_equals_the_unmanaged_one(version):
    from diffsynth.runtime.vram import enable_vram_management

    make, inputs = (make_dit, dit_inputs) if version == "2.0" else (make_23, ltx23_inputs)

    def factory():
        return make(seed=2).eval().requires_grad_(False)

    args, kwargs = inputs()
    with torch.no_grad():
        reference = factory()(*args, **kwargs)
        model = factory()
        handle = enable_vram_management(model, {"offload_device": "cpu", "onload_device": "cpu"}, vram_limit=0,
                                        device="cpu")  # fmt: skip
        assert handle.plan.resident == () and len(handle.units) == 2
        assert all(torch.equal(a, b) for a, b in zip(model(*args, **kwargs), reference, strict=True))
        assert handle.report().bytes_moved > 0


# ------------------------------------------------------------------ parity with diffusers
def reference_dit(cfg: LTX2DiTConfig, state: dict | None = None, **options):
    """diffusers' `LTX2VideoTransformer3DModel` of `cfg`'s sizes (and constructor `options` such as
    `perturbed_attn`), eval mode, strictly loaded with a diffusers-named `state` when given."""
    from diffusers import LTX2VideoTransformer3DModel

    reference = LTX2VideoTransformer3DModel(**diffusers_config(cfg), **options).eval()
    if state is not None:
        reference.load_state_dict(state, strict=True)
    return reference


def _compare(ours, reference, args, kwargs, **reference_only) -> float:
    """Our outputs for `args, kwargs` against diffusers' for the same inputs (plus `reference_only`, the
    reference's own spelling of options such as STG, which `kwargs` gives ours as `skips`)."""
    video, audio, vctx, actx, t = args
    with torch.no_grad():
        got = ours(*args, **kwargs)
        want = reference(
            **reference_only,
            hidden_states=video,
            audio_hidden_states=audio,
            encoder_hidden_states=vctx,
            audio_encoder_hidden_states=actx,
            timestep=t,
            audio_timestep=kwargs.get("audio_timestep"),
            sigma=kwargs.get("sigma"),
            audio_sigma=kwargs.get("audio_sigma"),
            encoder_attention_mask=kwargs["video_context_mask"],
            audio_encoder_attention_mask=kwargs["audio_context_mask"],
            num_frames=kwargs["num_frames"],
            height=kwargs["height"],
            width=kwargs["width"],
            fps=kwargs["fps"],
            audio_num_frames=audio.shape[1],
            return_dict=False,
        )
    worst = 0.0
    for name, g, w in zip(("video", "audio"), got, want, strict=True):
        diff, scale = (g - w).abs().max().item(), w.abs().max().item()
        print(f"parity {name}: max abs diff {diff:.3g}, output scale {scale:.3g}")
        assert scale > 0.1  # a vacuous comparison (all zeros) would prove nothing
        assert diff <= 1e-5 * max(1.0, scale), f"{name}: max abs diff {diff:.3g} (scale {scale:.3g}) vs diffusers"
        worst = max(worst, diff)
    return worst


@pytest.mark.parity
@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_parity_with_diffusers_on_our_weights(rope_type):
    pytest.importorskip("diffusers")
    cfg = tiny_config(rope_type=rope_type)
    ours = make_dit(cfg).eval()
    args, kwargs = dit_inputs(config=cfg)
    _compare(ours, reference_dit(cfg, ours_to_diffusers(ours.state_dict())), args, kwargs)


@pytest.mark.parity
def test_parity_with_per_token_timesteps_audio_timestep_and_float_positions():
    """Image-to-video style call: per-token video timesteps (conditioning frame at 0) and a separate audio
    timestep, single-precision RoPE."""
    pytest.importorskip("diffusers")
    cfg = tiny_config(rope_double_precision=False)
    ours = make_dit(cfg, seed=3).eval()
    args, kwargs = dit_inputs(config=cfg, seed=5)
    per_token = args[4][:, None].repeat(1, args[0].shape[1])
    per_token[:, : GRID[1] * GRID[2]] = 0.0  # first latent frame is clean
    args = (*args[:4], per_token)
    kwargs["audio_timestep"] = torch.tensor([400.0, 850.0])
    _compare(ours, reference_dit(cfg, ours_to_diffusers(ours.state_dict())), args, kwargs)


@pytest.mark.parity
def test_parity_through_diffusers_converter_of_the_original_file():
    """Our original-layout file (with a connector key beside it, as in the real file) through diffusers'
    `convert_ltx2_transformer_to_diffusers`, strictly loaded, gives our outputs."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    cfg = tiny_config()
    ours = make_dit(cfg, seed=6).eval()
    original = {PREFIX + k: v for k, v in ours.state_dict().items()}
    original[PREFIX + "audio_embeddings_connector.learnable_registers"] = torch.zeros(8, 16)
    converted = convert_ltx2_transformer_to_diffusers(dict(original))
    _compare(ours, reference_dit(cfg, converted), *dit_inputs(config=cfg, seed=7))


@pytest.mark.parity
def test_parity_from_diffusers_weights_converted_to_ours():
    """The other direction: a diffusers model's own (randomised) weights through `diffusers_to_ours`."""
    pytest.importorskip("diffusers")
    cfg = tiny_config()
    reference = random_weights(reference_dit(cfg), seed=8, scale=0.2)
    ours = LTX2DiT(cfg)
    ours.load_state_dict(diffusers_to_ours(reference.state_dict()), strict=True)
    _compare(ours.eval(), reference.eval(), *dit_inputs(config=cfg, seed=9))


# ================================================================== LTX-2.3 (and the LTX-2.5 switches)
def tiny_23_config(**overrides) -> LTX2DiTConfig:
    """Tiny LTX-2.3 DiT: gated attention, text cross-attention AdaLN with the sigma-driven prompt modulation,
    no caption projection (contexts come at the stream widths; `caption_channels` is then unused and left
    at the default, which is what a 2.3 file's shapes give)."""
    switches = dict(gated_attention=True, cross_attention_adaln=True, caption_projection=False)
    return tiny_config(**{**switches, "caption_channels": LTX2DiTConfig.caption_channels, **overrides})


def tiny_25_config(**overrides) -> LTX2DiTConfig:
    """LTX-2.5's switches on 2.3: static prompt tables, bias-free video feed-forward, keyframe embedding."""
    return tiny_23_config(prompt_adaln_single=False, ff_bias=False, keyframes_abs_pos_embedding=True, **overrides)


def ltx23_inputs(seed=1, config: LTX2DiTConfig | None = None):
    """A batch of 2 rows at different noise levels, the last prompt padded, image-to-video style: per-token
    video timesteps with a clean first latent frame, audio at a sigma of its own; the per-row sigmas given."""
    cfg = config or tiny_23_config()
    args, kwargs = dit_inputs(seed=seed, config=cfg)
    sigma, audio_sigma = torch.tensor([870.0, 310.0]), torch.tensor([650.0, 120.0])
    per_token = sigma[:, None].repeat(1, args[0].shape[1])
    per_token[:, : GRID[1] * GRID[2]] = 0.0
    kwargs.update(audio_timestep=audio_sigma, sigma=sigma, audio_sigma=audio_sigma)
    if cfg.keyframes_abs_pos_embedding:
        kwargs["keyframes_mask"] = (per_token == 0).float()  # the clean first frame holds one pixel frame
    return (*args[:4], per_token), kwargs


def make_23(config: LTX2DiTConfig | None = None, seed: int = 0) -> LTX2DiT:
    model = make_dit(config or tiny_23_config(), seed)
    if model.config.keyframes_abs_pos_embedding:  # zeros at init (a no-op); random so that tests see it
        torch.nn.init.normal_(model.keyframes_abs_pos_embedding, std=0.2, generator=torch.Generator().manual_seed(seed))
    return model


VERSIONS = {"2.3": tiny_23_config, "2.5": tiny_25_config}

# transformer/config.json of Lightricks/LTX-2.3 in diffusers (its conversion script's "2.3" config)
LTX23_CONFIG_JSON = {
    **RELEASED_CONFIG_JSON,
    "gated_attn": True,
    "cross_attn_mod": True,
    "audio_gated_attn": True,
    "audio_cross_attn_mod": True,
    "use_prompt_embeddings": False,
    "perturbed_attn": True,
}
RELEASED_23 = LTX2DiTConfig.ltx23()


def test_ltx23_config_switches_and_cross_modal_timestep_default():
    assert LTX2DiTConfig().cross_modal_mode == "own" and RELEASED_23.cross_modal_mode == "cross"
    assert tiny_23_config(cross_modal_timestep="cross_gate").cross_modal_mode == "cross_gate"
    assert replace(LTX2DiTConfig(), cross_attention_adaln=True).cross_modal_mode == "cross"  # resolved, not stored
    with pytest.raises(ValueError, match="cross_modal_timestep"):
        tiny_23_config(cross_modal_timestep="audio")


@pytest.mark.parametrize("version", VERSIONS)
def test_ltx23_conformance_forward_backward_meta_load(version):
    cfg = VERSIONS[version]()
    args, kwargs = ltx23_inputs(config=cfg)
    cf.check_forward(lambda: make_23(cfg), args, kwargs, expected_shapes=expected_shapes(args, cfg))
    cf.check_backward(lambda: make_23(cfg), args, kwargs)  # gates, prompt tables and embedders all reached
    cf.check_meta_load(lambda: make_23(cfg), args, kwargs)
    cf.check_declared_units(lambda: make_23(cfg))  # the offload / compile units still cover every block


@pytest.mark.parametrize("version", VERSIONS)
def test_ltx23_config_from_tiny_shapes_rebuilds_the_same_model(version):
    cfg = VERSIONS[version]()
    config_json = {"num_attention_heads": 2, "audio_num_attention_heads": 2}
    assert cf.check_spec_config(LTX2_DIT_SPEC, lambda: make_dit(cfg), config_json) == cfg
    assert config_from_state(meta_state(cfg), _diffusers_config_json(cfg)) == cfg  # and through diffusers' json


def test_ltx23_keys_present_decide_the_version_and_bad_tables_are_errors():
    state = meta_state(tiny_23_config())
    heads = {"attention_head_dim": 8, "audio_attention_head_dim": 4}
    assert config_from_state(state, heads).cross_modal_mode == "cross"
    seven = {**state, "transformer_blocks.0.scale_shift_table": torch.empty(7, 16, device="meta")}
    with pytest.raises(ConfigError, match="transformer_blocks.0.scale_shift_table has 7 rows"):
        config_from_state(seven, heads)
    with pytest.raises(ConfigError, match="caption_projection"):  # 2.0 json, 2.3 shapes
        config_from_state(state, {**heads, "use_prompt_embeddings": True})
    with pytest.raises(ConfigError, match="cross_attn_mod=True but audio_cross_attn_mod=False"):
        config_from_state({}, {**LTX23_CONFIG_JSON, "audio_cross_attn_mod": False})
    with pytest.raises(ValueError, match=r"audio_context has shape \(2, 7, 16\).*audio width=8"):  # 2.0 widths
        make_23()(*dit_inputs()[0], **dit_inputs()[1])


def test_ltx23_sigma_defaults_to_the_largest_timestep_and_drives_the_text_modulation():
    """Without `sigma` / `audio_sigma` each stream's largest per-token timestep stands in; sigma moves both
    streams on a 2.3 model (prompt K/V modulation, and the other stream's a2v/v2a AdaLN) and is never read
    by a 2.0 model."""
    model = make_23().eval()
    args, kwargs = ltx23_inputs()
    bare = {k: v for k, v in kwargs.items() if k not in ("sigma", "audio_sigma")}
    with torch.no_grad():
        given = model(*args, **kwargs)
        derived = model(*args, **bare)
        moved = model(*args, **{**kwargs, "sigma": torch.tensor([500.0, 900.0])})
        audio_moved = model(*args, **{**kwargs, "audio_sigma": torch.tensor([0.0, 0.0])})
    assert all(torch.equal(a, b) for a, b in zip(given, derived, strict=True))
    for out in (moved, audio_moved):
        assert all((a - b).abs().max() > 1e-4 for a, b in zip(given, out, strict=True))
    old = make_dit().eval()
    args20, kwargs20 = dit_inputs()
    with torch.no_grad():
        plain = old(*args20, **kwargs20)
        with_sigma = old(*args20, **kwargs20, sigma=torch.tensor([1.0, 2.0]), audio_sigma=3.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_sigma, strict=True))


def test_ltx23_cross_modal_timestep_modes_differ_only_when_the_streams_noise_levels_differ():
    weights = make_23().state_dict()
    models = {}
    for mode in ("own", "cross", "cross_gate"):
        models[mode] = LTX2DiT(tiny_23_config(cross_modal_timestep=mode)).eval()
        models[mode].load_state_dict(weights)
    args, kwargs = ltx23_inputs()
    same_args, same_kwargs = dit_inputs(config=tiny_23_config())  # one [B] timestep for everything (text-to-video)
    with torch.no_grad():
        outs = {mode: model(*args, **kwargs) for mode, model in models.items()}
        sames = {mode: model(*same_args, **same_kwargs) for mode, model in models.items()}
    for a, b in (("own", "cross"), ("own", "cross_gate"), ("cross", "cross_gate")):
        assert all((x - y).abs().max() > 1e-5 for x, y in zip(outs[a], outs[b], strict=True)), (a, b)
        assert all(torch.equal(x, y) for x, y in zip(sames[a], sames[b], strict=True)), (a, b)


def test_ltx23_skipped_rows_equal_those_rows_run_alone_with_the_skip():
    """STG (gates applied to the passed-through values) and modality isolation on a 2.3 model: the rows a
    skip names in a batch equal those rows run alone with the skip on the whole call."""
    model = make_23().eval()
    args, kwargs = ltx23_inputs()
    stg = [AttentionSkip("video_self", (1,), (1,)), AttentionSkip("audio_self", (1,), (1,))]
    isolation = [AttentionSkip("a2v", None, (0,)), AttentionSkip("v2a", None, (0,))]
    with torch.no_grad():
        batch = model(*args, **kwargs, skips=stg + isolation)
        plain = model(*args, **kwargs)
        for row, skips in ((0, isolation), (1, stg)):
            s = slice(row, row + 1)
            alone_kwargs = {k: v[s] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in kwargs.items()}
            alone = model(*(a[s] for a in args), **alone_kwargs,
                          skips=[AttentionSkip(k.kind, k.blocks, None) for k in skips])  # fmt: skip
            for b, a, p in zip(batch, alone, plain, strict=True):
                torch.testing.assert_close(b[s], a, atol=1e-5, rtol=1e-5)
                assert (b[s] - p[s]).abs().max() > 1e-4  # the skip did something


def test_ltx23_first_block_cache_with_skips():
    args, kwargs = ltx23_inputs()
    kwargs["skips"] = list(STG_AND_ISOLATION)
    other = ltx23_inputs(seed=2)[0]
    cf.check_first_block_cache(make_23, args, kwargs, other_args=other, blocks=("transformer_blocks",))


def test_ltx23_keyframes_embedding_marks_only_the_masked_tokens():
    model = make_23(tiny_25_config()).eval()
    args, kwargs = ltx23_inputs(config=model.config)
    captured = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(*args, **kwargs)
        model(*args, **{**kwargs, "keyframes_mask": kwargs["keyframes_mask"][..., None] * 0})
        with pytest.raises(ValueError, match="keyframes_mask has shape"):
            model(*args, **{**kwargs, "keyframes_mask": torch.ones(2, 5)})
    marked, unmarked = captured
    want = unmarked + kwargs["keyframes_mask"][..., None] * model.keyframes_abs_pos_embedding
    torch.testing.assert_close(marked, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_ltx23_layouts_round_trip(version):
    cfg = VERSIONS[version]()

    def factory():
        return make_23(cfg)

    for name in ("original", "original_unprefixed"):
        cf.check_layout_roundtrip(factory, LAYOUTS[name])
    cf.check_layout_roundtrip(factory, LAYOUTS["diffusers"], from_ours=ours_to_diffusers)
    diffusers = ours_to_diffusers(factory().state_dict())
    assert "prompt_adaln.linear.weight" in diffusers or version == "2.5"
    assert "transformer_blocks.1.video_to_audio_attn.to_gate_logits.bias" in diffusers
    assert not any(k.startswith("caption_projection") for k in diffusers)


@pytest.mark.parametrize("layout", ["original", "original_unprefixed", "diffusers"])
def test_ltx23_runtime_loader_builds_the_same_model_from_a_file_in_each_layout(layout, tmp_path):
    """A 2.3 file (no caption projection key) is recognised in every layout and loads strictly."""
    cfg = tiny_23_config(**({} if layout == "diffusers" else dict(
        num_heads=1, head_dim=128, audio_num_heads=1, audio_head_dim=64, num_layers=1)))  # fmt: skip
    reference = make_23(cfg, seed=4).eval()
    model = load_model(str(_write_in_layout(reference, cfg, layout, tmp_path)), specs=[LTX2_DIT_SPEC])
    assert isinstance(model, LTX2DiT) and model.config == cfg
    loaded, want = model.state_dict(), reference.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    args, kwargs = ltx23_inputs(config=cfg)
    with torch.no_grad():  # close, not bit-equal: kernels may round differently on the file's mapped memory
        for a, b in zip(model(*args, **kwargs), reference(*args, **kwargs), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_ltx23_full_size_keys_are_the_20_keys_with_the_23_changes():
    """Full size on meta: the released 2.0 DiT keys minus the caption projections, plus a gate per attention,
    two prompt tables per block and the two prompt embedders; the block / adaln_single tables 9 rows."""
    official = dit_part_of_full_file()
    ours = shapes(meta_state(RELEASED_23))
    attentions = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    added = {
        f"transformer_blocks.{i}.{name}"
        for i in range(48)
        for name in (
            *(f"{a}.to_gate_logits.{p}" for a in attentions for p in ("weight", "bias")),
            "prompt_scale_shift_table",
            "audio_prompt_scale_shift_table",
        )
    } | {f"{s}prompt_adaln_single.{part}" for s in ("", "audio_") for part in (
        "emb.timestep_embedder.linear_1.weight", "emb.timestep_embedder.linear_1.bias",
        "emb.timestep_embedder.linear_2.weight", "emb.timestep_embedder.linear_2.bias",
        "linear.weight", "linear.bias")}  # fmt: skip
    removed = {k for k in official if k.startswith(("caption_projection.", "audio_caption_projection."))}
    assert ours.keys() == (official.keys() - removed) | added
    assert ours["transformer_blocks.0.scale_shift_table"] == [9, 4096] and ours["adaln_single.linear.weight"] == [
        9 * 4096, 4096,
    ]  # fmt: skip
    assert ours["transformer_blocks.0.audio_to_video_attn.to_gate_logits.weight"] == [32, 4096]
    assert ours["transformer_blocks.0.video_to_audio_attn.to_gate_logits.weight"] == [32, 2048]
    full = {PREFIX + k: torch.empty(v, device="meta") for k, v in ours.items()}
    layout = LTX2_DIT_SPEC.match(full)
    assert layout.name == "original" and config_from_state(layout.to_ours(full), None) == RELEASED_23
    print(f"LTX-2.3 DiT: {len(ours)} tensors, {sum(torch.Size(s).numel() for s in ours.values()) / 1e9:.2f}B params")


def test_ltx23_config_json_alone_gives_the_released_config():
    assert config_from_state({}, LTX23_CONFIG_JSON) == RELEASED_23


@pytest.mark.parity
def test_ltx23_full_size_model_equals_diffusers_through_the_converter():
    """diffusers' full-size LTX-2.3 transformer (its conversion script's config) on meta: same keys and shapes
    as ours through `ours_to_diffusers`, and its state and json give our released 2.3 config."""
    pytest.importorskip("diffusers")
    from diffusers import LTX2VideoTransformer3DModel

    fields = {k: v for k, v in LTX23_CONFIG_JSON.items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = LTX2VideoTransformer3DModel(**fields)
    theirs = shapes(reference.state_dict())
    ours = meta_state(RELEASED_23)
    assert shapes(ours_to_diffusers(ours)) == theirs
    diffusers_state = {k: torch.empty(v, device="meta") for k, v in theirs.items()}
    assert LTX2_DIT_SPEC.match(diffusers_state).name == "diffusers"
    converted = diffusers_to_ours(diffusers_state)
    assert shapes(converted) == shapes(ours)
    assert config_from_state(converted, LTX23_CONFIG_JSON) == config_from_state(converted, None) == RELEASED_23


def _diffusers_options(kwargs) -> dict:
    """What diffusers takes beyond `_compare`'s common arguments for an `ltx23_inputs` call."""
    options = {"use_cross_timestep": True}
    if "keyframes_mask" in kwargs:
        options["video_keyframes_mask"] = kwargs["keyframes_mask"][..., None]
    return options


@pytest.mark.parity
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_ltx23_parity_with_diffusers_on_our_weights(version, rope_type):
    """Per-token video timesteps, a separate audio timestep, per-row sigmas, a padded prompt; diffusers with
    its pipelines' `use_cross_timestep=True`."""
    pytest.importorskip("diffusers")
    cfg = VERSIONS[version](rope_type=rope_type)
    ours = make_23(cfg).eval()
    args, kwargs = ltx23_inputs(config=cfg)
    reference = reference_dit(cfg, ours_to_diffusers(ours.state_dict()))
    _compare(ours, reference, args, kwargs, **_diffusers_options(kwargs))


@pytest.mark.parity
def test_ltx23_parity_of_the_own_timestep_mode_with_use_cross_timestep_false():
    pytest.importorskip("diffusers")
    cfg = tiny_23_config(cross_modal_timestep="own")
    ours = make_23(cfg, seed=3).eval()
    args, kwargs = ltx23_inputs(config=cfg, seed=5)
    reference = reference_dit(cfg, ours_to_diffusers(ours.state_dict()))
    _compare(ours, reference, args, kwargs, use_cross_timestep=False)


@pytest.mark.parity
def test_ltx23_parity_of_stg_and_modality_isolation_with_diffusers():
    """Our STG skips on row 1 of blocks (1,) against diffusers' perturbed-attention processors
    (`spatio_temporal_guidance_blocks`, `perturbation_mask`), and isolation of every row against
    `isolate_modalities`."""
    pytest.importorskip("diffusers")
    cfg = tiny_23_config()
    ours = make_23(cfg, seed=6).eval()
    args, kwargs = ltx23_inputs(config=cfg, seed=7)
    reference = reference_dit(cfg, ours_to_diffusers(ours.state_dict()), perturbed_attn=True)
    stg = [AttentionSkip("video_self", (1,), (1,)), AttentionSkip("audio_self", (1,), (1,))]
    _compare(ours, reference, args, {**kwargs, "skips": stg}, use_cross_timestep=True,
             spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor([1.0, 0.0]))  # fmt: skip
    isolation = [AttentionSkip("a2v"), AttentionSkip("v2a")]
    _compare(ours, reference, args, {**kwargs, "skips": isolation}, use_cross_timestep=True, isolate_modalities=True)


@pytest.mark.parity
def test_ltx23_parity_from_diffusers_weights_converted_to_ours():
    pytest.importorskip("diffusers")
    cfg = tiny_25_config()
    reference = random_weights(reference_dit(cfg), seed=8, scale=0.2)
    ours = LTX2DiT(cfg)
    ours.load_state_dict(diffusers_to_ours(reference.state_dict()), strict=True)
    args, kwargs = ltx23_inputs(config=cfg, seed=9)
    _compare(ours.eval(), reference.eval(), args, kwargs, **_diffusers_options(kwargs))
