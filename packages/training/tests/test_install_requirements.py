"""What a user with an older or partial install is told: FSDP2 on accelerate < 1.6, a .toml dataset config on
Python 3.10 without tomli, and a --family whose package is not installed. Each is a ConfigError saying what to
install, not a misleading message or a bare ImportError."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffsynth.runtime.errors import ConfigError
from diffsynth.training import datasets, task
from diffsynth.training.distributed import check_mode


# ----------------------------------------------------------------------------------- FSDP2 and accelerate
def fsdp_accelerator(plugin) -> SimpleNamespace:
    return SimpleNamespace(distributed_type="DistributedType.FSDP", state=SimpleNamespace(fsdp_plugin=plugin))


def test_fsdp_on_accelerate_without_fsdp_version_asks_for_a_newer_accelerate(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    plugin = SimpleNamespace(sharding_strategy="FULL_SHARD")  # accelerate < 1.6: no fsdp_version attribute
    with pytest.raises(ConfigError, match=r"FSDP2 needs accelerate>=1\.6 \(installed .+\): pip install -U accelerate"):
        check_mode(fsdp_accelerator(plugin))
    with pytest.raises(ConfigError, match="configured for FSDP version 1"):
        check_mode(fsdp_accelerator(SimpleNamespace(fsdp_version=1)))
    check_mode(fsdp_accelerator(SimpleNamespace(fsdp_version=2)))


# ----------------------------------------------------------------------------------- .toml on Python 3.10
@pytest.fixture
def toml_config(tmp_path):
    path = tmp_path / "datasets.toml"
    path.write_text('[[datasets]]\nbase_path = "."\nrepeats = 2\n')
    return path


def test_toml_dataset_config_without_tomllib_or_tomli_names_the_file(monkeypatch, toml_config):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what `import tomllib` sees on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match=r"datasets\.toml: a \.toml dataset config needs Python 3\.11\+ or "):
        datasets._read(toml_config)


def test_toml_dataset_config_falls_back_to_tomli(monkeypatch, toml_config):
    parser = pytest.importorskip("tomllib")
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", parser)  # tomli is the same parser under another name
    items, general = datasets._read(toml_config)
    assert items == [{"base_path": ".", "repeats": 2}] and general == {}


# ----------------------------------------------------------------------------------- family not installed
@pytest.mark.parametrize(("family", "package"), [("wan", "diffsynth-wan"), ("z-image", "diffsynth-z-image")])
def test_a_known_family_that_is_not_installed_names_its_package(monkeypatch, family, package):
    monkeypatch.setattr(task, "trainable_families", lambda: {})
    with pytest.raises(ConfigError, match=f"--family {family} needs the {package} package: pip install {package}"):
        task.task_class(SimpleNamespace(family=family, model=None))


def test_an_unknown_family_still_lists_the_installed_ones(monkeypatch):
    monkeypatch.setattr(task, "trainable_families", lambda: {"flux": "diffsynth.flux.training:FluxTrainingTask"})
    with pytest.raises(ConfigError, match=r"--family 'no_such' has no training task; installed families .*flux"):
        task.task_class(SimpleNamespace(family="no_such", model=None))


# ----------------------------------------------------------------------------------- the license shipped
WORKSPACE = Path(__file__).parents[3]


def test_every_package_ships_the_apache_license_it_declares():
    """Each package declares `license = "Apache-2.0"`; its LICENSE (found by the build backend, put in the wheel's
    dist-info/licenses) is the repository's, the full Apache 2.0 text."""
    text = (WORKSPACE / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    packages = [p.parent for p in sorted((WORKSPACE / "packages").glob("*/pyproject.toml"))]
    assert packages
    for package in packages:
        assert 'license = "Apache-2.0"' in (package / "pyproject.toml").read_text(), package.name
        assert (package / "LICENSE").is_file() and (package / "LICENSE").read_text() == text, package.name
