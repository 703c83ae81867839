"""The `diffsynth` command: every command has a working --help, and errors are one clear line."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.runtime.cli import main

COMMANDS = ["generate", "list-models", "inspect", "score", "lora"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"diffsynth {command}" in capsys.readouterr().out


def test_generate_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in [
        "--model",
        "--prompt",
        "--negative-prompt",
        "--height",
        "--width",
        "--steps",
        "--cfg",
        "--seed",
        "--lora",
        "--controlnet",
        "--control-image",
        "--control-mode",
        "--input-video",
        "--first-block-cache",
        "--tea-cache",
        "--tea-cache-model-id",
        "--sequence-parallel",
        "--cfg-parallel",
        "--vram-limit",
        "--device",
        "--dtype",
        "--output",
        "--audio-only",
        "--dub-video",
        "--motion-bucket-id",
        "--animate2-reference-image",
        "--animate2-reference-video",
        "--animate2-prompt-ref",
        "--context-image",
        "--sampler",
        "--positive-only-lora",
    ]:
        assert flag in out


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "diffsynth.runtime.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "generate" in done.stdout


def test_unknown_preset_is_one_clear_error(capsys):
    code = main(["generate", "--model", "Nobody/No-Such-Model", "--prompt", "a cat"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Nobody/No-Such-Model" in err and "Traceback" not in err


def test_default_model_without_its_package_says_what_to_install(monkeypatch, capsys):
    from diffsynth.runtime import registry

    monkeypatch.setattr(registry, "installed_families", lambda: {})
    code = main(["generate", "--prompt", "a red circle on a blue background"])
    err = capsys.readouterr().err
    assert code == 2
    assert "diffsynth-z-image" in err and "--model" in err


def test_disk_is_not_a_compute_device(capsys):
    code = main(["generate", "--model", "Nobody/No-Such-Model", "--prompt", "a cat", "--device", "disk"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--device disk" in err and "cuda or cpu" in err


def test_list_models_runs(capsys):
    assert main(["list-models"]) == 0
    assert "runtime" in capsys.readouterr().out


def test_inspect_unknown_file_names_it(tmp_path, capsys):
    path = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "mystery.safetensors" in out
    assert "parameter" in out


def test_inspect_says_what_a_lora_file_holds(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    g = torch.Generator().manual_seed(0)
    state = {
        "lora_unet_layers_0_attention_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_layers_0_attention_to_q.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(2.0),
        "lora_unet_layers_0_attention_to_k.lokr_w1": torch.randn(2, 2, generator=g),
        "lora_unet_layers_0_attention_to_k.lokr_w2": torch.randn(4, 4, generator=g),
        "lora_te1_text_model_encoder_layers_0_q_proj.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_te1_text_model_encoder_layers_0_q_proj.lora_up.weight": torch.randn(8, 4, generator=g),
    }
    save_file(state, str(path))
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lora"] == {
        "adapter": {"LoRA": 1, "LoKr": 1},
        "targets": 2,
        "ranks": [4],
        "alphas": [2.0],
        "text_encoder_keys_skipped": 2,
    }
    assert "unrecognised" not in info


def test_generate_needs_a_prompt_unless_the_pipeline_runs_its_own_cli(monkeypatch, capsys):
    """`--prompt` is required by every pipeline but those with their own `run_cli` (LTX-2.3 HDR reads embeddings);
    the refusal comes before any model loads."""
    from diffsynth.runtime import cli

    class Plain:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise AssertionError("the prompt is checked before loading")

    class OwnCli(Plain):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def run_cli(self, args):
            return 0 if args.prompt is None and args.input_video == "clip.mp4" else 1

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Plain)
    assert main(["generate", "--model", "x"]) == 2
    assert "--prompt is required: what Plain should make" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: OwnCli)
    assert main(["generate", "--model", "x", "--input-video", "clip.mp4", "--device", "cpu"]) == 0


class Recorder:
    """A picture pipeline that records its calls and draws a picture of its seed (so files tell calls apart)."""

    defaults: dict = {}
    loads = 0
    calls: list = []

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.loads += 1
        return cls()

    def step_caches(self):
        return {}

    def load_lora(self, path, scale=1.0):
        type(self).calls.append({"lora": path, "scale": scale})

    def __call__(self, prompt, seed=None, negative_prompt=None, cfg_scale=None):
        from PIL import Image

        type(self).calls.append({"prompt": prompt, "seed": seed, "negative_prompt": negative_prompt, "cfg": cfg_scale})
        return Image.new("RGB", (8, 8), (seed % 256, 0, 0))


@pytest.fixture
def recorder(monkeypatch):
    from diffsynth.runtime import cli

    Recorder.loads, Recorder.calls = 0, []
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Recorder)
    return Recorder


def test_prompts_file_generates_each_row_with_the_model_loaded_once(recorder, tmp_path):
    from PIL import Image

    rows = tmp_path / "prompts.jsonl"
    text = '{"prompt": "a fox", "seed": 7}\n\n{"prompt": "a cat", "negative_prompt": "blur"}\n'
    rows.write_bytes(text.encode("utf-8-sig"))  # with the byte-order mark Windows editors write first
    out = tmp_path / "out" / "pic.png"
    args = ["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), "--num-images", "2"]
    assert main([*args, "--seed", "3", "--cfg", "4", "--output", str(out)]) == 0
    assert recorder.loads == 1
    assert recorder.calls == [
        {"prompt": "a fox", "seed": 7, "negative_prompt": None, "cfg": 4.0},
        {"prompt": "a fox", "seed": 8, "negative_prompt": None, "cfg": 4.0},
        {"prompt": "a cat", "seed": 3, "negative_prompt": "blur", "cfg": 4.0},
        {"prompt": "a cat", "seed": 4, "negative_prompt": "blur", "cfg": 4.0},
    ]
    listing = [json.loads(line) for line in (tmp_path / "out" / "pic.jsonl").read_text().splitlines()]
    assert [row["file"] for row in listing] == [f"pic_{i:04d}.png" for i in range(4)]
    for row in listing:  # each file is the picture of its row's seed
        assert Image.open(tmp_path / "out" / row["file"]).getpixel((0, 0))[0] == row["seed"]
    record = json.loads(Image.open(tmp_path / "out" / "pic_0002.png").text["parameters"])
    assert record == {
        "model": "x", "prompt": "a cat", "seed": 3, "negative_prompt": "blur", "cfg": 4.0, "width": 8, "height": 8,
    }  # fmt: skip
    assert listing[2] == {"file": "pic_0002.png", **record}  # the listing holds what each PNG carries


def test_png_outputs_carry_what_made_them_unless_told_not_to(recorder, tmp_path):
    from PIL import Image

    args = ["generate", "--model", "x", "--device", "cpu", "--prompt", "a fox", "--seed", "5", "--cfg", "2"]
    assert main([*args, "--lora", "style.safetensors:0.5", "--output", str(tmp_path / "a.png")]) == 0
    record = json.loads(Image.open(tmp_path / "a.png").text["parameters"])
    assert record == {
        "model": "x", "prompt": "a fox", "seed": 5, "cfg": 2.0, "lora": ["style.safetensors:0.5"], "width": 8,
        "height": 8,
    }  # fmt: skip
    assert main([*args, "--no-metadata", "--output", str(tmp_path / "b.png")]) == 0
    assert "parameters" not in Image.open(tmp_path / "b.png").text


def test_text_prompts_file_and_num_images(recorder, tmp_path):
    rows = tmp_path / "prompts.txt"
    rows.write_text("# my prompts\na fox\n\na cat\n")
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), "--output",
                 str(tmp_path / "a.png")]) == 0  # fmt: skip
    assert [(c["prompt"], c["seed"]) for c in recorder.calls] == [("a fox", 0), ("a cat", 0)]
    recorder.calls.clear()
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompt", "a owl", "--num-images", "3",
                 "--seed", "10", "--output", str(tmp_path / "b.png")]) == 0  # fmt: skip
    assert [c["seed"] for c in recorder.calls] == [10, 11, 12]
    assert sorted(p.name for p in tmp_path.glob("b_*.png")) == ["b_0000.png", "b_0001.png", "b_0002.png"]


def test_an_upper_case_jsonl_prompts_file_is_read_as_rows(recorder, tmp_path):
    """`prompts.JSONL` (as Windows tools name files) was read as a kohya text file: each row its literal prompt."""
    rows = tmp_path / "prompts.JSONL"
    rows.write_text('{"prompt": "a fox", "seed": 7}\n')
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), "--output",
                 str(tmp_path / "a.png")]) == 0  # fmt: skip
    assert [(c["prompt"], c["seed"]) for c in recorder.calls] == [("a fox", 7)]


def test_a_null_seed_in_a_row_counts_on_from_the_seed_flag(recorder, tmp_path):
    """`"seed": null` is no seed of the row's own, as a null negative_prompt is none: it was a bare TypeError."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a fox", "seed": null, "negative_prompt": null}\n{"prompt": "a cat", "seed": 7}\n')
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), "--seed", "3",
                 "--num-images", "2", "--output", str(tmp_path / "a.png")]) == 0  # fmt: skip
    assert [(c["prompt"], c["seed"]) for c in recorder.calls] == [
        ("a fox", 3),
        ("a fox", 4),
        ("a cat", 7),
        ("a cat", 8),
    ]


def test_a_seed_run_past_64_bits_is_named_with_its_row(recorder, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "seed": 18446744073709551615}\n')
    args = ["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), "--output",
            str(tmp_path / "a.png")]  # fmt: skip
    assert main([*args, "--num-images", "2"]) == 2
    assert "line 1: with --num-images 2, seed 18446744073709551615 reaches 18446744073709551616: outside" in (
        capsys.readouterr().err
    )
    assert recorder.loads == 0
    assert main(args) == 0 and [c["seed"] for c in recorder.calls] == [2**64 - 1]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ('{"prompt": "a", "sampler": 3}\n', [], r"line 1: unknown keys \['sampler'\]"),
        ('{"seed": 3}\n', [], "line 1: no prompt"),
        ("{oops\n", [], "line 1: not JSON"),
        ("\n\n", [], "holds no prompts"),
        ('{"prompt": "a"}\n', ["--prompt", "b"], "--prompt and --prompts-file both give the prompt"),
        ('{"prompt": "a"}\n', ["--audio-only"], "--audio-only makes one output"),
    ],
)
def test_bad_prompts_files_are_named_before_loading(recorder, tmp_path, capsys, content, extra, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(content)
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert recorder.loads == 0


def test_animate2_and_speed_flags_reach_the_pipeline(monkeypatch, tmp_path):
    """`--animate2-*` and `--motion-bucket-id` are passed under the pipeline's argument names."""
    from PIL import Image

    from diffsynth.runtime import cli

    seen = {}

    class Video:
        defaults: dict = {}

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def step_caches(self):
            return {}

        def __call__(self, prompt, seed=None, num_frames=None, motion_bucket_id=None, animate2_reference_image=None,
                     animate2_reference_video=None, animate2_prompt_ref=None):  # fmt: skip
            seen.update(motion_bucket_id=motion_bucket_id, image=animate2_reference_image)
            seen.update(video=animate2_reference_video, prompt_ref=animate2_prompt_ref)
            return [Image.new("RGB", (16, 16))] * 5

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Video)
    args = ["generate", "--model", "x", "--prompt", "a dancer", "--device", "cpu", "--motion-bucket-id", "30"]
    args += ["--animate2-reference-image", "me.png", "--animate2-reference-video", "moves.mp4"]
    args += ["--animate2-prompt-ref", "a person dances", "--output", str(tmp_path / "out.mp4")]
    assert main(args) == 0 and (tmp_path / "out.mp4").exists()
    assert seen == {"motion_bucket_id": 30.0, "image": "me.png", "video": "moves.mp4", "prompt_ref": "a person dances"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "out.xyz"], r"--output out.xyz: .xyz is not a type diffsynth writes; use .png"),
        (["--output", "noext"], "--output noext: no file extension is not a type"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--width", "-64"], "--width -64 must be >= 1"),
        (["--fps", "0"], "--fps 0 must be >= 1"),
        # a picture pipeline writes pictures: an --output it cannot write is refused before it loads
        (["--output", "out.mp4"], r"--output out.mp4: Recorder \(model 'x'\) writes images: use .png, .jpg"),
        (["--output", "sound.wav"], r"--output sound.wav: Recorder \(model 'x'\) writes images"),
        (["--output", "lora.safetensors"], r"--output lora.safetensors: Recorder \(model 'x'\) writes images"),
        # numbers that are not finite, in every float flag and a LoRA's scale
        (["--cfg", "nan"], "--cfg nan must be a finite number"),
        (["--cfg=-inf"], "--cfg -inf must be a finite number"),
        (["--vram-limit", "inf"], "--vram-limit inf must be a finite number"),
        (["--first-block-cache", "nan"], "--first-block-cache nan must be a finite number"),
        (["--value-controller-inputs", "0.5", "nan"], "--value-controller-inputs nan must be a finite number"),
        (["--input-image", "a.png", "--denoising-strength", "nan"], "--denoising-strength nan must be a finite"),
        (["--lora", "style.safetensors:nan"], "--lora style.safetensors:nan: the scale nan must be a finite number"),
        (["--control-image", "depth.png:inf"], "--control-image depth.png:inf: the scale inf must be a finite"),
        # the dtypes the models run in
        (["--dtype", "float8_e4m3fn"], r"--dtype float8_e4m3fn: the models run in bfloat16, float16, float32"),
        (["--dtype", "int8"], "--dtype int8: the models run in bfloat16, float16, float32"),
        # settings this generation has no use for
        (["--denoising-strength", "0.3"], "--denoising-strength is how far image-to-image moves from --input-image"),
        (["--fps", "5"], r"--fps is not used by Recorder \(model 'x'\): it writes images"),
        (["--num-frames", "9"], r"--num-frames is not used by Recorder \(model 'x'\): it writes images"),
        (["--lora-image", "a.png"], r"--lora-image is for image-to-LoRA presets \(e.g. Qwen-Image-i2L\), not Recorder"),
        (["--audio-only", "--height", "64"], r"--height is not used with --audio-only, which makes sound alone"),
        (["--audio-only", "--input-image", "a.png"], r"--input-image is not used with --audio-only"),
        # seeds torch.Generator cannot take (a bare "Overflow when unpacking long long" when the noise was drawn)
        (["--seed", "18446744073709551616"], r"--seed 18446744073709551616: outside the seeds torch accepts, -2\*\*63"),
        (
            ["--seed", "18446744073709551615", "--num-images", "2"],
            r"--num-images 2 reaches seed 18446744073709551616: o",
        ),
    ],
)
def test_bad_generation_settings_are_named_before_loading(recorder, capsys, extra, message):
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompt", "a fox", *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert recorder.loads == 0


def test_a_gpu_this_torch_cannot_see_is_named_before_loading(recorder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", "x", "--device", "cuda", "--prompt", "a fox"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch" in err and "sees no CUDA GPU here" in err and "--device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["generate", "--model", "x", "--device", "cuda:2", "--prompt", "a fox"]) == 2
    assert "this machine has 2 CUDA GPU(s), cuda:0 to cuda:1" in capsys.readouterr().err
    assert recorder.loads == 0


def test_output_short_flag_and_webp_pictures(recorder, tmp_path):
    from PIL import Image

    assert (
        main(["generate", "--model", "x", "--device", "cpu", "--prompt", "a fox", "-o", str(tmp_path / "a.webp")]) == 0
    )
    with Image.open(tmp_path / "a.webp") as picture:
        assert picture.format == "WEBP"


def test_a_misspelt_preset_gets_suggestions(capsys):
    from diffsynth.runtime.errors import ConfigError
    from diffsynth.runtime.registry import find_preset, installed_families

    names = [key for family in installed_families().values() for key in family.presets]
    if not names:
        pytest.skip("no family installed: no presets to suggest")
    wanted = names[0]
    misspelt = wanted.rsplit("/", 1)[-1].lower().replace("-", "")[:-1]  # "Org/Z-Image-Turbo" -> "zimageturb"
    with pytest.raises(ConfigError, match=f"did you mean .*{re.escape(repr(wanted))}"):
        find_preset(misspelt)


class SizedRecorder(Recorder):
    """`Recorder` that also takes sizes and steps, as picture pipelines do, and draws at the size asked rounded
    down to a multiple of 16 (by default 16 x 16), as the pipelines round it."""

    def __call__(self, prompt, seed=None, negative_prompt=None, cfg_scale=None, height=None, width=None,
                 num_inference_steps=None):  # fmt: skip
        from PIL import Image

        type(self).calls.append(
            {"prompt": prompt, "seed": seed, "cfg": cfg_scale, "size": (width, height), "steps": num_inference_steps}
        )
        return Image.new("RGB", ((width or 16) // 16 * 16, (height or 16) // 16 * 16), (seed % 256, 0, 0))


def test_prompts_file_rows_carry_their_own_sizes_steps_and_guidance(monkeypatch, tmp_path):
    from PIL import Image

    from diffsynth.runtime import cli

    SizedRecorder.loads, SizedRecorder.calls = 0, []
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: SizedRecorder)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "a wide fox", "width": 96, "height": 48, "steps": 3, "cfg": 2.5}\n{"prompt": "a plain cat"}\n'
    )
    out = tmp_path / "o.png"
    args = ["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows), "--steps", "7"]
    assert main([*args, "--width", "64", "--output", str(out)]) == 0
    assert SizedRecorder.calls == [
        {"prompt": "a wide fox", "seed": 0, "cfg": 2.5, "size": (96, 48), "steps": 3},  # the row's own settings
        {"prompt": "a plain cat", "seed": 0, "cfg": None, "size": (64, None), "steps": 7},  # the flags'
    ]
    record = json.loads(Image.open(tmp_path / "o_0000.png").text["parameters"])
    assert record == {
        "model": "x",
        "prompt": "a wide fox",
        "seed": 0,
        "width": 96,
        "height": 48,
        "steps": 3,
        "cfg": 2.5,
    }
    listing = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert listing[0]["steps"] == 3 and listing[1]["steps"] == 7


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"prompt": "a", "steps": 0}', "steps 0 must be a whole number >= 1"),
        ('{"prompt": "a", "width": 64.5}', "width 64.5 must be a whole number >= 1"),
        ('{"prompt": "a", "cfg": "high"}', "cfg 'high' must be a number"),
        ('{"prompt": "a", "seed": true}', "seed True must be a whole number"),
        ('{"prompt": "a", "seed": 18446744073709551616}', "seed 18446744073709551616: outside the seeds torch accepts"),
        ('{"prompt": "a", "seed": -9223372036854775809}', "seed -9223372036854775809: outside the seeds torch"),
        ('{"prompt": 5}', "prompt 5 must be a string"),
        ('{"prompt": "a", "negative_prompt": 7}', "negative_prompt 7 must be a string"),
        ('{"prompt": "a", "cfg": NaN}', "cfg nan must be a finite number"),
        ('{"prompt": "a", "cfg": -Infinity}', "cfg -inf must be a finite number"),
    ],
)
def test_bad_row_settings_are_named_before_loading(recorder, tmp_path, capsys, row, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(row + "\n")
    assert main(["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(rows)]) == 2
    assert f"line 1: {message}" in capsys.readouterr().err
    assert recorder.loads == 0


class LineRecorder(Recorder):
    """`Recorder` of a picture pipeline that takes every setting a kohya sample-prompt line can give but frames."""

    def __call__(self, prompt, seed=None, negative_prompt=None, cfg_scale=None, height=None, width=None,
                 num_inference_steps=None, embedded_guidance=None, sampler=None, input_image=None,
                 denoising_strength=None):  # fmt: skip
        from PIL import Image

        type(self).calls.append({k: v for k, v in locals().items() if k not in ("self", "Image")})
        return Image.new("RGB", (8, 8), (seed % 256, 0, 0))


@pytest.fixture
def line_recorder(monkeypatch):
    from diffsynth.runtime import cli

    LineRecorder.loads, LineRecorder.calls = 0, []
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: LineRecorder)
    return LineRecorder


def generate_from(folder, name, content, *extra):
    """`diffsynth generate --prompts-file FOLDER/NAME` into FOLDER/out; its pipeline calls, listing and PNG records."""
    from PIL import Image

    (folder / name).write_text(content)
    calls_before = len(LineRecorder.calls)
    args = ["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(folder / name)]
    assert main([*args, *extra, "--output", str(folder / "out" / "img.png")]) == 0
    listing = [json.loads(line) for line in (folder / "out" / "img.jsonl").read_text().splitlines()]
    records = [json.loads(Image.open(folder / "out" / row["file"]).text["parameters"]) for row in listing]
    return LineRecorder.calls[calls_before:], listing, records


def test_a_kohya_line_makes_the_generations_of_its_jsonl_row(line_recorder, tmp_path):
    """`--w --h --s --l --n` are the row's width/height/steps/cfg/negative_prompt and `--d` its seed, which
    `--num-images` counts on from; a line without options is its prompt, with the flags' settings."""
    line = "a fox, at dusk --w 96 --h 48 --s 3 --d 7 --l 2.5 --n blurry, dark\n# a comment\na plain cat\n"
    row = {"prompt": "a fox, at dusk", "width": 96, "height": 48, "steps": 3, "seed": 7, "cfg": 2.5}
    rows = json.dumps(row | {"negative_prompt": "blurry, dark"}) + '\n{"prompt": "a plain cat"}\n'
    flags = ["--num-images", "2", "--seed", "3", "--steps", "5"]
    for folder in ("txt", "jsonl"):
        (tmp_path / folder).mkdir()
    from_line = generate_from(tmp_path / "txt", "prompts.txt", line, *flags)
    from_row = generate_from(tmp_path / "jsonl", "prompts.jsonl", rows, *flags)
    assert from_line == from_row
    calls = from_line[0]
    assert [c["seed"] for c in calls] == [row["seed"], row["seed"] + 1, 3, 4]
    assert calls[0]["width"] == row["width"] and calls[2]["num_inference_steps"] == 5  # the line's, the flags'
    assert line_recorder.loads == 2


def test_a_kohya_lines_guidance_sampler_and_image_reach_the_pipeline(line_recorder, tmp_path):
    """`--g` is the pipeline's `embedded_guidance`, `--ss` its sampler, `--i` (read against the file's folder) its
    input image with `--denoising-strength`, as `--sampler` / `--input-image` give them; all are recorded."""
    from PIL import Image

    (tmp_path / "refs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "refs" / "start.png")
    line = "a fox --g 3.5 --ss unipc --i refs/start.png --d 2\n"
    calls, listing, records = generate_from(tmp_path, "prompts.txt", line, "--denoising-strength", "0.6")
    args = ["generate", "--model", "x", "--device", "cpu", "--prompt", "a fox", "--seed", "2", "--sampler", "unipc"]
    args += ["--input-image", str(tmp_path / "refs" / "start.png"), "--denoising-strength", "0.6"]
    assert main([*args, "--output", str(tmp_path / "flags.png")]) == 0
    from_flags = line_recorder.calls[-1]
    assert calls == [from_flags | {"embedded_guidance": 3.5}] and from_flags["denoising_strength"] == 0.6
    settings = {"sampler": "unipc", "input_image": str(tmp_path / "refs" / "start.png"), "denoising_strength": 0.6}
    made = {"model": "x", "prompt": "a fox", "seed": 2, **settings, "width": 8, "height": 8}
    assert records == [made | {"embedded_guidance": 3.5}]
    assert listing == [{"file": "img_0000.png", **records[0]}]
    assert json.loads(Image.open(tmp_path / "flags.png").text["parameters"]) == made  # the flags record the same


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a fox --w wide", "line 2: --w 'wide': width must be an integer"),
        ("a fox --q 3", "line 2: unknown option --q; the options are --w, --h"),
        ("a fox --ss ddim", "line 2: --ss 'ddim': the samplers are euler, unipc"),
        ("a fox --i a.png --i a.png", "line 2: --i is given 2 times; a generation starts from one input image"),
        ("a fox --i b.png", "line 2: --i b.png: no such file"),
        ("a fox --f 9", r"line 2: --f \(num_frames\) is not used by LineRecorder \(model 'x'\)"),
        ("a fox --l nan", "line 2: --l nan: cfg_scale must be a finite number"),
        ("a fox --g inf", "line 2: --g inf: embedded_guidance must be a finite number"),
    ],
)
def test_bad_kohya_lines_are_named_before_loading(line_recorder, tmp_path, capsys, content, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_text("a fine line\n" + content + "\n")
    args = ["generate", "--model", "x", "--device", "cpu", "--prompts-file", str(tmp_path / "prompts.txt")]
    assert main([*args, "--output", str(tmp_path / "o.png")]) == 2  # (written here should the check fail)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(
        f"error: --prompts-file {re.escape(str(tmp_path))}/prompts.txt, {message}", err[0]
    )
    assert line_recorder.loads == 0


def test_settings_the_pipeline_does_not_take_are_refused_before_loading(recorder, tmp_path, capsys):
    """`Recorder` takes no embedded_guidance and no width: a line's `--g`, a row's `width` are refused."""
    (tmp_path / "p.txt").write_text("a fox --l 2\na cat --g 3.5\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a fox", "width": 64}\n')
    args = ["generate", "--model", "x", "--device", "cpu", "--prompts-file"]
    assert main([*args, str(tmp_path / "p.txt")]) == 2
    assert "p.txt, line 2: --g (embedded_guidance) is not used by Recorder" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "p.jsonl")]) == 2
    assert "p.jsonl, line 1: width is not used by Recorder" in capsys.readouterr().err
    assert recorder.loads == 0
    (tmp_path / "p.txt").write_text("a fox --l 2 --n dark --d 5\n")  # what it takes goes through
    assert main([*args, str(tmp_path / "p.txt"), "--output", str(tmp_path / "a.png")]) == 0
    assert recorder.calls == [{"prompt": "a fox", "seed": 5, "negative_prompt": "dark", "cfg": 2.0}]


def test_the_record_holds_every_setting_that_changes_the_picture_and_the_size_made(monkeypatch, tmp_path):
    """The PNG's record (and a prompts file's listing, through the same `generation_record`) holds the sampler,
    the cache, the dtype, the input image and its strength as given, and the size the picture came out at (a
    pipeline rounds --height 100 to 96), so the record makes the picture again; where it runs is left out."""
    from PIL import Image

    from diffsynth.runtime import cli

    class Rounding(Recorder):
        def enable_first_block_cache(self, threshold):
            pass

        def __call__(self, prompt, seed=None, height=None, width=None, sampler=None, input_image=None,
                     denoising_strength=None):  # fmt: skip
            return Image.new("RGB", (width // 16 * 16, height // 16 * 16))

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Rounding)
    Image.new("RGB", (8, 8)).save(tmp_path / "start.png")
    args = ["generate", "--model", "x", "--device", "cpu", "--prompt", "a fox", "--height", "100", "--width", "64"]
    args += ["--sampler", "unipc", "--first-block-cache", "0.1", "--dtype", "float32", "--vram-limit", "4"]
    args += ["--input-image", str(tmp_path / "start.png"), "--denoising-strength", "0.3"]
    assert main([*args, "--output", str(tmp_path / "a.png")]) == 0
    assert json.loads(Image.open(tmp_path / "a.png").text["parameters"]) == {
        "model": "x", "prompt": "a fox", "seed": 0, "height": 96, "width": 64, "sampler": "unipc",
        "first_block_cache": 0.1, "dtype": "float32", "input_image": str(tmp_path / "start.png"),
        "denoising_strength": 0.3,
    }  # fmt: skip


def test_denoising_strength_goes_to_the_generations_with_a_start(line_recorder, monkeypatch, tmp_path, capsys):
    """`--denoising-strength` reaches the lines of a prompts file that start from an image (`--i`), not the
    others; with no start anywhere, or a start the pipeline takes as something else, it is refused."""
    from PIL import Image

    from diffsynth.runtime import cli

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    calls, listing, _ = generate_from(tmp_path, "p.txt", "a fox --i a.png\na cat\n", "--denoising-strength", "0.4")
    assert [c["denoising_strength"] for c in calls] == [0.4, None]
    assert listing[0]["denoising_strength"] == 0.4 and "denoising_strength" not in listing[1]
    (tmp_path / "q.txt").write_text("a cat\n")
    args = ["generate", "--model", "x", "--device", "cpu", "--denoising-strength", "0.4"]
    assert main([*args, "--prompts-file", str(tmp_path / "q.txt")]) == 2
    assert "--denoising-strength is how far image-to-image moves" in capsys.readouterr().err
    assert line_recorder.loads == 1

    class Fill(Recorder):  # takes --input-image as the picture to inpaint (as FLUX.1 Fill)
        def cli_options(self, options):
            return {("fill_image" if k == "input_image" else k): v for k, v in options.items()}

        def __call__(self, prompt, seed=None, fill_image=None, denoising_strength=None):
            raise AssertionError("refused before generating")

    class FirstFrame(Recorder):  # takes --input-image as its first frame and no strength (image-to-video)
        def __call__(self, prompt, seed=None, input_image=None):
            raise AssertionError("refused before generating")

    args += ["--prompt", "a fox", "--input-image", str(tmp_path / "a.png"), "--output", str(tmp_path / "o.png")]
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Fill)
    assert main(args) == 2
    assert "--denoising-strength is not used by Fill (model 'x') with these inputs" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: FirstFrame)
    assert main(args) == 2
    assert "--denoising-strength is not used by FirstFrame (model 'x')" in capsys.readouterr().err


def test_the_demo_model_refuses_what_it_cannot_write_before_loading(monkeypatch, capsys):
    """The bundled demo (Z-Image) draws pictures: a video, sound or LoRA file name, or --fps, is refused before
    the model loads (not PIL's `unknown file extension` after generating)."""
    from diffsynth.runtime import cli
    from diffsynth.runtime.errors import ConfigError

    try:
        demo = cli._pipeline_class(cli.DEFAULT_MODEL)
    except ConfigError:
        pytest.skip("diffsynth-z-image (the demo model) is not installed")
    monkeypatch.setattr(demo, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    for extra in (["--output", "x.mp4"], ["--output", "x.wav"], ["--output", "x.safetensors"], ["--fps", "5"]):
        assert main(["generate", "--prompt", "a red circle", "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert f"{demo.__name__} (model 'demo')" in err and "Traceback" not in err
        assert "writes images: use .png" in err if extra[0] == "--output" else "--fps is not used" in err
