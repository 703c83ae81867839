"""Z-Image Fun ControlNet (PAI Union 1.0 / 2.0 / 2.1): the model, its files, the pipeline, and diffusers parity.

Parity (marked `parity`, fp32 CPU, same weights) is against diffusers 0.42's `ZImageControlNetModel` +
`ZImageTransformer2DModel` and its `ZImageControlNetPipeline` / `ZImageControlNetInpaintPipeline`. For the
2.x nets diffusers adds the refiner-stage hints only to the ControlNet's own copy of the DiT's tokens, while
the authors' model (VideoX-Fun `ZImageControlTransformer2DModel`) and DiffSynth-Studio add them to the DiT's:
the reference is diffusers' modules with that one addition made by hooks (`refiner_hints_into_the_dit`), and
each such test also shows that plain diffusers differs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError, UnknownModelError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.loading import load_models
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights
from diffsynth.z_image import ControlNetInput, ZImagePipeline
from diffsynth.z_image.controlnet import RELEASED_PLACES, ZImageControl, ZImageControlNet, ZImageControlNetConfig
from diffsynth.z_image.formats import CONTROLNET_SPEC, controlnet_config_from_state

# diffusers 0.42 `ZImageControlNetModel(control_layers_places=[0, 2, ..., 28], control_refiner_layers_places=[0, 1],
# control_in_dim=33, add_control_noise_refiner="control_noise_refiner")` built on meta: its single-file converter
# (`convert_z_image_controlnet_checkpoint_to_diffusers`) keeps a 2.1 file's keys as they are, and DiffSynth-Studio's
# `ZImageControlNet` (diffsynth/models/z_image_controlnet.py), which loads the file
# Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors as is, has the same module names.
KEYS_FILE = Path(__file__).parent / "data" / "keys" / "zimage_controlnet_union_2_1.json"
PROMPTS = ["a red circle on a blue background", "a yellow triangle on a black background"]
FAST = {"height": 64, "width": 64, "num_inference_steps": 3, "progress_bar": False}


def _test_dit():
    """`tiny_config` and friends of the DiT live only in test_dit.py; load that module by path."""
    spec = importlib.util.spec_from_file_location("z_image_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _test_dit()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: intra-op threads only add scheduling overhead on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ tiny sizes (the one place they live)
def dit_config():
    """The DiT the model-level tests drive: three main layers (hints after 0 and 2), two refiner layers."""
    return T.tiny_config(n_layers=3, n_refiner_layers=2)


def tiny_config(variant: str = "2.1", places=(0, 2), refiner=(0, 1), **overrides) -> ZImageControlNetConfig:
    """A tiny net of each released kind for the tiny DiT (4 latent channels): 2.1 and 2.0 take 4 + 1 + 4."""
    kinds = {
        "2.1": dict(add_control_noise_refiner="control_noise_refiner", control_in_dim=9, n_refiner_layers=len(refiner)),
        "2.0": dict(add_control_noise_refiner="control_layers", control_in_dim=9, n_refiner_layers=0),
        "1.0": dict(add_control_noise_refiner=None, control_in_dim=4, n_refiner_layers=len(refiner) or 1),
    }
    fields = dict(
        control_layers_places=places,
        control_refiner_layers_places=() if variant == "1.0" else refiner,
        dim=64,
        n_heads=2,
        **kinds[variant],
    )
    return ZImageControlNetConfig(**{**fields, **overrides})


def make_net(config: ZImageControlNetConfig | None = None, seed: int = 5) -> ZImageControlNet:
    return random_weights(ZImageControlNet(config or tiny_config()), seed)


def config_json(cfg: ZImageControlNetConfig) -> dict:
    """diffusers' `ZImageControlNetModel` config.json for `cfg` (what a diffusers-saved net carries)."""
    return {
        "_class_name": "ZImageControlNetModel",
        "control_layers_places": list(cfg.control_layers_places),
        "control_refiner_layers_places": list(cfg.control_refiner_layers_places) or None,
        "control_in_dim": cfg.control_in_dim,
        "add_control_noise_refiner": cfg.add_control_noise_refiner,
        "all_patch_size": [cfg.patch_size],
        "all_f_patch_size": [cfg.f_patch_size],
        "dim": cfg.dim,
        "n_refiner_layers": max(cfg.n_refiner_layers, len(cfg.control_refiner_layers_places)),
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_heads,
        "norm_eps": cfg.norm_eps,
        "qk_norm": cfg.qk_norm,
    }


def write_net(folder: Path, net: ZImageControlNet, with_json: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    if with_json:
        (folder / "config.json").write_text(json.dumps(config_json(net.config)))
    return path


def control_latents(cfg: ZImageControlNetConfig, batch=2, size=(8, 10), seed=9) -> torch.Tensor:
    return torch.randn(batch, cfg.control_in_dim, *size, generator=torch.Generator().manual_seed(seed))


class Controlled(torch.nn.Module):
    """DiT + one ControlNet as one module, for the conformance checks: the net only runs inside the DiT."""

    def __init__(self, dit, net, scale=0.7):
        super().__init__()
        self.dit, self.net, self.scale = dit, net, scale

    @property
    def gradient_checkpointing(self):
        return self.net.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, flag):
        self.dit.gradient_checkpointing = self.net.gradient_checkpointing = flag

    def forward(self, x, t, text, latents):
        return self.dit(x, t, text, [ZImageControl(self.net, latents, self.scale)])


def controlled(variant):
    return lambda: Controlled(T.make_model(dit_config(), seed=3), make_net(tiny_config(variant)))


def controlled_inputs(variant="2.1"):
    x, t, text = T.inputs(caption_lengths=(7, 40), size=(8, 10))  # image and caption pads, masked captions
    return x, t, text, control_latents(tiny_config(variant))


# ------------------------------------------------------------------ config
def test_default_config_is_the_released_union_2_1():
    cfg = ZImageControlNetConfig()
    assert cfg.control_layers_places == tuple(range(0, 30, 2)) and cfg.control_refiner_layers_places == (0, 1)
    assert (cfg.control_in_dim, cfg.add_control_noise_refiner, cfg.n_refiner_layers) == (33, "control_noise_refiner", 2)
    assert (cfg.dim, cfg.n_heads, cfg.patch_key, cfg.patch_dim, cfg.ffn_dim) == (3840, 30, "2-1", 132, 10240)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"control_layers_places": (2, 4)}, "control_layers_places"),
        ({"control_layers_places": (0, 4, 2)}, "control_layers_places"),
        ({"control_refiner_layers_places": (0, 1, 2)}, "control_refiner_layers_places"),
        ({"add_control_noise_refiner": "refiner"}, "add_control_noise_refiner"),
        ({"dim": 65}, "dim"),
        ({"control_in_dim": 0}, "control_in_dim"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# ------------------------------------------------------------------ conformance (the net inside the DiT)
@pytest.mark.parametrize("variant", ["2.1", "1.0"])
def test_forward_backward_checkpointing_and_meta_load(variant):
    args = controlled_inputs(variant)
    cf.check_forward(controlled(variant), args, expected_shapes=[args[0].shape])
    cf.check_backward(controlled(variant), args)  # every DiT and ControlNet parameter gets a gradient
    cf.check_gradient_checkpointing(controlled(variant), args, atol=1e-6)
    cf.check_meta_load(controlled(variant), args)


def test_declared_units_exist():
    cf.check_declared_units(make_net)
    assert ZImageControlNet.offload_units == ("control_layers", "control_noise_refiner")


def test_zero_scale_changes_nothing_and_a_shared_condition_broadcasts():
    dit, net = T.make_model(dit_config(), seed=3).eval(), make_net().eval()
    x, t, text, latents = controlled_inputs()
    with torch.no_grad():
        plain = dit(x, t, text)
        assert torch.equal(dit(x, t, text, [ZImageControl(net, latents, 0.0)]), plain)
        shared = dit(x, t, text, [ZImageControl(net, latents[:1], 0.5)])
        each = dit(x, t, text, [ZImageControl(net, latents[:1].expand(2, -1, -1, -1), 0.5)])
        two = dit(x, t, text, [ZImageControl(net, latents, 0.5), ZImageControl(net, latents, 0.25)])
        one = dit(x, t, text, [ZImageControl(net, latents, 0.75)])
    assert torch.equal(shared, each) and (shared - plain).abs().max() > 1e-3
    # two controls are two streams whose hints add up: the same condition twice is once with the summed scale
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("latents", "config", "message"),
    [
        (torch.zeros(2, 4, 8, 10), {}, "control latents have shape"),
        (torch.zeros(2, 9, 8, 8), {}, "control latents have shape"),
        (torch.zeros(3, 9, 8, 10), {}, "control latents have shape"),
        (torch.zeros(2, 9, 8, 10), {"places": (0, 3)}, "DiT layers"),
        (torch.zeros(2, 9, 8, 10), {"refiner": (0, 2), "n_refiner_layers": 3}, "noise-refiner layers"),
    ],
)
def test_control_that_does_not_fit_is_a_clear_error(latents, config, message):
    dit, net = T.make_model(dit_config()), make_net(tiny_config(**config))
    x, t, text = T.inputs(size=(8, 10))
    with pytest.raises(ValueError, match=message):
        dit(x, t, text, [ZImageControl(net, latents)])


def test_first_block_cache_skips_the_control_blocks_of_a_reused_step():
    """Reused: the DiT's first layer and the control block after it run, the later ones of both are skipped."""
    from diffsynth.runtime.step_cache import FirstBlockCache

    dit, net = T.make_model(dit_config(), seed=3).eval(), make_net().eval()
    x, t, text, latents = controlled_inputs()
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(net.control_layers)]
    cache = dit.step_cache = FirstBlockCache(float("inf"))
    cache.begin_loop()
    with torch.no_grad():
        for _ in range(2):
            cache.begin_step()
            ran.clear()
            out = dit(x, t, text, [ZImageControl(net, latents)])
    dit.step_cache = None
    for hook in hooks:
        hook.remove()
    assert cache.skipped == 1 and ran == [0]
    with torch.no_grad():
        torch.testing.assert_close(out, dit(x, t, text, [ZImageControl(net, latents)]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ files and configs
def released_meta_state(variant="2.1") -> dict[str, torch.Tensor]:
    configs = {
        "2.1": ZImageControlNetConfig(),
        "1.0": ZImageControlNetConfig(
            control_layers_places=RELEASED_PLACES[6],
            control_refiner_layers_places=(),
            control_in_dim=16,
            add_control_noise_refiner=None,
        ),
        "lite": ZImageControlNetConfig(control_layers_places=RELEASED_PLACES[3]),
    }
    with torch.device("meta"):
        return ZImageControlNet(configs[variant]).state_dict()


def test_released_union_2_1_has_exactly_the_official_keys_and_shapes():
    official = json.loads(KEYS_FILE.read_text())
    ours = {k: list(v.shape) for k, v in released_meta_state().items()}
    assert sorted(ours.keys() ^ official.keys()) == []
    assert ours == official and list(ours) == list(official)


@pytest.mark.parametrize(
    ("variant", "places", "mode", "channels"),
    [
        ("2.1", RELEASED_PLACES[15], "control_noise_refiner", 33),
        ("lite", (0, 10, 20), "control_noise_refiner", 33),
        ("1.0", (0, 5, 10, 15, 20, 25), None, 16),
    ],
)
def test_config_from_released_shapes(variant, places, mode, channels):
    state = released_meta_state(variant)
    assert CONTROLNET_SPEC.match(state).name == "pai"
    cfg = controlnet_config_from_state(state)
    assert (cfg.control_layers_places, cfg.add_control_noise_refiner, cfg.control_in_dim) == (places, mode, channels)
    assert cfg.dim == 3840 and cfg.n_heads == 30


def test_diffusers_saved_2_0_without_refiner_blocks_reads_as_2_0():
    state = {k: v for k, v in released_meta_state().items() if not k.startswith("control_noise_refiner.")}
    cfg = controlnet_config_from_state(state)
    assert (cfg.add_control_noise_refiner, cfg.n_refiner_layers, cfg.control_refiner_layers_places) == (
        "control_layers",
        0,
        (0, 1),
    )


@pytest.mark.parametrize("variant", ["2.1", "2.0", "1.0"])
def test_spec_config_from_tiny_shapes_and_json_rebuilds_the_same_model(variant):
    cfg = tiny_config(variant)
    assert cf.check_spec_config(CONTROLNET_SPEC, lambda: make_net(cfg), config_json(cfg)) == cfg
    assert controlnet_config_from_state({}, config_json(cfg)) == cfg  # the json alone, as diffusers reads it


def test_layout_round_trip():
    cf.check_layout_roundtrip(make_net, CONTROLNET_SPEC.layouts[0])


def test_unknown_layer_count_without_json_and_contradicting_json_are_errors():
    with torch.device("meta"):
        state = make_net().state_dict()
    with pytest.raises(ConfigError, match="control_layers_places"):
        controlnet_config_from_state(state)
    with pytest.raises(ConfigError, match="names 3 layers but the file has 2"):
        controlnet_config_from_state(state, {**config_json(tiny_config()), "control_layers_places": [0, 1, 2]})
    with pytest.raises(ConfigError, match="control_in_dim"):
        controlnet_config_from_state(state, {**config_json(tiny_config()), "control_in_dim": 33})


def test_strict_loading_names_the_key_and_the_file(tmp_path):
    net = make_net()
    path = write_net(tmp_path / "ok", net)
    (loaded,) = load_models([str(path)], specs=[CONTROLNET_SPEC])
    assert loaded.role == "controlnet" and loaded.config == net.config
    state = net.state_dict()
    extra = write_net(tmp_path / "extra", net)
    save_file({**state, "control_layers.1.rogue.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(CheckpointError, match=r"unexpected keys 'control_layers\.1\.rogue\.weight'") as error:
        load_models([str(extra)], specs=[CONTROLNET_SPEC])
    assert str(extra) in str(error.value)
    missing = write_net(tmp_path / "missing", net)
    save_file({k: v for k, v in state.items() if k != "control_layers.1.after_proj.bias"}, str(missing))
    with pytest.raises(CheckpointError, match=r"missing keys 'control_layers\.1\.after_proj\.bias'") as error:
        load_models([str(missing)], specs=[CONTROLNET_SPEC])
    assert str(missing) in str(error.value)
    stray = write_net(tmp_path / "stray", net)
    save_file({**state, "lora_unet.weight": torch.zeros(2)}, str(stray))
    with pytest.raises(UnknownModelError, match="lora_unet.weight"):
        load_models([str(stray)], specs=[CONTROLNET_SPEC])


def test_a_2_0_file_is_told_from_2_1_by_its_zero_refiner_projections(tmp_path):
    """Same keys and shapes: the untrained (zero) refiner of a 2.0 file switches the refiner stage to control_layers."""
    net = make_net()
    with torch.no_grad():
        net.control_noise_refiner[0].before_proj.weight.zero_()
    (loaded,) = load_models([str(write_net(tmp_path, net))], specs=[CONTROLNET_SPEC])
    assert loaded.module.config.add_control_noise_refiner == "control_layers"
    as_2_0 = ZImageControlNet(tiny_config(n_refiner_layers=2, add_control_noise_refiner="control_layers"))
    as_2_0.load_state_dict(net.state_dict())
    dit = T.make_model(dit_config(), seed=3).eval()
    x, t, text, latents = controlled_inputs()
    with torch.no_grad():
        got = dit(x, t, text, [ZImageControl(loaded.module.eval(), latents)])
        want = dit(x, t, text, [ZImageControl(as_2_0.eval(), latents)])
    assert torch.equal(got, want)


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def net_files(tmp_path_factory) -> dict[str, Path]:
    """A 2.1 and a 1.0 net for the tiny repo's DiT (2 main layers, 1 refiner layer), with diffusers config.json."""
    root = tmp_path_factory.mktemp("controlnets")
    nets = {
        "2.1": make_net(tiny_config("2.1", places=(0, 1), refiner=(0,)), seed=7),
        "1.0": make_net(tiny_config("1.0", places=(0, 1)), seed=8),
    }
    return {name: write_net(root / name, net) for name, net in nets.items()}


@pytest.fixture(scope="module")
def pipe(tiny_repo, net_files):
    return ZImagePipeline.from_pretrained(
        str(tiny_repo), torch_dtype="float32", device="cpu", controlnet=[str(net_files["2.1"]), str(net_files["1.0"])]
    )


def picture(seed=0, size=64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask(size=64) -> Image.Image:
    """White (repaint) on the left half, with a soft band that the 0.5 threshold cuts."""
    ramp = np.clip((np.arange(size) - (size - 1) / 2) * -80 + 128, 0, 255).astype(np.uint8)  # 168 | 88 at 31 | 32
    return Image.fromarray(np.tile(ramp, (size, 1)))  # 2-D uint8: mode "L"


def run(pipe, controls, steps=3, **kwargs):
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    options = {**FAST, "num_inference_steps": steps, **kwargs}
    return pipe(PROMPTS[0], latents=noise, controlnet_inputs=controls, output_type="pt", **options)


def test_controlnets_load_in_order_from_every_source(tiny_repo, net_files, pipe):
    from diffsynth.runtime.controlnet import ControlNetSlot

    assert isinstance(pipe.controlnet, ControlNetSlot)
    assert [n.config.add_control_noise_refiner for n in pipe.controlnets()] == ["control_noise_refiner", None]
    assert pipe.controlnet.offload_units == (
        "nets.0.control_layers",
        "nets.0.control_noise_refiner",
        "nets.1.control_layers",
        "nets.1.control_noise_refiner",
    )
    listed = ZImagePipeline.from_pretrained(  # DiffSynth-Studio lists the ControlNet first among model_configs
        torch_dtype="float32",
        device="cpu",
        model_configs=[ModelConfig(path=str(net_files["1.0"]))]
        + [ModelConfig(path=str(tiny_repo / d)) for d in ("transformer", "vae", "text_encoder")],
        tokenizer_config=ModelConfig(path=str(tiny_repo / "tokenizer")),
    )
    assert [n.config.control_in_dim for n in listed.controlnets()] == [4]
    assert listed.load_controlnet(str(net_files["2.1"])) == [1]


def test_controls_change_the_image_respect_scale_and_steps(pipe):
    plain = run(pipe, None)
    control = ControlNetInput(image=picture(), scale=0.8)
    controlled = run(pipe, [control])
    assert (controlled - plain).abs().max() > 1e-3
    assert torch.equal(run(pipe, [ControlNetInput(image=picture(), scale=0.0)]), plain)
    late = run(pipe, [ControlNetInput(image=picture(), scale=0.8, start=0.5)])
    assert (late - plain).abs().max() > 1e-4 and (late - controlled).abs().max() > 1e-4
    inpaint = ControlNetInput(inpaint_image=picture(1), inpaint_mask=mask())
    both = run(pipe, [control, inpaint, ControlNetInput(image=picture(2), controlnet_id=1, scale=0.5)])
    assert (both - controlled).abs().max() > 1e-4


def test_condition_is_built_as_the_authors_build_it(pipe):
    """2.x: [VAE(control) | 1 - binarised mask at the latent grid | VAE(inpaint image with the repainted pixels
    zeroed)]; a missing control is zero latents, a missing mask a zero channel and VAE(an all-zero image)."""
    from diffsynth.runtime.media import pil_to_tensor

    net = pipe.controlnets()[0]
    vae = pipe.vae.encode
    zero_image = vae(torch.zeros(1, 3, 64, 64))
    full = pipe.encode_control(
        ControlNetInput(image=picture(), inpaint_image=picture(1), inpaint_mask=mask()), net, 64, 64
    )
    pixels = pil_to_tensor(picture(1))
    repaint = torch.zeros(1, 1, 64, 64)
    repaint[..., :32] = 1.0
    want = torch.cat([vae(pil_to_tensor(picture())), 1 - repaint[..., ::8, ::8], vae(pixels * (1 - repaint))], dim=1)
    torch.testing.assert_close(full.control.latents, want, atol=1e-6, rtol=0)
    only_image = pipe.encode_control(ControlNetInput(image=picture()), net, 64, 64).control.latents
    torch.testing.assert_close(only_image[:, 4:5], torch.zeros(1, 1, 8, 8))
    torch.testing.assert_close(only_image[:, 5:], zero_image, atol=1e-6, rtol=0)
    only_inpaint = pipe.encode_control(ControlNetInput(inpaint_image=picture(1), inpaint_mask=mask()), net, 64, 64)
    assert torch.equal(only_inpaint.control.latents[:, :4], torch.zeros(1, 4, 8, 8))


def test_first_block_cache_with_controls(pipe):
    controls = [ControlNetInput(image=picture(), scale=0.8), ControlNetInput(image=picture(2), controlnet_id=1)]
    plain = run(pipe, controls, steps=4)
    caches = pipe.enable_first_block_cache(0.0)
    try:
        assert torch.equal(run(pipe, controls, steps=4), plain) and caches["dit"].skipped == 0
        loose = pipe.enable_first_block_cache(1e9)["dit"]
        approx = run(pipe, controls, steps=4)
        assert (loose.calls, loose.skipped) == (4, 3) and (approx - plain).abs().max() > 1e-4
    finally:
        pipe.disable_first_block_cache()
    assert torch.equal(run(pipe, controls, steps=4), plain)


def test_vram_managed_controlnets_give_the_same_image(tiny_repo, net_files, pipe):
    managed = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    managed.load_controlnet([str(net_files["2.1"]), str(net_files["1.0"])])
    assert "controlnet" in managed.vram_handles
    controls = [
        ControlNetInput(image=picture(), inpaint_image=picture(1), inpaint_mask=mask(), scale=0.8),
        ControlNetInput(image=picture(2), controlnet_id=1),
    ]
    # not bit for bit: the unmanaged weights are views of the memory-mapped file, some not 64-byte aligned, which
    # changes the CPU kernels' summation order (~1e-6); the manager's copies are aligned
    torch.testing.assert_close(run(managed, controls, steps=2), run(pipe, controls, steps=2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(processor_id="canny"), "processor_id='canny' is not read"),
        (dict(controlnet_id=2), "controlnet_id=2"),
        (dict(scale="strong"), "scale='strong'"),
        (dict(start=0.5, end=1.5), "start < end"),
        (dict(image=None), "give the control image, or inpaint_mask"),
        (dict(inpaint_mask=Image.new("L", (64, 64))), "inpaint_mask and inpaint_image go together"),
        (dict(inpaint_image=picture()), "inpaint_mask and inpaint_image go together"),
        (dict(controlnet_id=1, inpaint_mask=Image.new("L", (64, 64))), r"\(Union 1.0\) takes no inpainting"),
        (dict(controlnet_id=1, image=None), "image is missing"),
        # a wrong type of image was "an image must be a file path or a PIL.Image, got list", naming no field
        (dict(image=[picture(0), picture(1)]), r"^controlnet_inputs\[0\]\.image must be a file path or a PIL\.Image"),
        (dict(image=np.zeros((64, 64, 3), np.uint8)), r"^controlnet_inputs\[0\]\.image must be .*, got ndarray"),
        (
            dict(inpaint_image=np.zeros((64, 64, 3), np.uint8), inpaint_mask=mask()),
            r"^controlnet_inputs\[0\]\.inpaint_image must be .*, got ndarray",
        ),
        (
            dict(inpaint_image=picture(1), inpaint_mask=np.zeros((64, 64), np.uint8)),
            r"^controlnet_inputs\[0\]\.inpaint_mask must be .*, got ndarray",
        ),
    ],
)
def test_bad_controlnet_inputs_are_refused(pipe, fields, match):
    with pytest.raises(ConfigError, match=match):
        run(pipe, [ControlNetInput(**{"image": picture(), **fields})], steps=1)


def test_a_wrong_image_type_names_its_input(pipe):
    """The second input's tensor image is named by its place in controlnet_inputs."""
    controls = [ControlNetInput(image=picture()), ControlNetInput(image=torch.zeros(3, 64, 64), controlnet_id=1)]
    with pytest.raises(ConfigError, match=r"^controlnet_inputs\[1\]\.image must be a file path .*, got Tensor"):
        run(pipe, controls, steps=1)


def test_refusals_without_a_net_and_for_foreign_inputs(tiny_repo, pipe, tmp_path):
    bare = ZImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no ControlNet is loaded"):
        run(bare, [ControlNetInput(image=picture())], steps=1)
    with pytest.raises(ConfigError, match=r"controlnet_inputs\[0\] is a dict"):
        run(pipe, [{"image": picture()}], steps=1)
    with pytest.raises(ConfigError, match="neither an existing file or folder nor a known ControlNet repo"):
        bare.load_controlnet("no/such-net")
    wide = make_net(tiny_config("2.1", places=(0, 2), refiner=(0,)))  # a hint after layer 2 of a 2-layer DiT
    with pytest.raises(ConfigError, match="does not fit this Z-Image DiT"):
        bare.load_controlnet(str(write_net(tmp_path / "wide", wide)))


@pytest.mark.slow  # two processes start (~10 s of this file's ~25 s on 2 cores)
def test_divided_over_two_ranks_equals_one_process(tiny_repo, net_files):
    """Ulysses (2x1: the control stream is sharded like the DiT's tokens) and CFG batch division (1x2), each
    with and without the first-block cache, give one process's image (parallel_worker.py)."""
    from diffsynth.runtime.testing.distributed import run_ranks

    worker = Path(__file__).with_name("parallel_worker.py")
    run_ranks(worker, 2, str(tiny_repo), "2x1,1x2", "--controlnet", str(net_files["2.1"]), timeout=300)


def test_known_hub_repos_name_their_file():
    from diffsynth.z_image.pipeline import ZImagePipeline

    _controlnet_source = ZImagePipeline.controlnet_source

    config = _controlnet_source("PAI/Z-Image-Turbo-Fun-Controlnet-Union-2.1")
    assert config.origin_file_pattern == "Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors"
    assert _controlnet_source("alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union").origin_file_pattern == (
        "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
    )


# ------------------------------------------------------------------ parity with diffusers
def reference_dit(cfg):
    """diffusers' Z-Image DiT at `cfg` (test_dit_parity.py's builder)."""
    from diffsynth.runtime.testing.modules import load_beside

    return load_beside(__file__, "test_dit_parity.py", "z_image_test_dit_parity").reference_dit(cfg)


def reference_net(net: ZImageControlNet, dit):
    """diffusers' net with our weights, converted by our layout (names as in the official files)."""
    from diffusers import ZImageControlNetModel

    fields = {k: v for k, v in config_json(net.config).items() if not k.startswith("_")}
    reference = ZImageControlNetModel(**fields).eval()
    reference.load_state_dict(CONTROLNET_SPEC.layouts[0].to_ours(net.state_dict()), strict=True)
    return ZImageControlNetModel.from_transformer(reference, dit)


@contextlib.contextmanager
def refiner_hints_into_the_dit(net, dit, scale: float):
    """The authors' wiring on diffusers' modules: the hints of the net's refiner stage (its last call) are also
    added after the DiT's own noise-refiner layers (not while the net itself runs those shared layers)."""
    mode = net.config.add_control_noise_refiner
    if mode is None:
        yield
        return
    state = {"inside": False, "hints": None}
    stage = net.control_noise_refiner if mode == "control_noise_refiner" else net.control_layers

    def grab(module, args, out):
        if state["hints"] is None:  # 2.0 runs control_layers again after the refiner stage
            state["hints"] = torch.unbind(out)[:-1]

    hooks = [
        net.register_forward_pre_hook(lambda m, a: state.update(inside=True, hints=None)),
        net.register_forward_hook(lambda m, a, o: state.update(inside=False)),
        stage[-1].register_forward_hook(grab),
    ]
    for k, place in enumerate(net.config.control_refiner_layers_places):
        hooks.append(
            dit.noise_refiner[place].register_forward_hook(
                lambda m, a, o, k=k: o if state["inside"] else o + scale * state["hints"][k]
            )
        )
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _as_list(x):
    return [xi.unsqueeze(1) for xi in x]


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["2.1", "2.0", "1.0"])
def test_controlled_dit_matches_diffusers(variant):
    """Measured: <= 3.4e-6 (outputs up to ~3.9); plain diffusers is ~2 away for 2.1 and 2.0."""
    pytest.importorskip("diffusers")
    cfg = dit_config()
    dit, net = T.make_model(cfg, seed=3).eval(), make_net(tiny_config(variant)).eval()
    ref_dit = reference_dit(cfg)
    ref_dit.load_state_dict(dit.state_dict())
    ref_net = reference_net(net, ref_dit)
    x, t, text, latents = controlled_inputs(variant)
    scale = 0.7
    with torch.no_grad():
        got = dit(x, t, text, [ZImageControl(net, latents, scale)])
        with refiner_hints_into_the_dit(ref_net, ref_dit, scale):
            samples = ref_net(_as_list(x), t, text, _as_list(latents), conditioning_scale=scale)
            want = ref_dit_output(ref_dit, x, t, text, samples)
        plain = ref_dit_output(ref_dit, x, t, text, samples)
    diff = (got - want).abs().max().item()
    assert want.abs().max() > 0.1 and (want - ref_dit_output(ref_dit, x, t, text)).abs().max() > 0.1
    assert diff <= 1e-5, f"{variant}: max abs diff {diff:.3g} vs diffusers"
    if variant != "1.0":  # plain diffusers leaves the refiner hints out of the DiT's tokens
        assert (plain - want).abs().max() > 1e-2


def ref_dit_output(ref_dit, x, t, text, samples=None):
    with torch.no_grad():
        out = ref_dit(_as_list(x), t, text, controlnet_block_samples=samples, return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["2.1", "2.0", "1.0"])
def test_full_size_keys_and_shapes_equal_diffusers(variant):
    from_diffusers = pytest.importorskip("diffusers").ZImageControlNetModel
    cfg = {
        "2.1": ZImageControlNetConfig(),
        "2.0": ZImageControlNetConfig(add_control_noise_refiner="control_layers", n_refiner_layers=0),
        "1.0": ZImageControlNetConfig(
            control_layers_places=RELEASED_PLACES[6],
            control_refiner_layers_places=(),
            control_in_dim=16,
            add_control_noise_refiner=None,
        ),
    }[variant]
    fields = {k: v for k, v in config_json(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in from_diffusers(**fields).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in ZImageControlNet(cfg).state_dict().items()}
    assert ours == theirs and list(ours) == list(theirs)
    if variant == "2.1":
        assert theirs == {k: tuple(v) for k, v in json.loads(KEYS_FILE.read_text()).items()}


@pytest.mark.parity
def test_diffusers_single_file_detection_agrees_on_2_0_and_2_1():
    """diffusers recognises our released 2.1 state dict as 2.1 and, with a zero refiner projection, as 2.0 (the
    values tell them apart, as `_detect_2_0` does)."""
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    state = {k: torch.ones(1) for k in released_meta_state()}
    assert utils.infer_diffusers_model_type(state) == "z-image-turbo-controlnet-2.1"
    state["control_noise_refiner.0.before_proj.weight"] = torch.zeros(1)
    assert utils.infer_diffusers_model_type(state) == "z-image-turbo-controlnet-2.0"
    assert (
        utils.convert_z_image_controlnet_checkpoint_to_diffusers(
            dict(state), {"add_control_noise_refiner": "control_noise_refiner"}
        ).keys()
        == state.keys()
    )


@pytest.fixture(scope="module")
def reference_parts(tiny_repo):
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer, Qwen3Model

    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_repo / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(tiny_repo / "vae"),
        text_encoder=Qwen3Model.from_pretrained(tiny_repo / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_repo / "tokenizer"),
        transformer=diffusers.ZImageTransformer2DModel.from_pretrained(tiny_repo / "transformer"),
    )


@pytest.mark.parity
@pytest.mark.parametrize(("variant", "guidance"), [("1.0", 2.5), ("2.1", 0.0), ("2.1", 2.5)])
def test_pipeline_matches_diffusers(reference_parts, net_files, pipe, variant, guidance):
    """1.0 with CFG against `ZImageControlNetPipeline`; 2.1 (control + mask + image) against
    `ZImageControlNetInpaintPipeline`, with the refiner hints added to the DiT as the authors do (plain diffusers
    is ~0.8 away on these images). Measured: <= 2.5e-5."""
    import diffusers

    net = diffusers.ZImageControlNetModel.from_pretrained(net_files[variant].parent).eval()
    prompts = PROMPTS if variant == "1.0" else PROMPTS[:1]  # diffusers' inpainting mask is not batched
    scale, noise = 0.8, torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(11))
    # 4 steps: diffusers' float32 sigmas equal ours bit for bit (for 3 they differ by 6e-8, which these random
    # tiny models amplify to ~1e-4 with or without a ControlNet)
    common = dict(num_inference_steps=4, height=64, width=64, output_type="np")
    inputs = {"control_image": picture()}
    control = ControlNetInput(image=picture(), scale=scale, controlnet_id=1)
    if variant == "2.1":
        inputs.update(image=picture(1), mask_image=mask())
        control = ControlNetInput(image=picture(), inpaint_image=picture(1), inpaint_mask=mask(), scale=scale)
    cls = diffusers.ZImageControlNetPipeline if variant == "1.0" else diffusers.ZImageControlNetInpaintPipeline
    reference = cls(controlnet=net, **reference_parts)
    reference.set_progress_bar_config(disable=True)
    negative = ["bad quality, blurry"] * len(prompts)
    with torch.no_grad(), refiner_hints_into_the_dit(reference.controlnet, reference.transformer, scale):
        expected = reference(
            list(prompts),  # diffusers rewrites the prompt lists in place (chat template): give it copies
            negative_prompt=list(negative),
            guidance_scale=guidance,
            controlnet_conditioning_scale=scale,
            latents=noise.clone(),
            **inputs,
            **common,
        ).images
    got = pipe(
        prompts,
        negative_prompt=negative,
        cfg_scale=guidance + 1.0,
        controlnet_inputs=[control],
        latents=noise.clone(),
        progress_bar=False,
        **common,
    )
    assert got.shape == expected.shape
    diff = np.abs(got - expected).max()
    assert diff <= 1e-4, f"{variant}: max abs diff {diff:.3g} vs diffusers"
