"""LTX-2's prompt enhancer: a Gemma chat model rewrites a short prompt into the long, detailed caption style
LTX-2 was trained on, before the prompt is encoded.

LTX-2.0 / 2.3 enhance with their own text encoder, Gemma-3-12B loaded whole (with its LM head), sampling at
temperature 0.7; LTX-2.5's text encoder is not trained for this, so the authors pair it with a separate instruct
model, `google/gemma-4-E2B-it`, decoded greedily with a 5-gram repeat ban. Each has a text-to-video and an
image-to-video system prompt.

The four system prompts below (`GEMMA3_T2V_SYSTEM_PROMPT` ... `GEMMA4_I2V_SYSTEM_PROMPT`) are our own: they ask
for the same kind of caption as the authors' (one plain-English paragraph, present tense and chronological, the
subjects, setting, light and framing, an integrated soundscape, nothing the user asked for dropped), but they are
not the authors' text, so the same seed gives a different caption than ltx-core or diffusers do. The authors'
prompts ship with ltx-core, in `ltx_core/text_encoders/gemma/encoders/prompts/` (`gemma3_t2v_system_prompt.txt`,
`gemma3_i2v_system_prompt.txt`, `gemma4_t2v_system_prompt.txt`, `gemma4_i2v_system_prompt.txt`): pass one as
`enhance_prompt(..., system_prompt_file="path/to/gemma3_t2v_system_prompt.txt")` (read as ltx-core reads it, whole)
to reproduce their captions byte for byte; `system_prompt=` takes the text itself.

`enhance_prompt` takes any loaded transformers generative model with its processor (or tokenizer, text only) and
runs the authors' chat: the layout of ltx-core's `enhance_t2v` / `enhance_i2v`, left padding to a multiple of 8
tokens, a seeded `generate` that leaves the global RNG as it was, the generated tokens decoded without the prompt or
special tokens, curly quotes and dashes made plain and anything before the first letter dropped. The recipe (token
budget, decoding, system prompts) follows the model's `model_type`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig

# ---------------------------------------------------------------------------------------- our system prompts
# LTX-2.0 / 2.3 (Gemma 3): no camera motion unless the user asks for it.
GEMMA3_T2V_SYSTEM_PROMPT = """\
You turn short video ideas into full scene descriptions for a text-to-video model that makes picture and sound \
together. Read the user's idea and write what the finished clip shows and sounds like, from its first moment to \
its last.

Cover these, woven into the prose:
1. Subjects: who or what is there, with concrete looks (age range, build, hair, clothing, colours, materials). \
Add no people or animals the user did not ask for.
2. Place and light: the setting, time of day, weather, surfaces and light sources, in plain words, not dramatic ones.
3. Action: what moves and how, in the present tense, one event after another, linked with words such as "as", \
"then" and "while". When the user names no action, give the subjects small, natural movements.
4. Framing: the shot size (wide, medium, close-up). Mention camera movement only when the user asks for it; never \
invent one.
5. Sound: ambience, effects and music, each placed at the moment it is heard. Write speech only when the user asks \
for talking, singing or dialogue: then quote the exact words and say how they are spoken. Keep any words the user \
wrote for a character as they are.
6. Look: when the user names a style (animation, film noir, home video), say so at the start.

Keep every element of the user's idea. Describe only what can be seen or heard. No time codes, cuts or scene \
changes unless asked for. An idea that is already a full description needs light edits only, such as adding sound.

Answer with one paragraph of plain English prose and nothing else: no title, heading, list, markdown or remark to \
the user, and no questions. If the request is unsafe or not a video idea, answer with the user's text unchanged.
"""

GEMMA3_I2V_SYSTEM_PROMPT = """\
You write the motion for an image-to-video model. You are shown the first frame of a clip and a short request; \
the model will bring that frame to life, with sound.

The frame already settles who is there, what they wear, the place, the light and the style. Do not describe any \
of that again: a description that disagrees with the frame can make the model cut away from it. Write what \
happens next, starting from the frame.

Cover these, woven into the prose:
1. The action the user asks for, as it unfolds: present tense, in order, linked with words such as "as", "then" \
and "while". With no action requested, give the subjects small, natural movements that fit the frame.
2. What enters, leaves or changes, described concretely. If the request conflicts with the frame, show the change \
from the frame to what was asked.
3. The camera: only the movement the user asks for; add none of your own.
4. Sound as it happens: ambience, effects and music, matching the pace of the action. Write speech only when the \
user asks for talking, singing or conversation: quote the exact words and say who speaks and how. Keep any words \
the user wrote as they are; if speech is asked for without words, write fitting lines.

Report what is seen and heard, not feelings or intentions. No time codes or cuts unless asked for. Keep the \
wording calm and plain.

Answer with one short paragraph of plain English prose and nothing else: no title, heading, list, markdown or \
remark to the user, and no questions. If the request is unsafe or not a video idea, answer with the user's text \
unchanged.
"""

# LTX-2.5 (gemma-4-E2B-it): the shot, the viewpoint and the camera are always stated.
GEMMA4_T2V_SYSTEM_PROMPT = """\
Rewrite a short text-to-video request as the kind of long caption the video model was trained on. The clip will \
be judged against the original request, so everything the user asked for must be in the caption, with its meaning \
unchanged.

Write one continuous paragraph of about 150 to 220 words, in the present tense, following the clip from start to \
end ("at first", "next", "meanwhile"). Open straight on the subject or the action, never with "The video shows" \
or the like.

Work all of this into the prose:
- Who and what is there. For people, visible traits only (apparent age group, gender presentation, skin tone, \
hair, build, clothing, accessories), never ethnicity, religion or nationality; keep several people distinguishable.
- Where: the setting, materials, colours, textures, light sources, and where things are relative to each other.
- Motion: every action kept going, observed rather than interpreted (a frown, not sadness).
- The camera, always: one shot size (extreme wide, wide, medium, medium close-up, close-up or extreme close-up), \
the viewpoint (front, side, behind, over the shoulder, high, low, top-down) and the camera movement, or that the \
camera holds still. Use the user's camera when given, else the one that shows the scene best. Say it in \
sentences, not as labels.
- Sound: ambience, effects, music and its mood, voices and their tone. Quote dialogue exactly, in the language it \
is spoken in, and only when the user asks for speech.
- The look: the scene at its most striking (cinematic colour, natural light, fine detail, depth), adding no \
objects or actions.

A request in another language gets an English caption. Answer with the caption only: no headings, lists, labels \
such as "Audio:", markdown, JSON or preamble. If the request is unsafe, answer with the user's text unchanged.
"""

GEMMA4_I2V_SYSTEM_PROMPT = """\
You are shown the first frame of a video and a short image-to-video request. Write the long caption, in the \
style the video model was trained on, of the clip that starts on exactly this frame and does what the user asks. \
The clip will be judged against the original request: keep everything it asks for.

The frame is given, so do not describe what it already shows: name its subjects and place only as far as needed \
to say who does what, never contradict it, and add nothing it could not contain. Spend the caption on what \
changes: the requested action as it unfolds, what moves, enters, leaves or changes, in the present tense and in \
order ("at first", "then", "meanwhile"). One continuous take, no cuts.

Work all of this into the prose:
- People by visible traits only (apparent age group, gender presentation, hair, clothing), never ethnicity, \
religion or nationality; keep several people distinguishable.
- Motion observed rather than interpreted (a frown, not sadness).
- The camera, always: the shot size and viewpoint the frame opens with, and the camera movement, or that the \
camera holds still. Use the user's camera when given, else the movement that shows the action best. Say it in \
sentences, not as labels.
- Sound: ambience, effects, music and its mood, voices and their tone. Quote dialogue exactly, in the language it \
is spoken in, and only when the user asks for speech.
- The look: the clip at its most striking (cinematic colour, natural light, fine detail), adding no objects or \
actions.

Write one paragraph of about 150 to 220 words of plain English (a request in another language gets an English \
caption). Answer with the caption only: no headings, lists, labels, markdown, JSON or preamble. If the request \
is unsafe, answer with the user's text unchanged.
"""

IMAGE_LONG_SIDE = 896  # the reference frame's long side, in pixels, as the enhancer sees it
ALIGNMENT = 8  # prompts are left-padded to a multiple of this many tokens (flash-attention friendly lengths)
DEFAULT_SEED = 10  # ltx-core's and diffusers' default; ltx-pipelines' CLIs pass the generation seed instead


@dataclass(frozen=True)
class EnhancerRecipe:
    """How one enhancer model is run: its system prompts (ours), and the authors' token budget and `generate`
    settings."""

    t2v_system_prompt: str
    i2v_system_prompt: str
    max_new_tokens: int
    generation_kwargs: Mapping[str, Any] = field(default_factory=dict)


GEMMA3_RECIPE = EnhancerRecipe(  # LTX-2.0 / 2.3: the text encoder enhances its own prompts, sampling
    GEMMA3_T2V_SYSTEM_PROMPT, GEMMA3_I2V_SYSTEM_PROMPT, 512, {"do_sample": True, "temperature": 0.7}
)
GEMMA4_RECIPE = EnhancerRecipe(  # LTX-2.5: gemma-4-E2B-it, greedy with no 5-gram said twice
    GEMMA4_T2V_SYSTEM_PROMPT, GEMMA4_I2V_SYSTEM_PROMPT, 600, {"do_sample": False, "no_repeat_ngram_size": 5}
)
# by the enhancer's `config.model_type` (the `_text` types: the same language model loaded without its vision tower)
RECIPES = {"gemma3": GEMMA3_RECIPE, "gemma3_text": GEMMA3_RECIPE, "gemma4": GEMMA4_RECIPE, "gemma4_text": GEMMA4_RECIPE}


def enhancer_recipe(model) -> EnhancerRecipe:
    """The recipe for `model`, by its `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in RECIPES:
        return RECIPES[model_type]
    hint = (
        ": LTX-2.5's text encoder is not trained to write prompts; enhance with `google/gemma-4-E2B-it`"
        if model_type and model_type.startswith("gemma4")
        else ""
    )
    raise ConfigError(
        f"no prompt-enhancement recipe for a model of model_type={model_type!r} (known: {sorted(RECIPES)}){hint}; "
        "pass `recipe=` to use it anyway"
    )


_PLAIN_PUNCTUATION = str.maketrans("\u2018\u2019\u201c\u201d\u2014\u2013\u00a0\u2032\u2212", "''\"\"-- '-")


def clean_response(text: str) -> str:
    """The enhancer's answer as a prompt: typographic quotes, dashes, primes and no-break spaces made plain, and
    whatever precedes the first letter (Gemma likes to open with quotes, bullets or asterisks) dropped."""
    text = text.translate(_PLAIN_PUNCTUATION)
    start = next((i for i, char in enumerate(text) if char.isalpha()), 0)
    return text[start:]


def read_system_prompt(path: str | os.PathLike) -> str:
    """The system prompt in the text file at `path`, whole (as ltx-core reads its prompt files)."""
    file = Path(path)
    if not file.is_file():
        from diffsynth.runtime.checkpoint import folder_listing

        raise ConfigError(
            f"system_prompt_file: {file} is not a file; {folder_listing(file.parent)} (ltx-core keeps the authors' "
            "prompts in ltx_core/text_encoders/gemma/encoders/prompts/)"
        )
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"system_prompt_file: {file} is empty; give a file holding the system prompt's text")
    return text


def enhancer_messages(prompt: str, system_prompt: str, with_image: bool = False) -> list[dict]:
    """The chat the enhancer answers: the system prompt, then the user's prompt, labelled as ltx-core labels it
    (the image-to-video turn puts the image first and ends the prompt with a full stop)."""
    if not with_image:
        user: Any = f"user prompt: {prompt}"
    else:
        user = [{"type": "image"}, {"type": "text", "text": f"User Raw Input Prompt: {prompt}."}]
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def resize_for_enhancer(image, long_side: int = IMAGE_LONG_SIDE):
    """`image` (a PIL image) in RGB with its long side scaled to `long_side` (bicubic, aspect kept)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ConfigError(f"image: the prompt enhancer takes a PIL image (the first frame), got {type(image).__name__}")
    image = image.convert("RGB")
    scale = long_side / max(image.size)
    size = (int(image.width * scale), int(image.height * scale))
    return image if size == image.size else image.resize(size, resample=Image.Resampling.BICUBIC)


def _left_pad(inputs, pad_token_id: int, multiple: int = ALIGNMENT):
    """Prepend padding so the prompt is a whole number of `multiple` tokens (masked out; left, so that generation
    still continues from the last real token)."""
    extra = -inputs["input_ids"].shape[1] % multiple
    if not extra:
        return inputs
    for name, value in (("input_ids", pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
        tensor = inputs.get(name)
        if tensor is not None:
            pad = tensor.new_full((tensor.shape[0], extra), value)
            inputs[name] = torch.cat([pad, tensor], dim=1)
    return inputs


def read_enhancer(source, torch_dtype=None):
    """(model, processor) from a folder or `ModelConfig`, in `torch_dtype`: an image-text-to-text model when the
    folder holds one, else a causal LM; its processor, else its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if isinstance(source, ModelConfig):
        paths = source.resolve()
        folder = paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0])
    else:
        folder = os.fspath(source)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from diffsynth.runtime.checkpoint import folder_listing

        model_id = getattr(source, "model_id", None) or "ORG/NAME"
        raise ConfigError(
            f"load_prompt_enhancer: {folder} is not a whole transformers model folder (no config.json); "
            f"{folder_listing(Path(folder))}. The LTX-2 presets fetch only Gemma's weights and tokenizer: fetch "
            f"the whole repo there, e.g. `hf download {model_id} --local-dir {folder}`"
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype)
    except ValueError:  # a text-only model (e.g. Gemma3ForCausalLM)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        processor = AutoTokenizer.from_pretrained(folder)
    return model.eval().requires_grad_(False), processor


@torch.no_grad()
def enhance_prompt(
    model,
    processor,
    prompt: str | Sequence[str],
    *,
    image=None,
    seed: int = DEFAULT_SEED,
    system_prompt: str | None = None,
    system_prompt_file: str | os.PathLike | None = None,
    max_new_tokens: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    recipe: EnhancerRecipe | None = None,
) -> str | list[str]:
    """`prompt` rewritten by `model` (a transformers model with `generate`: Gemma-3-12B for LTX-2.0/2.3,
    gemma-4-E2B-it for LTX-2.5) in the caption style LTX-2 was trained on; a list gives a list, each prompt its
    own seeded call.

    `processor` is the model's processor, or its tokenizer when there is no `image`. `image` (PIL, the first
    frame) selects the image-to-video system prompt and is shown to the model. `system_prompt` (the text) or
    `system_prompt_file` (a text file, e.g. ltx-core's `gemma3_t2v_system_prompt.txt`), `max_new_tokens` and
    `generation_kwargs` (merged over the recipe's) override the recipe, by default the one for the model's
    `model_type` (`enhancer_recipe`). `seed` seeds the sampling; the global RNG state is restored after.
    """
    if system_prompt_file is not None:
        if system_prompt is not None:
            raise ConfigError(
                "give the system prompt as system_prompt= (text) or system_prompt_file= (a file), not both"
            )
        system_prompt = read_system_prompt(system_prompt_file)
    if not isinstance(prompt, str):
        return [
            enhance_prompt(
                model,
                processor,
                one,
                image=image,
                seed=seed,
                system_prompt=system_prompt,
                max_new_tokens=max_new_tokens,
                generation_kwargs=generation_kwargs,
                recipe=recipe,
            )
            for one in prompt
        ]
    if not prompt.strip():
        raise ConfigError("prompt: the prompt enhancer needs a non-empty prompt to rewrite")
    recipe = recipe or enhancer_recipe(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    if image is not None and tokenizer is processor:
        raise ConfigError(
            "processor: image-to-video prompt enhancement needs the enhancer's processor (it prepares the image), "
            f"got a {type(processor).__name__}"
        )
    if system_prompt is None:
        system_prompt = recipe.i2v_system_prompt if image is not None else recipe.t2v_system_prompt

    chat = tokenizer.apply_chat_template(
        enhancer_messages(prompt, system_prompt, with_image=image is not None),
        tokenize=False,
        add_generation_prompt=True,
    )
    if tokenizer is processor:
        inputs = tokenizer(chat, return_tensors="pt")
    else:
        images = None if image is None else resize_for_enhancer(image)
        inputs = processor(text=chat, images=images, return_tensors="pt")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = _left_pad(inputs, pad_token_id)
    device, dtype = model.device, model.dtype
    inputs = {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
    }

    settings = {"max_new_tokens": recipe.max_new_tokens, **recipe.generation_kwargs, **(generation_kwargs or {})}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        tokens = model.generate(**inputs, **settings)
    answer = tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return clean_response(answer)
