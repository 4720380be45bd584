"""`sigattn check`: the grid passes for the reference and catches a wrong implementation."""

from __future__ import annotations

import torch

from sigattn import check


def test_reference_passes_quick_grid():
    rows = list(check.run_checks("cpu", [torch.float32], ["reference"], quick=True))
    assert len(rows) == len(check.grid(True, False))
    assert all(r.ok for r in rows), rows


def test_check_catches_a_wrong_kernel(monkeypatch):
    real = check.sigmoid_attn_func

    def off_by_a_bit(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return out if q.dtype == torch.float64 else out * 1.01

    monkeypatch.setattr(check, "sigmoid_attn_func", off_by_a_bit)
    rows = list(check.run_checks("cpu", [torch.float32], ["reference"], quick=True))
    assert not any(r.ok for r in rows)
    assert all(r.worst == "out" or r.worst.startswith("d") for r in rows)


def test_nan_is_infinite_error():
    assert check._rel_err(torch.tensor([float("nan"), 1.0]), torch.ones(2)) == float("inf")
