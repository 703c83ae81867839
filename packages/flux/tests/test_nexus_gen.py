"""Nexus-Gen V2 (`flux1/nexus_gen.py`, `flux1/nexus_gen_projector.py`, the pipeline's Nexus-Gen path).

- the autoregressive model's image embeddings against a direct transformers computation (`Qwen2_5_VLModel`, the
  same tiny weights) of DiffSynth-Studio's algorithm, with Qwen2.5-VL's mRoPE positions written out by hand;
- the processor's text against Qwen2.5-VL's chat template;
- the editing adapter against a plain-torch reference of DiffSynth-Studio's merger; full-size adapter, decoder-DiT
  and autoregressive key/shape checks on meta, from the key names DiffSynth-Studio's converters read;
- the pipeline (tiny Nexus-Gen + tiny FLUX.1 through the preset): seeded determinism, the adapter each mode takes,
  the DiT's text tokens and positions, and errors naming the argument.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffsynth_step1x_test_repo import QWEN25VL_CHAT_TEMPLATE, VISION_TOKENS
from PIL import Image
from safetensors.torch import save_file

from diffsynth.flux.flux1.nexus_gen import (
    NEXUS_GEN_AR_SPEC,
    NEXUS_GEN_DIT_SPEC,
    TARGET_TOKENS,
    NexusGenProcessor,
    chat_text,
    editing_messages,
    generation_messages,
)
from diffsynth.flux.flux1.nexus_gen_projector import (
    NEXUS_GEN_EDITING_ADAPTER_SPEC,
    NEXUS_GEN_GENERATION_ADAPTER_SPEC,
    NexusGenAdapter,
    NexusGenAdapterConfig,
    NexusGenImageEmbeddingMerger,
    NexusGenMergerConfig,
)
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.weights import random_weights

# a tiny Nexus-Gen: 256-wide Qwen2.5-VL (two 128-wide heads, as the 7B's), adapters to the tiny DiT's 32-wide text
AR_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 256,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 256,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [0],
    },
}  # fmt: skip
MERGER = dict(hidden_size=256, num_heads=2, num_kv_heads=1, intermediate_size=64, out_dim=32, expand_ratio=4)
ADAPTER = dict(input_dim=256, output_dim=32)
PROMPTS = ["a cat on a red sofa", "Add a crown.", "Generate an image according to the following description:"]


# ----------------------------------------------------------------------------------- tiny repo
def _tokenizer(folder: Path):
    from diffsynth.runtime.testing.tokenizers import build_tiny_qwen_tokenizer

    texts = [chat_text(generation_messages(p)) + chat_text(editing_messages(p)) for p in PROMPTS] * 3
    tokenizer = build_tiny_qwen_tokenizer(folder, texts=texts, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _ar_model(tokenizer):
    ids = {f"{n}_token_id": tokenizer.convert_tokens_to_ids(f"<|{n}|>") for n in ("vision_start", "vision_end")}
    ids["image_token_id"] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids["video_token_id"] = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    config = dict(AR_CONFIG, vocab_size=len(tokenizer), **ids)
    model = NEXUS_GEN_AR_SPEC.build(NEXUS_GEN_AR_SPEC.config_from_state({}, config))
    return random_weights(model, 31, scale=0.2).eval(), config


def _ar_file_state(model, vocab: int) -> dict[str, torch.Tensor]:
    """Our weights in the released layout (`model.*` language model, `lm_head`, the two Nexus-Gen tensors)."""
    state = {}
    for key, value in model.state_dict().items():
        name = "model." + key[len("language_model.") :] if key.startswith("language_model.") else key
        state[name] = value.contiguous()
    state["lm_head.weight"] = torch.randn(vocab, 256, generator=torch.Generator().manual_seed(32))
    return state


# DiffSynth-Studio's FluxDiT names for BFL's (its civitai converter's tables, read the other way) -- test data
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_embedder.timestep_embedder.0",
    "time_in.out_layer": "time_embedder.timestep_embedder.2", "guidance_in.in_layer":
    "guidance_embedder.timestep_embedder.0", "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2",
    "vector_in.in_layer": "pooled_text_embedder.0", "vector_in.out_layer": "pooled_text_embedder.2",
    "final_layer.adaLN_modulation.1": "final_norm_out.linear", "final_layer.linear": "final_proj_out",
}  # fmt: skip
_DOUBLE = {
    "img_attn.norm.key_norm.scale": "attn.norm_k_a.weight", "img_attn.norm.query_norm.scale": "attn.norm_q_a.weight",
    "img_attn.proj": "attn.a_to_out", "img_attn.qkv": "attn.a_to_qkv", "img_mlp.0": "ff_a.0", "img_mlp.2": "ff_a.2",
    "img_mod.lin": "norm1_a.linear", "txt_attn.norm.key_norm.scale": "attn.norm_k_b.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_q_b.weight", "txt_attn.proj": "attn.b_to_out",
    "txt_attn.qkv": "attn.b_to_qkv", "txt_mlp.0": "ff_b.0", "txt_mlp.2": "ff_b.2", "txt_mod.lin": "norm1_b.linear",
}  # fmt: skip
_SINGLE = {
    "linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear",
    "norm.key_norm.scale": "norm_k_a.weight", "norm.query_norm.scale": "norm_q_a.weight",
}  # fmt: skip


def diffsynth_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-named DiT -> `pipe.dit.*` as the decoder files store it (final modulation as (scale, shift))."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            table = _DOUBLE if parts[0] == "double_blocks" else _SINGLE
            rest = ".".join(parts[2:])
            base = rest if rest in table else rest.rsplit(".", 1)[0]
            name = table[base] + rest[len(base) :]
            new = f"{'blocks' if parts[0] == 'double_blocks' else 'single_blocks'}.{parts[1]}.{name}"
        else:
            base, suffix = key.rsplit(".", 1)
            new = f"{_TOP[base]}.{suffix}"
            if base == "final_layer.adaLN_modulation.1":
                value = torch.cat(value.chunk(2)[::-1])
        out["pipe.dit." + new] = value.contiguous()
    return out


def _tiny_dit(tiny_configs):
    from diffsynth.flux.flux1.formats import FLUX1_DIT_SPEC

    dit = FLUX1_DIT_SPEC.build(FLUX1_DIT_SPEC.config_from_state({}, tiny_configs["dit"]))
    return random_weights(dit, 41, scale=0.05, is_norm=lambda name, p: name.endswith(".scale")).eval()


@pytest.fixture(scope="module")
def nexus_parts(tmp_path_factory, tiny_configs):
    """The tiny AR model, processor, adapters and DiT, and a model base holding DiffSynth-Studio/Nexus-GenV2."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("nexus")
    repo = root / "DiffSynth-Studio" / "Nexus-GenV2"
    processor_dir = repo / "processor"
    tokenizer = _tokenizer(processor_dir)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil().save_pretrained(str(processor_dir))
    ar, config = _ar_model(tokenizer)
    (repo / "config.json").write_text(json.dumps(config))
    save_file(_ar_file_state(ar, len(tokenizer)), str(repo / "model-00001-of-00001.safetensors"))
    merger = random_weights(NexusGenImageEmbeddingMerger(NexusGenMergerConfig(**MERGER)), 42, scale=0.1).eval()
    adapter = random_weights(NexusGenAdapter(NexusGenAdapterConfig(**ADAPTER)), 43, scale=0.1).eval()
    dit = _tiny_dit(tiny_configs)
    dit_state = diffsynth_names(dit.state_dict())
    merger_state = {f"embedding_merger.{k}": v for k, v in merger.state_dict().items()}
    torch.save({**dit_state, **merger_state}, repo / "edit_decoder.bin")
    torch.save({**dit_state, **adapter.state_dict()}, repo / "generation_decoder.bin")
    processor = NexusGenProcessor.from_folder(processor_dir)
    return dict(root=root, repo=repo, ar=ar, processor=processor, merger=merger, adapter=adapter, dit=dit)


def _photo(width=90, height=60, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------- the AR model
def _mrope_positions(input_ids, grids, image_token_id) -> torch.Tensor:
    """Qwen2.5-VL's `get_rope_index` (transformers 4.49, still images) by hand: text one step at a time, each image's
    merged patches at (0, row, col) after the running position, the next text after their largest."""
    ids, blocks, cur, i, grids = input_ids[0].tolist(), [], 0, 0, iter(grids.tolist())
    while i < len(ids):
        if ids[i] == image_token_id:
            _, h, w = next(grids)
            rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
            block = torch.stack([torch.zeros(rows.numel(), dtype=torch.long), rows.flatten(), cols.flatten()]) + cur
            cur, i = int(block.max()) + 1, i + rows.numel()
        else:
            block, cur, i = torch.full((3, 1), cur), cur + 1, i + 1
        blocks.append(block)
    return torch.cat(blocks, dim=1)[:, None, :]


def _reference_embeddings(ar, inputs):
    """DiffSynth-Studio's `get_target_embeddings` on transformers' `Qwen2_5_VLModel` holding the same weights."""
    from transformers import Qwen2_5_VLModel

    ref = Qwen2_5_VLModel(ar.config).eval()
    state = {k: v for k, v in ar.state_dict().items() if not k.startswith(("vision_head", "image_prefill"))}
    ref.load_state_dict(state)
    ids, mask, grid = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    with torch.no_grad():
        embeds = ref.get_input_embeddings()(ids)
        image = ref.visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        given = image[:-TARGET_TOKENS]
        image_mask = ids == ar.config.image_token_id
        input_mask = (image_mask.cumsum(dim=1) <= given.shape[0]) & image_mask
        target_mask = image_mask & ~input_mask
        embeds = embeds.masked_scatter(input_mask[..., None].expand_as(embeds), given)
        prefill = ar.image_prefill_embeds(torch.arange(TARGET_TOKENS))
        embeds = embeds.masked_scatter(target_mask[..., None].expand_as(embeds), prefill)
        positions = _mrope_positions(ids, grid, ar.config.image_token_id)
        hidden = ref(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).last_hidden_state
        out = torch.nn.functional.linear(hidden, ar.vision_head.weight)[:, :-1][target_mask[:, 1:]]
    return out, given


@pytest.mark.parametrize("edit", [False, True], ids=["generation", "editing"])
def test_image_embeddings_match_a_direct_transformers_computation(nexus_parts, edit):
    ar, processor = nexus_parts["ar"], nexus_parts["processor"]
    inputs = processor(PROMPTS[1] if edit else PROMPTS[0], _photo() if edit else None)
    predicted, given, grids = ar.image_embeddings(inputs)
    expected, expected_given = _reference_embeddings(ar, inputs)
    assert predicted.shape == (TARGET_TOKENS, 256) and grids[-1].tolist() == [1, 18, 18]
    assert given.shape[0] == (int(grids[0].prod()) // 4 if edit else 0)
    diff = (predicted - expected).abs().max().item()
    assert diff < 1e-5, diff
    assert torch.equal(given, expected_given)
    # the prefill embeddings matter: other ones predict something else
    with torch.no_grad():
        saved = ar.image_prefill_embeds.weight.clone()
        ar.image_prefill_embeds.weight.add_(1.0)
        try:
            assert (ar.image_embeddings(inputs)[0] - predicted).abs().max() > 1e-3
        finally:
            ar.image_prefill_embeds.weight.copy_(saved)


def test_processor_follows_the_chat_template_and_bounds_the_reference(nexus_parts):
    processor = nexus_parts["processor"]
    tokenizer = processor.tokenizer
    for messages in (generation_messages(PROMPTS[0]), editing_messages(PROMPTS[1])):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert chat_text(messages) == rendered.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    assert editing_messages("<image> make it red")[0]["content"] == "<image> make it red"  # the mark is kept
    big = _photo(1200, 700)
    inputs = processor(PROMPTS[1], big)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (h * 14) * (w * 14) <= 262640 and abs(w / h - 1200 / 700) < 0.1  # bounded at about the aspect ratio
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == h * w // 4 + TARGET_TOKENS
    with pytest.raises(ConfigError, match="extra '<image>'"):
        processor("<image> and <image>", big)


# ----------------------------------------------------------------------------------- adapters
def _reference_merger(merger, embeds, grid, ref_embeds, ref_grid):
    """DiffSynth-Studio's `NexusGenImageEmbeddingMerger.forward` in plain torch (explicit softmax, rotate-half mRoPE
    over `mrope_section * 2` chunks of cat(freqs, freqs))."""
    cfg, state = merger.config, merger.state_dict()

    def positions(g):
        t, h, w = g.tolist()
        hh = torch.arange(h // 2).view(1, -1, 1).expand(t, -1, w // 2).flatten() * (72 / h)
        ww = torch.arange(w // 2).view(1, 1, -1).expand(t, h // 2, -1).flatten() * (72 / w)
        tt = (torch.arange(t).view(-1, 1).expand(-1, h * w // 4) * 2).flatten()
        return torch.stack([tt, hh, ww])[:, None, :]  # [3, 1, L]

    pos = torch.cat([positions(grid), positions(ref_grid)], dim=-1)
    x = torch.cat([embeds, ref_embeds], dim=1)
    head = cfg.hidden_size // cfg.num_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, head, 2, dtype=torch.int64).float() / head))
    freqs = (inv[None, None, :, None].expand(3, 1, -1, 1) @ pos[:, :, None, :].float()).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    sections = list(cfg.mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(emb.cos().split(sections, dim=-1))], dim=-1)[:, None]
    sin = torch.cat([m[i % 3] for i, m in enumerate(emb.sin().split(sections, dim=-1))], dim=-1)[:, None]

    def rms(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6))

    def half(v):
        return torch.cat((-v[..., v.shape[-1] // 2 :], v[..., : v.shape[-1] // 2]), dim=-1)

    def lin(v, name, bias=True):
        return torch.nn.functional.linear(v, state[f"{name}.weight"], state.get(f"{name}.bias") if bias else None)

    b, n, _ = x.shape
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(b, n, -1, head).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj").view(b, n, -1, head).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj").view(b, n, -1, head).transpose(1, 2)
        q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        weights = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head), dim=-1)
        x = x + lin((weights @ v).transpose(1, 2).reshape(b, n, -1), p + "self_attn.o_proj", bias=False)
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        gated = torch.nn.functional.silu(lin(h, p + "mlp.gate_proj", False)) * lin(h, p + "mlp.up_proj", False)
        x = x + lin(gated, p + "mlp.down_proj", bias=False)
    x = lin(rms(x, state["projector.0.weight"]), "projector.1")
    x = lin(torch.nn.functional.silu(rms(x, state["projector.2.weight"])), "projector.4")
    return rms(x, state["projector.5.weight"])


def test_editing_adapter_matches_diffsynth_studios_merger(nexus_parts):
    merger = nexus_parts["merger"]
    gen = torch.Generator().manual_seed(5)
    embeds, ref = torch.randn(1, 81, 256, generator=gen), torch.randn(1, 12 * 20 // 4, 256, generator=gen)
    grid, ref_grid = torch.tensor([1, 18, 18]), torch.tensor([1, 12, 20])
    with torch.no_grad():
        ours = merger(embeds, grid, ref, ref_grid)
        expected = _reference_merger(merger, embeds, grid, ref, ref_grid)
    assert ours.shape == (1, 81 + 60, 32)
    diff = (ours - expected).abs().max().item()
    assert diff < 1e-4, diff


def _meta_shapes(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_adapters_keys_and_shapes_on_meta():
    """The keys DiffSynth-Studio's converters hand its modules (`embedding_merger.` stripped, `adapter.` kept), at
    Nexus-GenV2's sizes, recognised and rebuilt from their own shapes."""
    h, wide, out = 3584, 4 * 4096, 4096
    merger = {
        "layers.0.self_attn.q_proj.weight": (h, h), "layers.0.self_attn.q_proj.bias": (h,),
        "layers.0.self_attn.k_proj.weight": (512, h), "layers.0.self_attn.k_proj.bias": (512,),
        "layers.0.self_attn.v_proj.weight": (512, h), "layers.0.self_attn.v_proj.bias": (512,),
        "layers.0.self_attn.o_proj.weight": (h, h), "layers.0.mlp.gate_proj.weight": (18944, h),
        "layers.0.mlp.up_proj.weight": (18944, h), "layers.0.mlp.down_proj.weight": (h, 18944),
        "layers.0.input_layernorm.weight": (h,), "layers.0.post_attention_layernorm.weight": (h,),
        "projector.0.weight": (h,), "projector.1.weight": (wide, h), "projector.1.bias": (wide,),
        "projector.2.weight": (wide,), "projector.4.weight": (out, wide), "projector.4.bias": (out,),
        "projector.5.weight": (out,),
    }  # fmt: skip
    adapter = {
        "adapter.0.weight": (out, h), "adapter.0.bias": (out,), "adapter.1.weight": (out,), "adapter.1.bias": (out,),
        "adapter.3.weight": (out, out), "adapter.3.bias": (out,), "adapter.4.weight": (out,), "adapter.4.bias": (out,),
    }  # fmt: skip
    with torch.device("meta"):
        assert _meta_shapes(NexusGenImageEmbeddingMerger()) == merger
        assert _meta_shapes(NexusGenAdapter()) == adapter
        for spec, keys, prefix in (
            (NEXUS_GEN_EDITING_ADAPTER_SPEC, merger, "embedding_merger."),
            (NEXUS_GEN_GENERATION_ADAPTER_SPEC, adapter, ""),
        ):
            state = {prefix + k: torch.empty(s) for k, s in keys.items()}
            layout = spec.match(state)
            ours = layout.to_ours(state)
            assert _meta_shapes(spec.build(spec.config_from_state(ours))) == keys
    assert (
        NEXUS_GEN_EDITING_ADAPTER_SPEC.config_from_state({k: torch.empty(s, device="meta") for k, s in merger.items()})
        == NexusGenMergerConfig()
    )


def test_full_size_decoder_dit_and_autoregressive_keys_on_meta():
    """FLUX.1-dev's DiT in DiffSynth-Studio's names under `pipe.dit.` loads into ours (all keys, same shapes), and the
    7B autoregressive file (Qwen2.5-VL hub layout + the two Nexus-Gen tensors) into `NexusGenAutoregressiveModel`."""
    from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
    from diffsynth.runtime.models.qwen25vl import QWEN25VL_7B_TEXT

    with torch.device("meta"):
        dit = Flux1DiT(Flux1DiTConfig())
        file = {k: torch.empty(v.shape) for k, v in diffsynth_names(dit.state_dict()).items()}
        ours = NEXUS_GEN_DIT_SPEC.match(file).to_ours(file)
        assert _meta_shapes(Flux1DiT(NEXUS_GEN_DIT_SPEC.config_from_state(ours))) == {
            k: tuple(v.shape) for k, v in ours.items()
        }
        assert ours.keys() == dit.state_dict().keys() and "blocks.18.attn.a_to_qkv.weight" in {
            k[len("pipe.dit.") :] for k in file
        }
        text = dict(
            QWEN25VL_7B_TEXT, vocab_size=152064, hidden_size=3584, num_hidden_layers=1, intermediate_size=18944,
            num_attention_heads=28, num_key_value_heads=4,
        )  # fmt: skip
        from transformers import Qwen2_5_VLConfig

        model = NEXUS_GEN_AR_SPEC.build(Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 1}))
        shapes = _meta_shapes(model)
    assert shapes["vision_head.weight"] == (3584, 3584) and shapes["image_prefill_embeds.weight"] == (81, 3584)
    file = {
        ("model." + k[len("language_model.") :] if k.startswith("language_model.") else k): s for k, s in shapes.items()
    }
    file["lm_head.weight"] = (152064, 3584)
    meta = {k: torch.empty(s, device="meta") for k, s in file.items()}
    converted = NEXUS_GEN_AR_SPEC.match(meta).to_ours(meta)
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes  # every key but lm_head, same shapes


# ----------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def model_base(nexus_parts, bfl_repo_base):
    base = nexus_parts["root"]
    link = base / "black-forest-labs"
    if not link.exists():
        link.symlink_to(bfl_repo_base / "black-forest-labs", target_is_directory=True)
    return base


def _pipe(model_base, preset="DiffSynth-Studio/Nexus-GenV2"):
    from diffsynth.flux.pipeline import FluxImagePipeline

    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(model_base))
    mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    try:
        return FluxImagePipeline.from_pretrained(preset, torch_dtype="float32", device="cpu")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def edit_pipe(model_base):
    return _pipe(model_base)


@pytest.fixture(scope="module")
def generation_pipe(model_base):
    return _pipe(model_base, "DiffSynth-Studio/Nexus-GenV2:generation")


def _run(pipe, seed=0, capture=None, **kwargs):
    calls = []
    hook = pipe.dit.register_forward_hook(
        lambda module, args, output: calls.append((args[2].clone(), args[3].clone())), with_kwargs=False
    )
    try:
        image = pipe(
            prompt=kwargs.pop("prompt", PROMPTS[1]), seed=seed, height=32, width=48, num_inference_steps=2,
            output_type="pt", progress_bar=False, **kwargs,
        )  # fmt: skip
    finally:
        hook.remove()
    if capture is not None:
        capture.extend(calls)
    return image


def test_decoders_load_the_dit_strictly_and_their_adapter(nexus_parts, edit_pipe, generation_pipe):
    for pipe in (edit_pipe, generation_pipe):
        assert pipe.dit.state_dict().keys() == nexus_parts["dit"].state_dict().keys()
        for key, value in nexus_parts["dit"].state_dict().items():
            assert torch.equal(pipe.dit.state_dict()[key], value), key  # incl. the swapped final modulation
        assert pipe.nexus_gen is not None and pipe.nexus_gen_processor is not None
    assert edit_pipe.nexus_gen_generation_adapter is None and generation_pipe.nexus_gen_editing_adapter is None
    for key, value in nexus_parts["merger"].state_dict().items():
        assert torch.equal(edit_pipe.nexus_gen_editing_adapter.state_dict()[key], value)
    for key, value in nexus_parts["adapter"].state_dict().items():
        assert torch.equal(generation_pipe.nexus_gen_generation_adapter.state_dict()[key], value)
    assert edit_pipe.defaults["cfg_scale"] == 2.0 and edit_pipe.defaults["num_inference_steps"] == 50
    assert (edit_pipe.defaults["height"], edit_pipe.defaults["width"]) == (512, 512)


def test_generation_takes_the_generation_adapter_and_is_seeded(nexus_parts, generation_pipe):
    calls = []
    first = _run(generation_pipe, seed=3, capture=calls, prompt=PROMPTS[0], cfg_scale=3.0)
    assert torch.equal(first, _run(generation_pipe, seed=3, prompt=PROMPTS[0], cfg_scale=3.0))
    assert (first - _run(generation_pipe, seed=4, prompt=PROMPTS[0], cfg_scale=3.0)).abs().max() > 1e-3
    predicted, _, _ = nexus_parts["ar"].image_embeddings(nexus_parts["processor"](PROMPTS[0]))
    with torch.no_grad():
        tokens = nexus_parts["adapter"](predicted[None])
    positive = [(txt, ids) for txt, ids in calls if txt.shape[1] == TARGET_TOKENS]
    negative = [(txt, ids) for txt, ids in calls if txt.shape[1] != TARGET_TOKENS]
    assert len(positive) == len(negative) == 2  # true CFG: the negative prompt keeps its T5 states
    for txt, ids in positive:
        assert (txt - tokens).abs().max() < 1e-5 and not ids.any()


def test_editing_takes_the_editing_adapter_at_2d_text_positions(nexus_parts, edit_pipe):
    calls, photo = [], _photo()
    first = _run(edit_pipe, seed=1, capture=calls, nexus_gen_reference_image=photo)
    assert torch.equal(first, _run(edit_pipe, seed=1, nexus_gen_reference_image=photo))
    other = _run(edit_pipe, seed=1, nexus_gen_reference_image=_photo(seed=9))
    assert (first - other).abs().max() > 1e-4  # the reference image steers the result
    predicted, given, grids = nexus_parts["ar"].image_embeddings(nexus_parts["processor"](PROMPTS[1], photo))
    with torch.no_grad():
        tokens = nexus_parts["merger"](predicted[None], grids[1], given[None], grids[0])
    positive = [(txt, ids) for txt, ids in calls if txt.shape[1] == tokens.shape[1]]
    assert len(positive) == 2 and len(calls) == 4
    (_, h, w), latent = grids[0].tolist(), (32 // 8, 48 // 8)
    rows = [(0.0, r * latent[0] / 18, c * latent[1] / 18) for r in range(9) for c in range(9)]
    rows += [(1.0, r * latent[0] / h, c * latent[1] / w) for r in range(h // 2) for c in range(w // 2)]
    for txt, ids in positive:
        assert (txt - tokens).abs().max() < 1e-5
        assert torch.allclose(ids.reshape(-1, 3), torch.tensor(rows), atol=1e-6)


def test_cli_edit_image_is_the_reference(edit_pipe, tiny_pipe):
    assert edit_pipe.cli_options({"edit_image": ["cat.png"]}) == {"nexus_gen_reference_image": "cat.png"}
    assert tiny_pipe.cli_options({"edit_image": ["cat.png"]}) == {"kontext_images": ["cat.png"]}


def test_errors_name_the_argument(edit_pipe, generation_pipe, tiny_pipe):
    with pytest.raises(ConfigError, match="nexus_gen_reference_image was given but no Nexus-Gen model"):
        _run(tiny_pipe, nexus_gen_reference_image=_photo())
    with pytest.raises(ConfigError, match="nexus_gen_reference_image needs Nexus-Gen's editing decoder"):
        _run(generation_pipe, nexus_gen_reference_image=_photo())
    with pytest.raises(ConfigError, match="give nexus_gen_reference_image"):
        _run(edit_pipe)
    with pytest.raises(ConfigError, match="eligen_entity_prompts"):
        _run(
            edit_pipe, nexus_gen_reference_image=_photo(), eligen_entity_prompts=["a cat"],
            eligen_entity_masks=[Image.new("L", (48, 32), 255)],
        )  # fmt: skip
