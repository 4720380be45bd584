"""Public API: every validation error, empty/degenerate shapes, defaults, SDPA semantics and the dispatch rule."""

from __future__ import annotations

import math

import pytest
import torch

import sigattn
from sigattn import (
    scaled_dot_product_sigmoid_attention,
    sigmoid_attn_backward,
    sigmoid_attn_func,
    sigmoid_attn_varlen_func,
    sigmoid_attn_with_kvcache,
)
from sigattn.ops import api, reference, validation


def qkv(b=2, sq=5, sk=7, h=4, hk=2, d=8, dtype=torch.float32):
    return (
        torch.randn(b, sq, h, d, dtype=dtype),
        torch.randn(b, sk, hk, d, dtype=dtype),
        torch.randn(b, sk, hk, d, dtype=dtype),
    )


def direct(q, k, v, scale, bias, mask=None):
    """float64 sigmoid attention with an explicit (b|1, h|1, sq, sk) bool mask, written independently."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    bias = torch.as_tensor(bias, dtype=torch.float64).reshape(-1, 1, 1)
    p = torch.sigmoid(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias)
    if mask is not None:
        p = p * mask
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


# --------------------------------------------------------------------------- dense: errors
BAD_DENSE = [
    ("int dtype", lambda q, k, v: ((q.long(), k, v), {}), TypeError, "q must be float16"),
    ("mixed dtype", lambda q, k, v: ((q, k.double(), v), {}), TypeError, "share one dtype"),
    ("not a tensor", lambda q, k, v: ((q.numpy(), k, v), {}), TypeError, "q must be a torch.Tensor"),
    ("rank", lambda q, k, v: ((q[0], k, v), {}), ValueError, "q must have 4 dims"),
    ("head dims", lambda q, k, v: ((q, k[..., :4], v), {}), ValueError, "one head dim"),
    ("gqa", lambda q, k, v: ((q[:, :, :3], k, v), {}), ValueError, "multiple of nheads"),
    ("batch", lambda q, k, v: ((q[:1], k, v), {}), ValueError, "batch size"),
    ("kv len", lambda q, k, v: ((q, k, v[:, :3]), {}), ValueError, "one seqlen_k"),
    ("bias shape", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(3)}), ValueError, "bias tensor must have shape"),
    ("bias type", lambda q, k, v: ((q, k, v), {"bias": "x"}), TypeError, "bias must be a float"),
    ("bias nan", lambda q, k, v: ((q, k, v), {"bias": math.nan}), ValueError, "bias must be finite"),
    ("bias int tensor", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(4, dtype=torch.long)}), TypeError,
     "floating point"),
    ("scale inf", lambda q, k, v: ((q, k, v), {"scale": math.inf}), ValueError, "scale must be finite"),
    ("scale type", lambda q, k, v: ((q, k, v), {"scale": "1"}), TypeError, "scale must be a float"),
    ("window < -1", lambda q, k, v: ((q, k, v), {"window_size": (-2, 0)}), ValueError, "window_size left"),
    ("window len", lambda q, k, v: ((q, k, v), {"window_size": (1,)}), TypeError, "pair"),
    ("window float", lambda q, k, v: ((q, k, v), {"window_size": (1.0, 2)}), TypeError, "must be an int"),
    ("alibi shape", lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(3)}), ValueError, "alibi_slopes must have"),
    ("alibi batch", lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(3, 4)}), ValueError, "(batch, nheads)"),
    ("causal type", lambda q, k, v: ((q, k, v), {"causal": 1}), TypeError, "causal must be a bool"),
    ("impl", lambda q, k, v: ((q, k, v), {"sigmoid_impl": "slow"}), ValueError, "sigmoid_impl must be one of"),
    ("backend", lambda q, k, v: ((q, k, v), {"backend": "cuda"}), ValueError, "backend must be one of"),
    ("deterministic", lambda q, k, v: ((q, k, v), {"deterministic": None}), TypeError, "deterministic"),
]


@pytest.mark.parametrize("make, exc, msg", [c[1:] for c in BAD_DENSE], ids=[c[0] for c in BAD_DENSE])
def test_dense_rejects_bad_input(make, exc, msg):
    args, kwargs = make(*qkv())
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        sigmoid_attn_func(*args, **kwargs)


def test_dense_rejects_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        sigmoid_attn_func(q, k.to("meta"), v.to("meta"))


def test_bias_on_wrong_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bias must be on"):
        sigmoid_attn_func(q, k, v, bias=torch.zeros(4, device="meta"))


def _error_of(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    raise AssertionError("no error raised")


def _warm_memo():
    """Good calls of every checked form with qkv()/sdpa_qkv() shapes, so their signatures are in the memo."""
    q, k, v = qkv()
    sigmoid_attn_func(q, k, v)
    sigmoid_attn_backward(torch.randn_like(q), q, k, v)
    scaled_dot_product_sigmoid_attention(*sdpa_qkv())


@pytest.mark.parametrize("make, exc, msg", [c[1:] for c in BAD_DENSE], ids=[c[0] for c in BAD_DENSE])
def test_check_memo_never_hides_an_error(make, exc, msg):
    """The same error, word for word, with the memo empty, after good calls of the same shapes, and again (a failing
    call is never remembered); sigmoid_attn_backward runs the same dense checks."""
    args, kwargs = make(*qkv())
    validation.clear_checked()
    cold = _error_of(lambda: sigmoid_attn_func(*args, **kwargs))
    assert cold[0] is exc
    _warm_memo()
    assert _error_of(lambda: sigmoid_attn_func(*args, **kwargs)) == cold
    assert _error_of(lambda: sigmoid_attn_func(*args, **kwargs)) == cold
    if isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].is_floating_point():
        do = torch.randn(args[0].shape[:-1] + args[2].shape[-1:])
        assert _error_of(lambda: sigmoid_attn_backward(do.to(args[0].dtype), *args, **kwargs)) == cold


def test_check_memo_keeps_results_and_skips_checks(monkeypatch):
    """Memo hits give the same outputs and gradients as checked calls (tensor values are read per call), without
    running the checks again."""
    q, k, v = qkv(dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    forms = [{}, {"bias": 0.5, "scale": 0.3}, {"bias": bias, "causal": True}, {"alibi_slopes": torch.rand(2, 4)},
             {"window_size": [2, 1], "bias": -1}]
    validation.clear_checked()
    first = [sigmoid_attn_func(q, k, v, **kw) for kw in forms]
    grad = torch.autograd.grad(first[2].sum(), bias)[0]
    calls = []
    real = validation.check_dense_args
    for module in (api, validation):
        monkeypatch.setattr(module, "check_dense_args", lambda *a: calls.append(1) or real(*a))
    again = [sigmoid_attn_func(q, k, v, **kw) for kw in forms]
    assert calls == []
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(again[2].sum(), bias)[0], grad)
    with torch.no_grad():
        bias.add_(1.0)  # a new value under the same signature is read, not cached
    torch.testing.assert_close(sigmoid_attn_func(q, k, v, bias=bias, causal=True),
                               reference.sigmoid_attn(q, k, v, scale=8**-0.5, bias=bias, causal=True))
    v2 = v + 1  # same signature, other values
    torch.testing.assert_close(sigmoid_attn_func(q, k, v2),
                               reference.sigmoid_attn(q, k, v2, scale=8**-0.5, bias=-math.log(7)))
    assert calls == []
    sigmoid_attn_func(q, k, v, bias=0.25)  # a new scalar value is a new signature: checked once
    assert calls == [1]


def test_check_memo_signature_and_bound():
    """No key (every check runs) for tensor subclasses, scalars of other types and windows that are not pairs; the
    memo never holds more than CHECKED_SIZE keys."""
    q, k, v = qkv()
    sig = validation.dense_signature
    assert sig(q, k, v, None, None, False, (-1, -1), None, False, "fast", "auto") is not None
    assert sig(q, k, v, None, None, False, [-1, -1], None, False, "fast", "auto") is not None
    assert sig(torch.nn.Parameter(q), k, v, torch.nn.Parameter(torch.zeros(4)), None, False, (-1, -1), None, False,
               "fast", "auto") is not None

    class Sub(torch.Tensor):
        pass

    assert sig(q.as_subclass(Sub), k, v, None, None, False, (-1, -1), None, False, "fast", "auto") is None
    assert sig(q, k, v, None, torch.tensor(1.0), False, (-1, -1), None, False, "fast", "auto") is None
    assert sig(q, k, v, None, None, False, (-1, -1, 0), None, False, "fast", "auto") is None
    assert sig(q, k, v, None, None, False, (-1, -1), None, False, "fast", ("auto",)) is None
    # True and 1 are one dict key; the types in the key keep them apart (causal=1 must still raise).
    assert sig(q, k, v, None, None, True, (-1, -1), None, False, "fast", "auto") != sig(
        q, k, v, None, None, 1, (-1, -1), None, False, "fast", "auto")
    validation.clear_checked()
    for i in range(validation.CHECKED_SIZE + 3):
        validation.remember(("test", i), ())
        assert len(validation._CHECKED) <= validation.CHECKED_SIZE
    validation.clear_checked()


def test_public_functions_compile_fullgraph():
    """The memo stays out of torch.compile's trace (no key, no graph break): the traced call runs every check."""
    q, k, v = (t.requires_grad_() for t in qkv(h=2, hk=2, d=16))

    def f(q, k, v):
        dense = sigmoid_attn_func(q, k, v, causal=True, bias=-1.0)
        sdpa = scaled_dot_product_sigmoid_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return dense.sum() + sdpa.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


# --------------------------------------------------------------------------- dense: semantics
def test_defaults_scale_and_bias():
    q, k, v = qkv(sk=11)
    out = sigmoid_attn_func(q, k, v)
    torch.testing.assert_close(out.double(), direct(q, k, v, 1 / math.sqrt(8), -math.log(11)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [0.5, torch.tensor(0.25), torch.randn(4)])
def test_bias_forms_and_grad(bias):
    q, k, v = qkv(dtype=torch.float64)
    if isinstance(bias, torch.Tensor):
        bias = bias.double().requires_grad_()
    out = sigmoid_attn_func(q, k, v, bias=bias, scale=0.3)
    torch.testing.assert_close(out, direct(q, k, v, 0.3, bias.detach() if torch.is_tensor(bias) else bias))
    if isinstance(bias, torch.Tensor):
        out.sum().backward()
        assert bias.grad is not None and bias.grad.shape == bias.shape and torch.isfinite(bias.grad).all()


def test_causal_overrides_window_right():
    q, k, v = qkv(sq=6, sk=6, dtype=torch.float64)
    a = sigmoid_attn_func(q, k, v, causal=True, window_size=(2, 5))
    b = sigmoid_attn_func(q, k, v, window_size=(2, 0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(0, 5, 7), (2, 0, 7), (2, 5, 0)], ids=["batch0", "sq0", "sk0"])
def test_empty_shapes(shape):
    b, sq, sk = shape
    q, k, v = qkv(b=b, sq=sq, sk=sk)
    for t in (q, k, v):
        t.requires_grad_()
    out = sigmoid_attn_func(q, k, v)
    assert out.shape == (b, sq, 4, 8)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


def test_seqlen_one():
    q, k, v = qkv(sq=1, sk=1, dtype=torch.float64)
    out = sigmoid_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out, direct(q, k, v, 1 / math.sqrt(8), 0.0))


# --------------------------------------------------------------------------- backward entry point
BACKWARD_FORMS = [
    pytest.param({"causal": True}, 9, 13, "per_head", id="causal-sq<sk-perhead"),
    pytest.param({"causal": True}, 13, 9, "scalar", id="causal-sq>sk-scalar"),
    pytest.param({"window_size": (3, 2)}, 11, 11, "float", id="window-float"),
    pytest.param({"alibi_slopes": "slopes"}, 7, 12, "none", id="alibi-default-bias"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("form", "sq", "sk", "bias_kind"), BACKWARD_FORMS)
def test_backward_entry_point_equals_autograd(backend, form, sq, sk, bias_kind):
    if backend not in sigattn.available_backends("cpu"):
        pytest.skip("the Triton interpreter is not available")
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = qkv(b=2, sq=sq, sk=sk, h=4, hk=2, d=16, dtype=dtype)
    do = torch.randn_like(q)
    bias = {"none": None, "float": -1.5, "scalar": torch.tensor(-1.0, dtype=dtype),
            "per_head": -1.0 + 0.3 * torch.randn(4, dtype=dtype)}[bias_kind]
    kw = {k_: (torch.rand(4) if v_ == "slopes" else v_) for k_, v_ in form.items()}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias_leaf = bias.clone().requires_grad_() if isinstance(bias, torch.Tensor) else bias
    out = sigmoid_attn_func(*leaves, bias=bias_leaf, backend=backend, **kw)
    want = torch.autograd.grad(out, leaves + ([bias_leaf] if isinstance(bias, torch.Tensor) else []), do)
    dq, dk, dv, dbias = sigattn.sigmoid_attn_backward(do, q, k, v, bias=bias, backend=backend, **kw)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for got, w in zip((dq, dk, dv), want):
        assert got.dtype == w.dtype and got.shape == w.shape
        torch.testing.assert_close(got, w, **tol)
    assert dbias is not None and dbias.shape == (4,) and dbias.dtype == (torch.float64 if backend == "reference"
                                                                         else torch.float32)
    if isinstance(bias, torch.Tensor):
        torch.testing.assert_close(dbias.sum() if bias.dim() == 0 else dbias, want[3].to(dbias.dtype), **tol)
    assert sigattn.sigmoid_attn_backward(do, q, k, v, bias=bias, backend=backend, need_dbias=False, **kw)[3] is None


def test_backward_entry_point_empty_and_errors():
    q, k, v = qkv(sk=0)
    dq, dk, dv, dbias = sigattn.sigmoid_attn_backward(torch.randn_like(q), q, k, v)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape
    assert dbias is not None and torch.equal(dbias, torch.zeros(4))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="do must be shaped like the output"):
        sigattn.sigmoid_attn_backward(q[:, :3], q, k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        sigattn.sigmoid_attn_backward(q.double(), q, k, v)


# --------------------------------------------------------------------------- dispatch
def test_available_backends_cpu():
    backends = sigattn.available_backends("cpu")
    assert backends[-1] == "reference"
    assert ("triton" in backends) == (api._triton_unavailable(torch.device("cpu")) is None)


def test_auto_on_cpu_uses_reference(monkeypatch):
    calls = []
    real = reference.sigmoid_attn
    monkeypatch.setattr(reference, "sigmoid_attn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sigmoid_attn_func(*qkv())
    assert calls == [1]


def test_explicit_triton_never_falls_back():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call"):
        sigmoid_attn_func(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call"):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        sigmoid_attn_varlen_func(q[0], k[0, :5], v[0, :5], cu, cu, 5, 5, backend="triton")


def test_triton_without_interpreter_is_explained(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sigmoid_attn_func(*qkv(), backend="triton")


# --------------------------------------------------------------------------- varlen
def packed(lens_q, lens_k, h=4, hk=2, d=8):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), h, d)
    k, v = torch.randn(sum(lens_k), hk, d), torch.randn(sum(lens_k), hk, d)
    return q, k, v, cu_q, cu_k


def test_varlen_matches_dense_per_sequence_with_default_bias():
    lens_q, lens_k = [3, 0, 5, 4], [6, 2, 5, 0]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k)
    out = sigmoid_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True)
    assert out.shape == q.shape
    for i in range(4):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        want = sigmoid_attn_func(q[None, qs], k[None, ks], v[None, ks], causal=True)[0]
        torch.testing.assert_close(out[qs], want)


BAD_VARLEN = [
    ("cu dtype", lambda a: a | {"cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q must be int32"),
    ("cu decreasing", lambda a: a | {"cu_seqlens_k": torch.tensor([0, 7, 6, 11], dtype=torch.int32)}, ValueError,
     "non-decreasing"),
    ("cu length", lambda a: a | {"cu_seqlens_k": torch.tensor([0, 11], dtype=torch.int32)}, ValueError,
     "same length"),
    ("cu last", lambda a: a | {"cu_seqlens_q": torch.tensor([0, 1, 2, 3], dtype=torch.int32)}, ValueError,
     r"cu_seqlens_q\[-1\] must equal"),
    ("cu start", lambda a: a | {"cu_seqlens_q": torch.tensor([1, 1, 2, 9], dtype=torch.int32)}, ValueError,
     "must start at 0"),
    ("cu rank", lambda a: a | {"cu_seqlens_q": a["cu_seqlens_q"][None]}, ValueError, "shape \\(batch \\+ 1,\\)"),
    ("max_seqlen small", lambda a: a | {"max_seqlen_k": 2}, ValueError, "max_seqlen_k \\(2\\) is smaller"),
    ("max_seqlen type", lambda a: a | {"max_seqlen_q": 2.0}, TypeError, "max_seqlen_q must be an int"),
    ("rank", lambda a: a | {"q": a["q"][None]}, ValueError, "q must have 3 dims"),
    ("alibi batch", lambda a: a | {"alibi_slopes": torch.ones(2, 4)}, ValueError, "alibi_slopes must have"),
]


@pytest.mark.parametrize("edit, exc, msg", [c[1:] for c in BAD_VARLEN], ids=[c[0] for c in BAD_VARLEN])
def test_varlen_rejects_bad_input(edit, exc, msg):
    q, k, v, cu_q, cu_k = packed([3, 2, 4], [6, 0, 5])
    a = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=6)
    a = edit(a)
    kw = {n: a.pop(n) for n in list(a) if n not in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k",
                                                      "max_seqlen_q", "max_seqlen_k")}
    with pytest.raises(exc, match=msg):
        sigmoid_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                                 a["max_seqlen_k"], **kw)


# --------------------------------------------------------------------------- kv cache
def cache_args(b=2, sq=1, new=1, cap=16, h=4, hk=2, d=8):
    return dict(
        q=torch.randn(b, sq, h, d), k_cache=torch.randn(b, cap, hk, d), v_cache=torch.randn(b, cap, hk, d),
        k=torch.randn(b, new, hk, d), v=torch.randn(b, new, hk, d),
        cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)[:b], bias=-2.0,
    )


def test_kvcache_appends_and_attends():
    a = cache_args(sq=2, new=2)
    kc0 = a["k_cache"].clone()
    out = sigmoid_attn_with_kvcache(**a, causal=True)
    for bi, n in enumerate([3, 9]):
        assert torch.equal(a["k_cache"][bi, n:n + 2], a["k"][bi])
        assert torch.equal(a["k_cache"][bi, :n], kc0[bi, :n])
        kk, vv = a["k_cache"][bi:bi + 1, : n + 2], a["v_cache"][bi:bi + 1, : n + 2]
        want = sigmoid_attn_func(a["q"][bi:bi + 1], kk, vv, bias=-2.0, causal=True)
        torch.testing.assert_close(out[bi:bi + 1], want)


def paged_args():
    a = cache_args()
    a["k_cache"], a["v_cache"] = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    a["block_table"] = torch.tensor([[5, 0, 1, 2], [4, 3, 2, 1]], dtype=torch.int32)
    return a


BAD_CACHE = [
    ("bias missing", lambda a: a | {"bias": None}, ValueError, "bias is required"),
    ("capacity", lambda a: a | {"cache_seqlens": torch.tensor([3, 16], dtype=torch.int32)}, ValueError,
     "must fit in the cache"),
    ("negative len", lambda a: a | {"cache_seqlens": torch.tensor([-1, 2], dtype=torch.int32)}, ValueError, ">= 0"),
    ("seqlens dtype", lambda a: a | {"cache_seqlens": torch.tensor([3, 9])}, TypeError, "cache_seqlens must be int32"),
    ("seqlens shape", lambda a: a | {"cache_seqlens": torch.tensor([3], dtype=torch.int32)}, ValueError,
     "shape \\(batch,\\)"),
    ("k without v", lambda a: a | {"v": None}, ValueError, "given together"),
    ("k heads", lambda a: a | {"k": a["k"][:, :, :1], "v": a["v"][:, :, :1]}, ValueError, "nheads_k, headdim"),
    ("cache batch", lambda a: a | {"k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]}, ValueError,
     "batch size"),
    ("cache mismatch", lambda a: a | {"v_cache": a["v_cache"][:, :8]}, ValueError, "one shape"),
]


@pytest.mark.parametrize("edit, exc, msg", [c[1:] for c in BAD_CACHE], ids=[c[0] for c in BAD_CACHE])
def test_kvcache_rejects_bad_input(edit, exc, msg):
    with pytest.raises(exc, match=msg):
        sigmoid_attn_with_kvcache(**edit(cache_args()))


BAD_PAGED = [
    ("table dtype", lambda a: a | {"block_table": a["block_table"].long()}, TypeError, "block_table must be int32"),
    ("table batch", lambda a: a | {"block_table": a["block_table"][:1]}, ValueError, "block_table must have shape"),
    ("table ids", lambda a: a | {"block_table": torch.tensor([[5, 0, 1, 2], [4, 9, 2, 1]], dtype=torch.int32)},
     ValueError, "outside the cache"),
    ("table capacity", lambda a: a | {"block_table": a["block_table"][:, :2]}, ValueError, "must fit in the cache"),
]


@pytest.mark.parametrize("edit, exc, msg", [c[1:] for c in BAD_PAGED], ids=[c[0] for c in BAD_PAGED])
def test_paged_rejects_bad_input(edit, exc, msg):
    with pytest.raises(exc, match=msg):
        sigmoid_attn_with_kvcache(**edit(paged_args()))


def test_paged_matches_contiguous():
    a = paged_args()
    out = sigmoid_attn_with_kvcache(**a)
    for bi, n in enumerate([3, 9]):
        pos = torch.arange(n + 1)
        blocks = a["block_table"][bi][pos // 4]
        kk = a["k_cache"][blocks, pos % 4][None]
        vv = a["v_cache"][blocks, pos % 4][None]
        torch.testing.assert_close(out[bi:bi + 1], sigmoid_attn_func(a["q"][bi:bi + 1], kk, vv, bias=-2.0))


# --------------------------------------------------------------------------- SDPA form
def sdpa_qkv(b=2, h=4, hk=4, sq=6, sk=6, d=8):
    return torch.randn(b, h, sq, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)


def test_sdpa_form_matches_direct_with_bool_and_float_masks():
    q, k, v = sdpa_qkv(sk=9)
    mask = torch.rand(6, 9) > 0.3
    out = scaled_dot_product_sigmoid_attention(q, k, v, attn_mask=mask, bias=-1.0)
    want = direct(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1 / math.sqrt(8), -1.0, mask)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    fmask = torch.where(mask, 0.0, -math.inf)
    out_f = scaled_dot_product_sigmoid_attention(q, k, v, attn_mask=fmask, bias=-1.0)
    torch.testing.assert_close(out_f, out)


def test_sdpa_form_causal_is_top_left():
    q, k, v = sdpa_qkv(sq=3, sk=7)
    out = scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True)
    mask = torch.ones(3, 7, dtype=torch.bool).tril()
    want = direct(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1 / math.sqrt(8), -math.log(7), mask)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_sdpa_form_square_causal_uses_dense_path():
    q, k, v = sdpa_qkv()
    out = scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True)
    want = sigmoid_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want)


def test_sdpa_form_dropout_zeroes_weights():
    q, k, v = sdpa_qkv(sq=64, sk=64)
    v = torch.ones_like(v)
    out = scaled_dot_product_sigmoid_attention(q, k, v, dropout_p=0.5, bias=100.0)
    # weights are all sigmoid(big) = 1 before dropout: each output is 2 * (number of kept keys)
    kept = out[..., 0] / 2
    assert torch.allclose(kept, kept.round()) and 0.4 < kept.mean().item() / 64 < 0.6


BAD_SDPA = [
    ("gqa flag", lambda q, k, v: ((q, k[:, :2], v[:, :2]), {}), ValueError, "enable_gqa=True"),
    ("mask and causal", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(6, 6, dtype=torch.bool),
                                                     "is_causal": True}), ValueError, "cannot be used together"),
    ("mask dtype", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(6, 6, dtype=torch.float64)}), TypeError,
     "attn_mask must be bool or query's dtype"),
    ("mask shape", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(5, 6, dtype=torch.bool)}), ValueError,
     "attn_mask must broadcast"),
    ("dropout", lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), ValueError, "dropout_p must be"),
    ("rank", lambda q, k, v: ((q[0], k, v), {}), ValueError, "query must have 4 dims"),
]


# The dense form's checks, reached through the SDPA-style function: the messages name q, k, v (as they did when it
# called sigmoid_attn_func) where the head checks fail, and query, key, value where its own checks fail.
BAD_SDPA_DENSE = [
    ("int dtype", lambda q, k, v: ((q.long(), k, v), {}), TypeError,
     "query must be float16, bfloat16, float32 or float64; got int64"),
    ("mixed dtype", lambda q, k, v: ((q, k.double(), v), {}), TypeError,
     "query and key must share one dtype; got query float32, key float64"),
    ("not a tensor", lambda q, k, v: ((q, k.numpy(), v), {}), TypeError,
     "key must be a torch.Tensor of shape (batch, nheads_k, seqlen_k, headdim); got ndarray"),
    ("head dims", lambda q, k, v: ((q, k[..., :4], v), {}), ValueError,
     "q, k and v must share one head dim; got q 8, k 4, v 8"),
    ("head dim 0", lambda q, k, v: ((q[..., :0], k[..., :0], v[..., :0]), {}), ValueError,
     "q head dim must be positive; got shape (2, 6, 4, 0)"),
    ("kv heads", lambda q, k, v: ((q, k, v[:, :2]), {"enable_gqa": True}), ValueError,
     "k and v must have the same number of heads; got 4 and 2"),
    ("gqa multiple", lambda q, k, v: ((q[:, :3], k[:, :2], v[:, :2]), {"enable_gqa": True}), ValueError,
     "nheads of q (3) must be a positive multiple of nheads of k/v (2) (GQA/MQA rule)"),
    ("batch", lambda q, k, v: ((q, k[:1], v[:1]), {}), ValueError,
     "query, key and value must share one batch size; got 2, 1, 1"),
    ("bias shape", lambda q, k, v: ((q, k, v), {"bias": torch.zeros(3)}), ValueError,
     "bias tensor must have shape () or (nheads,) = (4,); got (3,)"),
    ("bias nan", lambda q, k, v: ((q, k, v), {"bias": math.nan}), ValueError, "bias must be finite; got nan"),
    ("scale type", lambda q, k, v: ((q, k, v), {"scale": "1"}), TypeError, "scale must be a float or None; got str"),
    ("causal type", lambda q, k, v: ((q, k, v), {"is_causal": 1}), TypeError, "is_causal must be a bool; got int"),
    ("gqa type", lambda q, k, v: ((q, k, v), {"enable_gqa": 1}), TypeError, "enable_gqa must be a bool; got int"),
    ("dropout type", lambda q, k, v: ((q, k, v), {"dropout_p": True}), ValueError,
     "dropout_p must be a float in [0, 1); got True"),
    ("impl", lambda q, k, v: ((q, k, v), {"sigmoid_impl": "slow"}), ValueError,
     "sigmoid_impl must be one of 'fast', 'accurate'; got 'slow'"),
    ("backend", lambda q, k, v: ((q, k, v), {"backend": "cuda"}), ValueError,
     "backend must be one of 'auto', 'reference', 'triton'; got 'cuda'"),
]


@pytest.mark.parametrize("make, exc, msg", [c[1:] for c in BAD_SDPA_DENSE], ids=[c[0] for c in BAD_SDPA_DENSE])
def test_sdpa_form_dense_errors_word_for_word(make, exc, msg):
    """Exact messages, with the memo empty and after good calls of the same shapes (and again)."""
    args, kwargs = make(*sdpa_qkv())
    validation.clear_checked()
    assert _error_of(lambda: scaled_dot_product_sigmoid_attention(*args, **kwargs)) == (exc, msg)
    _warm_memo()
    for _ in range(2):
        assert _error_of(lambda: scaled_dot_product_sigmoid_attention(*args, **kwargs)) == (exc, msg)


def test_sdpa_form_checks_once_and_matches_dense(monkeypatch):
    """The dense SDPA-style call runs the dense checks once (not again through sigmoid_attn_func), once per
    signature, and returns sigmoid_attn_func's result, transposed."""
    q, k, v = sdpa_qkv(hk=2)
    validation.clear_checked()
    calls = []
    real = validation.check_dense_args
    for module in (api, validation):
        monkeypatch.setattr(module, "check_dense_args", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(api, "sigmoid_attn_func", None)  # never called from here
    outs = [scaled_dot_product_sigmoid_attention(q, k, v, enable_gqa=True, is_causal=True, bias=-0.5)
            for _ in range(3)]
    assert calls == [1]
    want = sigmoid_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, bias=-0.5)
    for out in outs:
        assert torch.equal(out, want.transpose(1, 2))


@pytest.mark.parametrize("make, exc, msg", [c[1:] for c in BAD_SDPA], ids=[c[0] for c in BAD_SDPA])
def test_sdpa_form_rejects_bad_input(make, exc, msg):
    args, kwargs = make(*sdpa_qkv())
    with pytest.raises(exc, match=msg):
        scaled_dot_product_sigmoid_attention(*args, **kwargs)


def test_sdpa_form_gqa_and_masked_triton_raises():
    q, k, v = sdpa_qkv(hk=2)
    out = scaled_dot_product_sigmoid_attention(q, k, v, enable_gqa=True)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="reference only"):
        scaled_dot_product_sigmoid_attention(q, k, v, enable_gqa=True, dropout_p=0.1, backend="triton")


def test_triton_refuses_head_dim_below_16():
    q, k, v = qkv(d=8)
    with pytest.raises(ValueError, match="head dim 8"):
        sigmoid_attn_func(q, k, v, backend="triton")


def test_empty_result_is_exact_zero_even_for_non_finite_inputs():
    q = torch.full((1, 70000, 1, 16), 60000.0, dtype=torch.float16)  # its sum overflows fp16
    k = v = torch.empty(1, 0, 1, 16, dtype=torch.float16)
    bias = torch.tensor(-1.0, requires_grad=True)
    q.requires_grad_()
    out = sigmoid_attn_func(q, k, v, bias=bias)
    assert torch.equal(out, torch.zeros_like(out))
    out.float().sum().backward()
    assert torch.equal(bias.grad, torch.zeros(())) and torch.equal(q.grad, torch.zeros_like(q))


def test_empty_call_still_checks_the_explicit_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sigmoid_attn_func(*qkv(b=0), backend="triton")


def test_kvcache_empty_batch():
    a = cache_args()
    a = {n: (t[:0] if isinstance(t, torch.Tensor) else t) for n, t in a.items()}
    out = sigmoid_attn_with_kvcache(**a)
    assert out.shape == (0, 1, 4, 8)


def test_sdpa_form_checks_batch_and_lengths_on_every_path():
    q, k, v = sdpa_qkv()
    mask = torch.ones(6, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="one batch size"):
        scaled_dot_product_sigmoid_attention(q, k[:1], v[:1], attn_mask=mask)
    with pytest.raises(ValueError, match="one seqlen_k"):
        scaled_dot_product_sigmoid_attention(q, k, v[:, :, :5], attn_mask=mask)


def test_learnable_alibi_slopes_go_to_the_reference():
    q, k, v = qkv(d=16)
    slopes = torch.rand(4, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes that require grad"):
        sigmoid_attn_func(q, k, v, alibi_slopes=slopes, backend="triton")
    sigmoid_attn_func(q, k, v, alibi_slopes=slopes).sum().backward()
    assert slopes.grad is not None and torch.isfinite(slopes.grad).all()


def test_cu_seqlens_read_once_per_tensor_version(monkeypatch):
    """Every layer of a model passes the same cu_seqlens: its values are read from the device once per tensor version
    (a sync each), and an in-place change made through PyTorch is read again (and validated again)."""
    from sigattn.ops import validation

    reads = []
    real = validation.cu_seqlens_values

    def counting(cu):
        hit = validation._CU_VALUES.get(id(cu))
        fresh = hit is None or hit[0]() is not cu or hit[1] != validation._version_of(cu)
        reads.append(fresh)
        return real(cu)

    monkeypatch.setattr(validation, "cu_seqlens_values", counting)
    q, k, v = (torch.randn(11, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    want = sigmoid_attn_varlen_func(q, k, v, cu, cu, 7, 7)
    for _ in range(3):
        torch.testing.assert_close(sigmoid_attn_varlen_func(q, k, v, cu, cu, 7, 7), want, rtol=0, atol=0)
    assert reads == [True, False, False, False]
    cu[1] = 3  # in place: a new version, read and validated again
    other = sigmoid_attn_varlen_func(q, k, v, cu, cu, 7, 7)
    assert reads[-1] is True and not torch.equal(other, want)
    cu[2] = 2  # now decreasing: the cached values must not hide it
    with pytest.raises(ValueError, match="non-decreasing"):
        sigmoid_attn_varlen_func(q, k, v, cu, cu, 7, 7)
    # A new tensor with the same values is a new entry (read once); freed tensors leave the cache.
    before = len(validation._CU_VALUES)
    fresh = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    sigmoid_attn_varlen_func(q, k, v, fresh, fresh, 7, 7)
    assert reads[-1] is True and len(validation._CU_VALUES) == before + 1
    del fresh
    import gc

    gc.collect()
    assert len(validation._CU_VALUES) == before


def test_cu_seqlens_of_inference_tensors_are_read_every_call():
    from sigattn.ops import validation

    with torch.inference_mode():
        cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert validation._version_of(cu) is None
    assert validation.cu_seqlens_values(cu) == (0, 3, 5)
    assert id(cu) not in validation._CU_VALUES
