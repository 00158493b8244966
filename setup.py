"""Build of deq_fast: the Python packages plus the optional compiled extension ``deq_fast._C``.

Install against the torch that is already installed (an isolated build environment would download
a multi-GB CUDA torch):

    pip install --no-build-isolation -e .        # development
    pip install --no-build-isolation .

Extension (``deq_fast._C``):
    * the op schemas (``csrc/ops.cpp``), the module init, the backward loop (``csrc/backward/``) and
      the CPU kernels (``csrc/cpu/``): every ``csrc/**/*.cpp`` (always); headers in
      ``csrc/include/deq_fast/`` (included as ``"deq_fast/..."``);
    * plus every ``csrc/**/*.cu`` (``csrc/cuda/``; CUDAExtension) when the installed torch is a
      CUDA build and nvcc is found (``CUDA_HOME``), or when ``DEQ_FAST_FORCE_CUDA=1``. Without a
      GPU on the build machine also set ``CUDA_HOME``; ``TORCH_CUDA_ARCH_LIST`` then defaults to
      :data:`CUDA_ARCH_LIST` (with a GPU visible, torch's own default: the visible GPUs' archs);
    * ``DEQ_FAST_NO_EXT=1`` skips it: a pure-Python install that uses the reference path.
      Without it, a build that cannot make the extension FAILS with a message saying why and how
      to fix it (torch not importable in the build environment: ``--no-build-isolation``; a
      compile error: the compiler's output above it), instead of quietly installing the slower
      reference path: pip shows a failed build's output, but hides a successful one's warnings.
    * ``MAX_JOBS`` limits parallel compile jobs (ninja).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.errors import BaseError

HERE = os.path.dirname(os.path.abspath(__file__))
# TORCH_CUDA_ARCH_LIST when unset and no GPU is visible: A100 and H100 machine code plus sm_90
# PTX, which newer GPUs JIT-compile (.ci/cuda_build_check.sh asserts the PTX is in the built extension).
CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _sources(suffix: str) -> list[str]:
    """Every ``csrc/**/*<suffix>``, relative to setup.py (as setuptools wants), sorted."""
    pattern = os.path.join(HERE, "csrc", "**", "*" + suffix)
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(pattern, recursive=True))


NO_EXT_HINT = ("To install without the extension (the slower Python reference path), set "
               "DEQ_FAST_NO_EXT=1, e.g. DEQ_FAST_NO_EXT=1 pip install --no-build-isolation .")


class ExtensionBuildError(BaseError):
    """deq_fast._C cannot be built; the message says why and how to fix it or opt out
    (setuptools prints it as ``error: ...`` without a traceback)."""


def no_torch_error(exc: BaseException) -> ExtensionBuildError:
    """The error of a build environment without torch (pip's build isolation hides the torch
    that is installed)."""
    return ExtensionBuildError(
        f"deq_fast: cannot build the compiled extension deq_fast._C: torch is not importable in "
        f"the build environment ({exc}). pip's build isolation hides the installed torch: "
        f"install torch first, then build with `pip install --no-build-isolation .`. "
        + NO_EXT_HINT)


def explaining_build_ext(base: type) -> type:
    """``base`` (torch's BuildExtension) whose failure to compile deq_fast._C is re-raised as an
    :class:`ExtensionBuildError` naming the way out (the compiler's output is printed above)."""
    class BuildExtensionExplained(base):
        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:  # CompileError, LinkError, nvcc or ninja failures
                raise ExtensionBuildError(
                    f"deq_fast: compiling the extension deq_fast._C failed ({type(exc).__name__}: "
                    f"{exc}); the compiler's output is above. It needs a C++17 compiler, and for "
                    f"the CUDA kernels an nvcc matching torch's CUDA version, found through "
                    f"CUDA_HOME. " + NO_EXT_HINT) from exc
    return BuildExtensionExplained


def _extensions() -> tuple[list, dict]:
    if _flag("DEQ_FAST_NO_EXT"):
        print("deq_fast: DEQ_FAST_NO_EXT=1, building without deq_fast._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise no_torch_error(exc) from exc
    use_cuda = _flag("DEQ_FAST_FORCE_CUDA") or (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
        and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
    sources = _sources(".cpp")
    # -g0 overrides the -g of Python's CFLAGS: without it the .so carries ~9 MB of debug info
    compile_args = {"cxx": ["-O3", "-g0"]}
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if use_cuda:
        sources += _sources(".cu")
        if not torch.cuda.is_available():  # with a GPU visible torch targets that GPU's arch
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
        compile_args["nvcc"] = ["-O3"]
        ext = cpp_extension.CUDAExtension("deq_fast._C", sources, include_dirs=include_dirs,
                                          extra_compile_args=compile_args)
    else:
        ext = cpp_extension.CppExtension("deq_fast._C", sources, include_dirs=include_dirs,
                                         extra_compile_args=compile_args)
    print(f"deq_fast: building deq_fast._C ({'CPU+CUDA' if use_cuda else 'CPU'}) from "
          f"{len(sources)} sources", file=sys.stderr)
    return [ext], {"build_ext": explaining_build_ext(cpp_extension.BuildExtension)}


def _packages() -> list[str]:
    packages = find_packages(include=["deq_fast", "deq_fast.*"])
    # top-level kernels/ is installed as deq_fast.kernels (never as a top-level `kernels`)
    packages += ["deq_fast.kernels"] + [
        "deq_fast.kernels." + p for p in find_packages(where=os.path.join(HERE, "kernels"))]
    return packages


if __name__ == "__main__":      # as pip and setuptools run it (tests import the helpers)
    try:
        ext_modules, cmdclass = _extensions()
    except ExtensionBuildError as exc:
        sys.exit(f"error: {exc}")
    setup(
        packages=_packages(),
        package_dir={"deq_fast": "deq_fast", "deq_fast.kernels": "kernels"},
        package_data={"deq_fast": ["py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
