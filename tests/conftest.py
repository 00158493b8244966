"""Shared test setup.

The Triton kernels run on CPU tensors through Triton's interpreter. ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``deq_fast.kernels`` is first
imported, so it is set here, before any test module imports anything (pytest imports conftest
first). On a CUDA machine the kernels stay compiled and the kernel tests use the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
