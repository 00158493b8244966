"""Language-model data: the embedded CPython documentation text and WikiText-103 token files.

Both loaders return an :class:`LMData` holding each split as one flat int64 token stream; batches
are windows cut from it (:func:`lm_windows`).
"""
from __future__ import annotations

import os
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["LMData", "load_pydoc_text", "load_wikitext103", "lm_windows", "unigram_loss",
           "WIKITEXT_FILES"]

WIKITEXT_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


@dataclass
class LMData:
    """Token streams of a language-modelling corpus.

    Attributes:
        train, valid, test: int64 token ids ``(T,)``.
        vocab_size: number of distinct ids.
        itos: id -> token string for word-level corpora; ``None`` for byte-level (id = byte).
        name: corpus name, for logs.
        files: split name (``"train"``, ``"valid"``, ``"test"``) -> the file it was read from;
            ``None`` for embedded corpora.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    name: str
    itos: list[str] | None = None
    files: dict[str, str] | None = None

    def decode(self, ids: torch.Tensor) -> str:
        """Token ids ``(T,)`` back to text (bytes decoded with replacement)."""
        if self.itos is None:
            return bytes(ids.tolist()).decode("utf-8", errors="replace")
        return " ".join(self.itos[i] for i in ids.tolist())


def load_pydoc_text(valid_fraction: float = 0.05) -> LMData:
    """CPython's own documentation text (``pydoc_data.topics``) as a byte-level corpus.

    It ships with every CPython install (about 466 KB of UTF-8), so it needs no download. The topics
    are joined in sorted key order; the last ``valid_fraction`` of the bytes is the validation split
    (also used as test split).

    Args:
        valid_fraction: share of the stream held out, in (0, 0.5].

    Returns:
        :class:`LMData` with ``vocab_size=256``.

    Example:
        >>> d = load_pydoc_text()
        >>> d.vocab_size, d.train.dtype
        (256, torch.int64)
    """
    if not 0.0 < valid_fraction <= 0.5:
        raise ValueError(f"valid_fraction must be in (0, 0.5], got {valid_fraction}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - stripped Python builds
        raise RuntimeError("this Python has no pydoc_data.topics (the embedded LM corpus); pass "
                           "--data wikitext103 --data_dir DIR") from exc
    raw = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    n_valid = int(len(ids) * valid_fraction)
    train, valid = ids[:-n_valid].clone(), ids[-n_valid:].clone()
    return LMData(train, valid, valid, 256, "pydoc")


def _token_lines(path: str) -> Iterator[list[str]]:
    """Stream the lines of a token file as token lists; ValueError naming the file if it is not
    UTF-8 text. Streaming keeps WikiText-103 (540 MB, 103M tokens) out of memory as strings."""
    try:
        fh = open(path, "r", encoding="utf-8", errors="strict", newline=None)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read WikiText file {path}: {exc}") from exc
    with fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if "\x00" in line:
                    raise ValueError(f"WikiText file {path} contains NUL bytes (line {lineno}): "
                                     "corrupt or not a token file (expected UTF-8 text)")
                yield line.split()
        except UnicodeDecodeError as exc:
            raise ValueError(f"WikiText file {path} is not valid UTF-8 near line {lineno + 1}: "
                             "corrupt or truncated (expected UTF-8 text)") from exc


def load_wikitext103(root: str) -> LMData:
    """WikiText-103 (word level) from its token files in ``root``.

    Reads ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``; every line becomes its
    tokens followed by ``<eos>``. The vocabulary is built from the training split, ordered by
    decreasing frequency (ties by token), so ids are deterministic; tokens of the other splits that
    are not in it map to ``<unk>``. Files are streamed twice (count, then encode into an int64
    buffer), so memory stays near 8 bytes per token.

    Args:
        root: directory with the three files (e.g. the extracted ``wikitext-103``).

    Returns:
        :class:`LMData` with word-level ``itos``.

    Raises:
        FileNotFoundError: ``root`` or a file is missing (the message lists what is expected).
        ValueError: a file is empty, binary, or not valid UTF-8.

    Example:
        Three tiny token files in WikiText's layout (on the full WikiText-103, ``d.vocab_size`` is
        267735):

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for name in WIKITEXT_FILES:
        ...         with open(os.path.join(root, name), "w") as fh:
        ...             print(" the cat sat on the mat ", file=fh)
        ...             print(" the dog ", file=fh)
        ...     d = load_wikitext103(root)
        >>> d.vocab_size, d.itos[:3], d.decode(d.train[:7])
        (8, ['the', '<eos>', 'cat'], 'the cat sat on the mat <eos>')
    """
    paths = _wikitext_paths(root)
    itos = _wikitext_vocabulary(paths)
    stoi = {t: i for i, t in enumerate(itos)}
    train, valid, test = (_encode_lines(p, stoi) for p in paths)
    return LMData(train, valid, test, len(itos), "wikitext103", itos,
                  dict(zip(("train", "valid", "test"), paths)))


def _wikitext_paths(root: str) -> list[str]:
    """The train, valid and test files in ``root``; errors name what is missing."""
    if not root:
        raise ValueError("--data_dir is required for wikitext103 (the directory holding "
                         f"{', '.join(WIKITEXT_FILES)})")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"WikiText-103 data directory {root!r} does not exist; expected a "
                                f"directory holding {', '.join(WIKITEXT_FILES)}")
    missing = [f for f in WIKITEXT_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(f"WikiText-103 data directory {root!r} lacks {', '.join(missing)}; "
                                f"expected {', '.join(WIKITEXT_FILES)}")
    return [os.path.join(root, f) for f in WIKITEXT_FILES]


def _wikitext_vocabulary(paths: list[str]) -> list[str]:
    """id -> token of the training split (``paths[0]``) by decreasing frequency (ties by token),
    with ``<eos>`` counted once per line and ``<unk>`` appended if absent; every file is checked
    (valid UTF-8 text, not empty) before any work is kept."""
    counts: Counter = Counter()
    n_lines = 0
    for tokens in _token_lines(paths[0]):
        counts.update(tokens)
        n_lines += 1
    for path in paths[1:]:
        for _ in _token_lines(path):
            pass
    for path in paths:
        with open(path, "rb") as fh:
            if not fh.read(1 << 16).strip():
                raise ValueError(f"WikiText file {path} is empty (truncated download?); expected "
                                 "whitespace-separated tokens, one paragraph per line")
    counts["<eos>"] += n_lines
    itos = sorted(counts, key=lambda t: (-counts[t], t))
    if "<unk>" not in counts:
        itos.append("<unk>")
    return itos


def _encode_lines(path: str, stoi: dict[str, int]) -> torch.Tensor:
    """The file's tokens as int64 ids, ``<eos>`` after each line, ``<unk>`` for unknown tokens."""
    unk, eos = stoi["<unk>"], stoi["<eos>"]
    out = array("q")
    for tokens in _token_lines(path):
        out.extend(stoi.get(t, unk) for t in tokens)
        out.append(eos)
    return torch.frombuffer(out, dtype=torch.int64).clone() if len(out) else \
        torch.zeros(0, dtype=torch.int64)


def lm_windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor,
                                                                                  torch.Tensor]:
    """Cut input/target windows from a token stream.

    Args:
        tokens: int64 ``(T,)``.
        starts: int64 ``(B,)`` window starts, each ``<= T - seq_len - 1``.
        seq_len: window length ``L``.

    Returns:
        ``(inputs, targets)``, both ``(B, L)``; targets are inputs shifted by one.

    Example:
        >>> x, y = lm_windows(torch.arange(10), torch.tensor([0, 3]), 4)
        >>> x.tolist(), y[0].tolist()
        ([[0, 1, 2, 3], [3, 4, 5, 6]], [1, 2, 3, 4])
    """
    idx = starts.view(-1, 1) + torch.arange(seq_len + 1).view(1, -1)
    win = tokens[idx]
    return win[:, :-1], win[:, 1:]


def unigram_loss(data: LMData, split: str = "valid") -> float:
    """Cross-entropy (nats/token) of the training split's unigram distribution on ``split``.

    Add-one smoothing, so unseen tokens get finite loss. The baseline an LM must beat.
    """
    counts = torch.bincount(data.train, minlength=data.vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[getattr(data, split)].mean())
