"""Hopper (sm_90) Gluon backward kernel of dense sigmoid attention: dK/dV in registers, dQ by TMA reduce-add."""

from __future__ import annotations

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language import _core as gl_core
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sigattn.ops.configs import cdiv
from sigattn.ops.fast_launch import launch
from sigattn.ops.gluon_forward import (
    _rank3_desc,
    _seq_desc,
    _tanh_approx,
    empty_with_headroom,
    gluon_supports,
    with_headroom,
)
from sigattn.ops.primitives import LOG2E

# FlashAttention-3 backward layout. One CTA = 128 keys of one (batch, kv head); two consumer warpgroups own 64 keys
# each (K, V rows in shared memory, dK, dV fp32 in registers) and walk the same query tiles, which one producer warp
# streams through a TMA ring (Q and dO of every query head of the GQA group). Per query tile, in the transposed
# [key, query] frame so that P^T and dS^T come out of the accumulators already as wgmma A operands (no shared-memory
# round trip, as P in the forward): S^T = K Q^T, dP^T = V dO^T, P^T = sigmoid (the forward's exact formula, so the
# bf16 P is the forward's), dS^T = dP^T P^T (1 - P^T), dV += P^T dO, dK += dS^T Q. dQ needs dS with queries as
# rows: each warpgroup writes its dS^T half to shared memory, the two meet at an mbarrier, and each computes half of
# the CTA's dS K (SPLIT_D, d=128: half of the head dim over all 128 keys; else, d=64 with 128-query tiles: half the
# query rows) and adds it to an fp32 dQ buffer with one TMA reduce-add (cp.reduce.async.bulk.tensor). Splitting keeps
# one reduce-add per (query tile, 128 keys) — half the traffic of one per warpgroup — and the dQ accumulator at 32
# registers. Triton 3.6's Gluon has no Python wrapper for the reduce, its IR builder has one (`_tma_reduce_add`).
#
# Per head dim: (query rows per tile, Q/dO ring stages, SPLIT_D, consumer registers).
# Registers per consumer thread (fp32 accumulators, 64 keys per warpgroup): d=128 dK 64 + dV 64 + S^T 32 + dP^T 32
# (then P^T 16 + dS^T 16 bf16 in flight + dQ 32) ~ 192 of 240; d=64 (128-query tiles) dK 32 + dV 32 + S^T 64 +
# dP^T 64 ~ 192 of 240. Shared memory: d=128 K 32 KB + V 32 + 2 x (Q 16 + dO 16) + dS 2 x 16 + dQ staging 2 x 16
# = 192 KB; d=64 K 16 + V 16 + 2 x (Q 16 + dO 16) + dS 2 x 32 + dQ staging 2 x 16 = 176 KB.
GLUON_BWD_CONFIGS: dict[int, tuple[int, int, bool, int]] = {
    64: (128, 2, False, 240),
    128: (64, 2, True, 240),
}
BLOCK_N = 64  # keys per consumer warpgroup; a CTA owns 2 * BLOCK_N
DQ_CHUNK = 32  # fp32 columns per dQ reduce-add (128 bytes)
NUM_CONSUMERS = 2


@gl_core.builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Asynchronous bulk tensor reduce-add of shared memory `src` into the tile of `tensor_desc` at `coord` (rows
    outside the tensor are dropped, as by a TMA store); completion as a store (`tma.store_wait`)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _probs_t(s, key0, q0, qk_mul, z_bias, pos_shift, MASKED: gl.constexpr, SIGMOID: gl.constexpr,
             BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, s_layout: gl.constexpr):
    """fp32 P^T [BLOCK_N keys, BLOCK_M queries] = sigmoid(scale * s + bias), exactly 0 where the bottom-right causal
    mask hides the key when MASKED: the forward's `_weights` in the transposed frame, bit for bit."""
    z = s * qk_mul + z_bias
    if MASKED:
        offs_n = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        offs_m = q0 + pos_shift + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        z = gl.where(offs_n[:, None] <= offs_m[None, :], z, float("inf") if SIGMOID == 0 else float("-inf"))
    if SIGMOID == 0:
        p = gl.fdiv(gl.full(z.shape, 1.0, gl.float32, s_layout), 1.0 + gl.exp2(z))
    else:
        p = 0.5 * _tanh_approx(z) + 0.5
    return p


@gluon.jit
def _bwd_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, do_ready,
                  qdo_empty, off_b, q_seq, q_row, kv_seq, kv_row, off_hk, n0, group, m_lo, n_mtiles,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr):
    """One warp: this CTA's K and V once, then Q and dO of query tiles m_lo .. n_mtiles - 1 of every query head of
    the group through the STAGES-deep ring (Q and dO have their own ready barriers: S^T can start before dO lands).
    Rows are addressed [q_seq, q_row + m, col] / [kv_seq, kv_row + n, col] (see the kernel's docstring)."""
    if not VARLEN:
        # Dense: the batch index, no row offset. (The kernel passes 0s for q_seq, q_row, ...; a 0 captured by a
        # partition stays a runtime value, hence these overrides rather than additions of 0.)
        q_seq = off_b
        kv_seq = off_b
        q_row = 0
        kv_row = 0
    kv_col = off_hk * HEAD_DIM
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_seq, kv_row + n0, kv_col], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_seq, kv_row + n0, kv_col], kv_bar, v_smem)
    it = 0
    for g in range(group):
        q_col = (off_hk * group + g) * HEAD_DIM
        for m in range(m_lo, n_mtiles):
            st = it % STAGES
            mbarrier.wait(qdo_empty.index(st), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(q_ready.index(st), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_seq, q_row + m * BLOCK_M, q_col], q_ready.index(st),
                                            q_smem.index(st))
            mbarrier.expect(do_ready.index(st), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [q_seq, q_row + m * BLOCK_M, q_col], do_ready.index(st),
                                            do_smem.index(st))
            it += 1


@gluon.jit
def _bwd_consumer(CID: gl.constexpr, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready,
                  do_ready, qdo_empty, ds_ready, DK, DV, DBiasPart, Bias, stride_kb, stride_kn, stride_bb, nheads_kv,
                  off_b, q_seq, q_row, k_start, off_hk, pid_n, n0, group, m_lo, n_mtiles, n_kblocks, seqlen_q,
                  seqlen_k, qk_mul, zf, scale, IS_CAUSAL: gl.constexpr, SIGMOID: gl.constexpr,
                  NEED_DBIAS: gl.constexpr, SPLIT_D: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr):
    """One warpgroup owning keys [n0 + CID * BLOCK_N, + BLOCK_N) of the CTA: dK, dV of those keys over every query
    tile of every query head of the group, and its half of each tile's dQ (see the module comment). seqlen_q and
    seqlen_k are this sequence's lengths (VARLEN: per sequence; the kernel computes them)."""
    if not VARLEN:
        q_seq = off_b  # dense: as in the producer, 0s passed by the kernel are replaced, not added
        q_row = 0
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    DQ_M: gl.constexpr = BLOCK_M if SPLIT_D else BLOCK_M // 2
    DQ_N: gl.constexpr = HEAD_DIM // 2 if SPLIT_D else HEAD_DIM
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_N, 16])
    dtype: gl.constexpr = q_smem.dtype
    pos_shift = seqlen_k - seqlen_q
    key0 = n0 + CID * BLOCK_N
    k_all = k_smem.reshape([2 * BLOCK_N, HEAD_DIM])
    k_c = k_all.slice(CID * BLOCK_N, BLOCK_N)  # [BLOCK_N, HEAD_DIM]
    v_c = v_smem.reshape([2 * BLOCK_N, HEAD_DIM]).slice(CID * BLOCK_N, BLOCK_N)  # [BLOCK_N, HEAD_DIM]
    if SPLIT_D:
        k_dq = k_all.slice(CID * DQ_N, DQ_N, dim=1)  # [2 * BLOCK_N, DQ_N]
        dq_row = 0
        dq_col = CID * DQ_N
    else:
        k_dq = k_all  # [2 * BLOCK_N, HEAD_DIM]
        dq_row = CID * DQ_M
        dq_col = 0
    dq_buf = dq_smem.index(CID)  # [1, DQ_M, DQ_N]
    DQ_CHUNK: gl.constexpr = dq_desc.block_type.shape[2]
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dq_zero = gl.zeros([DQ_M, DQ_N], gl.float32, dq_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    # Query tiles from m_full on see every key of this warpgroup; causal masks the tiles before it.
    m_full = m_lo
    if IS_CAUSAL:
        m_full = gl.maximum(key0 + BLOCK_N - 1 - pos_shift + BLOCK_M - 1, 0) // BLOCK_M
    mbarrier.wait(kv_bar, 0)
    it = 0
    for g in range(group):
        off_h = off_hk * group + g
        if VARLEN:
            z_bias = gl.load(Bias + off_b * stride_bb + off_h) * zf  # (B, Hq); stride_bb = 0 when shared
        else:
            z_bias = gl.load(Bias + off_h) * zf
        dbias = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, st_layout))
        for m in range(m_lo, n_mtiles):
            st = it % STAGES
            ph = (it // STAGES) & 1
            mbarrier.wait(q_ready.index(st), ph)
            q = q_smem.index(st).reshape([BLOCK_M, HEAD_DIM])
            s = warpgroup_mma(k_c, q.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(st), ph)
            do = do_smem.index(st).reshape([BLOCK_M, HEAD_DIM])
            dp = warpgroup_mma(v_c, do.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            # The sigmoid (MUFU) runs while dP^T is on the tensor cores.
            s = warpgroup_mma_wait(1, deps=(s, ))
            if m < m_full:
                p = _probs_t(s, key0, m * BLOCK_M, qk_mul, z_bias, pos_shift, IS_CAUSAL, SIGMOID, BLOCK_N, BLOCK_M,
                             st_layout)
            else:
                p = _probs_t(s, key0, m * BLOCK_M, qk_mul, z_bias, pos_shift, False, SIGMOID, BLOCK_N, BLOCK_M,
                             st_layout)
            dp = warpgroup_mma_wait(0, deps=(dp, ))
            ds = dp * p * (1.0 - p)  # masked: p = 0, so dS = 0  # [BLOCK_N, BLOCK_M]
            if NEED_DBIAS:
                dbias += gl.sum(ds, axis=1)
            ds16 = ds.to(dtype)
            pt = gl.convert_layout(p.to(dtype), op_layout)
            dst = gl.convert_layout(ds16, op_layout)
            dv = warpgroup_mma(pt, do, dv, is_async=True)
            dk = warpgroup_mma(dst, q, dk, is_async=True)
            # dS^T half of this warpgroup into the double-buffered tile; the other warpgroup's half must be there
            # too before dQ. Buffer it % 2 is free: both warpgroups passed tile it - 1's barrier, which each arrives
            # at only after its dQ matmul of tile it - 2 (the last reader of this buffer) completed.
            buf = it % 2
            ds_smem.index(buf).slice(CID * BLOCK_N, BLOCK_N).store(ds16)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(ds_ready.index(buf))
            mbarrier.wait(ds_ready.index(buf), (it // 2) & 1)
            if SPLIT_D:
                ds_a = ds_smem.index(buf).permute((1, 0))  # [BLOCK_M, 2 * BLOCK_N]
            else:
                ds_a = ds_smem.index(buf).slice(CID * DQ_M, DQ_M, dim=1).permute((1, 0))  # [DQ_M, 2 * BLOCK_N]
            dq = warpgroup_mma(ds_a, k_dq, dq_zero, use_acc=False, is_async=True)
            dv, dk, dq, pt, dst = warpgroup_mma_wait(0, deps=(dv, dk, dq, pt, dst))
            mbarrier.arrive(qdo_empty.index(st))
            # The previous tile's reduce-add must have read the staging buffer (a whole tile ago: no stall).
            tma.store_wait(0)
            dq_buf.reshape([DQ_M, DQ_N]).store(dq)
            fence_async_shared()
            # One reduce per 128-byte column chunk: the descriptor's box is one 128-byte swizzle row wide, and
            # (unlike TMA loads) Triton 3.6 does not split a wider reduce into chunks itself.
            for c in gl.static_range(DQ_N // DQ_CHUNK):
                _tma_reduce_add(dq_desc,
                                [q_seq, q_row + m * BLOCK_M + dq_row, off_h * HEAD_DIM + dq_col + c * DQ_CHUNK],
                                dq_buf.slice(c * DQ_CHUNK, DQ_CHUNK, dim=2))
            it += 1
        if NEED_DBIAS:
            gl.store(DBiasPart + ((off_b * group * nheads_kv + off_h) * n_kblocks + pid_n) * 2 + CID,
                     gl.sum(dbias, axis=0))
    tma.store_wait(0)
    # dK, dV straight from the accumulators (once per CTA: 2 x 16 KB per warpgroup at d=128); rows past seqlen_k
    # are keys that do not exist.
    offs_n = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    if VARLEN:
        row_off = k_start.to(gl.int64) * stride_kn  # packed (total_k, Hkv, D): the sequence's first row
    else:
        row_off = off_b.to(gl.int64) * stride_kb
    offs = row_off + offs_n.to(gl.int64)[:, None] * stride_kn + off_hk * HEAD_DIM + offs_d[None, :]
    ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    gl.store(DK + offs, (dk * scale).to(dtype), mask=ok)
    gl.store(DV + offs, dv.to(dtype), mask=ok)


@gluon.jit
def _sigmoid_attn_bwd_gluon_kernel(
    q_desc, do_desc, k_desc, v_desc, dq_desc, DK, DV, DBiasPart, Bias, CuSeqQ, CuSeqK,
    stride_kb, stride_kn, stride_bb, nheads_kv, group, seqlen_q, seqlen_k, qk_mul, zf, scale,
    IS_CAUSAL: gl.constexpr, SIGMOID: gl.constexpr, NEED_DBIAS: gl.constexpr, SPLIT_D: gl.constexpr,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, VARLEN: gl.constexpr,
):
    """Grid (cdiv(seqlen_k, 2 * BLOCK_N), batch * nheads_kv): key blocks of one (batch, kv head) adjacent (they read
    the same Q/dO tiles from L2), block 0 first (under causal it has the most query tiles). Descriptors are rank-3
    (B, N, H*D) views: rows past a sequence read as zeros (Q = dO = 0 rows give dS = 0 and add nothing; K = V = 0
    rows give dS = 0, so no mask is needed off the causal diagonal) and dQ adds past seqlen_q are dropped.
    K/V/dK/dV are contiguous (B, Nk, Hkv, D), dbias partials are (B, Hq, n_kblocks, 2).
    VARLEN: q/do/k/v/dq are packed (total, H, D) tensors seen through `gluon_forward._seq_desc` views, which clip at
    each sequence's end as the dense views clip at N (the body is the dense one with other coordinates);
    seqlen_q/seqlen_k are the longest sequences (the grid), CuSeqQ/CuSeqK the int32 (B + 1,) row offsets, Bias
    (B, Hq) with batch stride stride_bb, DK/DV (total_k, Hkv, D). Key blocks past a shorter sequence's end get no
    query tiles (every partition reads the same trip counts) and store nothing but a dbias partial of 0.
    Dense: CuSeqQ/CuSeqK/stride_bb unused, Bias (Hq,)."""
    pid_n = gl.program_id(0)
    pid_bh = gl.program_id(1)
    n_kblocks = gl.num_programs(0)
    off_b = pid_bh // nheads_kv
    off_hk = pid_bh % nheads_kv
    n0 = pid_n * (2 * BLOCK_N)
    if VARLEN:
        q_seq = gl.load(CuSeqQ + off_b + 1)
        kv_seq = gl.load(CuSeqK + off_b + 1)
        k_start = gl.load(CuSeqK + off_b)
        q_row = seqlen_q - (q_seq - gl.load(CuSeqQ + off_b))
        kv_row = seqlen_k - (kv_seq - k_start)
        seqlen_q = seqlen_q - q_row
        seqlen_k = seqlen_k - kv_row
        bias_stride = stride_bb
    else:
        # Constants: the partitions compute what they need from off_b (no extra captured values).
        q_seq = 0
        kv_seq = 0
        k_start = 0
        q_row = 0
        kv_row = 0
        bias_stride = 0
    n_mtiles = gl.cdiv(seqlen_q, BLOCK_M)
    if VARLEN:
        n_mtiles = gl.where(n0 < seqlen_k, n_mtiles, 0)
    m_lo = 0
    if IS_CAUSAL:
        # Bottom-right causal: query i sees key j iff j <= i + seqlen_k - seqlen_q; earlier tiles see no key here.
        m_lo = gl.maximum(n0 - (seqlen_k - seqlen_q), 0) // BLOCK_M
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, 2 * BLOCK_N, BLOCK_M], ds_layout)
    DQ_M: gl.constexpr = BLOCK_M if SPLIT_D else BLOCK_M // 2
    DQ_N: gl.constexpr = HEAD_DIM // 2 if SPLIT_D else HEAD_DIM
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, DQ_M, DQ_N], dq_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)

    gl.warp_specialize([
        (_bwd_consumer, (0, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready,
                         do_ready, qdo_empty, ds_ready, DK, DV, DBiasPart, Bias, stride_kb, stride_kn, bias_stride,
                         nheads_kv, off_b, q_seq, q_row, k_start, off_hk, pid_n, n0, group, m_lo, n_mtiles, n_kblocks,
                         seqlen_q, seqlen_k, qk_mul, zf, scale, IS_CAUSAL, SIGMOID, NEED_DBIAS, SPLIT_D, HEAD_DIM,
                         BLOCK_M, BLOCK_N, STAGES, VARLEN)),
        (_bwd_consumer, (1, dq_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar, q_ready,
                         do_ready, qdo_empty, ds_ready, DK, DV, DBiasPart, Bias, stride_kb, stride_kn, bias_stride,
                         nheads_kv, off_b, q_seq, q_row, k_start, off_hk, pid_n, n0, group, m_lo, n_mtiles, n_kblocks,
                         seqlen_q, seqlen_k, qk_mul, zf, scale, IS_CAUSAL, SIGMOID, NEED_DBIAS, SPLIT_D, HEAD_DIM,
                         BLOCK_M, BLOCK_N, STAGES, VARLEN)),
        (_bwd_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready,
                         do_ready, qdo_empty, off_b, q_seq, q_row, kv_seq, kv_row, off_hk, n0, group, m_lo,
                         n_mtiles, HEAD_DIM, BLOCK_M, STAGES, VARLEN)),
    ], [4, 1], [CONSUMER_REGS, 24])


# CUDA limits a grid's y dimension to 65535; the kernel's is batch * nheads_kv.
MAX_GRID_Y = 65535


def gluon_bwd_supports(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if gluon_dense_bwd can serve these tensors, else why not (the forward's rules, do like q)."""
    if k.dim() == 4 and k.shape[0] * k.shape[2] > MAX_GRID_Y:
        return f"batch * kv heads must be at most {MAX_GRID_Y} (the grid's y dimension)"
    why = gluon_supports(q, k, v)
    if why is None and (do.shape != q.shape or do.dtype != q.dtype):
        why = "do must have q's shape and dtype"
    if why is None and (do.stride(3) != 1 or do.stride(2) != do.shape[3] or (do.stride(1) * do.element_size()) % 16
                        or (do.stride(0) * do.element_size()) % 16 or do.data_ptr() % 16):
        why = "needs do's heads packed (stride(2) == D, stride(3) == 1) and 16-byte aligned rows"
    return why


def gluon_dense_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | float,
                    scale: float, causal: bool, sigmoid_impl: str, need_dbias: bool = True,
                    config: tuple[int, int, bool, int] | None = None, checked: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of sigmoid attention on Hopper. q, do (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), D in {64, 128},
    bf16/fp16, Hq a multiple of Hkv (GQA: dK/dV summed over the group's query heads in-program, no atomics); bias a
    float or fp32 (Hq,) tensor; causal bottom-right aligned. Returns (dq, dk, dv, dbias): dq/dk/dv contiguous in q's
    dtype, dbias fp32 (Hq,) (None when not need_dbias), as `backward.sigmoid_attn_bwd` (same P as the forward for
    both sigmoid_impl modes). dQ is accumulated in fp32 by TMA reduce-adds (order not fixed: not bitwise
    reproducible, like the portable fused_dq form). config: (block_m, stages, split_d, consumer regs); None takes
    GLUON_BWD_CONFIGS. Raises ValueError where `gluon_bwd_supports` says no (checked=True: the caller has just
    asked it)."""
    why = None if checked else gluon_bwd_supports(do, q, k, v)
    if why is not None:
        raise ValueError(f"gluon_dense_bwd: {why}")
    batch, seqlen_q, nheads_q, head_dim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or seqlen_k == 0:
        dk.zero_(), dv.zero_()
        dbias = torch.zeros(nheads_q, dtype=torch.float32, device=q.device) if need_dbias else None
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv, dbias
    if not isinstance(bias, torch.Tensor):
        bias = torch.full((nheads_q,), float(bias), device=q.device)
    if bias.dtype is not torch.float32 or bias.shape != (nheads_q,) or bias.stride(0) != 1 or bias.device != q.device:
        bias = bias.to(device=q.device, dtype=torch.float32).expand(nheads_q).contiguous()
    block_m, _, split_d, _ = config or GLUON_BWD_CONFIGS[head_dim]
    dq_m = block_m if split_d else block_m // 2
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    descs = (_rank3_desc(q, block_m, head_dim), _rank3_desc(do, block_m, head_dim),
             _rank3_desc(k, NUM_CONSUMERS * BLOCK_N, head_dim), _rank3_desc(v, NUM_CONSUMERS * BLOCK_N, head_dim),
             _rank3_desc(dq_acc, dq_m, DQ_CHUNK))
    dbias_part = _launch_bwd(descs, dk, dv, bias, 0, bias, bias, dk.stride(0), dk.stride(1), batch, nheads_q,
                             nheads_kv, head_dim, seqlen_q, seqlen_k, scale, causal, sigmoid_impl, need_dbias, config,
                             False)
    dq = torch.mul(dq_acc, scale, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))  # one launch, bitwise
    dbias = dbias_part.sum(dim=(0, 2, 3)) if need_dbias else None
    return dq, dk, dv, dbias


def gluon_varlen_bwd_supports(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              batch: int) -> str | None:
    """None if gluon_varlen_bwd can serve these packed (total, H, D) tensors of `batch` sequences, else why not."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or do.dim() != 3:
        return "needs packed (total, H, D) do/q/k/v"
    if batch * k.shape[1] > MAX_GRID_Y:
        return f"batch * kv heads must be at most {MAX_GRID_Y} (the grid's y dimension)"
    return gluon_bwd_supports(do[None], q[None], k[None], v[None])


def gluon_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, bias: torch.Tensor | float,
                     scale: float, causal: bool, sigmoid_impl: str, need_dbias: bool = True,
                     config: tuple[int, int, bool, int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of sigmoid attention on Hopper over packed sequences: q, do (total_q, Hq, D), k/v (total_k, Hkv, D),
    cu_seqlens / max_seqlen as `gluon_forward.gluon_varlen_fwd`; bias a float, fp32 (Hq,) or (B, Hq) (per
    sequence). Returns (dq, dk, dv, dbias) as `gluon_dense_bwd`, dq/dk/dv packed like q/k/v, dbias fp32 of bias's
    shape ((Hq,) for a float). Raises ValueError where `gluon_varlen_bwd_supports` says no."""
    batch = cu_seqlens_q.numel() - 1
    why = gluon_varlen_bwd_supports(do, q, k, v, batch)
    if why is not None:
        raise ValueError(f"gluon_varlen_bwd: {why}")
    nheads_q, head_dim = q.shape[1], q.shape[2]
    nheads_kv = k.shape[1]
    if not isinstance(bias, torch.Tensor):
        bias = torch.full((nheads_q,), float(bias), device=q.device)
    bias = bias.to(device=q.device, dtype=torch.float32)
    per_seq = bias.dim() == 2
    bias = bias.expand(batch, nheads_q) if per_seq else bias.expand(nheads_q)
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.shape[0] == 0 or k.shape[0] == 0 or batch <= 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        dk.zero_(), dv.zero_()
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if need_dbias else None
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv, dbias
    block_m, _, split_d, _ = config or GLUON_BWD_CONFIGS[head_dim]
    dq_m = block_m if split_d else block_m // 2
    # Every view needs max_seqlen rows of headroom (`gluon_forward._seq_desc`): inputs without it are copied.
    q, do = with_headroom(q, max_seqlen_q), with_headroom(do, max_seqlen_q)
    k, v = with_headroom(k, max_seqlen_k), with_headroom(v, max_seqlen_k)
    dq_acc = empty_with_headroom(q.shape, torch.float32, q.device, max_seqlen_q, zero=True)
    kv_rows = NUM_CONSUMERS * BLOCK_N
    descs = (_seq_desc(q, block_m, head_dim, max_seqlen_q), _seq_desc(do, block_m, head_dim, max_seqlen_q),
             _seq_desc(k, kv_rows, head_dim, max_seqlen_k), _seq_desc(v, kv_rows, head_dim, max_seqlen_k),
             _seq_desc(dq_acc, dq_m, DQ_CHUNK, max_seqlen_q))
    dbias_part = _launch_bwd(descs, dk, dv, bias, bias.stride(0) if per_seq else 0, cu_seqlens_q.contiguous(),
                             cu_seqlens_k.contiguous(), 0, dk.stride(0), batch, nheads_q, nheads_kv, head_dim,
                             max_seqlen_q, max_seqlen_k, scale, causal, sigmoid_impl, need_dbias, config, True)
    dq = torch.mul(dq_acc, scale, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
    dbias = None
    if need_dbias:
        dbias = dbias_part.sum(dim=(2, 3)) if per_seq else dbias_part.sum(dim=(0, 2, 3))
    return dq, dk, dv, dbias


def _launch_bwd(descs: tuple[TensorDescriptor, ...], dk: torch.Tensor, dv: torch.Tensor, bias: torch.Tensor,
                stride_bb: int, cu_q: torch.Tensor, cu_k: torch.Tensor, stride_kb: int, stride_kn: int, batch: int,
                nheads_q: int, nheads_kv: int, head_dim: int, seqlen_q: int, seqlen_k: int, scale: float,
                causal: bool, sigmoid_impl: str, need_dbias: bool, config: tuple[int, int, bool, int] | None,
                varlen: bool) -> torch.Tensor:
    """The kernel launch of gluon_dense_bwd / gluon_varlen_bwd (varlen: seqlen_q/k are the longest sequences).
    Returns the dbias partials (B, Hq, n_kblocks, 2) (any fp32 tensor when not need_dbias)."""
    if sigmoid_impl == "fast":
        mode, zf = 1, 0.5
    elif sigmoid_impl == "accurate":
        mode, zf = 0, -LOG2E
    else:
        raise ValueError(f"sigmoid_impl must be 'fast' or 'accurate'; got {sigmoid_impl!r}")
    block_m, stages, split_d, regs = config or GLUON_BWD_CONFIGS[head_dim]
    n_kblocks = cdiv(seqlen_k, NUM_CONSUMERS * BLOCK_N)
    # Without need_dbias the kernel never touches its partials: the fp32 bias serves as the pointer (no allocation).
    dbias_part = (torch.empty((batch, nheads_q, n_kblocks, NUM_CONSUMERS), dtype=torch.float32, device=bias.device)
                  if need_dbias else bias)
    # 2 consumer warpgroups + one producer warp, padded to a warpgroup; setmaxnreg moves the producer's registers
    # to the consumers (2 x 128 x 240 + 128 x 24 <= 65536).
    nwarps = 4 * NUM_CONSUMERS + 4
    launch(
        _sigmoid_attn_bwd_gluon_kernel, (n_kblocks, batch * nheads_kv),
        *descs, dk, dv, dbias_part, bias, cu_q, cu_k,
        stride_kb, stride_kn, stride_bb, nheads_kv, nheads_q // nheads_kv, seqlen_q, seqlen_k, float(scale) * zf, zf,
        float(scale),
        IS_CAUSAL=causal, SIGMOID=mode, NEED_DBIAS=need_dbias, SPLIT_D=split_d, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=BLOCK_N, STAGES=stages, CONSUMER_REGS=regs, VARLEN=varlen,
        num_warps=4, maxnreg=(65536 // (32 * nwarps)) // 8 * 8,
    )
    return dbias_part
