"""DiffSynth-Studio's Qwen-Image Blockwise ControlNets: the block's arithmetic, where the DiT adds the residuals, the
released layout, loading, and the pipeline's `blockwise_controlnet_inputs` as DiffSynth-Studio builds them.

No installable library implements these nets (diffusers has none; DiffSynth-Studio's package is not importable
beside ours), so the proofs are: the block against its formula in plain torch, the per-block residuals against
the residual lists the DiT takes from InstantX ControlNets (checked against diffusers in test_controlnet.py),
and the pipeline's conditions against DiffSynth-Studio's recipe written out here.
"""

from __future__ import annotations

import numpy as np
import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from diffsynth.qwen_image.blockwise_controlnet import (
    BLOCKWISE_CONTROLNET_SPEC,
    BlockwiseControlNetConfig,
    QwenImageBlockwiseControlNet,
    blockwise_residual,
)
from diffsynth.qwen_image.controlnet import ControlCondition
from diffsynth.runtime.controlnet import ControlNetInput
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on a blue background"


def make_net(seed: int = 0, **overrides) -> QwenImageBlockwiseControlNet:
    config = BlockwiseControlNetConfig(**{"num_layers": 2, "cond_dim": 64, "dim": 32, **overrides})
    return random_weights(QwenImageBlockwiseControlNet(config), seed, scale=0.2)


# ------------------------------------------------------------------ the model
def test_block_is_its_formula():
    block = make_net().controlnet_blocks[1]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)

    def rms(t, weight):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * weight

    hidden = F.gelu(F.linear(rms(x, block.x_rms.weight) + rms(y, block.y_rms.weight), *_wb(block.input_proj)))
    torch.testing.assert_close(block(x, y), F.linear(hidden, *_wb(block.output_proj)), atol=1e-6, rtol=0)


def _wb(linear):
    return linear.weight, linear.bias


def test_conformance_and_units():
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 64, generator=g))
    cf.check_forward(make_net, args, {}, expected_shapes=[(2, 2, 6, 32)])
    cf.check_backward(make_net, args, {})
    cf.check_meta_load(make_net, args, {})
    cf.check_declared_units(make_net)
    cf.check_layout_roundtrip(make_net, BLOCKWISE_CONTROLNET_SPEC.layouts[0])
    cf.check_spec_config(BLOCKWISE_CONTROLNET_SPEC, make_net)


def test_residuals_land_where_the_residual_lists_do():
    """A net whose blocks output a constant `c_i` (input weights zero) adds `scale * c_i` to the generated image's
    tokens after block `i`: exactly what the DiT does with the residual list `[scale * c_i]` (an edit reference's
    tokens get nothing in both)."""
    dit = T.make_model().eval()
    args = T.inputs(shapes=((1, 4, 6), (1, 2, 4)))
    net = make_net(cond_dim=16)
    constants = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for block, c in zip(net.controlnet_blocks, constants, strict=True):
            block.output_proj.weight.zero_()
            block.output_proj.bias.copy_(c)
        embedded = net.embed(torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(4)))
        callable_ = blockwise_residual([ControlCondition(net, embedded, scale=0.7)])
        got = dit(*args, controlnet_block_samples=callable_)
        want = dit(*args, controlnet_block_samples=[(0.7 * c).expand(2, 24, 32) for c in constants])
        plain = dit(*args)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_dit_refuses_blockwise_residuals_under_parallelism():
    dit = T.make_model().eval()
    dit.parallel = object()  # any groups: the callable is not divided over ranks
    with pytest.raises(ConfigError, match="one process"):
        dit(*T.inputs(), controlnet_block_samples=lambda i, image: image * 0)


def test_released_layout_on_meta():
    """DiffSynth-Studio's `QwenImageBlockWiseControlNet`: `img_in` (64, or 68 for Inpaint, -> 3072) and 60 blocks of
    `x_rms`, `y_rms`, `input_proj`, `output_proj` (3072 wide), as its model class defines them."""
    for cond in (64, 68):
        listed = {"img_in.weight": (3072, cond), "img_in.bias": (3072,)}
        for i in range(60):
            listed |= {f"controlnet_blocks.{i}.x_rms.weight": (3072,), f"controlnet_blocks.{i}.y_rms.weight": (3072,)}
            for name in ("input_proj", "output_proj"):
                listed |= {
                    f"controlnet_blocks.{i}.{name}.weight": (3072, 3072),
                    f"controlnet_blocks.{i}.{name}.bias": (3072,),
                }
        state = {k: torch.empty(v, device="meta") for k, v in listed.items()}
        assert BLOCKWISE_CONTROLNET_SPEC.match(state) is not None
        config = BLOCKWISE_CONTROLNET_SPEC.config_from_state(state, None)
        assert config == BlockwiseControlNetConfig(cond_dim=cond)
        with torch.device("meta"):
            ours = QwenImageBlockwiseControlNet(config).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == listed


# ------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    files = {}
    for name, cond, seed in (("depth", 64, 5), ("inpaint", 68, 6)):
        net = make_net(seed, cond_dim=cond)
        files[name] = root / name / "model.safetensors"
        files[name].parent.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files[name]))
    return files


@pytest.fixture(scope="module")
def pipe(tiny_repo, net_files):
    from diffsynth.qwen_image import QwenImagePipeline
    from diffsynth.runtime.hub import ModelConfig

    configs = [ModelConfig(path=str(net_files[k])) for k in ("depth", "inpaint")]  # as DiffSynth-Studio lists them
    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", model_configs=configs)


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def run(pipe, controls, steps=2, **kwargs):
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    options = dict(num_inference_steps=steps, height=64, width=64, cfg_scale=1.0, output_type="np", progress_bar=False)
    return pipe(PROMPT, blockwise_controlnet_inputs=controls, latents=noise, **{**options, **kwargs})


def test_files_among_model_configs_join_the_blockwise_slot(pipe):
    nets = pipe.controlnets("blockwise_controlnet")
    assert len(nets) == 2 and not nets[0].takes_mask and nets[1].takes_mask and pipe.controlnet is None


def test_conditions_follow_diffsynth_studios_recipe(pipe, monkeypatch):
    """The embedded condition is `img_in` of the packed VAE latent of the control image; for the inpainting net
    the image's pixels under a mask brighter than mid-grey are black and `1 - mask` (channel mean, nearest-resized
    to the latent grid) is a 17th channel."""
    from diffsynth.qwen_image.pipeline import pack

    seen = []
    for net in pipe.controlnets("blockwise_controlnet"):
        monkeypatch.setattr(net, "embed", lambda cond, real=net.embed: seen.append(cond) or real(cond))
    control, photo, mask = image(1), image(2), image(3).convert("L").convert("RGB")
    run(pipe, [ControlNetInput(image=control), ControlNetInput(image=photo, inpaint_mask=mask, controlnet_id=1)])

    def latent(picture):
        pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1
        return pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0].float()

    torch.testing.assert_close(seen[0], pack(latent(control)), atol=1e-5, rtol=0)
    mask_pixels = torch.from_numpy(np.array(mask)).permute(2, 0, 1)[None].float() / 127.5 - 1
    blacked = np.asarray(photo).copy()
    blacked[mask_pixels[0].mean(dim=0).numpy() > 0] = 0
    z = latent(Image.fromarray(blacked))
    keep = 1 - F.interpolate(((mask_pixels + 1) / 2).mean(dim=1, keepdim=True), size=z.shape[-2:])
    torch.testing.assert_close(seen[1], pack(torch.cat([z, keep], dim=1)), atol=1e-5, rtol=0)


def test_scale_and_steps(pipe, monkeypatch):
    plain = run(pipe, None)
    assert np.abs(run(pipe, [ControlNetInput(image=image(1))]) - plain).max() > 1e-3
    assert np.array_equal(run(pipe, [ControlNetInput(image=image(1), scale=0.0)]), plain)
    net = pipe.controlnets("blockwise_controlnet")[0]
    calls = []
    monkeypatch.setattr(net, "residual", lambda *a, real=net.residual: calls.append(1) or real(*a))
    run(pipe, [ControlNetInput(image=image(1), start=1.0, end=0.5)], steps=4)  # DiffSynth-Studio's form: 2 of 4
    assert len(calls) == 2 * pipe.dit.config.num_layers


def test_vram_managed_pipeline_gives_the_same_image(tiny_repo, net_files, pipe):
    from diffsynth.qwen_image import QwenImagePipeline

    managed = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu", vram_limit=0)
    managed.load_controlnet([str(net_files["depth"])])
    controls = [ControlNetInput(image=image(1))]
    np.testing.assert_allclose(run(managed, controls), run(pipe, controls), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("controls", "match"),
    [
        ([ControlNetInput(image=image(1), inpaint_mask=image(2))], "takes no mask"),
        ([ControlNetInput(image=image(1), controlnet_id=1)], "inpainting net: give inpaint_mask"),
        ([ControlNetInput(image=image(1), processor_id="depth")], "processor_id is not read"),
        ([ControlNetInput()], "image is missing"),
        ([ControlNetInput(image=image(1), controlnet_id=2)], "controlnet_id=2"),
    ],
)
def test_bad_inputs_are_refused(pipe, controls, match):
    with pytest.raises(ConfigError, match=match):
        run(pipe, controls)


def test_refusals_without_nets_with_both_kinds_and_of_a_mismatched_net(tiny_repo, pipe, tmp_path):
    from diffsynth.qwen_image import QwenImagePipeline

    plain = QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no ControlNet is loaded"):
        run(plain, [ControlNetInput(image=image(1))])
    with pytest.raises(ConfigError, match="not both"):
        run(pipe, [ControlNetInput(image=image(1))], controlnet_inputs=[ControlNetInput(image=image(1))])
    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in make_net(num_layers=3).state_dict().items()}, str(wide))
    plain.load_controlnet(str(wide))
    with pytest.raises(ConfigError, match="has 3 blocks"):
        run(plain, [ControlNetInput(image=image(1))])
