"""FLUX.2 KV DiT (klein-9B-KV): cached reference keys and values.

Parity with diffusers' `Flux2Transformer2DModel` under its KV attention processors (the first step, which fills
the cache, and a cached step), the cache's contents, cached = recomputed, what the references depend on, the
config and the release detection, and the refusals.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffsynth_flux2_test_repo import dit_config

from diffsynth.flux.flux2.dit import Flux2DiT, Flux2DiTConfig, ReferenceCache
from diffsynth.flux.flux2.formats import config_from_state, released_as_kv
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

flux2_dit_tests = load_beside(__file__, "test_flux2_dit.py", "diffsynth_flux2_dit_tests")  # its `reference_dit`
CONTEXT = 32


def kv_config(guidance_embed: bool = False, causal_references: bool = True) -> Flux2DiTConfig:
    """The tiny pipeline DiT (`flux2_repo.dit_config`) with two double blocks, so both block lists have a
    first block and later ones."""
    config_json = dict(dit_config(guidance=guidance_embed, context=CONTEXT), num_layers=2)
    return replace(config_from_state({}, config_json), causal_references=causal_references)


def make_dit(config: Flux2DiTConfig, seed: int = 0) -> Flux2DiT:
    model = Flux2DiT(config)
    return random_weights(model, seed, scale=0.2, is_norm=lambda name, p: name.endswith(".scale")).eval()


def grid_ids(height: int, width: int, t: int = 0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)


def step_inputs(batch: int = 2, seed: int = 0, grid=(3, 4), txt_len: int = 5):
    """img, img_ids, txt, txt_ids, timesteps, guidance of one step."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, grid[0] * grid[1], 16, generator=g)
    txt = torch.randn(batch, txt_len, CONTEXT, generator=g)
    txt_ids = torch.zeros(txt_len, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(txt_len)
    return (
        img,
        grid_ids(*grid),
        txt,
        txt_ids,
        torch.rand(batch, generator=g),
        1.0 + 4.0 * torch.rand(batch, generator=g),
    )


def references(seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reference images (2x3 and 3x2 tokens at t = 10, 20), shared by the batch: `[1, 12, 16]`, `[12, 4]`."""
    tokens = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(seed))
    return tokens, torch.cat([grid_ids(2, 3, t=10), grid_ids(3, 2, t=20)])


def call(dit, inputs, **kwargs) -> torch.Tensor:
    img, img_ids, txt, txt_ids, t, g = inputs
    with torch.no_grad():
        return dit(img, img_ids, txt, txt_ids, t, g if dit.config.guidance_embed else None, **kwargs)


# ------------------------------------------------------------------ parity with diffusers
def diffusers_kv_dit(ours: Flux2DiT):
    """diffusers' transformer with our weights and its KV attention processors (as `Flux2KleinKVPipeline` sets)."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    model = flux2_dit_tests.reference_dit(ours.config, ours)
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    print(f"{what}: max abs diff {diff:.3g}, scale {scale:.3g}")
    assert scale > 0.1  # a vacuous comparison (all zeros) would prove nothing
    assert diff <= 1e-5 * max(1.0, scale), f"{what}: max abs diff {diff:.3g} (scale {scale:.3g}) vs diffusers"


@pytest.mark.parity
@pytest.mark.parametrize("guidance_embed", [False, True])
def test_first_and_cached_steps_match_diffusers_kv_processors(guidance_embed, one_thread):
    """Step 0: diffusers' "extract" mode over `[references, image]` vs our reference pass + main pass (the cache's
    keys and values too); step 1: diffusers' "cached" mode vs ours reading the cache."""
    pytest.importorskip("diffusers")
    ours = make_dit(kv_config(guidance_embed), seed=3)
    theirs = diffusers_kv_dit(ours)
    ref, ref_ids = references()
    first, later = step_inputs(seed=1), step_inputs(seed=2)
    img, img_ids, txt, txt_ids, t, g = first
    g = g if guidance_embed else None
    cache = ReferenceCache()
    got = call(ours, first, reference=ref, reference_ids=ref_ids, cache=cache)
    with torch.no_grad():
        want, their_cache = theirs(
            hidden_states=torch.cat([ref.expand(2, -1, -1), img], dim=1),
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=torch.cat([ref_ids, img_ids]),
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
            kv_cache_mode="extract",
            num_ref_tokens=ref.shape[1],
        )
    close(got, want, "first step")
    assert cache.filled and (cache.tokens, len(cache.layers)) == (12, 4)
    theirs_layers = their_cache.double_block_caches + their_cache.single_block_caches
    for index, ((k, v), layer) in enumerate(zip(cache.layers, theirs_layers, strict=True)):
        close(k.expand(2, -1, -1, -1), layer.k_ref, f"keys of block {index}")
        close(v.expand(2, -1, -1, -1), layer.v_ref, f"values of block {index}")

    img, img_ids, txt, txt_ids, t, g = later
    with torch.no_grad():
        want = theirs(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g if guidance_embed else None,
            return_dict=False,
            kv_cache=their_cache,
            kv_cache_mode="cached",
        )[0]
    close(call(ours, later, cache=cache), want, "cached step")


@pytest.mark.parity
def test_kv_model_without_references_matches_diffusers_plain_forward(one_thread):
    pytest.importorskip("diffusers")
    ours = make_dit(kv_config(), seed=4)
    img, img_ids, txt, txt_ids, t, _ = inputs = step_inputs(seed=3)
    with torch.no_grad():
        want = diffusers_kv_dit(ours)(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
    close(call(ours, inputs), want, "no references")


# ------------------------------------------------------------------ the cache
def test_cached_steps_equal_recomputed_references(one_thread):
    dit = make_dit(kv_config(), seed=5)
    ref, ref_ids = references()
    cache = ReferenceCache()
    first = call(dit, step_inputs(seed=1), reference=ref, reference_ids=ref_ids, cache=cache)
    torch.testing.assert_close(
        first, call(dit, step_inputs(seed=1), reference=ref, reference_ids=ref_ids), rtol=0, atol=0
    )
    later = step_inputs(seed=2)
    recomputed = call(dit, later, reference=ref, reference_ids=ref_ids)
    torch.testing.assert_close(call(dit, later, cache=cache), recomputed, rtol=0, atol=0)
    torch.testing.assert_close(call(dit, later, reference=ref, reference_ids=ref_ids, cache=cache), recomputed)
    assert (call(dit, later) - recomputed).abs().max() > 1e-3  # the references are attended to
    cache.clear()
    assert not cache.filled and repr(cache) == "ReferenceCache(empty)"


def test_references_depend_on_neither_prompt_image_nor_step(one_thread):
    """What makes one cache serve every step and both halves of a CFG batch."""
    dit = make_dit(kv_config(), seed=6)
    ref, ref_ids = references()
    caches = [ReferenceCache(), ReferenceCache()]
    for cache, seed, batch in zip(caches, (1, 2), (1, 3), strict=True):
        call(
            dit,
            step_inputs(batch=batch, seed=seed, txt_len=4 + seed),
            reference=ref,
            reference_ids=ref_ids,
            cache=cache,
        )
    for (k1, v1), (k2, v2) in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert caches[0].batch == 1  # shared by the batch (no guidance embedder)


def test_kv_flag_changes_nothing_without_references(one_thread):
    kv, plain = make_dit(kv_config(), seed=7), make_dit(kv_config(causal_references=False), seed=7)
    torch.testing.assert_close(call(kv, step_inputs()), call(plain, step_inputs()), rtol=0, atol=0)


def test_gradients_reach_the_reference_pass_and_checkpointing_agrees():
    """Training a KV model recomputes its references every step, through the same blocks."""
    ref, ref_ids = references()
    img, img_ids, txt, txt_ids, t, _ = step_inputs(batch=1)
    results = []
    for checkpointing in (False, True):
        dit = make_dit(kv_config(), seed=8).train()
        dit.gradient_checkpointing = checkpointing
        tokens = ref.clone().requires_grad_()
        out = dit(img, img_ids, txt, txt_ids, t, reference=tokens, reference_ids=ref_ids)
        out.square().mean().backward()
        results.append((out.detach(), tokens.grad, dit.img_in.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert results[0][1].abs().max() > 0  # the output depends on the reference tokens through their keys/values


# ------------------------------------------------------------------ config and release detection
def test_kv_variant_and_config_field():
    kv = Flux2DiTConfig.variant("FLUX.2-klein-9b-kv")
    assert kv == replace(Flux2DiTConfig.variant("klein-9b"), causal_references=True)
    assert not Flux2DiTConfig.variant("klein-9b").causal_references
    assert config_from_state({}, dict(dit_config(False, CONTEXT), causal_references=True)).causal_references
    assert not config_from_state({}, dit_config(False, CONTEXT)).causal_references
    with pytest.raises(ValueError, match="causal_references"):
        replace(kv_config(), causal_references="yes")


def test_released_as_kv_by_repo_or_model_index(tmp_path):
    assert released_as_kv("black-forest-labs/FLUX.2-klein-9b-kv", [])
    assert released_as_kv("Black-Forest-Labs/FLUX.2-Klein-9B-KV", [])
    assert not released_as_kv("black-forest-labs/FLUX.2-klein-9B", [])
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    assert not released_as_kv(None, [str(weights)])
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    assert not released_as_kv(None, [str(weights)])
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinKVPipeline"}))
    assert released_as_kv(None, [str(weights)])
    assert released_as_kv(None, [str(tmp_path / "flux-2-klein-9b-kv.safetensors")])  # a single file at the root


# ------------------------------------------------------------------ refusals
def test_refusals_name_the_problem(one_thread):
    ref, ref_ids = references()
    inputs = step_inputs()
    with pytest.raises(ConfigError, match="causal_references"):
        call(make_dit(kv_config(causal_references=False)), inputs, reference=ref, reference_ids=ref_ids)
    dit = make_dit(kv_config())
    with pytest.raises(TypeError, match="ReferenceCache"):
        call(dit, inputs, reference=ref, reference_ids=ref_ids, cache={})
    with pytest.raises(ValueError, match="reference_ids"):
        call(dit, inputs, cache=ReferenceCache())
    with pytest.raises(ValueError, match="reference_ids"):
        call(dit, inputs, reference=ref)
    with pytest.raises(ValueError, match="in_channels=16"):
        call(dit, inputs, reference=ref[..., :8], reference_ids=ref_ids)
    with pytest.raises(ValueError, match="reference has shape"):
        call(dit, inputs, reference=ref.expand(3, -1, -1), reference_ids=ref_ids)
    with pytest.raises(ValueError, match=r"reference_ids has shape \(10, 4\)"):
        call(dit, inputs, reference=ref, reference_ids=ref_ids[:10])
    cache = ReferenceCache()
    call(dit, inputs, reference=ref, reference_ids=ref_ids, cache=cache)
    with pytest.raises(ValueError, match="clear"):
        call(dit, inputs, reference=ref[:, :6], reference_ids=ref_ids[:6], cache=cache)
    guided = make_dit(kv_config(guidance_embed=True))  # per-sample guidance: a cache of the batch's size
    guided_cache = ReferenceCache()
    call(guided, inputs, reference=ref, reference_ids=ref_ids, cache=guided_cache)
    assert guided_cache.batch == 2
    with pytest.raises(ValueError, match="batch 3"):
        call(guided, step_inputs(batch=3), cache=guided_cache)
