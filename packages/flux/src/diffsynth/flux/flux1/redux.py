"""FLUX.1 Redux: an image prompt turned into extra T5 tokens (black-forest-labs/FLUX.1-Redux-dev).

A SigLIP so400m vision tower (the IP-Adapter's `SIGLIP_VISION_SPEC`, `google/siglip-so400m-patch14-384`) reads
the image resized to 384x384 and gives one 1152-wide feature per patch (`last_hidden_state`, 27x27 = 729
tokens). The Redux embedder (`flux1-redux-dev.safetensors`: `redux_up` 1152 -> 3 * 4096, SiLU, `redux_down`
-> 4096) maps each to the T5 width, and the tokens are appended to the prompt's T5 states; their text ids are
zeros like the prompt's, and the CLIP pooled vector is the prompt's. The DiT is unchanged.

Several images and the two scales follow diffusers' `FluxPriorReduxPipeline`: for images i with scales s_i
(`prompt_embeds_scale`) and p_i (`pooled_prompt_embeds_scale`) the DiT reads
`sum_i s_i * [T5(prompt), redux(image_i)]` and `sum_i p_i * pooled(prompt)` -- the images' tokens are summed
position by position (not placed side by side) and the text is weighted by the sum of the scales. With one
image and scales 1 this is BFL's reference (`prepare_redux`): prompt tokens, then the 729 image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import ConfigError, DiffSynthError
from diffsynth.runtime.pipeline import finite_number
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict

from .text_encoder import FluxPromptEmbeds

REDUX_REPOS = {"black-forest-labs/FLUX.1-Redux-dev": "flux1-redux-dev.safetensors"}
REDUX_IMAGE_SIZE = 384  # SigLIP so400m-patch14-384: what the processor resizes to


@dataclass
class FluxReduxConfig:
    """Widths of the Redux embedder; defaults are FLUX.1-Redux-dev's."""

    image_dim: int = 1152  # SigLIP so400m hidden size
    text_dim: int = 4096  # T5-XXL width (the DiT's context_in_dim)
    expansion: int = 3  # redux_up widens to expansion * text_dim

    def __post_init__(self):
        for name in ("image_dim", "text_dim", "expansion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FluxReduxConfig.{name}={value!r} must be a positive integer")


class FluxReduxEmbedder(nn.Module):
    """SigLIP patch features `[..., image_dim]` -> T5-width tokens `[..., text_dim]` (BFL's key names)."""

    def __init__(self, config: FluxReduxConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else FluxReduxConfig()
        self.redux_up = nn.Linear(config.image_dim, config.expansion * config.text_dim)
        self.redux_down = nn.Linear(config.expansion * config.text_dim, config.text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.config.image_dim:
            raise ValueError(
                f"Redux image features have shape {tuple(features.shape)}; expected [..., {self.config.image_dim}]"
            )
        return self.redux_down(F.silu(self.redux_up(features.to(self.redux_up.weight.dtype))))


def config_from_state(state: StateDict, config_json: dict | None = None) -> FluxReduxConfig:
    """Every width from the shapes (the file has no config)."""
    wide, image_dim = state["redux_up.weight"].shape
    text_dim, wide_in = state["redux_down.weight"].shape
    if wide != wide_in or wide % text_dim:
        raise ConfigError(
            f"the Redux embedder's redux_up gives {wide} features and redux_down takes {wide_in} to {text_dim}; "
            "expected redux_down to take what redux_up gives, a multiple of its output width"
        )
    return FluxReduxConfig(image_dim=image_dim, text_dim=text_dim, expansion=wide // text_dim)


FLUX_REDUX_SPEC = ModelSpec(
    name="flux1_redux",
    role="flux_redux",
    # BFL's flux1-redux-dev.safetensors and diffusers' image_embedder/ share these names
    layouts=(KeyLayout("bfl", ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")),),
    config_from_state=config_from_state,
    build=FluxReduxEmbedder,
    description="FLUX.1 Redux image embedder (flux1-redux-dev.safetensors, diffusers image_embedder/)",
)


def is_redux_file(paths: str | Sequence[str]) -> bool:
    """Whether the file(s) or folder hold a Redux embedder (told from the key names)."""
    from diffsynth.runtime.checkpoint import open_checkpoint

    try:
        keys = set(open_checkpoint(paths))
    except DiffSynthError:
        return False  # not a state dict this reads; the pipeline's own loading names the problem
    return FLUX_REDUX_SPEC.match(keys) is not None


def load_redux_model(paths: str | Sequence[str], torch_dtype=None) -> FluxReduxEmbedder:
    """The Redux embedder from its file(s) or folder, loaded strictly."""
    from diffsynth.runtime.loading import load_models

    (loaded,) = load_models(paths, torch_dtype, "cpu", specs=[FLUX_REDUX_SPEC])
    return loaded.module


def check_scales(value, n_images: int, name: str) -> list[float]:
    """A scale given as one number or one per image, as a list of `n_images` floats."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * n_images
    if len(items) != n_images:
        raise ConfigError(f"{name} has {len(items)} values for {n_images} flux_redux_image(s); give one or one each")
    if not isinstance(value, (list, tuple)):  # one number, named as given
        return [finite_number(value, name)] * n_images
    return [finite_number(item, f"{name}[{i}]") for i, item in enumerate(items)]  # NaN / inf: a NaN image


def redux_prompt(
    text: FluxPromptEmbeds, tokens: torch.Tensor, scales: Sequence[float], pooled_scales: Sequence[float]
) -> FluxPromptEmbeds:
    """The prompt `text` (batch B) with Redux `tokens` `[N_images, T, D]` appended, weighted as diffusers'
    `FluxPriorReduxPipeline` does (see the module docstring): per image `[T5, tokens_i] * s_i`, summed over images."""
    n, b = tokens.shape[0], text.batch
    if tokens.dim() != 3 or tokens.shape[-1] != text.t5.shape[-1]:
        raise ConfigError(
            f"Redux tokens {tuple(tokens.shape)} do not fit the T5 states {tuple(text.t5.shape)}: the Redux "
            "embedder's width must be the text encoder's"
        )
    t5, tokens = text.t5.float(), tokens.float()
    s = torch.tensor(list(scales), dtype=t5.dtype, device=t5.device)
    p = torch.tensor(list(pooled_scales), dtype=t5.dtype, device=t5.device)
    per_image = torch.cat([t5[None].expand(n, -1, -1, -1), tokens[:, None].expand(-1, b, -1, -1)], dim=2)
    pooled = (text.pooled.float()[None] * p[:, None, None]).sum(0)
    return FluxPromptEmbeds((per_image * s[:, None, None, None]).sum(0), pooled)


__all__ = [
    "FLUX_REDUX_SPEC",
    "REDUX_REPOS",
    "FluxReduxConfig",
    "FluxReduxEmbedder",
    "check_scales",
    "config_from_state",
    "is_redux_file",
    "load_redux_model",
    "redux_prompt",
]
