"""Sequence doubling: softmax invariant, sigmoid doubled at b = 0, nearly unchanged at b = -log n."""

from __future__ import annotations

import pytest
import torch

from sigattn.analysis.doubling import doubling_table, duplicate_tokens, plot


def test_duplicate_tokens() -> None:
    t = torch.arange(6.0).reshape(1, 3, 2)
    assert duplicate_tokens(t)[0, :, 0].tolist() == [0.0, 0.0, 2.0, 2.0, 4.0, 4.0]


def _by(rows: list[dict], label: str) -> list[dict]:
    return sorted((r for r in rows if r["label"] == label), key=lambda r: r["seqlen"])


def test_doubling() -> None:
    rows = doubling_table(seqlens=(16, 64, 256))
    for r in _by(rows, "softmax"):
        assert r["rel_change"] < 1e-6 and r["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert r["row_sum"] == pytest.approx(1.0) and r["row_sum_doubled"] == pytest.approx(1.0)
    for r in _by(rows, "sigmoid b=0"):
        assert r["norm_ratio"] == pytest.approx(2.0, rel=1e-10) and r["rel_change"] == pytest.approx(1.0, rel=1e-10)
        assert r["row_sum"] == pytest.approx(r["seqlen"] / 2, rel=0.1)
        assert r["row_sum_doubled"] == pytest.approx(2 * r["row_sum"], rel=1e-10)
    logn = _by(rows, "sigmoid b=-log n")
    changes = [r["rel_change"] for r in logn]
    assert changes == sorted(changes, reverse=True)  # shrinks as n grows (~ 1/n for large n)
    assert changes[-1] < 0.1
    assert logn[-1]["norm_ratio"] == pytest.approx(1.0, abs=0.1)
    assert logn[-1]["row_sum_doubled"] == pytest.approx(logn[-1]["row_sum"], rel=0.05)


def test_small_logits_approach_exact_invariance() -> None:
    """With small logits, 2 sigmoid(z - log 2n) / sigmoid(z - log n) = (n + e^z) / (n + e^z / 2) -> 1 + 1/(2n)."""
    (row,) = doubling_table(seqlens=(512,), logit_std=1e-3, cases=(("sigmoid", "-logn"),))
    assert row["norm_ratio"] == pytest.approx(1 + 1 / (2 * 512), rel=1e-4)


def test_plot(tmp_path) -> None:
    path = tmp_path / "dbl.png"
    plot(doubling_table(seqlens=(8, 16)), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
