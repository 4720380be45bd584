"""Triton backward kernels of dense sigmoid attention (dK/dV/dbias over queries, dQ over keys) and their launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigattn.ops.configs import AttnConfig, backward_configs, use_fused_dq
from sigattn.ops.forward import (
    dot_precision,
    last_dim_contiguous,
    sigmoid_mode,
    tma_view,
    use_tma_default,
    window_bounds,
)
from sigattn.ops.primitives import (
    alibi_distance,
    program_coords,
    sigmoid_from_z,
    tile_ranges,
    tma_atomic_add,
    tma_col,
    tma_load,
    visible,
    z_factor,
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
):
    """dk += dS^T q, dv += P^T dO (and dq += dS k by atomics if FUSED_DQ) over the query tiles [start, end),
    in the transposed [key, query] frame. USE_TMA: Q/DO/DQ are descriptors over (batch * seqlen_q, heads * D)
    views; rows past seqlen_q are the next batch's and get p = dS = 0 from the mask (their dQ adds are 0)."""
    d_ok = offs_d < HEAD_DIM
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = (offs_m[:, None] < seqlen_q) & d_ok[None, :]
        if USE_TMA:
            q = tma_load(Q_tile, q_row0 + start_m, q_col, BLOCK_M, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
            do = tma_load(DO_tile, q_row0 + start_m, q_col, BLOCK_M, HEAD_DIM, BLOCK_D)  # [BLOCK_M, BLOCK_D]
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
                tma_atomic_add(DQ_tile, q_row0 + start_m, q_col, dq, BLOCK_M, HEAD_DIM, BLOCK_D)
            else:
                dq_ptrs = DQ_tile + tl.cast(start_m, tl.int64) * stride_dqn + (offs_m0[:, None] * stride_dqn
                                                                               + offs_d[None, :])
                tl.atomic_add(dq_ptrs, dq, mask=row_ok, sem="relaxed")
    return dk, dv, dbias


@triton.jit
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
):
    """One program = BLOCK_N keys of one (batch, kv head), summed over the `group` query heads that read
    it (GQA, no atomics for dK/dV); 1-D grid of cdiv(seqlen_k, BLOCK_N) * batch * nheads_kv. Writes this key
    block's partial dbias per query head to DBiasPart[b, h, block] (summed on the host in a fixed order)."""
    pid_n, pid_bh = program_coords(seqlen_k, BLOCK_N, False, BLOCK_MAJOR)
    off_b = (pid_bh // nheads_kv).to(tl.int64)
    off_hk = (pid_bh % nheads_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    n_offs = tl.arange(0, BLOCK_N)[:, None]

    K_tile = K + off_b * stride_kb + off_hk * stride_kh + start_n.to(tl.int64) * stride_kn
    V_tile = V + off_b * stride_vb + off_hk * stride_vh + start_n.to(tl.int64) * stride_vn
    k = tl.load(K_tile + n_offs * stride_kn + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V_tile + n_offs * stride_vn + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_N, BLOCK_D]

    pos_shift = seqlen_k - seqlen_q
    # Query i sees key j iff j - pos_shift - win_right <= i <= j - pos_shift + win_left.
    a, b, c, e = tile_ranges(
        start_n, seqlen_k, seqlen_q, -pos_shift - win_right, -pos_shift + win_left, BLOCK_N, BLOCK_M
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_row0 = (off_b * seqlen_q).to(tl.int32)
    for g in range(group):
        off_h = off_hk * group + g
        q_col = tma_col(off_h, HEAD_DIM, BLOCK_D)
        if USE_TMA:
            Q_tile = Q
            DO_tile = DO
            DQ_tile = DQ
        else:
            Q_tile = Q + off_b * stride_qb + off_h * stride_qh
            DO_tile = DO + off_b * stride_dob + off_h * stride_doh
            DQ_tile = DQ + off_b * stride_dqb + off_h * stride_dqh
        qk_scale = scale * zf
        z_bias = tl.load(Bias + off_h) * zf
        alibi_z = 0.0
        if HAS_ALIBI:
            alibi_z = -tl.load(Slopes + off_b * stride_sb + off_h) * zf
        dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dbias = _dkdv_tiles(
            dk, dv, dbias, k, v, Q_tile, DO_tile, DQ_tile, stride_qn, stride_don, stride_dqn, offs_n, offs_m0,
            offs_d, a, b, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, q_row0,
            q_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA, FUSED_DQ,
            NEED_DBIAS)
        dk, dv, dbias = _dkdv_tiles(
            dk, dv, dbias, k, v, Q_tile, DO_tile, DQ_tile, stride_qn, stride_don, stride_dqn, offs_n, offs_m0,
            offs_d, b, c, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, q_row0,
            q_col, False, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA, FUSED_DQ,
            NEED_DBIAS)
        dk, dv, dbias = _dkdv_tiles(
            dk, dv, dbias, k, v, Q_tile, DO_tile, DQ_tile, stride_qn, stride_don, stride_dqn, offs_n, offs_m0,
            offs_d, c, e, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, q_row0,
            q_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA, FUSED_DQ,
            NEED_DBIAS)
        if NEED_DBIAS:
            part = (off_b * nheads_kv * group + off_h) * tl.cdiv(seqlen_k, BLOCK_N) + pid_n
            tl.store(DBiasPart + part, tl.sum(dbias, axis=0))
    DK_tile = DK + off_b * stride_dkb + off_hk * stride_dkh + start_n.to(tl.int64) * stride_dkn
    DV_tile = DV + off_b * stride_dvb + off_hk * stride_dvh + start_n.to(tl.int64) * stride_dvn
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
):
    """dq += dS k over the key tiles [start, end) (USE_TMA as in the forward's key loop)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        if USE_TMA:
            k = tma_load(K_tile, kv_row0 + start_n, kv_col, BLOCK_N, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
            v = tma_load(V_tile, kv_row0 + start_n, kv_col, BLOCK_N, HEAD_DIM, BLOCK_D)  # [BLOCK_N, BLOCK_D]
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


@triton.jit
def _sigmoid_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    Bias,
    Slopes,
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
):
    """One program = BLOCK_M queries of one (batch, head): dQ without atomics (the deterministic form);
    1-D grid of cdiv(seqlen_q, BLOCK_M) * batch * nheads_q."""
    pid_m, pid_bh = program_coords(seqlen_q, BLOCK_M, True, BLOCK_MAJOR)
    off_b = (pid_bh // nheads_q).to(tl.int64)
    off_h = pid_bh % nheads_q
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    m_offs = tl.arange(0, BLOCK_M)[:, None]

    Q_tile = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qn
    DO_tile = DO + off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_don
    if USE_TMA:
        K_tile = K
        V_tile = V
    else:
        K_tile = K + off_b * stride_kb + off_hk * stride_kh
        V_tile = V + off_b * stride_vb + off_hk * stride_vh
    kv_row0 = (off_b * seqlen_k).to(tl.int32)
    kv_col = tma_col(off_hk, HEAD_DIM, BLOCK_D)
    q = tl.load(Q_tile + m_offs * stride_qn + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO_tile + m_offs * stride_don + offs_d[None, :], mask=tile_ok, other=0.0)  # [BLOCK_M, BLOCK_D]

    qk_scale = scale * zf
    z_bias = tl.load(Bias + off_h) * zf
    alibi_z = 0.0
    if HAS_ALIBI:
        alibi_z = -tl.load(Slopes + off_b * stride_sb + off_h) * zf
    pos_shift = seqlen_k - seqlen_q
    a, b, c, e = tile_ranges(
        start_m, seqlen_q, seqlen_k, pos_shift - win_left, pos_shift + win_right, BLOCK_M, BLOCK_N
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, a, b,
                   qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, kv_row0, kv_col,
                   True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    dq = _dq_tiles(dq, q, do, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, b, c,
                   qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, kv_row0, kv_col,
                   False, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    dq = _dq_tiles(dq, q, do, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, c, e,
                   qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right, kv_row0, kv_col,
                   True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    DQ_tile = DQ + off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqn
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
    choice in configs.use_fused_dq) adds dQ with fp32 atomics inside the dK/dV kernel."""
    do, q, k, v = (last_dim_contiguous(t) for t in (do, q, k, v))
    batch, seqlen_q, nheads_q, head_dim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if seqlen_q == 0 or seqlen_k == 0 or batch == 0:
        dk.zero_(), dv.zero_()
        return torch.zeros_like(q), dk, dv, torch.zeros(nheads_q, dtype=torch.float32, device=q.device)
    cfg_kv, cfg_q = configs or backward_configs(head_dim, q.dtype, q.device)
    left, right = window_bounds(seqlen_q, seqlen_k, causal, window_left, window_right)
    bias = bias.to(torch.float32).contiguous()
    slopes = bias if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()
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
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    stride_sb = slopes.stride(0) if slopes.dim() == 2 else 0
    n_kblocks = triton.cdiv(seqlen_k, cfg_kv.block_n)
    dbias_part = torch.empty((batch, nheads_q, n_kblocks) if need_dbias else (1,), dtype=torch.float32,
                             device=q.device)
    descs = [tma_view(q, cfg_kv.block_m), tma_view(do, cfg_kv.block_m)] if use_tma else [None]
    if fused and use_tma:
        descs.append(tma_view(dq, cfg_kv.block_m))
    tma_kv = all(x is not None for x in descs)
    qa, doa = descs[:2] if tma_kv else (q, do)
    dqa = descs[2] if tma_kv and fused else dq
    _sigmoid_attn_bwd_dkdv_kernel[(n_kblocks * batch * nheads_kv,)](
        qa, k, v, doa, dk, dv, dqa, dbias_part, bias, slopes,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_sb, nheads_kv, group, seqlen_q, seqlen_k, left, right, float(scale), z_factor(mode),
        BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, USE_TMA=tma_kv, FUSED_DQ=fused, NEED_DBIAS=need_dbias,
        BLOCK_MAJOR=cfg_kv.block_major, num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages, **common,
    )
    if fused:
        dq = (dq * scale).to(q.dtype)
    else:
        descs = [tma_view(k, cfg_q.block_n), tma_view(v, cfg_q.block_n)] if use_tma else [None]
        tma_q = all(x is not None for x in descs)
        ka, va = descs if tma_q else (k, v)
        _sigmoid_attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg_q.block_m) * batch * nheads_q,)](
            q, ka, va, do, dq, bias, slopes,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            stride_sb, nheads_q, group, seqlen_q, seqlen_k, left, right, float(scale), z_factor(mode),
            BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, USE_TMA=tma_q,
            BLOCK_MAJOR=cfg_q.block_major, num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages, **common,
        )
    dbias = dbias_part.sum(dim=(0, 2)) if need_dbias else torch.zeros(nheads_q, dtype=torch.float32,
                                                                       device=q.device)
    return dq, dk, dv, dbias
