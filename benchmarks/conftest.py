"""Shared pytest configuration of the benchmarks.

* Collects ``bench_*.py`` files (pytest alone collects only ``test_*.py``) when ``benchmarks/``
  is named on the command line, so ``pytest benchmarks/ --benchmark-only`` needs no ini option
  and a plain ``pytest`` (the test suite) does not run the benchmarks.
* Adds the machine, the library versions and the git commit to every result that
  pytest-benchmark saves (``--benchmark-autosave`` / ``--benchmark-save=NAME`` / ``--benchmark-json``).

``describe_machine()`` is also used by ``report.py`` so that both kinds of saved results carry the
same description of where they were measured.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """``<sha>`` of the checkout the benchmarks ran from, ``<sha>-dirty`` with local changes
    (``unknown`` outside a git checkout)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def describe_machine() -> dict:
    """Where and with what a result was measured: platform, CPU, GPU, versions, commit.

    Returns:
        a JSON-serialisable dict, e.g. ``{"platform": "Linux-6.8-x86_64", "cpu_count": 2,
        "torch": "2.13.0+cpu", "torchdeq": "0.1.0", "git_commit": "c7294d0...", ...}``.
    """
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchdeq": _version("torchdeq"),
        "deq_fast": _version("deq_fast"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
    }
    return info


def machine_line(info: dict) -> str:
    """One line for reports: ``Linux-..., 2 CPUs (2 torch threads), torch 2.13.0+cpu, ...``."""
    gpu = f", GPU {info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else ", no GPU"
    return (f"{info['platform']}, {info['cpu_count']} CPUs (torch threads: {info['torch_threads']})"
            f"{gpu}, Python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
            f"torchdeq {info['torchdeq']}, deq_fast {info['deq_fast']}, commit {info['git_commit']}")


def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark hook: record versions and commit in the saved JSON's ``machine_info``."""
    machine_info["deq_fast_bench"] = describe_machine()


def _benchmarks_requested(config) -> bool:
    """True when ``benchmarks/`` (or something inside it) was named on the command line: a plain
    ``pytest`` from the repository root (the CI test command) must not run the benchmarks."""
    here = Path(__file__).resolve().parent
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == here or here in path.parents:
            return True
    return False


def pytest_collect_file(file_path: Path, parent):
    """Collect ``bench_*.py`` as test modules (their functions are ``test_*``) when the benchmarks
    were asked for. A file named on the command line is collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path) and _benchmarks_requested(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption("--bench-rounds", type=int, default=3,
                     help="timed rounds per solver benchmark (after one warm-up round); default 3")


@pytest.fixture
def bench_rounds(request) -> int:
    """Timed rounds per benchmark (``--bench-rounds``)."""
    rounds = request.config.getoption("--bench-rounds")
    if rounds < 1:
        raise ValueError(f"--bench-rounds must be >= 1, got {rounds}")
    return rounds
