"""Data for the training command: embedded defaults (no download) and loaders for files on disk.

======================  =========  ==========================================================
name (``--data``)        kind       source
======================  =========  ==========================================================
``digits``               vision     scikit-learn's 8x8 handwritten digits (ships in the package)
``cifar10``              vision     CIFAR-10 python batches in ``--data_dir``
``pydoc``                language   CPython's ``pydoc_data.topics`` text, byte level
``wikitext103``          language   WikiText-103 token files in ``--data_dir``, word level
======================  =========  ==========================================================
"""
from __future__ import annotations

from .text import WIKITEXT_FILES, LMData, lm_windows, load_pydoc_text, load_wikitext103, unigram_loss
from .vision import CIFAR10_FILES, VisionData, load_cifar10, load_digits

__all__ = ["DATASETS", "load_data", "VisionData", "LMData", "load_digits", "load_cifar10",
           "load_pydoc_text", "load_wikitext103", "lm_windows", "unigram_loss", "CIFAR10_FILES",
           "WIKITEXT_FILES"]

#: data set name -> (kind, needs --data_dir)
DATASETS = {"digits": ("vision", False), "cifar10": ("vision", True),
            "pydoc": ("lm", False), "wikitext103": ("lm", True)}


def load_data(name: str, data_dir: str | None = None) -> VisionData | LMData:
    """Load a data set by name (see the module table).

    Args:
        name: one of :data:`DATASETS`.
        data_dir: directory of the files for ``cifar10`` / ``wikitext103``; ignored otherwise.

    Returns:
        :class:`VisionData` or :class:`LMData`.

    Raises:
        ValueError: unknown name, or a malformed file.
        FileNotFoundError: a missing directory or file.

    Example:
        >>> load_data("digits").num_classes
        10
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}")
    if name == "digits":
        return load_digits()
    if name == "pydoc":
        return load_pydoc_text()
    if name == "cifar10":
        return load_cifar10(data_dir or "")
    return load_wikitext103(data_dir or "")
