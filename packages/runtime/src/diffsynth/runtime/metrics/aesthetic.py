"""LAION aesthetic predictor v2: a small MLP on the L2-normalised CLIP ViT-L/14 image embedding, scores ~1..10.

The MLP is the improved-aesthetic-predictor's (`layers.0/2/4/6/7`: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts
between, no activations). The file (DiffSynth-Studio's `Aesthetic/model.safetensors`) carries the CLIP vision tower
too, as `vision_model.vision_model.*` + `visual_projection.weight` (DiffSynth-Studio's module names) or as a
`CLIPVisionModelWithProjection` (`vision_model.*`); a wrapper prefix (`model.`, `module.`, ...) is stripped. The
vision config comes from a `config.json` when there is one, else from the shapes (OpenAI's quick_gelu).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..hub import ModelConfig
from .base import (
    Metric,
    as_images,
    build_on_meta,
    check_batch_size,
    convert_keys,
    default_config,
    load_strict,
    pick_device,
    pick_dtype,
    read_json_beside,
    read_state_dict,
    resolve_files,
    resolve_folder,
)
from .clip import vision_config_from_shapes

WRAPPERS = ("model.", "module.", "aesthetic_model.", "aesthetics_predictor.", "predictor.")
AESTHETIC_RULES = (
    ("vision_model.vision_model.embeddings.position_ids", None),
    ("vision_model.embeddings.position_ids", None),
    ("vision_model.vision_model.", "clip.vision_model."),
    ("vision_model.", "clip.vision_model."),
    ("visual_projection.", "clip.visual_projection."),
    ("layers.", "layers."),
)


class AestheticMLP(torch.nn.Sequential):
    """The predictor head; Linear indices 0, 2, 4, 6, 7 are the released key names."""

    def __init__(self, input_size: int = 768):
        super().__init__(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )


class AestheticMetric(Metric):
    """Aesthetic score of each image (no prompt): MLP(normalize(CLIP-L/14 image embedding))."""

    def __init__(self, clip, layers: AestheticMLP, processor, batch_size: int = 16):
        super().__init__()
        self.clip = clip
        self.layers = layers
        self.processor = processor
        self.batch_size = check_batch_size(batch_size)

    @classmethod
    def from_pretrained(
        cls,
        model_config: ModelConfig | None = None,
        processor_config: ModelConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        processor_kwargs: dict | None = None,
        hidden_act: str = "quick_gelu",
        batch_size: int = 16,
    ):
        """Load the CLIP tower + MLP file and the image processor folder (DiffSynth-Studio's `Aesthetic/`)."""
        check_batch_size(batch_size)
        from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        model_config = model_config or default_config("Aesthetic/model.safetensors")
        processor_config = processor_config or default_config("Aesthetic/")
        files = resolve_files(model_config, "model_config")
        folder = resolve_folder(processor_config, "processor_config")
        # PIL preprocessing whether torchvision is installed or not (as the CLIP scores: `clip.py`)
        processor = AutoImageProcessor.from_pretrained(folder, **{"backend": "pil", **(processor_kwargs or {})})
        label = ", ".join(files)
        state = {}
        for key, value in read_state_dict(files).items():
            for wrapper in WRAPPERS:
                key = key[len(wrapper) :] if key.startswith(wrapper) else key
            state[key] = value
        state = convert_keys(state, AESTHETIC_RULES, label)
        if "clip.visual_projection.weight" not in state or "layers.0.weight" not in state:
            raise CheckpointError(f"{label}: an aesthetic file needs visual_projection.weight and layers.0.weight")
        projection = state["clip.visual_projection.weight"].shape[0]
        config_json = read_json_beside(files, folder) or {}
        config_json = config_json.get("vision_config", config_json)
        if "hidden_size" in config_json:
            vision = dict(config_json)
        else:
            shapes = {k[len("clip.") :]: tuple(v.shape) for k, v in state.items() if k.startswith("clip.")}
            vision = vision_config_from_shapes(shapes, "vision_model.", hidden_act)
        vision["projection_dim"] = projection
        config = CLIPVisionConfig(**vision)
        metric = build_on_meta(
            lambda: cls(CLIPVisionModelWithProjection(config), AestheticMLP(projection), processor, batch_size)
        )
        load_strict(metric, state, label)
        return metric._ready(pick_device(device), pick_dtype(torch_dtype), keep_float32=lambda m: m.layers.float())

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual_projection.weight.dtype

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, float32."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = self.clip(pixel_values=pixels.to(self.device, self.dtype)).image_embeds
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    @torch.no_grad()
    def score(self, images) -> list[float]:
        """One aesthetic score per image."""
        images = as_images(images)
        scores = [
            self.layers(self.image_features(images[i : i + self.batch_size])).squeeze(-1)
            for i in range(0, len(images), self.batch_size)
        ]
        return self.tensor_to_list(torch.cat(scores))

    def compute(self, images) -> list[float]:
        return self.score(images)

    def forward(self, images) -> list[float]:
        return self.score(images)
