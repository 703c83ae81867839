"""`--validation_prompts_file`: validation prompts, each with its own size, steps, seed, guidance, negative prompt
and reference pictures, in the sample-prompt format kohya's sd-scripts and musubi-tuner read, so the files their
users already have work here too (the options this engine has a setting for; others are refused by name):

    # a comment
    a photo of sks dog on a beach --w 1024 --h 768 --s 28 --d 42 --l 4.0 --n blurry, low quality
    sks dog in the snow --i refs/dog.png

The format and its parser live in `diffsynth.runtime.prompt_lines` (`diffsynth generate --prompts-file` reads the
same files); this module keeps the trainer's import path. An option not given takes the `--validation_*` setting or
the pipeline's default. The file is read when the settings are checked, so a bad line fails before any model
loads, naming file, line and option.
"""

from diffsynth.runtime.prompt_lines import OPTIONS, SamplePrompt, parse_line, read_prompts_file

__all__ = ["OPTIONS", "SamplePrompt", "parse_line", "read_prompts_file"]
