"""FLUX.1 DiT LoRAs against diffusers: the same LoRA file loaded by diffusers' `FluxPipeline.lora_state_dict`
(its kohya / XLabs / peft converters) + `FluxTransformer2DModel.load_lora_adapter`, and by `read_flux1_lora` +
`apply_lora` into our DiT with the same weights; outputs compared in fp32 on CPU (max abs <= 1e-4).

Where diffusers 0.42 cannot take a layout at tiny sizes the test leaves that part out and test_flux1_lora.py
covers it against a hand-applied delta: its kohya converter hard-codes FLUX.1's widths for
`single_blocks.N.linear1` (3072 x 3 + 12288), ignores the alpha of `final_layer.*` (we give those alpha = rank),
and returns the top-level layers (img_in, txt_in, time_in, vector_in, guidance_in, final_layer) without the
`transformer.` prefix its loader then filters on, so here the prefix is added before loading; its kohya
converter for diffusers names only maps the attention layers of blocks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffsynth_flux_test_helpers import dit_inputs, reference_dit, reference_dit_output

pytestmark = [
    pytest.mark.parity,
    # peft warns that diffusers' pattern for the top-level `proj_out` also names the single blocks' `proj_out`,
    # and that a second adapter joins the first; both are how diffusers loads these files
    pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),
]


def _load(name: str):
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"flux1_parity_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L = _load("test_flux1_lora.py")


def _diffusers_output(base, cfg, files_and_scales):
    from diffusers import FluxPipeline

    reference = reference_dit(cfg, base)
    names = []
    for i, (state, _) in enumerate(files_and_scales):
        converted, alphas = FluxPipeline.lora_state_dict(dict(state), return_alphas=True)
        converted = {
            k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
            for k, v in converted.items()
        }
        reference.load_lora_adapter(converted, network_alphas=alphas or None, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    reference.set_adapters(names, weights=[scale for _, scale in files_and_scales])
    with torch.no_grad():
        return reference_dit_output(reference, dit_inputs(batch=2, grid=(3, 4), txt_len=5, seed=5, config=cfg))


def _compare(base, cfg, files_and_scales, fuse=True):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    want = _diffusers_output(base, cfg, files_and_scales)
    got = L.run(L.with_loras(base, files_and_scales, fuse=fuse), cfg)
    assert (want - L.run(base, cfg)).abs().max() > 0.05  # the LoRA changes the output
    return L.assert_close(got, want)


def _diffusers_lora(base, seed):
    """A random LoRA on every diffusers Linear. diffusers gives the top-level `proj_out` the rank and alpha
    of `single_transformer_blocks.N.proj_out` (peft patterns match name ends), so those agree here."""
    lora = L.random_lora(L.diffusers_linear_shapes(base), seed=seed)
    down, up, alpha = lora["proj_out"]
    rank, single_alpha = next((d.shape[0], a) for n, (d, _, a) in lora.items() if n.endswith(".proj_out"))
    g = torch.Generator().manual_seed(seed)
    lora["proj_out"] = (
        torch.randn(rank, down.shape[1], generator=g) / down.shape[1] ** 0.5,
        0.3 * torch.randn(up.shape[0], rank, generator=g) / rank**0.5,
        single_alpha,
    )
    return lora


def _bfl_lora(base, seed):
    """A random LoRA on our Linears that diffusers' kohya converter takes at tiny sizes (see the docstring)."""
    shapes = {n: s for n, s in L.linear_shapes(base).items() if not n.endswith("linear1")}
    lora = L.random_lora(shapes, seed=seed)
    for name, (down, up, _) in lora.items():
        if name.startswith("final_layer"):
            lora[name] = (down, up, float(down.shape[0]))
    return lora


@pytest.mark.parametrize("fuse", [True, False])
def test_diffusers_peft_names(fuse):
    cfg, base = L.tiny()
    _compare(base, cfg, [(L.peft_file(_diffusers_lora(base, seed=11)), 0.8)], fuse=fuse)


def test_diffusers_peft_names_on_some_parts_only():
    cfg, base = L.tiny()
    shapes = L.diffusers_linear_shapes(base)
    parts = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_v_proj",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.proj_mlp",
        "norm_out.linear",
    ]
    lora = L.random_lora({p: shapes[p] for p in parts}, seed=12, with_alpha=False)
    _compare(base, cfg, [(L.peft_file(lora), 1.0)])


@pytest.mark.parametrize("fuse", [True, False])
def test_kohya_bfl_names(fuse):
    cfg, base = L.tiny()
    _compare(base, cfg, [(L.kohya_file(_bfl_lora(base, seed=13)), 0.7)], fuse=fuse)


def test_comfyui_bfl_names():
    """`diffusion_model.<BFL name>.lora_down.weight` / `.lora_up.weight` / `.alpha`, as ComfyUI saves them."""
    cfg, base = L.tiny()
    _compare(base, cfg, [(L.kohya_file(_bfl_lora(base, seed=14), prefix="diffusion_model.", dotted=True), 1.0)])


def test_peft_bfl_names_match_diffusers_on_the_same_tensors():
    """`diffusion_model.<BFL name>.lora_A.weight`: diffusers reads BFL names only in kohya form, so it gets
    the same tensors renamed to `lora_down` / `lora_up`."""
    cfg, base = L.tiny()
    lora = _bfl_lora(base, seed=15)
    want = _diffusers_output(base, cfg, [(L.kohya_file(lora), 0.9)])
    got = L.run(L.with_loras(base, [(L.peft_file(lora, prefix="diffusion_model."), 0.9)]), cfg)
    L.assert_close(got, want)


def test_kohya_diffusers_names():
    cfg, base = L.tiny()
    shapes = {
        n: s
        for n, s in L.diffusers_linear_shapes(base).items()
        if ".attn." in n or not n.startswith(("transformer_blocks", "single_transformer_blocks"))
    }
    lora = L.random_lora(shapes, seed=16)
    _compare(base, cfg, [(L.kohya_file(lora, prefix="lora_transformer_"), 0.6)])


def test_xlabs():
    cfg, base = L.tiny()
    _compare(base, cfg, [(L.xlabs_file(base, seed=17), 1.0)])


@pytest.mark.parametrize("fuse", [True, False])
def test_two_loras_with_scales(fuse):
    cfg, base = L.tiny()
    first = L.peft_file(_diffusers_lora(base, seed=18))
    second = L.kohya_file(_bfl_lora(base, seed=19))
    _compare(base, cfg, [(first, 0.8), (second, -0.5)], fuse=fuse)
