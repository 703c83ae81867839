"""Kohya's sample-prompt lines (`diffsynth.runtime.prompt_lines`): each option as the pipeline's setting, comments and
blank lines skipped, every bad line named in the caller's words (the trainer's `FILE line N`, the CLI's
`FILE, line N`)."""

import pytest
from PIL import Image

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.prompt_lines import OPTIONS, SamplePrompt, parse_line, read_prompts_file


def write_prompts(folder, *lines) -> str:
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_line_gives_the_pipeline_settings(tmp_path):
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "refs" / "a.png")
    line = parse_line(
        "a photo of sks dog, on a beach --w 1024 --h 768 --s 28 --d 42 --l 4.5 --n blurry, low quality --f 33 "
        "--g 3.5 --ss unipc --i refs/a.png --i refs/a.png",
        tmp_path,
        "here",
    )
    assert line.prompt == "a photo of sks dog, on a beach" and line.seed == 42 and line.where == "here"
    assert line.options == dict(
        width=1024, height=768, num_inference_steps=28, cfg_scale=4.5, negative_prompt="blurry, low quality",
        num_frames=33, embedded_guidance=3.5, sampler="unipc",
    )  # fmt: skip
    assert line.images == (tmp_path / "refs" / "a.png",) * 2  # --i repeats; relative to the file's folder
    assert {name for name, _, _ in OPTIONS.values()} - set(line.options) == {"seed", "images"}  # every option read


def test_a_line_without_options_is_all_prompt(tmp_path):
    for text in ("a red circle", "dashes -- and --not-options stay", "a --3d render"):
        assert parse_line(text, tmp_path, "here") == SamplePrompt(text, where="here")


def test_a_byte_order_mark_is_not_read_into_the_first_prompt(tmp_path):
    """Windows Notepad starts a UTF-8 file with a byte-order mark: it is not part of the first line's prompt."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle --w 64\na blue square\n".encode("utf-8-sig"))
    first, second = read_prompts_file(path)
    assert (first.prompt, first.options, second.prompt) == ("a red circle", {"width": 64}, "a blue square")


def test_the_file_skips_comments_and_blank_lines_and_names_lines_as_the_caller_does(tmp_path):
    path = write_prompts(tmp_path, "# my prompts", "", "a cat --s 4", "  ", "a dog")
    assert read_prompts_file(path) == [
        SamplePrompt("a cat", {"num_inference_steps": 4}, where=f"--validation_prompts_file {path} line 3"),
        SamplePrompt("a dog", {}, where=f"--validation_prompts_file {path} line 5"),
    ]
    lines = read_prompts_file(path, flag="--prompts-file", at="{file}, line {number}")
    assert [line.where for line in lines] == [f"--prompts-file {path}, line 3", f"--prompts-file {path}, line 5"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --x 3", "line 2: unknown option --x; the options are --w, --h"),
        ("a cat --w wide", "line 2: --w 'wide': width must be an integer"),
        ("a cat --l high", "line 2: --l 'high': cfg_scale must be a number"),
        ("a cat --s 0", "line 2: --s 0: num_inference_steps must be at least 1"),
        ("a cat --d -1", "line 2: --d -1: seed must be at least 0"),
        ("a cat --w 512 --w 768", "line 2: --w is given twice"),
        ("a cat --n", "line 2: --n \\(negative_prompt\\) has no value"),
        ("--w 512", "line 2: no prompt before the options"),
        ("a cat --i nowhere.png", "line 2: --i nowhere.png: no such file"),
        ("a cat --ss euler_a", "line 2: --ss 'euler_a': the samplers are euler, unipc"),
        ("a cat --W 512 --w 768", "line 2: --w is given twice"),  # kohya's keys in either case
    ],
)
def test_bad_lines_are_named(tmp_path, line, message):
    path = write_prompts(tmp_path, "a fine line", line)
    with pytest.raises(ConfigError, match=f"^--prompts-file {path}, {message}"):
        read_prompts_file(path, flag="--prompts-file", at="{file}, line {number}")
    with pytest.raises(ConfigError, match=f"^--validation_prompts_file {path} {message}"):
        read_prompts_file(path)


def test_an_empty_or_unreadable_file_is_named_with_the_callers_flag(tmp_path):
    with pytest.raises(ConfigError, match="^--prompts-file .*prompts.txt: no prompts"):
        read_prompts_file(write_prompts(tmp_path, "# nothing", ""), flag="--prompts-file")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="^--validation_prompts_file .*latin1.txt: cannot be read"):
        read_prompts_file(tmp_path / "latin1.txt")


def test_keys_in_upper_case_are_read_as_kohya_reads_them(tmp_path):
    line = parse_line("a dog --W 1024 --H 768 --S 28 --D 3", tmp_path, "here")
    assert (line.prompt, line.seed) == ("a dog", 3)
    assert line.options == {"width": 1024, "height": 768, "num_inference_steps": 28}
