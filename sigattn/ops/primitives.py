"""Triton device helpers shared by the sigmoid-attention kernels: sigmoid modes, visibility masks, tile ranges."""

from __future__ import annotations

import math

import triton
import triton.language as tl

# Sigmoid evaluation modes, passed to the kernels as the constexpr SIGMOID. The host folds each mode's
# constant into the logit scale and bias (see `z_factor`), so the kernel computes z = qk * c + b' with
# one FMA and then:
#   ACCURATE:    z = -s * log2(e);  p = 1 / (1 + 2^z)     ex2.approx + rcp: 2 MUFU ops, rel. err ~1e-7
#   FAST_ASM:    z = s / 2;         p = 0.5 * tanh(z) + 0.5 via tanh.approx.f32: 1 MUFU op
#   FAST_PORTABLE: same folding as FAST_ASM, tanh from exp2 (the interpreter has no inline asm)
SIGMOID_ACCURATE = 0
SIGMOID_FAST_ASM = 1
SIGMOID_FAST_PORTABLE = 2

LOG2E = math.log2(math.e)


def z_factor(mode: int) -> float:
    """Multiplier taking a logit s to the kernel's pre-activation z for sigmoid mode `mode`."""
    return -LOG2E if mode == SIGMOID_ACCURATE else 0.5


@triton.jit
def tanh_approx(x):
    # tanh.approx.f32 is one MUFU.TANH (16/clk/SM), versus ex2 + rcp for the exp form.
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def sigmoid_from_z(z, SIGMOID: tl.constexpr):
    """sigmoid of the logit s whose pre-activation (see module comment) is z; fp32 in, fp32 out."""
    if SIGMOID == 0:
        # z = -s*log2(e) can reach +inf for very negative s: 1 / (1 + inf) = 0, as it should be.
        p = tl.math.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp2(z))
    elif SIGMOID == 1:
        p = 0.5 * tanh_approx(z) + 0.5
    else:
        # tanh(z) = 1 - 2 / (1 + e^(2z)); e^(2z) = 2^(2z*log2(e)).
        t = 1.0 - 2.0 / (1.0 + tl.exp2(z * 2.8853900817779268))
        p = 0.5 * t + 0.5
    return p


@triton.jit
def tma_col(head, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Column coordinate of `head` in a descriptor from forward.tma_view: (B, N, H*D) views are addressed by
    element column, (B, N, H, D) views (padded head dims) by head index."""
    if BLOCK_D == HEAD_DIM:
        col = head * HEAD_DIM
    else:
        col = head
    return col.to(tl.int32)


@triton.jit
def tma_load(desc, batch, row, col, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_ROWS, BLOCK_D] tile of sequence `batch` at (row, col). Rows past the batch's N read as zeros (the
    descriptor's bounds); for padded head dims the (B, N, H, D) view zero-fills lanes >= D too."""
    if BLOCK_D == HEAD_DIM:
        tile = tl.reshape(desc.load([batch, row, col]), [BLOCK_ROWS, BLOCK_D])
    else:
        tile = tl.reshape(desc.load([batch, row, col, 0]), [BLOCK_ROWS, BLOCK_D])
    return tile


@triton.jit
def tma_atomic_add(desc, batch, row, col, val, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """TMA reduce-add of a [BLOCK_ROWS, BLOCK_D] tile (rows past N and lanes >= D are clipped by the view)."""
    if BLOCK_D == HEAD_DIM:
        desc.atomic_add([batch, row, col], tl.reshape(val, [1, BLOCK_ROWS, BLOCK_D]))
    else:
        desc.atomic_add([batch, row, col, 0], tl.reshape(val, [1, BLOCK_ROWS, 1, BLOCK_D]))


@triton.jit
def program_coords(seqlen, BLOCK: tl.constexpr, REVERSE: tl.constexpr, BLOCK_MAJOR: tl.constexpr):
    """(block index, batch*head index) of this program in a 1-D grid of cdiv(seqlen, BLOCK) * batch * nheads
    (a 2-D grid would cap batch * nheads at 65535). Default order: blocks of one head adjacent (they share K/V
    in L2). BLOCK_MAJOR: all heads' block i before any head's block i+1, so under causal the heavy blocks of
    every head run first and the grid's tail is short tiles. REVERSE: last block first (heaviest under causal
    for query blocks; key blocks are heaviest first)."""
    n_blocks = tl.cdiv(seqlen, BLOCK)
    pid = tl.program_id(0)
    if BLOCK_MAJOR:
        n_bh = tl.num_programs(0) // n_blocks
        blk = pid // n_bh
        bh = pid % n_bh
    else:
        blk = pid % n_blocks
        bh = pid // n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    return blk, bh


@triton.jit
def seq_span(CuSeqlens, off_b, seqlen, VARLEN: tl.constexpr):
    """(start, length, tma_b, tma_row0) of sequence off_b along one tensor's token axis.
    Dense: start 0 (the batch stride places the sequence), length `seqlen`, TMA coordinates (off_b, 0).
    VARLEN: the packed rows cu_seqlens[off_b] .. cu_seqlens[off_b + 1] (the host passes batch strides of 0 and
    views the tensor as one batch), TMA coordinates (0, first row). TMA coordinates are int32."""
    if VARLEN:
        first = tl.load(CuSeqlens + off_b)
        length = tl.load(CuSeqlens + off_b + 1) - first
        start = first.to(tl.int64)
        tma_b = 0
        tma_row0 = first
    else:
        start = off_b * 0
        length = seqlen
        tma_b = off_b.to(tl.int32)
        tma_row0 = 0
    return start, length, tma_b, tma_row0


@triton.jit
def zero_rows_past(tile, offs_rows, count, VARLEN: tl.constexpr):
    """tile [len(offs_rows), X] with rows >= count set to 0 under VARLEN. A boundary TMA tile of a packed tensor
    reads the next sequence's rows; their weights are 0, but 0 * inf = NaN, so a non-finite value there must not
    reach a dot. (Dense descriptors are (B, N, ...) views: rows past N already read as zeros.)"""
    if VARLEN:
        tile = tl.where((offs_rows < count)[:, None], tile, tl.zeros_like(tile))
    return tile


@triton.jit
def visible(offs_q, offs_k, seqlen_q, seqlen_k, pos_shift, win_left, win_right):
    """[len(offs_q), len(offs_k)] bool: query i sees key j iff both are in range and
    i + pos_shift - win_left <= j <= i + pos_shift + win_right (pos_shift = seqlen_k - seqlen_q,
    bottom-right alignment; an unbounded side is passed as a window larger than seqlen_q + seqlen_k)."""
    rel = offs_k[None, :] - (offs_q[:, None] + pos_shift)
    in_range = (offs_q[:, None] < seqlen_q) & (offs_k[None, :] < seqlen_k)
    return in_range & (rel >= -win_left) & (rel <= win_right)


@triton.jit
def alibi_distance(offs_q, offs_k, pos_shift):
    """[len(offs_q), len(offs_k)] fp32 |i + pos_shift - j|, the ALiBi distance."""
    return tl.abs((offs_q[:, None] + pos_shift - offs_k[None, :]).to(tl.float32))


@triton.jit
def tile_ranges(
    start, count_this, count_other, lo_delta, hi_delta, BLOCK_THIS: tl.constexpr, BLOCK_OTHER: tl.constexpr
):
    """Tile-aligned loop bounds over the other axis for the block [start, start + BLOCK_THIS) of this
    axis, where index t of this axis sees index x of the other iff t + lo_delta <= x <= t + hi_delta.

    Returns (a, b, c, e): tiles in [a, b) and [c, e) need a mask, tiles in [b, c) are fully visible
    for every t of the block, tiles outside [a, e) are invisible and skipped. A partial block of this
    axis (start + BLOCK_THIS > count_this) gets no unmasked tiles, so its padding rows never count; a block
    wholly past count_this (varlen programs beyond a short sequence) gets no tiles at all.
    """
    t_last = tl.minimum(start + BLOCK_THIS, count_this) - 1
    lo = tl.maximum(start + lo_delta, 0)
    hi = tl.minimum(t_last + hi_delta + 1, count_other)
    hi = tl.where(start < count_this, hi, lo)
    a = (lo // BLOCK_OTHER) * BLOCK_OTHER
    e = tl.where(hi > lo, tl.cdiv(hi, BLOCK_OTHER) * BLOCK_OTHER, a)
    full_lo = tl.cdiv(tl.maximum(t_last + lo_delta, 0), BLOCK_OTHER) * BLOCK_OTHER
    full_hi = (tl.maximum(tl.minimum(start + hi_delta + 1, count_other), 0) // BLOCK_OTHER) * BLOCK_OTHER
    full_hi = tl.where(start + BLOCK_THIS > count_this, 0, full_hi)
    b = tl.minimum(tl.maximum(full_lo, a), e)
    c = tl.minimum(tl.maximum(full_hi, b), e)
    return a, b, c, e
