"""Triton backward kernels of dense sigmoid attention (dK/dV/dbias over queries, dQ over keys) and their launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigattn.ops.configs import (
    AttnConfig,
    backward_configs,
    cdiv,
    fp32_contiguous,
    gluon_backward_enabled,
    gluon_varlen_enabled,
    interpreting,
    launch_fitting,
    lazy_module,
    next_pow2,
    use_fused_dq,
)
from sigattn.ops.forward import (
    NO_SPECIALIZE,
    Varlen,
    bnh_strides,
    dot_precision,
    kernel_bias,
    last_dim_contiguous,
    sigmoid_mode,
    tma_view,
    use_tma_default,
    wide_offsets,
    window_bounds,
)
from sigattn.ops.primitives import (
    alibi_distance,
    program_coords,
    seq_span,
    sigmoid_from_z,
    tile_ranges,
    tma_atomic_add,
    tma_col,
    tma_load,
    visible,
    z_factor,
    zero_rows_past,
)

# No normaliser, so no rowsum(dO * O) pre-pass: with p = sigmoid(s), dS = dP * p * (1 - p), where
# dP = dO V^T; dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO, dbias[h] = sum dS.
#
# Two execution forms of one dK/dV kernel (constexpr FUSED_DQ):
#   deterministic: dK/dV kernel (4 matmuls per tile) + a dQ kernel over keys (3 matmuls): 7 matmuls, no atomics.
#   default:       dK/dV kernel also adds dS K into an fp32 dQ buffer with atomics: 5 matmuls per tile.


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    dbias,
    k,
    v,
    Q_tile,
    DO_tile,
    DQ_tile,
    stride_qn,
    stride_don,
    stride_dqn,
    offs_n,
    offs_m0,
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
    q_b,
    q_row0,
    q_col,
    MASKED: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SIGMOID: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dk += dS^T q, dv += P^T dO (and dq += dS k by atomics if FUSED_DQ) over the query tiles [start, end),
    in the transposed [key, query] frame. USE_TMA: Q/DO/DQ are descriptors over (B, N, ...) views, tiles at
    (q_b, q_row0 + start_m); rows past a dense batch's N read as zeros. VARLEN (one packed batch): boundary tiles
    read the next sequence's rows: p = dS = 0 there from the mask, and their q/dO rows and dQ adds are zeroed
    (0 * inf = NaN must not cross into another sequence)."""
    d_ok = offs_d < HEAD_DIM
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = (offs_m[:, None] < seqlen_q) & d_ok[None, :]
        if USE_TMA:
            q = tma_load(Q_tile, q_b, q_row0 + start_m, q_col, BLOCK_M, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
            do = tma_load(DO_tile, q_b, q_row0 + start_m, q_col, BLOCK_M, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
            if MASKED:
                q = zero_rows_past(q, offs_m, seqlen_q, VARLEN)
                do = zero_rows_past(do, offs_m, seqlen_q, VARLEN)
        else:
            q_ptrs = Q_tile + tl.cast(start_m, tl.int64) * stride_qn + (offs_m0[:, None] * stride_qn + offs_d[None, :])
            do_ptrs = DO_tile + tl.cast(start_m, tl.int64) * stride_don + (offs_m0[:, None] * stride_don
                                                                           + offs_d[None, :])
            if MASKED:
                q = tl.load(q_ptrs, mask=row_ok, other=0.0)
                do = tl.load(do_ptrs, mask=row_ok, other=0.0)
            elif BLOCK_D != HEAD_DIM:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
        qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        z = qkt * qk_scale + z_bias
        if HAS_ALIBI:
            z += alibi_z * tl.trans(alibi_distance(offs_m, offs_n, pos_shift))
        pt = sigmoid_from_z(z, SIGMOID)
        if MASKED:
            vis = tl.trans(visible(offs_m, offs_n, seqlen_q, seqlen_k, pos_shift, win_left, win_right))
            pt = tl.where(vis, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        dst32 = dpt * pt * (1.0 - pt)  # masked entries: pt = 0, so dS = 0
        if NEED_DBIAS:
            dbias += tl.sum(dst32, axis=1)
        dst = dst32.to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        if FUSED_DQ:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
            if USE_TMA:
                if MASKED:
                    # VARLEN: the tile's rows past seqlen_q belong to the next sequence: add exact zeros there
                    # (0 * an inf key of this block would be NaN).
                    dq = zero_rows_past(dq, offs_m, seqlen_q, VARLEN)
                tma_atomic_add(DQ_tile, q_b, q_row0 + start_m, q_col, dq, BLOCK_M, HEAD_DIM, BLOCK_D)
            else:
                dq_ptrs = DQ_tile + tl.cast(start_m, tl.int64) * stride_dqn + (offs_m0[:, None] * stride_dqn
                                                                               + offs_d[None, :])
                tl.atomic_add(dq_ptrs, dq, mask=row_ok, sem="relaxed")
    return dk, dv, dbias


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _sigmoid_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    DQ,
    DBiasPart,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_bb,
    stride_sb,
    nheads_kv,
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
    FUSED_DQ: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    BLOCK_MAJOR: tl.constexpr,
    VARLEN: tl.constexpr,
    WIDE_OFFS: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, kv head), summed over the `group` query heads that read
    it (GQA, no atomics for dK/dV); 1-D grid of cdiv(seqlen_k, BLOCK_N) * batch * nheads_kv. Writes this key
    block's partial dbias per query head to DBiasPart[b, h, block] (summed on the host in a fixed order).
    VARLEN: packed sequences as in the forward kernel; programs past their sequence's keys run no tile, store no
    dK/dV and a dbias partial of 0. WIDE_OFFS: int64 tile offsets (forward.wide_offsets)."""
    if WIDE_OFFS:
        stride_qn, stride_kn = tl.cast(stride_qn, tl.int64), tl.cast(stride_kn, tl.int64)
        stride_vn = tl.cast(stride_vn, tl.int64)
        stride_don, stride_dkn = tl.cast(stride_don, tl.int64), tl.cast(stride_dkn, tl.int64)
        stride_dvn, stride_dqn = tl.cast(stride_dvn, tl.int64), tl.cast(stride_dqn, tl.int64)
    pid_n, pid_bh = program_coords(seqlen_k, BLOCK_N, False, BLOCK_MAJOR)
    n_kblocks = tl.cdiv(seqlen_k, BLOCK_N)
    off_b = (pid_bh // nheads_kv).to(tl.int64)
    off_hk = (pid_bh % nheads_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    q_start, seqlen_q, q_b, q_row0 = seq_span(CuSeqQ, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k, _, _ = seq_span(CuSeqK, off_b, seqlen_k, VARLEN)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    n_offs = tl.arange(0, BLOCK_N)[:, None]

    K_tile = K + off_b * stride_kb + off_hk * stride_kh + (k_start + start_n) * stride_kn
    V_tile = V + off_b * stride_vb + off_hk * stride_vh + (k_start + start_n) * stride_vn
    k = tl.load(K_tile + n_offs * stride_kn + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V_tile + n_offs * stride_vn + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_N, BLOCK_D]

    pos_shift = seqlen_k - seqlen_q
    # Query i sees key j iff j - pos_shift - win_right <= i <= j - pos_shift + win_left.
    a, b, c, e = tile_ranges(
        start_n, seqlen_k, seqlen_q, -pos_shift - win_right, -pos_shift + win_left, BLOCK_N, BLOCK_M
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group):
        off_h = off_hk * group + g
        q_col = tma_col(off_h, HEAD_DIM, BLOCK_D)
        if USE_TMA:
            Q_tile = Q
            DO_tile = DO
            DQ_tile = DQ
        else:
            Q_tile = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qn
            DO_tile = DO + off_b * stride_dob + off_h * stride_doh + q_start * stride_don
            DQ_tile = DQ + off_b * stride_dqb + off_h * stride_dqh + q_start * stride_dqn
        qk_scale = scale * zf
        z_bias = tl.load(Bias + off_b * stride_bb + off_h) * zf
        alibi_z = 0.0
        if HAS_ALIBI:
            alibi_z = -tl.load(Slopes + off_b * stride_sb + off_h) * zf
        dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dbias = _dkdv_tiles(
            dk, dv, dbias, k, v, Q_tile, DO_tile, DQ_tile, stride_qn, stride_don, stride_dqn, offs_n, offs_m0,
            offs_d, a, b, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, q_b,
            q_row0, q_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA, FUSED_DQ,
            NEED_DBIAS, VARLEN)
        dk, dv, dbias = _dkdv_tiles(
            dk, dv, dbias, k, v, Q_tile, DO_tile, DQ_tile, stride_qn, stride_don, stride_dqn, offs_n, offs_m0,
            offs_d, b, c, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, q_b,
            q_row0, q_col, False, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA, FUSED_DQ,
            NEED_DBIAS, VARLEN)
        dk, dv, dbias = _dkdv_tiles(
            dk, dv, dbias, k, v, Q_tile, DO_tile, DQ_tile, stride_qn, stride_don, stride_dqn, offs_n, offs_m0,
            offs_d, c, e, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, q_b,
            q_row0, q_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA, FUSED_DQ,
            NEED_DBIAS, VARLEN)
        if NEED_DBIAS:
            part = (off_b * nheads_kv * group + off_h) * n_kblocks + pid_n
            tl.store(DBiasPart + part, tl.sum(dbias, axis=0))
    DK_tile = DK + off_b * stride_dkb + off_hk * stride_dkh + (k_start + start_n) * stride_dkn
    DV_tile = DV + off_b * stride_dvb + off_hk * stride_dvh + (k_start + start_n) * stride_dvn
    tl.store(DK_tile + n_offs * stride_dkn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV_tile + n_offs * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
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
    VARLEN: tl.constexpr,
):
    """dq += dS k over the key tiles [start, end) (USE_TMA as in the forward's key loop: boundary tiles zero the
    next sequence's keys)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        if USE_TMA:
            k = tma_load(K_tile, kv_b, kv_row0 + start_n, kv_col, BLOCK_N, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
            v = tma_load(V_tile, kv_b, kv_row0 + start_n, kv_col, BLOCK_N, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
            if MASKED:
                # VARLEN, next sequence's keys: dS is masked to 0 after the dot with v, but 0 * inf = NaN in dS k.
                k = zero_rows_past(k, offs_n, seqlen_k, VARLEN)
        else:
            k_ptrs = K_tile + tl.cast(start_n, tl.int64) * stride_kn + (offs_n0[:, None] * stride_kn + offs_d[None, :])
            v_ptrs = V_tile + tl.cast(start_n, tl.int64) * stride_vn + (offs_n0[:, None] * stride_vn + offs_d[None, :])
            if MASKED:
                col_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
                k = tl.load(k_ptrs, mask=col_ok, other=0.0)
                v = tl.load(v_ptrs, mask=col_ok, other=0.0)
            elif BLOCK_D != HEAD_DIM:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        z = qk * qk_scale + z_bias
        if HAS_ALIBI:
            z += alibi_z * alibi_distance(offs_m, offs_n, pos_shift)
        p = sigmoid_from_z(z, SIGMOID)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = dp * p * (1.0 - p)
        if MASKED:
            ds = tl.where(visible(offs_m, offs_n, seqlen_q, seqlen_k, pos_shift, win_left, win_right), ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _sigmoid_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dqb,
    stride_dqn,
    stride_dqh,
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
    BLOCK_MAJOR: tl.constexpr,
    VARLEN: tl.constexpr,
    WIDE_OFFS: tl.constexpr,
):
    """One program = BLOCK_M queries of one (batch, head): dQ without atomics (the deterministic form);
    1-D grid of cdiv(seqlen_q, BLOCK_M) * batch * nheads_q. VARLEN and WIDE_OFFS as in the forward kernel."""
    if WIDE_OFFS:
        stride_qn, stride_kn = tl.cast(stride_qn, tl.int64), tl.cast(stride_kn, tl.int64)
        stride_vn = tl.cast(stride_vn, tl.int64)
        stride_don, stride_dqn = tl.cast(stride_don, tl.int64), tl.cast(stride_dqn, tl.int64)
    pid_m, pid_bh = program_coords(seqlen_q, BLOCK_M, True, BLOCK_MAJOR)
    off_b = (pid_bh // nheads_q).to(tl.int64)
    off_h = pid_bh % nheads_q
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    q_start, seqlen_q, _, _ = seq_span(CuSeqQ, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k, kv_b, kv_row0 = seq_span(CuSeqK, off_b, seqlen_k, VARLEN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    m_offs = tl.arange(0, BLOCK_M)[:, None]

    Q_tile = Q + off_b * stride_qb + off_h * stride_qh + (q_start + start_m) * stride_qn
    DO_tile = DO + off_b * stride_dob + off_h * stride_doh + (q_start + start_m) * stride_don
    if USE_TMA:
        K_tile = K
        V_tile = V
    else:
        K_tile = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
        V_tile = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    kv_col = tma_col(off_hk, HEAD_DIM, BLOCK_D)
    q = tl.load(Q_tile + m_offs * stride_qn + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO_tile + m_offs * stride_don + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_M, BLOCK_D]

    qk_scale = scale * zf
    z_bias = tl.load(Bias + off_b * stride_bb + off_h) * zf
    alibi_z = 0.0
    if HAS_ALIBI:
        alibi_z = -tl.load(Slopes + off_b * stride_sb + off_h) * zf
    pos_shift = seqlen_k - seqlen_q
    a, b, c, e = tile_ranges(
        start_m, seqlen_q, seqlen_k, pos_shift - win_left, pos_shift + win_right, BLOCK_M, BLOCK_N
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, a, b,
                   qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, kv_b, kv_row0,
                   kv_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA, VARLEN)
    dq = _dq_tiles(dq, q, do, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, b, c,
                   qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, kv_b, kv_row0,
                   kv_col, False, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA, VARLEN)
    dq = _dq_tiles(dq, q, do, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, c, e,
                   qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, kv_b, kv_row0,
                   kv_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA, VARLEN)
    DQ_tile = DQ + off_b * stride_dqb + off_h * stride_dqh + (q_start + start_m) * stride_dqn
    tl.store(DQ_tile + m_offs * stride_dqn + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=tile_ok)


def sigmoid_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    configs: tuple[AttnConfig, AttnConfig] | None = None,
    use_tma: bool | None = None,
    need_dbias: bool = True,
    fused_dq: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Shapes as `sigmoid_attn_fwd`; do like the output.
    Returns (dq, dk, dv, dbias) with dbias fp32 (Hq,) (zeros when not need_dbias). deterministic=True always
    runs the atomic-free two-kernel form (bitwise reproducible); otherwise `fused_dq` (default: per-arch
    choice in configs.use_fused_dq) adds dQ with fp32 atomics inside the dK/dV kernel.

    On sm_90 the Gluon backward (gluon_backward.py) serves what it supports (bf16/fp16, D 64/128, packed heads, no
    window or ALiBi, scalar or per-head bias) unless deterministic, a config / TMA / dQ form is forced, or
    configs.set_gluon_backward(False)."""
    dq, dk, dv, dbias = dense_bwd(do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes,
                                  deterministic, sigmoid_impl, need_dbias, configs, use_tma, fused_dq)
    return dq, dk, dv, _zeros_if_none(dbias, bias, q)


def dense_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    need_dbias: bool,
    configs: tuple[AttnConfig, AttnConfig] | None = None,
    use_tma: bool | None = None,
    fused_dq: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sigmoid_attn_bwd's dispatch (Gluon where it serves, else launch_bwd) with dbias None when not need_dbias:
    the eager autograd path discards it, and a zero fill would cost a launch."""
    if (_gluon_bwd_form(deterministic, configs, use_tma, fused_dq, alibi_slopes, window_left, window_right, causal)
            and bias.dim() <= 1 and _gluon_bwd_ready(q)):
        gluon = lazy_module("sigattn.ops.gluon_backward")
        do = do.contiguous()  # `out.sum().backward()` hands in a stride-0 expand; TMA needs packed rows
        if gluon.gluon_bwd_supports(do, q, k, v) is None:
            return gluon.gluon_dense_bwd(do, q, k, v, bias, scale, causal, sigmoid_impl, need_dbias=need_dbias,
                                         checked=True)
    return launch_bwd(do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic,
                      sigmoid_impl, configs, use_tma, need_dbias, fused_dq, None)


def _gluon_bwd_form(deterministic: bool, configs: tuple[AttnConfig, AttnConfig] | None, use_tma: bool | None,
                    fused_dq: bool | None, alibi_slopes: torch.Tensor | None, window_left: int, window_right: int,
                    causal: bool) -> bool:
    """Whether the call's form is one the Gluon backward computes: atomics allowed, nothing forced, no ALiBi and no
    window other than the causal one."""
    return (not deterministic and configs is None and use_tma is None and fused_dq is None and alibi_slopes is None
            and window_left < 0 and (window_right < 0 or causal))


def _gluon_bwd_ready(q: torch.Tensor) -> bool:
    """Cheap pre-checks before importing the Gluon module (GPU-only; never under the interpreter). Head dims 64 and
    128: there the Gluon backward ran 1.09-1.20x cuDNN and 1.09-1.38x the portable kernels (bench/NOTES.md, v7)."""
    return (q.is_cuda and gluon_backward_enabled() and not interpreting()
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128))


def sigmoid_attn_varlen_bwd(
    do: torch.Tensor,
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
    deterministic: bool,
    sigmoid_impl: str,
    configs: tuple[AttnConfig, AttnConfig] | None = None,
    use_tma: bool | None = None,
    need_dbias: bool = True,
    fused_dq: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on packed sequences. Shapes as `sigmoid_attn_varlen_fwd`; do like the output.
    Returns (dq, dk, dv, dbias) with dbias fp32 of bias's shape ((Hq,) or (B, Hq)); forms as `sigmoid_attn_bwd`.
    The Gluon backward's VARLEN form serves what `dense_bwd` sends to Gluon, (B, Hq) bias included (the varlen API
    always passes one), under the same switch."""
    dq, dk, dv, dbias = varlen_bwd(do, q, k, v, varlen, bias, scale, causal, window_left, window_right, alibi_slopes,
                                   deterministic, sigmoid_impl, need_dbias, configs, use_tma, fused_dq)
    return dq, dk, dv, _zeros_if_none(dbias, bias, q)


def varlen_bwd(
    do: torch.Tensor,
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
    deterministic: bool,
    sigmoid_impl: str,
    need_dbias: bool,
    configs: tuple[AttnConfig, AttnConfig] | None = None,
    use_tma: bool | None = None,
    fused_dq: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sigmoid_attn_varlen_bwd's dispatch (Gluon VARLEN where it serves and the experimental configs.set_gluon_varlen
    is on, else launch_bwd) with dbias None when not need_dbias, as `dense_bwd` (the eager autograd path discards
    it; a zero fill would cost a launch)."""
    if (_gluon_bwd_form(deterministic, configs, use_tma, fused_dq, alibi_slopes, window_left, window_right, causal)
            and bias.dim() <= 2 and gluon_varlen_enabled() and _gluon_bwd_ready(q)):
        gluon = lazy_module("sigattn.ops.gluon_backward")
        do = do.contiguous()  # `out.sum().backward()` hands in a stride-0 expand; TMA needs packed rows
        if gluon.gluon_varlen_bwd_supports(do, q, k, v, varlen.cu_seqlens_q.numel() - 1) is None:
            return gluon.gluon_varlen_bwd(do, q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q,
                                    varlen.max_seqlen_k, bias, scale, causal, sigmoid_impl, need_dbias=need_dbias)
    return launch_bwd(do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic,
                      sigmoid_impl, configs, use_tma, need_dbias, fused_dq, varlen)


def _zeros_if_none(dbias: torch.Tensor | None, bias: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if dbias is None else dbias


def launch_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    configs: tuple[AttnConfig, AttnConfig] | None,
    use_tma: bool | None,
    need_dbias: bool,
    fused_dq: bool | None,
    varlen: Varlen | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward launch behind sigmoid_attn_bwd / sigmoid_attn_varlen_bwd (varlen None: dense), returning None
    for dbias when not need_dbias (the eager autograd path discards it; a zero fill would cost a launch)."""
    do, q, k, v = (last_dim_contiguous(t) for t in (do, q, k, v))
    packed_shape = q.shape
    if varlen is None:
        batch, seqlen_q, nheads_q, head_dim = q.shape
        seqlen_k = k.shape[1]
    else:
        do, q, k, v = do[None], q[None], k[None], v[None]  # (1, total, H, D): one row space for all sequences
        batch, seqlen_q, seqlen_k = varlen.cu_seqlens_q.numel() - 1, varlen.max_seqlen_q, varlen.max_seqlen_k
        nheads_q, head_dim = q.shape[2], q.shape[3]
    nheads_kv = k.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    unbatch = (lambda t: t) if varlen is None else (lambda t: t[0])
    if q.shape[1] == 0 or k.shape[1] == 0 or batch == 0 or seqlen_q == 0 or seqlen_k == 0:
        dk.zero_(), dv.zero_()
        dq = torch.zeros(packed_shape, dtype=q.dtype, device=q.device)
        dbias = torch.zeros(bias.shape if varlen is not None else (nheads_q,), dtype=torch.float32, device=q.device)
        return dq, unbatch(dk), unbatch(dv), dbias
    cfg_kv, cfg_q = configs or backward_configs(head_dim, q.dtype, q.device)
    left, right = window_bounds(seqlen_q, seqlen_k, causal, window_left, window_right)
    bias, stride_bb = kernel_bias(bias)
    slopes = bias if alibi_slopes is None else fp32_contiguous(alibi_slopes)
    cu_q, cu_k = (bias, bias) if varlen is None else (varlen.cu_seqlens_q.contiguous(),
                                                      varlen.cu_seqlens_k.contiguous())
    mode = sigmoid_mode(sigmoid_impl, q.device)
    group = nheads_q // nheads_kv
    fused = use_fused_dq(deterministic, q.device) if fused_dq is None else (fused_dq and not deterministic)
    # Fused: fp32 accumulator that the atomics add into; scaled and cast to q's dtype at the end.
    # Contiguous, as the fake implementation says (empty_like would keep a transposed q's strides).
    dq = torch.empty(q.shape, dtype=torch.float32 if fused else q.dtype, device=q.device)
    if fused:
        dq.zero_()
    use_tma = use_tma_default(q.device) if use_tma is None else use_tma
    common = dict(
        HAS_ALIBI=alibi_slopes is not None,
        SIGMOID=mode,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        DOT_PRECISION=dot_precision(q.dtype),
        VARLEN=varlen is not None,
    )
    stride_sb = slopes.stride(0) if slopes.dim() == 2 else 0
    n_kblocks = cdiv(seqlen_k, cfg_kv.block_n)
    # Without need_dbias the kernel never touches its partials: any fp32 pointer serves.
    dbias_part = (torch.empty((batch, nheads_q, n_kblocks), dtype=torch.float32, device=q.device) if need_dbias
                  else bias)
    descs = [tma_view(q, cfg_kv.block_m), tma_view(do, cfg_kv.block_m)] if use_tma else [None]
    if fused and use_tma:
        descs.append(tma_view(dq, cfg_kv.block_m))
    tma_kv = all(x is not None for x in descs)
    qa, doa = descs[:2] if tma_kv else (q, do)
    dqa = descs[2] if tma_kv and fused else dq
    launch_fitting(
        _sigmoid_attn_bwd_dkdv_kernel, (n_kblocks * batch * nheads_kv,),
        qa, k, v, doa, dk, dv, dqa, dbias_part, bias, slopes, cu_q, cu_k,
        *bnh_strides(q, varlen),
        *bnh_strides(k, varlen),
        *bnh_strides(v, varlen),
        *bnh_strides(do, varlen),
        *bnh_strides(dk, varlen),
        *bnh_strides(dv, varlen),
        *bnh_strides(dq, varlen),
        stride_bb, stride_sb, nheads_kv, group, seqlen_q, seqlen_k, left, right, float(scale), z_factor(mode),
        BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, USE_TMA=tma_kv, FUSED_DQ=fused, NEED_DBIAS=need_dbias,
        WIDE_OFFS=wide_offsets([q, k, v, do, dk, dv, dq], max(cfg_kv.block_m, cfg_kv.block_n)),
        BLOCK_MAJOR=cfg_kv.block_major, num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages, **common,
    )
    if fused:
        # One launch (multiply in fp32, round on store) instead of a multiply and a cast: bitwise the same.
        dq = torch.mul(dq, scale, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
    else:
        descs = [tma_view(k, cfg_q.block_n), tma_view(v, cfg_q.block_n)] if use_tma else [None]
        tma_q = all(x is not None for x in descs)
        ka, va = descs if tma_q else (k, v)
        launch_fitting(
            _sigmoid_attn_bwd_dq_kernel, (cdiv(seqlen_q, cfg_q.block_m) * batch * nheads_q,),
            q, ka, va, do, dq, bias, slopes, cu_q, cu_k,
            *bnh_strides(q, varlen),
            *bnh_strides(k, varlen),
            *bnh_strides(v, varlen),
            *bnh_strides(do, varlen),
            *bnh_strides(dq, varlen),
            stride_bb, stride_sb, nheads_q, group, seqlen_q, seqlen_k, left, right, float(scale), z_factor(mode),
            BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, USE_TMA=tma_q,
            WIDE_OFFS=wide_offsets([q, k, v, do, dq], max(cfg_q.block_m, cfg_q.block_n)),
            BLOCK_MAJOR=cfg_q.block_major, num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages, **common,
        )
    # dbias of bias's shape: (Hq,) summed over sequences, or (B, Hq) per sequence.
    if not need_dbias:
        dbias = None
    else:
        dbias = dbias_part.sum(dim=(0, 2)) if bias.dim() == 1 else dbias_part.sum(dim=2)
    return unbatch(dq), unbatch(dk), unbatch(dv), dbias
