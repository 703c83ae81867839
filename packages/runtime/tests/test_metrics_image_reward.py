"""ImageReward against the computation written out with transformers' BLIP modules called directly: CLIP-normalised
pixels -> BlipVisionModel -> BlipTextModel cross-attending to them -> first token -> the five Linears of the MLP ->
(x - mean) / std. The tiny BLIP is saved in ImageReward's own checkpoint names (timm ViT keys), as DiffSynth-Studio's
released file, whose key/shape hash the full-size layout is checked against."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.metrics import ImageRewardMetric
from diffsynth.runtime.metrics.image_reward import blip_config_from_shapes, convert_image_reward

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's reward statistics
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LINEAR_INDICES = (0, 2, 4, 6, 7)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "red", "sofa", "in", "snow"]
IMAGE_SIZE = 32
# ImageReward's checkpoint names for the timm ViT, against transformers' BlipVisionModel names (written out here)
VIT_NAMES = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
VIT_BLOCK_NAMES = {
    "layer_norm1": "norm1",
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def release_name(key: str) -> str:
    """transformers' BlipVisionModel key -> ImageReward's `blip.visual_encoder.*` key."""
    if key in VIT_NAMES:
        return "blip.visual_encoder." + VIT_NAMES[key]
    _, _, layer, *rest = key.split(".")  # encoder.layers.<i>.<module>.<param>
    module, param = ".".join(rest[:-1]), rest[-1]
    return f"blip.visual_encoder.blocks.{layer}.{VIT_BLOCK_NAMES[module]}.{param}"


def tiny_configs():
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=16, layer_norm_eps=1e-6,
    )  # fmt: skip
    text = BlipTextConfig(
        vocab_size=len(WORDS) + 2, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=40, encoder_hidden_size=32, is_decoder=True,
        bos_token_id=len(WORDS), sep_token_id=3,
    )  # fmt: skip
    return vision, text


@pytest.fixture(scope="module")
def reward_files(tmp_path_factory):
    from transformers import BlipTextModel, BlipVisionModel

    folder = tmp_path_factory.mktemp("image_reward")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    vision_config, text_config = tiny_configs()
    torch.manual_seed(0)
    vision = BlipVisionModel(vision_config).eval()
    text = BlipTextModel(text_config, add_pooling_layer=False).eval()
    with torch.no_grad():
        # BLIP's init is near zero (the ViT's 1e-10); random weights and LayerNorm gains near 1 make every path count
        for name, p in list(vision.named_parameters()) + list(text.named_parameters()):
            is_gain = "norm" in name.lower() and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_gain else 0.2 * torch.randn_like(p))
    widths = (48, 1024, 128, 64, 16, 1)
    mlp = {}
    for index, (n_in, n_out) in zip(LINEAR_INDICES, zip(widths[:-1], widths[1:], strict=True), strict=True):
        mlp[f"mlp.layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in**0.5
        mlp[f"mlp.layers.{index}.bias"] = torch.randn(n_out) * 0.1
    state = {release_name(k): v.clone() for k, v in vision.state_dict().items()}
    state.update({"blip.text_encoder." + k: v.clone() for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # the released file carries it
    state["blip.vision_proj.weight"], state["blip.vision_proj.bias"] = torch.randn(16, 32), torch.randn(16)
    state["blip.text_proj.weight"], state["blip.text_proj.bias"] = torch.randn(16, 48), torch.randn(16)
    state.update(mlp)
    save_file(state, str(folder / "model.safetensors"))
    # head counts are not in the shapes (width / 64 would give 1): the config.json beside the weights says them
    (folder / "config.json").write_text(
        json.dumps({"vision_config": {"num_attention_heads": 2}, "text_config": {"num_attention_heads": 4}})
    )
    return folder, vision, text, mlp, state


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(4)
    sizes = [(32, 32), (48, 32), (40, 64)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference_pixels(images: list[Image.Image]) -> torch.Tensor:
    """ImageReward's transform for these sizes, written out: shorter side -> 32 (bicubic), centre 32x32 crop."""
    crops = [
        images[0],
        images[1].crop((8, 0, 40, 32)),  # already 32 high: no resize, left = (48 - 32) / 2
        images[2].resize((32, 51), Image.Resampling.BICUBIC).crop((0, 10, 32, 42)),  # int(32*64/40)=51, round(9.5)
    ]
    pixels = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32) / 255).permute(2, 0, 1) for c in crops])
    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def reference_scores(vision, text, mlp, input_ids, pixels, is_decoder=False) -> torch.Tensor:
    with torch.no_grad():
        image_embeds = vision(pixel_values=pixels).last_hidden_state
        hidden = text(
            input_ids=input_ids,
            attention_mask=(input_ids != 0).long(),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
            is_decoder=is_decoder,
        ).last_hidden_state
        x = hidden[:, 0]
        for index in LINEAR_INDICES:
            x = x @ mlp[f"mlp.layers.{index}.weight"].T + mlp[f"mlp.layers.{index}.bias"]
    return (x[:, 0] - MEAN) / STD


def ids(*words: str) -> list[int]:
    """[CLS] words [SEP], padded with [PAD] = 0 to ImageReward's 35 tokens."""
    row = [2] + [WORDS.index(w) for w in words] + [3]
    return row + [0] * (35 - len(row))


def test_score_equals_blip_then_mlp_written_out(reward_files):
    folder, vision, text, mlp, _ = reward_files
    metric = ImageRewardMetric.from_pretrained(
        model_config=folder / "model.safetensors", tokenizer_config=folder, device="cpu"
    )
    assert metric.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS), len(WORDS) + 1]
    images = pictures()
    prompts = ["a cat on the red sofa", "a dog in the snow", "the cat"]
    input_ids = torch.tensor([ids(*p.split()) for p in prompts])
    expected = reference_scores(vision, text, mlp, input_ids, reference_pixels(images))
    scores = metric.compute(prompts, images)
    assert isinstance(scores, list) and len(scores) == 3
    assert np.abs(np.array(scores) - expected.numpy()).max() < 1e-5
    # one prompt scores every image; one image is scored for every prompt (ImageReward's pairing)
    shared = reference_scores(vision, text, mlp, torch.tensor([ids("a", "cat")] * 3), reference_pixels(images))
    assert np.abs(np.array(metric.compute("a cat", images)) - shared.numpy()).max() < 1e-5
    one_image = metric.compute(prompts, images[0])
    assert abs(one_image[0] - scores[0]) < 1e-5 and len(one_image) == 3


def test_text_encoder_reads_the_whole_prompt(reward_files):
    """The first token must attend to the later ones (BLIP's encoder is bidirectional): run as a causal decoder it
    would see only itself and the image, and every prompt would score the same."""
    folder, vision, text, mlp, _ = reward_files
    metric = ImageRewardMetric.from_pretrained(
        model_config=folder / "model.safetensors", tokenizer_config=folder, device="cpu"
    )
    image = pictures()[:1]
    cat, dog = metric.compute("a cat", image)[0], metric.compute("a dog", image)[0]
    assert abs(cat - dog) > 1e-3
    pixels = reference_pixels(pictures())[:1]
    causal = [reference_scores(vision, text, mlp, torch.tensor([ids("a", w)]), pixels, True) for w in ("cat", "dog")]
    assert abs(causal[0].item() - causal[1].item()) < 1e-6


def test_diffsynth_converted_layout_loads_the_same(tmp_path, reward_files):
    """DiffSynth-Studio's `ImageRewardModel` state dict (transformers names, a zero itm_head) gives the same scores."""
    folder, vision, text, mlp, _ = reward_files
    state = {"blip.vision_model." + k: v.clone() for k, v in vision.state_dict().items()}
    state.update({"blip.text_encoder." + k: v.clone() for k, v in text.state_dict().items()})
    state.update({"blip.itm_head.weight": torch.zeros(2, 48), "blip.itm_head.bias": torch.zeros(2)}, **mlp)
    state.update({"blip.vision_proj.weight": torch.randn(16, 32), "blip.vision_proj.bias": torch.randn(16)})
    state.update({"blip.text_proj.weight": torch.randn(16, 48), "blip.text_proj.bias": torch.randn(16)})
    save_file({"module." + k: v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = ImageRewardMetric.from_pretrained(model_config=tmp_path / "model.safetensors", tokenizer_config=folder)
    released = ImageRewardMetric.from_pretrained(model_config=folder / "model.safetensors", tokenizer_config=folder)
    images = pictures()
    assert ours.compute("a red sofa", images) == released.compute("a red sofa", images)


def test_released_layout_matches_diffsynth_hash_and_default_config():
    """DiffSynth-Studio's full-size BLIP (ViT-L/16 224, BERT-base with cross-attention, 30524 tokens), in
    ImageReward's names, has DiffSynth-Studio's registered hash; our conversion and derived config recover it."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_defaults = {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
    }  # fmt: skip
    text_defaults = {
        "vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 512, "encoder_hidden_size": 1024,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0, "is_decoder": True,
    }  # fmt: skip
    with torch.device("meta"):
        vision = BlipVisionModel(BlipVisionConfig(**vision_defaults))
        text = BlipTextModel(BlipTextConfig(**text_defaults), add_pooling_layer=False)
    state = {release_name(k): v for k, v in vision.state_dict().items()}
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.empty(1, 512, device="meta")
    for name, shape in (("vision_proj", (256, 1024)), ("text_proj", (256, 768))):
        state[f"blip.{name}.weight"], state[f"blip.{name}.bias"] = torch.empty(shape), torch.empty(shape[0])
    for index, (n_in, n_out) in zip(
        LINEAR_INDICES, [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)], strict=True
    ):
        state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"] = (
            torch.empty(n_out, n_in),
            torch.empty(n_out),
        )
    entries = [f"{k}:{'_'.join(map(str, v.shape))}" for k, v in state.items()] + list(state)
    assert hashlib.md5(",".join(sorted(entries)).encode()).hexdigest() == "b3cc8e10b76ca98cde653daa5cf63139"
    converted = convert_image_reward(state, "released layout")
    config = blip_config_from_shapes({k: tuple(v.shape) for k, v in converted.items()})
    assert config == {"vision_config": vision_defaults, "text_config": text_defaults}
    assert sorted(k[len("blip.vision_model.") :] for k in converted if k.startswith("blip.vision_model.")) == sorted(
        vision.state_dict()
    )


def test_prompt_and_image_counts_must_match(reward_files):
    folder = reward_files[0]
    metric = ImageRewardMetric.from_pretrained(model_config=folder / "model.safetensors", tokenizer_config=folder)
    with pytest.raises(ConfigError, match="prompt has 2 entries but images has 3"):
        metric.compute(["a cat", "a dog"], pictures())
    with pytest.raises(ConfigError, match="prompt must be a string"):
        metric.compute(3, pictures())
    with pytest.raises(ConfigError, match="images is empty"):
        metric.compute("a cat", [])


def test_wrong_keys_shapes_and_tokenizer_are_refused(tmp_path, reward_files):
    folder, _, _, _, state = reward_files
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    def load(changed: dict, tokenizer=folder):
        save_file(changed, str(tmp_path / "model.safetensors"))
        return ImageRewardMetric.from_pretrained(
            model_config=tmp_path / "model.safetensors", tokenizer_config=tokenizer
        )

    renamed = dict(state)
    renamed["blip.visual_encoder.blocks.0.attn.qkv_bad.weight"] = renamed.pop(
        "blip.visual_encoder.blocks.0.attn.qkv.weight"
    )
    with pytest.raises(CheckpointError, match=r"'blip.visual_encoder.blocks.0.attn.qkv_bad.weight' is not part of"):
        load(renamed)
    with pytest.raises(CheckpointError, match=r"'blip.extra.weight' is not part of any known layout"):
        load({**state, "blip.extra.weight": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "mlp.layers.7.bias"}
    with pytest.raises(CheckpointError, match=r"missing 'mlp.layers.7.bias'"):
        load(missing)
    wrong = {**state, "mlp.layers.6.bias": torch.zeros(17)}
    with pytest.raises(CheckpointError, match=r"mlp.layers.6.bias has shape \(17,\) in the file, \(16,\)"):
        load(wrong)
    big = tmp_path / "tokenizer"
    big.mkdir()
    (big / "vocab.txt").write_text("\n".join(WORDS + ["extra"]) + "\n")
    with pytest.raises(ConfigError, match="17 tokens with \\[DEC\\]/\\[ENC\\], more than the 16 rows"):
        load(state, tokenizer=big)


def test_score_command_prints_one_reward_per_image(tmp_path, reward_files, capsys):
    from diffsynth.runtime.cli import main

    folder = reward_files[0]
    metric = ImageRewardMetric.from_pretrained(model_config=folder / "model.safetensors", tokenizer_config=folder)
    paths = []
    for i, image in enumerate(pictures()):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    files = ["--model-path", str(folder / "model.safetensors"), "--processor-path", str(folder), "--device", "cpu"]
    assert main(["score", "--metric", "image_reward", "--prompt", "a red sofa", *files, *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    expected = metric.compute("a red sofa", paths)
    assert np.abs(np.array([float(line.split("\t")[1]) for line in lines]) - expected).max() < 1e-5
    assert main(["score", "--metric", "image_reward", "--prompt", "a", "--prompt", "cat", *files, *paths]) == 2
    assert "got 2 --prompt for 3 images" in capsys.readouterr().err
