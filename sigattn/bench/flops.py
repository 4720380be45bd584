"""FLOP and byte models of sigmoid/softmax attention, for TFLOP/s and GB/s columns."""

from __future__ import annotations

from collections.abc import Sequence

MODES: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")

# The FlashAttention papers' convention: the backward does 2.5x the forward's matmul work
# (5 matmuls vs 2), so forward+backward is 3.5x.
MODE_FLOP_FACTOR: dict[str, float] = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> float:
    """Number of (query, key) pairs a head computes with.

    Non-causal: seqlen_q * seqlen_k. Causal with seqlen_q == seqlen_k: exactly half, as the
    FlashAttention papers count it. Causal with seqlen_q != seqlen_k: the exact count of the
    bottom-right aligned mask (query i sees keys j <= i + seqlen_k - seqlen_q), so a decode step
    (seqlen_q == 1) sees all keys.
    """
    if not causal:
        return float(seqlen_q * seqlen_k)
    if seqlen_q == seqlen_k:
        return seqlen_q * seqlen_k / 2
    offset = seqlen_k - seqlen_q
    first = max(0, -offset)  # queries before this index see no key
    total = 0
    for i in range(first, seqlen_q):
        total += min(i + offset + 1, seqlen_k)
    return float(total)


def attn_flops(
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    headdim: int,
    causal: bool = False,
    mode: str = "fwd",
) -> float:
    """FLOPs = 4 * B * H * (visible pairs) * d, x2.5 for bwd, x3.5 for fwd+bwd.

    4 = two matmuls (q @ k^T and p @ v), each 2 FLOPs per multiply-add. Elementwise work
    (sigmoid/exp, masks) is not counted, as in the FlashAttention papers.
    """
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd = 4.0 * batch * nheads * visible_pairs(seqlen_q, seqlen_k, causal) * headdim
    return fwd * MODE_FLOP_FACTOR[mode]


def varlen_attn_flops(
    lens_q: Sequence[int],
    lens_k: Sequence[int],
    nheads: int,
    headdim: int,
    causal: bool = False,
    mode: str = "fwd",
) -> float:
    """FLOPs of a packed varlen call, counted over each sequence's own (query, key) pairs (as attn_flops per
    sequence, summed): padding and cross-sequence pairs count nothing."""
    return sum(attn_flops(1, nheads, sq, sk, headdim, causal, mode) for sq, sk in zip(lens_q, lens_k, strict=True))


def attn_bytes(
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    headdim: int,
    element_size: int,
    mode: str = "fwd",
    nheads_kv: int | None = None,
) -> float:
    """Minimum HBM traffic in bytes: every input read once, every output written once.

    fwd reads q, k, v and writes o; bwd reads q, k, v, dO and writes dq, dk, dv (sigmoid
    attention's backward needs neither o nor a log-sum-exp); fwd+bwd is their sum. K/V use
    nheads_kv heads (GQA/MQA; None means nheads). The model for memory-bound shapes (decode).
    """
    hkv = nheads if nheads_kv is None else nheads_kv
    q_elems = batch * nheads * seqlen_q * headdim
    kv_elems = batch * hkv * seqlen_k * headdim
    fwd = q_elems + 2 * kv_elems + q_elems
    bwd = 3 * q_elems + 4 * kv_elems
    elems = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    if mode not in elems:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return float(elems[mode] * element_size)


def tflops_per_s(flops: float, ms: float) -> float:
    """Throughput in TFLOP/s of `flops` done in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def gb_per_s(nbytes: float, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes) of `nbytes` moved in `ms` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9
