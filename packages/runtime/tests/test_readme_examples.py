"""The README checker (`diffsynth.runtime.testing.readme`) on small Markdown texts, and on the root README.

The unit tests use a toy pipeline registered as `diffsynth.readme_toy` with one preset, so they need no model
family; each wrong example must be reported at its line, and the correct ones must pass.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys
import types
from pathlib import Path

import pytest

from diffsynth.runtime import registry
from diffsynth.runtime.pipeline import BasePipeline
from diffsynth.runtime.testing import readme
from diffsynth.runtime.testing.readme import blocks, check_file, check_markdown

ROOT = Path(__file__).resolve().parents[3]
FENCE = "```"


class ToyPipeline(BasePipeline):
    """A pipeline the checker reads signatures from; never built."""

    family = "readme_toy"
    model_slots = ("dit",)

    def __call__(self, prompt: str, *, seed: int = 0, cfg_scale: float = 1.0):
        raise AssertionError("the checker must not call anything")

    def enable_toy_cache(self, threshold: float):
        raise AssertionError("the checker must not call anything")


class ForwardingToyPipeline(ToyPipeline):
    """Passes `**kwargs` on, as pipelines that extend `from_pretrained` do."""

    @classmethod
    def from_pretrained(cls, model_id_or_configs=None, **kwargs):
        return super().from_pretrained(model_id_or_configs, **kwargs)

    def enable_toy_mode(self, mode: str, **options):
        options.pop("legacy", None)  # read here, not passed on
        return self.enable_toy_cache(**options)


def make_toy(size: int, *, scale: float = 1.0):
    raise AssertionError("the checker must not call anything")


def _clear_caches() -> None:
    for function in (readme._exported_classes, readme._all_pipeline_classes, readme._parser):
        getattr(function, "cache_clear", lambda: None)()  # absent where a test replaced the function


@pytest.fixture
def toy(monkeypatch):
    """`diffsynth.readme_toy` (ToyPipeline, make_toy) as an installed package with a training task and the presets
    `Org/Toy` and `Org/Toy-Fast` (a LoRA preset)."""
    module = types.ModuleType("diffsynth.readme_toy")
    module.__spec__ = importlib.machinery.ModuleSpec("diffsynth.readme_toy", None)
    for obj in (ToyPipeline, ForwardingToyPipeline, make_toy):
        monkeypatch.setattr(obj, "__module__", "diffsynth.readme_toy")
        setattr(module, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "diffsynth.readme_toy", module)
    lora = registry.PresetLoRA(model_id="Org/Lora", origin_file_pattern="lora.safetensors")
    presets = {
        "Org/Toy": registry.Preset(name="Org/Toy"),
        "Org/Toy-Fast": registry.Preset("Org/Toy-Fast", loras=(lora,)),
    }
    family = registry.Family(name="readme_toy", presets=presets, training="diffsynth.readme_toy:ToyTask")
    monkeypatch.setattr(registry, "installed_families", lambda: {"readme_toy": family})
    monkeypatch.setattr(readme, "_all_pipeline_classes", lambda: (ToyPipeline,))
    monkeypatch.setattr(readme, "_all_families_installed", lambda: True)
    yield module
    _clear_caches()


def md(*parts: tuple[str, str]) -> str:
    """A Markdown text of (lang, code) blocks under one heading: the heading is line 1, the first code line 3."""
    text = "# Example\n"
    for lang, code in parts:
        text += f"{FENCE}{lang}\n{code.strip(chr(10))}\n{FENCE}\n\ntext\n"
    return text


def messages(report, hints: bool = True) -> list[str]:
    """The findings as text; `hints=False` drops the "(did you mean ...?)" of parsers that other code extends."""
    found = [str(f) for f in report.findings]
    return found if hints else [re.sub(r" \(did you mean .*\?\)$", "", f) for f in found]


# ------------------------------------------------------------------------------------------- markdown
def test_blocks_keep_lines_languages_and_sections():
    text = "# A\n\n```python\nx = 1\ny = 2\n```\n\n## B\n  ~~~Bash title\n  echo hi\n  ~~~\n```\nplain\n```\n"
    found = blocks(text)
    assert [(b.lang, b.line, b.code) for b in found] == [
        ("python", 4, "x = 1\ny = 2"),
        ("bash", 10, "echo hi"),
        ("", 13, "plain"),
    ]
    assert found[0].section.endswith(":A") and found[1].section.endswith(":B")
    assert found[1].section == found[2].section


# ------------------------------------------------------------------------------------------- python
def test_correct_python_example_passes(toy):
    code = """
import torch
from diffsynth.runtime import ModelConfig
from diffsynth.readme_toy import ToyPipeline, make_toy

pipe = ToyPipeline.from_pretrained("org/TOY", torch_dtype=torch.bfloat16, device="cpu", vram_limit=8)
local = ToyPipeline.from_pretrained("./my-model")
other = ToyPipeline.from_pretrained("models/a/b")
image = pipe("a fox", seed=0, cfg_scale=4)
pipe.enable_toy_cache(0.1)
pipe.dit.anything(whatever=1)
make_toy(3, scale=0.5)
config = ModelConfig(model_id="Org/Toy", origin_file_pattern="transformer/*.safetensors")
"""
    report = check_markdown(md(("python", code)), "T.md")
    assert messages(report) == []


def test_wrong_keyword_unknown_method_and_too_many_arguments_are_reported(toy):
    code = """
from diffsynth.readme_toy import ToyPipeline, make_toy

pipe = ToyPipeline.from_pretrained("Org/Toy", devce="cpu")
image = pipe("a fox", sed=0)
pipe.enable_toy_cash(0.1)
make_toy(3, 4)
"""
    report = check_markdown(md(("python", code)), "T.md")
    assert messages(report, hints=False) == [
        "T.md:5: ToyPipeline.from_pretrained(): takes no argument 'devce'",
        "T.md:6: ToyPipeline.__call__(): takes no argument 'sed'",
        "T.md:7: ToyPipeline has no method 'enable_toy_cash'",
        "T.md:8: make_toy(): too many positional arguments",
    ]
    hints = messages(report)
    assert hints[0].endswith("(did you mean 'device'?)") and hints[1].endswith("(did you mean 'seed'?)")
    assert "(did you mean 'enable_toy_cache'," in hints[2]


def test_keywords_passed_on_through_kwargs_are_checked_where_they_land(toy):
    code = """
from diffsynth.readme_toy import ForwardingToyPipeline

pipe = ForwardingToyPipeline.from_pretrained("Org/Toy", device="cpu", vram_limit=2)
pipe = ForwardingToyPipeline.from_pretrained("Org/Toy", devce="cpu")
pipe.enable_toy_mode("a", threshold=0.1, legacy=True)
pipe.enable_toy_mode("a", treshold=0.1)
"""
    report = check_markdown(md(("python", code)), "T.md")
    assert messages(report) == [
        "T.md:6: ForwardingToyPipeline.from_pretrained(): takes no argument 'devce' (nor does what it passes "
        "**kwargs to)",
        "T.md:8: ForwardingToyPipeline.enable_toy_mode(): takes no argument 'treshold' (nor does what it passes "
        "**kwargs to)",
    ]


def test_calls_inside_functions_are_checked(toy):
    code = """
from diffsynth.readme_toy import ToyPipeline

pipe = ToyPipeline.from_pretrained("Org/Toy")
def run(prompt, seed):
    image = pipe(prompt, seed=seed)
    return pipe(prompt, sed=seed)
"""
    report = check_markdown(md(("python", code)), "T.md")
    assert messages(report, hints=False) == ["T.md:8: ToyPipeline.__call__(): takes no argument 'sed'"]


def test_unknown_preset_is_reported_and_paths_or_placeholders_are_not(toy):
    code = """
from diffsynth.readme_toy import ToyPipeline

a = ToyPipeline.from_pretrained("Org/Toys")
b = ToyPipeline.from_pretrained("/models/toy")
c = ToyPipeline.from_pretrained("<your model>")
d = ToyPipeline.from_pretrained("...")
"""
    report = check_markdown(md(("python", code)), "T.md")
    assert messages(report) == [
        "T.md:5: 'Org/Toys' is not a ToyPipeline preset (did you mean 'Org/Toy', 'Org/Toy-Fast'?)"
    ]


def test_bad_imports_and_syntax_errors_are_reported(toy):
    report = check_markdown(
        md(
            ("python", "from diffsynth.runtime import ModelConfg"),
            ("python", "import diffsynth.runtime.nope"),
            ("python", "from diffsynth.fluxx import FluxImagePipeline"),
            ("python", "x = 1\npipe(prompt=..., ...)"),
        ),
        "T.md",
    )
    assert messages(report) == [
        "T.md:3: cannot import 'ModelConfg' from 'diffsynth.runtime' (did you mean 'ModelConfig'?)",
        "T.md:8: no module 'diffsynth.runtime.nope'",
        "T.md:13: no module 'diffsynth.fluxx': diffsynth has no package 'fluxx' (did you mean 'flux'?)",
        "T.md:19: Python syntax error: positional argument follows keyword argument",
    ]


def test_a_pipeline_binding_lasts_until_the_next_heading(toy):
    text = (
        "# One\n"  # 1
        "```python\nfrom diffsynth.readme_toy import ToyPipeline\nmine = ToyPipeline.from_pretrained('Org/Toy')\n```\n"
        "```python\nmine('x', sed=1)\n```\n"  # line 7: checked (same section)
        "# Two\n"  # 9
        "```python\nmine('x', sed=1)\npipe('x', sed=1)\npipe.enable_toy_cache(1, bad=2)\n```\n"
    )
    report = check_markdown(text, "T.md")
    # `mine` is forgotten under "Two"; `pipe`, bound nowhere, is checked against every pipeline (here the toy)
    assert messages(report) == [
        "T.md:7: ToyPipeline.__call__(): takes no argument 'sed' (did you mean 'seed'?)",
        "T.md:12: pipe.__call__(): no pipeline's __call__ fits: takes no argument 'sed'",
        "T.md:13: pipe.enable_toy_cache(): no pipeline's enable_toy_cache fits: takes no argument 'bad'",
    ]


def test_names_from_other_libraries_are_not_checked(toy):
    code = """
from PIL import Image
pipe = Image.new("RGB", (4, 4))
pipe.anything(whatever=1)
"""
    assert messages(check_markdown(md(("python", code)), "T.md")) == []


# ------------------------------------------------------------------------------------------- shell
def test_correct_shell_example_passes(toy):
    code = r"""
# comments, placeholders, brackets and launchers
diffsynth generate --model org/toy --prompt "a cat's hat" --output cat.png \
    [--negative-prompt ...] [--steps 9] --seed=1   # default seed
uv run --all-packages --no-dev diffsynth generate --model ./local/folder --prompt "..."
torchrun --nproc_per_node 2 -m diffsynth.runtime.cli generate --model $MODEL --sequence-parallel 2
diffsynth list-models && diffsynth inspect FILE... > out.txt
pip install diffsynth-runtime
"""
    assert messages(check_markdown(md(("bash", code)), "T.md")) == []


def test_unknown_flag_command_and_preset_are_reported(toy):
    code = r"""
diffsynth generate --model Org/Toy --promt "x" \
    --stepz 3
python -m diffsynth.runtime.cli frobnicate
diffsynth generate --model Org/Nope --prompt x
python -m diffsynth.runtime.nope
"""
    report = check_markdown(md(("bash", code)), "T.md")
    assert messages(report, hints=False) == [
        "T.md:3: diffsynth generate has no option '--promt'",
        "T.md:4: diffsynth generate has no option '--stepz'",  # the physical line of the flag
        "T.md:5: diffsynth has no command 'frobnicate'",
        "T.md:6: diffsynth generate --model 'Org/Nope' is not a preset",
        "T.md:7: -m diffsynth.runtime.nope: no such module",
    ]
    assert "(did you mean '--prompt'" in messages(report)[0]
    assert messages(report)[3].endswith("(did you mean 'Org/Toy'?)")


def test_sub_commands_are_followed(toy):
    code = r"""
diffsynth lora extract base.safetensors tuned.safetensors --rank 8 -o out.safetensors
diffsynth lora resize in.safetensors --rnk 8 -o out.safetensors
diffsynth lora shrink in.safetensors
"""
    assert messages(check_markdown(md(("bash", code)), "T.md"), hints=False) == [
        "T.md:4: diffsynth lora resize has no option '--rnk'",
        "T.md:5: diffsynth lora has no command 'shrink'",
    ]


def test_unknown_preset_is_skipped_while_some_family_is_absent(toy, monkeypatch):
    monkeypatch.setattr(readme, "_all_families_installed", lambda: False)
    report = check_markdown(md(("bash", "diffsynth generate --model Org/Nope --prompt x")), "T.md")
    assert messages(report) == []
    assert [f.line for f in report.skipped] == [3]


def test_trainer_flags_and_config_keys(toy):
    pytest.importorskip("diffsynth.training")
    code = r"""
diffsynth-train --model Org/Toy --dataset_base_path data/ --output_path out/ --use_gradient_checkpointing \
    --no-use_gradient_checkpointing --learning_rate 1e-4
accelerate launch --num_processes 8 -m diffsynth.training.cli --config run.yaml --lerning_rate 1e-4
diffsynth-train-demo --output_path models/demo --stepz 3
diffsynth-train --model Org/Toy-Fast --dataset_base_path data/
"""
    yaml = "model: Org/Toy\ndataset_base_path: data/\nlr_schedular: cosine\n"
    report = check_markdown(md(("bash", code), ("yaml", yaml)), "T.md")
    assert messages(report, hints=False) == [
        "T.md:5: diffsynth-train has no option '--lerning_rate'",
        "T.md:6: diffsynth-train-demo has no option '--stepz'",
        "T.md:7: diffsynth-train --model Org/Toy-Fast: a LoRA preset, which the trainer refuses (train on its base "
        "model)",
        "T.md:14: diffsynth-train config key 'lr_schedular' is not a setting",
    ]
    assert "(did you mean '--learning_rate'" in messages(report)[0]


# ------------------------------------------------------------------------------------------- the READMEs
def test_runtime_readme():
    report = check_file(ROOT / "packages" / "runtime" / "README.md", "packages/runtime/README.md")
    assert not report.findings, report.text()


def test_root_readme():
    """Checks what the installed packages allow (all of it with every package installed; the rest is skipped)."""
    report = check_file(ROOT / "README.md", "README.md")
    assert not report.findings, report.text()


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names or fullname.startswith(tuple(n + "." for n in self.names)):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by the test)", name=fullname)
        return None


def test_root_readme_without_the_families_skips_instead_of_failing(monkeypatch):
    """The runtime's CI session has no family installed: what needs one is skipped, not reported."""
    hidden = {f"diffsynth.{p}" for p in (*readme.FAMILIES, "training")}
    for name in list(sys.modules):
        if name in hidden or name.startswith(tuple(h + "." for h in hidden)):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Hide(hidden), *sys.meta_path])
    monkeypatch.setattr(registry, "installed_families", lambda: {})
    _clear_caches()
    try:
        report = check_file(ROOT / "README.md", "README.md")
    finally:
        _clear_caches()
    assert not report.findings, report.text()
    skipped = "\n".join(str(f) for f in report.skipped)
    assert "diffsynth.z_image is not installed here" in skipped
    assert "diffsynth-training is not installed here" in skipped


@pytest.mark.integration
def test_every_readme_is_checked_in_full_with_every_package_installed():
    """With every package installed nothing is skipped: each example was checked against the code."""
    for package in readme.PACKAGES:
        if not readme._installed(package):
            pytest.skip(f"diffsynth.{package} is not installed")
    for path in [ROOT / "README.md", *sorted((ROOT / "packages").glob("*/README.md"))]:
        report = check_file(path, str(path.relative_to(ROOT)))
        assert not report.findings, report.text()
        assert not report.skipped, "\n".join(str(f) for f in report.skipped)
