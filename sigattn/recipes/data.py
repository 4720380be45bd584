"""Offline training data for the recipes: a byte-level corpus of the Python standard library, and small image sets."""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Where Debian's `dataset-fashion-mnist` package puts the four idx files (from `dpkg -c` of its .deb).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "val_x": "t10k-images-idx3-ubyte",
    "val_y": "t10k-labels-idx1-ubyte",
}
DATA_DIR_ENV = "SIGATTN_DATA_DIR"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
DOC_SEPARATOR = 0  # byte written between files; NUL does not occur in Python source


@dataclass(frozen=True)
class ByteCorpus:
    """Train and validation bytes (uint8 1-D tensors), split by file; `digest` names the exact corpus."""

    root: str
    train: torch.Tensor  # [train_bytes] uint8
    val: torch.Tensor  # [val_bytes] uint8
    train_files: int
    val_files: int
    digest: str

    vocab_size: int = 256


def stdlib_root() -> Path:
    """The running interpreter's standard library directory (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | str) -> list[str]:
    """Relative paths (posix, sorted) of every ``*.py`` under root, skipping site-/dist-packages and caches.

    The order is the sorted relative path, so it does not depend on the file system's listing order.
    """
    root = Path(root)
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            rels.append(rel.as_posix())
    return sorted(rels)


def split_files(files: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split relative paths into (train, val), both in sorted order.

    The val files are the ceil(val_fraction * n) files with the smallest crc32 of their relative path: a fixed
    pseudo-random choice that never leaves a side empty when n >= 2, and where adding a file moves at most one
    other file across (so the split barely changes between Python patch releases).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    if len(files) < 2:
        raise ValueError(f"need at least 2 source files to split into train and val; found {len(files)}")
    n_val = min(max(1, math.ceil(val_fraction * len(files))), len(files) - 1)
    ranked = sorted(files, key=lambda rel: (zlib.crc32(rel.encode()), rel))
    val = set(ranked[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def _concat(root: Path, files: list[str], digest: Any) -> torch.Tensor:
    chunks = []
    for rel in files:
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + data)
        chunks.append(data)
        chunks.append(bytes([DOC_SEPARATOR]))
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


@functools.lru_cache(maxsize=4)
def load_corpus(root: str | None = None, val_fraction: float = 0.05) -> ByteCorpus:
    """The byte corpus of every ``*.py`` under root (default: this interpreter's standard library).

    Files are concatenated in sorted order, each followed by a NUL byte; the split is by file (split_files).
    The corpus differs between Python versions: compare runs made with the same ``digest``. Cached per
    (root, val_fraction), so the variants of one comparison read the files once.
    """
    path = stdlib_root() if root is None else Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"corpus root {path} is not a directory")
    train_files, val_files = split_files(source_files(path), val_fraction)
    digest = hashlib.sha256()
    train = _concat(path, train_files, digest)
    val = _concat(path, val_files, digest)
    return ByteCorpus(str(path), train, val, len(train_files), len(val_files), digest.hexdigest()[:16])


def _generator(seed: int, step: int) -> torch.Generator:
    # A fresh generator per (seed, step): the batch of a step does not depend on what ran before it, so a
    # resumed run sees exactly the batches an uninterrupted one would. The image epochs' permutations use
    # step = -1 - epoch, apart from every step below 1_000_003 (negative seeds wrap to uint64 in torch).
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lm_batch(data: torch.Tensor, step: int, batch: int, context: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch `step`: `batch` random windows of data; returns (inputs, targets), int64 (batch, context).

    Targets are the inputs shifted by one byte. The windows are a function of (seed, step) only.
    """
    if data.numel() <= context + 1:
        raise ValueError(f"corpus of {data.numel()} bytes is too short for context {context}")
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=_generator(seed, step))
    idx = starts[:, None] + torch.arange(context + 1)  # [batch, context + 1]
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


def lm_eval_batches(
    data: torch.Tensor, n_batches: int, batch: int, context: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: n_batches * batch windows evenly spaced over data (no randomness)."""
    count = n_batches * batch
    last = data.numel() - context - 1
    if last <= 0:
        raise ValueError(f"corpus of {data.numel()} bytes is too short for context {context}")
    starts = torch.linspace(0, last, count).long()
    idx = starts[:, None] + torch.arange(context + 1)  # [count, context + 1]
    window = data[idx].long()
    return [(w[:, :-1], w[:, 1:]) for w in window.split(batch)]



@dataclass(frozen=True)
class ImageData:
    """An image classification set: uint8 images (N, channels, H, W), int64 labels (N,), train and val."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    mean: float
    std: float

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]


def read_idx(path: Path | str) -> torch.Tensor:
    """An idx file (MNIST format, optionally gzipped) as a uint8 tensor of its stated shape."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: {len(body)} data bytes for shape {shape}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(directory: Path | str = FASHION_MNIST_DIR) -> ImageData:
    """Fashion-MNIST from `directory` holding the four idx files (gzipped or not): 60k train, 10k test (= val)."""
    directory = Path(directory)
    paths = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{directory} lacks Fashion-MNIST files: {', '.join(missing)}")
    t = {key: read_idx(p) for key, p in paths.items() if p is not None}
    if t["train_x"].shape[0] != t["train_y"].shape[0] or t["val_x"].shape[0] != t["val_y"].shape[0]:
        raise ValueError(f"{directory}: image and label counts differ")
    train_x = t["train_x"][:, None]  # [N, 1, 28, 28]
    mean, std = _stats(train_x)
    return ImageData(
        "fashion-mnist", train_x, t["train_y"].long(), t["val_x"][:, None], t["val_y"].long(), 10, mean, std
    )


def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, values 0..16 scaled to 0..255): a fixed 1497/300 split."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8)[:, None]  # [1797, 1, 8, 8]
    y = torch.from_numpy(digits.target).long()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    train, val = perm[300:], perm[:300]
    mean, std = _stats(x[train])
    return ImageData("digits", x[train], y[train], x[val], y[val], 10, mean, std)


def _stats(x: torch.Tensor) -> tuple[float, float]:
    xf = x.float() / 255.0
    return float(xf.mean()), float(xf.std())


def load_images(data_dir: Path | str | None = None) -> ImageData:
    """The ViT recipe's data: Fashion-MNIST, else scikit-learn's digits, else a FileNotFoundError saying how to get one.

    data_dir: a directory with the Fashion-MNIST idx files; None means $SIGATTN_DATA_DIR, else Debian's
    ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``). An explicit directory
    that lacks the files raises instead of falling back.
    """
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if explicit:
        return load_fashion_mnist(explicit)
    if _find_idx(FASHION_MNIST_DIR, FASHION_MNIST_FILES["train_x"]) is not None:
        return load_fashion_mnist(FASHION_MNIST_DIR)
    try:
        return load_digits()
    except ImportError:
        raise FileNotFoundError(
            f"no image data: Fashion-MNIST is not in {FASHION_MNIST_DIR} (Debian: `apt-get install "
            f"dataset-fashion-mnist`, or pass --data-dir / set ${DATA_DIR_ENV} to a directory with its four idx "
            "files) and the fallback, scikit-learn's digits, needs `pip install scikit-learn`"
        ) from None


def _normalise(data: ImageData, x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - data.mean) / data.std


def image_batch(
    data: ImageData, step: int, batch: int, seed: int, *, augment: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch `step`: (images float (batch, C, H, W) normalised, labels int64 (batch,)).

    Epoch e visits the training set in a permutation drawn from (seed, e); batches are consecutive slices of
    it (wrapping into the next epoch), so the batch of a step depends on (seed, step) only. augment: a random
    horizontal flip and a random shift of up to H/8 pixels (zero padded), drawn from (seed, step).
    """
    n = data.train_x.shape[0]
    positions = step * batch + torch.arange(batch)
    epochs, offsets = positions // n, positions % n
    idx = torch.zeros(batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=_generator(seed, -1 - epoch))
        sel = epochs == epoch
        idx[sel] = perm[offsets[sel]]
    x, y = _normalise(data, data.train_x[idx]), data.train_y[idx]
    if augment:
        x = _augment(x, _generator(seed, step), background=-data.mean / data.std)
    return x, y


def _augment(x: torch.Tensor, gen: torch.Generator, background: float) -> torch.Tensor:
    batch, _, height, width = x.shape
    flip = torch.rand(batch, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, height // 8)
    # Pad with the normalised value of a black pixel, then crop a random window per image.
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=background)
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    rows = oy[:, None] + torch.arange(height)  # [batch, H]
    cols = ox[:, None] + torch.arange(width)  # [batch, W]
    b = torch.arange(batch)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def image_eval_batches(
    data: ImageData, batch: int, limit: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set (its first `limit` images; None: all) in order, normalised, in batches of `batch`."""
    count = data.val_x.shape[0] if limit is None else min(limit, data.val_x.shape[0])
    x, y = _normalise(data, data.val_x[:count]), data.val_y[:count]
    return list(zip(x.split(batch), y.split(batch)))
