"""DiffSynth-Studio's Qwen-Image-Layered-Control through `QwenImagePipeline(layer_input_image=..., layer_num=0)`:
one generated frame, which is the layer the prompt names (kept, not dropped as Layered's whole-image frame is), the
V2 `context_image` mask between that frame and the input image, and the preset.

The reference is DiffSynth-Studio's recipe written out step by step around diffusers' transformer (its
`model_fn_qwen_image` order: the generated frames' tokens, then the context's, then the input image's; plain CFG;
Euler on the "qwen_image" schedule), on the tiny random Layered repo of `test_layered_pipeline.py`.
"""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.modules import load_beside

L = load_beside(__file__, "test_layered_pipeline.py", "qwen_image_tests_layered_pipeline")
layered_repo, pipe = L.layered_repo, L.pipe  # the module's fixtures
PROMPT = "the red hat"


def control_run(pipe, **kwargs):
    options = dict(layer_num=0, height=16, width=32, num_inference_steps=2, progress_bar=False, seed=0)
    return pipe(PROMPT, layer_input_image=L.rgba_image(32, 16), **{**options, **kwargs})


def test_layer_num_zero_returns_the_one_generated_frame(pipe, one_thread):
    layers = control_run(pipe)
    assert len(layers) == 1 and layers[0].mode == "RGBA" and layers[0].size == (32, 16)
    noise = torch.randn((1, 1, 16, 2, 4), generator=torch.Generator().manual_seed(0))
    first = control_run(pipe, output_type="pt")
    torch.testing.assert_close(first, control_run(pipe, output_type="pt", latents=noise))  # seed 0 draws it
    assert first.shape == (1, 1, 4, 16, 32)


def denoised(pipe, **kwargs) -> torch.Tensor:
    """The latents `control_run` hands to the VAE (the tiny VAE squeezes differences between pictures)."""
    seen, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda latents, **options: seen.append(latents.float()) or decode(latents, **options)
    try:
        control_run(pipe, **kwargs)
    finally:
        pipe.vae.decode = decode
    return seen[0]


def test_the_context_mask_steers_the_layer(pipe, one_thread):
    plain = denoised(pipe)
    masked = denoised(pipe, context_image=L.rgba_image(32, 16, seed=5))
    assert (plain - masked).abs().max() > 1e-3  # far above float32 noise (the parity test is at 1e-5)


def test_preset_follows_diffsynth_studios_example():
    from diffsynth.qwen_image.presets import PRESETS

    preset = PRESETS["DiffSynth-Studio/Qwen-Image-Layered-Control"]
    assert preset.defaults["layer_num"] == 0 and preset.defaults["sigma_template"] == "qwen_image"
    assert (preset.defaults["num_inference_steps"], preset.defaults["cfg_scale"]) == (30, 4.0)
    assert preset.defaults["cfg_normalize"] is False  # DiffSynth-Studio's CFG is the plain one
    sources = {(f.model_id, f.origin_file_pattern) for f in preset.files}
    assert ("Qwen/Qwen-Image-Layered", "vae/diffusion_pytorch_model.safetensors") in sources  # the RGBA VAE
    assert ("DiffSynth-Studio/Qwen-Image-Layered-Control", "transformer/*.safetensors*") in sources


def test_a_negative_layer_count_is_refused(pipe):
    with pytest.raises(ConfigError, match="layer_num=-1.*Layered-Control"):
        control_run(pipe, layer_num=-1)


@pytest.mark.parity
@pytest.mark.parametrize(("cfg_scale", "with_context"), [(4.0, False), (1.0, True), (3.0, True)])
def test_denoised_layer_matches_diffsynth_studios_recipe(pipe, layered_repo, one_thread, cfg_scale, with_context):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    from diffsynth.runtime.media import pil_to_tensor
    from diffsynth.runtime.schedulers import FlowMatchScheduler

    reference = diffusers.QwenImageTransformer2DModel.from_pretrained(layered_repo / "transformer").eval()
    image, mask = L.rgba_image(40, 24, seed=2), L.rgba_image(48, 20, seed=6)
    height, width, steps = 16, 32, 3
    noise = torch.randn((1, 1, 16, 2, 4), generator=torch.Generator().manual_seed(9))
    seen = {}
    decode = pipe.vae.decode

    def keep_and_decode(latents, **kwargs):
        seen["ours"] = latents[:, :, 0].float()
        return decode(latents, **kwargs)

    pipe.vae.decode = keep_and_decode
    try:
        pipe(PROMPT, layer_input_image=image, layer_num=0, height=height, width=width, cfg_scale=cfg_scale,
             negative_prompt="", cfg_normalize=False, sigma_template="qwen_image", latents=noise.clone(),
             num_inference_steps=steps, context_image=mask if with_context else None, progress_bar=False)  # fmt: skip
    finally:
        pipe.vae.decode = decode

    def latent(picture: Image.Image) -> torch.Tensor:  # DiffSynth-Studio: RGBA, resized to the output size
        pixels = pil_to_tensor(picture.resize((width, height), Image.LANCZOS), mode="RGBA")
        return pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0].float()

    def pack(z: torch.Tensor) -> torch.Tensor:  # [1, 16, h, w] -> [1, h/2 * w/2, 64]
        b, c, h, w = z.shape
        return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

    with torch.no_grad():
        condition = latent(image)
        context_image = mask.convert("RGBA").resize((width, height))
        pixels = pil_to_tensor(context_image, mode="RGBA")
        context = pipe.vae.encode(pixels.unsqueeze(2))[:, :, 0].float() if with_context else None
        texts = [pipe.encode_prompt([p]) for p in (PROMPT, "")]
        scheduler = FlowMatchScheduler("qwen_image")
        scheduler.set_timesteps(steps, image_seq_len=(height // 16) * (width // 16))
        x = noise[:, 0]
        clean = [c for c in (context, condition) if c is not None]
        shapes = [(1, 1, 2)] + [(1, c.shape[-2] // 2, c.shape[-1] // 2) for c in clean]
        for i in range(steps):
            sigma = scheduler.sigmas[i]
            tokens = torch.cat([pack(x), *(pack(c) for c in clean)], dim=1)
            velocities = []
            for text, text_mask in texts[: 1 if cfg_scale == 1.0 else 2]:
                out = reference(hidden_states=tokens, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                                timestep=sigma.reshape(1), img_shapes=[shapes], additional_t_cond=torch.tensor([0]),
                                return_dict=False)[0]  # fmt: skip
                velocities.append(out[:, :2])
            v = velocities[0] if cfg_scale == 1.0 else velocities[1] + cfg_scale * (velocities[0] - velocities[1])
            v = v.reshape(1, 1, 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 2, 4)
            x = x + (scheduler.sigmas[i + 1] - sigma) * v
    assert (seen["ours"] - x).abs().max() <= 1e-5
