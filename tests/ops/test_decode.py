"""Triton KV-cache decode kernel vs the float64 reference: append, GQA, paging, split-KV, masks (CPU: interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

import sigattn
from sigattn.ops import api
from sigattn.ops.decode import sigmoid_attn_kvcache
from sigattn.ops.reference import sigmoid_attn, sigmoid_attn_with_kvcache
from tests.ops.test_kernels import HAS_TRITON, max_err, torch_lowp

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def paged_copy(k_cache: torch.Tensor, page: int, spare: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged pool holding k_cache (batch, cap, h, d) in shuffled blocks; blocks nobody uses hold NaN."""
    b, cap, h, d = k_cache.shape
    per_seq = -(-cap // page)
    n_blocks = b * per_seq + spare
    ids = torch.randperm(n_blocks, device=k_cache.device)[: b * per_seq].view(b, per_seq).to(torch.int32)
    pool = torch.full((n_blocks, page, h, d), math.nan, dtype=k_cache.dtype, device=k_cache.device)
    pos = torch.arange(cap, device=k_cache.device)
    for bi in range(b):
        pool[ids[bi, pos // page].long(), pos % page] = k_cache[bi]
    return pool, ids


def paged_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, page: int) -> tuple[torch.Tensor, ...]:
    """(k pool, v pool, block table): both caches paged through one table."""
    pool_k, table = paged_copy(k_cache, page)
    pool_v = torch.zeros_like(pool_k)
    pos = torch.arange(k_cache.shape[1], device=k_cache.device)
    for bi in range(len(table)):
        pool_v[table[bi, pos // page].long(), pos % page] = v_cache[bi]
    return pool_k, pool_v, table


def gather_paged(pool: torch.Tensor, table: torch.Tensor, cap: int) -> torch.Tensor:
    """The contiguous (batch, cap, h, d) view of a paged pool."""
    pos = torch.arange(cap, device=pool.device)
    return torch.stack([pool[table[bi, pos // pool.shape[1]].long(), pos % pool.shape[1]] for bi in range(len(table))])


def make_case(b, sq, new, hq, hkv, d, lens, cap, dtype, device, alibi=False):
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
    k_cache = torch.randn(b, cap, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(b, cap, hkv, d, dtype=dtype, device=device)
    for bi, n in enumerate(lens):  # slots past the cached tokens: NaN must not leak (the new tokens' slots are
        k_cache[bi, n:] = math.nan  # written by the call, which reads the new keys from k/v, never from there)
        v_cache[bi, n:] = math.nan
    k_new = torch.randn(b, new, hkv, d, dtype=dtype, device=device) if new else None
    v_new = torch.randn(b, new, hkv, d, dtype=dtype, device=device) if new else None
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    bias = -math.log(max(cap, 2)) + torch.randn(hq, device=device)
    slopes = torch.rand(b, hq, device=device) * 0.3 if alibi else None
    return q, k_cache, v_cache, k_new, v_new, seqlens, bias, slopes


def check_case(b, sq, new, hq, hkv, d, lens, cap, dtype, device, causal=False, window=(-1, -1), alibi=False,
               page=None, num_splits=None, impl="accurate", factor=3.0):
    q, kc, vc, kn, vn, seqlens, bias, slopes = make_case(b, sq, new, hq, hkv, d, lens, cap, dtype, device, alibi)
    scale = d**-0.5
    win = (window[0], 0 if causal else window[1])
    kc64, vc64 = kc.double(), vc.double()
    want = sigmoid_attn_with_kvcache(
        q.double(), kc64, vc64, None if kn is None else kn.double(), None if vn is None else vn.double(),
        cache_seqlens=seqlens, bias=bias.double(), scale=scale, causal=causal, window_size=win,
        alibi_slopes=None if slopes is None else slopes.double(),
    )
    if page is None:
        table = None
        k_arg, v_arg = kc, vc
    else:
        k_arg, table = paged_copy(kc, page)
        v_arg = paged_copy(vc, page)[0]
        v_arg.view(-1)[:] = math.nan
        pos = torch.arange(cap, device=device)
        for bi in range(b):  # one table for both pools
            v_arg[table[bi, pos // page].long(), pos % page] = vc[bi]
    got = sigmoid_attn_kvcache(q, k_arg, v_arg, kn, vn, seqlens, table, bias, scale, causal, window[0], window[1],
                               slopes, impl, num_splits=num_splits)

    # In-place append: the cache now equals the reference's (which appended too), untouched slots included.
    got_k = k_arg if table is None else gather_paged(k_arg, table, cap)
    got_v = v_arg if table is None else gather_paged(v_arg, table, cap)
    torch.testing.assert_close(got_k.double(), kc64, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_v.double(), vc64, rtol=0, atol=0, equal_nan=True)

    # Budget: 3x PyTorch's own error for the same math in this dtype, plus a rounding floor (as test_kernels).
    lowp = []
    for bi, n in enumerate(lens):
        kk, vv = kc64[bi : bi + 1, : n + new].to(dtype), vc64[bi : bi + 1, : n + new].to(dtype)
        sl = None if slopes is None else slopes[bi : bi + 1]
        lowp.append(torch_lowp(q[bi : bi + 1], kk, vv, bias, scale, causal, win, sl))
    lowp = torch.cat(lowp)
    assert got.shape == want.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all(), "non-finite (unwritten or leaked NaN) output"
    atol = torch.finfo(dtype).eps * want.abs().max().item() * (2 + math.sqrt(max(lens) + new))
    err, budget = max_err(got, want), factor * max_err(lowp, want) + atol
    assert err <= budget, f"max err {err:.3e} > {budget:.3e} (torch {dtype} err {max_err(lowp, want):.3e})"
    return got


CASES = [
    # b, sq, new, hq, hkv, d, lens, cap, causal, window, alibi
    (2, 1, 1, 4, 2, 32, [0, 37], 48, True, (-1, -1), False),
    (2, 1, 0, 4, 1, 32, [5, 50], 50, False, (-1, -1), False),
    (1, 3, 3, 8, 2, 16, [29], 40, True, (-1, -1), True),
    (2, 4, 4, 2, 2, 48, [17, 3], 24, True, (6, -1), False),
    (2, 2, 1, 4, 4, 32, [30, 12], 40, False, (5, 3), True),
    (2, 5, 2, 4, 2, 32, [1, 20], 24, True, (-1, -1), False),  # seqlen_q > keys of sequence 0: rows see nothing
]


@pytest.mark.parametrize("b,sq,new,hq,hkv,d,lens,cap,causal,window,alibi", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_matches_reference(b, sq, new, hq, hkv, d, lens, cap, causal, window, alibi, dtype, device):
    check_case(b, sq, new, hq, hkv, d, lens, cap, dtype, device, causal, window, alibi)


@pytest.mark.parametrize("page", [16, 8, 48])
def test_paged_matches_reference_and_contiguous_bitwise(page, device):
    """Paged pools (shuffled blocks, NaN in unused ones) give bitwise the contiguous result; page 8 and 48 make
    key tiles cross pages."""
    args = (2, 2, 2, 8, 2, 32, [13, 40], 48, torch.float16, device)
    torch.manual_seed(1)
    paged = check_case(*args, causal=True, alibi=True, page=page, num_splits=2)
    torch.manual_seed(1)
    contiguous = check_case(*args, causal=True, alibi=True, num_splits=2)
    assert torch.equal(paged, contiguous)


@pytest.mark.parametrize("sq", [1, 2, 7, 16, 33])
def test_seqlen_q(sq, device):
    """group 4 x seqlen_q rows: 4 and 8 rows pad a 16-row tile; 28, 64 and 132 rows take 1, 2 and 5 tiles of 32
    (interpreter), each with its own causal key range; 33 queries: chunked prefill onto a cache."""
    check_case(1, sq, sq, 8, 2, 16, [21], 56, torch.float16, device, causal=True)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_split_kv_forced(num_splits, device):
    """Key ranges cut into runs of tiles summed in fp32; 8 splits of 3 tiles leave empty splits (they add 0)."""
    check_case(2, 1, 1, 4, 2, 32, [40, 7], 48, torch.float32, device, causal=True, num_splits=num_splits)


@pytest.mark.parametrize("sq", [1, 2, 5, 16])
@pytest.mark.parametrize("page", [None, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fused_append_visible_to_the_same_call(sq, page, num_splits, device):
    """One launch appends and attends: the new keys (read from k/v, not back from the cache) are attended in the same
    call and land in the cache; lengths put them at a split boundary (sequence 0: keys 31..31+sq across the 2nd/3rd
    16-key tiles) and inside a tile (sequence 1); page 8 splits them across pages."""
    check_case(2, sq, sq, 8, 2, 16, [31, 9], 48, torch.float32, device, causal=True, page=page,
               num_splits=num_splits)


@pytest.mark.parametrize("page", [None, 16])
def test_fused_append_more_new_tokens_than_queries(page, device):
    """20 new tokens (two 16-row tiles, written round robin by the kv head's programs) for 1 query, a window that
    starts inside them, 4 splits (some of which see only new keys, some none)."""
    check_case(2, 1, 20, 4, 2, 32, [3, 26], 48, torch.float32, device, causal=True, window=(13, -1), page=page,
               num_splits=4)


@pytest.mark.parametrize("page", [None, 8])
def test_split_sum_is_deterministic_and_leaves_counters_zero(page, device):
    """The last split of each (sequence, kv head, m block) sums the partials in split order: repeated calls give
    bitwise one result, and every ticket counter is back at 0 for the next launch."""
    from sigattn.ops import decode

    q, kc, vc, kn, vn, seqlens, bias, _ = make_case(2, 3, 3, 8, 2, 16, [40, 17], 48, torch.float32, device)
    table = None
    if page is not None:
        kc, vc, table = paged_pair(kc, vc, page)
    args = (bias, 0.25, True, -1, 0, None, "accurate")
    first = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, table, *args, num_splits=5)
    for _ in range(2):
        again = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, table, *args, num_splits=5)
        assert torch.equal(first, again)
    assert torch.isfinite(first).all()
    assert decode._scratch and all(int(c.abs().sum()) == 0 for _, c in decode._scratch.values())


def test_split_bucket_plan(device, monkeypatch):
    """Issue 4's batch-1 shapes (H100: 132 SMs, Hq 32, Hkv 8, d 128): the split bucket's config and split counts
    (4k: 16 splits of 256 keys, 128 programs; 32k: 33 splits, 264 programs); batch 32 keeps the base config, 1 split."""
    from sigattn.ops import configs, decode

    monkeypatch.setattr(configs, "_is_sm90", lambda d: True)
    monkeypatch.setattr(decode, "_sm_count", lambda d: 132)
    dev = torch.device(device)
    split_cfg = configs._decode_config(128, torch.bfloat16, dev, True)
    base_cfg = configs._decode_config(128, torch.bfloat16, dev, False)
    assert (split_cfg.block_n, split_cfg.num_stages, split_cfg.num_stages_paged) == (64, 4, 6)
    assert (base_cfg.block_n, base_cfg.num_stages) == (64, 3)
    assert decode.launch_plan(1, 1, 32, 8, 4096, split_cfg, dev) == (16, 1, 16)
    assert decode.launch_plan(1, 1, 32, 8, 32768, split_cfg, dev) == (16, 1, 33)
    assert decode.launch_plan(32, 1, 32, 8, 4096, base_cfg, dev)[2] == 1


def test_split_kv_chosen_on_long_caches(device):
    """The heuristic splits when batch x kv heads is small next to the SM count (4 when interpreting)."""
    from sigattn.ops.configs import decode_config
    from sigattn.ops.decode import choose_num_splits

    cfg = decode_config(32, torch.float16, torch.device(device))
    assert choose_num_splits(2, 4096, cfg, torch.device(device)) > 1
    assert choose_num_splits(2, cfg.block_n, cfg, torch.device(device)) == 1
    assert choose_num_splits(1000, 4096, cfg, torch.device(device)) == 1


def test_empty_caches_and_no_new_tokens_give_zeros(device):
    q, kc, vc, _, _, _, bias, _ = make_case(2, 2, 0, 4, 2, 16, [0, 0], 16, torch.float16, device)
    seqlens = torch.zeros(2, dtype=torch.int32, device=device)
    out = sigmoid_attn_kvcache(q, kc, vc, None, None, seqlens, None, bias, 0.25, False, -1, -1, None, "accurate",
                               num_splits=2)
    assert torch.equal(out, torch.zeros_like(out))


def test_fast_sigmoid_and_strided_inputs(device):
    """q and new k/v as views of packed projections; the fast sigmoid mode."""
    b, hq, hkv, d = 2, 4, 2, 32
    qkv = torch.randn(b, 1, hq + 2 * hkv, d, dtype=torch.float16, device=device)
    q, kn, vn = qkv[:, :, :hq], qkv[:, :, hq : hq + hkv], qkv[:, :, hq + hkv :]
    kc, vc = (torch.randn(b, 32, hkv, d, dtype=torch.float16, device=device) for _ in range(2))
    seqlens = torch.tensor([9, 30], dtype=torch.int32, device=device)
    bias = torch.full((hq,), -3.0, device=device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, None, bias, 0.2, True, -1, 0, None, "fast")
    want = sigmoid_attn_kvcache(q.contiguous(), kc_ref, vc_ref, kn.contiguous(), vn.contiguous(), seqlens, None, bias,
                                0.2, True, -1, 0, None, "accurate")
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("paged", [False, True])
def test_step_by_step_decode_equals_full_recompute(paged, device):
    """Prompts of 0 and 5 tokens, then single tokens and one 3-token speculative step, through the public function:
    each step equals float64 attention over the whole prefix, and the cache ends holding every token."""
    b, hq, hkv, d, cap, dtype = 2, 8, 2, 32, 32, torch.float32
    start = [0, 5]
    k_all = torch.randn(b, 5 + 12, hkv, d, dtype=dtype, device=device)
    v_all = torch.randn_like(k_all)
    kc = torch.zeros(b, cap, hkv, d, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    kc[1, :5], vc[1, :5] = k_all[1, :5], v_all[1, :5]
    table = None
    if paged:
        kc, table = paged_copy(kc, 16)
        vc = paged_copy(vc, 16)[0]
        vc.view(-1)[:] = 0.0
        vc[table[1, 0].long(), :5] = v_all[1, :5]
        kc[table[0].long()] = 0.0  # sequence 0 starts empty
    seqlens = torch.tensor(start, dtype=torch.int32, device=device)
    pos = list(start)
    for step in [1, 1, 3, 1, 1]:
        q = torch.randn(b, step, hq, d, dtype=dtype, device=device)
        kn = torch.stack([k_all[bi, pos[bi] : pos[bi] + step] for bi in range(b)])
        vn = torch.stack([v_all[bi, pos[bi] : pos[bi] + step] for bi in range(b)])
        out = sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, bias=-2.5,
                                                block_table=table, causal=True, backend="triton",
                                                sigmoid_impl="accurate")
        for bi in range(b):
            n = pos[bi] + step
            want = sigmoid_attn(q[bi : bi + 1].double(), k_all[bi : bi + 1, :n].double(),
                                v_all[bi : bi + 1, :n].double(), scale=d**-0.5, bias=-2.5, causal=True)
            torch.testing.assert_close(out[bi : bi + 1].double(), want, rtol=1e-5, atol=1e-5)
        pos = [p + step for p in pos]
        seqlens += step
    full_k = kc if table is None else gather_paged(kc, table, cap)
    for bi in range(b):
        assert torch.equal(full_k[bi, : pos[bi]], k_all[bi, : pos[bi]])


def test_api_dispatch_and_refusals(device):
    q, kc, vc, kn, vn, seqlens, _, _ = make_case(2, 1, 1, 4, 2, 16, [3, 9], 16, torch.float32, device)
    kw = dict(cache_seqlens=seqlens, bias=-2.0, causal=True)
    got = sigattn.sigmoid_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, backend="triton", **kw)
    want = sigattn.sigmoid_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, backend="reference", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call: dtype torch.float64"):
        sigattn.sigmoid_attn_with_kvcache(q.double(), kc.double(), vc.double(), kn.double(), vn.double(),
                                          backend="triton", **kw)
    with pytest.raises(ValueError, match="inference-only"):
        sigattn.sigmoid_attn_with_kvcache(q.clone().requires_grad_(), kc, vc, kn, vn, backend="triton", **kw)
    with torch.no_grad():
        sigattn.sigmoid_attn_with_kvcache(q.clone().requires_grad_(), kc, vc, kn, vn, backend="triton", **kw)
    strided = torch.randn(2, 16, 2, 32, device=device)[..., ::2]
    with pytest.raises(ValueError, match="unit stride along headdim"):
        sigattn.sigmoid_attn_with_kvcache(q, strided, strided.clone(), backend="triton", **kw)
    # requires_grad under "auto" goes to the reference, which has a backward.
    qg = q.clone().requires_grad_()
    sigattn.sigmoid_attn_with_kvcache(qg, kc, vc, kn, vn, backend="auto", **kw).sum().backward()
    assert qg.grad is not None


def test_int_cache_seqlens_needs_no_host_read(device, monkeypatch):
    """An int cache_seqlens is validated without reading a device tensor back (no sync per decode step)."""
    q, kc, vc, kn, vn, _, _, _ = make_case(2, 1, 1, 4, 2, 16, [4, 4], 16, torch.float32, device)
    calls = []
    real = api._check_cache_seqlens

    def spy(*a):
        t = real(*a)
        calls.append(t)
        return _NoToList(t)

    monkeypatch.setattr(api, "_check_cache_seqlens", spy)
    out = sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=4, bias=-2.0, backend="triton")
    assert calls and out.shape == q.shape


class _NoToList(torch.Tensor):
    """A tensor whose .tolist() fails, to prove a code path never reads it on the host."""

    @staticmethod
    def __new__(cls, t: torch.Tensor) -> _NoToList:
        return t.as_subclass(cls)

    def tolist(self):  # type: ignore[override]
        raise AssertionError("cache_seqlens was read on the host")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out


# GPU only (marked gpu, skipped on CPU): bf16, real sizes, the kernel's CUDA configs.


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [1, 4, 16])
@pytest.mark.parametrize("page", [None, 64, 256])
@pytest.mark.parametrize("impl", ["fast", "accurate"])
def test_gpu_bf16_decode(sq, page, impl, device):
    check_case(4, sq, sq, 32, 8, 128, [4096, 17, 0, 3000], 4352, torch.bfloat16, device, causal=True, page=page,
               impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 256])
def test_gpu_bf16_long_context_split_kv(page, device):
    """Batch 1 at 32k keys: the heuristic splits across SMs."""
    check_case(1, 1, 1, 32, 8, 128, [32767], 32768 + 256, torch.bfloat16, device, causal=True, page=page)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 256])
def test_gpu_chunked_prefill(page, device):
    """300 queries onto caches of 0 and 1000 tokens: 75 M tiles per kv head, causal key ranges per tile."""
    check_case(2, 300, 300, 32, 8, 128, [0, 1000], 1536, torch.bfloat16, device, causal=True, page=page)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 256])
def test_gpu_head_dims_window_alibi(d, device):
    check_case(2, 2, 2, 16, 4, d, [2000, 517], 2048, torch.bfloat16, device, causal=True, window=(300, -1),
               alibi=True, page=64)
    check_case(2, 1, 1, 8, 8, d, [1000, 60], 1024, torch.float16, device, num_splits=5)
    check_case(2, 1, 1, 8, 2, d, [1000, 60], 1024, torch.float32, device, page=64)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 256])
def test_gpu_fused_split_sum_under_concurrency(page, device):
    """Batch 1, 4k keys, the heuristic's 16 splits and a forced 33: programs really race for the tickets; 30 calls
    give bitwise one result (split-order sum, whichever program is last), within rounding of 1 split, and the
    counters end at 0. The step's token goes through the fused append (read from k/v, written to the cache)."""
    from sigattn.ops import decode

    q, kc, vc, kn, vn, seqlens, bias, _ = make_case(1, 1, 1, 32, 8, 128, [4095], 4096 + 256, torch.bfloat16, device)
    kc, vc = torch.randn_like(kc), torch.randn_like(vc)
    table = None
    if page is not None:
        kc, vc, table = paged_pair(kc, vc, page)
    args = (bias, 128**-0.5, True, -1, 0, None, "fast")
    one = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, table, *args, num_splits=1)
    for splits in (None, 33):
        first = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, table, *args, num_splits=splits)
        for _ in range(30):
            assert torch.equal(sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, table, *args, num_splits=splits),
                               first)
        torch.testing.assert_close(first.float(), one.float(), rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for _, c in decode._scratch.values())


@pytest.mark.gpu
def test_gpu_auto_uses_the_kernel(device, monkeypatch):
    from sigattn.ops import decode

    calls = []
    real = decode.sigmoid_attn_kvcache
    monkeypatch.setattr(decode, "sigmoid_attn_kvcache", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, kc, vc, kn, vn, seqlens, _, _ = make_case(2, 1, 1, 8, 2, 64, [100, 5], 128, torch.bfloat16, device)
    sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, bias=-4.0)
    assert calls


@pytest.mark.bigmem
@pytest.mark.gpu
def test_gpu_int64_addressing_paged(device):
    """A paged pool of > 2^31 elements; the sequence lives in its last blocks."""
    page, hkv, d = 256, 4, 128
    n_blocks = 2**31 // (page * hkv * d) + 64
    kc = torch.randn(n_blocks, page, hkv, d, dtype=torch.bfloat16, device=device)
    vc = torch.randn_like(kc)
    table = torch.arange(n_blocks - 16, n_blocks, dtype=torch.int32, device=device)[None]
    q = torch.randn(1, 1, 16, d, dtype=torch.bfloat16, device=device)
    seqlens = torch.tensor([16 * page - 1], dtype=torch.int32, device=device)
    out = sigattn.sigmoid_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, bias=-8.0, block_table=table)
    kk, vv = kc[-16:].reshape(1, -1, hkv, d)[:, : 16 * page - 1], vc[-16:].reshape(1, -1, hkv, d)[:, : 16 * page - 1]
    want = sigmoid_attn(q.double(), kk.double(), vv.double(), scale=d**-0.5, bias=-8.0)
    assert max_err(out, want) < 0.02 * want.abs().max().item()


def test_out_of_range_device_values_stay_inside_the_cache(device):
    """The kernel-level call does not validate values (the public one skips reading CUDA tensors back): cache_seqlens
    are clamped to [0, capacity - seqlen_new], and block ids outside the pool read as zero keys/values with their
    appends dropped, so nothing outside the cache is read or written."""
    b, hq, hkv, d, cap, page = 3, 4, 2, 16, 32, 8
    q, kc, vc, kn, vn, _, bias, _ = make_case(b, 1, 1, hq, hkv, d, [0, 0, 0], cap, torch.float32, device)
    kc, vc = torch.randn_like(kc), torch.randn_like(vc)
    bad = torch.tensor([-5, 40, 10], dtype=torch.int32, device=device)
    clamped = torch.tensor([0, cap - 1, 10], dtype=torch.int32, device=device)
    args = (bias, d**-0.5, True, -1, 0, None, "accurate")
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    got = sigmoid_attn_kvcache(q, k1, v1, kn, vn, bad, None, *args)
    want = sigmoid_attn_kvcache(q, k2, v2, kn, vn, clamped, None, *args)
    assert torch.equal(got, want) and torch.equal(k1, k2) and torch.equal(v1, v2)

    # Paged: sequence 1's second block id is past the pool, sequence 2's first is negative.
    pool_k, table = paged_copy(kc, page, spare=0)
    pool_v = torch.randn_like(pool_k)
    n_blocks = pool_k.shape[0]
    table[1, 1], table[2, 0] = n_blocks + 3, -1
    lens = torch.tensor([5, 20, 6], dtype=torch.int32, device=device)
    pk, pv = pool_k.clone(), pool_v.clone()
    got = sigmoid_attn_kvcache(q, pk, pv, kn, vn, lens, table, *args)
    # Expected: the same call on a contiguous cache whose positions in bad blocks hold zeros (p * 0 = 0) and whose
    # appends there (sequence 2 writes position 6, in its bad block 0) are dropped.
    pos = torch.arange(cap, device=device)
    ok = (table >= 0) & (table < n_blocks)
    safe = torch.where(ok, table, 0).long()
    ck = torch.stack([pool_k[safe[bi, pos // page], pos % page] * ok[bi, pos // page, None, None] for bi in range(b)])
    cv = torch.stack([pool_v[safe[bi, pos // page], pos % page] * ok[bi, pos // page, None, None] for bi in range(b)])
    kn2, vn2 = kn.clone(), vn.clone()
    kn2[2], vn2[2] = 0, 0
    want = sigmoid_attn_kvcache(q, ck, cv, kn2, vn2, lens, None, *args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(n_blocks, page, dtype=torch.bool, device=device)
    for bi, n in enumerate(lens.tolist()):
        if ok[bi, n // page]:
            untouched[table[bi, n // page], n % page] = False
    assert torch.equal(pk[untouched], pool_k[untouched]) and torch.equal(pv[untouched], pool_v[untouched])


def test_public_api_validates_cpu_values(device):
    """Values of CPU cache_seqlens / block_table (and ints) are still checked by the public function."""
    if device != "cpu":
        pytest.skip("CPU tensors")
    q, kc, vc, kn, vn, _, _, _ = make_case(2, 1, 1, 4, 2, 16, [4, 4], 16, torch.float32, device)
    for lens, msg in (([3, 16], "must fit in the cache"), ([-1, 2], ">= 0")):
        with pytest.raises(ValueError, match=msg):
            sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, bias=-2.0, backend="triton",
                                              cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    with pytest.raises(ValueError, match="must fit in the cache"):
        sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=16, bias=-2.0, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("page", [None, 16])
def test_gpu_decode_api_never_syncs(page, device):
    """CUDA cache_seqlens / block_table are not read back: no device sync per step, and out-of-range values do not
    raise (the kernel keeps them inside the cache; see test_out_of_range_device_values_stay_inside_the_cache)."""
    q, kc, vc, kn, vn, seqlens, _, _ = make_case(2, 1, 1, 8, 2, 64, [100, 5], 128, torch.bfloat16, device)
    kc, vc = torch.randn_like(kc), torch.randn_like(vc)  # no NaN past the lengths: the bad ones attend there
    table = None
    if page is not None:
        kc, vc, table = paged_pair(kc, vc, page)  # one table for both pools
    bad = torch.tensor([500, -3], dtype=torch.int32, device=device)
    for lens in (seqlens, bad):
        sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table, bias=-4.0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sigattn.sigmoid_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, block_table=table,
                                                    bias=-4.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_gpu_split_decode_in_cuda_graph(device):
    """A captured split-KV decode has its own partials and tickets: after warm-up on the capture stream, later eager
    calls there that grow (and free) that stream's kept scratch, and small allocations that may reuse the freed
    memory, replays still write the eager result (a dangling ticket counter would leave the output unwritten)."""
    from sigattn.ops import decode

    q, kc, vc, kn, vn, seqlens, bias, _ = make_case(1, 1, 1, 32, 8, 128, [3000], 4096, torch.bfloat16, device)
    args = (bias, 128**-0.5, True, -1, 0, None, "fast")
    want = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, None, *args, num_splits=16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, None, *args, num_splits=16)  # warm-up: keeps scratch
    s.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        got = sigmoid_attn_kvcache(q, kc, vc, kn, vn, seqlens, None, *args, num_splits=16)
    big = make_case(16, 1, 1, 32, 8, 128, [3000] * 16, 4096, torch.bfloat16, device)
    with torch.cuda.stream(s):
        sigmoid_attn_kvcache(*big[:6], None, big[6], *args[1:], num_splits=33)  # 128 counters, larger partials
        junk = [torch.full((64,), -1, dtype=torch.int32, device=device) for _ in range(256)]
    torch.cuda.synchronize()
    for _ in range(3):
        got.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
    assert all(int((t == -1).all()) for t in junk)
    assert all(int(c.abs().sum()) == 0 for _, c in decode._scratch.values())


def test_large_partials_are_not_kept(monkeypatch):
    """Partials over _SCRATCH_KEEP elements are per call: the kept entry holds none of their storage."""
    from sigattn.ops import decode

    monkeypatch.setattr(decode, "_scratch", {})
    monkeypatch.setattr(decode, "_SCRATCH_KEEP", 1 << 10)
    ws, counters = decode._split_scratch(torch.device("cpu"), 1 << 12, 8)
    assert ws.numel() >= 1 << 12 and counters.numel() >= 8 and int(counters.abs().sum()) == 0
    kept_ws, kept_counters = decode._scratch[(-1, 0)]
    assert kept_ws.untyped_storage().nbytes() < ws.untyped_storage().nbytes() and kept_counters is counters
