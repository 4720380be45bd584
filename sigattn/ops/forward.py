"""Triton forward kernel of dense sigmoid attention and its launcher."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sigattn.ops.configs import (
    AttnConfig,
    cdiv,
    cuda_capability,
    forward_config,
    fp32_contiguous,
    gluon_forward_enabled,
    gluon_varlen_enabled,
    interpreting,
    launch_fitting,
    lazy_module,
    next_pow2,
)
from sigattn.ops.fast_launch import Replay
from sigattn.ops.fast_launch import enabled as fast_launch_enabled
from sigattn.ops.primitives import (
    SIGMOID_ACCURATE,
    SIGMOID_FAST_ASM,
    SIGMOID_FAST_PORTABLE,
    alibi_distance,
    program_coords,
    seq_span,
    sigmoid_from_z,
    tile_ranges,
    tma_col,
    tma_load,
    visible,
    z_factor,
    zero_rows_past,
)


@triton.jit
def _load_kt(K_tile, stride_kn, start_n, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """K^T tile [BLOCK_D, BLOCK_N] of keys start_n + offs_n0 (zeros past seqlen_k / HEAD_DIM on the pointer path;
    with TMA a packed tensor's next keys may follow: their weights are masked, which a non-finite key survives)."""
    if USE_TMA:
        kt = tl.trans(tma_load(K_tile, kv_b, kv_row0 + start_n, kv_col, offs_n0.shape[0], HEAD_DIM, BLOCK_D))
    else:
        # Tile-local offsets stay int32; the tile's own start goes in as int64 (B·N·H·D may pass 2^31).
        k_ptrs = K_tile + tl.cast(start_n, tl.int64) * stride_kn + (offs_n0[None, :] * stride_kn + offs_d[:, None])
        d_ok = offs_d < HEAD_DIM
        if MASKED:
            kt = tl.load(k_ptrs, mask=(start_n + offs_n0[None, :] < seqlen_k) & d_ok[:, None], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        else:
            kt = tl.load(k_ptrs)
    return kt


@triton.jit
def _load_v(V_tile, stride_vn, start_n, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
            MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr,
            VARLEN: tl.constexpr):
    """V tile [BLOCK_N, BLOCK_D] of keys start_n + offs_n0, zeros past seqlen_k."""
    if USE_TMA:
        v = tma_load(V_tile, kv_b, kv_row0 + start_n, kv_col, offs_n0.shape[0], HEAD_DIM, BLOCK_D)
        if MASKED:
            v = zero_rows_past(v, start_n + offs_n0, seqlen_k, VARLEN)  # [BLOCK_N, BLOCK_D]
    else:
        v_ptrs = V_tile + tl.cast(start_n, tl.int64) * stride_vn + (offs_n0[:, None] * stride_vn + offs_d[None, :])
        d_ok = offs_d < HEAD_DIM
        if MASKED:
            v = tl.load(v_ptrs, mask=(start_n + offs_n0[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
    return v


@triton.jit
def _weights(qk, offs_m, offs_n, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right,
             MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr, SIGMOID: tl.constexpr):
    """sigmoid(scale * qk + bias [+ alibi]) [BLOCK_M, BLOCK_N] fp32, exactly 0 where masked."""
    z = qk * qk_scale + z_bias
    if HAS_ALIBI:
        z += alibi_z * alibi_distance(offs_m, offs_n, pos_shift)
    p = sigmoid_from_z(z, SIGMOID)
    if MASKED:
        # Exactly 0 where masked, not sigmoid(-inf) rounded in low precision.
        p = tl.where(visible(offs_m, offs_n, seqlen_q, seqlen_k, pos_shift, win_left, win_right), p, 0.0)
    return p


@triton.jit
def _fwd_tiles(
    acc,
    q,
    K_tile,
    V_tile,
    stride_kn,
    stride_vn,
    offs_m,
    offs_n0,
    offs_d,
    start,
    end,
    qk_scale,
    z_bias,
    alibi_z,
    seqlen_q,
    seqlen_k,
    pos_shift,
    win_left,
    win_right,
    kv_b,
    kv_row0,
    kv_col,
    MASKED: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SIGMOID: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    PIPELINE_QK: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """acc += sigmoid(z(q k^T)) v over the key tiles [start, end); MASKED tiles apply the visibility mask.
    USE_TMA: K_tile/V_tile are descriptors over (B, N, ...) views, tiles at (kv_b, kv_row0 + start_n). Dense: rows
    past N read as zeros. VARLEN (one packed batch): boundary tiles read the next sequence's keys; the mask zeroes
    their weights and _load_v their values (0 * inf = NaN; a non-finite key only reaches its own masked weight).
    PIPELINE_QK: issue tile j+1's q k^T before tile j's sigmoid, so the tensor cores run while the MUFU works
    (FlashAttention-3's intra-warpgroup overlap, written in the source order)."""
    if PIPELINE_QK and not MASKED:
        if start < end:
            kt = _load_kt(K_tile, stride_kn, start, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
                          MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            for start_n in tl.range(start, end - BLOCK_N, BLOCK_N):
                kt = _load_kt(K_tile, stride_kn, start_n + BLOCK_N, offs_n0, offs_d, seqlen_k, kv_b, kv_row0,
                              kv_col, MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
                qk_next = tl.dot(q, kt, input_precision=DOT_PRECISION)
                p = _weights(qk, offs_m, start_n + offs_n0, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k,
                             pos_shift, win_left, win_right, MASKED, HAS_ALIBI, SIGMOID)
                v = _load_v(V_tile, stride_vn, start_n, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
                            MASKED, HEAD_DIM, BLOCK_D, USE_TMA, VARLEN)
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
                qk = qk_next
            last = end - BLOCK_N
            p = _weights(qk, offs_m, last + offs_n0, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k,
                         pos_shift, win_left, win_right, MASKED, HAS_ALIBI, SIGMOID)
            v = _load_v(V_tile, stride_vn, last, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
                        MASKED, HEAD_DIM, BLOCK_D, USE_TMA, VARLEN)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        for start_n in tl.range(start, end, BLOCK_N):
            kt = _load_kt(K_tile, stride_kn, start_n, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
                          MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            p = _weights(qk, offs_m, start_n + offs_n0, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k,
                         pos_shift, win_left, win_right, MASKED, HAS_ALIBI, SIGMOID)
            v = _load_v(V_tile, stride_vn, start_n, offs_n0, offs_d, seqlen_k, kv_b, kv_row0, kv_col,
                        MASKED, HEAD_DIM, BLOCK_D, USE_TMA, VARLEN)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
    return acc


# Lengths and window bounds change from call to call (varlen batches, decode steps, and -1 windows become
# seqlen_q + seqlen_k + 1): specialising them (== 1, % 16) compiled up to 3^4 variants per config and added their
# checks to every launch; they only feed masks and loop bounds, whose vector widths they do not set.
NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "win_left", "win_right"]


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _sigmoid_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Bias,
    Slopes,
    CuSeqQ,
    CuSeqK,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_bb,
    stride_sb,
    nheads_q,
    group,
    seqlen_q,
    seqlen_k,
    win_left,
    win_right,
    scale,
    zf,
    HAS_ALIBI: tl.constexpr,
    SIGMOID: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    PIPELINE_QK: tl.constexpr,
    BLOCK_MAJOR: tl.constexpr,
    VARLEN: tl.constexpr,
    WIDE_OFFS: tl.constexpr,
):
    """One program = BLOCK_M queries of one (batch, head); 1-D grid of cdiv(seqlen_q, BLOCK_M) * batch * nheads_q
    (a 2-D grid caps batch * nheads at 65535). VARLEN: q/k/v/out are packed (total, heads, D) tensors, sequence b
    is rows CuSeqQ[b] .. CuSeqQ[b + 1] (keys: CuSeqK), seqlen_q/seqlen_k are the longest sequences (they size the
    grid) and programs past their own sequence's end run no tile and store nothing (an early `return` made ptxas
    spill 568 B instead of 64 at d=128). WIDE_OFFS: tile offsets rows * stride_n pass int32 (see wide_offsets)."""
    if WIDE_OFFS:
        stride_qn, stride_kn = tl.cast(stride_qn, tl.int64), tl.cast(stride_kn, tl.int64)
        stride_vn, stride_on = tl.cast(stride_vn, tl.int64), tl.cast(stride_on, tl.int64)
    pid_m, pid_bh = program_coords(seqlen_q, BLOCK_M, True, BLOCK_MAJOR)
    off_b = (pid_bh // nheads_q).to(tl.int64)
    off_h = pid_bh % nheads_q
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    q_start, seqlen_q, q_b, q_row0 = seq_span(CuSeqQ, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k, kv_b, kv_row0 = seq_span(CuSeqK, off_b, seqlen_k, VARLEN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    O_tile = Out + off_b * stride_ob + off_h * stride_oh + (q_start + start_m) * stride_on
    row_ok = offs_m[:, None] < seqlen_q
    kv_col = tma_col(off_hk, HEAD_DIM, BLOCK_D)
    if USE_TMA:
        K_tile = K
        V_tile = V
        # Rows past seqlen_q (the next sequence's queries) are computed and never stored.
        q = tma_load(Q, q_b, q_row0 + start_m, tma_col(off_h, HEAD_DIM, BLOCK_D), BLOCK_M, HEAD_DIM, BLOCK_D)
    else:
        K_tile = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
        V_tile = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
        Q_tile = Q + off_b * stride_qb + off_h * stride_qh + (q_start + start_m) * stride_qn
        q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(Q_tile + q_offs, mask=row_ok & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    qk_scale = scale * zf
    z_bias = tl.load(Bias + off_b * stride_bb + off_h) * zf
    alibi_z = 0.0
    if HAS_ALIBI:
        alibi_z = -tl.load(Slopes + off_b * stride_sb + off_h) * zf

    pos_shift = seqlen_k - seqlen_q
    a, b, c, e = tile_ranges(
        start_m, seqlen_q, seqlen_k, pos_shift - win_left, pos_shift + win_right, BLOCK_M, BLOCK_N
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc = _fwd_tiles(acc, q, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, a, b,
                     qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right,
                     kv_b, kv_row0, kv_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
                     USE_TMA, PIPELINE_QK, VARLEN)
    acc = _fwd_tiles(acc, q, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, b, c,
                     qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right,
                     kv_b, kv_row0, kv_col, False, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
                     USE_TMA, PIPELINE_QK, VARLEN)
    acc = _fwd_tiles(acc, q, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, c, e,
                     qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right,
                     kv_b, kv_row0, kv_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
                     USE_TMA, PIPELINE_QK, VARLEN)
    o_offs = tl.arange(0, BLOCK_M)[:, None] * stride_on + offs_d[None, :]
    tl.store(O_tile + o_offs, acc.to(Out.dtype.element_ty), mask=row_ok & d_ok[None, :])


def sigmoid_mode(sigmoid_impl: str, device: torch.device) -> int:
    """Kernel SIGMOID constexpr for "fast"/"accurate"; the interpreter cannot run inline asm."""
    if sigmoid_impl == "accurate":
        return SIGMOID_ACCURATE
    if sigmoid_impl != "fast":
        raise ValueError(f"sigmoid_impl must be 'fast' or 'accurate'; got {sigmoid_impl!r}")
    return SIGMOID_FAST_PORTABLE if interpreting() or device.type != "cuda" else SIGMOID_FAST_ASM


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs run their matmuls in 3xTF32 (split operands: ~fp32 accuracy, where plain tf32 gave max
    errors ~1e-3, at a third of the tf32 rate); 16-bit inputs are exact products either way."""
    return "tf32x3" if dtype == torch.float32 and not interpreting() else "ieee"


def window_bounds(seqlen_q: int, seqlen_k: int, causal: bool, window_left: int, window_right: int) -> tuple[int, int]:
    """(left, right) with -1 (unbounded) replaced by a distance past both sequences, causal ⇒ right = 0."""
    unbounded = seqlen_q + seqlen_k + 1
    # Past `unbounded` a window changes nothing; clamping keeps pos_shift ± window inside int32 in the kernels.
    left = unbounded if window_left < 0 else min(window_left, unbounded)
    right = 0 if causal else (unbounded if window_right < 0 else min(window_right, unbounded))
    return left, right


def tma_view(t: torch.Tensor, block_rows: int) -> TensorDescriptor | None:
    """Descriptor over t (B, N, H, D) for [1, block_rows, BLOCK_D] tiles of one head, or None where TMA can't
    address it (unaligned strides, padded D > 128). D a power of 2: the (B, N, H * D) view; otherwise the
    (B, N, H, D) view with block [1, rows, 1, BLOCK_D], whose zero fill pads lanes D..BLOCK_D (a block over H * D
    would read the next head's columns there). The batch axis keeps a tile of batch b from reading batch b + 1's
    rows: those read as zeros (a finite weight of 0 times an inf there would be NaN)."""
    b, n, h, d = t.shape
    sb, sn, sh, sd = t.stride()
    # One batch: its stride is never stepped, so any aligned value serves (a view's may be odd).
    if b <= 1:
        sb = n * sn
    if sd != 1 or max(b, n) >= 2**31 or min(b, n, h) <= 0 or (b > 1 and sb == 0):
        return None
    es = t.element_size()
    if (sb * es) % 16 or (sn * es) % 16 or (sh * es) % 16 or t.data_ptr() % 16:
        return None
    block_d = next_pow2(d)
    if d != block_d and block_d > 128:
        # Measured on H100 (bench/NOTES.md, v5): the padded view sped up d=96 (fwd 264 -> 312 TFLOP/s) but
        # slowed d=192 (421 -> 348), so padded dims above 128 keep the pointer path.
        return None
    if d == block_d:
        if sh != d:
            return None
        return _descriptor(t, [b, n, h * d], [sb, sn, 1], [1, block_rows, d])
    return _descriptor(t, [b, n, h, d], [sb, sn, sh, 1], [1, block_rows, 1, block_d])


def _descriptor(t: torch.Tensor, shape: list[int], strides: list[int], block: list[int]) -> TensorDescriptor:
    """TensorDescriptor without its __post_init__ checks, which tma_view has made already (16-byte aligned base and
    strides, unit last stride, positive shape) and which cost microseconds per call; block shapes come from configs
    (powers of 2)."""
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape = t, shape, strides, block
    return desc


def use_tma_default(device: torch.device) -> bool:
    """TMA (bulk tensor copies) on Hopper and newer; the interpreter and older GPUs take the pointer path."""
    return device.type == "cuda" and not interpreting() and cuda_capability(device)[0] >= 9


def wide_offsets(tensors: list[torch.Tensor], block_rows: int) -> bool:
    """Whether a pointer tile's offsets rows * stride_n + d (tensors (B, N, H, D)) can pass int32. The kernels
    then compute them in int64; otherwise in int32 (int64 offset tiles took ptxas from 816 to 1728 spill bytes
    in the d=192 dK/dV kernel)."""
    for t in tensors:
        if (block_rows - 1) * abs(t.stride(1)) + t.shape[-1] >= 2**31:
            return True
    return False


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/seq/head strides but need unit stride along the head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


class Varlen(NamedTuple):
    """Packed layout of a varlen call: sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q (int32
    (batch + 1,) offsets on q's device) and likewise cu_seqlens_k of k/v; the max lengths size the grids."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def bnh_strides(t: torch.Tensor, varlen: Varlen | None) -> tuple[int, int, int]:
    """(batch, seq, head) strides of t (B, N, H, D) as the kernels take them (batch_stride's rule), one stride()."""
    sb, sn, sh, _ = t.stride()
    return (0 if varlen is not None else sb), sn, sh


def batch_stride(t: torch.Tensor, varlen: Varlen | None) -> int:
    """Stride between sequences: a varlen tensor (1, total, H, D) has none, the kernels offset by cu_seqlens."""
    return 0 if varlen is not None else t.stride(0)


def kernel_bias(bias: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(fp32 bias with unit head stride, its stride between sequences): (Hq,) shared by every sequence, (B, Hq) per
    sequence. A (B, Hq) expand of an (Hq,) bias (the varlen API's) keeps its 0 sequence stride: no copy per call."""
    if bias.dtype is not torch.float32 or (bias.shape[-1] > 1 and bias.stride(-1) != 1):
        bias = bias.to(torch.float32).contiguous()
    return bias, (bias.stride(0) if bias.dim() == 2 else 0)


def sigmoid_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    sigmoid_impl: str,
    config: AttnConfig | None = None,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), bias fp32 (Hq,),
    alibi_slopes fp32 (B, Hq) or None. Returns o (B, Nq, Hq, D) in q's dtype.

    On sm_90 the Gluon kernel (gluon_forward.py) serves what it supports (bf16/fp16, D 64/128, packed heads, no
    window or ALiBi) unless a config or TMA choice is forced or configs.set_gluon_forward(False)."""
    if _gluon_fwd_form(config, use_tma, alibi_slopes, window_left, window_right, causal) and _gluon_ready(q):
        gluon = lazy_module("sigattn.ops.gluon_forward")
        if gluon.gluon_supports(q, k, v) is None:
            return gluon.gluon_dense_fwd(q, k, v, bias, scale, causal, sigmoid_impl, checked=True)
    return _launch_fwd(q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, sigmoid_impl,
                       config, use_tma, None)


def _gluon_fwd_form(config: AttnConfig | None, use_tma: bool | None, alibi_slopes: torch.Tensor | None,
                    window_left: int, window_right: int, causal: bool) -> bool:
    """Whether the call's form is one the Gluon forward computes: nothing forced, no ALiBi and no window other than
    the causal one."""
    return (config is None and use_tma is None and alibi_slopes is None and window_left < 0
            and (window_right < 0 or causal))


def _gluon_ready(q: torch.Tensor) -> bool:
    """Cheap pre-checks before importing the Gluon module (GPU-only; never under the interpreter). Head dim 128
    only: there the Gluon kernel ran 1.18-1.40x the portable one (bench/NOTES.md, v6 runs 1-3); at 64 it was level
    with it (0.91-1.16x, causal N=4k slower), so d=64 keeps the portable kernel (gluon_dense_fwd serves it when
    called directly)."""
    return (q.is_cuda and gluon_forward_enabled() and not interpreting() and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] == 128)


def sigmoid_attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    varlen: Varlen,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    sigmoid_impl: str,
    config: AttnConfig | None = None,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """Launch the forward kernel on packed sequences. q (total_q, Hq, D), k/v (total_k, Hkv, D), bias fp32 (Hq,) or
    (B, Hq), alibi_slopes fp32 (B, Hq) or None; causal/window bottom-right aligned per sequence.
    Returns o (total_q, Hq, D) in q's dtype. The Gluon kernel's VARLEN form serves what the dense dispatch sends to
    Gluon (`sigmoid_attn_fwd`), under the same switch, when the experimental configs.set_gluon_varlen is on."""
    if (_gluon_fwd_form(config, use_tma, alibi_slopes, window_left, window_right, causal) and gluon_varlen_enabled()
            and _gluon_ready(q)):
        gluon = lazy_module("sigattn.ops.gluon_forward")
        if gluon.gluon_varlen_supports(q, k, v) is None:
            return gluon.gluon_varlen_fwd(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q,
                                    varlen.max_seqlen_k, bias, scale, causal, sigmoid_impl)
    return _launch_fwd(q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, sigmoid_impl,
                       config, use_tma, varlen)


def _launch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    sigmoid_impl: str,
    config: AttnConfig | None,
    use_tma: bool | None,
    varlen: Varlen | None,
) -> torch.Tensor:
    plan_key = None
    if varlen is None and config is None and use_tma is None and alibi_slopes is None and fast_launch_enabled():
        # Everything below reads q/k/v/bias only through these (values, not pointers: the replay checks alignment),
        # plus the config table, whose entry is compared by identity (pinning a config replaces it).
        plan_key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
                    q.device, bias.shape, bias.stride(), bias.dtype, scale, causal, window_left, window_right,
                    sigmoid_impl)
        plan = _plans.get(plan_key)
        if plan is not None and plan[0] is forward_config(q.shape[-1], q.dtype, q.device, causal):
            o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            descs = plan[2]
            if descs is None:
                if plan[1](q, k, v, o, bias):
                    return o
            elif plan[1](_descriptor(q, *descs[0]), _descriptor(k, *descs[1]), _descriptor(v, *descs[2]), o, bias):
                return o
    q_in, k_in, v_in, plan_key_bias = q, k, v, bias
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen is None:
        batch, seqlen_q, nheads_q, head_dim = q.shape
        seqlen_k = k.shape[1]
        cu_q = cu_k = bias  # unused pointers
    else:
        q, k, v, o = q[None], k[None], v[None], o[None]  # (1, total, H, D): one row space for all sequences
        batch, seqlen_q, seqlen_k = varlen.cu_seqlens_q.numel() - 1, varlen.max_seqlen_q, varlen.max_seqlen_k
        nheads_q, head_dim = q.shape[2], q.shape[3]
        cu_q, cu_k = varlen.cu_seqlens_q.contiguous(), varlen.cu_seqlens_k.contiguous()
    if o.numel() == 0 or k.shape[1] == 0 or seqlen_q == 0:
        return (o.zero_() if varlen is None else o[0].zero_())
    nheads_kv = k.shape[2]
    cfg = config or forward_config(head_dim, q.dtype, q.device, causal)
    left, right = window_bounds(seqlen_q, seqlen_k, causal, window_left, window_right)
    bias, stride_bb = kernel_bias(bias)
    slopes = bias if alibi_slopes is None else fp32_contiguous(alibi_slopes)
    mode = sigmoid_mode(sigmoid_impl, q.device)
    grid = (cdiv(seqlen_q, cfg.block_m) * batch * nheads_q,)
    # TMA (bulk tensor copies) on Hopper+; the pointer path serves other GPUs, odd layouts and the interpreter.
    use_tma = use_tma_default(q.device) if use_tma is None else use_tma
    descs = [tma_view(q, cfg.block_m), tma_view(k, cfg.block_n), tma_view(v, cfg.block_n)] if use_tma else [None]
    use_tma = all(x is not None for x in descs)
    qa, ka, va = descs if use_tma else (q, k, v)
    args = (
        qa, ka, va, o, bias, slopes, cu_q, cu_k,
        *bnh_strides(q, varlen),
        *bnh_strides(k, varlen),
        *bnh_strides(v, varlen),
        *bnh_strides(o, varlen),
        stride_bb, slopes.stride(0) if slopes.dim() == 2 else 0,
        nheads_q, nheads_q // nheads_kv, seqlen_q, seqlen_k, left, right,
        float(scale), z_factor(mode),
    )
    kwargs = dict(
        HAS_ALIBI=alibi_slopes is not None,
        SIGMOID=mode,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_TMA=use_tma,
        PIPELINE_QK=cfg.pipeline_qk,
        BLOCK_MAJOR=cfg.block_major,
        VARLEN=varlen is not None,
        WIDE_OFFS=wide_offsets([q, k, v, o], max(cfg.block_m, cfg.block_n)),
        num_warps=cfg.num_warps,
    )
    # None where launch_fitting is replaced (sigattn.bench.launch_compile records launches on meta tensors).
    fitted = launch_fitting(_sigmoid_attn_fwd_kernel, grid, *args, num_stages=cfg.num_stages, **kwargs)
    if fitted is not None and plan_key is not None and bias is plan_key_bias and q is q_in and k is k_in and v is v_in:
        # In launch_fitting's order (the options are keyed in order): num_stages first.
        _record_plan(plan_key, cfg, fitted[0], grid, args, {"num_stages": fitted[1], **kwargs},
                     descs if use_tma else None)
    return o if varlen is None else o[0]


# Forward launches by plan key (see _launch_fwd): a hit builds the three descriptors and replays the recorded launch
# (CPU, sm_90 branches, fake driver: _launch_fwd 28 µs -> ~6 µs at B=1 N=128 H=6 d=64). Bounded like the fast-launch
# tables; a miss launches normally and records.
_plans: dict[tuple, tuple[AttnConfig, Replay, tuple | None]] = {}
_PLANS_MAX = 256


def _record_plan(key: tuple, cfg: AttnConfig, compiled: object, grid: tuple[int, ...], args: tuple, kwargs: dict,
                 descs: list | None) -> None:
    per_call = (*(descs if descs is not None else args[:3]), args[3], args[4])
    replay = Replay.record(_sigmoid_attn_fwd_kernel, compiled, grid, args, kwargs, per_call)
    if replay is None:
        return
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    specs = None if descs is None else tuple((d.shape, d.strides, d.block_shape) for d in descs)
    _plans[key] = (cfg, replay, specs)
