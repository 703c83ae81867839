"""Loading a test package's helper file as a module (tests only).

pytest's importlib mode keeps test modules from importing each other; a package's conftest loads the files
its tests share (tiny repos, helpers) under a unique name with `load_beside`, and the tests import that name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_beside(anchor: str | Path, filename: str, name: str) -> ModuleType:
    """The file `filename` next to `anchor` (a conftest's `__file__`) as the module `name`, loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(anchor).with_name(filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
