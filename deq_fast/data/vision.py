"""Image classification data: the embedded scikit-learn digits and CIFAR-10 python batches.

Both loaders return a :class:`VisionData` holding whole splits as in-memory tensors (the digits
are 1797 images of 8x8; CIFAR-10 is kept as uint8, 150 MB, and normalised per batch), so a training
step slices a tensor instead of running a ``DataLoader`` with worker processes.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["VisionData", "load_digits", "load_cifar10", "CIFAR10_FILES"]

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class VisionData:
    """Train and test splits of an image classification data set.

    Attributes:
        x_train, x_test: images ``(N, C, H, W)``, float32 (already normalised) or uint8 (raw;
            :meth:`transform` normalises a batch).
        y_train, y_test: int64 labels ``(N,)``.
        num_classes: number of classes.
        mean, std: per-channel statistics used by :meth:`transform` for uint8 images.
        name: data set name, for logs.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Turn a batch of stored images into float32 model input ``(B, C, H, W)``."""
        if x.dtype != torch.uint8:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> VisionData:
    """The 8x8 handwritten digits that ship inside scikit-learn (no download).

    A stratified held-out split (``test_fraction`` of each class, fixed by ``split_seed``, not by the
    training seed, so every run is evaluated on the same images); pixels scaled from [0, 16] and
    standardised with the training split's mean and standard deviation.

    Args:
        test_fraction: share of each class held out for testing, in (0, 1).
        split_seed: seed of the split permutation.

    Returns:
        :class:`VisionData` with ``x_train (1438, 1, 8, 8)``, ``x_test (359, 1, 8, 8)`` float32 at
        the default fraction, 10 classes.

    Example:
        >>> d = load_digits()
        >>> d.x_train.shape, d.num_classes
        (torch.Size([1438, 1, 8, 8]), 10)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the embedded digits data set needs scikit-learn: pip install \"deq_fast[train]\"; "
            "or pass --data cifar10 --data_dir DIR") from exc
    bunch = _sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0          # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(test_fraction * len(idx)))].tolist())
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    x_train, x_test = images[~test_mask], images[test_mask]
    mean, std = float(x_train.mean()), float(x_train.std())
    norm = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1).contiguous()  # noqa: E731
    return VisionData(norm(x_train), torch.from_numpy(labels[~test_mask]),
                      norm(x_test), torch.from_numpy(labels[test_mask]), 10, "digits")


_CIFAR_EXPECTED = ("a pickled dict with b'data' (N, 3072) uint8 and b'labels' (N ints in 0..9), "
                   "as in cifar-10-python.tar.gz")


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 (N, 3, 32, 32), int64 (N,)); ValueError if malformed."""
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # damaged pickles raise many types: OverflowError, MemoryError, ...
        raise ValueError(
            f"CIFAR-10 file {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc)[:200]}); expected {_CIFAR_EXPECTED}") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR-10 file {path}: expected a pickled dict, got {type(entry).__name__}")
    # Files written by Python 3 pickle may carry str keys; accept both.
    get = lambda k: entry.get(k.encode(), entry.get(k))  # noqa: E731
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        keys = sorted(str(k) for k in entry)
        raise ValueError(f"CIFAR-10 file {path}: missing key 'data' or 'labels' (found {keys})")
    try:
        data = np.asarray(data)
        labels = np.asarray(labels)
    except Exception as exc:  # ragged lists, exotic objects, out of memory
        raise ValueError(f"CIFAR-10 file {path}: 'data' or 'labels' is not an array "
                         f"({type(exc).__name__}: {str(exc)[:200]}); expected "
                         f"{_CIFAR_EXPECTED}") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 file {path}: 'data' must be uint8 of shape (N, 3072), "
                         f"got {data.dtype} {tuple(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 file {path}: 'labels' must have {data.shape[0]} entries "
                         f"(one per image), got shape {tuple(labels.shape)}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR-10 file {path}: 'labels' must be integers in 0..9, got dtype "
                         f"{labels.dtype} (first label {labels[:1].tolist()[0]!r})")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 file {path}: labels must be in 0..9, "
                         f"got range [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: str) -> VisionData:
    """CIFAR-10 from its standard python batches in ``root``.

    ``root`` is the extracted ``cifar-10-batches-py`` directory (or its parent) holding
    ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``: pickled dicts with ``b'data'``
    (N, 3072) uint8 in channel-major order and ``b'labels'`` (N ints in 0..9).

    Args:
        root: directory with the batch files.

    Returns:
        :class:`VisionData` with uint8 images ``(50000, 3, 32, 32)`` / ``(10000, 3, 32, 32)``
        (fewer for smaller files) and the standard per-channel mean/std for normalisation.

    Raises:
        FileNotFoundError: ``root`` or a batch file is missing (the message lists what is expected).
        ValueError: a file is corrupt, truncated, or has the wrong keys/shapes/labels.

    Example:
        Six tiny batch files of two images each (the real batches give ``x_train`` of shape
        ``(50000, 3, 32, 32)``):

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for name in CIFAR10_FILES:
        ...         with open(os.path.join(root, name), "wb") as fh:
        ...             pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 7]}, fh)
        ...     d = load_cifar10(root)
        >>> d.x_train.shape, d.x_test.shape, d.y_test.tolist()
        (torch.Size([10, 3, 32, 32]), torch.Size([2, 3, 32, 32]), [3, 7])
    """
    if not root:
        raise ValueError("--data_dir is required for cifar10 (the extracted cifar-10-batches-py "
                         "directory)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10 data directory {root!r} does not exist; expected a "
                                f"directory holding {', '.join(CIFAR10_FILES)}")
    if not os.path.exists(os.path.join(root, "test_batch")) and os.path.isdir(
            os.path.join(root, "cifar-10-batches-py")):
        root = os.path.join(root, "cifar-10-batches-py")
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 data directory {root!r} lacks {', '.join(missing)}; "
                                f"expected {', '.join(CIFAR10_FILES)}")
    parts = [_read_cifar_batch(os.path.join(root, f)) for f in CIFAR10_FILES]
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    y_train = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    x_test, y_test = torch.from_numpy(parts[5][0]), torch.from_numpy(parts[5][1])
    return VisionData(x_train, y_train, x_test, y_test, 10, "cifar10", _CIFAR_MEAN, _CIFAR_STD)
