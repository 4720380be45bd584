"""The sigattn::dense_fwd/dense_bwd custom ops: opcheck, autograd through the op, torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sigattn.ops import custom_ops  # noqa: E402
from sigattn.ops.reference import sigmoid_attn  # noqa: E402


def _inputs(device, dtype=torch.float32, alibi=False, requires_grad=True):
    q = torch.randn(1, 17, 4, 16, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(1, 20, 2, 16, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(1, 20, 2, 16, dtype=dtype, device=device, requires_grad=requires_grad)
    bias = (torch.randn(4, device=device) - 3).requires_grad_(requires_grad)
    slopes = torch.rand(1, 4, device=device) * 0.3 if alibi else None
    return q, k, v, bias, slopes


@pytest.mark.parametrize("alibi", [False, True])
def test_opcheck(alibi, device):
    q, k, v, bias, slopes = _inputs(device, alibi=alibi)
    args = (q, k, v, bias, 0.25, True, -1, 0, slopes, True, "accurate")
    torch.library.opcheck(torch.ops.sigattn.dense_fwd.default, args)
    do = torch.randn_like(q)
    bwd_args = (do, q.detach(), k.detach(), v.detach(), bias.detach(), 0.25, True, -1, 0, slopes, False, "fast", True)
    torch.library.opcheck(torch.ops.sigattn.dense_bwd.default, bwd_args)


def test_autograd_through_op_matches_reference(device):
    q, k, v, bias, _ = _inputs(device)
    out = custom_ops.sigmoid_attn_dense(q, k, v, bias, 0.25, False, 5, 3, None, False, "accurate")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = sigmoid_attn(*leaves[:3], scale=0.25, bias=leaves[3], window_size=(5, 3))
    want = torch.autograd.grad(ref, leaves, do.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5)


def test_torch_compile_fullgraph(device):
    """Forward and backward compile to one graph each, with no graph break, and agree with eager."""
    q, k, v, bias, slopes = _inputs(device, alibi=True)

    def f(q, k, v, bias):
        o = custom_ops.sigmoid_attn_dense(q, k, v, bias, 0.25, True, -1, 0, slopes, True, "accurate")
        return (o * o).sum()

    # Inductor needs a C++ compiler on CPU; aot_eager traces the same joint graph without one.
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    want = torch.autograd.grad(f(q, k, v, bias), (q, k, v, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deterministic", [True, False])
def test_opcheck_backward_with_transposed_q(deterministic, device):
    """The SDPA-style function passes query.transpose(1, 2): the real dq must have the fake's (contiguous) strides."""
    q, k, v, bias, _ = _inputs(device, requires_grad=False)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, permuted strides
    do = torch.randn_like(q)
    args = (do, qt, k, v, bias, 0.25, True, -1, 0, None, deterministic, "accurate", True)
    torch.library.opcheck(torch.ops.sigattn.dense_bwd.default, args)


@pytest.mark.parametrize("need_bias_grad", [True, False])
def test_eager_path_equals_custom_op_bitwise(need_bias_grad, device):
    """Eager calls skip the op's dispatch (a plain autograd.Function over the same launchers): outputs and every
    gradient equal the op's bit for bit."""
    q, k, v, bias, slopes = _inputs(device, alibi=True)
    bias.requires_grad_(need_bias_grad)
    args = (0.25, True, 7, 0, slopes, True, "accurate")
    assert custom_ops._eager(q, k, v, bias, slopes)
    got = custom_ops._DenseFn.apply(q, k, v, bias, *args)
    want = torch.ops.sigattn.dense_fwd(q, k, v, bias, *args)
    do = torch.randn_like(got)
    leaves = (q, k, v, bias) if need_bias_grad else (q, k, v)
    g_got, g_want = torch.autograd.grad(got, leaves, do), torch.autograd.grad(want, leaves, do)
    assert torch.equal(got, want)
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(custom_ops.sigmoid_attn_dense(q, k, v, bias, *args), want)


@pytest.mark.parametrize("need_dbias", [True, False])
def test_eager_backward_equals_custom_op_bitwise(need_dbias, device, monkeypatch):
    """sigmoid_attn_dense_bwd (sigmoid_attn_backward's Triton path) skips the op's dispatch for eager calls: every
    output equals the op's bit for bit (dbias None when not need_dbias); a do that requires grad takes the op."""
    q, k, v, bias, slopes = _inputs(device, alibi=True, requires_grad=False)
    do = torch.randn_like(q)
    args = (do, q, k, v, bias, 0.25, True, 7, 0, slopes, False, "accurate", need_dbias)
    want = torch.ops.sigattn.dense_bwd(*args)
    calls = []
    real = custom_ops.dense_bwd
    monkeypatch.setattr(custom_ops, "dense_bwd", lambda *a: calls.append(1) or real(*a))
    got = custom_ops.sigmoid_attn_dense_bwd(*args)
    assert calls == []
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    assert torch.equal(got[3], want[3]) if need_dbias else got[3] is None
    custom_ops.sigmoid_attn_dense_bwd(do.requires_grad_(), *args[1:])
    assert calls == [1]


def test_traced_or_moded_calls_take_the_custom_op(device):
    """Fake tensors, dispatch modes and functorch transforms see the custom op (its fake impl), not the eager path."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    q, k, v, bias, _ = _inputs(device)
    assert custom_ops._eager(q, k, v, bias)

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy() as spy:
        custom_ops.sigmoid_attn_dense(q, k, v, bias, 0.25, True, -1, 0, None, True, "accurate")
    assert any("sigattn.dense_fwd" in name for name in spy.ops)
    with FakeTensorMode() as mode:
        fq, fk, fv, fb = (mode.from_tensor(t) for t in (q, k, v, bias))
        assert not custom_ops._eager(fq, fk, fv, fb)
        out = custom_ops.sigmoid_attn_dense(fq, fk, fv, fb, 0.25, True, -1, 0, None, True, "accurate")
        assert out.shape == q.shape
