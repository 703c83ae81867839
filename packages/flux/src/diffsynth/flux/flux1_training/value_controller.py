"""AttriCtrl's value controller in FLUX.1's training task: attribute values as prompt tokens.

AttriCtrl (DiffSynth-Studio/AttriCtrl-FLUX.1-Dev; its `--extra_inputs value_controller_inputs`): with the attribute
encoder file(s) among the model files (the pipeline's `value_controller` slot), a row's `value_controller_inputs` (a
number in [0, 1], a CSV cell's text too, or a list: one value per encoder, in load order) is cached as the values
alone (`"value_controller_inputs"` [n]); `velocity` runs the encoders on them and appends their tokens to the
prompt's T5 states as the pipeline's `prepare_value_control` does, so a trained encoder gets gradients. Training the
DiT (LoRA) keeps the encoders frozen. `trained_model="value_controller"` (`--trainable_models value_controller`, one
encoder loaded) trains that encoder in full under the frozen DiT, saved as
`<step>/value_controller/diffusion_pytorch_model.safetensors` in the released keys, which `load_value_controller`
reads; its validation samples take `--task_options validation_value_controller_inputs=0.7`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffsynth.runtime.errors import ConfigError

from ..flux1.text_encoder import FluxPromptEmbeds

if TYPE_CHECKING:
    from ..training import FluxTrainingTask


VALUE_COLUMN = "value_controller_inputs"  # AttriCtrl's values (DiffSynth-Studio's --extra_inputs)
VALUE_ENCODER_HINT = (
    "add the attribute encoder to the models (e.g. --model_id_with_origin_paths "
    "DiffSynth-Studio/AttriCtrl-FLUX.1-Dev:models/brightness.safetensors, or --model_paths FILE)"
)


def with_value_tokens(
    task: FluxTrainingTask, prompt: FluxPromptEmbeds, batch: Mapping[str, Any], encoder: nn.Module | None
) -> FluxPromptEmbeds:
    """The prompt with each row's AttriCtrl tokens appended, as `prepare_value_control` appends them: from the
    trained `encoder` (with gradients) or the pipeline's frozen encoders; unchanged for a batch without values."""
    values = batch.get(VALUE_COLUMN)
    if values is None:
        if encoder is not None:
            raise ConfigError(
                f"training the AttriCtrl encoder needs batches with {VALUE_COLUMN} (a column of the metadata); "
                "a cache encoded without them has none: encode it again"
            )
        return prompt
    controllers = task.pipe.value_controller
    count = 1 if encoder is not None else len(controllers.encoders) if controllers is not None else 0
    if values.shape[-1] != count:
        raise ConfigError(
            f"this batch has {values.shape[-1]} {VALUE_COLUMN} per row, for {count} loaded AttriCtrl encoders: "
            + (VALUE_ENCODER_HINT if not count else "encode the cache again for these encoders")
        )
    if encoder is not None:
        tokens = torch.stack([encoder(value) for value in values[:, 0]])
    else:
        tokens = torch.cat([controllers(row.tolist()) for row in values])
    tokens = tokens.float().to(prompt.t5.device, prompt.t5.dtype)
    return FluxPromptEmbeds(torch.cat([prompt.t5, tokens], dim=1), prompt.pooled)


def parse_values(value: Any, count: int, where: str) -> list[float]:
    """AttriCtrl values as the pipeline takes them (`check_values`): a number, a CSV cell's text ("0.3", or
    "0.3,0.8" / "[0.3, 0.8]" for several encoders) or a list, one per encoder in load order, each in [0, 1]."""
    from ..flux1.value_control import check_values

    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, str):
        items = value.strip().strip("[]").replace(",", " ").split()
    try:
        items = [float(item) if isinstance(item, str) else item for item in items]
    except ValueError:
        raise ConfigError(
            f"{where} {value!r} is not a number in [0, 1] (or a list of them, one per AttriCtrl encoder)"
        ) from None
    if count == 0:
        raise ConfigError(f"{where} needs an AttriCtrl encoder among the models: {VALUE_ENCODER_HINT}")
    try:
        return check_values(items, count)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
