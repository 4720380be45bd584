"""Regularity check: the Jacobian spectral norm of single-head sigmoid vs softmax self-attention as token norms grow."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jacrev

__all__ = [
    "SERIES",
    "exact_jacobian_norm",
    "growth_exponents",
    "jacobian_spectral_norm",
    "plot",
    "regularity_table",
    "series_label",
    "single_head_attention",
]

# (attention, bias): "-logn" is the paper's b = -log(n); None for softmax, which has no bias.
SERIES: tuple[tuple[str, float | str | None], ...] = (("sigmoid", "-logn"), ("sigmoid", 0.0), ("softmax", None))


def series_label(attention: str, bias: float | str | None) -> str:
    """'sigmoid b=-log n', 'sigmoid b=0', 'softmax'."""
    if attention == "softmax":
        return "softmax"
    return f"sigmoid b={'-log n' if bias == '-logn' else f'{float(bias):g}'}"


def single_head_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    *,
    attention: str = "sigmoid",
    bias: float | str | None = "-logn",
    scale: float | None = None,
) -> torch.Tensor:
    """Attn(x W_q, x W_k, x W_v) for one sequence: x (n, dim), W_* (dim, head_dim) -> (n, head_dim).

    Sigmoid: ``sigmoid(scale * q k^T + bias) @ v``, bias a float or "-logn" (= -log n); softmax:
    ``softmax(scale * q k^T) @ v`` (bias ignored). scale None means 1 / sqrt(head_dim). Bidirectional,
    written with plain tensor ops so torch.func can transform it.
    """
    n = x.shape[0]
    q, k, v = x @ wq, x @ wk, x @ wv  # [n, head_dim]
    scale = 1.0 / math.sqrt(wq.shape[1]) if scale is None else scale
    s = (q @ k.T) * scale  # [n, n]
    if attention == "softmax":
        return torch.softmax(s, dim=-1) @ v
    if attention != "sigmoid":
        raise ValueError(f"attention must be 'sigmoid' or 'softmax'; got {attention!r}")
    b = -math.log(n) if bias == "-logn" else float(bias if bias is not None else 0.0)
    return torch.sigmoid(s + b) @ v


def exact_jacobian_norm(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Spectral norm of the full Jacobian of f at x (jacrev, then the largest singular value): small inputs only."""
    jac = jacrev(f)(x)
    out_numel = jac.numel() // x.numel()
    return float(torch.linalg.matrix_norm(jac.reshape(out_numel, x.numel()), ord=2))


def jacobian_spectral_norm(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    iters: int = 200,
    tol: float = 1e-12,
    generator: torch.Generator | None = None,
) -> float:
    """Largest singular value of the Jacobian J of f at x by power iteration on J^T J, never forming J.

    Each step is two backward passes: J^T u is a vector-Jacobian product, and J v is the vector-Jacobian
    product of u -> J^T u (linear in u, so its Jacobian is J), which avoids forward-mode AD (its first use
    costs ~3 s on CPU). Memory is that of two passes of f. Stops after `iters` steps or when the Rayleigh
    quotient moves by less than `tol` (relative). The start vector is drawn from `generator` (default: the
    global RNG).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = f(xg)
        u = torch.zeros_like(y, requires_grad=True)
        (jt_u,) = torch.autograd.grad(y, xg, u, create_graph=True)  # J^T u
        v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        v = v / v.norm()
        sigma2 = 0.0
        for _ in range(iters):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)  # J v
            (w,) = torch.autograd.grad(y, xg, jv, retain_graph=True)  # J^T J v
            new = float((v * w).sum())  # Rayleigh quotient of J^T J: sigma^2 once v is the top singular vector
            norm = w.norm()
            if norm == 0:
                return 0.0
            v = w / norm
            done = abs(new - sigma2) <= tol * abs(new)
            sigma2 = new
            if done:
                break
    return math.sqrt(max(sigma2, 0.0))


def regularity_table(
    radii: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
    *,
    seqlen: int = 16,
    dim: int = 16,
    head_dim: int = 16,
    samples: int = 4,
    series: Sequence[tuple[str, float | str | None]] = SERIES,
    method: str = "exact",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[dict[str, Any]]:
    """Local Jacobian spectral norms of x -> Attn(x W_q, x W_k, x W_v) at inputs whose tokens all have norm R.

    One draw of W_q, W_k, W_v (entries N(0, 1/dim), shared by all series and radii); for each radius R,
    `samples` inputs x (seqlen, dim) with random directions scaled to token norm R (the same directions for
    every series). The paper (Section 3) bounds sigmoid attention's local Lipschitz constant on a ball of
    radius R by a polynomial in R with b = -log n keeping it independent of n; these are local norms at random
    inputs, i.e. lower bounds of the Lipschitz constant over the sphere, for comparing growth rates.
    method: "exact" (jacrev + SVD, n * dim up to a few hundred) or "power" (power iteration, any size).
    Returns one dict per (series, R): attention, bias, label, radius, seqlen, jac_norm_mean, jac_norm_max,
    and for reference ``wv_norm`` (= ||W_v||_2, the Jacobian norm of attention with constant weights 1/n).
    """
    if method not in ("exact", "power"):
        raise ValueError(f"method must be 'exact' or 'power'; got {method!r}")
    gen = torch.Generator().manual_seed(seed)
    wq, wk, wv = (torch.randn(dim, head_dim, generator=gen, dtype=dtype) / math.sqrt(dim) for _ in range(3))
    directions = []
    for _ in range(samples):
        u = torch.randn(seqlen, dim, generator=gen, dtype=dtype)
        directions.append(u / u.norm(dim=-1, keepdim=True))
    wv_norm = float(torch.linalg.matrix_norm(wv, ord=2))
    results = []
    for attention, bias in series:
        f = lambda x, a=attention, b=bias: single_head_attention(x, wq, wk, wv, attention=a, bias=b)
        for radius in radii:
            norms = []
            for u in directions:
                x = radius * u
                if method == "exact":
                    norms.append(exact_jacobian_norm(f, x))
                else:
                    norms.append(jacobian_spectral_norm(f, x, generator=torch.Generator().manual_seed(seed)))
            results.append({
                "attention": attention, "bias": bias, "label": series_label(attention, bias),
                "radius": float(radius), "seqlen": seqlen, "jac_norm_mean": sum(norms) / len(norms),
                "jac_norm_max": max(norms), "wv_norm": wv_norm,
            })
    return results


def growth_exponents(results: list[dict[str, Any]], key: str = "jac_norm_max") -> dict[str, float]:
    """Per series, the log-log slope of `key` against the radius over the largest half of the radii
    (least squares): ~2 for quadratic growth, ~0 for bounded."""
    out = {}
    for label in dict.fromkeys(r["label"] for r in results):
        rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["radius"])
        rows = rows[len(rows) // 2 :] if len(rows) >= 4 else rows
        if len(rows) < 2:
            continue
        xs = [math.log(r["radius"]) for r in rows]
        ys = [math.log(max(r[key], 1e-300)) for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out[label] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return out


def plot(results: list[dict[str, Any]], path: str) -> None:
    """PNG: Jacobian spectral norm (max over samples solid, mean dashed) against token norm R, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    slopes = growth_exponents(results)
    for label in dict.fromkeys(r["label"] for r in results):
        rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["radius"])
        xs = [r["radius"] for r in rows]
        (line,) = ax.plot(xs, [r["jac_norm_max"] for r in rows], marker="o",
                          label=f"{label} (slope {slopes.get(label, math.nan):.2f})")
        ax.plot(xs, [r["jac_norm_mean"] for r in rows], linestyle="--", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token norm R")
    ax.set_ylabel("||d Attn / d x||_2")
    n = results[0]["seqlen"] if results else "?"
    ax.set_title(f"single-head attention Jacobian norm, n = {n}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
