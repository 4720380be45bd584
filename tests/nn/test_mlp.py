"""MLP: GELU and SwiGLU shapes, hidden width rounding, and the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sigattn.nn import MLP


def test_swiglu_shapes_and_formula() -> None:
    mlp = MLP(32, "swiglu", ratio=8 / 3, multiple_of=16)
    assert mlp.hidden == 96  # int(8/3 * 32) = 85, rounded up to a multiple of 16
    assert mlp.w1.weight.shape == mlp.w3.weight.shape == (96, 32) and mlp.w2.weight.shape == (32, 96)
    x = torch.randn(2, 5, 32)
    y = mlp(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, F.silu(x @ mlp.w1.weight.T) * (x @ mlp.w3.weight.T) @ mlp.w2.weight.T)


def test_gelu_shapes_and_formula() -> None:
    mlp = MLP(16, "gelu", bias=True)
    assert mlp.hidden == 64 and mlp.w3 is None
    x = torch.randn(3, 16)
    torch.testing.assert_close(mlp(x), mlp.w2(F.gelu(mlp.w1(x))))


def test_bad_kind_raises() -> None:
    with pytest.raises(ValueError, match="mlp"):
        MLP(16, "relu")
