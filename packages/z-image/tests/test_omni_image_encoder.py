"""Z-Image Omni's image encoder spec: the SigLIP2 tower's key layouts, its config, and the files it must not claim."""

from __future__ import annotations

import pytest
import torch

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_models
from diffsynth.runtime.testing.weights import random_weights
from diffsynth.z_image.formats import DIT_SPEC
from diffsynth.z_image.image_encoder import IMAGE_ENCODER_SPEC, RELEASED_CONFIG, config_from_state, encoder_class

TINY = dict(
    hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_patches=16, patch_size=4
)


def tiny_encoder(seed: int = 0):
    from transformers import Siglip2VisionConfig

    return random_weights(encoder_class()(Siglip2VisionConfig(**TINY)), seed).eval()


def released_meta_state() -> dict[str, torch.Tensor]:
    """The released `siglip/model.safetensors` keys and shapes (a transformers 4 save: `vision_model.` prefix)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    with torch.device("meta"):
        model = Siglip2VisionModel(Siglip2VisionConfig(**RELEASED_CONFIG))
    return {"vision_model." + k: v for k, v in model.state_dict().items()}


def test_released_layout_and_config_from_shapes():
    state = released_meta_state()
    assert IMAGE_ENCODER_SPEC.match(state).name == "transformers4"
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (1152, 768)
    cfg = config_from_state(IMAGE_ENCODER_SPEC.match(state).to_ours(state))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (1152, 27, 4304)
    assert (cfg.patch_size, cfg.num_patches, cfg.num_attention_heads) == (16, 256, 16)
    (loaded,) = load_models(state, specs=[IMAGE_ENCODER_SPEC])  # meta build + strict key/shape check
    assert loaded.role == "image_encoder" and type(loaded.module).__name__ == "ZImageImageEncoder"
    assert loaded.module.offload_units == ("encoder.layers",)


def test_both_layouts_load_and_encode_the_same():
    model = tiny_encoder(seed=2)
    state = model.state_dict()
    config_json = {"model_type": "siglip2_vision_model", **TINY}
    prefixed = {"vision_model." + k: v for k, v in state.items()}
    encoders = []
    for source, layout in ((prefixed, "transformers4"), (state, "transformers5")):
        (loaded,) = load_models(source, "float32", specs=[IMAGE_ENCODER_SPEC], config=config_json)
        assert loaded.layout == layout
        encoders.append(loaded.module)
    from PIL import Image

    image = Image.new("RGB", (40, 24), (200, 30, 60))
    grids = [e.encode(image) for e in encoders]
    rows, cols = grids[0].shape[:2]
    assert grids[0].shape[2] == 24 and rows * cols <= 16 and cols > rows  # aspect kept within the patch budget
    assert torch.equal(grids[0], grids[1])
    assert torch.equal(grids[0], model.encode(image))


def test_config_json_contradicting_shapes_is_an_error():
    state = tiny_encoder().state_dict()
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_state(state, {"model_type": "siglip2_vision_model", **TINY, "hidden_size": 32})
    with pytest.raises(ConfigError, match="model_type='siglip_vision_model'"):
        config_from_state(state, {"model_type": "siglip_vision_model"})


def test_siglip_v1_and_clip_towers_are_refused():
    """Same key names, but a convolutional patch embedding: refused with the reason, not loaded as ours."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    with torch.device("meta"):
        v1 = {"vision_model." + k: v for k, v in SiglipVisionModel(config).state_dict().items()}
    v1 = {k: v for k, v in v1.items() if not k.endswith("position_ids")}
    with pytest.raises(CheckpointError, match="convolution: a SigLIP \\(v1\\) or CLIP vision tower"):
        load_models(v1, specs=[IMAGE_ENCODER_SPEC])


def test_does_not_claim_the_dit_and_the_dit_does_not_claim_it():
    state = released_meta_state()
    assert DIT_SPEC.match(state) is None
    with torch.device("meta"):
        from diffsynth.z_image.dit import ZImageDiT, ZImageDiTConfig

        dit = ZImageDiT(ZImageDiTConfig(siglip_feat_dim=1152, n_layers=1)).state_dict()
    assert IMAGE_ENCODER_SPEC.match(dit) is None
