"""Sphinx configuration of the deq_fast documentation (``sphinx-build -W --keep-going -b html docs
docs/_build/html``; the pages are Markdown, read by MyST-Parser; the API reference is autodoc with
napoleon over the Google-style docstrings)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the same switch as the test suite's conftest.py: the kernels import under Triton's interpreter
# on machines without CUDA, so autodoc reads deq_fast.kernels everywhere
os.environ.setdefault("TRITON_INTERPRET", "1")

import deq_fast  # noqa: E402

project = "deq_fast"
author = "The deq_fast authors"
copyright = "the deq_fast authors, MIT licence"
release = version = deq_fast.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# GitHub's heading anchors (``contracts.md#torchdeq-solvers``), which the code cites
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# no network at build time: references to torch/Python objects stay plain text
intersphinx_mapping: dict = {}

html_theme = "alabaster"
html_title = f"deq_fast {release}"
