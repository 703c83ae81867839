"""DiffSynth-Studio's Qwen-Image Blockwise ControlNets (`DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny`,
`-Depth`, `-Inpaint`), used through `QwenImagePipeline(blockwise_controlnet_inputs=[ControlNetInput(...)])`.

The control image's VAE latent (for the inpainting net with the kept region as a 17th channel) is packed
like the latents and embedded once (`img_in`). After every DiT block `i`, `controlnet_blocks.i` maps the
generated image's tokens and the embedded condition to a residual added to those tokens:
`output_proj(gelu(input_proj(rms(x) + rms(y))))`. Module names equal the released `model.safetensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .controlnet import ControlCondition

LATENT_FEATURES = 64  # 16 latent channels x a 2 x 2 patch
EPS = 1e-6


@dataclass
class BlockwiseControlNetConfig:
    """A Blockwise ControlNet; defaults are the released Canny / Depth files (the Inpaint one has 68
    condition features: 17 channels x 2 x 2, the latent's 16 and the kept region)."""

    num_layers: int = 60
    cond_dim: int = LATENT_FEATURES
    dim: int = 3072

    def __post_init__(self):
        for name in ("num_layers", "cond_dim", "dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockwiseControlNetConfig.{name}={value!r} must be a positive integer")


class BlockwiseControlBlock(nn.Module):
    """One block's residual from the image tokens `x` and the embedded condition `y` (both RMS-normed)."""

    def __init__(self, dim: int):
        super().__init__()
        self.x_rms = nn.RMSNorm(dim, eps=EPS)
        self.y_rms = nn.RMSNorm(dim, eps=EPS)
        self.input_proj = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.output_proj(self.act(self.input_proj(self.x_rms(x) + self.y_rms(y))))


class QwenImageBlockwiseControlNet(nn.Module):
    """`embed(condition tokens [B, L, cond_dim]) -> [B, L, dim]`; `residual(i, image tokens, embedded) -> [B, L, dim]`."""

    offload_units = ("controlnet_blocks",)
    compile_units = ("controlnet_blocks",)
    lora_target_modules = ("input_proj", "output_proj")

    def __init__(self, config: BlockwiseControlNetConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else BlockwiseControlNetConfig()
        self.img_in = nn.Linear(config.cond_dim, config.dim)
        self.controlnet_blocks = nn.ModuleList(BlockwiseControlBlock(config.dim) for _ in range(config.num_layers))

    @property
    def takes_mask(self) -> bool:
        return self.config.cond_dim > LATENT_FEATURES

    def embed(self, condition: torch.Tensor) -> torch.Tensor:
        return self.img_in(condition.to(self.img_in.weight.dtype))

    def residual(self, block: int, image: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return self.controlnet_blocks[block](image, embedded.to(image.dtype))

    def forward(self, image: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Every block's residual for one image state, stacked `[layers, B, L, dim]` (for tests and tools; the
        pipeline calls `residual` after each DiT block with the tokens of that moment)."""
        embedded = self.embed(condition)
        return torch.stack([self.residual(i, image, embedded) for i in range(len(self.controlnet_blocks))])


def blockwise_residual(conditions: Sequence[ControlCondition]) -> Callable | None:
    """The DiT's per-block residual (`controlnet_block_samples` as a callable) of the active conditions (their
    `tokens` are the embedded conditions): block `i`'s residual of the generated image's tokens (the first `L`),
    summed over the nets times their scales."""
    if not conditions:
        return None

    def residual(block: int, image: torch.Tensor) -> torch.Tensor:
        tokens = image[:, : conditions[0].tokens.shape[1]]
        total = 0
        for c in conditions:
            total = total + c.model.residual(block, tokens, c.tokens.expand(tokens.shape[0], -1, -1)) * c.scale
        return total

    return residual


# ----------------------------------------------------------------------------------------- the file
SIGNATURE = ("img_in.weight", "controlnet_blocks.0.x_rms.weight", "controlnet_blocks.0.input_proj.weight")
LAYOUTS = (KeyLayout("diffsynth", SIGNATURE, owns_prefixes=("img_in.", "controlnet_blocks.")),)


def config_from_state(state: StateDict, config_json: dict | None = None) -> BlockwiseControlNetConfig:
    """Everything from the shapes: widths and the block count (a `config.json`, if any, must agree)."""
    derived = {}
    if state:
        dim, cond = state["img_in.weight"].shape
        n = 0
        while f"controlnet_blocks.{n}.input_proj.weight" in state:
            n += 1
        derived = dict(num_layers=n, cond_dim=int(cond), dim=int(dim))
    given = {k: v for k, v in (config_json or {}).items() if k in ("num_layers", "cond_dim", "dim")}
    if not derived and not given:
        raise ConfigError("a Qwen-Image Blockwise ControlNet needs its weights (or a config.json) to be built")
    return build_config(
        BlockwiseControlNetConfig,
        "Qwen-Image Blockwise ControlNet",
        merge_fields("Qwen-Image Blockwise ControlNet", given, derived),
    )


BLOCKWISE_CONTROLNET_SPEC = ModelSpec(
    name="qwen_image_blockwise_controlnet",
    role="blockwise_controlnet",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=QwenImageBlockwiseControlNet,
    description="Qwen-Image Blockwise ControlNet (DiffSynth-Studio: Canny, Depth, Inpaint)",
)

__all__ = [
    "BLOCKWISE_CONTROLNET_SPEC",
    "BlockwiseControlBlock",
    "BlockwiseControlNetConfig",
    "QwenImageBlockwiseControlNet",
    "blockwise_residual",
]
