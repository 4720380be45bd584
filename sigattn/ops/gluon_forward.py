"""Hopper (sm_90) Gluon forward kernel of dense sigmoid attention: TMA producer warp + wgmma consumer warpgroups."""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sigattn.ops.configs import cdiv, cuda_capability
from sigattn.ops.fast_launch import Replay, launch
from sigattn.ops.fast_launch import enabled as fast_launch_enabled
from sigattn.ops.primitives import LOG2E

# Per head dim: (query rows per consumer warpgroup, consumer warpgroups, key tile, K/V ring stages,
# consumer registers per thread). 64 rows per warpgroup keep S (64 x BLOCK_N fp32), P_j and P_{j-1} (bf16, the
# latter an in-flight wgmma operand) and O in registers: d=128 64 + 32 + 32 + 64 = 192 of 240; d=64 64 + 32 + 32 + 32
# = 160 of 160 with three consumers (ptxas serializes every wgmma, C7512, when a change pushes it over).
# Shared memory: d=128 Q 32 KB + O 32 KB + 2 stages x (K 32 KB + V 32 KB) = 192 KB; d=64 Q 24 + O 24 + 4 x 32 =
# 176 KB. Measured alternatives (bench/NOTES.md, v6): d=128 3 stages -7..+3% without the O buffer (no room with it),
# BLOCK_N=64 -1..-12%; d=64 BLOCK_N=64 -3..0%, two consumers (240 regs) -11..+4%. Schedules: "grid" (default)
# vs persistent "dynamic" / "static": +5..8% at N=4k causal, -8..-24% at 16k causal, level otherwise.
GLUON_CONFIGS: dict[int, tuple[int, int, int, int, int]] = {
    64: (64, 3, 128, 4, 160),
    128: (64, 2, 128, 2, 240),
}


@gluon.jit
def _tanh_approx(x):
    # tanh.approx.f32 is one MUFU.TANH (16/clk/SM), versus ex2 + rcp for the exp form.
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _weights(s, j, row0, qk_mul, z_bias, pos_shift, MASKED: gl.constexpr, SIGMOID: gl.constexpr,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr,
             DTYPE: gl.constexpr):
    """bf16/fp16 P [BLOCK_M, BLOCK_N] = sigmoid(scale * s + bias) of key tile j, exactly 0 above the causal
    diagonal when MASKED, in the register layout of wgmma's A operand (no shared-memory round trip)."""
    z = s * qk_mul + z_bias
    if MASKED:
        # Masked logits go to the pre-activation that gives exactly 0 (tanh(-inf) = -1, 1 / (1 + 2^inf) = 0),
        # so the mask is one select on z before the MUFU rather than a second pass over P.
        offs_m = row0 + pos_shift + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        z = gl.where(offs_n[None, :] <= offs_m[:, None], z, float("inf") if SIGMOID == 0 else float("-inf"))
    if SIGMOID == 0:
        p = gl.fdiv(gl.full(z.shape, 1.0, gl.float32, s_layout), 1.0 + gl.exp2(z))
    else:
        p = 0.5 * _tanh_approx(z) + 0.5
    return gl.convert_layout(p.to(DTYPE), p_layout)


@gluon.jit
def _item_index(k):
    """Work item of this program's k-th round. Rounds alternate direction (program p takes slot p, then slot
    grid - 1 - p, ...): with query blocks heavy-first within a head, a program's heavy causal items pair with light
    ones (round-robin alone gives program 0 the heaviest block of every head whenever grid % n_mblocks == 0)."""
    p = gl.program_id(0)
    nprog = gl.num_programs(0)
    return k * nprog + gl.where(k % 2 == 0, p, nprog - 1 - p)


@gluon.jit
def _publish_item(item_buf, item_ready, item_empty, i, t):
    """Producer: hand work item t to the consumers as this program's i-th item (two slots in shared memory)."""
    slot = i % 2
    mbarrier.wait(item_empty.index(slot), ((i // 2) & 1) ^ 1)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    item_buf.index(slot).store(gl.full([1], t, gl.int32, layout))
    mbarrier.arrive(item_ready.index(slot))


@gluon.jit
def _read_item(item_buf, item_ready, item_empty, i):
    """Consumer: this program's i-th work item, as published by the producer."""
    slot = i % 2
    mbarrier.wait(item_ready.index(slot), (i // 2) & 1)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    t = gl.max(item_buf.index(slot).load(layout), axis=0)
    mbarrier.arrive(item_empty.index(slot))
    return t


@gluon.jit
def _work_item(t, n_mblocks, nheads_q, group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, CTA_M: gl.constexpr,
               HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr, VARLEN: gl.constexpr):
    """Coordinates of work item t: query blocks of one (batch, head) adjacent (they share K/V in L2), last block
    first (under causal it has the most key tiles). Returns (off_b, off_h, m0, q_col, kv_col, n_tiles, q_seq, q_row,
    kv_seq, kv_row, len_q, len_k): rows are addressed as [q_seq, q_row + m, q_col] (dense: [off_b, m, q_col]; VARLEN:
    see `_seq_desc`, q_seq = the sequence's end row, q_row = max_seqlen_q - len_q) and len_q/len_k are the sequence's
    lengths. VARLEN: blocks past a shorter sequence's end get n_tiles = 0 (the producer and the consumers see the
    same items, so they agree on every trip count); their Q loads read zeros and their O stores write nothing."""
    bh = t // n_mblocks
    blk = n_mblocks - 1 - t % n_mblocks
    off_b = bh // nheads_q
    off_h = bh % nheads_q
    m0 = blk * CTA_M
    if VARLEN:
        q_seq = gl.load(CuSeqQ + off_b + 1)
        kv_seq = gl.load(CuSeqK + off_b + 1)
        len_q = q_seq - gl.load(CuSeqQ + off_b)
        len_k = kv_seq - gl.load(CuSeqK + off_b)
        q_row = seqlen_q - len_q
        kv_row = seqlen_k - len_k
    else:
        q_seq = off_b
        kv_seq = off_b
        len_q = seqlen_q
        len_k = seqlen_k
        q_row = 0
        kv_row = 0
    hi = len_k
    if IS_CAUSAL:
        # Bottom-right causal: the block's last row sees keys < m0 + CTA_M + seqlen_k - seqlen_q.
        hi = gl.minimum(gl.maximum(m0 + CTA_M + len_k - len_q, 0), len_k)
    if VARLEN:
        hi = gl.where(m0 < len_q, hi, 0)
    return (off_b, off_h, m0, off_h * HEAD_DIM, (off_h // group) * HEAD_DIM, gl.cdiv(hi, BLOCK_N), q_seq, q_row,
            kv_seq, kv_row, len_q, len_k)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
              item_buf, item_ready, item_empty, Counter, n_mblocks, n_items, nheads_q, group, seqlen_q, seqlen_k,
              CuSeqQ, CuSeqK, IS_CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              VARLEN: gl.constexpr):
    """One warp: per work item, the consumers' Q tiles (once the last item's S matmuls are done), then K and V
    tiles through the STAGES-deep ring, whose counter runs on across items. K and V have their own ready/empty
    barriers (consumers free K_j once S_j is done, V_j only after P_j V_j) and K runs one tile ahead of V, in the
    order the consumers need them."""
    kv_base = 0
    item = 0
    t = _item_index(0)
    if DYNAMIC:
        _publish_item(item_buf, item_ready, item_empty, 0, t)
    while t < n_items:
        (off_b, off_h, m0, q_col, kv_col, n_tiles, q_seq, q_row, kv_seq, kv_row, len_q,
         len_k) = _work_item(t, n_mblocks, nheads_q, group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK,
                             NUM_CONSUMERS * BLOCK_M, HEAD_DIM, BLOCK_N, IS_CAUSAL, VARLEN)
        mbarrier.wait(q_empty, (item & 1) ^ 1)
        mbarrier.expect(q_bar, NUM_CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(NUM_CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [q_seq, q_row + m0 + c * BLOCK_M, q_col], q_bar,
                                            q_smem.index(c))
        if DYNAMIC:
            # Items 0 .. grid-1 go one per program; later ones to whichever program asks first, one item ahead.
            t_next = gl.atomic_add(Counter, 1) + gl.num_programs(0)
            _publish_item(item_buf, item_ready, item_empty, item + 1, t_next)
        else:
            t_next = _item_index(item + 1)
        for j in range(n_tiles + 1):
            if j < n_tiles:
                it = kv_base + j
                st = it % STAGES
                mbarrier.wait(k_empty.index(st), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [kv_seq, kv_row + j * BLOCK_N, kv_col], k_ready.index(st),
                                                k_smem.index(st))
            if j > 0:
                it = kv_base + j - 1
                st = it % STAGES
                mbarrier.wait(v_empty.index(st), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [kv_seq, kv_row + (j - 1) * BLOCK_N, kv_col],
                                                v_ready.index(st), v_smem.index(st))
        kv_base += n_tiles
        item += 1
        t = t_next


@gluon.jit
def _consumer(CID: gl.constexpr, o_desc, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
              v_empty, turn, item_buf, item_ready, item_empty, Bias, n_mblocks, n_items, nheads_q, group, seqlen_q,
              seqlen_k, CuSeqQ, CuSeqK, stride_bb, qk_mul, zf, IS_CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr,
              SIGMOID: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr):
    """One warpgroup owning BLOCK_M query rows of each work item. Per key tile j (FlashAttention-3 intra-warpgroup
    overlap): issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, wait for S_j only, compute P_j on the MUFU while the
    tensor cores run P_{j-1} V_{j-1}. PINGPONG: warpgroups take turns issuing (an mbarrier ring whose round count
    runs on across items), so one warpgroup's sigmoid runs under the other's matmuls."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = o_desc.dtype
    pos_shift = seqlen_k - seqlen_q
    q = q_smem.index(CID).reshape([BLOCK_M, HEAD_DIM])
    o_buf = o_smem.index(CID)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    kv_base = 0
    rnd = 0
    item = 0
    if DYNAMIC:
        t = _read_item(item_buf, item_ready, item_empty, 0)
    else:
        t = _item_index(0)
    while t < n_items:
        (off_b, off_h, m0, q_col, kv_col, n_tiles, q_seq, q_row, kv_seq, kv_row, len_q,
         len_k) = _work_item(t, n_mblocks, nheads_q, group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK,
                             NUM_CONSUMERS * BLOCK_M, HEAD_DIM, BLOCK_N, IS_CAUSAL, VARLEN)
        row0 = m0 + CID * BLOCK_M
        if VARLEN:
            # Per-sequence bias ((B, Hq), stride_bb = 0 when shared) and causal offset.
            z_bias = gl.load(Bias + off_b * stride_bb + off_h) * zf
            pos_shift = len_k - len_q
        else:
            z_bias = gl.load(Bias + off_h) * zf
        # Key tiles below n_full are visible to every row of this warpgroup; causal masks only tiles past it.
        n_full = n_tiles
        if IS_CAUSAL:
            n_full = gl.minimum(gl.maximum(row0 + pos_shift + 1, 0) // BLOCK_N, n_tiles)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, item & 1)
        if n_tiles > 0:
            # Round 0: S_0 alone.
            if PINGPONG:
                mbarrier.wait(turn.index(CID), ((rnd & 1) ^ 1) if CID == 0 else (rnd & 1))
            st = kv_base % STAGES
            mbarrier.wait(k_ready.index(st), (kv_base // STAGES) & 1)
            kt = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s = warpgroup_mma(q, kt, s_zero, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index((CID + 1) % NUM_CONSUMERS))
            s = warpgroup_mma_wait(0, deps=(s, ))
            mbarrier.arrive(k_empty.index(st))
            # Tile 0 takes the causal mask whenever causal: one tile, and the mask is exact on visible tiles too.
            p = _weights(s, 0, row0, qk_mul, z_bias, pos_shift, IS_CAUSAL, SIGMOID, BLOCK_M, BLOCK_N, s_layout,
                         p_layout, dtype)
            # Rounds 1 .. n_tiles - 1: S_j and P_{j-1} V_{j-1} issued together.
            for j in range(1, n_tiles):
                it = kv_base + j
                st = it % STAGES
                sp = (it - 1) % STAGES
                if PINGPONG:
                    r = rnd + j
                    mbarrier.wait(turn.index(CID), ((r & 1) ^ 1) if CID == 0 else (r & 1))
                mbarrier.wait(k_ready.index(st), (it // STAGES) & 1)
                kt = k_smem.index(st).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
                s = warpgroup_mma(q, kt, s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(sp), ((it - 1) // STAGES) & 1)
                v = v_smem.index(sp).reshape([BLOCK_N, HEAD_DIM])
                o = warpgroup_mma(p, v, o, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index((CID + 1) % NUM_CONSUMERS))
                s = warpgroup_mma_wait(1, deps=(s, ))
                mbarrier.arrive(k_empty.index(st))
                p_prev = p
                if j < n_full:
                    p = _weights(s, j, row0, qk_mul, z_bias, pos_shift, False, SIGMOID, BLOCK_M, BLOCK_N, s_layout,
                                 p_layout, dtype)
                else:
                    p = _weights(s, j, row0, qk_mul, z_bias, pos_shift, IS_CAUSAL, SIGMOID, BLOCK_M, BLOCK_N,
                                 s_layout, p_layout, dtype)
                o, p_prev = warpgroup_mma_wait(0, deps=(o, p_prev))
                mbarrier.arrive(v_empty.index(sp))
            # Every S of this item is done: the producer may load the next item's Q under the last P V.
            mbarrier.arrive(q_empty)
            # Round n_tiles: the last P V.
            last = kv_base + n_tiles - 1
            sl = last % STAGES
            if PINGPONG:
                r = rnd + n_tiles
                mbarrier.wait(turn.index(CID), ((r & 1) ^ 1) if CID == 0 else (r & 1))
            mbarrier.wait(v_ready.index(sl), (last // STAGES) & 1)
            v = v_smem.index(sl).reshape([BLOCK_N, HEAD_DIM])
            o = warpgroup_mma(p, v, o, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index((CID + 1) % NUM_CONSUMERS))
            o, p = warpgroup_mma_wait(0, deps=(o, p))
            mbarrier.arrive(v_empty.index(sl))
            rnd += n_tiles + 1
        else:
            mbarrier.arrive(q_empty)
        kv_base += n_tiles
        item += 1
        # Epilogue: this item's O goes out by TMA store from a buffer of its own (the view clips rows past the
        # sequence's end) while the next item runs; the previous store must have read the buffer first.
        tma.store_wait(0)
        o_buf.reshape([BLOCK_M, HEAD_DIM]).store(o.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_seq, q_row + row0, q_col], o_buf)
        if DYNAMIC:
            t = _read_item(item_buf, item_ready, item_empty, item)
        else:
            t = _item_index(item)
    tma.store_wait(0)


@gluon.jit
def _sigmoid_attn_fwd_gluon_kernel(
    q_desc, k_desc, v_desc, o_desc, Bias, Counter, CuSeqQ, CuSeqK,
    nheads_q, group, seqlen_q, seqlen_k, n_items, stride_bb, qk_mul, zf,
    IS_CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr, SIGMOID: gl.constexpr, PINGPONG: gl.constexpr,
    NUM_CONSUMERS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, VARLEN: gl.constexpr,
):
    """Work item = NUM_CONSUMERS * BLOCK_M queries of one (batch, head); program p does items p, p + grid, ...
    (grid = number of items: one each; grid = number of SMs: persistent, the next item's Q and K/V loads and this
    item's O store overlap the neighbouring items' matmuls). Descriptors are rank-3 views (B, N, H*D) with blocks
    [1, rows, D]: rows past a sequence read as zeros (K = 0 gives a finite weight, V = 0 makes it contribute
    nothing, so non-causal tiles need no mask) and stores past it are clipped. VARLEN: q/k/v/o are packed
    (total, H, D) tensors seen through `_seq_desc` views, which clip at each sequence's end just as the dense views
    clip at N (so the kernel body is the dense one with other coordinates); seqlen_q/seqlen_k are the longest
    sequences (they size the grid), CuSeqQ/CuSeqK the int32 (B + 1,) row offsets, Bias (B, Hq) with batch stride
    stride_bb. Dense: CuSeqQ/CuSeqK/stride_bb unused, Bias (Hq,)."""
    n_mblocks = gl.cdiv(seqlen_q, NUM_CONSUMERS * BLOCK_M)
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    item_buf = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    item_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    item_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(item_ready.index(i), count=1)
        mbarrier.init(item_empty.index(i), count=NUM_CONSUMERS)
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=NUM_CONSUMERS)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    for i in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(turn.index(i), count=1)

    # (Argument tuples are written out per partition: a tuple bound to a name turns its constexprs into tensors.)
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (0, o_desc, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, turn, item_buf, item_ready, item_empty, Bias, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, stride_bb, qk_mul, zf, IS_CAUSAL, DYNAMIC,
                         SIGMOID, PINGPONG, NUM_CONSUMERS, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, VARLEN)),
            (_consumer, (1, o_desc, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, turn, item_buf, item_ready, item_empty, Bias, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, stride_bb, qk_mul, zf, IS_CAUSAL, DYNAMIC,
                         SIGMOID, PINGPONG, NUM_CONSUMERS, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, VARLEN)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, item_buf, item_ready, item_empty, Counter, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, IS_CAUSAL, DYNAMIC, NUM_CONSUMERS, HEAD_DIM,
                         BLOCK_M, BLOCK_N, STAGES, VARLEN)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_consumer, (0, o_desc, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, turn, item_buf, item_ready, item_empty, Bias, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, stride_bb, qk_mul, zf, IS_CAUSAL, DYNAMIC,
                         SIGMOID, PINGPONG, NUM_CONSUMERS, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, VARLEN)),
            (_consumer, (1, o_desc, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, turn, item_buf, item_ready, item_empty, Bias, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, stride_bb, qk_mul, zf, IS_CAUSAL, DYNAMIC,
                         SIGMOID, PINGPONG, NUM_CONSUMERS, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, VARLEN)),
            (_consumer, (2, o_desc, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, turn, item_buf, item_ready, item_empty, Bias, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, stride_bb, qk_mul, zf, IS_CAUSAL, DYNAMIC,
                         SIGMOID, PINGPONG, NUM_CONSUMERS, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, VARLEN)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty,
                         v_empty, item_buf, item_ready, item_empty, Counter, n_mblocks, n_items, nheads_q,
                         group, seqlen_q, seqlen_k, CuSeqQ, CuSeqK, IS_CAUSAL, DYNAMIC, NUM_CONSUMERS, HEAD_DIM,
                         BLOCK_M, BLOCK_N, STAGES, VARLEN)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@functools.cache
def _smem_layout(rows: int, cols: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The default NVMMA shared layout of a [1, rows, cols] tile (get_default_for costs ~7 µs of host time a call)."""
    return gl.NVMMASharedLayout.get_default_for([1, rows, cols], _GL_DTYPES[dtype])


def lean_desc(base, dtype: torch.dtype, shape: list[int], strides: list[int], rows: int,
              cols: int) -> TensorDescriptor:
    """TensorDescriptor with tiles [1, rows, cols] and the default layout, built without its __post_init__ (~3 µs):
    the callers' supports checks (heads packed, 16-byte aligned base and rows) or a fresh contiguous allocation
    cover its assertions, non-empty shapes are checked before, and block shapes come from the configs."""
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape = base, shape, strides, [1, rows, cols]
    desc.layout, desc.padding = _smem_layout(rows, cols, dtype), "zero"
    return desc


def _rank3_desc(t: torch.Tensor, rows: int, cols: int | None = None) -> TensorDescriptor:
    """(B, N, H*D) view of t (B, N, H, D), tiles [1, rows, cols] (cols None: D, one head)."""
    b, n, h, d = t.shape
    sb, sn, _, _ = t.stride()
    return lean_desc(t, t.dtype, [b, n, h * d], [sb, sn, 1], rows, d if cols is None else cols)


def empty_with_headroom(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device, rows: int,
                        zero: bool = False) -> torch.Tensor:
    """A new contiguous tensor (zeros if zero) of `shape` placed `rows` rows into its buffer (see `with_headroom`)."""
    buf = (torch.zeros if zero else torch.empty)((rows + shape[0], *shape[1:]), dtype=dtype, device=device)
    return buf[rows:]


def with_headroom(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t when its storage holds at least `rows` rows (of t's row stride) before its first row, else a contiguous
    copy of t placed `rows` rows into a new buffer. `_seq_desc` needs that headroom: its
    view's base lies max_seqlen rows before t, and every row of the window [end - max_seqlen, end) of a sequence
    whose tile crosses its end must be memory of this allocation (bench/NOTES.md, "v8 fix"). The rows before t are
    never part of any result; their contents do not matter."""
    if t.storage_offset() >= rows * t.stride(0):
        return t
    return empty_with_headroom(t.shape, t.dtype, t.device, rows).copy_(t)


def _seq_desc(t: torch.Tensor, rows: int, cols: int, max_seqlen: int) -> TensorDescriptor:
    """View of packed t (total, H, D) that clips at every sequence's end, tiles [1, rows, cols] of one head: shape
    (total + 1, max_seqlen, H*D), strides (row, row, 1), base max_seqlen rows before t, so element [e, r, c] is row
    e + r - max_seqlen of t. The kernels address row m of the sequence [start, end) as [end, max_seqlen - (end -
    start) + m, c], which is inside the view iff m < end - start: TMA loads read zeros past the sequence (not the
    next sequence's rows, which may hold anything, inf and NaN included) and stores / reduce-adds past it are
    dropped, exactly as the dense (B, N, H*D) view does past N. CUTLASS's varlen TMA uses the same construction
    (sm100 FMHA: batch stride = row stride, pointer moved back by max_length rows) on buffers with padding in front
    (its example 77 allocates it): t must have max_seqlen rows of headroom in its own storage (`with_headroom`),
    so that the base and every row at [e, 0 .. max_seqlen) lie inside the allocation. Without it the first H100 run
    faulted (illegal memory access) exactly where a tile crossed the end of a sequence ending less than max_seqlen
    rows into the tensor. Raises ValueError without the headroom."""
    total, h, d = t.shape
    row = t.stride(0)
    max_seqlen = max(max_seqlen, 1)
    if t.storage_offset() < max_seqlen * row:
        raise ValueError(f"_seq_desc: needs {max_seqlen} rows of headroom before the tensor (with_headroom); has "
                         f"{t.storage_offset() // row}")
    base = torch.as_strided(t, (1,), (1,), t.storage_offset() - max_seqlen * row)
    return lean_desc(base, t.dtype, [total + 1, max_seqlen, h * d], [row, row, 1], rows, cols)


@functools.cache
def _dummy_counter(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gluon_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if gluon_dense_fwd can serve these tensors, else why not."""
    if q.device.type != "cuda" or cuda_capability(q.device) != (9, 0):
        return "needs an sm_90 GPU"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "needs bf16 or fp16 q/k/v"
    if q.shape[-1] not in GLUON_CONFIGS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head dim must be one of {sorted(GLUON_CONFIGS)}"
    if q.shape[2] % k.shape[2] or k.shape != v.shape:
        return "q heads must be a multiple of k/v heads, k and v of one shape"
    for t in (q, k, v):
        b, n, h, d = t.shape
        if t.stride(3) != 1 or t.stride(2) != d or (t.stride(1) * t.element_size()) % 16 or (
                t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "needs heads packed (stride(2) == D, stride(3) == 1) and 16-byte aligned rows"
    return None


def gluon_dense_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | float, scale: float,
                    causal: bool, sigmoid_impl: str, pingpong: bool = True, schedule: str | None = None,
                    config: tuple[int, int, int, int, int] | None = None,
                    out: torch.Tensor | None = None, checked: bool = False) -> torch.Tensor:
    """Forward of sigmoid attention on Hopper. q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), D in {64, 128}, bf16/fp16,
    Hq a multiple of Hkv (GQA); bias a float or fp32 (Hq,) tensor; causal bottom-right aligned. Returns o
    (B, Nq, Hq, D) in q's dtype (written into `out` if given: contiguous, q's shape and dtype). Tuning knobs:
    pingpong (warpgroups take turns issuing wgmma), schedule ("grid": one program per work item; "static": one per
    SM, items in alternating round-robin; "dynamic": one per SM, items taken in order from an atomic counter;
    None: `default_schedule(seqlen_k)`),
    config (block_m, consumers, block_n, stages, consumer regs; None takes GLUON_CONFIGS).
    Raises ValueError where `gluon_supports` says no (checked=True: the caller has just asked it)."""
    plan_key = None
    if out is None and type(bias) is torch.Tensor and fast_launch_enabled():
        # What the code below reads of its inputs, values only; the replay checks the 16-byte alignment of q/k/v/o
        # (the rest of gluon_supports is fixed by the key), so a misaligned call falls through to the checks.
        plan_key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
                    q.device, bias.shape, bias.stride(), bias.dtype, bias.device, scale, causal, sigmoid_impl,
                    pingpong, schedule, config)
        plan = _plans.get(plan_key)
        if plan is not None:
            o = torch.empty_like(q, memory_format=torch.contiguous_format)
            (sq, tq), (sk, tk), (sv, tv), (so, to) = plan[1]
            if plan[0](lean_desc(q, q.dtype, sq, tq, *plan[2]), lean_desc(k, q.dtype, sk, tk, *plan[3]),
                       lean_desc(v, q.dtype, sv, tv, *plan[3]), lean_desc(o, q.dtype, so, to, *plan[2]), bias):
                return o
    why = None if checked else gluon_supports(q, k, v)
    if why is not None:
        raise ValueError(f"gluon_dense_fwd: {why}")
    batch, seqlen_q, nheads_q, head_dim = q.shape
    seqlen_k = k.shape[1]
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if o.shape != q.shape or o.dtype != q.dtype or not o.is_contiguous():
        raise ValueError("gluon_dense_fwd: out must be contiguous with q's shape and dtype")
    if o.numel() == 0:
        return o
    if seqlen_k == 0:
        return o.zero_()
    bias_in = bias
    if not isinstance(bias, torch.Tensor):
        bias = torch.full((nheads_q,), float(bias), device=q.device)
    if bias.dtype is not torch.float32 or bias.shape != (nheads_q,) or bias.stride(0) != 1 or bias.device != q.device:
        bias = bias.to(device=q.device, dtype=torch.float32).expand(nheads_q).contiguous()
    block_m, block_n = (config or GLUON_CONFIGS[head_dim])[0], (config or GLUON_CONFIGS[head_dim])[2]
    descs = (_rank3_desc(q, block_m), _rank3_desc(k, block_n), _rank3_desc(v, block_n), _rank3_desc(o, block_m))
    recorded = _launch(descs, bias, 0, bias, bias, batch, nheads_q, k.shape[2], head_dim, seqlen_q, seqlen_k, scale,
                       causal, sigmoid_impl, pingpong, schedule, config, False)
    if plan_key is not None and bias is bias_in and recorded is not None:
        replay = Replay.record(_sigmoid_attn_fwd_gluon_kernel, *recorded, (*descs, bias))
        if replay is not None:
            if len(_plans) >= _PLANS_MAX:
                _plans.clear()
            _plans[plan_key] = (replay, tuple((d.shape, d.strides) for d in descs), (block_m, head_dim),
                                (block_n, head_dim))
    return o


# Dense launches by plan key (see gluon_dense_fwd): a hit builds four descriptors and replays the recorded launch
# (CPU, fake driver, B=1 N=128 H=6 d=128: supports check + bias check + descriptors + fast launch ~20 µs -> ~5 µs).
# The dynamic schedule's fresh counter is a fresh tensor per call that is not a per-call slot: never recorded.
_plans: dict[tuple, tuple] = {}
_PLANS_MAX = 256


def gluon_varlen_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if gluon_varlen_fwd can serve these packed (total, H, D) tensors, else why not (gluon_supports' rules)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "needs packed (total, H, D) q/k/v"
    return gluon_supports(q[None], k[None], v[None])


def gluon_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, bias: torch.Tensor | float,
                     scale: float, causal: bool, sigmoid_impl: str, pingpong: bool = True, schedule: str | None = None,
                     config: tuple[int, int, int, int, int] | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Forward of sigmoid attention on Hopper over packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D),
    sequence b = rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q (int32 (B + 1,) on q's device; likewise k/v), each
    at most max_seqlen_q / max_seqlen_k long (they size the grid: blocks past a shorter sequence idle; an
    understated max gives wrong rows, never an out-of-bounds access); lengths 0 allowed. bias a float, fp32 (Hq,) or
    (B, Hq) (per sequence); causal bottom-right aligned within each sequence. Other arguments, the result and the
    rules as `gluon_dense_fwd` (rows past cu_seqlens_q[-1], which the varlen API does not allow, are not written)."""
    why = gluon_varlen_supports(q, k, v)
    if why is not None:
        raise ValueError(f"gluon_varlen_fwd: {why}")
    total_q, nheads_q, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous()):
        raise ValueError("gluon_varlen_fwd: out must be contiguous with q's shape and dtype")
    if q.numel() == 0 or batch <= 0 or max_seqlen_q <= 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if k.shape[0] == 0 or max_seqlen_k <= 0:
        return (torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out).zero_()
    # Every view needs max_seqlen rows of headroom (`_seq_desc`): inputs without it are copied, a given `out`
    # without it is written through a copy (rows no sequence covers keep out's values).
    q, k, v = with_headroom(q, max_seqlen_q), with_headroom(k, max_seqlen_k), with_headroom(v, max_seqlen_k)
    o = (empty_with_headroom(q.shape, q.dtype, q.device, max_seqlen_q) if out is None
         else with_headroom(out, max_seqlen_q))
    if not isinstance(bias, torch.Tensor):
        bias = torch.full((nheads_q,), float(bias), device=q.device)
    bias = bias.to(device=q.device, dtype=torch.float32)
    bias = (bias.expand(nheads_q) if bias.dim() <= 1 else bias.expand(batch, nheads_q))
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    stride_bb = bias.stride(0) if bias.dim() == 2 else 0
    block_m, block_n = (config or GLUON_CONFIGS[head_dim])[0], (config or GLUON_CONFIGS[head_dim])[2]
    descs = (_seq_desc(q, block_m, head_dim, max_seqlen_q), _seq_desc(k, block_n, head_dim, max_seqlen_k),
             _seq_desc(v, block_n, head_dim, max_seqlen_k), _seq_desc(o, block_m, head_dim, max_seqlen_q))
    _launch(descs, bias, stride_bb, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), batch, nheads_q,
            k.shape[1], head_dim, max_seqlen_q, max_seqlen_k, scale, causal, sigmoid_impl, pingpong, schedule, config,
            True)
    if out is not None and o is not out:
        out.copy_(o)
        return out
    return o


# Keys per item at or below which the persistent "static" schedule is the default: with few key tiles per item the
# next item's Q load and the O store overlap the current item's work instead of each program starting cold.
# Measured (H100, bf16, session 4, B*N = 16k): d=128 N=1k 600 -> 612 (causal 417 -> 482), N=2k 642 -> 676 (causal
# 525 -> 587); at 16k causal the persistent schedules ran 8-24% slower (session 2), so long rows keep "grid".
STATIC_SCHEDULE_MAX_KEYS = 2048


def default_schedule(seqlen_k: int) -> str:
    """The schedule a launch takes when none is given: "static" for rows of <= STATIC_SCHEDULE_MAX_KEYS keys."""
    return "static" if seqlen_k <= STATIC_SCHEDULE_MAX_KEYS else "grid"


def _launch(descs: tuple[TensorDescriptor, ...], bias: torch.Tensor, stride_bb: int, cu_q: torch.Tensor,
            cu_k: torch.Tensor, batch: int, nheads_q: int, nheads_kv: int, head_dim: int, seqlen_q: int,
            seqlen_k: int, scale: float, causal: bool, sigmoid_impl: str, pingpong: bool, schedule: str | None,
            config: tuple[int, int, int, int, int] | None, varlen: bool) -> tuple | None:
    """The kernel launch of gluon_dense_fwd / gluon_varlen_fwd (varlen: seqlen_q/k are the longest sequences).
    Returns (CompiledKernel, grid, args, kwargs) for Replay.record when the launch was kept for fast launches and
    uses no per-call tensor of its own (not the dynamic schedule), else None."""
    device = bias.device
    if sigmoid_impl == "fast":
        mode, zf = 1, 0.5
    elif sigmoid_impl == "accurate":
        mode, zf = 0, -LOG2E
    else:
        raise ValueError(f"sigmoid_impl must be 'fast' or 'accurate'; got {sigmoid_impl!r}")
    block_m, consumers, block_n, stages, regs = config or GLUON_CONFIGS[head_dim]
    n_items = cdiv(seqlen_q, consumers * block_m) * batch * nheads_q
    schedule = default_schedule(seqlen_k) if schedule is None else schedule
    if schedule not in ("grid", "static", "dynamic"):
        raise ValueError(f"schedule must be 'grid', 'static' or 'dynamic'; got {schedule!r}")
    grid = (n_items if schedule == "grid" else min(n_items, _num_sms(device)),)
    # The dynamic schedule's item counter starts at 0 each call; other schedules never touch theirs.
    dynamic = schedule == "dynamic"
    counter = torch.zeros(1, dtype=torch.int32, device=device) if dynamic else _dummy_counter(device)
    # Total warps: 4 per consumer + one producer warp, padded to a warpgroup; maxnreg caps the register file
    # (65536 / threads) and setmaxnreg moves the producer's share to the consumers.
    nwarps = 4 * consumers + 4
    args = (*descs, bias, counter, cu_q, cu_k, nheads_q, nheads_q // nheads_kv, seqlen_q, seqlen_k, n_items, stride_bb,
            float(scale) * zf, zf)
    kwargs = dict(
        IS_CAUSAL=causal, DYNAMIC=dynamic, SIGMOID=mode, PINGPONG=pingpong, NUM_CONSUMERS=consumers,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=regs, VARLEN=varlen,
        num_warps=4, maxnreg=(65536 // (32 * nwarps)) // 8 * 8,
    )
    compiled = launch(_sigmoid_attn_fwd_gluon_kernel, grid, *args, **kwargs)
    return None if dynamic or compiled is None else (compiled, grid, args, kwargs)
