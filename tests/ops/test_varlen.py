"""Varlen (packed sequences) Triton kernels against the float64 reference and against the dense kernels per sequence."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sigattn import sigmoid_attn_varlen_func  # noqa: E402
from sigattn.ops import custom_ops  # noqa: E402
from sigattn.ops.backward import sigmoid_attn_bwd, sigmoid_attn_varlen_bwd  # noqa: E402
from sigattn.ops.forward import Varlen, sigmoid_attn_fwd, sigmoid_attn_varlen_fwd  # noqa: E402
from sigattn.ops.reference import sigmoid_attn_varlen  # noqa: E402
from tests.ops.test_kernels import max_err, poisoned_neighbour_check, torch_lowp  # noqa: E402


def cu(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def pack(lens_q, lens_k, hq, hkv, d, dtype, device, alibi=False, per_seq_bias=False):
    """Packed q, k, v, dO; bias (Hq,) (or (B, Hq)) around each sequence's -log n; slopes (B, Hq) or None."""
    b = len(lens_q)
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=device)
    do = torch.randn_like(q)
    mean = -math.log(max(max(lens_k, default=2), 2))
    bias = mean + torch.randn((b, hq) if per_seq_bias else (hq,), dtype=torch.float32, device=device)
    slopes = torch.rand(b, hq, dtype=torch.float32, device=device) * 0.5 if alibi else None
    varlen = Varlen(cu(lens_q, device), cu(lens_k, device), max(lens_q, default=0), max(lens_k, default=0))
    return q, k, v, do, bias, slopes, varlen


def run_varlen(q, k, v, do, bias, slopes, varlen, scale, causal, window, deterministic, impl="accurate", **kw):
    out = sigmoid_attn_varlen_fwd(q, k, v, varlen, bias, scale, causal, *window, slopes, impl,
                                  use_tma=kw.get("use_tma"))
    return [out, *sigmoid_attn_varlen_bwd(do, q, k, v, varlen, bias, scale, causal, *window, slopes, deterministic,
                                          impl, **kw)]


def per_sequence(fn, lens_q, lens_k, tensors_q, tensors_k, bias):
    """fn(i, q-side slices, k-side slices, bias_i) per sequence with keys; outputs concatenated along tokens
    (q-side results first, then k-side), bias gradients summed. Sequences without queries or keys give zeros."""
    cq, ck = [0, *torch.tensor(lens_q).cumsum(0).tolist()], [0, *torch.tensor(lens_k).cumsum(0).tolist()]
    outs = []
    for i in range(len(lens_q)):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        b_i = bias[i] if bias.dim() == 2 else bias
        outs.append(fn(i, [t[qs] for t in tensors_q], [t[ks] for t in tensors_k], b_i))
    return outs


def lowp_grads(q, k, v, do, bias, slopes, lens_q, lens_k, scale, causal, window):
    """The same math done by PyTorch in the inputs' dtype, sequence by sequence: the error budget's yardstick."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = bias.to(q.dtype).detach().clone().requires_grad_()

    def one(i, qs, ks, b_i):
        if qs[0].shape[0] == 0 or ks[0].shape[0] == 0:
            return torch.zeros_like(qs[0])
        s = None if slopes is None else slopes[i : i + 1]
        return torch_lowp(qs[0][None], ks[0][None], ks[1][None], b_i, scale, causal, window, s)[0]

    out = torch.cat(per_sequence(one, lens_q, lens_k, [leaves[0]], leaves[1:], b))
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves] + [b.grad]


def check_varlen(lens_q, lens_k, hq, hkv, d, dtype, device, causal=False, window=(-1, -1), alibi=False,
                 per_seq_bias=False, deterministic=False, factor=3.0, impl="accurate", **kw):
    """Outputs and gradients (q, k, v, bias) within the dense tests' budget of the float64 reference:
    factor x PyTorch's own error in `dtype` + a few ulps per summed term."""
    q, k, v, do, bias, slopes, varlen = pack(lens_q, lens_k, hq, hkv, d, dtype, device, alibi, per_seq_bias)
    scale = d**-0.5
    win = (window[0], 0 if causal else window[1])
    ours = run_varlen(q, k, v, do, bias, slopes, varlen, scale, causal, window, deterministic, impl, **kw)

    leaves = [t.double().requires_grad_() for t in (q, k, v, bias)]
    ref_out = sigmoid_attn_varlen(*leaves[:3], varlen.cu_seqlens_q, varlen.cu_seqlens_k, 0, 0, scale=scale,
                                  bias=leaves[3] if not per_seq_bias else None, causal=causal, window_size=win,
                                  alibi_slopes=None if slopes is None else slopes.double())
    if per_seq_bias:  # the reference's varlen form takes one bias: run it sequence by sequence
        def one(i, qs, ks, b_i):
            return sigmoid_attn_varlen(qs[0], ks[0], ks[1], cu([qs[0].shape[0]], device), cu([ks[0].shape[0]], device),
                                       0, 0, scale=scale, bias=b_i, causal=causal, window_size=win,
                                       alibi_slopes=None if slopes is None else slopes[i : i + 1].double())
        ref_out = torch.cat(per_sequence(one, lens_q, lens_k, leaves[:1], leaves[1:3], leaves[3]))
    ref = [ref_out.detach(), *torch.autograd.grad(ref_out, leaves, do.double())]
    lowp = lowp_grads(q, k, v, do, bias, slopes, lens_q, lens_k, scale, causal, win)

    names = ["out", "dq", "dk", "dv", "dbias"]
    g = hq // hkv
    terms = [max(lens_k), max(lens_k), max(lens_q) * g, max(lens_q) * g, sum(a * b for a, b in zip(lens_q, lens_k))]
    for name, x, r, lp, n in zip(names, ours, ref, lowp, terms):
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name}: non-finite (unwritten) entries"
        atol = torch.finfo(dtype).eps * r.abs().max().item() * (2 + math.sqrt(max(n, 1)))
        err, budget = max_err(x, r), factor * max_err(lp, r) + atol
        assert err <= budget, f"{name}: max err {err:.3e} > {budget:.3e} (torch {dtype} err {max_err(lp, r):.3e})"


CASES = [
    # lens_q, lens_k, hq, hkv, d, causal, window, alibi, per_seq_bias
    ([17, 0, 33, 1], [17, 5, 33, 9], 2, 1, 32, False, (-1, -1), False, False),  # a sequence without queries
    ([17, 40, 5], [9, 0, 23], 4, 2, 16, True, (-1, -1), False, True),  # without keys; sq > sk and sq < sk
    ([20, 31, 1], [20, 31, 45], 2, 2, 32, True, (7, -1), True, False),  # causal + window + alibi per sequence
    ([33, 12], [18, 33], 4, 1, 48, False, (5, 3), False, True),  # padded head dim, MQA, two-sided window
]


@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,d,causal,window,alibi,per_seq_bias", CASES)
@pytest.mark.parametrize("dtype,deterministic", [(torch.float16, False), (torch.float32, True)])
def test_varlen_matches_reference(lens_q, lens_k, hq, hkv, d, causal, window, alibi, per_seq_bias, dtype,
                                  deterministic, device):
    """deterministic=False: fused dK/dV/dQ kernel with dQ atomics; True: the two atomic-free kernels."""
    check_varlen(lens_q, lens_k, hq, hkv, d, dtype, device, causal, window, alibi, per_seq_bias, deterministic)


@pytest.mark.parametrize("use_tma", [False, True])
def test_varlen_equals_dense_per_sequence(use_tma, device):
    """Each sequence of the pack gives what the dense kernels give on it alone (deterministic backward)."""
    lens_q, lens_k = [19, 0, 34, 3], [19, 6, 20, 0]
    q, k, v, do, bias, slopes, varlen = pack(lens_q, lens_k, 4, 2, 16, torch.float32, device, alibi=True)
    ours = run_varlen(q, k, v, do, bias, slopes, varlen, 0.3, True, (-1, 0), True, use_tma=use_tma)

    def one(i, qs, ks, b_i):
        s = slopes[i : i + 1]
        args = (b_i, 0.3, True, -1, 0, s)
        o = sigmoid_attn_fwd(qs[0][None], ks[0][None], ks[1][None], *args, "accurate", use_tma=use_tma)
        g = sigmoid_attn_bwd(qs[1][None], qs[0][None], ks[0][None], ks[1][None], *args, True, "accurate",
                             use_tma=use_tma)
        return [o[0], g[0][0], g[1][0], g[2][0], g[3]]

    parts = per_sequence(one, lens_q, lens_k, [q, do], [k, v], bias)
    want = [torch.cat([p[j] for p in parts]) for j in range(4)] + [sum(p[4] for p in parts)]
    for name, x, y in zip(["out", "dq", "dk", "dv", "dbias"], ours, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_tma", [False, True])
def test_nonfinite_neighbour_sequence_does_not_leak(use_tma, device):
    """inf/NaN in one sequence's rows leaves every other sequence exact: boundary TMA tiles of the sequence before
    it read those rows, and must zero them (0 * inf = NaN)."""
    lens_q, lens_k = [21, 13, 18], [19, 14, 11]
    q, k, v, do, bias, slopes, varlen = pack(lens_q, lens_k, 2, 1, 16, torch.float32, device, alibi=True)
    args = (varlen, bias, 0.25, False, -1, -1, slopes)

    def fwd(q_, k_, v_):
        return sigmoid_attn_varlen_fwd(q_, k_, v_, *args, "accurate", use_tma=use_tma)

    def bwd(do_, q_, k_, v_):
        return sigmoid_attn_varlen_bwd(do_, q_, k_, v_, *args, True, "accurate", use_tma=use_tma)

    cq, ck = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    keep_q = torch.ones(cq[-1], dtype=torch.bool, device=device)
    keep_k = torch.ones(ck[-1], dtype=torch.bool, device=device)
    keep_q[cq[1]:cq[2]] = False
    keep_k[ck[1]:ck[2]] = False
    poisoned_neighbour_check(q, k, v, do, (slice(cq[1], cq[2]), slice(ck[1], ck[2])), (keep_q, keep_k), fwd, bwd)


def test_varlen_fused_dq_forms_agree(device):
    """The atomic-dQ form (pointer atomics on the interpreter) agrees with the deterministic one."""
    q, k, v, do, bias, slopes, varlen = pack([17, 30], [25, 30], 4, 2, 16, torch.float32, device)
    det = run_varlen(q, k, v, do, bias, slopes, varlen, 0.25, True, (-1, 0), True)
    fused = run_varlen(q, k, v, do, bias, slopes, varlen, 0.25, True, (-1, 0), False, fused_dq=True)
    for x, y in zip(det, fused):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- public function and custom ops


@pytest.mark.parametrize("bias", [None, -1.5, "tensor", "scalar-tensor"])
def test_api_triton_matches_reference(bias, device):
    """sigmoid_attn_varlen_func on the kernels: per-sequence default bias, float, (nheads,) and () tensors with
    their gradients, against the reference backend."""
    lens_q, lens_k = [9, 0, 17], [12, 4, 17]
    q, k, v, do, _, _, varlen = pack(lens_q, lens_k, 4, 2, 16, torch.float32, device)
    if bias == "tensor":
        bias = torch.randn(4, device=device) - 2
    elif bias == "scalar-tensor":
        bias = torch.tensor(-2.0, device=device)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        b = bias.clone().requires_grad_() if isinstance(bias, torch.Tensor) else bias
        out = sigmoid_attn_varlen_func(*leaves, varlen.cu_seqlens_q, varlen.cu_seqlens_k, 40, 33, bias=b,
                                       causal=True, sigmoid_impl="accurate", backend=backend)
        wrt = leaves + ([b] if isinstance(b, torch.Tensor) else [])
        results.append([out, *torch.autograd.grad(out, wrt, do)])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_api_triton_empty_packs(device):
    """No keys anywhere, or no queries: zeros, connected to autograd."""
    q, k, v, *_ = pack([3, 2], [0, 0], 2, 1, 16, torch.float32, device)
    cq, ck = cu([3, 2], device), cu([0, 0], device)
    k.requires_grad_()
    out = sigmoid_attn_varlen_func(q, k, v, cq, ck, 3, 0, backend="triton")
    assert out.shape == q.shape and (out == 0).all()
    q0 = torch.zeros(0, 2, 16, device=device)
    out = sigmoid_attn_varlen_func(q0, k, v, cu([0, 0], device), ck, 0, 0, backend="triton")
    assert out.shape == q0.shape


def test_default_bias_cached_under_inference_mode_serves_training(device):
    """The default per-sequence bias is cached per packing; built first under inference_mode, the cached tensor must
    still be a normal one, or the next training call could not save it for backward."""
    lens = [3, 5]  # a packing no other test uses, so the first call below builds the cache entry
    q, k, v, *_ = pack(lens, lens, 2, 1, 16, torch.float32, device)
    c = cu(lens, device)
    with torch.inference_mode():
        want = sigmoid_attn_varlen_func(q, k, v, c, c, 5, 5, backend="triton")
    qg = q.clone().requires_grad_()
    out = sigmoid_attn_varlen_func(qg, k, v, c, c, 5, 5, backend="triton")
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    (dq,) = torch.autograd.grad(out.sum(), qg)
    assert torch.isfinite(dq).all()


def test_api_triton_raises_for_what_it_cannot_serve(device):
    q, k, v, *_ = pack([5], [5], 2, 1, 16, torch.float64, device)
    c = cu([5], device)
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call: dtype"):
        sigmoid_attn_varlen_func(q, k, v, c, c, 5, 5, backend="triton")
    q, k, v, *_ = pack([5], [5], 2, 1, 8, torch.float32, device)
    with pytest.raises(ValueError, match="head dim 8"):
        sigmoid_attn_varlen_func(q, k, v, c, c, 5, 5, backend="triton")
    slopes = torch.ones(2, device=device, requires_grad=True)
    q, k, v, *_ = pack([5], [5], 2, 1, 16, torch.float32, device)
    with pytest.raises(ValueError, match="alibi_slopes that require grad"):
        sigmoid_attn_varlen_func(q, k, v, c, c, 5, 5, alibi_slopes=slopes, backend="triton")


def _op_args(device, alibi=False):
    lens_q, lens_k = [7, 0, 12], [9, 3, 12]
    q, k, v, do, bias, slopes, varlen = pack(lens_q, lens_k, 4, 2, 16, torch.float32, device, alibi,
                                             per_seq_bias=True)
    return q, k, v, do, bias, slopes, varlen


@pytest.mark.parametrize("alibi", [False, True])
def test_opcheck(alibi, device):
    q, k, v, do, bias, slopes, vl = _op_args(device, alibi)
    args = (q, k, v, vl.cu_seqlens_q, vl.cu_seqlens_k, vl.max_seqlen_q, vl.max_seqlen_k, bias, 0.25, True, -1, 0,
            slopes, True, "accurate")
    torch.library.opcheck(torch.ops.sigattn.varlen_fwd.default, args)
    bwd_args = (do, *args[:-2], False, "fast", True)
    torch.library.opcheck(torch.ops.sigattn.varlen_bwd.default, bwd_args)


def test_torch_compile_fullgraph(device):
    """Forward and backward compile to one graph each, with no graph break, and agree with eager."""
    q, k, v, _, bias, slopes, vl = _op_args(device, alibi=True)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]

    def f(q, k, v, bias):
        o = custom_ops.sigmoid_attn_varlen(q, k, v, vl.cu_seqlens_q, vl.cu_seqlens_k, vl.max_seqlen_q,
                                           vl.max_seqlen_k, bias, 0.25, True, -1, 0, slopes, True, "accurate")
        return (o * o).sum()

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- GPU only: bf16, real tiles, 16k tokens


def mixed_lengths(total: int, seed: int) -> list[int]:
    """Lengths 1..4k (a third short, a few of length 0) summing to `total`."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        r = torch.rand((), generator=g).item()
        lens.append(0 if r < 0.05 else int(torch.randint(1, 300 if r < 0.35 else 4096, (), generator=g)))
    lens[-1] -= sum(lens) - total
    return lens


@pytest.mark.bigmem
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_bf16_mixed_16k(d, causal, deterministic, device):
    """16k packed tokens of mixed lengths (0 .. 4k), H*d = 2048 (GQA 2), bf16, fast sigmoid, both backward forms."""
    lens = mixed_lengths(16384, seed=d + causal)
    check_varlen(lens, lens, 2048 // d, 1024 // d, d, torch.bfloat16, device, causal=causal, impl="fast",
                 deterministic=deterministic, fused_dq=not deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 96, 256])
def test_gpu_bf16_head_dims_cross_lengths(d, device):
    """Other head dims (padded 96: rank-4 TMA view; 256), seqlen_q != seqlen_k per sequence, window + alibi."""
    lens_q, lens_k = [300, 0, 129, 1, 1000], [280, 64, 0, 300, 1000]
    check_varlen(lens_q, lens_k, 4, 2, d, torch.bfloat16, device, causal=True, window=(200, -1), alibi=True,
                 per_seq_bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_nonfinite_neighbour_sequence_does_not_leak(deterministic, d, device):
    """inf/NaN planted in one sequence: the real TMA boundary tiles of the previous sequence (Hopper) stay exact."""
    lens = [300, 260, 333]
    q, k, v, do, bias, slopes, varlen = pack(lens, lens, 4, 2, d, torch.bfloat16, device)
    args = (varlen, bias, d**-0.5, False, -1, -1, None)

    def fwd(q_, k_, v_):
        return sigmoid_attn_varlen_fwd(q_, k_, v_, *args, "fast")

    def bwd(do_, q_, k_, v_):
        return sigmoid_attn_varlen_bwd(do_, q_, k_, v_, *args, deterministic, "fast", fused_dq=not deterministic)

    c = varlen.cu_seqlens_q.tolist()
    keep = torch.ones(c[-1], dtype=torch.bool, device=device)
    keep[c[1]:c[2]] = False
    poisoned_neighbour_check(q, k, v, do, (slice(c[1], c[1] + 40),) * 2, (keep, keep), fwd, bwd,
                             exact_dq=deterministic)


@pytest.mark.gpu
def test_gpu_varlen_equals_dense_equal_lengths(device):
    """An equal-length pack is the dense batch: same outputs and gradients (bf16, default TMA path)."""
    b, n, h, d = 4, 1000, 8, 128
    q, k, v, do, bias, _, varlen = pack([n] * b, [n] * b, h, h, d, torch.bfloat16, device)
    ours = run_varlen(q, k, v, do, bias, None, varlen, d**-0.5, True, (-1, 0), True, impl="fast")
    dense = [t.view(b, n, h, d) for t in (q, k, v, do)]
    want = [sigmoid_attn_fwd(*dense[:3], bias, d**-0.5, True, -1, 0, None, "fast")]
    want += sigmoid_attn_bwd(dense[3], *dense[:3], bias, d**-0.5, True, -1, 0, None, True, "fast")
    for x, y in zip(ours, want):
        # Same tiles, same arithmetic: equal up to the compiler's choices between the two kernel variants.
        torch.testing.assert_close(x.reshape(y.shape).float(), y.float(), rtol=1e-2, atol=1e-3 * y.abs().max().item())
