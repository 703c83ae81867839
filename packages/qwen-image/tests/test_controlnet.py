"""Qwen-Image ControlNets (InstantX Union / Inpainting): the model (conformance suite, config, formats, strict
loading), the DiT's residual inputs, the pipeline's `controlnet_inputs` (refusals, VRAM manager, first-block
cache), and parity with diffusers (marked `parity`):

- our `QwenImageControlNet` vs `QwenImageControlNetModel` (control-image and inpainting widths, masked text):
  residuals max abs <= 1e-5;
- our DiT given residual lists (as many as its blocks, and fewer, spread) vs `QwenImageTransformer2DModel`
  given the same: <= 1e-5;
- our pipeline vs `QwenImageControlNetPipeline` (one Union net; with and without true CFG; two control
  images on one net as diffusers' `QwenImageMultiControlNetModel`) and vs
  `QwenImageControlNetInpaintPipeline` (the inpainting net, true CFG) on the tiny repo with the same initial
  noise: decoded images max abs <= 1e-4. diffusers encodes the control image with a posterior sample; ours
  takes the mode, so the reference runs with the mode too;
- full size on the meta device: the released configs give exactly diffusers' keys and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.qwen_image.controlnet import (
    ControlCondition,
    QwenImageControlNet,
    QwenImageControlNetConfig,
    sum_residuals,
)
from diffsynth.qwen_image.controlnet_formats import CONTROLNET_SPEC, LAYOUTS, config_from_state
from diffsynth.runtime.controlnet import ControlNetSlot
from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
NEGATIVE = "bad quality, blurry"


def tiny_config(**overrides) -> QwenImageControlNetConfig:
    """The one place tiny ControlNet sizes live (the widths of `test_dit.tiny_config`)."""
    fields = dict(
        patch_size=2,
        in_channels=16,
        extra_condition_channels=0,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return QwenImageControlNetConfig(**{**fields, **overrides})


def repo_config(repo: Path, **overrides) -> QwenImageControlNetConfig:
    """A ControlNet of the tiny hub repo's DiT widths (read from its transformer/config.json)."""
    dit = json.loads((repo / "transformer" / "config.json").read_text())
    names = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    fields = {name: dit[name] for name in names} | {"axes_dims_rope": tuple(dit["axes_dims_rope"])}
    return QwenImageControlNetConfig(**{**fields, **overrides})


def make_net(config: QwenImageControlNetConfig | None = None, seed: int = 0) -> QwenImageControlNet:
    return random_weights(QwenImageControlNet(config or tiny_config()), seed)


def config_json(cfg: QwenImageControlNetConfig) -> dict:
    """A diffusers `QwenImageControlNetModel` config.json for `cfg`."""
    names = ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads")
    return {
        "_class_name": "QwenImageControlNetModel",
        **{name: getattr(cfg, name) for name in names},
        "out_channels": 16,
        "joint_attention_dim": cfg.joint_attention_dim,
        "axes_dims_rope": list(cfg.axes_dims_rope),
        "extra_condition_channels": cfg.extra_condition_channels,
    }


def write_folder(folder: Path, model: QwenImageControlNet, with_json: bool = True) -> Path:
    """`model` as a hub-style folder: diffusion_pytorch_model.safetensors (+ config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    if with_json:
        (folder / "config.json").write_text(json.dumps(config_json(model.config)))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def net_inputs(config: QwenImageControlNetConfig | None = None, text_lengths=(5, 9), shape=(1, 4, 6), seed=1):
    """DiT inputs (`test_dit.inputs`) and a condition `[B, L, cond_channels]`."""
    cfg = config or tiny_config()
    x, t, text, mask, shapes = T.inputs(text_lengths=text_lengths, shapes=(shape,), seed=seed)
    cond = torch.randn(*x.shape[:2], cfg.cond_channels, generator=torch.Generator().manual_seed(seed + 7))
    return x, t, text, mask, shapes, cond


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------ config
def test_default_config_is_the_released_union_and_inpainting_is_derived():
    """InstantX's model cards: the Union net copies 5 of Qwen-Image's 60 blocks, the Inpainting net 6; the hub
    lists their bf16 files at 3.54 GB and 4.23 GB, which these configs' parameter counts give."""
    cfg = QwenImageControlNetConfig()
    assert (cfg.num_layers, cfg.extra_condition_channels, cfg.inner_dim, cfg.cond_channels) == (5, 0, 3072, 64)
    assert (cfg.joint_attention_dim, cfg.axes_dims_rope) == (3584, (16, 56, 56))
    with torch.device("meta"):
        union = QwenImageControlNet()
        inpaint = QwenImageControlNet(QwenImageControlNetConfig(num_layers=6, extra_condition_channels=4))
    cf.check_declared_units(union)
    sizes = [round(2 * sum(p.numel() for p in m.parameters()) / 1e9, 2) for m in (union, inpaint)]
    assert sizes == [3.54, 4.23] and inpaint.takes_mask and not union.takes_mask


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(extra_condition_channels=3), "extra_condition_channels"),
        (dict(num_layers=0), "num_layers"),
        (dict(axes_dims_rope=(4, 6, 4)), "axes_dims_rope"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"QwenImageControlNetConfig.*{field}"):
        tiny_config(**overrides)


# ------------------------------------------------------------------ conformance suite
def test_forward_gives_one_residual_per_block():
    x, *_ = args = net_inputs()
    cf.check_forward(make_net, args, expected_shapes=[(2, x.shape[1], 32)] * 2)


def test_backward_checkpointing_meta_load_and_units():
    args = net_inputs()
    last = tiny_config().num_layers - 1
    # the last block's text stream output is not used (the residuals are the image tokens')
    unused = [
        f"transformer_blocks.{last}.{m}.{p}"
        for m in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
        for p in ("weight", "bias")
    ]
    cf.check_backward(make_net, args, allow_unused=unused)
    cf.check_gradient_checkpointing(make_net, args)
    cf.check_meta_load(make_net, args)
    cf.check_declared_units(make_net)


def test_fresh_net_gives_zero_residuals_and_inputs_are_checked():
    """The output projections and the condition embedder start at zero (a new net leaves the DiT as it is)."""
    x, t, text, mask, shapes, cond = net_inputs()
    net = QwenImageControlNet(tiny_config())
    assert all(bool((r == 0).all()) for r in net(x, t, text, mask, shapes, cond=cond))
    with pytest.raises(ValueError, match="cond has shape"):
        net(x, t, text, mask, shapes, cond=cond[..., :4])
    with pytest.raises(ValueError, match="cond has shape None"):
        net(x, t, text, mask, shapes)


# ------------------------------------------------------------------ formats and loading
@pytest.mark.parametrize("overrides", [{}, dict(extra_condition_channels=4, num_layers=3)])
def test_layout_round_trip_and_config_from_shapes(overrides):
    cf.check_layout_roundtrip(lambda: make_net(tiny_config(**overrides)), LAYOUTS[0])
    axes = {"axes_dims_rope": [4, 6, 6]}  # RoPE axes are not in the shapes
    cfg = cf.check_spec_config(CONTROLNET_SPEC, lambda: make_net(tiny_config(**overrides)), axes)
    assert cfg == tiny_config(**overrides)


def test_strict_load_of_a_diffusers_folder(tmp_path):
    model = make_net(tiny_config(extra_condition_channels=4), seed=2)
    folder = write_folder(tmp_path / "inpaint", model)
    loaded = load_model(str(folder), specs=[CONTROLNET_SPEC])
    assert isinstance(loaded, QwenImageControlNet) and loaded.config == model.config and loaded.takes_mask
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_config_json_alone_and_contradictions():
    assert config_from_state({}, config_json(QwenImageControlNetConfig())) == QwenImageControlNetConfig()
    assert config_from_state({}, {"extra_condition_channels": 4}).num_layers == 60  # diffusers' default
    with torch.device("meta"):
        state = make_net().state_dict()
    with pytest.raises(ConfigError, match="num_layers=3"):
        config_from_state(state, config_json(tiny_config(num_layers=3)))


def test_missing_extra_and_foreign_keys_are_refused():
    state = make_net().state_dict()
    axes = {"axes_dims_rope": [4, 6, 6]}
    with pytest.raises(CheckpointError, match="not_a_key"):
        extra = {**state, "transformer_blocks.0.not_a_key.weight": torch.zeros(1)}
        load_model(extra, specs=[CONTROLNET_SPEC], config=axes)
    missing = dict(state)
    del missing["controlnet_blocks.1.weight"]
    with pytest.raises(CheckpointError, match=r"controlnet_blocks\.1\.weight"):
        load_model(missing, specs=[CONTROLNET_SPEC], config=axes)
    with torch.device("meta"):
        dit = T.make_model().state_dict()
    with pytest.raises(UnknownModelError, match="qwen_image_controlnet"):
        load_model(dit, specs=[CONTROLNET_SPEC])


# ------------------------------------------------------------------ DiT residual inputs
def _residuals(n: int, batch: int = 2, tokens: int = 24, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, 32, generator=g) for _ in range(n)]


def test_dit_residuals_zero_spread_and_checked():
    dit = T.make_model(T.tiny_config(num_layers=3)).eval()
    args = T.inputs()
    with torch.no_grad():
        plain = dit(*args)
        assert torch.equal(dit(*args, controlnet_block_samples=[torch.zeros(1, 24, 32)]), plain)
        r = _residuals(2)  # blocks 0, 1 take r[0] and block 2 r[1] (ceil(3 / 2) = 2)
        assert torch.equal(
            dit(*args, controlnet_block_samples=r), dit(*args, controlnet_block_samples=[r[0], r[0], r[1]])
        )
    with pytest.raises(ValueError, match="ControlNet residual has shape"):
        dit(*args, controlnet_block_samples=[r[0][..., :8]])
    with pytest.raises(ValueError, match="empty"):
        dit(*args, controlnet_block_samples=[])


def test_residuals_reach_only_the_generated_image_of_an_edit_call():
    """With edit references in the image stream a residual covers the generated image's tokens: it equals
    a residual padded with zeros over the references."""
    dit = T.make_model().eval()
    args = T.inputs(shapes=((1, 4, 6), (1, 2, 4)))
    r = _residuals(2)
    padded = [torch.cat([x, torch.zeros(2, 8, 32)], dim=1) for x in r]
    with torch.no_grad():
        assert torch.equal(dit(*args, controlnet_block_samples=r), dit(*args, controlnet_block_samples=padded))


def test_first_block_cache_with_residuals():
    cf.check_first_block_cache(
        lambda: T.make_model(T.tiny_config(num_layers=3)),
        T.inputs(),
        {"controlnet_block_samples": _residuals(3)},
        other_args=T.inputs(text_lengths=(3, 12), seed=2),
        blocks=("transformer_blocks",),
    )


def test_sum_residuals_of_nets_of_one_and_of_different_depths():
    a, b, c = _residuals(2, seed=1), _residuals(2, seed=2), _residuals(3, seed=3)
    same = sum_residuals([a, b], blocks=6)
    assert len(same) == 2 and all(torch.equal(s, x + y) for s, x, y in zip(same, a, b, strict=True))
    mixed = sum_residuals([a, c, []], blocks=6)  # a: blocks // 3, c: blocks // 2
    want = [a[i // 3] + c[i // 2] for i in range(6)]
    assert len(mixed) == 6 and all(torch.equal(m, w) for m, w in zip(mixed, want, strict=True))
    assert sum_residuals([[], []], blocks=6) is None


def test_control_step_range():
    c = ControlCondition(model=None, tokens=torch.zeros(1), start=0.25, end=0.75)
    assert [c.active(i, 4) for i in range(4)] == [False, True, True, False]


# ------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def nets(tiny_repo, tmp_path_factory) -> dict[str, Path]:
    """Tiny Union-style (2 blocks) and inpainting (1 block, 68 condition features) nets of the repo's widths."""
    root = tmp_path_factory.mktemp("qwen-controlnets")
    union = make_net(repo_config(tiny_repo, num_layers=2), seed=5)
    inpaint = make_net(repo_config(tiny_repo, num_layers=1, extra_condition_channels=4), seed=6)
    return {"union": write_folder(root / "union", union), "inpaint": write_folder(root / "inpaint", inpaint)}


@pytest.fixture(scope="module")
def pipe(tiny_repo, nets):
    from diffsynth.qwen_image import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=[str(nets["union"]), str(nets["inpaint"])]
    )


def random_image(width: int, height: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_mask(width: int, height: int, seed: int) -> Image.Image:
    return random_image(width, height, seed).convert("L")


def noise(batch: int = 1, seed: int = 11) -> torch.Tensor:
    return torch.randn((batch, 16, 8, 8), generator=torch.Generator().manual_seed(seed))


def run(pipe, controls, prompts=PROMPTS[0], steps=2, **kwargs):
    batch = 1 if isinstance(prompts, str) else len(prompts)
    options = dict(num_inference_steps=steps, height=64, width=64, cfg_scale=1.0, output_type="np")
    return pipe(prompts, controlnet_inputs=controls, latents=noise(batch), progress_bar=False, **{**options, **kwargs})


def test_pipeline_loads_controlnets_in_order(pipe):
    nets = pipe.controlnets()
    assert isinstance(pipe.controlnet, ControlNetSlot) and len(nets) == 2
    assert not nets[0].takes_mask and nets[1].takes_mask
    assert pipe.controlnet.offload_units == ("nets.0.transformer_blocks", "nets.1.transformer_blocks")


def test_controls_act_with_their_scale_and_steps(pipe):
    from diffsynth.qwen_image import ControlNetInput

    plain = run(pipe, None)
    controlled = run(pipe, [ControlNetInput(image=random_image(64, 64, 1))])
    assert max_abs(controlled, plain) > 1e-3
    assert np.array_equal(run(pipe, [ControlNetInput(image=random_image(64, 64, 1), scale=0.0)]), plain)
    late = run(pipe, [ControlNetInput(image=random_image(64, 64, 1), start=0.5)])
    assert max_abs(late, plain) > 1e-4 and max_abs(late, controlled) > 1e-4
    inpaint = ControlNetInput(image=random_image(64, 64, 2), inpaint_mask=random_mask(64, 64, 3), controlnet_id=1)
    both = run(pipe, [ControlNetInput(image=random_image(64, 64, 1)), inpaint])
    assert max_abs(both, controlled) > 1e-4


@pytest.mark.parametrize("mode", ["image-to-image", "eligen", "edit"])
def test_controls_compose_with_the_other_conditionings(pipe, monkeypatch, mode):
    """Controls act alongside an input image, EliGen's entity prompts and edit images (whose tokens the
    residuals do not reach)."""
    from diffsynth.qwen_image import ControlNetInput
    from diffsynth.qwen_image import pipeline as module

    monkeypatch.setattr(module, "EDIT_AREA", 64 * 64)
    monkeypatch.setattr(module, "CONDITION_AREA", 56 * 56)
    extra = {
        "image-to-image": dict(input_image=random_image(64, 64, 8), denoising_strength=0.7),
        "eligen": dict(eligen_entity_prompts=["a red circle"], eligen_entity_masks=[random_mask(64, 64, 9)]),
        "edit": dict(edit_image=random_image(48, 80, 8)),
    }[mode]
    plain = run(pipe, None, **extra)
    controlled = run(pipe, [ControlNetInput(image=random_image(64, 64, 1))], **extra)
    assert np.isfinite(controlled).all() and max_abs(controlled, plain) > 1e-4


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(start=0.5, end=1.5), "start < end"),
        (dict(scale="1"), "scale='1' must be a number"),
        (dict(controlnet_id=5), "controlnet_id=5"),
        (dict(image=None), "image is missing"),
        (dict(processor_id="canny"), "processor_id='canny' is not read"),
        (dict(inpaint_image="x.png"), "inpaint_image is not read"),
        (dict(inpaint_mask=Image.new("L", (64, 64))), "takes no mask"),
        (dict(controlnet_id=1), "give inpaint_mask"),
    ],
)
def test_bad_controlnet_inputs_are_refused(pipe, fields, match):
    from diffsynth.qwen_image import ControlNetInput

    with pytest.raises(ConfigError, match=match):
        run(pipe, [ControlNetInput(**{"image": random_image(64, 64, 1), **fields})], steps=1)
    with pytest.raises(ConfigError, match="is a dict"):
        run(pipe, [dict(image=random_image(64, 64, 1))], steps=1)


def test_controls_without_a_controlnet_and_unknown_sources_are_refused(tiny_repo):
    from diffsynth.qwen_image import ControlNetInput, QwenImagePipeline

    controlnet_source = QwenImagePipeline.controlnet_source

    plain = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no ControlNet is loaded"):
        run(plain, [ControlNetInput(image=random_image(64, 64, 1))], steps=1)
    with pytest.raises(ConfigError, match="neither an existing file"):
        plain.load_controlnet("no/such/thing/here")
    union = controlnet_source("InstantX/Qwen-Image-ControlNet-Union")  # the hub files, not fetched here
    assert union.origin_file_pattern == ["diffusion_pytorch_model.safetensors", "config.json"]


@pytest.mark.parametrize("kind", ["Canny", "Depth", "Inpaint"])
def test_blockwise_repo_ids_fetch_their_model_safetensors(kind):
    """DiffSynth-Studio's Blockwise repos ship a root model.safetensors, not diffusers' file name."""
    from diffsynth.qwen_image import QwenImagePipeline

    repo = f"DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{kind}"
    source = QwenImagePipeline.controlnet_source(repo)  # the hub files, not fetched here
    assert (source.model_id, source.origin_file_pattern) == (repo, ["model.safetensors"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_attention_heads=3), "inner_dim 48 .the DiT's: 32."),
        (dict(joint_attention_dim=48), "joint_attention_dim 48"),
    ],
)
def test_controlnet_of_other_widths_than_the_dit_is_refused(tiny_repo, tmp_path, overrides, match):
    from diffsynth.qwen_image import ControlNetInput, QwenImagePipeline

    folder = write_folder(tmp_path / "net", make_net(repo_config(tiny_repo, num_layers=1, **overrides), seed=7))
    pipe = QwenImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=str(folder)
    )
    with pytest.raises(ConfigError, match=rf"controlnet_inputs\[0\]: ControlNet 0 was made for another DiT: {match}"):
        run(pipe, [ControlNetInput(image=random_image(64, 64, 1))], steps=1)


def test_controlnet_files_among_model_configs_join_the_slot(tiny_repo, nets):
    import diffsynth.runtime.registry as registry
    from diffsynth.qwen_image import QwenImagePipeline
    from diffsynth.runtime.hub import ModelConfig

    assert CONTROLNET_SPEC in registry.all_specs()
    configs = [ModelConfig(path=str(nets[n] / "diffusion_pytorch_model.safetensors")) for n in ("inpaint", "union")]
    pipe = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", model_configs=configs)
    assert [net.takes_mask for net in pipe.controlnets()] == [True, False]


def test_vram_managed_controlnets_give_the_same_image(tiny_repo, nets, pipe):
    """Every model under the VRAM manager (every block streamed) changes nothing (up to float rounding: a
    streamed weight's memory placement may change the CPU matmul kernel's summation order)."""
    from diffsynth.qwen_image import ControlNetInput, QwenImagePipeline

    managed = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    managed.load_controlnet([str(nets["union"]), str(nets["inpaint"])])
    assert "controlnet" in managed.vram_handles
    controls = [
        ControlNetInput(image=random_image(64, 64, 1), scale=0.7),
        ControlNetInput(image=random_image(64, 64, 2), inpaint_mask=random_mask(64, 64, 3), controlnet_id=1),
    ]
    assert max_abs(run(managed, controls, cfg_scale=4.0), run(pipe, controls, cfg_scale=4.0)) <= 1e-6


def test_first_block_cache_with_controls(pipe):
    """The nets run every step; only the DiT's later blocks (with their residuals) are reused."""
    from diffsynth.qwen_image import ControlNetInput

    controls = [ControlNetInput(image=random_image(64, 64, 1), start=0.0, end=0.75)]
    plain = run(pipe, controls, steps=4)
    try:
        cache = pipe.enable_first_block_cache(0.0)["dit"]
        assert np.array_equal(run(pipe, controls, steps=4), plain) and cache.skipped == 0
        cache = pipe.enable_first_block_cache(float("inf"))["dit"]
        reused = run(pipe, controls, steps=4)
    finally:
        pipe.disable_first_block_cache()
    assert cache.skipped == 3 and np.isfinite(reused).all() and max_abs(reused, plain) > 1e-4


# ------------------------------------------------------------------ parity with diffusers
def _reference_net(cfg: QwenImageControlNetConfig):
    from diffusers import QwenImageControlNetModel

    return QwenImageControlNetModel.from_config(config_json(cfg)).eval()


@pytest.mark.parity
@pytest.mark.parametrize("extra", [0, 4])
def test_controlnet_matches_diffusers(extra):
    pytest.importorskip("diffusers")
    cfg = tiny_config(extra_condition_channels=extra)
    ours = make_net(cfg, seed=4).eval()
    ref = _reference_net(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, text, mask, shapes, cond = net_inputs(cfg, text_lengths=(3, 12))
    with torch.no_grad():
        got = ours(x, t, text, mask, shapes, cond=cond, scale=0.7)
        want = ref(
            hidden_states=x,
            controlnet_cond=cond,
            conditioning_scale=0.7,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=shapes,
            return_dict=False,
        )
    assert len(got) == len(want) == cfg.num_layers and min(float(w.abs().max()) for w in want) > 0.1
    assert max(max_abs(a, b) for a, b in zip(got, want, strict=True)) <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("count", [1, 2, 3])
def test_dit_with_residuals_matches_diffusers(count):
    pytest.importorskip("diffusers")
    cfg = T.tiny_config(num_layers=3)
    ours = T.make_model(cfg, seed=3).eval()
    ref = T.reference_dit(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, text, mask, shapes = T.inputs(text_lengths=(3, 12))
    r = _residuals(count)
    with torch.no_grad():
        got = ours(x, t, text, mask, shapes, controlnet_block_samples=r)
        want = ref(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=shapes,
            controlnet_block_samples=r,
            return_dict=False,
        )[0]
        plain = ours(x, t, text, mask, shapes)
    assert max_abs(got, plain) > 1e-2 and max_abs(got, want) <= 1e-5


@pytest.fixture(scope="module")
def reference_parts(tiny_repo) -> dict:
    """diffusers' components of the tiny repo, loaded once (a ControlNet pipeline is built per test)."""
    pytest.importorskip("diffusers")
    import diffusers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_repo / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(tiny_repo / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_repo / "tokenizer"),
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(tiny_repo / "transformer"),
    )


@pytest.fixture
def posterior_mode(monkeypatch):
    """diffusers encodes control images with a posterior sample; ours takes the mode: so does the reference."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def _reference(parts: dict, kind: str, controlnet):
    import diffusers

    cls = diffusers.QwenImageControlNetInpaintPipeline if kind == "inpaint" else diffusers.QwenImageControlNetPipeline
    ref = cls(**parts, controlnet=controlnet)
    ref.set_progress_bar_config(disable=True)
    return ref


def _reference_images(ref, prompts, cfg_scale: float, steps: int = 4, **kwargs) -> np.ndarray:
    batch = len(prompts)
    return ref(
        list(prompts),
        negative_prompt=[NEGATIVE] * batch if cfg_scale > 1 else None,
        true_cfg_scale=cfg_scale,
        num_inference_steps=steps,
        height=64,
        width=64,
        latents=ref._pack_latents(noise(batch), batch, 16, 8, 8),
        output_type="np",
        **kwargs,
    ).images


def _our_images(pipe, prompts, controls, cfg_scale: float, steps: int = 4) -> np.ndarray:
    return run(pipe, controls, list(prompts), steps=steps, cfg_scale=cfg_scale, negative_prompt=NEGATIVE)


@pytest.mark.parity
@pytest.mark.parametrize("cfg_scale, start, end", [(1.0, 0.0, 0.75), (4.0, 0.25, 1.0)])
def test_union_pipeline_matches_diffusers(reference_parts, nets, pipe, posterior_mode, cfg_scale, start, end):
    """The control image (48x80, resized to 64x64) for two prompts, with a step range and a scale; with true
    CFG the negative call gets the positive prompt's residuals in both pipelines."""
    from diffusers import QwenImageControlNetModel

    from diffsynth.qwen_image import ControlNetInput

    ref = _reference(reference_parts, "union", QwenImageControlNetModel.from_pretrained(nets["union"]))
    image = random_image(48, 80, 1)
    control = dict(controlnet_conditioning_scale=0.8, control_guidance_start=start, control_guidance_end=end)
    expected = _reference_images(ref, PROMPTS, cfg_scale, control_image=image, **control)
    got = _our_images(pipe, PROMPTS, [ControlNetInput(image=image, scale=0.8, start=start, end=end)], cfg_scale)
    assert max_abs(got, _our_images(pipe, PROMPTS, None, cfg_scale)) > 1e-3  # the control acts
    assert max_abs(got, expected) <= 1e-4


@pytest.mark.parity
def test_two_controls_on_one_union_net_match_diffusers(reference_parts, nets, pipe, posterior_mode):
    """diffusers' `QwenImageMultiControlNetModel([net])` with two images: the residuals are summed."""
    from diffusers import QwenImageControlNetModel, QwenImageMultiControlNetModel

    from diffsynth.qwen_image import ControlNetInput

    multi = QwenImageMultiControlNetModel([QwenImageControlNetModel.from_pretrained(nets["union"])])
    ref = _reference(reference_parts, "union", multi)
    images = [random_image(64, 64, 4), random_image(64, 64, 5)]
    expected = _reference_images(
        ref,
        PROMPTS[:1],
        1.0,
        control_image=images,
        controlnet_conditioning_scale=[0.8, 0.5],
        control_guidance_start=[0.0, 0.25],
        control_guidance_end=[1.0, 0.75],
    )
    controls = [
        ControlNetInput(image=images[0], scale=0.8),
        ControlNetInput(image=images[1], scale=0.5, start=0.25, end=0.75),
    ]
    assert max_abs(_our_images(pipe, PROMPTS[:1], controls, 1.0), expected) <= 1e-4


@pytest.mark.parity
def test_inpainting_pipeline_matches_diffusers(reference_parts, nets, pipe, posterior_mode):
    """The image to repaint and its mask (both 80x48, resized), true CFG: the masked-image latents with the
    kept region as a 17th channel, as `QwenImageControlNetInpaintPipeline` builds them."""
    from diffusers import QwenImageControlNetModel

    from diffsynth.qwen_image import ControlNetInput

    ref = _reference(reference_parts, "inpaint", QwenImageControlNetModel.from_pretrained(nets["inpaint"]))
    image, mask = random_image(80, 48, 6), random_mask(80, 48, 7)
    expected = _reference_images(
        ref, PROMPTS, 4.0, control_image=image, control_mask=mask, controlnet_conditioning_scale=0.9
    )
    control = ControlNetInput(image=image, inpaint_mask=mask, scale=0.9, controlnet_id=1)
    got = _our_images(pipe, PROMPTS, [control], 4.0)
    assert max_abs(got, _our_images(pipe, PROMPTS, None, 4.0)) > 1e-3  # the control acts
    assert max_abs(got, expected) <= 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("overrides", [{}, dict(num_layers=6, extra_condition_channels=4)])
def test_full_size_keys_and_shapes_equal_diffusers(overrides):
    """The released Union config (5 blocks) and the Inpainting one (6 blocks, 4 extra condition features;
    InstantX's model cards and diffusers' QwenImageControlNetInpaintPipeline, which packs a 17-channel
    condition) on the meta device give exactly diffusers' `QwenImageControlNetModel` keys and shapes."""
    pytest.importorskip("diffusers")
    cfg = QwenImageControlNetConfig(**overrides)
    with torch.device("meta"):
        ours = QwenImageControlNet(cfg).state_dict()
        ref = _reference_net(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
