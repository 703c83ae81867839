"""`--quantize [SLOT=]METHOD` and DiffSynth-Studio's `--quant_options MODEL:METHOD[/EXCLUDED]`: which of the
run's model files load with 4-bit Linears (the runtime's `quant.QuantizeConfig`, set on their `ModelConfig`s).
A frozen base stored so (QLoRA when it carries the LoRA) takes about a quarter of its bf16 memory; the LoRA's own
weights stay in `--trainable_dtype` and the gradient flows through the rounded base."""

from __future__ import annotations

from collections.abc import Sequence

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.quant import QuantizeConfig

from .config import TrainConfig


def quantized_sources(cfg: TrainConfig, configs: Sequence[ModelConfig], denoiser_slot: str) -> list[ModelConfig]:
    """`configs` with `quantize` set where `--quantize` / `--quant_options` ask (the same objects, changed)."""
    if not cfg.quantize and not cfg.quant_options:
        return list(configs)
    from diffsynth.runtime.errors import UnknownModelError
    from diffsynth.runtime.training_support import model_roles as read_roles

    def model_roles(config: ModelConfig) -> set[str]:  # files the registry does not know (add-ons) hold none
        try:
            return read_roles(config)
        except UnknownModelError:
            return set()

    requests: list[tuple[str, ModelConfig | None, str, QuantizeConfig]] = []  # (flag text, config, slot, quant)
    for item in cfg.quantize:
        slot, _, method = item.rpartition("=")
        slot = slot.strip() or denoiser_slot
        role = "dit" if slot == "dit2" else slot
        matching = [c for c in configs if role in model_roles(c)]
        if not matching:
            raise ConfigError(f"--quantize {item}: none of the model files holds a {slot!r} model")
        for config in matching:
            requests.append((f"--quantize {item}", config, slot, _parse(f"--quantize {item}", method, None)))
    for entry in filter(None, (part.strip() for part in (cfg.quant_options or "").split(";"))):
        model, sep, rest = entry.rpartition(":")
        method, _, excluded = rest.partition("/")
        if not sep or not model:
            raise ConfigError(
                f"--quant_options {entry!r}: write MODEL:METHOD[/EXCLUDED,LAYERS], MODEL as given in --model_paths "
                "or --model_id_with_origin_paths (e.g. Qwen/Qwen-Image:transformer/*.safetensors:bitsandbytes_nf4)"
            )
        matching = [c for c in configs if _names(c) == model.strip()]
        if not matching:
            given = [_names(c) for c in configs]
            raise ConfigError(f"--quant_options {entry!r}: {model!r} is none of the run's model files {given}")
        excluded = [name.strip() for name in excluded.split(",") if name.strip()] or None
        for config in matching:
            requests.append(
                (f"--quant_options {entry}", config, "", _parse(f"--quant_options {entry}", method, excluded))
            )
    trained = set(cfg.trainable_models) | {*cfg.fp8_models}
    for flag, config, slot, quant in requests:
        roles = model_roles(config)
        clash = sorted(roles & trained) or ([slot] if slot in trained else [])
        if cfg.trainable_models and not clash and (denoiser_slot in roles or slot == denoiser_slot):
            clash = [f"{denoiser_slot} (a part of it)"]  # e.g. Wan's vace trained in full inside the DiT
        if clash:
            raise ConfigError(
                f"{flag}: {clash[0]} is trained in full (--trainable_models) or stored in fp8 (--fp8_models); only a "
                "frozen model is quantized (e.g. the denoiser under a LoRA)"
            )
        if cfg.task == "dmd2" and (denoiser_slot in roles or slot == denoiser_slot):
            raise ConfigError(
                f"{flag} with --task dmd2: DMD2's fake score is a trainable full copy of the denoiser "
                f"({denoiser_slot}), which quantized weights cannot give; drop {flag.split()[0]} for it"
            )
        if config.quantize is not None and config.quantize != quant:
            raise ConfigError(f"{flag}: {_names(config)} is quantized twice (by --quantize and --quant_options)")
        config.quantize = quant
    return list(configs)


def _parse(flag: str, method: str, excluded: list[str] | None) -> QuantizeConfig:
    try:
        return QuantizeConfig(method=method.strip(), exclude_modules=excluded)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _names(config: ModelConfig) -> str:
    """How the flags name a model file: its path, or `model_id:origin_file_pattern`."""
    if config.path is not None:
        return config.path if isinstance(config.path, str) else ",".join(config.path)
    return f"{config.model_id}:{config.origin_file_pattern}"


__all__ = ["quantized_sources"]
