"""Sequence-doubling check: duplicating every token leaves sigmoid attention with b = -log n nearly unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sigattn.analysis.regularity import SERIES, series_label
from sigattn.ops.api import sigmoid_attn_func

__all__ = ["attend", "doubling_table", "duplicate_tokens", "plot"]


def duplicate_tokens(t: torch.Tensor) -> torch.Tensor:
    """(batch, n, ...) -> (batch, 2n, ...) with every token repeated in place: t0 t0 t1 t1 ..."""
    return t.repeat_interleave(2, dim=1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: str, bias: float | str | None
) -> torch.Tensor:
    """Bidirectional attention of (batch, n, nheads, head_dim) q, k, v; returns the same shape.

    Sigmoid goes through the public ``sigmoid_attn_func`` with bias "-logn" = None there, i.e. -log of this
    call's seqlen_k (so -log 2n after doubling); softmax through SDPA.
    """
    if attention == "softmax":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return sigmoid_attn_func(q, k, v, bias=None if bias == "-logn" else float(bias))


def doubling_table(
    seqlens: Sequence[int] = (16, 64, 256, 1024),
    *,
    batch: int = 2,
    nheads: int = 2,
    head_dim: int = 16,
    logit_std: float = 1.0,
    cases: Sequence[tuple[str, float | str | None]] = SERIES,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Compare attention on a sequence with attention on the same sequence with every token duplicated.

    q, k, v ~ N(0, 1), with q scaled so the logits scale * q.k have standard deviation `logit_std`. For
    each n and case, out = Attn(q, k, v) (n tokens) and out2 = Attn(dup q, dup k, dup v)[:, ::2] (2n tokens,
    read at the first copy of each token). Expectation: softmax is exactly invariant; sigmoid with b = 0
    doubles exactly (every key's weight counts twice); sigmoid with b = -log n changes by ~ e^z / 2n
    relative (2 sigmoid(z - log 2n) = e^z / (n + e^z / 2) vs sigmoid(z - log n) = e^z / (n + e^z)).
    Returns one dict per (case, n): attention, bias, label, seqlen, rel_change = ||out2 - out|| / ||out||,
    norm_ratio = ||out2|| / ||out||, row_sum and row_sum_doubled (mean attention row sums).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    results = []
    for n in seqlens:
        q, k, v = (torch.randn(batch, n, nheads, head_dim, generator=gen, dtype=dtype) for _ in range(3))
        q = q * logit_std
        q, k, v = q.to(device), k.to(device), v.to(device)
        ones = torch.ones_like(v)
        q2, k2, v2, ones2 = (duplicate_tokens(t) for t in (q, k, v, ones))
        for attention, bias in cases:
            out = attend(q, k, v, attention, bias)
            out2 = attend(q2, k2, v2, attention, bias)[:, ::2]
            results.append({
                "attention": attention, "bias": bias, "label": series_label(attention, bias), "seqlen": n,
                "rel_change": float((out2 - out).norm() / out.norm()),
                "norm_ratio": float(out2.norm() / out.norm()),
                "row_sum": float(attend(q, k, ones, attention, bias)[..., 0].mean()),
                "row_sum_doubled": float(attend(q2, k2, ones2, attention, bias)[..., 0].mean()),
            })
    return results


def plot(results: list[dict[str, Any]], path: str) -> None:
    """PNG: relative output change and output norm ratio after doubling, against n (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    floor = 1e-17  # softmax's change is exactly 0 in exact arithmetic: draw rounding-level values at a floor
    for label in dict.fromkeys(r["label"] for r in results):
        rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["seqlen"])
        xs = [r["seqlen"] for r in rows]
        ax1.plot(xs, [max(r["rel_change"], floor) for r in rows], marker="o", label=label)
        ax2.plot(xs, [r["norm_ratio"] for r in rows], marker="o", label=label)
    if results:
        ns = sorted({r["seqlen"] for r in results})
        ax1.plot(ns, [1.0 / n for n in ns], color="gray", linestyle=":", label="1/n")
    ax1.set(xscale="log", yscale="log", xlabel="n", ylabel="||out(2n)[::2] - out(n)|| / ||out(n)||")
    ax2.set(xscale="log", xlabel="n", ylabel="||out(2n)[::2]|| / ||out(n)||")
    ax2.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax2.axhline(2.0, color="gray", linestyle=":", linewidth=1)
    ax1.set_title("sequence doubling: relative change", fontsize=10)
    ax2.set_title("sequence doubling: output norm ratio", fontsize=10)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
