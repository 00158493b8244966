"""Data loaders: embedded digits and docs text, CIFAR-10 batches and WikiText-103 files on disk."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch

from deq_fast.data import (
    CIFAR10_FILES,
    WIKITEXT_FILES,
    lm_windows,
    load_cifar10,
    load_data,
    load_digits,
    load_pydoc_text,
    load_wikitext103,
    unigram_loss,
)


# ------------------------------------------------------------------------------ embedded data
def test_digits_split_is_stratified_fixed_and_normalised():
    import sklearn  # noqa: F401  (a declared test dependency)
    d = load_digits()
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.bincount(d.y_test, minlength=10).min() >= 35          # every class held out
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-3
    again = load_digits()
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.y_test, again.y_test)
    other = load_digits(split_seed=1)
    assert not torch.equal(d.y_test, other.y_test)                     # the seed matters
    # no image is in both splits
    train_rows = {tuple(r) for r in d.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in d.x_test.flatten(1).tolist())
    assert overlap <= 2   # the raw data set contains a couple of duplicate images


def test_digits_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_pydoc_text_is_bytes_and_decodes():
    d = load_pydoc_text()
    assert d.vocab_size == 256 and d.train.dtype == torch.int64
    assert int(d.train.max()) < 256 and int(d.train.min()) >= 0
    assert len(d.valid) > 10_000
    from pydoc_data.topics import topics
    first = topics[sorted(topics)[0]]
    assert d.decode(d.train[:200]) == first.encode()[:200].decode("utf-8", errors="replace")


def test_unigram_loss_matches_direct_formula_and_lm_windows():
    from deq_fast.data import LMData
    train = torch.tensor([0, 0, 1, 2, 0, 1])
    valid = torch.tensor([0, 1, 3])
    d = LMData(train, valid, valid, 4, "toy")
    p = torch.tensor([3 + 1, 2 + 1, 1 + 1, 0 + 1], dtype=torch.float64) / 10
    expected = -(math.log(p[0]) + math.log(p[1]) + math.log(p[3])) / 3
    assert unigram_loss(d) == pytest.approx(expected, rel=1e-12)
    x, y = lm_windows(torch.arange(20), torch.tensor([0, 5, 13]), 6)
    assert x.shape == (3, 6) and torch.equal(y, x + 1) and int(x[2, 0]) == 13


def test_load_data_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load_data("mnist")


# ---------------------------------------------------------------------------------- CIFAR-10
def _write_cifar(root, n=(3, 2, 4, 1, 2), n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    sizes = list(n) + [n_test]
    for name, k in zip(CIFAR10_FILES, sizes):
        entry = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (k, 3072),
                                                                      dtype=np.uint8),
                 b"labels": rng.integers(0, 10, k).tolist(), b"filenames": [b"x.png"] * k}
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    return sizes


def test_cifar10_reads_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    sizes = _write_cifar(str(root))
    d = load_cifar10(str(tmp_path))                      # the parent directory also works
    assert d.x_train.shape == (sum(sizes[:5]), 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (sizes[5], 3, 32, 32) and d.y_test.shape == (sizes[5],)
    with open(root / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    first = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32))
    assert torch.equal(d.x_train[sizes[0]], first)       # channel-major, batches in order
    x = d.transform(d.x_train[:2])
    assert x.dtype == torch.float32
    ref = (d.x_train[:2].float() / 255 - torch.tensor(d.mean).view(1, 3, 1, 1)) \
        / torch.tensor(d.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)


def test_cifar10_missing_dir_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(str(tmp_path / "nope"))
    _write_cifar(str(tmp_path))
    os.remove(tmp_path / "data_batch_4")
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar10(str(tmp_path))


@pytest.mark.parametrize("damage,match", [
    ("truncated", "corrupt or truncated"), ("garbage", "corrupt or truncated"),
    ("frame_header", "corrupt or truncated.*OverflowError"),
    ("memory_error", "corrupt or truncated.*MemoryError"),
    ("bad_shape", "shape"), ("bad_labels", "labels must be in 0..9"), ("no_key", "missing key"),
    ("str_labels", "'labels' must be integers in 0..9, got dtype <U"),
    ("float_labels", "'labels' must be integers in 0..9, got dtype float64"),
    ("ragged_data", "'data' or 'labels' is not an array")])
def test_cifar10_corrupt_files_are_named(tmp_path, monkeypatch, damage, match):
    _write_cifar(str(tmp_path))
    path = tmp_path / "data_batch_3"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "frame_header":
        # protocol 4: b"\x80\x04\x95" + 8-byte frame length; flipped bytes overflow it
        entry = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
        raw = bytearray(pickle.dumps(entry, protocol=4))
        assert raw[2] == 0x95
        raw[3:11] = b"\xff" * 8
        path.write_bytes(bytes(raw))
    elif damage == "memory_error":
        real = pickle.load

        def load(fh, **kw):
            if fh.name.endswith("data_batch_3"):
                raise MemoryError()
            return real(fh, **kw)
        monkeypatch.setattr(pickle, "load", load)
    else:
        entry = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
        if damage == "bad_shape":
            entry[b"data"] = np.zeros((2, 1024), np.uint8)
        elif damage == "bad_labels":
            entry[b"labels"] = [1, 12]
        elif damage == "str_labels":
            entry[b"labels"] = ["cat", "dog"]
        elif damage == "float_labels":
            entry[b"labels"] = [1.0, 2.5]
        elif damage == "ragged_data":
            entry[b"data"] = [[0] * 3072, [0] * 5]
        else:
            del entry[b"labels"]
        path.write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match="data_batch_3") as exc:
        load_cifar10(str(tmp_path))
    assert exc.match(match)


# ------------------------------------------------------------------------------- WikiText-103
def _write_wiki(root, train="a b c\n\n b a <unk>\n", valid="a z\n", test="c\n"):
    os.makedirs(root, exist_ok=True)
    for name, text in zip(WIKITEXT_FILES, (train, valid, test)):
        with open(os.path.join(root, name), "w", encoding="utf-8") as fh:
            fh.write(text)


def test_wikitext_vocabulary_eos_and_unk(tmp_path):
    _write_wiki(str(tmp_path))
    d = load_wikitext103(str(tmp_path))
    # train counts: <eos> 3, a 2, b 2, <unk> 1, c 1 -> frequency then token order
    assert d.itos == ["<eos>", "a", "b", "<unk>", "c"]
    assert d.vocab_size == 5
    assert d.decode(d.train) == "a b c <eos> <eos> b a <unk> <eos>"
    assert d.decode(d.valid) == "a <unk> <eos>"            # unseen 'z' -> <unk>
    assert d.test.tolist() == [4, 0]
    assert d.files == {split: os.path.join(str(tmp_path), f"wiki.{split}.tokens")
                       for split in ("train", "valid", "test")}


@pytest.mark.parametrize("damage,match", [("empty", "empty"), ("binary", "NUL"),
                                          ("utf8", "not valid UTF-8")])
def test_wikitext_corrupt_files(tmp_path, damage, match):
    _write_wiki(str(tmp_path))
    path = tmp_path / "wiki.valid.tokens"
    path.write_bytes({"empty": b"", "binary": b"ab\x00\x01cd", "utf8": b"ok \xff\xfe bad"}[damage])
    with pytest.raises(ValueError, match=match):
        load_wikitext103(str(tmp_path))


def test_wikitext_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wikitext103(str(tmp_path / "nope"))
    _write_wiki(str(tmp_path))
    os.remove(tmp_path / "wiki.test.tokens")
    with pytest.raises(FileNotFoundError, match="wiki.test.tokens"):
        load_wikitext103(str(tmp_path))
