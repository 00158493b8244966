"""setup.py's decision about the compiled extension: a build that cannot make ``deq_fast._C``
fails loudly with the way out (``--no-build-isolation``, ``DEQ_FAST_NO_EXT=1``) instead of
quietly installing the slower reference path; ``DEQ_FAST_NO_EXT=1`` opts out."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
from setuptools.errors import CompileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's helpers, without running setup()."""
    return runpy.run_path(SETUP, run_name="setup_helpers")


def test_build_without_torch_fails_naming_both_ways_out(setup_py, monkeypatch):
    monkeypatch.delenv("DEQ_FAST_NO_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)             # `import torch` raises
    with pytest.raises(setup_py["ExtensionBuildError"]) as exc:
        setup_py["_extensions"]()
    msg = str(exc.value)
    assert "torch is not importable in the build environment" in msg
    assert "pip install --no-build-isolation ." in msg and "DEQ_FAST_NO_EXT=1" in msg


def test_opting_out_builds_without_the_extension(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert setup_py["_extensions"]() == ([], {})
    assert "DEQ_FAST_NO_EXT=1, building without deq_fast._C" in capsys.readouterr().err


class _Compiler:
    """Stands in for torch's BuildExtension: fails like a missing compiler, or records."""

    fail = True
    built = False

    def build_extensions(self):
        if self.fail:
            raise CompileError("command 'c++' failed: No such file or directory")
        self.built = True


def test_compile_failure_is_explained(setup_py):
    command = setup_py["explaining_build_ext"](_Compiler)()
    with pytest.raises(setup_py["ExtensionBuildError"]) as exc:
        command.build_extensions()
    msg = str(exc.value)
    assert "compiling the extension deq_fast._C failed (CompileError: command 'c++' failed" in msg
    assert "C++17 compiler" in msg and "DEQ_FAST_NO_EXT=1" in msg
    assert isinstance(exc.value.__cause__, CompileError)
    command.fail = False
    command.build_extensions()                                  # a good build passes through
    assert command.built


def test_setup_py_without_torch_exits_with_the_message_pip_shows():
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"runpy.run_path({SETUP!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "DEQ_FAST_NO_EXT"}
    r = subprocess.run([sys.executable, "-c", code, "--name"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("error: deq_fast: cannot build the compiled extension") \
        and "Traceback" not in r.stderr
