"""No host-device sync in the dense and varlen training paths (a sync stalls the host, which at small shapes is what
bounds a training step: bench/host_overhead.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

import sigattn  # noqa: E402
from sigattn.ops import custom_ops  # noqa: E402


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)])
@pytest.mark.parametrize("learn_bias", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_dense_forward_backward_never_syncs(dtype, head_dim, learn_bias, deterministic, device):
    """Public function, forward + backward (portable and Gluon backward, with and without the bias gradient), after
    one warm-up call (compiles, the cached float bias's one-time fill)."""
    q, k, v = (torch.randn(2, 77, 4, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.full((4,), -4.0, device=device, requires_grad=True) if learn_bias else -4.0

    def step():
        out = sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=bias, deterministic=deterministic)
        out.sum().backward()

    step()
    with no_sync():
        step()
        with torch.no_grad():
            sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=bias)
    assert torch.isfinite(q.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("learn_bias", [False, True])
def test_gpu_varlen_forward_backward_never_syncs(learn_bias, device):
    """Below the public function (whose validation reads cu_seqlens back: one documented sync per call), the varlen
    forward and the whole backward make none."""
    lens = [17, 0, 64, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lens), 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = torch.full((4,), -4.0, device=device, requires_grad=learn_bias)

    def step():
        out = custom_ops.sigmoid_attn_varlen(q, k, v, cu, cu, max(lens), max(lens), bias.expand(len(lens), 4),
                                             0.125, True, -1, 0, None, False, "fast")
        out.sum().backward()

    step()
    with no_sync():
        step()
    assert torch.isfinite(q.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [None, -4.0])
def test_gpu_varlen_api_second_call_never_syncs(bias, device):
    """The public function reads a cu_seqlens tensor once (per version): the calls after the first — every later
    layer of a model — make no sync, the default per-sequence bias included (cached per packing)."""
    lens = [17, 0, 64, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(sum(lens), 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step():
        out = sigattn.sigmoid_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True, bias=bias)
        out.sum().backward()

    step()
    with no_sync():
        step()
        step()
    assert torch.isfinite(q.grad).all()
