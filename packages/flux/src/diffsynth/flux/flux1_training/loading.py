"""What `FluxTrainingTask.from_pretrained` reads of the model files without loading their weights: the configs in
their headers and the tokenizer folders beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.pipeline import weight_paths
from diffsynth.runtime.training_support import model_roles

from ..pipeline import FluxImagePipeline


def header_dit_config(model_configs: Sequence[ModelConfig]):
    """The FLUX.1 DiT's config from its files' header (and the `config.json` beside them), without reading weights;
    None when no given file holds the DiT."""
    configs = header_configs(model_configs, "dit")
    return configs[0] if configs else None


def header_configs(model_configs: Sequence[ModelConfig], slot: str) -> list:
    """The configs of the models for the pipeline's `slot` among the files, from their headers (and the
    `config.json` beside them), without reading weights: one per file set holding such a model."""
    from diffsynth.runtime.checkpoint import checkpoint_label, open_checkpoint
    from diffsynth.runtime.loading import config_json_beside, derive_config, recognise

    role = FluxImagePipeline.model_slots[slot]
    found = []
    for config in model_configs:
        if role not in model_roles(config):
            continue
        paths = weight_paths(config)
        state = open_checkpoint(paths)
        label = checkpoint_label(state.files)
        meta = state.meta_state_dict()
        for rec in recognise(meta, label=label):
            if rec.spec.role == role:
                found.append(derive_config(rec, meta, config_json_beside(state.files), label))
                break
    return found


def tokenizer_pair(
    tokenizer_config: ModelConfig | None, model_configs: Sequence[ModelConfig]
) -> tuple[ModelConfig | None, ModelConfig | None]:
    """The CLIP (`tokenizer/`) and T5 (`tokenizer_2/`) tokenizer configs of a FLUX.1 repo.

    From a hub repo's `tokenizer/` pattern, the same repo's `tokenizer_2/`; from a local folder named either,
    its sibling; without one, the two folders beside the model files (a hub-style folder or the BFL layout)."""
    names = ("tokenizer", "tokenizer_2")
    if tokenizer_config is not None and tokenizer_config.model_id is not None:
        pattern = (tokenizer_config.origin_file_pattern or "tokenizer/").rstrip("/")
        root = pattern.rsplit("/", 1)[0] + "/" if "/" in pattern else ""
        return tuple(
            ModelConfig(
                model_id=tokenizer_config.model_id,
                origin_file_pattern=f"{root}{name}/",
                download_source=tokenizer_config.download_source,
                local_model_path=tokenizer_config.local_model_path,
                skip_download=tokenizer_config.skip_download,
            )
            for name in names
        )
    candidates: list[Path] = []
    if tokenizer_config is not None and tokenizer_config.path is not None:
        path = Path(tokenizer_config.path if isinstance(tokenizer_config.path, str) else tokenizer_config.path[0])
        folder = path if path.is_dir() else path.parent
        if folder.name not in names:
            raise ConfigError(
                f"FLUX.1 needs two tokenizers (CLIP in tokenizer/, T5 in tokenizer_2/); --tokenizer_path {folder} "
                "is neither: pass the repo's tokenizer/ folder, with tokenizer_2/ beside it"
            )
        candidates.append(folder.parent)
    for config in model_configs:
        for path in [config.path] if isinstance(config.path, str) else list(config.path or ()):
            candidates += [Path(path).parent, Path(path).parent.parent]
    for root in candidates:
        if all((root / name / "tokenizer_config.json").is_file() for name in names):
            return tuple(ModelConfig(path=str(root / name)) for name in names)
    return None, None
