"""Jacobian norms of single-head attention: power iteration vs the exact spectral norm, and the sweep's shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sigattn import sigmoid_attn_func
from sigattn.analysis.regularity import (
    SERIES,
    exact_jacobian_norm,
    growth_exponents,
    jacobian_spectral_norm,
    plot,
    regularity_table,
    single_head_attention,
)


def _weights(dim: int, head_dim: int) -> list[torch.Tensor]:
    return [torch.randn(dim, head_dim, dtype=torch.float64) / math.sqrt(dim) for _ in range(3)]


@pytest.mark.parametrize(("attention", "bias"), SERIES)
@pytest.mark.parametrize("radius", [1.0, 8.0])
def test_power_iteration_matches_exact(attention: str, bias: float | str | None, radius: float) -> None:
    x = torch.randn(6, 5, dtype=torch.float64)
    x = radius * x / x.norm(dim=-1, keepdim=True)
    w = _weights(5, 4)
    f = lambda t: single_head_attention(t, *w, attention=attention, bias=bias)
    exact = exact_jacobian_norm(f, x)
    assert jacobian_spectral_norm(f, x, iters=2000) == pytest.approx(exact, rel=1e-6)


def test_exact_norm_of_a_linear_map() -> None:
    a = torch.randn(5, 3, dtype=torch.float64)
    # x (4, 5) -> x @ a: the Jacobian is I_4 (x) a^T, whose spectral norm is ||a||_2.
    assert exact_jacobian_norm(lambda x: x @ a, torch.randn(4, 5, dtype=torch.float64)) == pytest.approx(
        torch.linalg.matrix_norm(a, ord=2).item(), rel=1e-10
    )


@pytest.mark.parametrize(("attention", "bias"), SERIES)
def test_single_head_matches_the_ops(attention: str, bias: float | str | None) -> None:
    x = torch.randn(9, 8, dtype=torch.float64)
    w = _weights(8, 4)
    got = single_head_attention(x, *w, attention=attention, bias=bias)
    q, k, v = ((x @ wi)[None, :, None] for wi in w)  # [1, 9, 1, 4]
    if attention == "softmax":
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    else:
        ref = sigmoid_attn_func(q, k, v, bias=None if bias == "-logn" else bias, backend="reference")
    torch.testing.assert_close(got, ref[0, :, 0], atol=1e-12, rtol=1e-12)


def test_regularity_table() -> None:
    n = 8
    rows = regularity_table(radii=(0.25, 1.0, 4.0), seqlen=n, dim=8, head_dim=8, samples=1)
    assert len(rows) == 3 * len(SERIES)
    small = {r["label"]: r["jac_norm_max"] for r in rows if r["radius"] == 0.25}
    # Near x = 0 the weights are constant (sigmoid(b) each), so the Jacobian is ~ n sigmoid(b) ||W_v||:
    # ~ 0.9 ||W_v|| at b = -log n (sigmoid(-log n) = 1/(n+1)), n/2 ||W_v|| at b = 0, ||W_v|| for softmax.
    wv = rows[0]["wv_norm"]
    assert small["sigmoid b=0"] == pytest.approx(n / 2 * wv, rel=0.15)
    assert small["sigmoid b=-log n"] == pytest.approx(n / (n + 1) * wv, rel=0.15)
    assert small["softmax"] == pytest.approx(wv, rel=0.15)
    assert all(r["jac_norm_max"] >= r["jac_norm_mean"] > 0 for r in rows)
    power = regularity_table(radii=(1.0,), seqlen=n, dim=8, head_dim=8, samples=1, method="power")
    exact = [r for r in rows if r["radius"] == 1.0]
    for p, e in zip(power, exact):
        assert p["jac_norm_max"] == pytest.approx(e["jac_norm_max"], rel=1e-6)


def test_growth_exponents() -> None:
    rows = [{"label": "quadratic", "radius": r, "jac_norm_max": 3 * r**2} for r in (1.0, 2.0, 4.0, 8.0)]
    rows += [{"label": "flat", "radius": r, "jac_norm_max": 5.0} for r in (1.0, 2.0, 4.0, 8.0)]
    slopes = growth_exponents(rows)
    assert slopes["quadratic"] == pytest.approx(2.0) and slopes["flat"] == pytest.approx(0.0)


def test_plot(tmp_path) -> None:
    path = tmp_path / "reg.png"
    plot(regularity_table(radii=(1.0, 2.0), seqlen=4, dim=4, head_dim=4, samples=1), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
