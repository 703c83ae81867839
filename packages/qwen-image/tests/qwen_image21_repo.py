"""A tiny random Qwen-Image 2.1 repo in the hub's diffusers layout, shared by the pipeline and training tests.

`transformer/` and `vae/` are our modules' state dicts (their names are diffusers' keys) with diffusers-style
`config.json`s, so diffusers' `from_pretrained` reads the same folders in the parity tests while the per-package
sessions (no diffusers installed) build the repo too; `text_encoder/` and `processor/` come from the encoder
fixtures; `scheduler/scheduler_config.json` has the released shape (exponential resolution shift, terminal
stretch); `diffsynth.json` sets `output_resolution` 64 (the tiny processor sees at most 128x128 pixels).
Load it with `load_beside(__file__, "qwen_image21_repo.py", ...)`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from diffsynth.qwen_image.qwen_image21.dit import QwenImage21DiT, QwenImage21DiTConfig
from diffsynth.qwen_image.qwen_image21.vae import QwenImage21VAE, QwenImage21VAEConfig
from diffsynth.runtime.testing.modules import load_beside
from diffsynth.runtime.testing.weights import random_weights

fx = load_beside(__file__, "qwen_image21_encoder_fixtures.py", "qwen_image21_encoder_fixtures")

LATENT = 4  # VAE latent channels = DiT in/out channels
VAE = QwenImage21VAEConfig(
    base_dim=8, decoder_base_dim=12, z_dim=LATENT, latents_mean=(0.4, -1.3, 0.2, 2.1), latents_std=(1.7, 0.6, 2.4, 1.1)
)
DIT = QwenImage21DiTConfig(
    in_channels=LATENT,
    out_channels=LATENT,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    context_in_dim=fx.TINY_TEXT["hidden_size"],
    axes_dims_rope=(4, 6, 6),
)
SCHEDULER = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
}


def build_repo(root: Path, output_resolution: int = 64) -> Path:
    """Write the repo under `root` (seeded random weights) and return it."""
    root = Path(root)
    fx.build_tiny_encoder_and_processor(root)
    parts = [
        ("transformer", QwenImage21DiT(DIT), DIT, "QwenImage21Transformer2DModel", 1, 0.1),
        ("vae", QwenImage21VAE(VAE), VAE, "AutoencoderKLQwenImage21", 3, 0.2),
    ]
    for folder, model, config, class_name, seed, scale in parts:
        (root / folder).mkdir()
        state = random_weights(model, seed, scale=scale).state_dict()
        weights = {k: v.contiguous() for k, v in state.items()}
        save_file(weights, str(root / folder / "diffusion_pytorch_model.safetensors"))
        fields = dataclasses.asdict(config)
        if folder == "vae":
            fields["temperal_downsample"] = fields.pop("temporal_downsample")  # diffusers' spelling
        (root / folder / "config.json").write_text(json.dumps({"_class_name": class_name, **fields}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline", "sample_sigmas": None}))
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"output_resolution": output_resolution}}))
    return root
