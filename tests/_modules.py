"""Loading a file of the repository as a module by path, for the tests that exercise scripts.

The benchmarks import their own ``benchmarks/conftest.py`` by name (``import conftest``), so the
root ``conftest.py`` (registered by pytest as ``conftest``) is set aside while such a module loads.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_module(name: str, path: pathlib.Path) -> ModuleType:
    """The module at ``path``, registered as ``sys.modules[name]`` (dataclasses look their module
    up there), with the root conftest set aside while it runs."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    root_conftest = sys.modules.pop("conftest", None)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("conftest", None)
        if root_conftest is not None:
            sys.modules["conftest"] = root_conftest
    return module
