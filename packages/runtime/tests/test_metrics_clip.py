"""CLIP score, PickScore and HPSv2 against transformers' own `CLIPModel` forward on a tiny random CLIP.

The reference is `CLIPModel(**processor(text, images)).logits_per_image`, which is `logit_scale.exp() * cos` of
every image with every prompt: the metric's scores must be its entries (the column of the single prompt, or the
diagonal for one prompt per image). The metric loads the saved file through its own path (config derived from
shapes, or read from config.json; open_clip key layout for HPSv2), so a wrong head count, activation, pooling
or key conversion changes the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.metrics import CLIPMetric, HPSv2Metric, PickScoreMetric

PROMPTS = ["a red cat", "a blue dog on grass", "an old photo of a city at night"]


def build_processor(folder: Path):
    """A CLIPProcessor with a character-level CLIP BPE (specials last, as in CLIP) and 32-pixel images."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    processor.save_pretrained(str(folder))
    return processor


def tiny_config(tokenizer, hidden_act: str = "gelu", eos_token_id: int | None = None):
    """Widths of 128 (two 64-wide heads, as our shape rule assumes), 2 layers, 32-pixel images in 8-pixel patches."""
    from transformers import CLIPConfig

    tower = {"hidden_size": 128, "intermediate_size": 200, "num_hidden_layers": 2, "num_attention_heads": 2}
    tower.update(hidden_act=hidden_act, layer_norm_eps=1e-5)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77)
    text.update(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    text["eos_token_id"] = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    vision = dict(tower, image_size=32, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=48, logit_scale_init_value=2.3)


def random_clip(config, seed: int = 0):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # spread the random weights so scores differ visibly between images and prompts
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        model.logit_scale.fill_(np.log(30.0))
    return model


def images(n: int, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 36), (32, 32), (50, 33), (36, 48)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def reference_logits(model, processor, prompts, pictures) -> torch.Tensor:
    """transformers' CLIPModel forward: [images, prompts] = logit_scale.exp() * cos."""
    inputs = processor(text=prompts, images=pictures, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits_per_image


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickscore")
    processor = build_processor(folder)
    model = random_clip(tiny_config(processor.tokenizer))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder, model, processor


@pytest.mark.parametrize("metric_class", [PickScoreMetric, CLIPMetric])
def test_scores_equal_transformers_clip_logits(clip_files, metric_class):
    folder, model, processor = clip_files
    metric = metric_class.from_pretrained(
        model_config=ModelConfig(path=str(folder / "model.safetensors")),
        processor_config=ModelConfig(path=str(folder)),
        device="cpu",
        batch_size=2,  # several chunks
    )
    pictures = images(3)
    logits = reference_logits(model, processor, PROMPTS, pictures)

    single = metric.compute(PROMPTS[1], pictures)  # one prompt for every image: that prompt's column
    assert isinstance(single, list) and all(isinstance(s, float) for s in single)
    np.testing.assert_allclose(single, logits[:, 1].numpy(), rtol=0, atol=1e-4)
    paired = metric.compute(PROMPTS, pictures)  # one prompt per image: the diagonal
    np.testing.assert_allclose(paired, torch.diagonal(logits).numpy(), rtol=0, atol=1e-4)
    one = metric.compute(PROMPTS[2], pictures[0])  # one image, DiffSynth-Studio's `compute(prompt, image)[0]`
    np.testing.assert_allclose(one, [logits[0, 2].item()], rtol=0, atol=1e-4)
    # the scores are not all alike, so the comparison above could fail
    assert torch.diagonal(logits).std() > 0.05 and logits[:, 1].std() > 0.05
    matrix = metric.similarity_matrix(PROMPTS, pictures)
    np.testing.assert_allclose(np.array(matrix), logits.T.numpy(), rtol=0, atol=1e-4)


def test_pickscore_probabilities_are_softmax_over_images(clip_files):
    folder, model, processor = clip_files
    metric = PickScoreMetric.from_pretrained(
        model_config=str(folder / "model.safetensors"), processor_config=str(folder), device="cpu"
    )
    pictures = images(4)
    logits = reference_logits(model, processor, [PROMPTS[0]], pictures)[:, 0]
    np.testing.assert_allclose(metric.calc_probs(PROMPTS[0], pictures), logits.softmax(0).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="one prompt"):
        metric.probabilities(PROMPTS[:2], pictures[:2])


def test_prompt_image_count_mismatch_is_refused(clip_files):
    folder, _, _ = clip_files
    metric = CLIPMetric.from_pretrained(
        model_config=ModelConfig(path=str(folder / "model.safetensors")),
        processor_config=ModelConfig(path=str(folder)),
        device="cpu",
    )
    with pytest.raises(ConfigError, match=r"prompt has 2 entries but images has 3"):
        metric.compute(PROMPTS[:2], images(3))
    with pytest.raises(ConfigError, match="images is empty"):
        metric.compute("a cat", [])
    with pytest.raises(ConfigError, match="prompt must be a string"):
        metric.compute(3, images(1))


def test_config_json_beside_the_weights_is_used(tmp_path):
    """OpenAI-style CLIP: quick_gelu and the legacy eos id 2 (pooling at the highest token id) from config.json."""
    processor = build_processor(tmp_path)
    config = tiny_config(processor.tokenizer, hidden_act="quick_gelu", eos_token_id=2)
    model = random_clip(config, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    metric = CLIPMetric.from_pretrained(
        model_config=str(tmp_path / "model.safetensors"), processor_config=str(tmp_path), device="cpu"
    )
    assert metric.model.config.text_config.hidden_act == "quick_gelu"
    pictures = images(3, seed=5)
    logits = reference_logits(model, processor, PROMPTS, pictures)
    np.testing.assert_allclose(metric.compute(PROMPTS, pictures), torch.diagonal(logits).numpy(), atol=1e-4)
    # without config.json the derived GELU config is a different model: the check above can fail
    (tmp_path / "config.json").unlink()
    derived = CLIPMetric.from_pretrained(
        model_config=str(tmp_path / "model.safetensors"), processor_config=str(tmp_path), device="cpu"
    )
    assert np.abs(np.array(derived.compute(PROMPTS, pictures)) - torch.diagonal(logits).numpy()).max() > 1e-3


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP names -> open_clip's (as HPSv2's checkpoint stores them), written out independently."""
    out = {"logit_scale": state["logit_scale"]}
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    out["visual.proj"] = state["visual_projection.weight"].T.contiguous()
    out["visual.class_embedding"] = state["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = state["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = state["vision_model.embeddings.position_embedding.weight"]
    for ours, theirs in (
        ("text_model.final_layer_norm", "ln_final"),
        ("vision_model.pre_layrnorm", "visual.ln_pre"),
        ("vision_model.post_layernorm", "visual.ln_post"),
    ):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        for i in range(2):
            a, b = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                qkv = [state[f"{a}self_attn.{n}_proj.{p}"] for n in "qkv"]
                out[f"{b}attn.in_proj_{p}"] = torch.cat(qkv, 0)
                out[f"{b}attn.out_proj.{p}"] = state[f"{a}self_attn.out_proj.{p}"]
                out[f"{b}ln_1.{p}"] = state[f"{a}layer_norm1.{p}"]
                out[f"{b}ln_2.{p}"] = state[f"{a}layer_norm2.{p}"]
                out[f"{b}mlp.c_fc.{p}"] = state[f"{a}mlp.fc1.{p}"]
                out[f"{b}mlp.c_proj.{p}"] = state[f"{a}mlp.fc2.{p}"]
    assert len(out) == len(state) - 2 * 2 * 4  # q, k, v fold into one (weight, bias; 4 layers): nothing left out
    return out


def test_hpsv2_reads_the_open_clip_layout(tmp_path, clip_files):
    folder, model, processor = clip_files
    save_file(to_open_clip(model.state_dict()), str(tmp_path / "model.safetensors"))
    metric = HPSv2Metric.from_pretrained(
        model_config=str(tmp_path / "model.safetensors"), processor_config=str(folder), device="cpu"
    )
    pictures = images(3, seed=7)
    logits = reference_logits(model, processor, PROMPTS, pictures)
    np.testing.assert_allclose(metric.compute(PROMPTS, pictures), torch.diagonal(logits).numpy(), atol=1e-4)


def test_unknown_and_missing_keys_are_refused(tmp_path, clip_files):
    folder, model, _ = clip_files
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(dict(state, **{"extra.weight": torch.zeros(2)}), str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="'extra.weight'"):
        CLIPMetric.from_pretrained(model_config=str(tmp_path / "extra.safetensors"), processor_config=str(folder))
    del state["text_model.final_layer_norm.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="text_model.final_layer_norm.bias"):
        CLIPMetric.from_pretrained(model_config=str(tmp_path / "missing.safetensors"), processor_config=str(folder))


def test_score_command_prints_the_metric_scores(tmp_path, clip_files, capsys):
    from diffsynth.runtime.cli import main

    folder, model, processor = clip_files
    pictures = images(2, seed=9)
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(str(tmp_path / f"{i}.png"))
        picture.save(paths[-1])
    logits = reference_logits(model, processor, PROMPTS[:2], pictures)
    files = ["--model-path", str(folder / "model.safetensors"), "--processor-path", str(folder), "--device", "cpu"]
    assert main(["score", "--metric", "pickscore", "--prompt", PROMPTS[0], *files, *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    np.testing.assert_allclose([float(line.split("\t")[1]) for line in lines], logits[:, 0].numpy(), atol=1e-5)
    prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    assert main(["score", "--metric", "clip", *prompts, *files, "--json", *paths]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert [entry["path"] for entry in scores] == paths
    np.testing.assert_allclose([e["score"] for e in scores], torch.diagonal(logits).numpy(), atol=1e-4)
    assert main(["score", "--metric", "clip", *files, *paths]) == 2
    assert "--metric clip needs --prompt" in capsys.readouterr().err
