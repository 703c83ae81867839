"""Prompt files in the sample-prompt format of kohya's sd-scripts and musubi-tuner, read by the trainer
(`--validation_prompts_file`) and by `diffsynth generate --prompts-file x.txt`, so one list of prompts works in both:

    # a comment
    a photo of sks dog on a beach --w 1024 --h 768 --s 28 --d 42 --l 4.0 --n blurry, low quality
    sks dog in the snow --i refs/dog.png

One prompt a line (blank lines and lines starting with # are skipped); after it, options ` --KEY VALUE`: `w` / `h`
the width / height, `s` the steps, `d` the seed, `l` the CFG scale, `n` the negative prompt (the rest up to the
next option, commas included), `f` the frames of a video family, `g` the distilled guidance of the FLUX models
(their `embedded_guidance`), `ss` the sampler (`euler` or `unipc`, where the pipeline offers one), `i` a reference
picture (repeatable; a path relative to the file's folder); keys in either case. A line without options is all
prompt. Each caller decides what
an option not given takes (its flags, the pipeline's default) and which options its pipeline has a setting for.
A bad line is a `ConfigError` naming file, line and option, in the caller's words (`read_prompts_file`'s `flag`
and `at`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# kohya's keys: (the pipeline's keyword, the value's type, its least value)
OPTIONS: dict[str, tuple[str, type, float | None]] = {
    "w": ("width", int, 1),
    "h": ("height", int, 1),
    "s": ("num_inference_steps", int, 1),
    "d": ("seed", int, 0),
    "l": ("cfg_scale", float, None),
    "n": ("negative_prompt", str, None),
    "f": ("num_frames", int, 1),
    "g": ("embedded_guidance", float, None),
    "ss": ("sampler", str, None),
    "i": ("images", str, None),
}
SAMPLERS = ("euler", "unipc")  # the samplers the pipelines offer (`--ss`, and the CLI's --sampler)
_OPTION = re.compile(r"\s--([a-zA-Z]+)(?=\s|$)")  # kohya reads the keys in either case (--W 1024)


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the file: the prompt, the pipeline keywords it sets, its seed and its reference pictures."""

    prompt: str
    options: dict[str, Any] = field(default_factory=dict)  # width, height, num_inference_steps, cfg_scale, ...
    seed: int | None = None
    images: tuple[Path, ...] = ()
    where: str = ""  # "FILE line N", for messages


def read_prompts_file(
    path: str | Path, flag: str = "--validation_prompts_file", at: str = "{file} line {number}"
) -> list[SamplePrompt]:
    """The prompts of `path`, each line parsed (see the module docstring). Messages about the file start with
    `{flag} {path}`, those about a line with `at` filled in (`file`: `{flag} {path}`, `number`: the line's), so each
    caller keeps its own style (the trainer's `... line 3`, the CLI's `..., line 3`)."""
    path = Path(path)
    file = f"{flag} {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")  # without the byte-order mark of Notepad
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file}: cannot be read ({error})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_line(line, path.parent, at.format(file=file, number=number)))
    if not prompts:
        raise ConfigError(f"{file}: no prompts (one a line; # starts a comment)")
    return prompts


def parse_line(line: str, folder: Path, where: str) -> SamplePrompt:
    """One prompt line: the text up to the first ` --KEY`, then each option's value up to the next one; `--i`
    paths are read against `folder`; `where` starts each message."""
    marks = list(_OPTION.finditer(" " + line))
    prompt = (" " + line)[: marks[0].start()].strip() if marks else line
    if not prompt:
        raise ConfigError(f"{where}: no prompt before the options")
    options: dict[str, Any] = {}
    seed, images, seen = None, [], set()
    for k, mark in enumerate(marks):
        key = mark.group(1).lower()
        end = marks[k + 1].start() if k + 1 < len(marks) else len(line) + 1
        raw = (" " + line)[mark.end() : end].strip()
        if key not in OPTIONS:
            known = ", ".join(f"--{k}" for k in OPTIONS)
            raise ConfigError(f"{where}: unknown option --{key}; the options are {known}")
        name, kind, least = OPTIONS[key]
        if not raw:
            raise ConfigError(f"{where}: --{key} ({name}) has no value")
        if key != "i" and key in seen:
            raise ConfigError(f"{where}: --{key} is given twice")
        seen.add(key)
        try:
            value = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{where}: --{key} {raw!r}: {name} must be {what}") from None
        if least is not None and value < least:
            raise ConfigError(f"{where}: --{key} {value}: {name} must be at least {least}")
        if key == "ss" and value not in SAMPLERS:
            raise ConfigError(f"{where}: --ss {value!r}: the samplers are {', '.join(SAMPLERS)}")
        if key == "i":
            image = folder / raw
            if not image.is_file():
                raise ConfigError(f"{where}: --i {raw}: no such file {image}")
            images.append(image)
        elif key == "d":
            seed = value
        else:
            options[name] = value
    return SamplePrompt(prompt, options, seed, tuple(images), where)


__all__ = ["OPTIONS", "SAMPLERS", "SamplePrompt", "parse_line", "read_prompts_file"]
