"""How FLUX.2 VAE files are recognised, converted and configured.

Two layouts are published:

- diffusers `vae/diffusion_pytorch_model.safetensors` (FLUX.2-dev and the klein repos): our names as is;
- BFL's `ae.safetensors` (FLUX.2-dev): the LDM layout the runtime converts with `ldm_to_ours`, except that
  the quant convs live inside the encoder/decoder (`encoder.quant_conv.*`, `decoder.post_quant_conv.*`)
  and the BatchNorm statistics (`bn.*`) are already our names. The same, under the `first_stage_model.` or
  `vae.` prefix of ComfyUI-style full checkpoints, is accepted too.

Recognition: every signature holds `bn.running_mean`, which FLUX.1 / Z-Image VAE files lack, so those stay
with the runtime's `AutoencoderKL` spec; on a FLUX.2 file that spec also matches but owns every key but
`bn.*`, and the loader gives the file to the spec owning the larger share: this one.
"""

from __future__ import annotations

import math

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.models.autoencoder_kl_formats import (
    DIFFUSERS_SIGNATURE,
    LDM_SIGNATURE,
    config_fields,
    ldm_to_ours,
)
from diffsynth.runtime.registry import KeyLayout, ModelSpec, StateDict, build_config, merge_fields

from .vae import Flux2VAE, Flux2VAEConfig

BN_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
_BFL_QUANT = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def bfl_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL `ae.safetensors` names (prefix stripped) -> ours. Raises `KeyError` naming an unmapped key."""
    bn, ldm = {}, {}
    for key, value in state.items():
        if key.startswith("bn."):
            if key not in BN_KEYS:
                raise KeyError(key)
            bn[key] = value
            continue
        for src, dst in _BFL_QUANT.items():
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        ldm[key] = value
    return {**ldm_to_ours(ldm), **bn}


_OWNS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")
_BN_SIGNATURE = ("bn.running_mean", "bn.running_var")
DIFFUSERS_SIGNATURE_FLUX2 = (*DIFFUSERS_SIGNATURE, "quant_conv.weight", "post_quant_conv.weight", *_BN_SIGNATURE)
BFL_SIGNATURE = (*LDM_SIGNATURE, "encoder.quant_conv.weight", "decoder.post_quant_conv.weight", *_BN_SIGNATURE)

LAYOUTS = (
    KeyLayout("diffusers", DIFFUSERS_SIGNATURE_FLUX2, owns_prefixes=_OWNS),
    KeyLayout("bfl", BFL_SIGNATURE, convert=bfl_to_ours, owns_prefixes=_OWNS),
    KeyLayout("bfl_comfyui", BFL_SIGNATURE, prefix="first_stage_model.", convert=bfl_to_ours, owns_prefixes=_OWNS),
    KeyLayout("bfl_vae_prefix", BFL_SIGNATURE, prefix="vae.", convert=bfl_to_ours, owns_prefixes=_OWNS),
)


# ----------------------------------------------------------------------------------- config
def _patch_from_json(config_json: dict) -> int | None:
    """diffusers writes `patch_size` as `[2, 2]`; only square patches exist in FLUX.2."""
    value = config_json.get("patch_size")
    if value is None:
        return None
    sides = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * 2
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ConfigError(f"FLUX.2 VAE config.json patch_size={value!r}: only square patches are supported")
    return sides[0]


def config_from_state(state: StateDict, config_json: dict | None = None) -> Flux2VAEConfig:
    """Config from our-named shapes and the diffusers `config.json` (`AutoencoderKLFlux2`) beside the file.

    The convolutional part is derived as the runtime's `AutoencoderKL` does; the BatchNorm width gives the
    patch size (`bn` channels = latent channels x patch**2); `batch_norm_eps` comes from the json or the
    released 1e-4. A json value contradicting the shapes is an error naming the field.
    """
    json_ = dict(config_json or {})
    decoder_channels = json_.get("decoder_block_out_channels")
    if decoder_channels is not None and tuple(decoder_channels) != tuple(json_.get("block_out_channels", ())):
        raise ConfigError(
            f"FLUX.2 VAE config.json decoder_block_out_channels={decoder_channels!r} differs from "
            f"block_out_channels={json_.get('block_out_channels')!r}: a decoder of other widths is not supported"
        )
    conv_state = {k: v for k, v in state.items() if not k.startswith("bn.")}
    # FLUX.2 has no scaling/shift factors (the BatchNorm normalises): pin them, whatever a json says
    fields = config_fields(conv_state, {**json_, "scaling_factor": 1.0, "shift_factor": 0.0})
    given = {}
    if (patch := _patch_from_json(json_)) is not None:
        given["patch_size"] = patch
    if json_.get("batch_norm_eps") is not None:
        given["batch_norm_eps"] = float(json_["batch_norm_eps"])
    derived = {}
    if "bn.running_mean" in state:
        packed, latent = state["bn.running_mean"].shape[0], fields["latent_channels"]
        patch = math.isqrt(packed // latent) if packed % latent == 0 else 0
        if patch < 1 or latent * patch * patch != packed:
            raise ConfigError(
                f"FLUX.2 VAE bn.running_mean has {packed} channels, which is not latent_channels={latent} "
                "times a square patch"
            )
        derived["patch_size"] = patch
    fields.update(merge_fields("FLUX.2 VAE", given, derived))
    return build_config(Flux2VAEConfig, "FLUX.2 VAE", fields)


FLUX2_VAE_SPEC = ModelSpec(
    name="flux2_vae",
    role="vae",
    layouts=LAYOUTS,
    config_from_state=config_from_state,
    build=Flux2VAE,
    description="FLUX.2 VAE (32-ch AutoencoderKL + BatchNorm over 2x2-packed latents): diffusers `vae/`, BFL "
    "`ae.safetensors`",
)

__all__ = ["BFL_SIGNATURE", "FLUX2_VAE_SPEC", "LAYOUTS", "bfl_to_ours", "config_from_state"]
