"""Reference sigmoid attention vs direct float64 formulas written independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sigattn.ops import reference
from sigattn.ops.reference import (
    alibi_bias,
    sigmoid_attn,
    sigmoid_attn_varlen,
    sigmoid_attn_with_kvcache,
    visible_mask,
)

# ---------------------------------------------------------------- independent float64 oracle


def allowed_loops(sq: int, sk: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """(sq, sk) bool, written element by element from the definition."""
    left, right = window
    out = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        pos = i + sk - sq
        for j in range(sk):
            ok = True
            if causal and j > pos:
                ok = False
            if left >= 0 and j < pos - left:
                ok = False
            if right >= 0 and j > pos + right:
                ok = False
            out[i, j] = ok
    return out


def distance_loops(sq: int, sk: int) -> torch.Tensor:
    out = torch.zeros(sq, sk, dtype=torch.float64)
    for i in range(sq):
        for j in range(sk):
            out[i, j] = abs(i + sk - sq - j)
    return out


def oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: float | torch.Tensor,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    slopes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """Per (batch, head) dense float64 math; drop is a 0/1 keep mask (b, hq, sq, sk)."""
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    q, k, v = q.double(), k.double(), v.double()
    allowed = allowed_loops(sq, sk, causal, window)
    dist = distance_loops(sq, sk) if slopes is not None else None
    full_mask = None if mask is None else mask.expand(b, hq, sq, sk)
    rows = []
    for bi in range(b):
        heads = []
        for h in range(hq):
            kh = h // g
            s = q[bi, :, h] @ k[bi, :, kh].T * scale
            if isinstance(bias, torch.Tensor):
                s = s + (bias.double() if bias.dim() == 0 else bias.double()[h])
            else:
                s = s + bias
            if slopes is not None:
                slope = slopes[h] if slopes.dim() == 1 else slopes[bi, h]
                s = s - slope.double() * dist
            ok = allowed
            if full_mask is not None:
                m = full_mask[bi, h]
                if m.dtype == torch.bool:
                    ok = ok & m
                else:
                    s = s + m.double()
            w = torch.sigmoid(s) * ok
            if drop is not None:
                w = w * drop[bi, h].double() / (1 - p)
            heads.append(w @ v[bi, :, kh])
        rows.append(torch.stack(heads, dim=1))
    return torch.stack(rows, dim=0)


def make_qkv(
    b: int, sq: int, sk: int, hq: int, hkv: int, d: int, dtype: torch.dtype = torch.float32, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(b, sq, hq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, requires_grad=grad)
    return q, k, v


def close64(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 9), (9, 5), (7, 7)])
@pytest.mark.parametrize(
    "causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1)), (True, (3, -1)), (False, (0, 0))]
)
def test_visible_mask_matches_definition(sq: int, sk: int, causal: bool, window: tuple[int, int]) -> None:
    assert torch.equal(visible_mask(sq, sk, causal, window), allowed_loops(sq, sk, causal, window))


def test_alibi_bias_matches_definition() -> None:
    slopes = torch.rand(2, 3)
    got = alibi_bias(slopes, 4, 7)
    want = -slopes.double()[:, :, None, None] * distance_loops(4, 7)
    assert got.shape == (2, 3, 4, 7)
    close64(got, want)


# ---------------------------------------------------------------- dense features

FEATURES = {
    "plain": {},
    "scale": {"scale": 0.37},
    "bias_float": {"bias": -2.5},
    "bias_head": {"bias": "head"},
    "bias_0d": {"bias": "0d"},
    "causal": {"causal": True},
    "window_left": {"window": (3, -1)},
    "window_right": {"window": (-1, 2)},
    "window_both": {"window": (4, 1)},
    "causal_window": {"causal": True, "window": (5, -1)},
    "alibi_head": {"alibi": "head"},
    "alibi_batch": {"alibi": "batch"},
    "all": {"causal": True, "window": (6, -1), "alibi": "batch", "bias": "head", "scale": 0.5},
}


def build_feature(spec: dict, b: int, hq: int) -> dict:
    kw: dict = {"scale": spec.get("scale", 0.25), "bias": spec.get("bias", -1.0)}
    if kw["bias"] == "head":
        kw["bias"] = torch.randn(hq, dtype=torch.float64)
    elif kw["bias"] == "0d":
        kw["bias"] = torch.tensor(-0.7, dtype=torch.float64)
    kw["causal"] = spec.get("causal", False)
    kw["window"] = spec.get("window", (-1, -1))
    alibi = spec.get("alibi")
    kw["slopes"] = None if alibi is None else torch.rand(hq) if alibi == "head" else torch.rand(b, hq)
    return kw


def call_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kw: dict, **extra: object) -> torch.Tensor:
    return sigmoid_attn(
        q,
        k,
        v,
        scale=kw["scale"],
        bias=kw["bias"],
        causal=kw["causal"],
        window_size=kw["window"],
        alibi_slopes=kw["slopes"],
        **extra,
    )


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (17, 63), (63, 17), (129, 129), (1, 129)])
@pytest.mark.parametrize("name", list(FEATURES))
def test_dense_matches_formula(name: str, sq: int, sk: int) -> None:
    b, hq, hkv, d = 2, 4, 2, 8
    kw = build_feature(FEATURES[name], b, hq)
    q, k, v = make_qkv(b, sq, sk, hq, hkv, d, torch.float64)
    out = call_ref(q, k, v, kw)
    assert out.shape == (b, sq, hq, d) and out.dtype == torch.float64
    want = oracle(q, k, v, kw["scale"], kw["bias"], kw["causal"], kw["window"], kw["slopes"])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(hq: int, hkv: int, causal: bool) -> None:
    b, sq, sk, d = 2, 17, 33, 16
    q, k, v = make_qkv(b, sq, sk, hq, hkv, d, torch.float64)
    bias = torch.randn(hq, dtype=torch.float64)
    slopes = torch.rand(b, hq)
    out = sigmoid_attn(q, k, v, scale=0.3, bias=bias, causal=causal, alibi_slopes=slopes)
    torch.testing.assert_close(out, oracle(q, k, v, 0.3, bias, causal, slopes=slopes), rtol=1e-10, atol=1e-10)


def test_gqa_equals_repeated_kv() -> None:
    q, k, v = make_qkv(1, 9, 13, 8, 2, 4, torch.float64)
    out = sigmoid_attn(q, k, v, scale=0.5, bias=-1.0, causal=True)
    rep = sigmoid_attn(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2), scale=0.5, bias=-1.0, causal=True)
    torch.testing.assert_close(out, rep, rtol=0, atol=1e-14)


@pytest.mark.parametrize("sq,sk", [(9, 4), (5, 1), (3, 0)])
def test_rows_without_keys_are_zero(sq: int, sk: int) -> None:
    q, k, v = make_qkv(1, sq, sk, 2, 2, 4, torch.float32)
    out = sigmoid_attn(q, k, v, scale=1.0, bias=5.0, causal=True)
    blind = ~allowed_loops(sq, sk, True, (-1, -1)).any(dim=1)
    assert blind.sum() == max(sq - sk, 0) if sk else sq
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, blind], torch.zeros_like(out[:, blind]))
    torch.testing.assert_close(out.double(), oracle(q, k, v, 1.0, 5.0, True), rtol=1e-6, atol=1e-6)


def test_empty_query() -> None:
    q, k, v = make_qkv(2, 0, 5, 2, 1, 4)
    out = sigmoid_attn(q, k, v, scale=1.0, bias=0.0)
    assert out.shape == (2, 0, 2, 4)


MASKS = {
    "bool_2d": lambda b, hq, sq, sk: torch.rand(sq, sk) > 0.4,
    "bool_b1": lambda b, hq, sq, sk: torch.rand(b, 1, sq, sk) > 0.4,
    "bool_full": lambda b, hq, sq, sk: torch.rand(b, hq, sq, sk) > 0.4,
    "float_2d": lambda b, hq, sq, sk: torch.randn(sq, sk),
    "float_b1": lambda b, hq, sq, sk: torch.randn(b, 1, sq, sk),
    "float_heads": lambda b, hq, sq, sk: torch.randn(hq, 1, sk),
    "float_full_inf": lambda b, hq, sq, sk: torch.randn(b, hq, sq, sk).masked_fill(
        torch.rand(b, hq, sq, sk) > 0.7, float("-inf")
    ),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask(name: str, causal: bool) -> None:
    b, sq, sk, hq, hkv = 2, 17, 23, 4, 2
    q, k, v = make_qkv(b, sq, sk, hq, hkv, 8, torch.float64)
    mask = MASKS[name](b, hq, sq, sk)
    out = sigmoid_attn(q, k, v, scale=0.4, bias=-1.0, causal=causal, attn_mask=mask)
    want = oracle(q, k, v, 0.4, -1.0, causal, mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_bool_mask_exact_zero_not_sigmoid_of_large_negative() -> None:
    # A masked key with a huge value must not leak: sigmoid(s) * 1e30 would if weights were ~1e-30.
    q, k, v = make_qkv(1, 4, 6, 1, 1, 4, torch.float16)
    v[0, 0] = 6e4
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 0] = False
    out = sigmoid_attn(q, k, v, scale=1.0, bias=0.0, attn_mask=mask)
    torch.testing.assert_close(out.double(), oracle(q, k, v, 1.0, 0.0, mask=mask), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- dropout


def test_dropout_replays_torch_mask() -> None:
    b, sq, sk, hq, hkv, p = 2, 9, 13, 4, 2, 0.3
    q, k, v = make_qkv(b, sq, sk, hq, hkv, 8)
    torch.manual_seed(123)
    out = sigmoid_attn(q, k, v, scale=0.5, bias=-1.0, causal=True, dropout_p=p)
    torch.manual_seed(123)
    keep = F.dropout(torch.ones(b, hq, sq, sk), p=p, training=True) != 0
    want = oracle(q, k, v, 0.5, -1.0, True, drop=keep, p=p)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_dropout_statistics() -> None:
    p, bias = 0.3, 0.4
    q = torch.zeros(1, 4096, 8, 4)
    kv = torch.ones(1, 1, 8, 4)
    out = sigmoid_attn(q, torch.zeros_like(kv), kv, scale=1.0, bias=bias, dropout_p=p)
    kept = out[..., 0] != 0
    assert abs((1 - kept.float().mean().item()) - p) < 0.02
    w = 1 / (1 + math.exp(-bias))
    torch.testing.assert_close(out[..., 0][kept], torch.full_like(out[..., 0][kept], w / (1 - p)))
    assert abs(out.mean().item() - w) < 0.02


def test_dropout_zero_is_identity() -> None:
    q, k, v = make_qkv(2, 17, 17, 2, 2, 8)
    a = sigmoid_attn(q, k, v, scale=0.5, bias=-1.0, dropout_p=0.0)
    b = sigmoid_attn(q, k, v, scale=0.5, bias=-1.0)
    assert torch.equal(a, b)


def test_dropout_backward_replays_mask_through_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # out is linear in v, so <dout, out> == <dv, v> holds only if backward reuses forward's masks.
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 4 * 11 * 3)
    q, k, v = make_qkv(2, 13, 11, 4, 2, 8, torch.float64, grad=True)
    out = sigmoid_attn(q, k, v, scale=0.5, bias=-1.0, causal=True, dropout_p=0.5)
    dout = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v, dout)
    torch.testing.assert_close((dout * out).sum(), (dv * v).sum(), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- low precision


def naive_low_precision(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: float, causal: bool
) -> torch.Tensor:
    """The same formula done by PyTorch entirely in the inputs' dtype, the error yardstick."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) * scale + bias
    w = torch.sigmoid(s)
    if causal:
        w = w.masked_fill(~visible_mask(q.shape[1], k.shape[1], True), 0)
    return (w @ vh).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_error_budget(dtype: torch.dtype, causal: bool) -> None:
    q, k, v = make_qkv(2, 63, 129, 2, 2, 32, dtype)
    out = sigmoid_attn(q, k, v, scale=32**-0.5, bias=-math.log(129), causal=causal)
    assert out.dtype == dtype
    want = oracle(q, k, v, 32**-0.5, -math.log(129), causal)
    err = (out.double() - want).abs().max().item()
    err_naive = (naive_low_precision(q, k, v, 32**-0.5, -math.log(129), causal).double() - want).abs().max().item()
    rounding = torch.finfo(dtype).eps * want.abs().max().item()
    assert err <= 2 * err_naive + rounding, (err, err_naive)
    if dtype != torch.float32:
        # The math runs in fp32, so for half types only the final rounding to the output dtype may show.
        assert err <= rounding, (err, rounding)


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("budget", [1, 2 * 4 * 23 * 5])
def test_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    b, sq, sk, hq, hkv = 2, 29, 23, 4, 2
    q, k, v = make_qkv(b, sq, sk, hq, hkv, 8, torch.float64)
    slopes, bias = torch.rand(b, hq), torch.randn(hq, dtype=torch.float64)
    mask = torch.randn(b, 1, sq, sk, dtype=torch.float64)
    kw = dict(scale=0.5, bias=bias, causal=True, window_size=(7, -1), alibi_slopes=slopes, attn_mask=mask)
    full = sigmoid_attn(q, k, v, **kw)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    torch.testing.assert_close(sigmoid_attn(q, k, v, **kw), full, rtol=1e-12, atol=1e-12)


def test_large_call() -> None:
    n = 2048
    q, k, v = make_qkv(1, n, n, 2, 2, 16)
    out = sigmoid_attn(q, k, v, scale=0.25, bias=-math.log(n), causal=True)
    assert out.shape == (1, n, 2, 16) and torch.isfinite(out).all()
    rows = torch.tensor([0, 1, 1000, n - 1])
    vis = rows[:, None] >= torch.arange(n)[None, :]  # [4, n]
    s = torch.einsum("bqhd,bkhd->bqhk", q[:, rows].double(), k.double()) * 0.25 - math.log(n)
    want = torch.einsum("bqhk,bkhd->bqhd", torch.sigmoid(s) * vis[None, :, None, :], v.double())
    torch.testing.assert_close(out[:, rows].double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients

GRAD_CASES = {
    "plain_head_bias": dict(bias="head"),
    "causal_0d_bias": dict(causal=True, bias="0d"),
    "window_alibi": dict(window=(2, 1), alibi="batch", bias="head"),
    "causal_window_alibi": dict(causal=True, window=(3, -1), alibi="head", bias="0d"),
}


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(monkeypatch: pytest.MonkeyPatch, name: str, chunked: bool) -> None:
    b, sq, sk, hq, hkv, d = 2, 5, 4, 4, 2, 3
    if chunked:
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", b * hq * sk * 2)
    kw = build_feature(GRAD_CASES[name], b, hq)
    kw["bias"].requires_grad_(True)
    q, k, v = make_qkv(b, sq, sk, hq, hkv, d, torch.float64, grad=True)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return call_ref(q, k, v, {**kw, "bias": bias})

    assert torch.autograd.gradcheck(f, (q, k, v, kw["bias"]))


def test_grads_match_oracle() -> None:
    b, sq, sk, hq, hkv, d = 2, 17, 13, 4, 1, 8
    q, k, v = make_qkv(b, sq, sk, hq, hkv, d, torch.float64, grad=True)
    bias = torch.randn(hq, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(hq)
    out = sigmoid_attn(q, k, v, scale=0.3, bias=bias, causal=True, alibi_slopes=slopes)
    want = oracle(q, k, v, 0.3, bias, True, slopes=slopes)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), dout)
    exp = torch.autograd.grad(want, (q, k, v, bias), dout)
    for a, e in zip(got, exp, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- varlen


def pack(lens: list[int], h: int, d: int, dtype: torch.dtype, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randn(sum(lens), h, d, dtype=dtype, requires_grad=grad)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return t, cu


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2))])
@pytest.mark.parametrize("default_bias", [False, True])
def test_varlen_matches_per_sequence(causal: bool, window: tuple[int, int], default_bias: bool) -> None:
    lq, lk = [5, 0, 17, 3, 9], [7, 4, 17, 0, 1]
    hq, hkv, d = 4, 2, 8
    q, cu_q = pack(lq, hq, d, torch.float64)
    k, cu_k = pack(lk, hkv, d, torch.float64)
    v = torch.randn_like(k)
    slopes = torch.rand(len(lq), hq)
    bias = None if default_bias else torch.randn(hq, dtype=torch.float64)
    out = sigmoid_attn_varlen(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(lq),
        max(lk),
        scale=0.4,
        bias=bias,
        causal=causal,
        window_size=window,
        alibi_slopes=slopes,
    )
    assert out.shape == q.shape and torch.isfinite(out).all()
    for i in range(len(lq)):
        sl_q, sl_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        b_i = bias if bias is not None else -math.log(lk[i]) if lk[i] else 0.0
        want = oracle(q[None, sl_q], k[None, sl_k], v[None, sl_k], 0.4, b_i, causal, window, slopes[i])[0]
        torch.testing.assert_close(out[sl_q], want, rtol=1e-10, atol=1e-10)
        if lk[i] == 0:
            assert torch.equal(out[sl_q], torch.zeros_like(out[sl_q]))


def test_varlen_default_bias_is_per_sequence() -> None:
    lq, lk = [3, 4], [2, 50]
    q, cu_q = pack(lq, 2, 4, torch.float64)
    k, cu_k = pack(lk, 2, 4, torch.float64)
    v = torch.randn_like(k)
    out = sigmoid_attn_varlen(q, k, v, cu_q, cu_k, 4, 50, scale=0.5, bias=None)
    for i, (a, z) in enumerate([(0, 3), (3, 7)]):
        kk = slice(cu_k[i], cu_k[i + 1])
        want = oracle(q[None, a:z], k[None, kk], v[None, kk], 0.5, -math.log(lk[i]))[0]
        torch.testing.assert_close(out[a:z], want, rtol=1e-10, atol=1e-10)


def test_varlen_gradcheck() -> None:
    lq, lk = [2, 0, 3], [3, 2, 2]
    q, cu_q = pack(lq, 2, 3, torch.float64, grad=True)
    k, cu_k = pack(lk, 1, 3, torch.float64, grad=True)
    v = torch.randn(k.shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return sigmoid_attn_varlen(
            q, k, v, cu_q, cu_k, 3, 3, scale=0.5, bias=bias, causal=True, alibi_slopes=torch.tensor([0.5, 0.25])
        )

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


# ---------------------------------------------------------------- kv cache


def kv_case(b: int, cache_len: int, hq: int, hkv: int, d: int, sq: int, n_new: int) -> tuple:
    q = torch.randn(b, sq, hq, d, dtype=torch.float64)
    k_cache = torch.randn(b, cache_len, hkv, d, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    k_new = torch.randn(b, n_new, hkv, d, dtype=torch.float64) if n_new else None
    v_new = torch.randn_like(k_new) if n_new else None
    return q, k_cache, v_cache, k_new, v_new


def to_paged(cache: torch.Tensor, page: int, table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Scatter a contiguous (b, L, h, d) cache into shuffled blocks; unused blocks hold random junk."""
    b, length = cache.shape[:2]
    paged = torch.randn(num_blocks, page, *cache.shape[2:], dtype=cache.dtype)
    for i in range(b):
        for p in range(length):
            paged[table[i, p // page], p % page] = cache[i, p]
    return paged


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize(
    "sq,n_new,causal,window,alibi",
    [
        (1, 1, True, (-1, -1), False),
        (1, 0, False, (-1, -1), True),
        (4, 4, True, (-1, -1), True),
        (5, 3, True, (2, -1), False),
        (3, 2, False, (1, 1), True),
    ],
)
def test_kvcache_matches_dense(
    paged: bool, sq: int, n_new: int, causal: bool, window: tuple[int, int], alibi: bool
) -> None:
    b, cache_len, hq, hkv, d, page = 3, 24, 4, 2, 8, 4
    q, k_cache, v_cache, k_new, v_new = kv_case(b, cache_len, hq, hkv, d, sq, n_new)
    seqlens = torch.tensor([5, 0, 24 - n_new], dtype=torch.int32)
    seqlens_before = seqlens.clone()
    k_orig, v_orig = k_cache.clone(), v_cache.clone()
    slopes = torch.rand(b, hq) if alibi else None
    bias = torch.randn(hq, dtype=torch.float64)
    num_blocks = b * cache_len // page + 2
    table = torch.randperm(num_blocks)[: b * cache_len // page].reshape(b, -1).to(torch.int32)
    if paged:
        kc, vc = to_paged(k_cache, page, table, num_blocks), to_paged(v_cache, page, table, num_blocks)
        kc_orig, vc_orig = kc.clone(), vc.clone()
    else:
        kc, vc = k_cache, v_cache
    out = sigmoid_attn_with_kvcache(
        q,
        kc,
        vc,
        k_new,
        v_new,
        cache_seqlens=seqlens,
        bias=bias,
        scale=0.35,
        causal=causal,
        window_size=window,
        alibi_slopes=slopes,
        block_table=table if paged else None,
    )
    assert torch.equal(seqlens, seqlens_before)
    for i in range(b):
        n = int(seqlens[i])
        keys = torch.cat([k_orig[i, :n], k_new[i]]) if n_new else k_orig[i, :n]
        vals = torch.cat([v_orig[i, :n], v_new[i]]) if n_new else v_orig[i, :n]
        want = oracle(
            q[i : i + 1], keys[None], vals[None], 0.35, bias, causal, window, None if slopes is None else slopes[i]
        )
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-10, atol=1e-10)
    # In-place append: new keys at cache_seqlens[b] + t, every other slot untouched.
    expect_k, expect_v = k_orig.clone(), v_orig.clone()
    for i in range(b):
        n = int(seqlens[i])
        if n_new:
            expect_k[i, n : n + n_new], expect_v[i, n : n + n_new] = k_new[i], v_new[i]
    if paged:
        expect_kp = to_paged(expect_k, page, table, num_blocks)
        used = torch.zeros(num_blocks, dtype=torch.bool)
        used[table.flatten().long()] = True
        assert torch.equal(kc[used], expect_kp[used]) and torch.equal(kc[~used], kc_orig[~used])
        assert torch.equal(vc[used], to_paged(expect_v, page, table, num_blocks)[used])
        assert torch.equal(vc[~used], vc_orig[~used])
    else:
        assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


def test_kvcache_paged_equals_contiguous() -> None:
    b, cache_len, hq, hkv, d, page = 2, 32, 2, 1, 4, 8
    q, k_cache, v_cache, k_new, v_new = kv_case(b, cache_len, hq, hkv, d, 3, 3)
    seqlens = torch.tensor([9, 20], dtype=torch.int32)
    table = torch.randperm(8).reshape(b, 4).to(torch.int32)
    kp, vp = to_paged(k_cache, page, table, 8), to_paged(v_cache, page, table, 8)
    kw = dict(cache_seqlens=seqlens, bias=-1.0, scale=0.5, causal=True)
    contiguous = sigmoid_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    paged = sigmoid_attn_with_kvcache(q, kp, vp, k_new, v_new, block_table=table, **kw)
    torch.testing.assert_close(paged, contiguous, rtol=0, atol=0)
