"""The LTX prompt enhancer (`prompt_enhancer.py`) and its use by `LTX2Pipeline`.

Parity: the same text as diffusers' `LTX2Pipeline.enhance_prompt` for the same seed and the same system prompt
(ours given to both; the authors' given to diffusers and read by us from a file), with tiny random Gemma 3
(LTX-2.0/2.3's sampling recipe, text and image-to-video) and Gemma 4 (LTX-2.5's greedy enhancer) models, and the
recipes' budgets and decoding against diffusers'. Invariants: seeding, the chat layout, the recipe chosen by
`model_type`, `system_prompt_file`, and the answer cleaning (with a stub model whose answer is known). Pipeline:
`load_prompt_enhancer` and `__call__(enhance_prompt=True)` on the tiny LTX-2 pipeline (no diffusers there).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from types import SimpleNamespace

import diffsynth_ltx2_test_repo as repo_module  # loaded by conftest
import pytest
import torch
from PIL import Image

from diffsynth.ltx2 import prompt_enhancer as pe
from diffsynth.ltx2.prompt_enhancer import clean_response, enhance_prompt, enhancer_recipe, resize_for_enhancer
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.testing.tokenizers import build_tiny_gemma_tokenizer
from diffsynth.runtime.testing.weights import random_weights

PROMPT = "a cat sitting on a red chair"
NEW_TOKENS = 24
IMAGE_TOKENS = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
SYSTEM_PROMPTS = (
    pe.GEMMA3_T2V_SYSTEM_PROMPT,
    pe.GEMMA3_I2V_SYSTEM_PROMPT,
    pe.GEMMA4_T2V_SYSTEM_PROMPT,
    pe.GEMMA4_I2V_SYSTEM_PROMPT,
)


@pytest.fixture(autouse=True)
def skip_parity_without_diffusers(request):
    """The parity tests compare with diffusers: skipped where it is not installed (the parity session has it)."""
    if request.node.get_closest_marker("parity"):
        pytest.importorskip("diffusers")


# ----------------------------------------------------------------------------------------- tiny models
def untie_head(model, seed: int, scale: float = 0.1):
    """A random LM head of its own: with the embeddings tied, a random model echoes its last input token. Small
    (`scale`), so that sampling at temperature 0.7 stays random enough for the seed to matter."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(model.lm_head.weight.shape, generator=generator) * scale
    model.lm_head.weight = torch.nn.Parameter(weight)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny Gemma tokenizer with Gemma 3's image tokens, and a chat template that renders an image part as
    `<start_of_image>` (as the real template does)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("enhancer-tokenizer")
    # trained on the system prompts too, so that they are ~1.2k tokens, not 3.5k mostly <unk>
    tokenizer = build_tiny_gemma_tokenizer(folder, texts=[*SYSTEM_PROMPTS, *repo_module.CAPTIONS], vocab_size=1000)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{%- if part.type == 'text' -%}",
        "{%- if part.type == 'image' -%}{%- set ns.text = ns.text + '<start_of_image>' -%}"
        "{%- elif part.type == 'text' -%}",
    )
    tokenizer.save_pretrained(folder)
    names = dict(zip(("boi_token", "image_token", "eoi_token"), IMAGE_TOKENS, strict=True))
    return AutoTokenizer.from_pretrained(folder, extra_special_tokens=names)


@pytest.fixture(scope="module")
def processor(tokenizer):
    """Gemma 3's processor over the tiny tokenizer: 28 px images, 4 tokens an image."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(images, tokenizer, chat_template=tokenizer.chat_template, image_seq_length=4)


@pytest.fixture(scope="module")
def gemma3(tokenizer):
    """A tiny `Gemma3ForConditionalGeneration` (LTX-2.0/2.3's text encoder with its LM head and vision tower)."""
    from transformers import Gemma3ForConditionalGeneration

    config = repo_module.gemma_config(len(tokenizer))
    config.boi_token_id, config.image_token_id, config.eoi_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)
    return untie_head(random_weights(Gemma3ForConditionalGeneration(config), seed=3, scale=0.3), seed=13).eval()


@pytest.fixture(scope="module")
def gemma4(tokenizer):
    """A tiny `Gemma4ForConditionalGeneration` (gemma-4-E2B-it's architecture: per-layer inputs, shared KV)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = dict(
        vocab_size=len(tokenizer),
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_kv_shared_layers=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=2048,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=2)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    # embeddings tied: greedy decoding would echo the last token forever, so the 5-gram ban shapes the answer
    return random_weights(Gemma4ForConditionalGeneration(config), seed=4, scale=0.3).eval()


class TextProcessor:
    """A processor for text only (what diffusers' `enhance_prompt` calls), over a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, images=None, return_tensors=None):
        assert images is None
        return self.tokenizer(text, return_tensors=return_tensors)


def diffusers_enhance(model, processor, prompt, system_prompt, seed, dedicated, image=None, tokens=NEW_TOKENS):
    """diffusers' `LTX2Pipeline.enhance_prompt` on `model` (the `prompt_enhancer` slot when `dedicated`, LTX-2.5;
    else the `text_encoder`, LTX-2.0/2.3)."""
    from diffusers import LTX2Pipeline

    pipe = SimpleNamespace(
        processor=processor,
        text_encoder=None if dedicated else model,
        prompt_enhancer=model if dedicated else None,
        _execution_device=torch.device("cpu"),
    )
    (text,) = LTX2Pipeline.enhance_prompt(
        pipe, prompt=prompt, system_prompt=system_prompt, max_new_tokens=tokens, seed=seed, image=image
    )
    return text


def word_runs(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# ----------------------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parity
@pytest.mark.parametrize("seed", [10, 7])
def test_gemma3_text_to_video_matches_diffusers(gemma3, tokenizer, seed):
    ours = enhance_prompt(gemma3, tokenizer, PROMPT, seed=seed, max_new_tokens=NEW_TOKENS)
    theirs = diffusers_enhance(gemma3, TextProcessor(tokenizer), PROMPT, pe.GEMMA3_T2V_SYSTEM_PROMPT, seed, False)
    assert ours == theirs
    assert len(ours.split()) >= 3  # sampled something to compare


@pytest.mark.parity
def test_gemma3_image_to_video_matches_diffusers(gemma3, processor):
    image = Image.new("RGB", (60, 40), (180, 40, 20))
    image.paste((20, 90, 200), (0, 0, 30, 20))
    ours = enhance_prompt(gemma3, processor, PROMPT, image=image, seed=5, max_new_tokens=NEW_TOKENS)
    theirs = diffusers_enhance(gemma3, processor, PROMPT, pe.GEMMA3_I2V_SYSTEM_PROMPT, 5, False, image=image)
    assert ours == theirs
    assert len(ours.split()) >= 3


@pytest.mark.parity
def test_gemma4_text_to_video_matches_diffusers(gemma4, tokenizer):
    ours = enhance_prompt(gemma4, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS)
    theirs = diffusers_enhance(gemma4, TextProcessor(tokenizer), PROMPT, pe.GEMMA4_T2V_SYSTEM_PROMPT, 10, True)
    assert ours == theirs
    assert len(ours.split()) >= 3


@pytest.mark.parity
@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_the_authors_prompt_file_reproduces_diffusers_default(request, tokenizer, tmp_path, family):
    """The authors' text-to-video system prompt (diffusers' default, as ltx-core ships it in a .txt file) read with
    `system_prompt_file` gives diffusers' caption (a few tokens: the authors' prompt is ~4k tokens to the tiny
    tokenizer)."""
    from diffusers.pipelines.ltx2 import utils

    authors = utils.T2V_DEFAULT_SYSTEM_PROMPT if family == "gemma3" else utils.LTX2_5_T2V_DEFAULT_SYSTEM_PROMPT
    path = tmp_path / f"{family}_t2v_system_prompt.txt"
    path.write_text(authors, encoding="utf-8")
    model = request.getfixturevalue(family)
    ours = enhance_prompt(model, tokenizer, PROMPT, seed=3, system_prompt_file=path, max_new_tokens=8)
    theirs = diffusers_enhance(model, TextProcessor(tokenizer), PROMPT, authors, 3, family == "gemma4", tokens=8)
    assert ours == theirs and ours
    assert ours != enhance_prompt(model, tokenizer, PROMPT, seed=3, max_new_tokens=8)  # our prompt is another


@pytest.mark.parity
def test_recipes_match_diffusers_and_the_prompts_are_our_own():
    from diffusers.pipelines.ltx2 import utils

    for recipe, theirs in (
        (pe.GEMMA3_RECIPE, utils.GEMMA3_PROMPT_ENHANCEMENT_CONFIG),
        (pe.GEMMA4_RECIPE, utils.GEMMA4_PROMPT_ENHANCEMENT_CONFIG),
    ):
        assert recipe.max_new_tokens == theirs.max_new_tokens
        assert dict(recipe.generation_kwargs) == theirs.generation_kwargs
        assert pe.DEFAULT_SEED == theirs.seed
    # our system prompts are written afresh: no run of 8 words in common with any of the authors'
    authors = (
        utils.T2V_DEFAULT_SYSTEM_PROMPT,
        utils.I2V_DEFAULT_SYSTEM_PROMPT,
        utils.LTX2_5_T2V_DEFAULT_SYSTEM_PROMPT,
        utils.LTX2_5_I2V_DEFAULT_SYSTEM_PROMPT,
    )
    theirs = set().union(*(word_runs(text, 8) for text in authors))
    for ours in SYSTEM_PROMPTS:
        assert not word_runs(ours, 8) & theirs


@pytest.mark.parity
def test_cleaning_and_image_resize_match_diffusers():
    from diffusers.pipelines.ltx2.prompt_enhancement import _prepare_enhance_image
    from diffusers.pipelines.ltx2.prompt_enhancement import clean_response as theirs

    for text in ("** \u201cA cat\u201d sits \u2014 quietly\u2026", "\u2018Style: noir\u2019", "12 \u2013 34", "  ", ""):
        assert clean_response(text) == theirs(text)
    for size in ((60, 40), (40, 1000), (896, 500), (1200, 1200)):
        image = Image.effect_noise(size, 40).convert("RGBA")
        ours, ref = resize_for_enhancer(image), _prepare_enhance_image(image)
        assert ours.mode == ref.mode and ours.size == ref.size and ours.tobytes() == ref.tobytes()


# ----------------------------------------------------------------------------------------- invariants
def test_seeded_and_leaves_the_global_rng_alone(gemma3, tokenizer):
    short = dict(system_prompt="Write a detailed video caption.", max_new_tokens=NEW_TOKENS)  # a quick chat
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = enhance_prompt(gemma3, tokenizer, PROMPT, seed=1, **short)
    assert torch.equal(torch.get_rng_state(), state)
    assert enhance_prompt(gemma3, tokenizer, PROMPT, seed=1, **short) == first
    assert enhance_prompt(gemma3, tokenizer, PROMPT, seed=2, **short) != first
    # a list: each prompt its own call with the same seed
    other = "a dog running on the beach"
    assert enhance_prompt(gemma3, tokenizer, [PROMPT, other], seed=1, **short) == [
        first,
        enhance_prompt(gemma3, tokenizer, other, seed=1, **short),
    ]


class StubEnhancer:
    """A 'model' whose answer is known: it records what `generate` got and appends `answer` and EOS."""

    def __init__(self, tokenizer, answer: str, model_type: str):
        self.tokenizer, self.answer = tokenizer, answer
        self.config = SimpleNamespace(model_type=model_type)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls, self.moves = [], []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        answer = self.tokenizer(self.answer, add_special_tokens=False, return_tensors="pt").input_ids
        eos = torch.tensor([[self.tokenizer.eos_token_id]])
        return torch.cat([kwargs["input_ids"], answer, eos], dim=1)


@pytest.mark.parametrize("model_type", ["gemma3", "gemma4"])
def test_answer_without_the_chat_and_the_recipe(tokenizer, model_type):
    stub = StubEnhancer(tokenizer, "* a photo of a cat on a chair", model_type)
    # the answer alone: no system prompt, no user turn, no turn markers; the leading bullet dropped
    assert enhance_prompt(stub, tokenizer, PROMPT) == "a photo of a cat on a chair"
    (call,) = stub.calls
    recipe = enhancer_recipe(stub)
    assert call["max_new_tokens"] == recipe.max_new_tokens
    assert all(call[k] == v for k, v in recipe.generation_kwargs.items())
    # the chat as ltx-core lays it out, left-padded (masked) to a multiple of 8 tokens
    ids, mask = call["input_ids"], call["attention_mask"]
    expected = tokenizer(
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": recipe.t2v_system_prompt},
                {"role": "user", "content": f"user prompt: {PROMPT}"},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
    ).input_ids
    pad = ids.shape[1] - len(expected)
    assert ids.shape[1] % 8 == 0 and 0 <= pad < 8
    assert ids[0, pad:].tolist() == expected and (ids[0, :pad] == tokenizer.pad_token_id).all()
    assert mask[0].tolist() == [0] * pad + [1] * len(expected)
    # overrides: generate settings merge over the recipe's, the budget and system prompt replace them
    enhance_prompt(stub, tokenizer, PROMPT, max_new_tokens=9, generation_kwargs={"top_k": 3}, system_prompt="be brief")
    assert stub.calls[-1]["max_new_tokens"] == 9 and stub.calls[-1]["top_k"] == 3
    assert "be brief" in tokenizer.decode(stub.calls[-1]["input_ids"][0])


def test_image_to_video_chat(tokenizer, processor):
    """With a first frame: the image-to-video system prompt and user turn, the image's tokens in the chat and its
    pixels (resized to a long side of 896 first, then the processor's size) passed to `generate`."""
    stub = StubEnhancer(tokenizer, "a photo of a cat", "gemma4")
    assert enhance_prompt(stub, processor, PROMPT, image=Image.new("RGB", (64, 48), (9, 99, 199))) == "a photo of a cat"
    (call,) = stub.calls
    chat = tokenizer.decode(call["input_ids"][0])
    assert pe.GEMMA4_I2V_SYSTEM_PROMPT.strip() in chat and f"User Raw Input Prompt: {PROMPT}." in chat
    assert "<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>" in chat
    assert call["pixel_values"].shape == (1, 3, 28, 28) and call["pixel_values"].dtype == stub.dtype
    assert call["input_ids"].shape == call["token_type_ids"].shape and call["input_ids"].shape[1] % 8 == 0


def test_clean_response():
    assert clean_response("** \u201cA cat\u201d sits \u2014 quietly.") == 'A cat" sits - quietly.'
    assert clean_response("\u2018Tom\u2019s\u00a0hat\u2019") == "Tom's hat'"
    assert clean_response("1, 2, 3") == "1, 2, 3"  # no letter at all: kept


def test_resize_for_enhancer():
    for size, expected in (((1000, 500), (896, 448)), ((300, 600), (448, 896)), ((896, 100), (896, 100))):
        image = Image.new("L", size)
        resized = resize_for_enhancer(image)
        assert resized.size == expected and resized.mode == "RGB"


def test_bad_inputs(tokenizer, gemma3):
    assert enhancer_recipe(SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text"))) is pe.GEMMA3_RECIPE
    with pytest.raises(ConfigError, match="gemma-4-E2B-it"):  # LTX-2.5's text encoder is not an enhancer
        enhancer_recipe(SimpleNamespace(config=SimpleNamespace(model_type="gemma4_unified")))
    with pytest.raises(ConfigError, match="model_type='qwen3'"):
        enhance_prompt(StubEnhancer(tokenizer, "x", "qwen3"), tokenizer, PROMPT)
    with pytest.raises(ConfigError, match="processor"):  # an image needs the processor, not the tokenizer
        enhance_prompt(gemma3, tokenizer, PROMPT, image=Image.new("RGB", (8, 8)))
    with pytest.raises(ConfigError, match="image"):
        resize_for_enhancer(torch.zeros(3, 8, 8))
    with pytest.raises(ConfigError, match="prompt"):
        enhance_prompt(gemma3, tokenizer, "  ")


@pytest.mark.parametrize(
    ("model_type", "recipe"),
    [("gemma3", pe.GEMMA3_RECIPE), ("gemma3_text", pe.GEMMA3_RECIPE), ("gemma4", pe.GEMMA4_RECIPE),
     ("gemma4_text", pe.GEMMA4_RECIPE)],
)  # fmt: skip
def test_the_recipe_follows_the_model_type(tokenizer, processor, model_type, recipe):
    """Gemma 3 (LTX-2.0/2.3) samples 512 tokens at temperature 0.7, Gemma 4 (LTX-2.5) decodes 600 greedily with a
    5-gram ban; each with its own text-to-video prompt, and its image-to-video prompt when shown a frame."""
    assert enhancer_recipe(SimpleNamespace(config=SimpleNamespace(model_type=model_type))) is recipe
    stub = StubEnhancer(tokenizer, "a cat", model_type)
    enhance_prompt(stub, tokenizer, PROMPT)
    enhance_prompt(stub, processor, PROMPT, image=Image.new("RGB", (32, 32)))
    for call, system_prompt in zip(stub.calls, (recipe.t2v_system_prompt, recipe.i2v_system_prompt), strict=True):
        assert system_prompt.strip() in tokenizer.decode(call["input_ids"][0])
        assert call["max_new_tokens"] == recipe.max_new_tokens
        assert {k: call[k] for k in recipe.generation_kwargs} == dict(recipe.generation_kwargs)
    others = set(SYSTEM_PROMPTS) - {recipe.t2v_system_prompt, recipe.i2v_system_prompt}
    assert not any(other.strip() in tokenizer.decode(stub.calls[0]["input_ids"][0]) for other in others)
    assert (recipe.max_new_tokens, recipe.generation_kwargs.get("do_sample")) == (
        (512, True) if model_type.startswith("gemma3") else (600, False)
    )


def test_our_system_prompts_ask_for_the_caption_ltx2_reads():
    """The four prompts are distinct and ask for what LTX-2 was trained on: one paragraph with its sound, the
    user's text back when the request is unsafe; the image-to-video ones start from the frame; Gemma 3's add no
    camera motion of their own, Gemma 4's always state the camera."""
    assert len(set(SYSTEM_PROMPTS)) == 4
    for text in SYSTEM_PROMPTS:
        lower = text.lower()
        assert re.search(r"\bone (short |continuous )?paragraph\b", lower)
        assert "unsafe" in lower and "unchanged" in lower and "sound" in lower and "present tense" in lower
        assert "markdown" in lower and "quote" in lower and "camera" in lower
    assert "first frame" in pe.GEMMA3_I2V_SYSTEM_PROMPT and "first frame" in pe.GEMMA4_I2V_SYSTEM_PROMPT
    assert "only when the user asks for it; never invent one" in pe.GEMMA3_T2V_SYSTEM_PROMPT
    assert "add none of your own" in pe.GEMMA3_I2V_SYSTEM_PROMPT
    assert "The camera, always" in pe.GEMMA4_T2V_SYSTEM_PROMPT and "The camera, always" in pe.GEMMA4_I2V_SYSTEM_PROMPT


# ----------------------------------------------------------------------------------------- system_prompt_file
def test_system_prompt_file_is_read_whole(tokenizer, tmp_path):
    """A file's text is the system prompt exactly as `system_prompt=` with the same text (newlines kept), for one
    prompt and for a list."""
    text = "\nDescribe the clip in one long paragraph.\nKeep every detail.\n"
    path = tmp_path / "gemma3_t2v_system_prompt.txt"
    path.write_text(text, encoding="utf-8")
    stub = StubEnhancer(tokenizer, "a cat", "gemma3")
    assert enhance_prompt(stub, tokenizer, PROMPT, system_prompt_file=path) == "a cat"
    assert enhance_prompt(stub, tokenizer, [PROMPT, "a dog"], system_prompt_file=str(path)) == ["a cat", "a cat"]
    enhance_prompt(stub, tokenizer, PROMPT, system_prompt=text)
    from_file, *listed, from_text = stub.calls
    assert torch.equal(from_file["input_ids"], from_text["input_ids"])
    assert torch.equal(listed[0]["input_ids"], from_text["input_ids"])
    assert pe.read_system_prompt(path) == text


def test_system_prompt_file_errors(tokenizer, tmp_path):
    stub = StubEnhancer(tokenizer, "a cat", "gemma3")
    missing = tmp_path / "prompts" / "gemma3_t2v_system_prompt.txt"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        enhance_prompt(stub, tokenizer, PROMPT, system_prompt_file=missing)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{re.escape(str(empty))} is empty"):
        enhance_prompt(stub, tokenizer, PROMPT, system_prompt_file=empty)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):  # a folder is not a file
        enhance_prompt(stub, tokenizer, PROMPT, system_prompt_file=tmp_path)
    given = tmp_path / "given.txt"
    given.write_text("Describe the clip.", encoding="utf-8")
    with pytest.raises(ConfigError, match="not both"):
        enhance_prompt(stub, tokenizer, PROMPT, system_prompt="Describe it.", system_prompt_file=given)
    assert not stub.calls


# ----------------------------------------------------------------------------------------- the pipeline
PIPE_SETTINGS = dict(
    height=repo_module.HEIGHT,
    width=repo_module.WIDTH,
    num_frames=repo_module.FRAMES,
    num_inference_steps=2,
    max_sequence_length=repo_module.MAX_SEQUENCE_LENGTH,
    progress_bar=False,
    output_type="pt",
)


class Stop(Exception):
    """Raised by the `encode_prompt` spy to end a call once the prompts are known."""


@pytest.fixture
def pipe(tiny_ltx2_pipe, monkeypatch):
    """The shared tiny LTX-2 pipeline, its enhancer attributes and the Gemma 3 budget restored after the test (the
    budget cut to `NEW_TOKENS`: 512 sampled tokens are slow and prove nothing more)."""
    monkeypatch.setattr(tiny_ltx2_pipe, "prompt_enhancer", None)
    monkeypatch.setattr(tiny_ltx2_pipe, "prompt_enhancer_processor", None)
    for name in ("gemma3", "gemma3_text"):
        monkeypatch.setitem(pe.RECIPES, name, replace(pe.GEMMA3_RECIPE, max_new_tokens=NEW_TOKENS))
    return tiny_ltx2_pipe


def spy_encode_prompt(pipe, monkeypatch, stop: bool):
    """The prompt lists `encode_prompt` receives; with `stop`, the call ends there (raises `Stop`)."""
    seen, original = [], pipe.encode_prompt

    def spy(prompts, *args, **kwargs):
        seen.append(list(prompts))
        if stop:
            raise Stop
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    return seen


def small_recipe_enhance(model, processor, prompt, **kwargs):
    """`enhance_prompt` with the test budget (what the pipeline runs under the `pipe` fixture)."""
    return enhance_prompt(model, processor, prompt, max_new_tokens=NEW_TOKENS, **kwargs)


def test_pipeline_encodes_the_enhanced_prompt(pipe, gemma3, tokenizer, monkeypatch, caplog):
    """`enhance_prompt=True`: the prompt that reaches `encode_prompt` is the enhancer's answer for the call's seed
    (logged at INFO); the negative prompt is left alone; the video is made from it."""
    pipe.load_prompt_enhancer(gemma3, tokenizer)
    seen = spy_encode_prompt(pipe, monkeypatch, stop=False)
    with caplog.at_level(logging.INFO, logger="diffsynth.ltx2.pipeline"):
        frames, _ = pipe(PROMPT, seed=5, enhance_prompt=True, **PIPE_SETTINGS)
    enhanced = small_recipe_enhance(gemma3, tokenizer, PROMPT, seed=5)
    assert enhanced != PROMPT and len(enhanced.split()) >= 3
    assert seen == [[enhanced], [""]]  # the prompt, then the (CFG) negative prompt as given
    assert enhanced in caplog.text
    assert frames.shape[2] == repo_module.FRAMES and torch.isfinite(frames).all()
    seen.clear()
    pipe(PROMPT, seed=5, **PIPE_SETTINGS)  # off by default
    assert seen[0] == [PROMPT]


def test_pipeline_enhancer_seed_and_first_frame(pipe, gemma3, processor, monkeypatch):
    """`enhance_prompt_seed` wins over `seed`, which wins over the module's default; a first frame
    (`input_image`, or `input_images` at index 0) selects image-to-video and is shown to the enhancer."""
    pipe.load_prompt_enhancer(gemma3, processor)
    seen = spy_encode_prompt(pipe, monkeypatch, stop=True)

    def reaching_the_encoder(prompt, **kwargs):
        with pytest.raises(Stop):
            pipe(prompt, enhance_prompt=True, **{**PIPE_SETTINGS, **kwargs})
        return seen.pop()

    def expected(prompt, **kwargs):
        return small_recipe_enhance(gemma3, processor, prompt, **kwargs)

    prompts = [PROMPT, "a dog running on the beach"]
    assert reaching_the_encoder(prompts, seed=5, enhance_prompt_seed=8) == [expected(p, seed=8) for p in prompts]
    assert reaching_the_encoder(PROMPT, seed=None) == [expected(PROMPT, seed=pe.DEFAULT_SEED)]
    image = Image.new("RGB", (48, 32), (200, 120, 30))
    text_only, with_frame = expected(PROMPT, seed=4), expected(PROMPT, seed=4, image=image)
    assert with_frame != text_only
    assert reaching_the_encoder(PROMPT, seed=4, input_image=image) == [with_frame]
    assert reaching_the_encoder(PROMPT, seed=4, input_images=[image]) == [with_frame]
    # an image only at a later frame is a keyframe, not the first frame: text-to-video
    assert reaching_the_encoder(PROMPT, seed=4, input_images=[image], input_images_indexes=[8]) == [text_only]


def test_pipeline_without_an_enhancer_says_how_to_load_one(pipe):
    with pytest.raises(ConfigError, match="load_prompt_enhancer") as error:
        pipe(PROMPT, seed=0, enhance_prompt=True, **PIPE_SETTINGS)
    assert "Gemma-3-12B-it" in str(error.value) and "google/gemma-4-E2B-it" in str(error.value)


def test_load_prompt_enhancer_from_a_folder(pipe, gemma3, processor, tokenizer, tmp_path, monkeypatch):
    """A folder or `ModelConfig`: an image-text-to-text model with its processor, in the pipeline's dtype; a
    text-only model falls back to a causal LM and its tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3Processor

    folder = tmp_path / "gemma3-enhancer"
    gemma3.save_pretrained(folder)
    processor.save_pretrained(folder)
    monkeypatch.setattr(pipe, "torch_dtype", torch.bfloat16)
    pipe.load_prompt_enhancer(str(folder))
    assert isinstance(pipe.prompt_enhancer, Gemma3ForConditionalGeneration)
    assert isinstance(pipe.prompt_enhancer_processor, Gemma3Processor)
    assert pipe.prompt_enhancer.dtype == torch.bfloat16 and not pipe.prompt_enhancer.training
    monkeypatch.setattr(pipe, "torch_dtype", torch.float32)
    pipe.load_prompt_enhancer(ModelConfig(path=str(folder)))
    assert pipe.prompt_enhancer.dtype == torch.float32
    assert small_recipe_enhance(pipe.prompt_enhancer, pipe.prompt_enhancer_processor, PROMPT, seed=2) == (
        small_recipe_enhance(gemma3, processor, PROMPT, seed=2)
    )

    text_only = tmp_path / "gemma3-text"
    config = repo_module.gemma_config(len(tokenizer)).text_config
    random_weights(Gemma3ForCausalLM(config), seed=5, scale=0.3).save_pretrained(text_only)
    tokenizer.save_pretrained(text_only)
    pipe.load_prompt_enhancer(text_only)
    assert isinstance(pipe.prompt_enhancer, Gemma3ForCausalLM)
    assert pipe.prompt_enhancer_processor.convert_tokens_to_ids("<bos>") == tokenizer.bos_token_id
    assert enhancer_recipe(pipe.prompt_enhancer) is pe.RECIPES["gemma3_text"]


def test_load_prompt_enhancer_errors(pipe, gemma3, tmp_path):
    with pytest.raises(ConfigError, match="processor="):
        pipe.load_prompt_enhancer(gemma3)
    with pytest.raises(ConfigError, match="no `generate`"):
        pipe.load_prompt_enhancer(torch.nn.Linear(2, 2), processor=object())
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json.*weights.safetensors"):
        pipe.load_prompt_enhancer(tmp_path)
    assert pipe.prompt_enhancer is None


@pytest.mark.parametrize("offload", [False, True])
def test_the_enhancer_visits_the_device_when_offloading(pipe, tokenizer, monkeypatch, offload):
    """On the pipeline's device to generate; back on the CPU afterwards when the pipeline offloads (the
    pipeline's own models parked first)."""
    stub = StubEnhancer(tokenizer, "a cat", "gemma3")
    pipe.load_prompt_enhancer(stub, tokenizer)
    monkeypatch.setattr(pipe, "model_offload", offload)
    parked = []
    monkeypatch.setattr(pipe, "load_models_to_device", lambda slots: parked.append(list(slots)))
    assert pipe.enhance_prompts([PROMPT], [None]) == ["a cat"]
    assert stub.moves == ([str(pipe.device), "cpu"] if offload else [str(pipe.device)])
    assert parked == ([[]] if offload else [])
