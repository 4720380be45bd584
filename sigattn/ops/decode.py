"""Triton KV-cache decode kernel (GQA rows share one read of K/V, split-KV summed in fp32) and its launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigattn.ops.configs import DecodeConfig, cdiv, decode_config, fp32_contiguous, interpreting, next_pow2, sm_count
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


# The window bounds follow each step's key length (-1 becomes seqlen_q + length + 1): not specialised, so decode
# steps do not compile new variants as the length crosses multiples of 16.
@triton.jit(do_not_specialize=["win_left", "win_right"])
def _sigmoid_attn_decode_kernel(
    Q,
    K,
    V,
    Out,
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
    stride_os,
    stride_ob,
    stride_on,
    stride_oh,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = one (sequence, kv head), BLOCK_M of its group·seqlen_q query rows, one split of its keys.

    Row r of the M tile is query s = r // group of query head kv_head·group + r % group, so the group's heads share
    every K/V tile read (GQA decode is then one read of the cache, not `group`). The keys the block can see,
    [lo, hi), are cut into num_splits runs of whole tiles; with num_splits > 1, Out is an fp32 workspace
    (num_splits, batch, seqlen_q, nheads_q, d) whose slices the host sums: sigmoid has no normaliser, so partial
    outputs over disjoint keys just add. 1-D grid: m block fastest, then split, then (sequence, kv head).
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    rest = pid // num_m_blocks
    split = rest % num_splits
    pid_bh = rest // num_splits
    off_b = (pid_bh // nheads_kv).to(tl.int64)
    off_hk = (pid_bh % nheads_kv).to(tl.int64)

    # Clamped as in _append_kv_kernel: out-of-range device values read only inside the cache.
    seqlen_k = tl.minimum(tl.maximum(tl.load(CacheSeqlens + off_b), 0), capacity - seqlen_new) + seqlen_new
    pos_shift = seqlen_k - seqlen_q  # bottom-right: query s sits at key position s + pos_shift

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = offs_r // group  # query index of each row; >= seqlen_q on padding rows
    offs_h = off_hk * group + offs_r % group  # query head of each row
    row_ok = offs_s < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

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

    K_head = K + off_hk * stride_kh
    V_head = V + off_hk * stride_vh
    offs_n0 = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < hi
        if PAGED:
            # One block id per key (L1 hits): tiles may cross pages, so any page size works.
            blk = tl.load(BlockTable + off_b * stride_tb + offs_n // page_size, mask=n_ok, other=0).to(tl.int64)
            # A block id outside the cache reads as zero keys and values: its keys then add p * 0 = 0.
            n_ok = n_ok & (blk >= 0) & (blk < num_blocks)
            slot = (offs_n % page_size).to(tl.int64)
            k_rows = blk * stride_kb + slot * stride_kn  # [BLOCK_N]
            v_rows = blk * stride_vb + slot * stride_vn
        else:
            k_rows = off_b * stride_kb + offs_n.to(tl.int64) * stride_kn
            v_rows = off_b * stride_vb + offs_n.to(tl.int64) * stride_vn
        kt = tl.load(K_head + k_rows[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        z = qk * qk_scale + z_bias[:, None]
        if HAS_ALIBI:
            z += alibi_z[:, None] * alibi_distance(offs_s, offs_n, pos_shift)
        p = sigmoid_from_z(z, SIGMOID)
        # Exactly 0 where masked (window/causal, keys past hi, padding rows), not sigmoid(-inf) rounded.
        p = tl.where(visible(offs_s, offs_n, seqlen_q, hi, pos_shift, win_left, win_right), p, 0.0)
        v = tl.load(V_head + v_rows[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]

    o_ptrs = (Out + split.to(tl.int64) * stride_os + off_b * stride_ob + offs_s[:, None].to(tl.int64) * stride_on
              + offs_h[:, None] * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _sum_splits_kernel(Ws, Out, n_rows, num_splits, stride_ws, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Out[r] = sum over splits of Ws[split, r], in split order (deterministic); rows r of (batch·seqlen_q·nheads)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    offs = offs_r[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(0, num_splits):
        acc += tl.load(Ws + i * stride_ws + offs, mask=ok, other=0.0)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=ok)


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
    Arguments are assumed validated (sigattn.ops.api); cache_seqlens and block_table values are not read on the
    host: the kernels clamp cache_seqlens[b] to [0, capacity - Snew] and treat block ids outside [0, num_blocks)
    as zero keys/values whose appends are dropped, so bad values give wrong numbers but never touch memory outside
    the cache. Returns (B, Sq, Hq, D) in q's dtype.
    """
    batch, seqlen_q, nheads_q, head_dim = q.shape
    nheads_kv = k_cache.shape[2]
    paged = block_table is not None
    cache_seqlens = cache_seqlens.contiguous()
    seqlen_new = 0
    if k is not None and v is not None:
        seqlen_new = k.shape[1]
        append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table)
    out = torch.empty(q.shape[:-1] + v_cache.shape[-1:], dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    max_len = capacity if max_seqlen_k is None else min(max_seqlen_k, capacity)
    cfg = config or decode_config(head_dim, q.dtype, q.device)
    left, right = window_bounds(seqlen_q, max_len, causal, window_left, window_right)
    group = nheads_q // nheads_kv
    visible_keys = min(max_len, left + right + seqlen_q)
    block_m, m_blocks, num_splits = launch_plan(batch, seqlen_q, nheads_q, nheads_kv, visible_keys, cfg, q.device,
                                                num_splits)
    programs = batch * nheads_kv * m_blocks
    dest = out
    if num_splits > 1:
        dest = torch.empty((num_splits,) + tuple(out.shape), dtype=torch.float32, device=q.device)
    bias = fp32_contiguous(bias)
    slopes = bias if alibi_slopes is None else fp32_contiguous(alibi_slopes)
    table = block_table if paged else cache_seqlens
    mode = sigmoid_mode(sigmoid_impl, q.device)
    _sigmoid_attn_decode_kernel[(programs * num_splits,)](
        q, k_cache, v_cache, dest, bias, slopes, cache_seqlens, table,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        dest.stride(0) if num_splits > 1 else 0,
        dest.stride(-4), dest.stride(-3), dest.stride(-2),
        table.stride(0) if paged else 0,
        slopes.stride(0) if slopes.dim() == 2 else 0,
        nheads_kv, group, seqlen_q, seqlen_new, k_cache.shape[1] if paged else 1, capacity, k_cache.shape[0],
        num_splits, m_blocks,
        left, right, float(scale), z_factor(mode),
        PAGED=paged,
        HAS_ALIBI=alibi_slopes is not None,
        SIGMOID=mode,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages_paged if paged else cfg.num_stages,
    )
    if num_splits > 1:
        n_rows = batch * seqlen_q * nheads_q
        block_r = 16 if interpreting() else 4
        _sum_splits_kernel[(cdiv(n_rows, block_r),)](
            dest, out, n_rows, num_splits, dest.stride(0),
            HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=next_pow2(head_dim),
        )
    return out
