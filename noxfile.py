"""Test sessions. `nox` runs the CPU ones; `nox -s gpu` and `nox -s bench` need a CUDA machine.

Every session gets its own venv (uv backend) and installs only what it tests, pinned to `uv.lock`:
- tests(package): one package and what it declares (plus runtime from this checkout), so a missing
  dependency fails there instead of hiding behind another package's;
- isolation(family): the family's wheel and the runtime's wheel alone, then its smoke test, and a
  check that no other family is importable;
- parity: every package plus the reference libraries (diffusers, transformers), tests marked parity;
- lint: ruff.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests", "isolation", "parity", "integration"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PACKAGES = ["runtime", "z-image", "flux", "qwen-image", "wan", "ltx2", "training"]
FAMILIES = ["z-image", "flux", "qwen-image", "wan", "ltx2"]
TEST_DEPS = ["pytest>=8", "pytest-timeout>=2.3"]
REPORTS = ROOT / ".nox" / "reports"


def _constraints() -> str:
    """Pin third-party versions to uv.lock (workspace members are installed from this checkout)."""
    path = ROOT / ".nox" / "constraints.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "uv",
            "export",
            "--frozen",
            "--no-hashes",
            "--no-emit-workspace",
            "--all-packages",
            "--all-groups",
            "--all-extras",
            "--no-header",
            "--no-annotate",
            "-o",
            str(path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return str(path)


# the reference implementations the metric parity tests compare with (LPIPS' own package needs torchvision)
METRIC_REFERENCES = ("lpips==0.1.*", "torchvision")

# optional extras a package's own tests exercise (its tests skip without them)
TEST_EXTRAS = {"runtime": "[quant]", "training": "[deepspeed,optim,track]"}


def _local_deps(package: str) -> list[str]:
    """The package folder (with the extras its tests exercise) plus the runtime it depends on (not published
    to an index yet)."""
    if package == "runtime":
        return [f"packages/runtime{TEST_EXTRAS['runtime']}"]
    return ["packages/runtime", f"packages/{package}{TEST_EXTRAS.get(package, '')}"]


def _pytest(session: nox.Session, name: str, *args: str, allow_empty: bool = False) -> None:
    """pytest with a junit report; `allow_empty` accepts a selection with no tests (pytest exit 5)."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    session.run(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={REPORTS / name}.xml",
        *args,
        *session.posargs,
        success_codes=[0, 5] if allow_empty else [0],
    )


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """CPU tests of one package, in a venv holding only that package and what it declares."""
    session.install("-c", _constraints(), *_local_deps(package), *TEST_DEPS)
    _pytest(
        session, f"tests-{package}", f"packages/{package}/tests", "-m", "not parity and not gpu and not integration"
    )


@nox.session
@nox.parametrize("family", FAMILIES)
def isolation(session: nox.Session, family: str) -> None:
    """Install one family's wheel alone, import it, run its smoke test, and see the others are absent."""
    dist = Path(session.create_tmp()) / "dist"
    for package in ("runtime", family):
        session.run("uv", "build", "--wheel", "-q", "-o", str(dist), f"packages/{package}", external=True)
    session.install("-c", _constraints(), *sorted(str(p) for p in dist.glob("*.whl")), *TEST_DEPS)
    module = family.replace("-", "_")
    others = [f.replace("-", "_") for f in FAMILIES if f != family]
    session.run(
        "python",
        "-c",
        "import importlib.util, sys\n"
        f"import diffsynth.{module}\n"
        f"present = [m for m in {others!r} if importlib.util.find_spec('diffsynth.' + m) is not None]\n"
        "sys.exit(f'other families importable: {present}' if present else 0)",
    )
    smoke = ROOT / "packages" / family / "tests" / "test_smoke.py"
    _pytest(session, f"isolation-{family}", str(smoke), "-m", "not parity and not gpu")


@nox.session
def parity(session: nox.Session) -> None:
    """Numerical parity against diffusers / transformers on tiny configs (CPU, fp32)."""
    session.install(
        "-c",
        _constraints(),
        *[f"packages/{p}" for p in PACKAGES],
        *TEST_DEPS,
        "diffusers==0.42.*",
        "transformers>=5.0",
        *METRIC_REFERENCES,
    )
    _pytest(session, "parity", "packages", "-m", "parity and not gpu and not integration")
    # the ours-vs-diffusers benchmark scripts run on GPUs only; a tiny CPU dry run here keeps them from rotting
    # (all in one process: the imports are paid once)
    session.run("python", str(ROOT / "benchmarks" / "dry_run.py"), silent=True)


@nox.session
def integration(session: nox.Session) -> None:
    """Tests that cross packages (a family trained by the trainer), with every package installed."""
    session.install("-c", _constraints(), *[f"packages/{p}{TEST_EXTRAS.get(p, '')}" for p in PACKAGES], *TEST_DEPS)
    _pytest(session, "integration", "packages", "-m", "integration and not parity and not gpu", allow_empty=True)
    # a family's tests of its training task skip in its own session (no trainer there): here they run
    _pytest(
        session,
        "integration-family-training",
        *_family_training_tests(),
        "-m",
        "not integration and not parity and not gpu",
    )


def _family_training_tests() -> list[str]:
    """The family test files that use the trainer (`diffsynth.training`)."""
    files = sorted(ROOT.glob("packages/*/tests/test_*.py"))
    return [
        str(f) for f in files if f.parts[-3] != "training" and "diffsynth.training" in f.read_text(encoding="utf-8")
    ]


@nox.session
def gpu(session: nox.Session) -> None:
    """Tests marked gpu (skipped without CUDA)."""
    session.install(
        "-c", _constraints(), *[f"packages/{p}" for p in PACKAGES], *TEST_DEPS, "diffusers==0.42.*", "transformers>=5.0"
    )
    _pytest(session, "gpu", "packages", "-m", "gpu", allow_empty=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks side by side with diffusers (needs a GPU); results go to benchmarks/results/."""
    session.install(
        "-c", _constraints(), *[f"packages/{p}" for p in PACKAGES], "diffusers==0.42.*", "transformers>=5.0"
    )
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check, plus the PEP 420 namespace rule."""
    session.install("-c", _constraints(), "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    stray = sorted(str(p) for p in ROOT.glob("packages/*/src/diffsynth/__init__.py"))
    if stray:
        session.error(f"{stray} break the diffsynth namespace package (PEP 420): remove them")
