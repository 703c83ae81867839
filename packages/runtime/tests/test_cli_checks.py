"""`diffsynth generate`'s checks before a model loads, and what a prompts-file run keeps when it fails midway.

The pipelines here are stand-ins (`_pipeline_class` patched): each counts its loads and records its calls."""

import json

import pytest
from PIL import Image

from diffsynth.runtime.cli import main
from diffsynth.runtime.errors import ConfigError


class Picture:
    """A picture pipeline taking a prompt, seed and cfg; records its calls, counts its loads."""

    defaults: dict = {}
    loads = 0
    calls: list = []
    fail_at: int | None = None  # the call (0-based) that fails, as a late error in a batch would

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.loads += 1
        return cls()

    def step_caches(self):
        return {}

    def __call__(self, prompt, seed=None, cfg_scale=None):
        if len(type(self).calls) == type(self).fail_at:
            raise ConfigError("the model failed on this prompt")
        type(self).calls.append({"prompt": prompt, "seed": seed})
        return Image.new("RGB", (8, 8), (seed % 256, 0, 0))


@pytest.fixture
def picture(monkeypatch):
    from diffsynth.runtime import cli

    Picture.loads, Picture.calls, Picture.fail_at = 0, [], None
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Picture)
    return Picture


BASE = ["generate", "--model", "x", "--device", "cpu"]


def test_a_listing_that_would_overwrite_the_prompts_file_is_refused_before_loading(picture, tmp_path, capsys):
    rows = tmp_path / "batch.jsonl"
    text = '{"prompt": "a fox", "seed": 1}\n'
    rows.write_text(text)
    assert main([*BASE, "--prompts-file", str(rows), "--output", str(tmp_path / "batch.png")]) == 2
    err = capsys.readouterr().err
    assert f"lists its outputs in {rows}, which is --prompts-file {rows}" in err
    assert rows.read_text() == text and picture.loads == 0


@pytest.mark.parametrize("prompt", ["null", '""', '"  "'])
def test_a_row_without_prompt_text_is_refused_before_loading(picture, tmp_path, capsys, prompt):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a fox"}\n{"prompt": ' + prompt + "}\n")
    assert main([*BASE, "--prompts-file", str(rows), "--output", str(tmp_path / "o.png")]) == 2
    assert f"--prompts-file {rows}, line 2: prompt" in capsys.readouterr().err
    assert picture.loads == 0


def test_a_line_image_that_cannot_be_read_is_refused_before_loading(picture, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not a picture")
    (tmp_path / "p.txt").write_text("a fox\na cat --i bad.png\n")
    assert main([*BASE, "--prompts-file", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.png")]) == 2
    assert "p.txt, line 2: --i " in (err := capsys.readouterr().err) and "not a picture that can be read" in err
    assert picture.loads == 0


def test_the_listing_keeps_the_outputs_made_before_a_failure(picture, tmp_path, capsys):
    picture.fail_at = 2
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in (("a", 1), ("b", 2), ("c", 3))))
    assert main([*BASE, "--prompts-file", str(rows), "--output", str(tmp_path / "out" / "o.png")]) == 2
    assert "the model failed" in capsys.readouterr().err
    listing = [json.loads(line) for line in (tmp_path / "out" / "o.jsonl").read_text().splitlines()]
    assert [(row["file"], row["seed"]) for row in listing] == [("o_0000.png", 1), ("o_0001.png", 2)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "unipc"], "--sampler is not used by Picture (model 'x')"),
        (["--input-audio", "a.wav"], "--input-audio is not used by Picture"),
        (["--control-video", "c.mp4"], "--control-video is not used by Picture"),
        (["--first-block-cache", "-1"], "--first-block-cache -1.0: the threshold must be >= 0"),
        (["--tea-cache", "-0.5"], "--tea-cache -0.5: the threshold must be >= 0"),
    ],
)
def test_flags_the_pipeline_does_not_take_are_refused_before_loading(picture, capsys, extra, message):
    assert main([*BASE, "--prompt", "a fox", *extra]) == 2
    assert message in capsys.readouterr().err
    assert picture.loads == 0


class OwnCli:
    """A pipeline with its own `run_cli` (an image-to-LoRA preset) that reads `--lora-image` alone."""

    cli_flags = frozenset({"lora_image", "prompt"})
    runs = 0

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def run_cli(self, args):
        type(self).runs += 1
        return 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-images", "3"], "--num-images 3: OwnCli (model 'x') makes one output"),
        (["--prompts-file", "p.txt"], "--prompts-file: OwnCli (model 'x') makes one output"),
        (["--steps", "7"], "--steps is not used by OwnCli (model 'x'), which reads --lora-image, --prompt"),
        (["--sampler", "unipc"], "--sampler is not used by OwnCli"),
        (["--insert-ref-image", "r.png"], "--insert-ref-image is not used by OwnCli"),
    ],
)
def test_run_cli_pipelines_refuse_the_flags_they_do_not_read(monkeypatch, capsys, extra, message):
    from diffsynth.runtime import cli

    OwnCli.runs = 0
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: OwnCli)
    assert main([*BASE, "--lora-image", "a.png", *extra]) == 2
    assert message in capsys.readouterr().err
    assert main([*BASE, "--lora-image", "a.png", "--dtype", "float32"]) == 0 and OwnCli.runs == 1


class Renaming(Picture):
    """Step1X-like: `cli_options` gives `--input-image` (and a line's `--i`) as `reference_image`."""

    def cli_options(self, options):
        options = dict(options)
        if "input_image" in options:
            options["reference_image"] = options.pop("input_image")
        return options

    def __call__(self, prompt, seed=None, reference_image=None):
        type(self).calls.append({"prompt": prompt, "seed": seed, "reference_image": reference_image})
        return Image.new("RGB", (8, 8))


def test_a_line_image_goes_through_the_familys_cli_options(monkeypatch, tmp_path):
    from diffsynth.runtime import cli

    Renaming.loads, Renaming.calls = 0, []
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: Renaming)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "p.txt").write_text("edit this --i a.png\nplain\n")
    args = [*BASE, "--prompts-file", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.png")]
    assert main([*args, "--input-image", str(tmp_path / "a.png")]) == 0
    assert [c["reference_image"] for c in Renaming.calls] == [str(tmp_path / "a.png")] * 2
    Renaming.calls.clear()
    assert main(args) == 0  # the line's own image, the plain line none
    assert [c["reference_image"] for c in Renaming.calls] == [str(tmp_path / "a.png"), None]


class Net:
    def __init__(self, takes_mask):
        self.takes_mask = takes_mask


class WithControlNet(Picture):
    """A pipeline with one ControlNet slot whose loaded net is an inpainting one (or not: `mask_net`)."""

    model_slots = {"controlnet": "controlnet"}
    mask_net = True

    def load_controlnet(self, sources):
        self.nets = [Net(type(self).mask_net) for _ in sources]

    def controlnets(self, slot="controlnet"):
        return self.nets if slot == "controlnet" else []

    def __call__(self, prompt, seed=None, controlnet_inputs=None, inpaint_mask=None):
        type(self).calls.append({"controls": controlnet_inputs, "inpaint_mask": inpaint_mask})
        return Image.new("RGB", (8, 8))


def test_an_inpainting_controlnet_takes_the_inpaint_mask(monkeypatch, tmp_path, capsys):
    from diffsynth.runtime import cli

    WithControlNet.calls, WithControlNet.mask_net = [], True
    monkeypatch.setattr(cli, "_pipeline_class", lambda model: WithControlNet)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    args = [*BASE, "--prompt", "a cat", "--controlnet", "inpaint", "--control-image", str(tmp_path / "photo.png")]
    assert main([*args, "--inpaint-mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "o.png")]) == 0
    (call,) = WithControlNet.calls
    assert call["inpaint_mask"] is None  # the net repaints, not the pipeline's own inpainting
    assert call["controls"][0].inpaint_mask.getpixel((0, 0)) == 255
    assert main([*args, "-o", str(tmp_path / "o.png")]) == 2
    assert "--controlnet inpaint is an inpainting ControlNet: give --inpaint-mask" in capsys.readouterr().err
    WithControlNet.calls, WithControlNet.mask_net = [], False  # a control-image net leaves the mask to the pipeline
    assert main([*args, "--inpaint-mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "o.png")]) == 0
    assert WithControlNet.calls[0]["controls"][0].inpaint_mask is None
    assert WithControlNet.calls[0]["inpaint_mask"] is not None


class WithTeaCache(Picture):
    def enable_tea_cache(self, threshold, model_id=None):
        raise ConfigError("Dit: TeaCache needs a model id (tea_cache_model_id), one of: a, b")


def test_a_tea_cache_message_names_the_flags(monkeypatch, capsys):
    from diffsynth.runtime import cli

    monkeypatch.setattr(cli, "_pipeline_class", lambda model: WithTeaCache)
    assert main([*BASE, "--prompt", "a fox", "--tea-cache", "0.2"]) == 2
    assert "error: --tea-cache 0.2: Dit: TeaCache needs a model id (--tea-cache-model-id)" in capsys.readouterr().err
