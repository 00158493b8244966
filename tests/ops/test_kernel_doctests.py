"""The ``>>>`` examples of the Triton launchers (``kernels/``, installed as ``deq_fast.kernels``).

They run through the installed import path: collecting ``kernels/`` by path would import it as a
top-level package called ``kernels``. On CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set by the root conftest before anything imports them).
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
import triton  # noqa: F401  (a declared test dependency: imported, never skipped)

import deq_fast.kernels

# the interpreter evaluates with numpy, which warns where the kernels divide by zero before masking
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

MODULES = sorted(m.name for m in pkgutil.iter_modules(deq_fast.kernels.__path__)
                 if not m.name.startswith("_"))
@pytest.mark.parametrize("name", MODULES)
def test_kernel_examples(name: str) -> None:
    module = importlib.import_module(f"deq_fast.kernels.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch}, report=True)
    assert result.attempted > 0, f"deq_fast.kernels.{name} has no >>> examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed (see stdout)"


def test_every_kernel_module_is_covered() -> None:
    assert MODULES == ["anderson", "broyden", "fixed_point", "status"]


def test_launch_plan_examples() -> None:
    """The shared launch-plan helpers (``_common``: private, so not in ``MODULES``)."""
    from deq_fast.kernels import _common
    result = doctest.testmod(_common, report=True)
    assert result.attempted > 0 and result.failed == 0
