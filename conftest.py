"""Shared setup of the test suite and of the doctests in ``deq_fast/`` (``python -m pytest``).

The Triton kernels run on CPU tensors through Triton's interpreter. ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``deq_fast.kernels`` is first
imported, so it is set here, before any test module imports anything (pytest imports the root
conftest first). On a CUDA machine the kernels stay compiled and the kernel tests use the GPU.

Every ``>>>`` example in the package runs as a doctest, with ``torch`` and ``deq_fast`` in its
namespace.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import deq_fast

    doctest_namespace.update(torch=torch, deq_fast=deq_fast)
