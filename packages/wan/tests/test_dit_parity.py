"""Our Wan DiT against diffusers' `WanTransformer3DModel` with the same weights (fp32, CPU).

Weights go from our (original-layout) state dict through diffusers' own
`convert_wan_transformer_to_diffusers` and load strictly, so the key mapping is checked too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.parity


def _test_dit():
    """`tiny_config` and friends live only in test_dit.py; load that module by path."""
    spec = importlib.util.spec_from_file_location("wan_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _test_dit()


def diffusers_fields(cfg) -> dict:
    """diffusers' Wan transformer arguments for our config (image input and VACE fields are the caller's)."""
    return dict(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_len,
    )


def _reference(cfg):
    from diffusers import WanTransformer3DModel

    image = dict(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim) if cfg.has_image_input else {}
    return WanTransformer3DModel(**diffusers_fields(cfg), **image).eval()


@pytest.fixture(scope="module")
def pairs():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = {}
    for kind in ("t2v", "i2v", "i2v_noclip"):
        ours = T.make_model(kind, seed=3).eval()
        reference = _reference(ours.config)
        reference.load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
        out[kind] = (ours, reference)
    out["ti2v"] = out["t2v"]  # same architecture; per-token timesteps are the difference
    return out


def _reference_forward(reference, text_len, x, t, context, clip_feature=None, y=None):
    """diffusers takes `y` already concatenated and the context already padded to 512."""
    hidden = x if y is None else torch.cat([x, y], dim=1)
    padded = torch.nn.functional.pad(context, (0, 0, 0, text_len - context.shape[1]))
    return reference(hidden, t, padded, encoder_hidden_states_image=clip_feature, return_dict=False)[0]


@pytest.mark.parametrize(
    ("kind", "batch", "size"),
    [
        ("t2v", 1, (2, 4, 4)),
        ("t2v", 2, (3, 4, 6)),
        ("t2v", 1, (1, 6, 2)),  # a single frame (image)
        ("i2v", 1, (2, 4, 4)),
        ("i2v", 2, (3, 4, 6)),
        ("i2v_noclip", 2, (3, 4, 6)),
        ("ti2v", 1, (2, 4, 4)),
        ("ti2v", 2, (3, 4, 6)),
    ],
)
def test_matches_diffusers(pairs, kind, batch, size):
    ours, reference = pairs[kind]
    (x, t, context), kwargs = T.inputs(kind, batch=batch, size=size, seed=batch + sum(size))
    with torch.no_grad():
        got = ours(x, t, context, **kwargs)
        want = _reference_forward(reference, ours.config.text_len, x, t, context, **kwargs)
    diff = (got - want).abs().max().item()
    assert want.abs().max() > 0.1  # a vacuous comparison (all zeros) would prove nothing
    assert diff <= 1e-5, f"{kind}: max abs diff {diff:.3g} vs diffusers (batch {batch}, latent {size})"


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("prefixed", [False, True])
def test_diffusers_converter_and_ours_agree_both_ways(kind, prefixed):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from diffsynth.wan.formats import DIT_SPEC, PREFIX, ours_to_diffusers

    ours = T.make_model(kind).state_dict()
    stored = {PREFIX + k: v for k, v in ours.items()} if prefixed else dict(ours)
    theirs = convert_wan_transformer_to_diffusers(dict(stored))
    layout = DIT_SPEC.match(theirs)
    assert layout is not None and layout.name == "diffusers"
    back = layout.to_ours(theirs)
    assert back.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    written = ours_to_diffusers(dict(ours))
    assert written.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(written[key], value), key


def test_flf2v_matches_diffusers_with_clip_positions():
    """Wan2.1-FLF2V: 2 x N CLIP tokens (first and last frame) with learned positions (`img_emb.emb_pos`).

    diffusers takes the two frames' tokens stacked on the batch and reshapes them to [B, 2N, D];
    we take them already joined. The library converter has no entry for the positions, so the
    weights go through our own table (its other keys are checked against the converter above).
    """
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    from diffsynth.wan.formats import ours_to_diffusers

    n = 5
    cfg = T.tiny_config("i2v", image_pos_len=2 * n)
    ours = T.make_model(cfg, seed=9).eval()
    assert ours.img_emb.emb_pos.shape == (1, 2 * n, cfg.image_dim)
    fields = dict(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim, pos_embed_seq_len=2 * n)
    reference = WanTransformer3DModel(**diffusers_fields(cfg), **fields).eval()
    reference.load_state_dict(ours_to_diffusers(dict(ours.state_dict())), strict=True)
    (x, t, context), kwargs = T.inputs("i2v", batch=2, size=(2, 4, 4), seed=4)
    g = torch.Generator().manual_seed(5)
    first, last = torch.randn(2, n, cfg.image_dim, generator=g), torch.randn(2, n, cfg.image_dim, generator=g)
    with torch.no_grad():
        got = ours(x, t, context, clip_feature=torch.cat([first, last], dim=1), y=kwargs["y"])
        stacked = torch.stack([first, last], dim=1).reshape(4, n, cfg.image_dim)  # per sample: first, last
        want = _reference_forward(reference, cfg.text_len, x, t, context, clip_feature=stacked, y=kwargs["y"])
    assert want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-5


def _diffusers_lora(reference, seed: int, kohya: bool = False) -> dict[str, torch.Tensor]:
    """A random rank-3 LoRA (alpha 6) on every Linear of diffusers' model, in its names: peft keys under
    `transformer.`, or kohya keys (`lora_transformer_<underscored>.lora_down.weight` / `.alpha`)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in reference.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        down = torch.randn(3, module.in_features, generator=g) / module.in_features**0.5
        up = 0.2 * torch.randn(module.out_features, 3, generator=g)
        if kohya:
            key = "lora_transformer_" + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            state[f"{key}.alpha"] = torch.tensor(6.0)
        else:  # peft without alpha keys: diffusers' loader takes scale 1 (alpha = rank)
            state.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    return state


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("fuse", [True, False])
def test_a_lora_in_diffusers_names_matches_diffusers_load_lora_adapter(pairs, kind, fuse):
    """A LoRA on every Linear in diffusers' module names: ours (renamed by `convert_wan_lora`) against diffusers'
    own `load_lora_adapter` on the same weights."""
    import copy

    pytest.importorskip("peft")
    from diffsynth.runtime.lora import apply_lora, read_lora
    from diffsynth.wan.lora import convert_wan_lora

    ours, reference = (copy.deepcopy(m) for m in pairs[kind])
    state = _diffusers_lora(reference, seed=4)
    reference.load_lora_adapter(dict(state), adapter_name="test", prefix="transformer")
    apply_lora(ours, convert_wan_lora(read_lora(state)), fuse=fuse)
    (x, t, context), kwargs = T.inputs(kind, batch=2, size=(2, 4, 4), seed=6)
    with torch.no_grad():
        got = ours(x, t, context, **kwargs)
        want = _reference_forward(reference, ours.config.text_len, x, t, context, **kwargs)
        base = pairs[kind][0](x, t, context, **kwargs)
    assert (want - base).abs().max() > 0.05  # the LoRA changes the output
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max abs diff {diff:.3g} vs diffusers with the LoRA"


def test_kohya_keys_in_diffusers_names_equal_the_dotted_ones(pairs):
    import copy

    from diffsynth.runtime.lora import apply_lora, read_lora
    from diffsynth.wan.lora import convert_wan_lora

    ours, reference = pairs["t2v"]
    dotted, underscored = copy.deepcopy(ours), copy.deepcopy(ours)
    kohya = _diffusers_lora(reference, seed=5, kohya=True)
    peft = {}
    for key, value in kohya.items():  # the same LoRA as peft keys, alpha folded in
        name = key.split(".")[0].removeprefix("lora_transformer_")
        module = next(n for n, _ in reference.named_modules() if n.replace(".", "_") == name)
        if key.endswith("lora_down.weight"):
            peft[f"transformer.{module}.lora_A.weight"] = value
        elif key.endswith("lora_up.weight"):
            peft[f"transformer.{module}.lora_B.weight"] = value * 2.0  # alpha 6 / rank 3
    apply_lora(underscored, convert_wan_lora(read_lora(kohya)))
    apply_lora(dotted, convert_wan_lora(read_lora(peft)))
    for (name, a), (_, b) in zip(underscored.state_dict().items(), dotted.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert any(
        not torch.equal(a, b) for a, b in zip(ours.state_dict().values(), dotted.state_dict().values(), strict=True)
    )
