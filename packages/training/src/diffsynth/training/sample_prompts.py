"""`--validation_prompts_file`: validation prompts, each with its own size, steps, seed, guidance, negative prompt
and reference pictures, in the sample-prompt format kohya's sd-scripts and musubi-tuner read, so the files their
users already have work unchanged:

    # a comment
    a photo of sks dog on a beach --w 1024 --h 768 --s 28 --d 42 --l 4.0 --n blurry, low quality
    sks dog in the snow --i refs/dog.png

One prompt a line (blank lines and lines starting with # are skipped); after it, options ` --KEY VALUE`: `w` / `h`
the width / height, `s` the steps, `d` the seed, `l` the CFG scale, `n` the negative prompt (the rest up to the
next option, commas included), `f` the frames of a video family, `g` the distilled guidance of the FLUX models
(their `embedded_guidance`), `ss` the sampler (e.g. `unipc`, where the pipeline offers one), `i` a reference picture
(repeatable; a path relative to the file's folder). An option not given takes the `--validation_*` setting or the pipeline's default.
The file is read when the settings are checked, so a bad line fails before any model loads, naming file, line and
option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsynth.runtime.errors import ConfigError

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
_OPTION = re.compile(r"\s--([a-z]+)(?=\s|$)")


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the file: the prompt, the pipeline keywords it sets, its seed and its reference pictures."""

    prompt: str
    options: dict[str, Any] = field(default_factory=dict)  # width, height, num_inference_steps, cfg_scale, ...
    seed: int | None = None
    images: tuple[Path, ...] = ()
    where: str = ""  # "FILE line N", for messages


def read_prompts_file(path: str | Path) -> list[SamplePrompt]:
    """The prompts of `path`, each line parsed (see the module docstring); a `ConfigError` names the line at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--validation_prompts_file {path}: cannot be read ({error})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_line(line, path.parent, f"--validation_prompts_file {path} line {number}"))
    if not prompts:
        raise ConfigError(f"--validation_prompts_file {path}: no prompts (one a line; # starts a comment)")
    return prompts


def parse_line(line: str, folder: Path, where: str) -> SamplePrompt:
    """One prompt line: the text up to the first ` --KEY`, then each option's value up to the next one."""
    marks = list(_OPTION.finditer(" " + line))
    prompt = (" " + line)[: marks[0].start()].strip() if marks else line
    if not prompt:
        raise ConfigError(f"{where}: no prompt before the options")
    options: dict[str, Any] = {}
    seed, images, seen = None, [], set()
    for k, mark in enumerate(marks):
        key = mark.group(1)
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


__all__ = ["OPTIONS", "SamplePrompt", "parse_line", "read_prompts_file"]
