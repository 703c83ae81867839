"""Check the code examples of a README against the installed code, so the examples cannot rot.

A README is a user's first contact; every ```python and ```bash block in it must name things that exist.
`check_file(path)` (or `check_markdown(text, path)`) returns a `Report` whose `findings` read
"FILE:LINE: what is wrong" and whose `skipped` say what could not be checked in this environment (a family
package that is not installed). Nothing is built or downloaded: modules are imported and signatures and
parsers are read, so a check takes a fraction of a second once the packages are imported.

Python blocks (```python / ```py):
- every block must parse (`ast.parse`);
- `import X` / `from X import Y`: the module imports and has `Y` (a `diffsynth.*` package that is not installed,
  or a third-party module that is not installed, is skipped);
- a call of an imported `diffsynth` function or class (`ModelConfig(...)`, `save_video(...)`) and of a method of
  an imported `diffsynth` class (`ZImagePipeline.from_pretrained(...)`) must bind to its signature: no unknown
  keyword (unless it takes `**kwargs`), not too many positional arguments;
- `XPipeline.from_pretrained("Org/Model")`: the preset exists in the pipeline's family, matched case-insensitively
  as the pipeline matches it; a local path or a placeholder (`./folder`, `/abs`, `~/x`, `a/b/c`, `...`, `<name>`,
  `$VAR`) is not a preset and is not checked;
- a name bound to `XPipeline.from_pretrained(...)` (or `XPipeline(...)`) is a pipeline: `name(...)` must bind to
  `XPipeline.__call__` and `name.method(...)` must name an existing method (or model slot) and bind to it.
Scope rule: names bound in a block (imports, pipelines) stay bound in the later blocks of the same section (the
text under one Markdown heading, of any level) and are forgotten at the next heading. A class a section uses
without importing it (`ModelConfig`, `QwenImagePipeline`) is looked up among the classes `diffsynth.runtime` and
the installed families export. `pipe`, the READMEs' name for a pipeline, when the section never binds it: the
method must exist on some pipeline and the call must bind to one of them (checked only with every family
installed).

Shell blocks (```bash / ```sh / ```shell / ```console): lines are joined over `\\` continuations and split at
`;`, `&&`, `|`, `(`, `)`. A command `diffsynth ...` (also `python -m diffsynth.runtime.cli`, `torchrun ... -m
diffsynth.runtime.cli`, `uv run ... diffsynth`), `diffsynth-train ...` (also `-m diffsynth.training.cli` under
`python`, `accelerate launch`, `torchrun`) and `diffsynth-train-demo` must use a known subcommand, and every
`--flag` must be an option of the real argparse parser (exact names: argparse would accept abbreviations, a
README should not). `--model X` must be an installed preset unless X is a path or placeholder; when a preset is
not found and some family package is not installed, the check is skipped (the preset may be that family's).
For `diffsynth-train` the preset must also be trainable (a training task, not a LoRA preset) unless the line
names `--family`. `diffsynth-train` lines are skipped when `diffsynth-training` is not installed. Any
`-m diffsynth.x.y` must name an existing module.

YAML blocks that are `diffsynth-train --config` files (they set `model` or `dataset_base_path`): every key is a
trainer setting, and `model` is checked as `--model` is.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import re
import shlex
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

PYTHON_LANGS = ("python", "py", "python3")
SHELL_LANGS = ("bash", "sh", "shell", "console", "zsh")
# the packages of this project, `diffsynth.<name>`: one that is absent is "not installed", not "misnamed"
PACKAGES = ("runtime", "z_image", "flux", "qwen_image", "wan", "ltx2", "training")
FAMILIES = ("z_image", "flux", "qwen_image", "wan", "ltx2")
RUNTIME_CLI = "diffsynth.runtime.cli"
TRAINING_CLI = "diffsynth.training.cli"
SHELL_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "|&"}
UNBOUND_PIPE = "pipe"  # the READMEs' name for a pipeline; unbound in a section, it is checked against every pipeline
REDIRECTIONS = {">", ">>", "<", "2>", "&>", ">&", "<<"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its text (dedented), the file line of its first code line, and the
    heading it sits under (its section)."""

    lang: str
    code: str
    line: int
    section: str


@dataclass(frozen=True)
class Finding:
    """One problem (or one skipped check) at a line of a file; prints as FILE:LINE: message."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class Report:
    """What a README check found: `findings` are errors in the README; `skipped` are checks this environment
    could not make (a package that is not installed)."""

    findings: list[Finding] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(str(f) for f in self.findings)


# ------------------------------------------------------------------------------------------------- markdown
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?P<title>.*?)\s*#*\s*$")


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with line numbers (1-based) and sections."""
    found: list[Block] = []
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            if (h := _HEADING.match(lines[i])) is not None:
                section = f"{i + 1}:{h['title']}"
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = (m["info"].split() or [""])[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        found.append(Block(lang, textwrap.dedent("\n".join(body)), i + 2, section))
        i = j + 1
    return found


def check_file(path: str | Path, display: str | None = None) -> Report:
    """Check one Markdown file; messages name it as `display` (default: the path as given)."""
    path = Path(path)
    return check_markdown(path.read_text(encoding="utf-8"), display or str(path))


def check_markdown(text: str, path: str = "README.md") -> Report:
    """Check every Python and shell block of a Markdown text (see the module docstring)."""
    report = Report()
    scopes: dict[str, dict[str, Any]] = {}
    for block in blocks(text):
        if block.lang in PYTHON_LANGS:
            scope = scopes.setdefault(block.section, {})
            _PythonChecker(report, path, block, scope).run()
        elif block.lang in SHELL_LANGS:
            _check_shell(report, path, block)
        elif block.lang in ("yaml", "yml"):
            _check_train_yaml(report, path, block)
    return report


# ------------------------------------------------------------------------------------------------- helpers
def _installed(package: str) -> bool:
    """Whether `diffsynth.<package>` can be imported here."""
    try:
        return importlib.util.find_spec(f"diffsynth.{package}") is not None
    except (ImportError, ValueError):
        return False


def _all_families_installed() -> bool:
    return all(_installed(f) for f in FAMILIES)


def is_path_or_placeholder(value: str) -> bool:
    """A `from_pretrained` / `--model` argument that is a local path or a placeholder, not a preset name."""
    if any(s in value for s in ("...", "<", ">", "{", "}", "$", "\\", " ", "*")) or re.fullmatch(
        r"[A-Z][A-Z0-9_]*", value
    ):
        return True  # `...`, `<model>`, `{name}`, `$MODEL`, `C:\x`, `MODEL`
    if value.startswith((".", "/", "~")) or value.endswith("/"):
        return True  # `./folder`, `/abs/folder`, `~/models/x`, `folder/`
    return value.count("/") >= 2  # `models/Org/Name` (a preset is `Org/Name` or `Org/Name:variant`)


def _preset_lookup(name: str) -> tuple[Any, Any] | None:
    """(family, preset) from every installed family, matched case-insensitively as `find_preset` does."""
    from diffsynth.runtime.registry import installed_families

    for family in installed_families().values():
        for key, preset in family.presets.items():
            if key.lower() == name.lower():
                return family, preset
    return None


def _all_preset_names() -> list[str]:
    from diffsynth.runtime.registry import installed_families

    return sorted(k for f in installed_families().values() for k in f.presets)


def _close(word: str, options: Iterable[str]) -> str:
    """' (did you mean ...?)' from the closest options, or ''."""
    options = list(options)
    near = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    if not near:
        near = difflib.get_close_matches(word.lower(), [o.lower() for o in options], n=3, cutoff=0.6)
        near = [o for o in options if o.lower() in near]
    return f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""


# ------------------------------------------------------------------------------------------------- python
_UNKNOWN = object()  # a name the section binds to something this checker cannot follow


@dataclass(frozen=True)
class _Pipe:
    """A name bound to a pipeline instance of class `cls`."""

    cls: type


class _PythonChecker(ast.NodeVisitor):
    """Walks one block in source order; `scope` maps names to imported objects or `_Pipe`s and is shared with
    the later blocks of the same section."""

    def __init__(self, report: Report, path: str, block: Block, scope: dict[str, Any]):
        self.report, self.path, self.block, self.scope = report, path, block, scope

    def run(self) -> None:
        try:
            tree = ast.parse(self.block.code)
        except SyntaxError as exc:
            self._find(exc.lineno or 1, f"Python syntax error: {exc.msg}")
            return
        self.visit(tree)

    def _line(self, lineno: int) -> int:
        return self.block.line + lineno - 1

    def _find(self, lineno: int, message: str) -> None:
        self.report.findings.append(Finding(self.path, self._line(lineno), message))

    def _skip(self, lineno: int, message: str) -> None:
        self.report.skipped.append(Finding(self.path, self._line(lineno), message))

    # ---------------------------------------------------------------- imports
    def _import_module(self, name: str, lineno: int) -> Any | None:
        """The module, None (with a finding or a skip) when it cannot be imported."""
        parts = name.split(".")
        if parts[0] == "diffsynth":
            if len(parts) < 2:
                return importlib.import_module("diffsynth")
            if not _installed(parts[1]):
                if parts[1] in PACKAGES:
                    self._skip(lineno, f"{name}: diffsynth.{parts[1]} is not installed here")
                else:
                    self._find(
                        lineno, f"no module {name!r}: diffsynth has no package {parts[1]!r}{_close(parts[1], PACKAGES)}"
                    )
                return None
        else:
            try:
                top = importlib.util.find_spec(parts[0])
            except (ImportError, ValueError):
                top = None
            if top is None:
                self._skip(lineno, f"{name}: {parts[0]} is not installed here")
                return None
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name) and exc.name.split(".")[0] == parts[0]:
                where = "" if exc.name == name else f" (imported as {name!r})"
                self._find(lineno, f"no module {exc.name!r}{where}")
            else:  # the module exists but needs something absent here
                self._skip(lineno, f"{name}: cannot import here ({exc})")
        except Exception as exc:  # noqa: BLE001 - a module that fails for reasons of this machine
            self._skip(lineno, f"{name}: cannot import here ({type(exc).__name__}: {exc})")
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            module = self._import_module(alias.name, node.lineno)
            if alias.asname:
                self._bind(alias.asname, module)
            else:
                top = alias.name.split(".")[0]
                self._bind(top, importlib.import_module(top) if module is not None else None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or node.module is None:
            return
        module = self._import_module(node.module, node.lineno)
        for alias in node.names:
            value = None
            if module is not None and alias.name != "*":
                value = self._attribute(module, alias.name, node.module, node.lineno)
            self._bind(alias.asname or alias.name, value)

    def _attribute(self, module: Any, name: str, module_name: str, lineno: int) -> Any | None:
        try:
            return getattr(module, name)
        except AttributeError:
            pass
        except Exception as exc:  # noqa: BLE001 - a lazy attribute whose import fails on this machine
            self._skip(lineno, f"{module_name}.{name}: cannot import here ({type(exc).__name__}: {exc})")
            return None
        try:  # a submodule
            return importlib.import_module(f"{module_name}.{name}")
        except ModuleNotFoundError:
            pass
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        self._find(lineno, f"cannot import {name!r} from {module_name!r}{_close(name, public)}")
        return None

    # ---------------------------------------------------------------- bindings
    def _bind(self, name: str, value: Any) -> None:
        """Bind `name`; None marks it as bound to something unknown (it then hides the fallbacks below)."""
        self.scope[name] = _UNKNOWN if value is None else value

    def _bind_target(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self._bind(target.id, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._bind_target(element, None)
        elif isinstance(target, ast.Starred):
            self._bind_target(target.value, None)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        value = self._pipeline_made_by(node.value)
        for target in node.targets:
            self._bind_target(target, value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self._bind_target(node.target, self._pipeline_made_by(node.value))

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._bind_target(node.target, None)
        for statement in node.body + node.orelse:
            self.visit(statement)

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self._bind_target(item.optional_vars, None)
        for statement in node.body:
            self.visit(statement)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        """The body is checked with the names bound so far, its arguments unknown; its own bindings stay inside."""
        inner = dict(self.scope)
        arguments = node.args
        for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]:
            if arg is not None:
                inner[arg.arg] = _UNKNOWN
        body = _PythonChecker(self.report, self.path, self.block, inner)
        for statement in node.body:
            body.visit(statement)
        self._bind(node.name, None)

    # ---------------------------------------------------------------- resolving
    def _resolve(self, node: ast.expr) -> Any | None:
        """The object an expression names: an imported object, a `_Pipe`, or an attribute of either."""
        if isinstance(node, ast.Name):
            if node.id in self.scope:
                value = self.scope[node.id]
                return None if value is _UNKNOWN else value
            return _exported_classes().get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self._resolve(node.value)
            if owner is None or isinstance(owner, _Pipe):
                return None
            if inspect.ismodule(owner) or inspect.isclass(owner):
                try:
                    return getattr(owner, node.attr)
                except Exception:  # noqa: BLE001 - reported by the call check when it matters
                    return None
        return None

    def _pipeline_made_by(self, node: ast.expr) -> _Pipe | None:
        """`_Pipe(cls)` when `node` is `cls.from_pretrained(...)` or `cls(...)` of a diffsynth pipeline class."""
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "from_pretrained":
            cls = self._resolve(func.value)
        else:
            cls = self._resolve(func)
        return _Pipe(cls) if _is_pipeline_class(cls) else None

    # ---------------------------------------------------------------- calls
    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        receiver = func.value if isinstance(func, ast.Attribute) else func
        if isinstance(receiver, ast.Name) and receiver.id == UNBOUND_PIPE and receiver.id not in self.scope:
            self._check_any_pipeline(node, None if receiver is func else func.attr)
            return
        if isinstance(func, ast.Name):
            target = self._resolve(func)
            if isinstance(target, _Pipe):
                self._check_method(node, target.cls, "__call__", f"{target.cls.__name__}.__call__", instance=True)
            elif _ours(target):
                self._check_signature(node, target, _qualname(target), drop_self=False)
        elif isinstance(func, ast.Attribute):
            owner = self._resolve(func.value)
            if isinstance(owner, _Pipe):
                self._check_method(node, owner.cls, func.attr, f"{owner.cls.__name__}.{func.attr}", instance=True)
            elif inspect.isclass(owner) and _ours(owner):
                self._check_method(node, owner, func.attr, f"{owner.__name__}.{func.attr}", instance=False)
                if func.attr == "from_pretrained" and _is_pipeline_class(owner):
                    self._check_preset(node, owner)
            elif inspect.ismodule(owner) and owner.__name__.startswith("diffsynth."):
                target = self._resolve(func)
                if target is None:
                    self._find(node.lineno, f"module {owner.__name__!r} has no attribute {func.attr!r}")
                elif _ours(target):
                    self._check_signature(node, target, _qualname(target), drop_self=False)

    def _check_any_pipeline(self, node: ast.Call, method: str | None) -> None:
        """`pipe(...)` / `pipe.method(...)` with `pipe` not bound in the section: some pipeline must take it."""
        classes = _all_pipeline_classes()
        if classes is None:
            self._skip(node.lineno, "`pipe` is not bound in this section and some family is not installed here")
            return
        name = method or "__call__"
        having = [c for c in classes if hasattr(c, name) or name in _instance_attributes(c)]
        if not having:
            public = {n for c in classes for n in dir(c) if not n.startswith("_")}
            self._find(node.lineno, f"no pipeline has a method {name!r}{_close(name, public)}")
            return
        strict = [c for c in having if not _takes_var_keyword(getattr(c, name, None))]
        if not strict:
            return  # every pipeline with this method takes **kwargs
        failures: list[Finding] = []
        for cls in strict:
            trial = Report()
            checker = _PythonChecker(trial, self.path, self.block, self.scope)
            checker._check_method(node, cls, name, f"{cls.__name__}.{name}", instance=True)
            if not trial.findings:
                return
            failures += trial.findings
        words = sorted({m for f in failures for m in re.findall(r"takes no argument '(\w+)'", f.message)})
        detail = f"takes no argument {', '.join(map(repr, words))}" if words else failures[0].message
        self._find(node.lineno, f"pipe.{name}(): no pipeline's {name} fits: {detail}")

    def _check_method(self, node: ast.Call, cls: type, name: str, label: str, *, instance: bool) -> None:
        try:
            static = inspect.getattr_static(cls, name)
        except AttributeError:
            if name in getattr(cls, "model_slots", ()) or name in _instance_attributes(cls):
                return  # a model slot or an attribute set in __init__: not a method we can check
            public = [n for n in dir(cls) if not n.startswith("_")]
            self._find(node.lineno, f"{cls.__name__} has no method {name!r}{_close(name, public)}")
            return
        if isinstance(static, property):
            return
        drop_self = instance and not isinstance(static, (staticmethod, classmethod))
        self._check_signature(node, getattr(cls, name), label, drop_self=drop_self, owner=cls)

    def _check_signature(
        self, node: ast.Call, target: Any, label: str, *, drop_self: bool, owner: type | None = None
    ) -> None:
        """The call binds to `target`'s signature; a keyword that lands in its `**kwargs` must be taken where the
        function passes them on (see `_forwarded_accepts`)."""
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return
        params = list(signature.parameters.values())
        if drop_self and params:
            signature = signature.replace(parameters=params[1:])
            params = params[1:]
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        if any(isinstance(a, ast.Starred) for a in node.args) or len(keywords) < len(node.keywords):
            # `*args` / `**kwargs` in the call: only the named keywords can be checked
            if not takes_kwargs:
                for word in keywords:
                    if word not in names:
                        self._find(node.lineno, f"{label}(): takes no argument {word!r}{_close(word, names)}")
        else:
            try:
                signature.bind_partial(*node.args, **{k: None for k in keywords})
            except TypeError as exc:
                message = str(exc)
                unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
                if unknown is not None:
                    word = unknown.group(1)
                    message = f"takes no argument {word!r}{_close(word, names)}"
                self._find(node.lineno, f"{label}(): {message}")
                return
        if takes_kwargs:
            for word in keywords:
                if word not in names and not _forwarded_accepts(target, word, owner):
                    self._find(
                        node.lineno, f"{label}(): takes no argument {word!r} (nor does what it passes **kwargs to)"
                    )

    def _check_preset(self, node: ast.Call, cls: type) -> None:
        source = (
            node.args[0]
            if node.args
            else next((k.value for k in node.keywords if k.arg == "model_id_or_configs"), None)
        )
        if not (isinstance(source, ast.Constant) and isinstance(source.value, str)):
            return
        name = source.value
        if is_path_or_placeholder(name):
            return
        from diffsynth.runtime.registry import installed_families

        family = installed_families().get(getattr(cls, "family", None))
        presets = dict(family.presets) if family is not None else {}
        for key, preset in presets.items():
            if key.lower() == name.lower():
                own = preset.pipeline_class()
                if own is not None and not issubclass(cls, own):
                    self._find(node.lineno, f"{key!r} needs its own pipeline class: {own.__name__}.from_pretrained")
                return
        self._find(node.lineno, f"{name!r} is not a {cls.__name__} preset{_close(name, presets)}")


def _forward_targets(function: Any, owner: type | None) -> tuple[list[Any], set[str]] | None:
    """Where `function` sends its `**kwargs`: (the callables it calls with `**kwargs`, the keywords it reads
    itself: `kwargs.pop("x")`, `kwargs.get("x")`, `kwargs["x"]`, `"x" in kwargs`). None when its source or a target
    cannot be followed (then any keyword is taken: the check never fails on what it cannot see)."""
    func = inspect.unwrap(getattr(function, "__func__", function))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) or definition.args.kwarg is None:
        return None
    varkw = definition.args.kwarg.arg
    parents = {child: node for node in ast.walk(definition) for child in ast.iter_child_nodes(node)}
    local_imports = {
        alias.asname or alias.name: (node.module or "", node.level, alias.name)
        for node in ast.walk(definition)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    targets: list[Any] = []
    read: set[str] = set()
    for node in ast.walk(definition):
        if not (isinstance(node, ast.Name) and node.id == varkw):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.keyword) and parent.arg is None:  # f(..., **kwargs)
            target = _resolve_callee(parents[parent].func, func, owner, local_imports)
            if target is None:
                return None
            targets.append(target)
        elif (
            isinstance(parent, ast.Attribute)
            and parent.attr in ("pop", "get", "setdefault")
            and isinstance(call := parents.get(parent), ast.Call)
            and call.args
            and isinstance(call.args[0], ast.Constant)
        ):
            read.add(call.args[0].value)
        elif isinstance(parent, ast.Subscript) and isinstance(parent.slice, ast.Constant):
            read.add(parent.slice.value)
        elif isinstance(parent, ast.Compare) and isinstance(parent.left, ast.Constant):
            read.add(parent.left.value)
        else:  # used some other way (iterated, passed whole): cannot tell what it takes
            return None
    return targets, read


def _resolve_callee(func_node: ast.expr, function: Any, owner: type | None, local_imports: dict) -> Any | None:
    """The callable a `**kwargs` forwarding call names: `super().name`, `self.name` / `cls.name`, a module-level
    name of the function's module, or a name imported inside the function."""
    if isinstance(func_node, ast.Attribute) and isinstance(func_node.value, ast.Call):
        if isinstance(func_node.value.func, ast.Name) and func_node.value.func.id == "super" and owner is not None:
            defining = next((c for c in owner.__mro__ if _defines(c, function)), None)
            if defining is None:
                return None
            later = owner.__mro__[owner.__mro__.index(defining) + 1 :]
            parent = next((c for c in later if func_node.attr in c.__dict__), None)
            return getattr(parent, func_node.attr) if parent is not None else None
        return None
    if isinstance(func_node, ast.Attribute) and isinstance(func_node.value, ast.Name) and owner is not None:
        if func_node.value.id in ("self", "cls"):
            return getattr(owner, func_node.attr, None)
        return None
    if isinstance(func_node, ast.Name):
        if func_node.id in local_imports:
            module, level, name = local_imports[func_node.id]
            if level:  # `from .x import y` inside a function of `a.b.c` is `a.b.x`
                package = ".".join(function.__module__.split(".")[:-level])
                module = f"{package}.{module}" if module else package
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                return None
        return getattr(function, "__globals__", {}).get(func_node.id)
    return None


def _defines(cls: type, function: Any) -> bool:
    """Whether `cls` itself defines `function` (unwrapping classmethods, staticmethods and decorators)."""
    for value in cls.__dict__.values():
        value = getattr(value, "__func__", value)
        if callable(value) and inspect.unwrap(value) is function:
            return True
    return False


def _forwarded_accepts(function: Any, keyword: str, owner: type | None, depth: int = 0) -> bool:
    """Whether a keyword that lands in `function`'s `**kwargs` is read there or taken by where they are passed."""
    if depth > 5:
        return True
    found = _forward_targets(function, owner)
    if found is None:
        return True
    targets, read = found
    if keyword in read:
        return True
    for target in targets:
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return True
        named = params.get(keyword)
        if named is not None and named.kind in (named.POSITIONAL_OR_KEYWORD, named.KEYWORD_ONLY):
            return True
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            if _forwarded_accepts(target, keyword, owner, depth + 1):
                return True
    return False


def _takes_var_keyword(function: Any) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return True  # nothing to check against


def _ours(obj: Any) -> bool:
    """A function or class of this project (its signature is worth checking)."""
    module = getattr(obj, "__module__", None) or ""
    return (inspect.isclass(obj) or inspect.isfunction(obj)) and module.startswith("diffsynth.")


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj))


def _is_pipeline_class(obj: Any) -> bool:
    if not inspect.isclass(obj):
        return False
    from diffsynth.runtime.pipeline import BasePipeline

    return issubclass(obj, BasePipeline)


@cache
def _instance_attributes(cls: type) -> frozenset[str]:
    """Names the class's `__init__` methods assign to `self` (attributes a README may call, e.g. a tokenizer)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return frozenset(names)


@cache
def _exported_classes() -> dict[str, type]:
    """The classes `diffsynth.runtime` and the installed families export (`__all__`), for sections that use one
    without importing it (`ModelConfig`, `QwenImagePipeline`); a name two packages export as different classes
    is left out."""
    found: dict[str, type] = {}
    ambiguous: set[str] = set()
    for package in ("runtime", *FAMILIES):
        if not _installed(package):
            continue
        module = importlib.import_module(f"diffsynth.{package}")
        for name in getattr(module, "__all__", ()):
            if not name[:1].isupper():
                continue
            try:
                obj = getattr(module, name)
            except Exception:  # noqa: BLE001 - a lazy export that cannot import here
                continue
            if not inspect.isclass(obj):
                continue
            if found.setdefault(name, obj) is not obj:
                ambiguous.add(name)
    return {k: v for k, v in found.items() if k not in ambiguous}


@cache
def _all_pipeline_classes() -> tuple[type, ...] | None:
    """Every pipeline class the families export, or None when some family is not installed (then a method an
    unknown `pipe` calls may belong to a pipeline that is absent here)."""
    if not _all_families_installed():
        return None
    from diffsynth.runtime.pipeline import BasePipeline

    return tuple(c for c in _exported_classes().values() if _is_pipeline_class(c) and c is not BasePipeline)


# ------------------------------------------------------------------------------------------------- shell
def shell_commands(code: str) -> list[tuple[int, list[str], list[str]]]:
    """(line offset in the block, tokens, its physical lines) per logical line: `\\` continuations joined, comments
    dropped, a leading `$ ` prompt removed. Lines that do not tokenize (unbalanced quotes) give the tokens of a
    plain split."""
    out: list[tuple[int, list[str], list[str]]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        start, parts = i, []
        while True:
            line = lines[i]
            if line.rstrip().endswith("\\") and i + 1 < len(lines):
                parts.append(line.rstrip()[:-1])
                i += 1
                continue
            parts.append(line)
            i += 1
            break
        text = " ".join(parts).strip()
        if text.startswith("$ "):
            text = text[2:]
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:
            tokens = text.split("#", 1)[0].split()
        if tokens:
            out.append((start, tokens, lines[start:i]))
    return out


def _segments(tokens: list[str]) -> list[list[str]]:
    """Tokens split into simple commands at shell separators, with redirections and their targets removed."""
    segments: list[list[str]] = [[]]
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in SHELL_SEPARATORS:
            segments.append([])
        elif token in REDIRECTIONS or re.fullmatch(r"\d?>+&?\d*", token):
            skip = not re.fullmatch(r".*&\d", token)
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _find_command(segment: list[str]) -> tuple[str, list[str]] | None:
    """('runtime' | 'train' | 'demo', the arguments) when the segment runs one of our commands."""
    for k, token in enumerate(segment[:-1]):
        if token == "-m" and segment[k + 1] in (RUNTIME_CLI, TRAINING_CLI):
            return ("runtime" if segment[k + 1] == RUNTIME_CLI else "train"), segment[k + 2 :]
    words = [t for t in segment if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t)]  # drop VAR=value
    if words[:2] == ["uv", "run"]:  # `uv run --all-packages --no-dev diffsynth ...`
        words = words[2:]
        while words and words[0].startswith("-"):
            words = words[1:]
    if not words:
        return None
    command = words[0].rsplit("/", 1)[-1]
    kind = {"diffsynth": "runtime", "diffsynth-train": "train", "diffsynth-train-demo": "demo"}.get(command)
    return (kind, words[1:]) if kind else None


@cache
def _parser(kind: str):
    if kind == "runtime":
        from diffsynth.runtime.cli import build_parser
    elif kind == "train":
        from diffsynth.training.config import build_parser
    else:
        from diffsynth.training.demo_recipe import build_parser
    return build_parser()


def _subparsers(parser) -> dict[str, Any]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class _Where:
    """The file line of a token of one logical shell line (the first physical line that holds it)."""

    def __init__(self, first: int, physical: list[str]):
        self.first, self.physical = first, physical

    def __call__(self, token: str = "") -> int:
        return self.first + next((k for k, text in enumerate(self.physical) if token and token in text), 0)


def _check_shell(report: Report, path: str, block: Block) -> None:
    for offset, tokens, physical in shell_commands(block.code):
        where = _Where(block.line + offset, physical)
        for segment in _segments(tokens):
            _check_module_run(report, path, where, segment)
            found = _find_command(segment)
            if found is None:
                continue
            kind, args = found
            if kind in ("train", "demo") and not _installed("training"):
                report.skipped.append(Finding(path, where(), "diffsynth-training is not installed here"))
                continue
            _check_command(report, path, where, kind, args)


def _check_module_run(report: Report, path: str, where: _Where, segment: list[str]) -> None:
    """`python -m diffsynth.x.y` (any launcher): the module exists (when its package is installed)."""
    for k, token in enumerate(segment[:-1]):
        module = segment[k + 1]
        if token != "-m" or not module.startswith("diffsynth."):
            continue
        package = module.split(".")[1] if module.count(".") else ""
        if not _installed(package):
            if package in PACKAGES:
                report.skipped.append(
                    Finding(path, where(module), f"-m {module}: diffsynth.{package} is not installed here")
                )
            else:
                report.findings.append(
                    Finding(path, where(module), f"-m {module}: diffsynth has no package {package!r}")
                )
            continue
        if importlib.util.find_spec(module) is None:
            report.findings.append(Finding(path, where(module), f"-m {module}: no such module"))


def _check_train_yaml(report: Report, path: str, block: Block) -> None:
    """A YAML block that is a `diffsynth-train --config` file (it sets `model` or `dataset_base_path`): every key
    is a trainer flag."""
    try:
        import yaml
    except ImportError:
        return
    try:
        values = yaml.safe_load(block.code)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        report.findings.append(Finding(path, block.line + (mark.line if mark else 0), f"YAML error: {exc}"))
        return
    if not isinstance(values, dict) or not ({"model", "dataset_base_path"} & set(values)):
        return
    if not _installed("training"):
        report.skipped.append(Finding(path, block.line, "diffsynth-training is not installed here"))
        return
    options = _parser("train")._option_string_actions
    lines = block.code.splitlines()
    if isinstance(values.get("model"), str):
        offset = next((k for k, text in enumerate(lines) if text.startswith("model:")), 0)
        trained = "family" not in values
        _check_cli_preset(report, path, block.line + offset, "diffsynth-train config", values["model"], trained=trained)
    for key in values:
        if f"--{key}" in options:
            continue
        offset = next((k for k, text in enumerate(lines) if text.startswith(f"{key}:")), 0)
        flags = [o[2:] for o in options if o.startswith("--")]
        report.findings.append(
            Finding(
                path, block.line + offset, f"diffsynth-train config key {key!r} is not a setting{_close(key, flags)}"
            )
        )


def _check_command(report: Report, path: str, where: _Where, kind: str, args: list[str]) -> None:
    parser = _parser(kind)
    program = {"runtime": "diffsynth", "train": "diffsynth-train", "demo": "diffsynth-train-demo"}[kind]
    commands = _subparsers(parser)
    while commands:  # commands and their own sub-commands (`diffsynth lora extract`)
        first = next((k for k, a in enumerate(args) if not a.startswith("-")), None)
        if first is None or not all(a in parser._option_string_actions for a in args[:first]):
            break
        name = args[first]
        if name not in commands:
            if not is_path_or_placeholder(name):
                report.findings.append(
                    Finding(path, where(name), f"{program} has no command {name!r}{_close(name, commands)}")
                )
            return
        program, parser, args = f"{program} {name}", commands[name], args[first + 1 :]
        commands = _subparsers(parser)
    options = parser._option_string_actions
    for k, raw in enumerate(args):
        token = raw.strip("[],")
        if token == "--":
            break
        if not token.startswith("-") or token in ("-", "--") or re.fullmatch(r"-[\d.]+", token):
            continue
        flag, _, inline = token.partition("=")
        if flag not in options:
            flags = [o for o in options if o.startswith("--")]
            report.findings.append(Finding(path, where(raw), f"{program} has no option {flag!r}{_close(flag, flags)}"))
            continue
        if flag == "--model":
            value = inline or (args[k + 1].strip("[],") if k + 1 < len(args) else "")
            trained = kind == "train" and not any(a.strip("[]").partition("=")[0] == "--family" for a in args)
            _check_cli_preset(report, path, where(value), program, value, trained=trained)


def _check_cli_preset(report: Report, path: str, line: int, program: str, value: str, trained: bool = False) -> None:
    """`--model VALUE` names an installed preset; `trained`: one the trainer takes (a training task, no LoRA)."""
    if not value or value.startswith("-") or is_path_or_placeholder(value):
        return
    if (found := _preset_lookup(value)) is not None:
        family, preset = found
        if trained and preset.loras:
            report.findings.append(
                Finding(
                    path,
                    line,
                    f"{program} --model {value}: a LoRA preset, which the trainer refuses (train on its base model)",
                )
            )
        elif trained and not (preset.training or family.training):
            report.findings.append(
                Finding(path, line, f"{program} --model {value}: family {family.name!r} has no training task")
            )
        return
    if not _all_families_installed():
        missing = [f for f in FAMILIES if not _installed(f)]
        report.skipped.append(
            Finding(
                path,
                line,
                f"--model {value}: not a preset of the installed families (not installed: {', '.join(missing)})",
            )
        )
        return
    report.findings.append(
        Finding(path, line, f"{program} --model {value!r} is not a preset{_close(value, _all_preset_names())}")
    )
