"""Offline data: stdlib byte corpus (file order, split by file, determinism) and the image loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from sigattn.recipes import data
from tests.recipes import one_thread  # noqa: F401  (autouse fixture)


def _tree(root: Path, n: int = 12) -> Path:
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (20 + i))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("skipped = True\n")
    (root / "pkg0" / "__pycache__").mkdir()
    (root / "pkg0" / "__pycache__" / "cached.py").write_text("skipped = True\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_source_files_sorted_and_filtered(tmp_path):
    files = data.source_files(_tree(tmp_path))
    assert files == sorted(files) and len(files) == 12
    assert not any("site-packages" in f or "__pycache__" in f for f in files)


def test_split_by_file_is_deterministic_disjoint_and_stable(tmp_path):
    files = data.source_files(_tree(tmp_path))
    train, val = data.split_files(files, 0.25)
    assert data.split_files(files, 0.25) == (train, val)
    assert set(train).isdisjoint(val) and sorted(train + val) == files and len(val) == 3
    # Adding a file moves at most one existing file across.
    for extra in ("zzz/new.py", "aaa/other.py", "pkg1/mod99.py"):
        train2, val2 = data.split_files(sorted(files + [extra]), 0.25)
        assert len(set(val) ^ (set(val2) - {extra})) <= 1
    with pytest.raises(ValueError, match="at least 2"):
        data.split_files(files[:1], 0.5)


def test_corpus_bytes_follow_file_order(tmp_path):
    root = _tree(tmp_path)
    corpus = data.load_corpus(str(root), 0.25)
    train_files, val_files = data.split_files(data.source_files(root), 0.25)
    expected = b"".join((root / f).read_bytes() + b"\0" for f in train_files)
    assert bytes(corpus.train.tolist()) == expected
    assert corpus.val.numel() == sum((root / f).stat().st_size + 1 for f in val_files)
    data.load_corpus.cache_clear()
    again = data.load_corpus(str(root), 0.25)
    assert again.digest == corpus.digest and torch.equal(again.train, corpus.train)


def test_stdlib_corpus_has_both_splits():
    corpus = data.load_corpus()
    assert corpus.root == str(data.stdlib_root())
    assert corpus.train_files > 100 and corpus.val_files > 10
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 10_000


def test_lm_batches_depend_on_seed_and_step_only():
    stream = torch.arange(1000, dtype=torch.int64).remainder(256).to(torch.uint8)
    x, y = data.lm_batch(stream, 7, 4, 16, seed=1)
    x2, y2 = data.lm_batch(stream, 7, 4, 16, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, data.lm_batch(stream, 8, 4, 16, seed=1)[0])
    assert not torch.equal(x, data.lm_batch(stream, 7, 4, 16, seed=2)[0])
    batches, again = data.lm_eval_batches(stream, 3, 4, 16), data.lm_eval_batches(stream, 3, 4, 16)
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def _write_idx(path: Path, t: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
    path.write_bytes(gzip.compress(header + bytes(t.flatten().tolist())))


def fake_fashion_mnist(directory: Path, n_train: int = 96, n_val: int = 32, size: int = 28) -> Path:
    """Tiny idx files in Fashion-MNIST's layout: labels are learnable from the mean brightness."""
    gen = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_val)):
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        noise = torch.randint(0, 40, (n, size, size), generator=gen)
        images = (labels.long()[:, None, None] * 20 + noise).clamp(0, 255).to(torch.uint8)
        _write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def test_fashion_mnist_loader_and_batches(tmp_path):
    images = data.load_images(fake_fashion_mnist(tmp_path))
    assert images.name == "fashion-mnist" and images.train_x.shape == (96, 1, 28, 28) and images.val_y.shape == (32,)
    assert images.image_size == 28 and images.channels == 1 and images.num_classes == 10
    # One epoch of batches visits every training image once.
    seen = torch.cat([data.image_batch(images, s, 32, seed=3, augment=False)[1] for s in range(3)])
    assert torch.equal(seen.sort().values, images.train_y.sort().values)
    x, y = data.image_batch(images, 5, 16, seed=3)
    x2, y2 = data.image_batch(images, 5, 16, seed=3)
    assert x.shape == (16, 1, 28, 28) and torch.equal(x, x2) and torch.equal(y, y2)
    val = data.image_eval_batches(images, 10, limit=25)
    assert [b[1].numel() for b in val] == [10, 10, 5]


def test_explicit_data_dir_without_files_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks Fashion-MNIST files"):
        data.load_images(tmp_path)


def test_no_data_at_all_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")

    def no_sklearn() -> data.ImageData:
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(data, "load_digits", no_sklearn)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*scikit-learn"):
        data.load_images()


def test_default_path_is_debians(monkeypatch, tmp_path):
    assert data.FASHION_MNIST_DIR == Path("/usr/share/datasets/fashion-mnist")  # `dpkg -c` of the package
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", fake_fashion_mnist(tmp_path / "fm"))
    assert data.load_images().name == "fashion-mnist"


def test_digits_fallback_when_fashion_mnist_is_absent(tmp_path, monkeypatch):
    """scikit-learn is optional (not installed on CI): a stand-in `sklearn.datasets` with digits' shapes."""
    import sys
    import types

    import numpy as np

    rng = np.random.default_rng(0)
    bunch = types.SimpleNamespace(images=rng.integers(0, 17, (1797, 8, 8)).astype(np.float64),
                                  target=rng.integers(0, 10, 1797))
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: bunch
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    images = data.load_images()
    assert images.name == "digits" and images.train_x.shape == (1497, 1, 8, 8) and images.val_x.shape == (300, 1, 8, 8)
    assert images.train_x.dtype == torch.uint8 and int(images.train_x.max()) == 255
    assert sorted(images.train_y.tolist() + images.val_y.tolist()) == sorted(bunch.target.tolist())
    x, _ = data.image_batch(images, 0, 16, seed=0)
    assert x.shape == (16, 1, 8, 8)
