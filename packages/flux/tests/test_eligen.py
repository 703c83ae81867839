"""EliGen entity control: token regions, the joint attention mask against a token-by-token reference,
what image tokens can and cannot see in the DiT, and the pipeline with entities (batch, CFG, errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import (
    check_pipeline_first_block_cache,
    dit_inputs,
    image_ids,
    make_dit,
    tiny_dit_config,
)
from PIL import Image

from diffsynth.flux.flux1 import dit as dit_module
from diffsynth.flux.flux1.eligen import (
    EliGenEntities,
    attention_mask,
    check_entity_inputs,
    entity_regions,
    joint_inputs,
    joint_text,
)
from diffsynth.flux.pipeline import flux_velocity
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.layers import apply_rope, rope_tables

FAST = dict(height=32, width=32, num_inference_steps=2, t5_sequence_length=8, progress_bar=False)


def _mask(width, height, box=None, value=255):
    """A black RGB mask, `box` (left, top, right, bottom) filled with gray level `value`."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    if box is not None:
        left, top, right, bottom = box
        pixels[top:bottom, left:right] = value
    return Image.fromarray(pixels)


# ------------------------------------------------------------------ regions and inputs
def test_regions_follow_the_latent_grid_and_threshold():
    # 32x32 pixels -> 4x4 latent -> 2x2 tokens; a 4x4 mask is already latent-sized
    one_pixel = _mask(4, 4, (3, 2, 4, 3))  # latent pixel (row 2, col 3): token (1, 1)
    left_half = _mask(64, 64, (0, 0, 32, 64))  # resized to the latent grid: the left token column
    dim = _mask(4, 4, (0, 0, 4, 4), value=120)  # below half: outside
    bright = _mask(4, 4, (0, 0, 4, 4), value=140)
    regions = entity_regions([one_pixel, left_half, dim, bright], 32, 32)
    assert regions.dtype == torch.bool and regions.shape == (4, 4)
    assert regions[0].tolist() == [False, False, False, True]
    assert regions[1].tolist() == [True, False, True, False]
    assert not regions[2].any() and regions[3].all()


def test_joint_text_puts_entities_before_the_global_prompt():
    prompt = torch.randn(2, 5, 8)
    entities = EliGenEntities(torch.randn(1, 3, 5, 8), torch.ones(1, 3, 4, dtype=torch.bool))
    txt = joint_text(prompt, entities)
    assert txt.shape == (2, 20, 8)
    for i in range(3):
        torch.testing.assert_close(txt[:, 5 * i : 5 * i + 5], entities.t5[:, i].expand(2, -1, -1), atol=0, rtol=0)
    torch.testing.assert_close(txt[:, 15:], prompt, atol=0, rtol=0)
    longer = torch.randn(2, 7, 8)  # tokens appended to the global prompt (Redux, AttriCtrl, LoRA Encoder)
    txt = joint_text(longer, entities)
    assert txt.shape == (2, 22, 8)
    torch.testing.assert_close(txt[:, 15:], longer, atol=0, rtol=0)
    with pytest.raises(ValueError, match="same t5_sequence_length"):
        joint_text(torch.randn(2, 4, 8), entities)


def _visible_keys(query, regions, prompt_len, image_len):
    """Which key positions `query` may see, written out from EliGen's rules (text [e0 .. eN-1, global])."""
    n, covered = regions.shape
    text_len = (n + 1) * prompt_len
    keys = []
    if query < text_len:
        prompt = query // prompt_len
        keys += range(prompt * prompt_len, (prompt + 1) * prompt_len)  # its own prompt's tokens only
        for j in range(image_len):
            if prompt == n or (j < covered and regions[prompt, j]):
                keys.append(text_len + j)
        return keys
    j = query - text_len
    for prompt in range(n + 1):
        if prompt == n or (j < covered and regions[prompt, j]):
            keys += range(prompt * prompt_len, (prompt + 1) * prompt_len)
    keys += range(text_len, text_len + image_len)
    return keys


@pytest.mark.parametrize("extra", [0, 3])  # 3 tokens past the regions: Kontext references
def test_masked_joint_attention_equals_per_token_reference(extra):
    g = torch.Generator().manual_seed(0)
    prompt_len, covered, heads, dim = 3, 6, 2, 16
    regions = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    image_len = covered + extra
    length = 3 * prompt_len + image_len
    q, k, v = (torch.randn(2, length, heads, dim, generator=g) for _ in range(3))
    ids = torch.rand(length, 3, generator=g) * 4
    half = dit_module.rope_from_ids(ids[None], (4, 6, 6), 10000.0)
    mask = attention_mask(regions[None], prompt_len, image_len)
    assert mask.shape == (1, 1, length, length)

    out = dit_module._joint_attention(q, k, v, rope_tables(*half), mask).unflatten(-1, (heads, dim))

    qr, kr = apply_rope(q, *half), apply_rope(k, *half)
    for query in range(length):
        keys = _visible_keys(query, regions, prompt_len, image_len)
        scores = torch.einsum("bhd,bkhd->bhk", qr[:, query], kr[:, keys]) / math.sqrt(dim)
        expected = torch.einsum("bhk,bkhd->bhd", scores.softmax(-1), v[:, keys])
        torch.testing.assert_close(out[:, query], expected, atol=1e-5, rtol=1e-5)


def _dit_call(model, entity_t5, regions, seed=1, prompt_len=4, grid=(2, 4)):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    b = 2
    img = torch.randn(b, grid[0] * grid[1], cfg.in_channels, generator=g)
    prompt = torch.randn(b, prompt_len, cfg.context_in_dim, generator=g)
    t, y, guidance = torch.rand(b, generator=g), torch.randn(b, cfg.vec_in_dim, generator=g), torch.full((b,), 3.5)
    entities = EliGenEntities(entity_t5, regions)
    txt, mask = joint_inputs(prompt, entities, img.shape[1])
    txt_ids = torch.zeros(txt.shape[1], 3)
    return model(img, image_ids(*grid), txt, txt_ids, t, y, guidance, attn_mask=mask)


@pytest.mark.parametrize(("depth", "single"), [(1, 0), (0, 1)])
def test_image_tokens_see_only_their_entities(depth, single):
    """After one block (double or single), tokens outside every region ignore the entity prompts; tokens
    inside a region change with that entity's prompt and ignore the other entity's."""
    model = make_dit(tiny_dit_config(depth=depth, depth_single_blocks=single))
    g = torch.Generator().manual_seed(5)
    regions = torch.zeros(1, 2, 8, dtype=torch.bool)
    regions[0, 0, [0, 1]] = True
    regions[0, 1, [2, 5]] = True
    outside = [3, 4, 6, 7]
    entity_t5 = torch.randn(1, 2, 4, 32, generator=g)
    other_first = entity_t5.clone()
    other_first[:, 0] = torch.randn(4, 32, generator=g)
    with torch.no_grad():
        base = _dit_call(model, entity_t5, regions)
        changed = _dit_call(model, other_first, regions)
    torch.testing.assert_close(changed[:, outside], base[:, outside], atol=0, rtol=0)
    torch.testing.assert_close(changed[:, [2, 5]], base[:, [2, 5]], atol=0, rtol=0)  # entity 1's tokens
    assert (changed[:, [0, 1]] - base[:, [0, 1]]).abs().amin(dim=-1).gt(0).all()  # entity 0's tokens


def test_empty_regions_and_all_true_mask_change_nothing():
    """Entities covering no token leave the image as the plain call makes it (the global prompt and the
    image never see entity text); an all-True mask equals no mask."""
    model = make_dit()
    img, img_ids, txt, txt_ids, t, y, guidance = dit_inputs(batch=2, grid=(2, 4), txt_len=4)
    g = torch.Generator().manual_seed(3)
    entities = EliGenEntities(torch.randn(1, 2, 4, 32, generator=g), torch.zeros(1, 2, 8, dtype=torch.bool))
    joint, mask = joint_inputs(txt, entities, img.shape[1])
    with torch.no_grad():
        plain = model(img, img_ids, txt, txt_ids, t, y, guidance)
        empty = model(img, img_ids, joint, torch.zeros(joint.shape[1], 3), t, y, guidance, attn_mask=mask)
        full = torch.ones(1, 1, 12, 12, dtype=torch.bool)
        unmasked = model(img, img_ids, txt, txt_ids, t, y, guidance, attn_mask=full)
    torch.testing.assert_close(empty, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmasked, plain, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="attn_mask covers"):
        model(img, img_ids, txt, txt_ids, t, y, guidance, attn_mask=torch.ones(1, 1, 11, 11, dtype=torch.bool))


# ------------------------------------------------------------------ pipeline
def _entities():
    return ["a red hat", "a blue scarf"], [_mask(32, 32, (0, 0, 16, 32)), _mask(32, 32, (16, 16, 32, 32))]


def test_pipeline_without_entities_is_the_plain_pipeline(tiny_pipe):
    plain = tiny_pipe("a cat", seed=0, output_type="pt", **FAST)
    empty = tiny_pipe("a cat", seed=0, output_type="pt", eligen_entity_prompts=[], eligen_entity_masks=[], **FAST)
    torch.testing.assert_close(empty, plain, atol=0, rtol=0)
    blank = [_mask(32, 32), _mask(32, 32)]  # entities that cover nothing
    covered_nothing = tiny_pipe(
        "a cat", seed=0, output_type="pt", eligen_entity_prompts=["a hat", "a dog"], eligen_entity_masks=blank, **FAST
    )
    torch.testing.assert_close(covered_nothing, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("on_negative", [False, True], ids=["two-calls", "batched"])
def test_first_block_cache_with_entities_and_cfg(tiny_pipe, one_thread, on_negative):
    """Entities on the positive branch only: positive and negative run as two DiT calls per step, each
    with its own cache state (their texts differ in length); on both branches, one batched call."""
    prompts, masks = _entities()
    kw = dict(eligen_entity_prompts=prompts, eligen_entity_masks=masks, eligen_enable_on_negative=on_negative)
    options = {**FAST, "num_inference_steps": 3, "negative_prompt": "blurry", "cfg_scale": 2.0}
    check_pipeline_first_block_cache(
        tiny_pipe,
        lambda: tiny_pipe("a cat", seed=0, output_type="pt", **options, **kw),
        steps=3,
        calls_per_step=1 if on_negative else 2,
    )


def test_pipeline_with_two_entities_batch_and_cfg(tiny_pipe):
    prompts, masks = _entities()
    plain = tiny_pipe(["a cat", "a dog"], seed=0, output_type="pt", **FAST)
    kw = dict(seed=0, output_type="pt", eligen_entity_prompts=prompts, eligen_entity_masks=masks, **FAST)
    ent = tiny_pipe(["a cat", "a dog"], **kw)
    assert ent.shape == (2, 3, 32, 32)
    assert (ent - plain).abs().max() > 1e-4
    cfg = dict(negative_prompt="blurry", cfg_scale=2.0)
    positive_only = tiny_pipe(["a cat", "a dog"], **cfg, **kw)
    both = tiny_pipe(["a cat", "a dog"], **cfg, eligen_enable_on_negative=True, **kw)
    assert positive_only.shape == both.shape == (2, 3, 32, 32)
    assert (positive_only - both).abs().max() > 1e-5
    assert (positive_only - ent).abs().max() > 1e-5
    image = tiny_pipe("a cat", seed=0, eligen_entity_prompts="a red hat", eligen_entity_masks=masks[0], **FAST)
    assert isinstance(image, Image.Image)


@pytest.mark.parametrize("on_negative", [False, True])
def test_cfg_branches_match_separate_calls(tiny_pipe, on_negative):
    """The batched (on_negative) or split CFG evaluation equals guiding two separate velocity calls."""
    prompts, masks = _entities()
    text = tiny_pipe.encode_prompt(["a cat", "a dog"], 8)
    negative = tiny_pipe.encode_prompt(["blurry", "blurry"], 8)
    positive_e, negative_e = tiny_pipe.prepare_eligen(prompts, masks, negative, on_negative, 32, 32, 8)
    assert (negative_e is not None) == on_negative
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.7)
    got = tiny_pipe.predict(x, sigma, text, negative, 2.5, 3.5, entities=(positive_e, negative_e))
    pos = flux_velocity(tiny_pipe.dit, x, sigma.expand(2), text, 3.5, eligen=positive_e)
    neg = flux_velocity(tiny_pipe.dit, x, sigma.expand(2), negative, 3.5, eligen=negative_e)
    torch.testing.assert_close(got, neg + 2.5 * (pos - neg), atol=1e-5, rtol=1e-5)
    if on_negative:  # the negative prompt fills every entity slot
        torch.testing.assert_close(negative_e.t5[:, 1], negative.t5, atol=0, rtol=0)


def test_entity_input_errors(tiny_pipe, tmp_path):
    prompts, masks = _entities()
    cases = [
        (dict(eligen_entity_prompts=prompts), "eligen_entity_prompts is given without eligen_entity_masks"),
        (dict(eligen_entity_masks=masks), "eligen_entity_masks is given without eligen_entity_prompts"),
        (dict(eligen_entity_prompts=prompts, eligen_entity_masks=masks[:1]), "has 2 entries but"),
        (dict(eligen_entity_prompts=prompts, eligen_entity_masks=[masks[0], np.zeros((32, 32))]), r"masks\[1\]"),
        (dict(eligen_entity_prompts=[prompts[0], 3], eligen_entity_masks=masks), r"prompts\[1\] is a int"),
        (dict(eligen_entity_prompts=prompts, eligen_entity_masks=masks, eligen_enable_on_negative="yes"), "True or"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            tiny_pipe("a cat", **kwargs, **FAST)
    with pytest.raises(ConfigError, match="not an existing image file"):
        check_entity_inputs(["a hat"], [tmp_path / "missing.png"])
    path = tmp_path / "mask.png"
    masks[0].save(path)
    assert check_entity_inputs(["a hat"], [path])[1][0].size == (32, 32)


# ------------------------------------------------------------------ with tokens appended to the global prompt
@pytest.fixture(scope="module")
def addon_pipe(tiny_repo, tmp_path_factory):
    """A pipeline with an AttriCtrl encoder (4 tokens after both prompts) and a LoRA Encoder (one token per LoRA
    after the positive prompt), and a LoRA for the latter."""
    from diffsynth_flux_test_helpers import our_pipeline
    from safetensors.torch import save_file

    from diffsynth.flux.flux1.lora_encoder import FluxLoRAEncoder, LoRAEncoderConfig
    from diffsynth.flux.flux1.value_control import ValueEncoder, ValueEncoderConfig
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.runtime.testing.weights import random_weights

    root = tmp_path_factory.mktemp("eligen-addons")
    value = random_weights(ValueEncoder(ValueEncoderConfig(embedding_dim=16, dim=32, tokens=4)), 0, scale=0.3)
    sizes = dict(double_blocks=1, single_blocks=2, hidden=256, mlp_hidden=1024, dim=32, intermediate=64)
    encoder = random_weights(FluxLoRAEncoder(LoRAEncoderConfig(**sizes, head_dim=16, tokens_per_layer=4)), 8, scale=0.2)
    for module, name in ((value, "value.safetensors"), (encoder, "lora_encoder.safetensors")):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(root / name))
    configs = [ModelConfig(path=str(root / name)) for name in ("value.safetensors", "lora_encoder.safetensors")]
    pipe = our_pipeline(tiny_repo, model_configs=configs)
    g, lora = torch.Generator().manual_seed(1), {}
    for name, module in pipe.dit.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            lora[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.1
            lora[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.1
    save_file(lora, str(root / "lora.safetensors"))
    return pipe, str(root / "lora.safetensors")


def _dit_calls(pipe, **kwargs):
    seen = []
    hook = pipe.dit.register_forward_pre_hook(lambda m, args, kw: seen.append((args[2], kw.get("attn_mask"))),
                                              with_kwargs=True)  # fmt: skip
    try:
        out = pipe("a cat", seed=0, output_type="pt", **{**FAST, **kwargs})
    finally:
        hook.remove()
    return seen, out


@pytest.mark.parametrize("addon", ["value_controller", "lora_encoder"])
@pytest.mark.parametrize(
    "cfg",
    [{}, {"cfg_scale": 2.0}, {"cfg_scale": 2.0, "eligen_enable_on_negative": True}],
    ids=["no-cfg", "cfg", "cfg-on-negative"],
)
def test_entities_with_tokens_appended_to_the_global_prompt(addon_pipe, one_thread, addon, cfg):
    """AttriCtrl's / the LoRA Encoder's tokens extend the global prompt's segment (the entities stay at
    t5_sequence_length): the DiT's text ends in the text it reads without entities, and in the joint mask the
    appended tokens are global-prompt tokens (every token sees them as it sees the global prompt)."""
    pipe, lora = addon_pipe
    extra = {"value_controller": dict(value_controller_inputs=[0.7]), "lora_encoder": dict(lora_encoder_inputs=lora)}
    extra = {**extra[addon], **cfg, "negative_prompt": "blurry"}
    prompts, masks = _entities()
    plain, _ = _dit_calls(pipe, **extra)
    seen, image = _dit_calls(pipe, eligen_entity_prompts=prompts, eligen_entity_masks=masks, **extra)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    entity_len = FAST["t5_sequence_length"]
    start = len(prompts) * entity_len  # the global prompt's segment starts here
    positive_len = plain[0][0].shape[1]
    assert positive_len == entity_len + (4 if addon == "value_controller" else 1)
    torch.testing.assert_close(seen[0][0][:1, start:], plain[0][0][:1], atol=0, rtol=0)  # row 0: positive
    masked = [(txt, mask) for txt, mask in seen if mask is not None]
    assert masked and all(txt.shape[1] > start for txt, _ in masked)
    if cfg.get("eligen_enable_on_negative"):
        assert len(masked) == len(seen)  # both branches have the entities
    for txt, mask in masked:
        text_len = txt.shape[1]
        assert mask.shape[-1] == text_len + 4  # 2x2 image tokens
        glob = mask[..., start:text_len]  # every query's view of the global segment (appended tokens included)
        assert torch.equal(glob, glob[..., :1].expand_as(glob))
        rows = mask[..., start:text_len, :]  # what each token of the global segment sees
        assert torch.equal(rows, rows[..., :1, :].expand_as(rows))
        assert mask[..., text_len:, start:text_len].all()  # image tokens see the whole global segment
        assert not mask[..., start:text_len, :start].any()  # which sees no entity text
