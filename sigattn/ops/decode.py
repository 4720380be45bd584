"""Triton KV-cache decode kernel (append, GQA rows sharing one read of K/V, split-KV summed in fp32: one launch) and
its launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigattn.ops.configs import (
    DECODE_MAX_BLOCK_M,
    DecodeConfig,
    cdiv,
    decode_config,
    device_index,
    fp32_contiguous,
    next_pow2,
    sm_count,
)
from sigattn.ops.fast_launch import launch
from sigattn.ops.forward import dot_precision, sigmoid_mode, window_bounds
from sigattn.ops.primitives import alibi_distance, sigmoid_from_z, visible, z_factor


@triton.jit
def _append_kv_kernel(
    KNew,
    VNew,
    KCache,
    VCache,
    CacheSeqlens,
    BlockTable,
    stride_nb,
    stride_nn,
    stride_nh,
    stride_vnb,
    stride_vnn,
    stride_vnh,
    stride_cb,
    stride_cn,
    stride_ch,
    stride_vcb,
    stride_vcn,
    stride_vch,
    stride_tb,
    seqlen_new,
    nheads_kv,
    page_size,
    capacity,
    num_blocks,
    PAGED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = new token t of sequence b, all kv heads: written at logical position cache_seqlens[b] + t.
    cache_seqlens[b] is clamped to [0, capacity - seqlen_new] and a block id outside [0, num_blocks) drops the
    write: device-side values are not validated on the host (that would sync), so bad ones must stay in bounds."""
    pid = tl.program_id(0)
    off_b = (pid // seqlen_new).to(tl.int64)
    off_t = pid % seqlen_new
    pos = tl.minimum(tl.maximum(tl.load(CacheSeqlens + off_b), 0), capacity - seqlen_new) + off_t
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < nheads_kv) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
    if PAGED:
        blk = tl.load(BlockTable + off_b * stride_tb + pos // page_size).to(tl.int64)
        ok = ok & (blk >= 0) & (blk < num_blocks)
        row_k = blk * stride_cb + (pos % page_size).to(tl.int64) * stride_cn
        row_v = blk * stride_vcb + (pos % page_size).to(tl.int64) * stride_vcn
    else:
        row_k = off_b * stride_cb + pos.to(tl.int64) * stride_cn
        row_v = off_b * stride_vcb + pos.to(tl.int64) * stride_vcn
    src_k = KNew + off_b * stride_nb + off_t.to(tl.int64) * stride_nn + offs_h[:, None] * stride_nh + offs_d[None, :]
    src_v = VNew + off_b * stride_vnb + off_t.to(tl.int64) * stride_vnn + offs_h[:, None] * stride_vnh + offs_d[None, :]
    k = tl.load(src_k, mask=ok)
    v = tl.load(src_v, mask=ok)
    tl.store(KCache + row_k + offs_h[:, None] * stride_ch + offs_d[None, :], k, mask=ok)
    tl.store(VCache + row_v + offs_h[:, None] * stride_vch + offs_d[None, :], v, mask=ok)


@triton.jit
def _probs(q, kt, offs_s, offs_n, z_bias, alibi_z, qk_scale, seqlen_q, key_end, pos_shift, win_left, win_right,
           HAS_ALIBI: tl.constexpr, SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] sigmoid probabilities of one key tile, exactly 0 where masked (window/causal, keys at or
    past key_end, padding rows), not sigmoid(-inf) rounded."""
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    z = qk * qk_scale + z_bias[:, None]
    if HAS_ALIBI:
        z += alibi_z[:, None] * alibi_distance(offs_s, offs_n, pos_shift)
    p = sigmoid_from_z(z, SIGMOID)
    return tl.where(visible(offs_s, offs_n, seqlen_q, key_end, pos_shift, win_left, win_right), p, 0.0)


@triton.jit
def _paged_rows(BlockTable, row_tb, offs_n, n_ok, page_size, num_blocks, stride_kb, stride_kn, stride_vb, stride_vn):
    """(k row offsets, v row offsets, mask) of logical positions offs_n: one block id per key (L1 hits), so tiles may
    cross pages and any page size works; a block id outside [0, num_blocks) masks its keys (read as zeros)."""
    blk = tl.load(BlockTable + row_tb + offs_n // page_size, mask=n_ok, other=0).to(tl.int64)
    n_ok = n_ok & (blk >= 0) & (blk < num_blocks)
    slot = (offs_n % page_size).to(tl.int64)
    return blk * stride_kb + slot * stride_kn, blk * stride_vb + slot * stride_vn, n_ok  # [BLOCK_N] each


# The window bounds follow each step's key length (-1 becomes seqlen_q + length + 1): not specialised, so decode
# steps do not compile new variants as the length crosses multiples of 16.
@triton.jit(do_not_specialize=["win_left", "win_right"])
def _sigmoid_attn_decode_kernel(
    Q,
    K,
    V,
    KNew,
    VNew,
    Out,
    Ws,
    Counters,
    Bias,
    Slopes,
    CacheSeqlens,
    BlockTable,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_nb,
    stride_nn,
    stride_nh,
    stride_vnb,
    stride_vnn,
    stride_vnh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_ws,
    stride_wb,
    stride_wn,
    stride_tb,
    stride_sb,
    nheads_kv,
    group,
    seqlen_q,
    seqlen_new,
    page_size,
    capacity,
    num_blocks,
    num_splits,
    num_m_blocks,
    win_left,
    win_right,
    scale,
    zf,
    PAGED: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SIGMOID: tl.constexpr,
    SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEW_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one (sequence, kv head), BLOCK_M of its group·seqlen_q query rows, one split of its keys; the
    whole call (append, attention, split sum) is this one launch.

    Row r of the M tile is query s = r // group of query head kv_head·group + r % group, so the group's heads share
    every K/V tile read (GQA decode is then one read of the cache, not `group`). The keys the block can see, [lo, hi),
    are cut into num_splits runs of whole tiles. Keys below L = cache_seqlens[b] come from the cache; the new keys
    [L, L + seqlen_new) come from KNew/VNew directly, in every split that covers them, so no program reads a cache
    row that another program writes in this launch (no inter-program ordering). The (sequence, kv head)'s programs
    share the append of its new rows (tiles of BLOCK_N rows, round robin). With SPLIT, each program writes its fp32
    partial to Ws (num_splits, batch, seqlen_q, nheads_q, d) and takes a ticket from Counters[(sequence, kv head,
    m block)]; the last of the num_splits programs to finish sums the partials in split order (deterministic:
    sigmoid has no normaliser, partial outputs over disjoint keys just add), writes Out and resets the counter to 0
    for the next launch. 1-D grid: m block fastest, then split, then (sequence, kv head).
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    rest = pid // num_m_blocks
    split = rest % num_splits
    pid_bh = rest // num_splits
    off_b = (pid_bh // nheads_kv).to(tl.int64)
    off_hk = (pid_bh % nheads_kv).to(tl.int64)

    # Clamped to [0, capacity - seqlen_new]: device values are not validated on the host (that would sync), so
    # out-of-range ones must still read and write only inside the cache.
    cached = tl.minimum(tl.maximum(tl.load(CacheSeqlens + off_b), 0), capacity - seqlen_new)
    seqlen_k = cached + seqlen_new
    pos_shift = seqlen_k - seqlen_q  # bottom-right: query s sits at key position s + pos_shift

    K_head = K + off_hk * stride_kh
    V_head = V + off_hk * stride_vh
    KNew_head = KNew + off_b * stride_nb + off_hk * stride_nh
    VNew_head = VNew + off_b * stride_vnb + off_hk * stride_vnh
    row_tb = off_b * stride_tb
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = offs_r // group  # query index of each row; >= seqlen_q on padding rows
    offs_h = off_hk * group + offs_r % group  # query head of each row
    row_ok = offs_s < seqlen_q
    q_ptrs = Q + off_b * stride_qb + offs_s[:, None].to(tl.int64) * stride_qn + offs_h[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    qk_scale = scale * zf
    z_bias = tl.load(Bias + offs_h, mask=row_ok, other=0.0) * zf  # [BLOCK_M]
    alibi_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi_z = -tl.load(Slopes + off_b * stride_sb + offs_h, mask=row_ok, other=0.0) * zf

    # Keys visible to any row of this block: [first query - left, last query + right], inside [0, seqlen_k).
    s_first = (pid_m * BLOCK_M) // group
    s_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, group * seqlen_q) // group - 1
    lo = tl.maximum(s_first + pos_shift - win_left, 0)
    hi = tl.minimum(s_last + pos_shift + win_right + 1, seqlen_k)
    lo = (lo // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    start = lo + split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, hi)
    cache_end = tl.minimum(end, cached)

    offs_t0 = tl.arange(0, NEW_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Cached keys [start, cache_end): the hot loop (whole tiles, cp.async-pipelined on sm_90).
    for start_n in tl.range(start, cache_end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < cache_end
        if PAGED:
            k_rows, v_rows, n_ok = _paged_rows(BlockTable, row_tb, offs_n, n_ok, page_size, num_blocks, stride_kb,
                                               stride_kn, stride_vb, stride_vn)
        else:
            k_rows = off_b * stride_kb + offs_n.to(tl.int64) * stride_kn
            v_rows = off_b * stride_vb + offs_n.to(tl.int64) * stride_vn
        kt = tl.load(K_head + k_rows[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        p = _probs(q, kt, offs_s, offs_n, z_bias, alibi_z, qk_scale, seqlen_q, cache_end, pos_shift, win_left,
                   win_right, HAS_ALIBI, SIGMOID, DOT_PRECISION)
        v = tl.load(V_head + v_rows[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
    # New keys [max(start, cached), end), from the inputs: one tile when decoding (seqlen_new = 1). A new key whose
    # block id is outside the pool reads as zeros, as if read back from the cache its dropped append missed. Not
    # pipelined (num_stages=1: shared-memory buffers of its own), NEW_N-key tiles.
    for start_n in tl.range(tl.maximum(start, cached), end, NEW_N, num_stages=1):
        offs_n = start_n + offs_t0
        n_ok = offs_n < end
        if PAGED:
            n_ok = _paged_rows(BlockTable, row_tb, offs_n, n_ok, page_size, num_blocks, stride_kb, stride_kn,
                               stride_vb, stride_vn)[2]
        src = (offs_n - cached).to(tl.int64)
        kt = tl.load(KNew_head + src[None, :] * stride_nn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        p = _probs(q, kt, offs_s, offs_n, z_bias, alibi_z, qk_scale, seqlen_q, end, pos_shift, win_left,
                   win_right, HAS_ALIBI, SIGMOID, DOT_PRECISION)
        v = tl.load(VNew_head + src[:, None] * stride_vnn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)

    out_ok = row_ok[:, None] & d_ok[None, :]
    o_ptrs = Out + off_b * stride_ob + offs_s[:, None].to(tl.int64) * stride_on + offs_h[:, None] * stride_oh
    if SPLIT:
        w_ptrs = Ws + off_b * stride_wb + offs_s[:, None].to(tl.int64) * stride_wn + offs_h[:, None] * HEAD_DIM
        w_ptrs += offs_d[None, :]
        tl.store(w_ptrs + split.to(tl.int64) * stride_ws, acc, mask=out_ok)
        # Every thread's partial stores precede the release of the ticket (CTA barrier, then a gpu-scope acq_rel
        # atomic: the CUTLASS semaphore pattern); the last program's reads then see all partials.
        tl.debug_barrier()
        counter = Counters + pid_bh * num_m_blocks + pid_m
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            # Split order whichever program is last, so calls are bitwise reproducible. 4 loads in flight per round
            # trip to L2 (.cg: never a stale L1 line): 33 splits cost 9 round trips (~0.3 µs each), not 33.
            for i in tl.range(0, num_splits, 4, num_stages=1):
                part0 = tl.load(w_ptrs + i * stride_ws, mask=out_ok, other=0.0, cache_modifier=".cg")
                part1 = tl.load(w_ptrs + (i + 1) * stride_ws, mask=out_ok & (i + 1 < num_splits), other=0.0,
                                cache_modifier=".cg")
                part2 = tl.load(w_ptrs + (i + 2) * stride_ws, mask=out_ok & (i + 2 < num_splits), other=0.0,
                                cache_modifier=".cg")
                part3 = tl.load(w_ptrs + (i + 3) * stride_ws, mask=out_ok & (i + 3 < num_splits), other=0.0,
                                cache_modifier=".cg")
                total = (((total + part0) + part1) + part2) + part3
            tl.store(o_ptrs + offs_d[None, :], total.to(Out.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(counter, 0)  # ready for the next launch on this stream
    else:
        tl.store(o_ptrs + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=out_ok)

    # Append: new row t of this kv head goes to position cached + t; a block id outside the pool drops the write.
    # Last, when nothing else is live: placed first, it raised the kernel from 114 to 142 registers (sm_90 ptxas).
    writer = split * num_m_blocks + pid_m
    for t0 in tl.range(writer * NEW_N, seqlen_new, num_splits * num_m_blocks * NEW_N, num_stages=1):
        offs_t = t0 + offs_t0
        t_ok = offs_t < seqlen_new
        pos = cached + offs_t
        if PAGED:
            k_rows, v_rows, t_ok = _paged_rows(BlockTable, row_tb, pos, t_ok, page_size, num_blocks, stride_kb,
                                               stride_kn, stride_vb, stride_vn)
        else:
            k_rows = off_b * stride_kb + pos.to(tl.int64) * stride_kn
            v_rows = off_b * stride_vb + pos.to(tl.int64) * stride_vn
        ok = t_ok[:, None] & d_ok[None, :]  # [NEW_N, BLOCK_D]
        src = offs_t[:, None].to(tl.int64)
        kn = tl.load(KNew_head + src * stride_nn + offs_d[None, :], mask=ok)
        vn = tl.load(VNew_head + src * stride_vnn + offs_d[None, :], mask=ok)
        tl.store(K_head + k_rows[:, None] + offs_d[None, :], kn, mask=ok)
        tl.store(V_head + v_rows[:, None] + offs_d[None, :], vn, mask=ok)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return sm_count(device)
    return 4  # interpreter: small enough that the CPU tests' shapes take the split-KV path


def choose_num_splits(programs: int, keys: int, cfg: DecodeConfig, device: torch.device) -> int:
    """Splits of each program's keys so that about `cfg.programs_per_sm` programs run per SM, each with at least
    `cfg.min_tiles_per_split` key tiles (a split's fixed cost, the fp32 partial write, must stay small next to its
    reads). programs: (sequence, kv head, m block) triples; keys: the longest visible key range."""
    if programs == 0 or keys == 0:
        return 1
    target = cfg.programs_per_sm * _sm_count(device)
    by_grid = max(1, round(target / programs))
    by_work = max(1, cdiv(keys, cfg.block_n * cfg.min_tiles_per_split))
    return int(min(by_grid, by_work, cfg.max_splits))


def launch_plan(
    batch: int, seqlen_q: int, nheads_q: int, nheads_kv: int, visible_keys: int, cfg: DecodeConfig,
    device: torch.device, num_splits: int | None = None,
) -> tuple[int, int, int]:
    """(block_m, m_blocks, num_splits) of a decode launch: the group's rows padded to a power of 2 >= 16 (tl.dot),
    at most cfg.max_block_m per program; splits from choose_num_splits unless forced."""
    rows = nheads_q // nheads_kv * seqlen_q
    block_m = min(cfg.max_block_m, max(16, next_pow2(rows)))
    m_blocks = cdiv(rows, block_m)
    if num_splits is None:
        num_splits = choose_num_splits(batch * nheads_kv * m_blocks, visible_keys, cfg, device)
    return block_m, m_blocks, num_splits


def default_config(batch: int, seqlen_q: int, nheads_q: int, nheads_kv: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> DecodeConfig:
    """The launch's config: the split bucket's when its (sequence, kv head, m block) programs are fewer than the SMs
    (configs._SM90_DECODE_SPLIT), else the per-head-dim default."""
    rows = nheads_q // nheads_kv * seqlen_q
    units = batch * nheads_kv * cdiv(rows, min(DECODE_MAX_BLOCK_M, max(16, next_pow2(rows))))
    return decode_config(head_dim, dtype, device, split_bucket=units < _sm_count(device))


def append_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
) -> None:
    """Write k, v (batch, seqlen_new, nheads_kv, d) into the cache at positions cache_seqlens[b] + t, in place
    (contiguous cache (batch, seqlen_cache, nheads_kv, d), or paged (num_blocks, page, nheads_kv, d) + block_table)."""
    batch, seqlen_new, nheads_kv, head_dim = k.shape
    if batch * seqlen_new == 0:
        return
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    paged = block_table is not None
    table = block_table if paged else cache_seqlens
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    _append_kv_kernel[(batch * seqlen_new,)](
        k, v, k_cache, v_cache, cache_seqlens, table,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0) if paged else 0,
        seqlen_new, nheads_kv, k_cache.shape[1] if paged else 1, capacity, k_cache.shape[0],
        PAGED=paged,
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(nheads_kv),
        BLOCK_D=next_pow2(head_dim),
    )


# The fused split sum's scratch, per (device, stream): the fp32 partials (num_splits, batch, seqlen_q, nheads_q, d)
# and one int32 ticket counter per (sequence, kv head, m block), zero between launches (the last program of each
# counter resets it). Launches on one stream run in order, so they share them with no per-call allocation or zero
# fill (a fill would be a second launch); launches on two streams at once get one each. Partials over
# _SCRATCH_KEEP elements (64 MiB) are allocated per call instead of kept. Under CUDA graph capture every call
# allocates its own (from the graph's private pool, counters zeroed by a captured memset): a kept buffer would be
# freed when a later call grows it, leaving the graph's pointer dangling, and two graphs replayed on two streams
# would share one set of tickets.
_scratch: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_SCRATCH_KEEP = 1 << 24


def _split_scratch(device: torch.device, ws_numel: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace of at least ws_numel elements, zeroed int32 counters of at least n_counters)."""
    if device.type == "cuda":
        idx = device_index(device)
        if torch.cuda.is_current_stream_capturing():
            return (torch.empty(ws_numel, dtype=torch.float32, device=device),
                    torch.zeros(n_counters, dtype=torch.int32, device=device))
        key = (idx, torch._C._cuda_getCurrentRawStream(idx))
    else:
        key = (-1, 0)
    ws, counters = _scratch.get(key) or (None, None)
    if counters is None or counters.numel() < n_counters:
        counters = torch.zeros(next_pow2(max(n_counters, 64)), dtype=torch.int32, device=device)
    if ws_numel > _SCRATCH_KEEP:
        big = torch.empty(ws_numel, dtype=torch.float32, device=device)
        # Not big[:0]: a view would keep the large storage alive in the cache.
        _scratch[key] = (ws if ws is not None else torch.empty(0, dtype=torch.float32, device=device), counters)
        return big, counters
    if ws is None or ws.numel() < ws_numel:
        ws = torch.empty(next_pow2(max(ws_numel, 1 << 16)), dtype=torch.float32, device=device)
    _scratch[key] = (ws, counters)
    return ws, counters


def sigmoid_attn_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    sigmoid_impl: str,
    max_seqlen_k: int | None = None,
    config: DecodeConfig | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Append k/v into the cache in place, then sigmoid attention of q over each sequence's cached keys.

    q (B, Sq, Hq, D); k_cache/v_cache (B, Ncap, Hkv, D) with unit stride along D, or paged (num_blocks, page,
    Hkv, D) with block_table int32 (B, max_blocks); k/v (B, Snew, Hkv, D) or None; cache_seqlens int32 (B,);
    bias fp32 (Hq,); alibi_slopes fp32 (B, Hq) or None. Sequence b attends over its first cache_seqlens[b] + Snew
    keys, causal/window bottom-right aligned to that length. max_seqlen_k: a host-side bound on that length for
    the split heuristic (None: the cache capacity); num_splits: force the split-KV count (tests).
    One launch: the kernel writes k/v into the cache and attends over the cached keys plus the new ones, reading
    the new ones from k/v, not back from the cache (so a program never waits on another's write); the new rows must
    not be visible keys of another sequence (a block table aliasing them across sequences races, as in
    flash_attn_with_kvcache). With split-KV, the last split of each (sequence, kv head) sums the fp32 partials in
    split order: calls are bitwise reproducible. Splits share per-stream scratch (_split_scratch).
    Arguments are assumed validated (sigattn.ops.api); cache_seqlens and block_table values are not read on the
    host: the kernel clamps cache_seqlens[b] to [0, capacity - Snew] and treat block ids outside [0, num_blocks)
    as zero keys/values whose appends are dropped, so bad values give wrong numbers but never touch memory outside
    the cache. Returns (B, Sq, Hq, D) in q's dtype.
    """
    batch, seqlen_q, nheads_q, head_dim = q.shape
    nheads_kv = k_cache.shape[2]
    paged = block_table is not None
    cache_seqlens = cache_seqlens.contiguous()
    out = torch.empty(q.shape[:-1] + v_cache.shape[-1:], dtype=q.dtype, device=q.device)
    append = k is not None and v is not None and k.shape[0] * k.shape[1] > 0
    if out.numel() == 0:  # no query rows: nothing to attend, but the new tokens still go into the cache
        if append:
            append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table)
        return out
    seqlen_new = k.shape[1] if append else 0
    if append:
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    else:
        k, v = k_cache, v_cache  # never read: seqlen_new = 0
    q = q if q.stride(-1) == 1 else q.contiguous()
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    max_len = capacity if max_seqlen_k is None else min(max_seqlen_k, capacity)
    left, right = window_bounds(seqlen_q, max_len, causal, window_left, window_right)
    group = nheads_q // nheads_kv
    visible_keys = min(max_len, left + right + seqlen_q)
    if config is None:
        config = default_config(batch, seqlen_q, nheads_q, nheads_kv, head_dim, q.dtype, q.device)
    block_m, m_blocks, num_splits = launch_plan(batch, seqlen_q, nheads_q, nheads_kv, visible_keys, config,
                                                q.device, num_splits)
    programs = batch * nheads_kv * m_blocks
    ws, counters = out, cache_seqlens  # placeholders when the programs write out directly
    ws_stride = 0
    if num_splits > 1:
        ws_stride = out.numel()
        ws, counters = _split_scratch(q.device, num_splits * ws_stride, programs)
    bias = fp32_contiguous(bias)
    slopes = bias if alibi_slopes is None else fp32_contiguous(alibi_slopes)
    table = block_table if paged else cache_seqlens
    mode = sigmoid_mode(sigmoid_impl, q.device)
    # fast_launch: at batch 1 the step's GPU work (~8 us at 4k keys) is far below Triton's per-call launch path.
    launch(
        _sigmoid_attn_decode_kernel, (programs * num_splits,),
        q, k_cache, v_cache, k, v, out, ws, counters, bias, slopes, cache_seqlens, table,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ws_stride, seqlen_q * nheads_q * head_dim, nheads_q * head_dim,
        table.stride(0) if paged else 0,
        slopes.stride(0) if slopes.dim() == 2 else 0,
        nheads_kv, group, seqlen_q, seqlen_new, k_cache.shape[1] if paged else 1, capacity, k_cache.shape[0],
        num_splits, m_blocks,
        left, right, float(scale), z_factor(mode),
        PAGED=paged,
        HAS_ALIBI=alibi_slopes is not None,
        SIGMOID=mode,
        SPLIT=num_splits > 1,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        NEW_N=16,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages_paged if paged else config.num_stages,
    )
    return out
