"""torch.library custom ops around the Triton kernels (fake impls + autograd), so torch.compile traces them whole;
plain autograd.Functions over the same launchers serve eager calls."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sigattn.ops import backward
from sigattn.ops.backward import sigmoid_attn_bwd, sigmoid_attn_varlen_bwd
from sigattn.ops.forward import Varlen, sigmoid_attn_fwd, sigmoid_attn_varlen_fwd


def _eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call can skip the custom op: not traced by torch.compile, no dispatch/function mode or functorch
    transform active, plain tensors only (fake/functional tensors and subclasses take the op). The op's dispatch
    (schema defaults, alias check, its autograd wrapper) cost ~0.5 ms of host time per forward+backward on H100
    (bench/host_overhead.py); both paths run the same launchers, so results are identical."""
    if torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad)


@torch.library.custom_op("sigattn::dense_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def dense_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
) -> torch.Tensor:
    """Forward kernel; `deterministic` is only carried to the backward."""
    return sigmoid_attn_fwd(q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, sigmoid_impl)


@dense_fwd.register_fake
def _(q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl):
    return q.new_empty(q.shape)


@torch.library.custom_op("sigattn::dense_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def dense_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels: (dq, dk, dv, dbias fp32 (Hq,)); dbias is zeros unless need_dbias (its reduction is
    skipped then: the paper's fixed b = -log n needs no gradient)."""
    return sigmoid_attn_bwd(
        do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl,
        need_dbias=need_dbias,
    )


@dense_bwd.register_fake
def _(do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl,
      need_dbias):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty((q.shape[2],), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl = inputs
    ctx.save_for_backward(q, k, v, bias, alibi_slopes)
    ctx.args = (scale, causal, window_left, window_right, deterministic, sigmoid_impl)


def _backward(ctx, do: torch.Tensor):
    q, k, v, bias, alibi_slopes = ctx.saved_tensors
    scale, causal, window_left, window_right, deterministic, sigmoid_impl = ctx.args
    need_dbias = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dbias = dense_bwd(
        do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl,
        need_dbias,
    )
    return dq, dk, dv, (dbias.to(bias.dtype) if need_dbias else None), None, None, None, None, None, None, None


dense_fwd.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_attn_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
) -> torch.Tensor:
    """Dense sigmoid attention through the custom op (arguments validated by sigattn.ops.api).

    q (B, Nq, Hq, D); k, v (B, Nk, Hkv, D), Hq % Hkv == 0; bias float32 (Hq,) (differentiable);
    alibi_slopes float32 (B, Hq) or None; causal bottom-right aligned; window -1 = unbounded.
    Returns (B, Nq, Hq, D) in q's dtype; the backward returns gradients for q, k, v and bias.
    """
    if _eager(q, k, v, bias, alibi_slopes):
        if not _needs_grad(q, k, v, bias):
            return sigmoid_attn_fwd(q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes,
                                    sigmoid_impl)
        return _DenseFn.apply(
            q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl
        )
    return dense_fwd(
        q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl
    )


def sigmoid_attn_dense_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The dense backward through the custom op sigattn::dense_bwd (arguments validated by sigattn.ops.api; q, k, v,
    bias detached), with dbias None when not need_dbias. Eager calls go to the op's own dispatch function directly,
    as `sigmoid_attn_dense` does for the forward: the op's dispatch cost ~45 µs of host time per call (CPU, fast
    launch off, bench/NOTES.md "Host path v5"), and both run `backward.dense_bwd` on the same arguments. A `do` that
    requires grad under grad mode takes the op, whose outputs then carry its autograd-not-implemented node."""
    if _eager(do, q, k, v, bias, alibi_slopes) and not (do.requires_grad and torch.is_grad_enabled()):
        return backward.dense_bwd(do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes,
                                  deterministic, sigmoid_impl, need_dbias)
    dq, dk, dv, dbias = dense_bwd(
        do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl,
        need_dbias,
    )
    return dq, dk, dv, (dbias if need_dbias else None)


class _DenseFn(torch.autograd.Function):
    """Eager twin of sigattn::dense_fwd with its registered autograd (same launchers, same saved tensors)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic,
                sigmoid_impl):
        out = sigmoid_attn_fwd(q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, sigmoid_impl)
        ctx.save_for_backward(q, k, v, bias, alibi_slopes)
        ctx.args = (scale, causal, window_left, window_right, deterministic, sigmoid_impl)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, bias, alibi_slopes = ctx.saved_tensors
        scale, causal, window_left, window_right, deterministic, sigmoid_impl = ctx.args
        need_dbias = bool(ctx.needs_input_grad[3])
        # The op's dispatch (the Gluon backward where it serves), without the dbias zero fill.
        dq, dk, dv, dbias = backward.dense_bwd(
            do, q, k, v, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic, sigmoid_impl,
            need_dbias,
        )
        return dq, dk, dv, (dbias.to(bias.dtype) if need_dbias else None), None, None, None, None, None, None, None


@torch.library.custom_op("sigattn::varlen_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
) -> torch.Tensor:
    """Forward kernel on packed sequences; `deterministic` is only carried to the backward."""
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return sigmoid_attn_varlen_fwd(q, k, v, varlen, bias, scale, causal, window_left, window_right, alibi_slopes,
                                   sigmoid_impl)


@varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, scale, causal, window_left,
      window_right, alibi_slopes, deterministic, sigmoid_impl):
    return q.new_empty(q.shape)


@torch.library.custom_op("sigattn::varlen_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def varlen_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels on packed sequences: (dq, dk, dv, dbias fp32 of bias's shape, (Hq,) or (B, Hq))."""
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return sigmoid_attn_varlen_bwd(
        do, q, k, v, varlen, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic,
        sigmoid_impl, need_dbias=need_dbias,
    )


@varlen_bwd.register_fake
def _(do, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, scale, causal, window_left,
      window_right, alibi_slopes, deterministic, sigmoid_impl, need_dbias):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(bias.shape, dtype=torch.float32),
    )


def _varlen_setup_context(ctx, inputs, output) -> None:
    (q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, window_left, window_right, alibi_slopes, deterministic,
     sigmoid_impl) = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, bias, alibi_slopes)
    ctx.args = (max_q, max_k, scale, causal, window_left, window_right, deterministic, sigmoid_impl)


def _varlen_backward(ctx, do: torch.Tensor):
    q, k, v, cu_q, cu_k, bias, alibi_slopes = ctx.saved_tensors
    max_q, max_k, scale, causal, window_left, window_right, deterministic, sigmoid_impl = ctx.args
    need_dbias = bool(ctx.needs_input_grad[7])
    dq, dk, dv, dbias = varlen_bwd(
        do, q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, window_left, window_right, alibi_slopes,
        deterministic, sigmoid_impl, need_dbias,
    )
    dbias = dbias.to(bias.dtype) if need_dbias else None
    return (dq, dk, dv, None, None, None, None, dbias) + (None,) * 7


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def sigmoid_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    bias: torch.Tensor,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
) -> torch.Tensor:
    """Packed variable-length sigmoid attention through the custom op (arguments validated by sigattn.ops.api).

    q (total_q, Hq, D); k, v (total_k, Hkv, D); cu_seqlens_q/k int32 (B + 1,) on q's device; max_seqlen_q/k at
    least the longest sequence; bias float32 (Hq,) or (B, Hq) (differentiable); alibi_slopes float32 (B, Hq) or
    None; causal/window bottom-right aligned per sequence. Returns (total_q, Hq, D) in q's dtype; the backward
    returns gradients for q, k, v and bias.
    """
    if _eager(q, k, v, cu_seqlens_q, cu_seqlens_k, bias, alibi_slopes):
        if not _needs_grad(q, k, v, bias):
            return sigmoid_attn_varlen_fwd(q, k, v, Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                                           bias, scale, causal, window_left, window_right, alibi_slopes, sigmoid_impl)
        fn = _VarlenFn.apply
    else:
        fn = varlen_fwd
    return fn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, scale, causal, window_left,
        window_right, alibi_slopes, deterministic, sigmoid_impl,
    )


class _VarlenFn(torch.autograd.Function):
    """Eager twin of sigattn::varlen_fwd with its registered autograd."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, window_left, window_right,
                alibi_slopes, deterministic, sigmoid_impl):
        out = sigmoid_attn_varlen_fwd(q, k, v, Varlen(cu_q, cu_k, max_q, max_k), bias, scale, causal, window_left,
                                      window_right, alibi_slopes, sigmoid_impl)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, bias, alibi_slopes)
        ctx.args = (max_q, max_k, scale, causal, window_left, window_right, deterministic, sigmoid_impl)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, cu_q, cu_k, bias, alibi_slopes = ctx.saved_tensors
        max_q, max_k, scale, causal, window_left, window_right, deterministic, sigmoid_impl = ctx.args
        need_dbias = bool(ctx.needs_input_grad[7])
        # The op's dispatch (the Gluon VARLEN backward where it serves), without the dbias zero fill.
        dq, dk, dv, dbias = backward.varlen_bwd(
            do, q, k, v, Varlen(cu_q, cu_k, max_q, max_k), bias, scale, causal, window_left, window_right,
            alibi_slopes, deterministic, sigmoid_impl, need_dbias,
        )
        dbias = dbias.to(bias.dtype) if need_dbias else None
        return (dq, dk, dv, None, None, None, None, dbias) + (None,) * 7
