"""FLUX.1 ControlNet: conformance suite, diffusers-key loading and conversion, config.json, errors,
the DiT's residual inputs and the pipeline's `controlnet_inputs` checks (no diffusers needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import (
    check_pipeline_first_block_cache,
    controlnet_config_json,
    controlnet_inputs,
    dit_inputs,
    latent_noise,
    make_controlnet,
    make_dit,
    our_pipeline,
    random_image,
    repo_controlnet_config,
    tiny_controlnet_config,
    write_controlnet_folder,
)
from PIL import Image

from diffsynth.flux.flux1.controlnet import UNION_MODES, Flux1ControlNet, Flux1ControlNetConfig
from diffsynth.flux.flux1.controlnet_formats import (
    FLUX1_CONTROLNET_SPEC,
    LAYOUTS,
    config_from_state,
    diffusers_to_ours,
    ours_to_diffusers,
)
from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.loading import load_model
from diffsynth.runtime.testing import conformance as cf

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ config
def test_default_config_is_instantx_union():
    cfg = Flux1ControlNetConfig()
    assert (cfg.depth, cfg.depth_single_blocks, cfg.num_modes, cfg.hidden_size) == (5, 10, 10, 3072)
    assert cfg.cond_in_channels == cfg.in_channels == 64 and cfg.guidance_embed


def test_released_union_builds_on_meta_with_diffusers_keys():
    with torch.device("meta"):
        model = Flux1ControlNet()
    cf.check_declared_units(model)
    keys = ours_to_diffusers(model.state_dict())
    assert "controlnet_mode_embedder.weight" in keys and "transformer_blocks.4.attn.to_q.weight" in keys
    assert "single_transformer_blocks.9.proj_mlp.weight" in keys and "controlnet_single_blocks.9.weight" in keys
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 3.30


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_modes=0), "num_modes"),
        (dict(cond_in_channels=-1), "cond_in_channels"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(axes_dim=(4, 4, 4)), "axes_dim"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"Flux1ControlNetConfig.*{field}"):
        tiny_controlnet_config(**overrides)


# ------------------------------------------------------------------ conformance suite
def test_forward_gives_one_residual_per_block():
    args = controlnet_inputs()
    cf.check_forward(make_controlnet, args, expected_shapes=[(2, 16, 32)] * 5)


def test_backward_reaches_every_parameter():
    cf.check_backward(make_controlnet, controlnet_inputs())


def test_gradient_checkpointing_gives_same_output_and_grads():
    cf.check_gradient_checkpointing(make_controlnet, controlnet_inputs(), atol=1e-6)


def test_meta_build_and_assign_load_are_identical():
    cf.check_meta_load(make_controlnet, controlnet_inputs())


def test_declared_units_exist():
    cf.check_declared_units(make_controlnet)


def test_fresh_model_gives_zero_residuals():
    """The output projections start at zero (a new ControlNet leaves the DiT unchanged)."""
    double, single = Flux1ControlNet(tiny_controlnet_config())(*controlnet_inputs())
    assert all(bool((r == 0).all()) for r in double + single)


def test_union_mode_changes_the_output_and_is_required():
    model = make_controlnet().eval()
    *args, cond, mode = controlnet_inputs()
    with torch.no_grad():
        a = model(*args, cond=cond, mode=0)[0][0]
        b = model(*args, cond=cond, mode=1)[0][0]
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="union net"):
        model(*args, cond=cond)
    with pytest.raises(ValueError, match=r"mode=\[7\]"):
        model(*args, cond=cond, mode=7)


def test_cond_shape_is_checked():
    model = make_controlnet()
    *args, cond, mode = controlnet_inputs()
    with pytest.raises(ValueError, match="cond has shape"):
        model(*args, cond=cond[:, :3], mode=mode)


# ------------------------------------------------------------------ formats
def test_diffusers_round_trip_is_exact():
    for layout in LAYOUTS:
        convert = ours_to_diffusers if layout.name == "diffusers" else None
        cf.check_layout_roundtrip(make_controlnet, layout, convert)
    ours = make_controlnet().state_dict()
    back = diffusers_to_ours(ours_to_diffusers(dict(ours)))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())


@pytest.mark.parametrize("overrides", [{}, dict(num_modes=None, guidance_embed=False), dict(depth_single_blocks=0)])
def test_spec_config_from_shapes(overrides):
    axes = {"axes_dims_rope": list(tiny_controlnet_config().axes_dim)}  # RoPE axes are not in the shapes
    cfg = cf.check_spec_config(
        FLUX1_CONTROLNET_SPEC, lambda: make_controlnet(tiny_controlnet_config(**overrides)), axes
    )
    assert cfg.num_modes == tiny_controlnet_config(**overrides).num_modes


def test_strict_load_of_a_diffusers_folder(tmp_path):
    model = make_controlnet()
    folder = write_controlnet_folder(tmp_path / "cn", model, controlnet_config_json(model.config))
    loaded = load_model(str(folder), specs=[FLUX1_CONTROLNET_SPEC])
    assert isinstance(loaded, Flux1ControlNet) and loaded.config == model.config
    want = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())


def test_alimama_inpainting_width_is_read_from_the_shapes(tmp_path):
    """alimama's Inpainting-Beta: 68 condition features (latents + packed mask), no single blocks."""
    model = make_controlnet(tiny_controlnet_config(cond_in_channels=20, num_modes=None, depth_single_blocks=0))
    folder = write_controlnet_folder(tmp_path / "inpaint", model, {"axes_dims_rope": list(model.config.axes_dim)})
    loaded = load_model(str(folder / "diffusion_pytorch_model.safetensors"), specs=[FLUX1_CONTROLNET_SPEC])
    assert loaded.config.cond_in_channels == 20 and loaded.takes_mask and not loaded.is_union
    assert len(loaded.controlnet_single_blocks) == 0


def test_config_from_config_json_alone():
    cfg = config_from_state({}, {"num_layers": 5, "num_single_layers": 10, "num_mode": 10, "guidance_embeds": True})
    assert cfg == Flux1ControlNetConfig()
    upscaler = config_from_state({}, {"num_layers": 4, "num_single_layers": 10, "guidance_embeds": True})
    assert upscaler.num_modes is None and upscaler.depth == 4  # diffusers: no num_mode, no union
    assert config_from_state({}, {"extra_condition_channels": 4}).cond_in_channels == 68


def test_config_json_contradicting_the_shapes_names_the_field():
    with torch.device("meta"):
        state = make_controlnet().state_dict()
    json_cfg = controlnet_config_json(tiny_controlnet_config(depth=3))
    with pytest.raises(ConfigError, match="depth=3"):
        config_from_state(state, json_cfg)


def test_unsupported_hint_block_config_is_refused():
    with pytest.raises(ConfigError, match="conditioning_embedding_channels"):
        config_from_state({}, {"conditioning_embedding_channels": 16})


def test_unknown_and_missing_keys_are_named(tmp_path):
    state = ours_to_diffusers(make_controlnet().state_dict())
    with pytest.raises(KeyError, match="not_a_key.weight"):
        diffusers_to_ours({**state, "transformer_blocks.0.not_a_key.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="input_hint_block.0.weight"):
        diffusers_to_ours({**state, "input_hint_block.0.weight": torch.zeros(1)})
    axes = {"axes_dims_rope": list(tiny_controlnet_config().axes_dim)}
    extra = {**state, "transformer_blocks.0.not_a_key.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="not_a_key"):
        load_model(extra, specs=[FLUX1_CONTROLNET_SPEC], config=axes)
    missing = dict(state)
    del missing["controlnet_blocks.1.weight"]
    with pytest.raises(CheckpointError, match=r"controlnet_blocks\.1\.weight"):
        load_model(missing, specs=[FLUX1_CONTROLNET_SPEC], config=axes)


def test_a_dit_file_is_not_a_controlnet():
    from diffsynth.flux.flux1.formats import ours_to_diffusers as dit_to_diffusers

    with torch.device("meta"):
        dit = make_dit().state_dict()
    with pytest.raises(UnknownModelError, match="flux1_controlnet"):
        load_model(dit_to_diffusers(dit), specs=[FLUX1_CONTROLNET_SPEC])


# ------------------------------------------------------------------ DiT residual inputs
def test_dit_without_residuals_is_unchanged_and_zero_residuals_change_nothing():
    dit = make_dit().eval()
    args = dit_inputs()
    zeros = torch.zeros(1, args[0].shape[1], dit.config.hidden_size)
    with torch.no_grad():
        plain = dit(*args)
        with_zero = dit(*args, controlnet_block_samples=[zeros], controlnet_single_block_samples=[zeros] * 3)
    assert torch.equal(plain, with_zero)


def test_dit_spreads_short_residual_lists_over_its_blocks():
    """One sample for two blocks equals that sample given for each block."""
    dit = make_dit().eval()
    args = dit_inputs()
    g = torch.Generator().manual_seed(3)
    r = [torch.randn(2, args[0].shape[1], dit.config.hidden_size, generator=g) for _ in range(2)]
    with torch.no_grad():
        short = dit(*args, controlnet_block_samples=r[:1], controlnet_single_block_samples=r[1:])
        full = dit(*args, controlnet_block_samples=[r[0], r[0]], controlnet_single_block_samples=[r[1], r[1]])
    assert torch.equal(short, full)
    with pytest.raises(ValueError, match="ControlNet residual has shape"):
        dit(*args, controlnet_block_samples=[r[0][..., :8]])
    with pytest.raises(ValueError, match="empty"):
        dit(*args, controlnet_block_samples=[])


# ------------------------------------------------------------------ pipeline inputs
@pytest.fixture(scope="module")
def cn_folders(tiny_configs, tmp_path_factory) -> list[str]:
    """A union net (0) and an inpainting net (1) of the tiny DiT's widths, as diffusers folders."""
    dit = tiny_configs["dit"]
    root = tmp_path_factory.mktemp("controlnets")
    union = write_controlnet_folder(root / "union", make_controlnet(repo_controlnet_config(dit, num_modes=4)), None)
    inpaint_cfg = repo_controlnet_config(dit, depth_single_blocks=0, cond_in_channels=68)
    inpaint = write_controlnet_folder(root / "inpaint", make_controlnet(inpaint_cfg), None)
    return [str(union), str(inpaint)]


@pytest.fixture(scope="module")
def cn_pipe(tiny_repo, cn_folders):
    return our_pipeline(tiny_repo, controlnet=cn_folders)


def _image(seed=0):
    return random_image(32, 32, seed)


def _run(pipe, controls, steps=2, **kwargs):
    noise = latent_noise(1, 32, 32, seed=0)
    return pipe(
        "a red circle on a blue background",
        controlnet_inputs=controls,
        num_inference_steps=steps,
        height=32,
        width=32,
        latents=noise,
        t5_sequence_length=16,
        output_type="np",
        progress_bar=False,
        **kwargs,
    )


def test_pipeline_loads_controlnets_in_order(cn_pipe):
    from diffsynth.runtime.controlnet import ControlNetSlot

    nets = cn_pipe.controlnets()
    assert isinstance(cn_pipe.controlnet, ControlNetSlot) and len(nets) == 2
    assert nets[0].is_union and nets[1].takes_mask
    assert cn_pipe.controlnet.offload_units == ("nets.0.double_blocks", "nets.0.single_blocks") + (
        "nets.1.double_blocks",
        "nets.1.single_blocks",
    )


def test_controls_change_the_image_and_respect_scale_and_steps(cn_pipe):
    from diffsynth.flux.pipeline import ControlNetInput

    plain = _run(cn_pipe, None)
    controlled = _run(cn_pipe, [ControlNetInput(image=_image(), processor_id="depth")])
    assert np.abs(controlled - plain).max() > 1e-4
    off = _run(cn_pipe, [ControlNetInput(image=_image(), processor_id=2, scale=0.0)])
    assert np.abs(off - plain).max() < 1e-6
    by_index = _run(cn_pipe, [ControlNetInput(image=_image(), processor_id=UNION_MODES["depth"])])
    assert np.array_equal(by_index, controlled)
    inpaint = ControlNetInput(image=_image(1), inpaint_mask=_image(2).convert("L"), controlnet_id=1, start=0.5)
    both = _run(cn_pipe, [ControlNetInput(image=_image(), processor_id="depth"), inpaint])
    assert np.abs(both - controlled).max() > 1e-4


def test_first_block_cache_with_controlnets(cn_pipe):
    """ControlNets still run every step (only the DiT is cached); a reused step reuses the residuals of the
    blocks it skips along with the blocks' own work. The inpainting net acts on the later steps only."""
    from diffsynth.flux.pipeline import ControlNetInput

    inpaint = ControlNetInput(image=_image(1), inpaint_mask=_image(2).convert("L"), controlnet_id=1, start=0.5)
    controls = [ControlNetInput(image=_image(), processor_id="depth"), inpaint]
    check_pipeline_first_block_cache(cn_pipe, lambda: _run(cn_pipe, controls, steps=4), steps=4)


def test_control_step_range():
    from diffsynth.flux.pipeline import ControlCondition

    c = ControlCondition(model=None, tokens=torch.zeros(1), start=0.25, end=0.75)
    assert [c.active(i, 4) for i in range(4)] == [False, True, True, False]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(processor_id=None), "needs a control mode"),
        (dict(processor_id="sketch"), "needs a control mode"),
        (dict(processor_id="canny", start=0.5, end=1.5), "start < end"),
        (dict(processor_id="canny", controlnet_id=5), "controlnet_id=5"),
        (dict(processor_id="canny", inpaint_mask=Image.new("L", (32, 32))), "takes no mask"),
        (dict(controlnet_id=1), "give inpaint_mask"),
        (dict(image=None, processor_id="canny"), "image is missing"),
    ],
)
def test_bad_controlnet_inputs_are_refused(cn_pipe, kwargs, match):
    from diffsynth.flux.pipeline import ControlNetInput

    fields = {"image": _image(), **kwargs}
    with pytest.raises(ConfigError, match=match):
        _run(cn_pipe, [ControlNetInput(**fields)], steps=1)


def test_controlnet_inputs_without_a_controlnet_are_refused(tiny_pipe):
    from diffsynth.flux.pipeline import ControlNetInput

    with pytest.raises(ConfigError, match="no ControlNet is loaded"):
        _run(tiny_pipe, [ControlNetInput(image=_image())], steps=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=128, num_heads=1), "hidden_size is 128, the DiT's hidden_size is 256"),
        (dict(context_in_dim=48), "context_in_dim is 48, the DiT's context_in_dim is 32"),
        (dict(vec_in_dim=16), "vec_in_dim is 16, the DiT's vec_in_dim is 32"),
    ],
)
def test_a_controlnet_that_does_not_fit_the_dit_is_refused_at_load(
    tiny_pipe, tiny_configs, tmp_path, overrides, message
):
    """Named by its file at load, not by a shape error from the DiT's blocks at the first step; nothing joins."""
    folder = write_controlnet_folder(
        tmp_path / "net", make_controlnet(repo_controlnet_config(tiny_configs["dit"], **overrides)), None
    )
    before = len(tiny_pipe.controlnets())
    with pytest.raises(ConfigError, match=f"{tmp_path / 'net'}.* does not fit the DiT: the ControlNet's {message}"):
        tiny_pipe.load_controlnet(str(folder))
    assert len(tiny_pipe.controlnets()) == before


def test_union_mode_may_be_a_numpy_integer():
    from types import SimpleNamespace

    from diffsynth.flux.pipeline import _control_mode

    union = SimpleNamespace(is_union=True, config=SimpleNamespace(num_modes=4))
    mode = _control_mode(union, np.int64(1), "controlnet_inputs[0]")
    assert mode == 1 and type(mode) is int


def test_unknown_controlnet_source_is_refused(tiny_pipe):
    with pytest.raises(ConfigError, match="neither an existing file"):
        tiny_pipe.load_controlnet("no/such/thing")


def test_vram_managed_controlnets_give_the_same_image(tiny_repo, cn_folders, cn_pipe):
    """The ControlNets under the VRAM manager (every block streamed) change nothing."""
    from diffsynth.flux.pipeline import ControlNetInput

    managed = our_pipeline(tiny_repo, vram_limit=0)
    managed.load_controlnet(cn_folders)
    assert "controlnet" in managed.vram_handles
    controls = [
        ControlNetInput(image=_image(), processor_id="blur"),
        ControlNetInput(image=_image(1), inpaint_mask=_image(2).convert("L"), controlnet_id=1, scale=0.5),
    ]
    assert np.array_equal(_run(managed, controls), _run(cn_pipe, controls))


def test_controlnet_files_among_model_configs_join_the_slot(tiny_repo, cn_folders):
    """The ControlNet spec is registered with the family, so `model_configs` may list ControlNet files: they
    are collected in load order like `controlnet=`."""
    import diffsynth.runtime.registry as registry
    from diffsynth.flux import FluxImagePipeline
    from diffsynth.runtime.hub import ModelConfig

    assert FLUX1_CONTROLNET_SPEC in registry.all_specs()
    configs = [ModelConfig(path=str(Path(f) / "diffusion_pytorch_model.safetensors")) for f in cn_folders]
    pipe = FluxImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", model_configs=configs)
    assert [net.is_union for net in pipe.controlnets()] == [True, False]


def test_cli_controlnet_flags_with_a_union_mode(tiny_repo, cn_folders, tmp_path):
    """`--controlnet` + `--control-image IMAGE:SCALE` + `--control-mode depth` give the image the Python API gives
    with the same union net and `ControlNetInput`; a union net without a mode is one clear error."""
    from diffsynth.runtime.cli import main
    from diffsynth.runtime.controlnet import ControlNetInput

    _image(4).save(tmp_path / "c.png")
    out = tmp_path / "cli.png"
    args = ["generate", "--model", str(tiny_repo), "--prompt", "a red circle", "--seed", "3", "--output", str(out)]
    args += ["--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", "--dtype", "float32"]
    control = ["--controlnet", cn_folders[0], "--control-image", f"{tmp_path / 'c.png'}:0.7"]
    assert main([*args, *control, "--control-mode", "depth"]) == 0
    item = ControlNetInput(image=str(tmp_path / "c.png"), scale=0.7, processor_id="depth")
    pipe = our_pipeline(tiny_repo, controlnet=[cn_folders[0]])
    want = pipe("a red circle", seed=3, height=32, width=32, num_inference_steps=2, controlnet_inputs=[item])
    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(want))
    assert main([*args, *control]) == 2  # the union net needs a mode
