"""kohya's caption augmentations for tag-style captions ("1girl, red hair, smiling, outdoors").

`--shuffle_caption` shuffles a caption's comma-separated tags each time its row is drawn; `--keep_tokens N` keeps
the first N in front, in order; `--keep_tokens_separator S` keeps what a caption holds before S instead (S removed);
`--caption_tag_dropout p` drops each shuffled tag with chance p; a second S keeps what follows it fixed at the end
(kohya's `fixed ||| shuffled ||| fixed ending`). The `--trigger_word` (its words, in a tag of their own or within
one) is always kept, in front.
The draws come from the micro-batch's generator (trainer.py), so reruns, resumes and DDP draw alike.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

TAG_SEPARATOR = ", "


def tags(text: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones left out."""
    return [t.strip() for t in text.split(",") if t.strip()]


def augment_caption(
    caption: str,
    generator: torch.Generator,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    separator: str | None = None,
    dropout: float = 0.0,
    trigger: str | None = None,
) -> str:
    """`caption`'s tags with the kept ones first, in order (the part before `separator` where the caption holds it,
    else the first `keep_tokens`, and any tag holding `trigger`), then the others shuffled (`shuffle`), each
    dropped with chance `dropout`; joined with ", "."""
    ending: list[str] = []
    if separator and separator in caption:  # kohya's "fixed ||| shuffled ||| fixed ending"
        head, rest = caption.split(separator, 1)
        if separator in rest:
            rest, tail = rest.split(separator, 1)
            ending = tags(tail.replace(separator, ","))
        kept, free = tags(head), tags(rest)
    else:
        free = tags(caption)
        kept, free = free[:keep_tokens], free[keep_tokens:]
    if trigger:  # never dropped nor moved back: in front, or after the kept tags when they hold it already
        holds = _holds(trigger)
        pinned = [t for t in free if holds(t)]
        free = [t for t in free if not holds(t)]
        kept = kept + pinned if any(holds(t) for t in kept + ending) else pinned + kept
    if shuffle:
        free = [free[i] for i in torch.randperm(len(free), generator=generator).tolist()]
    if dropout:
        draws = torch.rand(len(free), generator=generator).tolist()
        free = [t for t, u in zip(free, draws, strict=True) if u >= dropout]
    return TAG_SEPARATOR.join(kept + free + ending)


def _holds(trigger: str):
    """Whether a tag holds the trigger word: one of its comma-separated parts as whole words (`cat` is in
    `a cat, sitting` and `photo of cat`, not in `catwalk`)."""
    parts = tags(trigger)
    return lambda tag: any(holds_word(tag, part) for part in parts)


def holds_word(text: str, word: str) -> bool:
    """Whether `text` holds `word` as whole words (`TOK` is in `TOK, a street`, not in `a street in TOKYO`)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def augments_captions(cfg: TrainConfig) -> bool:
    """Whether any of the flags rewrites the captions (`--keep_tokens` alone does not)."""
    return cfg.shuffle_caption or cfg.caption_tag_dropout > 0 or bool(cfg.keep_tokens_separator)


def augment_rows(cfg: TrainConfig, items: list[dict[str, Any]], generator: torch.Generator) -> list[dict[str, Any]]:
    """The micro-batch's rows with their prompts through `augment_caption`, drawn one row after the other from
    `generator`; rows without a text prompt are left as they are."""
    if not augments_captions(cfg):
        return items
    options = dict(
        shuffle=cfg.shuffle_caption,
        keep_tokens=cfg.keep_tokens,
        separator=cfg.keep_tokens_separator or None,
        dropout=cfg.caption_tag_dropout,
        trigger=cfg.trigger_word or None,
    )
    return [
        {**item, "prompt": augment_caption(item["prompt"], generator, **options)}
        if isinstance(item.get("prompt"), str)
        else item
        for item in items
    ]
