"""Plain-PyTorch sigmoid attention in every form (dense, varlen, KV cache): the oracle and the CPU path."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "CHUNK_ELEMENTS",
    "alibi_bias",
    "relative_positions",
    "sigmoid_attn",
    "sigmoid_attn_varlen",
    "sigmoid_attn_with_kvcache",
    "visible_mask",
]

# Score elements per query chunk, summed over batch x heads: 2^25 fp32 = 128 MiB per live
# [chunk, seqlen_k] tensor, so an 8k x 8k call never holds a full N x N score matrix for all heads.
CHUNK_ELEMENTS = 2**25


def relative_positions(
    seqlen_q: int, seqlen_k: int, device: torch.device | str | None = None, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Key position minus the bottom-right aligned query position, ``j - (i + seqlen_k - seqlen_q)``.

    rows: int64 query indices ``i`` to build (default ``arange(seqlen_q)``).
    Returns int64 (len(rows), seqlen_k).
    """
    if rows is None:
        rows = torch.arange(seqlen_q, device=device)
    cols = torch.arange(seqlen_k, device=rows.device)
    return cols[None, :] - (rows[:, None] + (seqlen_k - seqlen_q))


def _visible_from_rel(rel: torch.Tensor, causal: bool, window_size: tuple[int, int]) -> torch.Tensor | None:
    left, right = window_size
    if causal:
        right = 0
    vis = None
    if left >= 0:
        vis = rel >= -left
    if right >= 0:
        vis = rel <= right if vis is None else vis & (rel <= right)
    return vis


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k), True where query i may see key j.

    Bottom-right aligned (as flash_attn): query i sits at key position ``i + seqlen_k - seqlen_q`` and
    sees key j iff ``pos - left <= j <= pos + right``; -1 leaves that side unbounded; causal sets right = 0.
    With seqlen_q=2, seqlen_k=5, causal::

        1 1 1 1 0
        1 1 1 1 1
    """
    rel = relative_positions(seqlen_q, seqlen_k, device)
    vis = _visible_from_rel(rel, causal, window_size)
    return torch.ones_like(rel, dtype=torch.bool) if vis is None else vis


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """ALiBi score term ``-slope * |i + seqlen_k - seqlen_q - j|`` (both sides, row constant kept).

    alibi_slopes: (nheads,) or (batch, nheads). Returns (nheads, sq, sk) or (batch, nheads, sq, sk)
    in the slopes' dtype.
    """
    rel = relative_positions(seqlen_q, seqlen_k, alibi_slopes.device).abs().to(alibi_slopes.dtype)
    return -alibi_slopes[..., None, None] * rel


def _per_head(t: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """(nheads_q,) or (batch, nheads_q) -> broadcastable against scores (batch, hkv, g, sq, sk)."""
    return t.reshape(t.shape[0] if t.dim() == 2 else 1, hkv, g, 1, 1)


def sigmoid_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: float | torch.Tensor,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense sigmoid attention ``sigmoid(scale * q @ k^T + bias [+ alibi] [+ float mask]) @ v``.

    q: (batch, seqlen_q, nheads_q, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim), with
    nheads_q = g * nheads_kv and query head h reading kv head h // g (GQA/MQA).
    bias: float, or tensor () / (nheads_q,) (differentiable). alibi_slopes: (nheads_q,) or
    (batch, nheads_q), adding ``-slope * |i + sk - sq - j|``. causal/window_size: bottom-right
    aligned, see ``visible_mask``. attn_mask: bool (True = attend) or float (added to scores),
    broadcastable to (batch, nheads_q, seqlen_q, seqlen_k) (SDPA head order). dropout_p: dropout on
    the weights after sigmoid and masking, scaled by 1/(1-p), applied whenever p > 0.
    Masked weights are exactly 0; a row that sees no key outputs 0. Math in fp32 (fp64 for fp64
    inputs). Returns q.dtype (batch, seqlen_q, nheads_q, headdim). Arguments are assumed validated.
    """
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    qf = q.to(cdt).permute(0, 2, 1, 3).reshape(b, hkv, g, sq, d)  # [b, hkv, g, sq, d]
    kt = k.to(cdt).permute(0, 2, 3, 1).unsqueeze(2)  # [b, hkv, 1, d, sk]
    vf = v.to(cdt).permute(0, 2, 1, 3).unsqueeze(2)  # [b, hkv, 1, sk, dv]

    bias_t = bias.to(cdt) if isinstance(bias, torch.Tensor) else None
    if bias_t is not None and bias_t.dim() == 1:
        bias_t = _per_head(bias_t, hkv, g)
    slopes = None if alibi_slopes is None else _per_head(alibi_slopes.to(cdt), hkv, g)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(cdt)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def chunk(q_c: torch.Tensor, row0: int) -> torch.Tensor:
        rows = torch.arange(row0, row0 + q_c.shape[3], device=q.device)
        rel = relative_positions(sq, sk, rows=rows)  # [cs, sk]
        s = torch.matmul(q_c, kt) * scale  # [b, hkv, g, cs, sk]
        s = s + (bias_t if bias_t is not None else bias)
        if slopes is not None:
            s = s - slopes * rel.abs().to(cdt)
        keep = _visible_from_rel(rel, causal, window_size)
        if mask is not None:
            m = mask[:, :, row0 : row0 + q_c.shape[3]] if mask.shape[2] > 1 else mask
            # A head-broadcast mask stays a view; a per-head one splits SDPA's head axis into (hkv, g).
            m = m.unsqueeze(2) if m.shape[1] == 1 else m.reshape(m.shape[0], hkv, g, *m.shape[2:])
            if m.dtype == torch.bool:
                keep = m if keep is None else keep & m
            else:
                s = s + m
        w = torch.sigmoid(s)
        if keep is not None:
            w = torch.where(keep, w, torch.zeros((), dtype=cdt, device=w.device))
        if dropout_p > 0.0:
            w = F.dropout(w, p=dropout_p, training=True)
        return torch.matmul(w, vf)  # [b, hkv, g, cs, dv]

    run: Callable[[torch.Tensor, int], torch.Tensor] = chunk
    tensors = (q, k, v, bias, alibi_slopes, attn_mask)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        # Recompute each chunk in backward so autograd holds one chunk's scores, not all of them;
        # checkpoint restores the RNG state, so dropout replays the same mask.
        run = lambda q_c, row0: checkpoint(chunk, q_c, row0, use_reentrant=False)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * sk))
    outs = [run(qf[:, :, :, r : r + rows_per_chunk], r) for r in range(0, max(sq, 1), rows_per_chunk)]
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return o.reshape(b, hq, sq, dv).permute(0, 2, 1, 3).to(q.dtype).contiguous()


def _slopes_row(alibi_slopes: torch.Tensor | None, i: int) -> torch.Tensor | None:
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[i]


def sigmoid_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    bias: float | torch.Tensor | None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed variable-length sigmoid attention, equal to ``sigmoid_attn`` on each sequence.

    q: (total_q, nheads_q, headdim); k, v: (total_k, nheads_kv, headdim); cu_seqlens_q/k: int32
    (batch + 1,) offsets; sequence b is ``q[cu_q[b]:cu_q[b+1]]`` against ``k[cu_k[b]:cu_k[b+1]]``.
    max_seqlen_q/k are accepted for API parity and unused. bias=None means each sequence's own
    default ``-log(seqlen_k_b)``. alibi_slopes (batch, nheads_q) uses row b for sequence b.
    Causal/window are bottom-right aligned per sequence. A sequence with no keys outputs 0; rows
    past ``cu_seqlens_q[-1]`` (padding) output 0. Returns q.dtype (total_q, nheads_q, headdim).
    """
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if q1 == q0:
            continue
        # No keys: any finite bias gives the same 0 output; -log(0) would put an inf in the graph.
        b_i = bias if bias is not None else (-math.log(k1 - k0) if k1 > k0 else 0.0)
        slopes = _slopes_row(alibi_slopes, i)
        o = sigmoid_attn(
            q[None, q0:q1],
            k[None, k0:k1],
            v[None, k0:k1],
            scale=scale,
            bias=b_i,
            causal=causal,
            window_size=window_size,
            alibi_slopes=slopes,
        )
        outs.append(o[0])
    pad = q.shape[0] - (cu_q[-1] if cu_q else 0)
    if pad > 0 or not outs:
        outs.append(q.new_zeros(pad, q.shape[1], v.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _cache_positions(
    positions: torch.Tensor, b: int, block_table: torch.Tensor | None, page: int
) -> tuple[torch.Tensor | int, torch.Tensor]:
    """Index pair (cache row, slot) of logical positions of sequence b, contiguous or paged."""
    if block_table is None:
        return b, positions
    return block_table[b, positions // page].long(), positions % page


def sigmoid_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor,
    bias: float | torch.Tensor,
    scale: float,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid attention of q against a KV cache, optionally appending new keys/values in place.

    q: (batch, seqlen_q, nheads_q, d). Contiguous cache: k_cache, v_cache (batch, seqlen_cache,
    nheads_kv, d). Paged cache: k_cache, v_cache (num_blocks, page_block_size, nheads_kv, d) with
    block_table int32 (batch, max_blocks_per_seq); logical position p of sequence b lives at block
    ``block_table[b, p // page]``, slot ``p % page``. cache_seqlens: int32 (batch,), not modified.
    k, v (batch, seqlen_new, nheads_kv, d), if given, are written into the cache at positions
    ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1``; attention then covers the first
    ``cache_seqlens[b] + seqlen_new`` keys, with causal/window/alibi bottom-right aligned to that
    length (as flash_attn_with_kvcache), so seqlen_q > 1 works for chunked prefill / speculation.
    bias is required (the KV length changes every step). Returns q.dtype (batch, seqlen_q, nheads_q, d).
    """
    page = k_cache.shape[1]
    seqlens = cache_seqlens.tolist()
    n_new = 0 if k is None else k.shape[1]
    outs = []
    for i, n_cached in enumerate(seqlens):
        if k is not None and v is not None and n_new > 0:
            new = torch.arange(n_cached, n_cached + n_new, device=k_cache.device)
            idx = _cache_positions(new, i, block_table, page)
            k_cache[idx] = k[i].to(k_cache.dtype)
            v_cache[idx] = v[i].to(v_cache.dtype)
        idx = _cache_positions(torch.arange(n_cached + n_new, device=k_cache.device), i, block_table, page)
        o = sigmoid_attn(
            q[i : i + 1],
            k_cache[idx][None],
            v_cache[idx][None],
            scale=scale,
            bias=bias,
            causal=causal,
            window_size=window_size,
            alibi_slopes=_slopes_row(alibi_slopes, i),
        )
        outs.append(o)
    if not outs:
        return q.new_zeros(q.shape[:-1] + v_cache.shape[-1:])
    return torch.cat(outs, dim=0)
