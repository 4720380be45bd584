"""Triton forward kernel of dense sigmoid attention and its launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sigattn.ops.configs import AttnConfig, forward_config, interpreting
from sigattn.ops.primitives import (
    SIGMOID_ACCURATE,
    SIGMOID_FAST_ASM,
    SIGMOID_FAST_PORTABLE,
    alibi_distance,
    program_coords,
    sigmoid_from_z,
    tile_ranges,
    tma_col,
    tma_load,
    visible,
    z_factor,
)


@triton.jit
def _load_kt(K_tile, stride_kn, start_n, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """K^T tile [BLOCK_D, BLOCK_N] of keys start_n + offs_n0 (zeros past seqlen_k / HEAD_DIM on the pointer path)."""
    if USE_TMA:
        kt = tl.trans(tma_load(K_tile, kv_row0 + start_n, kv_col, offs_n0.shape[0], HEAD_DIM, BLOCK_D))
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
def _load_v(V_tile, stride_vn, start_n, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
            MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """V tile [BLOCK_N, BLOCK_D] of keys start_n + offs_n0."""
    if USE_TMA:
        v = tma_load(V_tile, kv_row0 + start_n, kv_col, offs_n0.shape[0], HEAD_DIM, BLOCK_D)
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
):
    """acc += sigmoid(z(q k^T)) v over the key tiles [start, end); MASKED tiles apply the visibility mask.
    USE_TMA: K_tile/V_tile are descriptors over the (batch * seqlen_k, nheads_kv * HEAD_DIM) view; rows past
    seqlen_k then hold the next batch's keys (finite), which the mask zeroes like any invisible key.
    PIPELINE_QK: issue tile j+1's q k^T before tile j's sigmoid, so the tensor cores run while the MUFU works
    (FlashAttention-3's intra-warpgroup overlap, written in the source order)."""
    if PIPELINE_QK and not MASKED:
        if start < end:
            kt = _load_kt(K_tile, stride_kn, start, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
                          MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            for start_n in tl.range(start, end - BLOCK_N, BLOCK_N):
                kt = _load_kt(K_tile, stride_kn, start_n + BLOCK_N, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
                              MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
                qk_next = tl.dot(q, kt, input_precision=DOT_PRECISION)
                p = _weights(qk, offs_m, start_n + offs_n0, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k,
                             pos_shift, win_left, win_right, MASKED, HAS_ALIBI, SIGMOID)
                v = _load_v(V_tile, stride_vn, start_n, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
                            MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
                qk = qk_next
            last = end - BLOCK_N
            p = _weights(qk, offs_m, last + offs_n0, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k,
                         pos_shift, win_left, win_right, MASKED, HAS_ALIBI, SIGMOID)
            v = _load_v(V_tile, stride_vn, last, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
                        MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        for start_n in tl.range(start, end, BLOCK_N):
            kt = _load_kt(K_tile, stride_kn, start_n, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
                          MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            p = _weights(qk, offs_m, start_n + offs_n0, qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k,
                         pos_shift, win_left, win_right, MASKED, HAS_ALIBI, SIGMOID)
            v = _load_v(V_tile, stride_vn, start_n, offs_n0, offs_d, seqlen_k, kv_row0, kv_col,
                        MASKED, HEAD_DIM, BLOCK_D, USE_TMA)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
    return acc


@triton.jit
def _sigmoid_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
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
    stride_ob,
    stride_on,
    stride_oh,
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
):
    """One program = BLOCK_M queries of one (batch, head); 1-D grid of cdiv(seqlen_q, BLOCK_M) * batch * nheads_q
    (a 2-D grid caps batch * nheads at 65535)."""
    pid_m, pid_bh = program_coords(seqlen_q, BLOCK_M, True, BLOCK_MAJOR)
    off_b = (pid_bh // nheads_q).to(tl.int64)
    off_h = pid_bh % nheads_q
    off_hk = (off_h // group).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    O_tile = Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
    row_ok = offs_m[:, None] < seqlen_q
    kv_row0 = (off_b * seqlen_k).to(tl.int32)
    kv_col = tma_col(off_hk, HEAD_DIM, BLOCK_D)
    if USE_TMA:
        K_tile = K
        V_tile = V
        # Rows past seqlen_q (next batch's queries) are computed and never stored.
        q = tma_load(Q, (off_b * seqlen_q + start_m).to(tl.int32), tma_col(off_h, HEAD_DIM, BLOCK_D), BLOCK_M,
                     HEAD_DIM, BLOCK_D)
    else:
        K_tile = K + off_b * stride_kb + off_hk * stride_kh
        V_tile = V + off_b * stride_vb + off_hk * stride_vh
        Q_tile = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qn
        q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(Q_tile + q_offs, mask=row_ok & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    qk_scale = scale * zf
    z_bias = tl.load(Bias + off_h) * zf
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
                     kv_row0, kv_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA,
                     PIPELINE_QK)
    acc = _fwd_tiles(acc, q, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, b, c,
                     qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right,
                     kv_row0, kv_col, False, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA,
                     PIPELINE_QK)
    acc = _fwd_tiles(acc, q, K_tile, V_tile, stride_kn, stride_vn, offs_m, offs_n0, offs_d, c, e,
                     qk_scale, z_bias, alibi_z, seqlen_q, seqlen_k, pos_shift, win_left, win_right,
                     kv_row0, kv_col, True, HAS_ALIBI, SIGMOID, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA,
                     PIPELINE_QK)
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
    """Descriptor over t (B, N, H, D) for [block_rows, BLOCK_D] tiles of one head, or None where TMA can't
    address it (batch not a multiple of rows, unaligned strides, > 2^31 rows, padded D > 128). D a power of 2: the
    (B * N, H * D) view; otherwise the (B * N, H, D) view with block [rows, 1, BLOCK_D], whose zero fill
    pads lanes D..BLOCK_D (a rank-2 block would read the next head's columns there)."""
    b, n, h, d = t.shape
    if t.stride(3) != 1 or (b > 1 and t.stride(0) != n * t.stride(1)) or b * n >= 2**31:
        return None
    if (t.stride(1) * t.element_size()) % 16 or (t.stride(2) * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    block_d = triton.next_power_of_2(d)
    if d != block_d and block_d > 128:
        # Measured on H100 (bench/NOTES.md, v5): the rank-3 view sped up d=96 (fwd 264 -> 312 TFLOP/s) but
        # slowed d=192 (421 -> 348), so padded dims above 128 keep the pointer path.
        return None
    if d == block_d:
        if t.stride(2) != d:
            return None
        return TensorDescriptor(t, [b * n, h * d], [t.stride(1), 1], [block_rows, d])
    return TensorDescriptor(t, [b * n, h, d], [t.stride(1), t.stride(2), 1], [block_rows, 1, block_d])


def use_tma_default(device: torch.device) -> bool:
    """TMA (bulk tensor copies) on Hopper and newer; the interpreter and older GPUs take the pointer path."""
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/seq/head strides but need unit stride along the head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


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
    alibi_slopes fp32 (B, Hq) or None. Returns o (B, Nq, Hq, D) in q's dtype."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, seqlen_q, nheads_q, head_dim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    cfg = config or forward_config(head_dim, q.dtype, q.device, causal)
    left, right = window_bounds(seqlen_q, seqlen_k, causal, window_left, window_right)
    bias = bias.to(torch.float32).contiguous()
    slopes = bias if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()
    mode = sigmoid_mode(sigmoid_impl, q.device)
    grid = (triton.cdiv(seqlen_q, cfg.block_m) * batch * nheads_q,)
    # TMA (bulk tensor copies) on Hopper+; the pointer path serves other GPUs, odd layouts and the interpreter.
    use_tma = use_tma_default(q.device) if use_tma is None else use_tma
    descs = [tma_view(q, cfg.block_m), tma_view(k, cfg.block_n), tma_view(v, cfg.block_n)] if use_tma else [None]
    use_tma = all(x is not None for x in descs)
    qa, ka, va = descs if use_tma else (q, k, v)
    _sigmoid_attn_fwd_kernel[grid](
        qa, ka, va, o, bias, slopes,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        slopes.stride(0) if slopes.dim() == 2 else 0,
        nheads_q, nheads_q // nheads_kv, seqlen_q, seqlen_k, left, right,
        float(scale), z_factor(mode),
        HAS_ALIBI=alibi_slopes is not None,
        SIGMOID=mode,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_TMA=use_tma,
        PIPELINE_QK=cfg.pipeline_qk,
        BLOCK_MAJOR=cfg.block_major,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return o
