"""LoRA files for Qwen-Image (peft/diffusers, `diffusion_model.` as in Qwen-Image-Lightning, kohya/ComfyUI)
loaded into our pipeline give the DiT output diffusers gives with `QwenImagePipeline.load_lora_weights`."""

from __future__ import annotations

import pytest
import qwen_image_test_dit as T  # loaded by conftest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = pytest.mark.parity
LAYOUTS = ("peft", "diffusion_model", "diffusion_model_alpha", "kohya")  # conftest `make_random_lora`


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    from diffsynth.qwen_image import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(str(tiny_repo), torch_dtype="float32", device="cpu")


@pytest.fixture
def fresh(pipe):
    """The module's pipeline, its DiT weights and unfused LoRAs restored after the test."""
    saved = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    yield pipe
    pipe.clear_loras()
    pipe.dit.load_state_dict(saved)


def _reference(tiny_repo):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_repo / "transformer").eval()


def _outputs(ours, reference):
    x, t, text, mask, shapes = T.inputs(text_lengths=(5, 9), shapes=((1, 4, 6),), seed=4, channels=64)
    with torch.no_grad():
        got = ours(x, t, text, mask, shapes)
        want = reference(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=t,
            img_shapes=shapes,
            return_dict=False,
        )[0]
    return got, want


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fuse", [True, False])
def test_lora_matches_diffusers(fresh, tiny_repo, tmp_path, random_lora, diffusers_with_lora, layout, fuse):
    reference = _reference(tiny_repo)
    before, _ = _outputs(fresh.dit, reference)
    state = random_lora(reference, layout, seed=1)
    path = tmp_path / f"{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fresh.load_lora(str(path), fuse=fuse)
    got, want = _outputs(fresh.dit, diffusers_with_lora(reference, state))
    assert (want - before).abs().max() > 1e-2  # the LoRA changes the output
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"{layout}, fuse={fuse}: max abs diff {diff:.3g} vs diffusers"


def test_fused_equals_unfused(fresh, random_lora):
    state = random_lora(fresh.dit, "kohya", seed=2)
    x, t, text, mask, shapes = T.inputs(seed=5, channels=64)
    with torch.no_grad():
        fresh.load_lora(state, fuse=False, name="style")
        unfused = fresh.dit(x, t, text, mask, shapes)
        fresh.clear_loras()
        fresh.load_lora(state, fuse=True)
        fused = fresh.dit(x, t, text, mask, shapes)
    assert (fused - unfused).abs().max().item() <= 1e-5
