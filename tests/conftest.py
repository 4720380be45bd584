"""Test setup: Triton interpreter on CPU, per-test seeds, NaN-poisoned torch.empty, GPU-only skips."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must happen before triton is first imported: the interpreter is chosen at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh but reproducible random inputs: the seed is derived from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.numel() > 0:
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.empty/empty_like float buffer starts as NaN, so an unwritten output element fails."""
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _poison(_real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poison(_real_empty_like(*a, **kw)))


@pytest.fixture
def device() -> str:
    return DEVICE
