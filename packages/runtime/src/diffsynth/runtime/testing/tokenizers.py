"""Tiny tokenizers built offline, so pipeline tests never download one.

`build_tiny_qwen_tokenizer` trains a byte-level BPE shaped like Qwen's (same normalizer,
pre-tokenizer regex and special tokens) on a few sentences, with a chat template that renders
system/user/assistant messages and the `enable_thinking` switch the way Qwen3's does. Only the
vocabulary is tiny; what the pipelines rely on (chat layout, no BOS, right padding, pad token) is
the real tokenizer's.

`build_tiny_mistral_tokenizer` does the same for Mistral-Small-3.1 (FLUX.2-dev): control tokens first,
BOS added, `[SYSTEM_PROMPT]`/`[INST]` chat layout with list-of-parts message content.

`build_tiny_gemma_tokenizer` does the same for Gemma 3 (LTX-2): `<pad>`/`<eos>`/`<bos>` at ids 0/1/2,
BOS added, spaces as `▁`, left padding, `<start_of_turn>` chat layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen2/Qwen3 pre-tokenization: contractions, letter runs, single digits, punctuation, newlines, spaces.
_QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Our rendering of Qwen3's template for plain messages (no tools): an assistant turn that follows
# the last user message carries its reasoning in a <think> block (empty for the final turn), and
# `enable_thinking=false` pre-fills an empty think block after the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

DEFAULT_CORPUS = (
    "a photo of a cat sitting on a red chair",
    "a painting of a mountain lake at sunset, oil on canvas",
    "a small green square in the top left corner",
    "an astronaut riding a horse on the moon, high quality",
    "close-up portrait of an old man with a white beard",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "user assistant system think",
)


def build_tiny_qwen_tokenizer(directory, texts: list[str] | None = None, vocab_size: int = 300):
    """Train a Qwen-style byte-level BPE of at most `vocab_size` tokens, save it to `directory`, load it back.

    The saved folder loads offline with `transformers.AutoTokenizer.from_pretrained(directory)`.
    Special tokens take the last ids (as in Qwen), `<|endoftext|>` pads, padding is on the right.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab_size < 256 + len(QWEN_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} must be at least {256 + len(QWEN_SPECIAL_TOKENS)} (bytes + specials)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) if texts else list(DEFAULT_CORPUS), trainer=trainer)
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    wrapped.chat_template = QWEN3_CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(directory))
    _write_qwen_config(directory)
    logger.debug("tiny Qwen tokenizer (%d tokens) saved to %s", len(wrapped), directory)
    return AutoTokenizer.from_pretrained(str(directory))


def _write_qwen_config(directory: Path) -> None:
    """Make the folder look like Qwen's: `Qwen2Tokenizer` class, no BOS/UNK, the chat template."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(
        tokenizer_class="Qwen2Tokenizer",
        bos_token=None,
        unk_token=None,
        add_prefix_space=False,
        split_special_tokens=False,
        errors="replace",
    )
    config.pop("backend", None)
    if not (directory / "chat_template.jinja").exists():  # older transformers keep it in the config
        config["chat_template"] = QWEN3_CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))


# Mistral-Small-3.x (Tekken) control tokens take the first ids; the pad token is `<pad>`.
MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "<pad>",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)

# Our rendering of Mistral-Small-3.1's template for text and image messages: the BOS token once, the
# system turn in [SYSTEM_PROMPT] tags, user turns in [INST] tags. Content is a string or a list of
# parts (`{"type": "text", "text": ...}`, an image part becomes `[IMG]`), as the processor passes it.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if m.content is string -%}{%- set ns.text = m.content -%}"
    "{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type == 'text' -%}{%- set ns.text = ns.text + part.text -%}"
    "{%- else -%}{%- set ns.text = ns.text + '[IMG]' -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if m.role == 'system' -%}{{- '[SYSTEM_PROMPT]' + ns.text + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif m.role == 'user' -%}{{- '[INST]' + ns.text + '[/INST]' -}}"
    "{%- else -%}{{- ns.text + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def build_tiny_mistral_tokenizer(
    directory, texts: list[str] | None = None, vocab_size: int = 300, padding_side: str = "left"
):
    """Train a Mistral-style byte-level BPE (BOS added, control tokens first), save it to `directory`, load it back.

    The folder loads offline with `AutoTokenizer.from_pretrained(directory)`. Only the vocabulary is
    tiny; what the FLUX.2-dev prompt encoding relies on (chat layout, one BOS, `<pad>`) is the real
    tokenizer's. `padding_side` is a parameter so tests can cover both sides.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab_size < 256 + len(MISTRAL_SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} must be at least {256 + len(MISTRAL_SPECIAL_TOKENS)} (bytes + specials)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(MISTRAL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) if texts else list(DEFAULT_CORPUS), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    wrapped.chat_template = MISTRAL_CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(directory))
    logger.debug("tiny Mistral tokenizer (%d tokens) saved to %s", len(wrapped), directory)
    return AutoTokenizer.from_pretrained(str(directory))


# Gemma 3 control tokens take the first ids, in the real order: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3.
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")

# Our rendering of Gemma 3's template for text messages: BOS once, each turn in <start_of_turn> tags
# (the assistant's role is `model`), content a string or a list of text parts.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if m.content is string -%}{%- set ns.text = m.content -%}"
    "{%- else -%}{%- for part in m.content -%}{%- if part.type == 'text' -%}"
    "{%- set ns.text = ns.text + part.text -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{- '<start_of_turn>' + role + '\\n' + ns.text + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def build_tiny_gemma_tokenizer(
    directory, texts: list[str] | None = None, vocab_size: int = 300, padding_side: str = "left"
):
    """Train a Gemma-style BPE (spaces as `▁`, BOS added, `<pad>`/`<eos>`/`<bos>` at ids 0/1/2), save it to
    `directory`, load it back.

    The folder loads offline with `AutoTokenizer.from_pretrained(directory)`. Only the vocabulary is tiny;
    what LTX-2's prompt encoding relies on (one BOS, `<pad>` id 0, left padding) is the real tokenizer's.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if vocab_size < 64 + len(GEMMA_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be at least {64 + len(GEMMA_SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Replace("\u2581", " ")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GEMMA_SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(list(texts) if texts else list(DEFAULT_CORPUS), trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    wrapped.chat_template = GEMMA_CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(directory))
    logger.debug("tiny Gemma tokenizer (%d tokens) saved to %s", len(wrapped), directory)
    return AutoTokenizer.from_pretrained(str(directory))
