"""Context-parallel sigmoid attention over a torch.distributed group: the ring and the all-gather variants."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from sigattn.distributed.ring import LocalArgs, Ring, RingSigmoidAttn, accumulation_dtype, attend_grads
from sigattn.distributed.sharding import SHARDINGS, gathered_plan, shard_sequence, unshard_sequence
from sigattn.ops.api import sigmoid_attn_func
from sigattn.ops.validation import (
    BACKENDS,
    SIGMOID_IMPLS,
    check_bias,
    check_choice,
    check_flag,
    check_qkv_heads,
    check_same,
    check_scale,
    check_tensor,
    check_window,
)

__all__ = ["all_gather_sigmoid_attn", "gather_sequence", "ring_sigmoid_attn"]


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    bias: float | torch.Tensor | None,
    scale: float | None,
    causal: bool,
    sharding: str,
    window_size: tuple[int, int],
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    sigmoid_impl: str,
    backend: str,
    reduce_bias_grad: bool,
) -> tuple[int, torch.Tensor | None, float, LocalArgs]:
    """Validates a context-parallel call; returns (world size, bias tensor or None, bias float, local args)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context-parallel attention needs torch.distributed: call init_process_group first")
    check_tensor("q", q, 4, "(batch, seqlen_local, nheads, headdim)")
    check_tensor("k", k, 4, "(batch, seqlen_local, nheads_k, headdim)")
    check_tensor("v", v, 4, "(batch, seqlen_local, nheads_k, headdim)")
    check_same({"q": q, "k": k, "v": v})
    if q.shape[:2] != k.shape[:2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            "q, k and v must share (batch, seqlen_local): each rank holds the same positions of all three; got "
            f"{tuple(q.shape[:2])}, {tuple(k.shape[:2])}, {tuple(v.shape[:2])}"
        )
    hq, _, d = check_qkv_heads(q.shape, k.shape, v.shape, 2, "q,k,v")
    check_flag("causal", causal)
    check_choice("sharding", sharding, SHARDINGS)
    seqlen = q.shape[1]
    if seqlen == 0:
        raise ValueError("every rank must hold at least one token (seqlen_local > 0)")
    if causal and sharding == "zigzag" and seqlen % 2 != 0:
        raise ValueError(f"causal zigzag shards hold two equal chunks, so seqlen_local must be even; got {seqlen}")
    check_window(window_size, causal)
    if tuple(window_size) != (-1, -1):
        raise ValueError(
            "window_size is not supported across shards: a shard pair's window needs the global offset of its "
            "queries and keys, which sigmoid_attn_func has no argument for"
        )
    if alibi_slopes is not None:
        raise ValueError(
            "alibi_slopes is not supported across shards: the ALiBi distance needs global query/key offsets, "
            "which sigmoid_attn_func has no argument for"
        )
    world = dist.get_world_size(group)
    scale = check_scale(scale, d)
    bias = check_bias(bias, hq, q.device, -math.log(world * seqlen))
    check_flag("deterministic", deterministic)
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    check_flag("reduce_bias_grad", reduce_bias_grad)
    args = LocalArgs(scale, deterministic, sigmoid_impl, backend)
    if isinstance(bias, torch.Tensor):
        return world, bias, 0.0, args
    return world, None, bias, args


def ring_sigmoid_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    bias: float | torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    sharding: str = "zigzag",
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
    reduce_bias_grad: bool = False,
) -> torch.Tensor:
    """Ring context-parallel sigmoid attention: each rank's queries against the whole sequence's keys.

    In W steps the K/V shards travel the ring (rank r sends to r + 1) while each rank runs the local
    attention on the shard in hand; the partial outputs over disjoint key shards simply add (no
    normaliser, so no LSE exchange), summed in fp32. The backward runs the ring again, one backward-kernel
    call per step and nothing recomputed (the backward needs only q, k, v, dO), with each shard's dK/dV
    accumulator travelling with it back to its owner. Memory per rank: O(seqlen_local).

    Arguments:
        q: (batch, seqlen_local, nheads, headdim), this rank's shard of the queries.
        k, v: (batch, seqlen_local, nheads_k, headdim), this rank's shard of the same positions; GQA/MQA as
            sigmoid_attn_func (nheads a multiple of nheads_k; only nheads_k heads travel).
        group: the context-parallel process group (None = the default group). Every rank of it calls with
            the same shapes, dtype, flags and sharding; the global sequence is world * seqlen_local long.
        bias: float, or tensor () / (nheads,) (learnable). None means -log(world * seqlen_local), the
            paper's b = -log(n) of the GLOBAL sequence.
        scale: None means 1 / sqrt(headdim).
        causal: causal over GLOBAL positions (query i sees keys j <= i). seqlen_q == seqlen_k, so there is
            no alignment question.
        sharding: how the global sequence was split (see shard_sequence): "zigzag" (rank r holds chunks r and
            2W-1-r of 2W, so causal work is balanced; seqlen_local even when causal) or "contiguous" (rank r
            holds chunk r; under a causal mask rank W-1 works W times more than rank 0). Without causal the
            math does not depend on it.
        window_size, alibi_slopes: only (-1, -1) and None (ValueError otherwise): both need global offsets
            the local function has no argument for.
        deterministic, sigmoid_impl, backend: passed to every local sigmoid_attn_func / sigmoid_attn_backward
            call ("auto": the Triton kernels on CUDA, the reference on CPU).
        reduce_bias_grad: False (default) returns the bias gradient of this rank's queries only, like every
            other replicated parameter's gradient under context parallelism: the trainer sums gradients over
            the CP group (e.g. DDP over the data x context ranks). True all-reduces (sums) it here, so each
            rank holds the whole sequence's gradient; do not combine that with a DDP reduction over the
            same ranks, which would count it world times.

    Returns:
        out: (batch, seqlen_local, nheads, headdim), dtype of q: this rank's rows of the global output.
    """
    world, bias_t, bias_f, args = _check(
        q, k, v, group, bias, scale, causal, sharding, window_size, alibi_slopes, deterministic, sigmoid_impl,
        backend, reduce_bias_grad,
    )
    return RingSigmoidAttn.apply(q, k, v, bias_t, bias_f, Ring(group), causal, sharding, args, reduce_bias_grad)


def _all_gather_stack(x: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """(world, *x.shape): every rank's x in rank order."""
    # torch 2.13 renames all_gather_into_tensor to all_gather_single; the GPU machines run 2.11.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))  # gloo takes only the concatenated form
    fn(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


def _reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def _gather_kv(
    k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, world: int, sharding: str
) -> torch.Tensor:
    """(2, batch, world * seqlen_local, nheads_k, headdim): every rank's K and V, in global order."""
    gathered = _all_gather_stack(torch.stack([k, v]), group, world)  # [W, 2, b, L, hkv, d]
    return unshard_sequence(list(gathered.unbind(0)), sharding, dim=2)


class AllGatherSigmoidAttn(torch.autograd.Function):
    """Forward: all-gather K/V, attend locally. Backward: gather again, reduce-scatter dK/dV to their owners.

    The gathered K/V is not kept between forward and backward, so activation memory stays O(seqlen_local)
    per layer at the price of a second all-gather.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias_tensor: torch.Tensor | None,
        bias_value: float,
        group: dist.ProcessGroup | None,
        causal: bool,
        sharding: str,
        args: LocalArgs,
        reduce_bias_grad: bool,
    ) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        kv = _gather_kv(k.contiguous(), v.contiguous(), group, world, sharding)
        bias = bias_tensor if bias_tensor is not None else bias_value
        outs = [
            sigmoid_attn_func(
                q[:, b.q_start : b.q_end], kv[0, :, : b.kv_end], kv[1, :, : b.kv_end], bias=bias, scale=args.scale,
                causal=b.causal, deterministic=args.deterministic, sigmoid_impl=args.sigmoid_impl,
                backend=args.backend,
            )
            for b in gathered_plan(rank, world, q.shape[1], causal, sharding)
        ]
        ctx.save_for_backward(q, k, v, bias_tensor)
        ctx.bias_value, ctx.group, ctx.causal, ctx.sharding = bias_value, group, causal, sharding
        ctx.args, ctx.reduce_bias_grad = args, reduce_bias_grad
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, bias_tensor = ctx.saved_tensors
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        kv = _gather_kv(k.contiguous(), v.contiguous(), group, world, ctx.sharding)
        bias = bias_tensor if bias_tensor is not None else ctx.bias_value
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # [2, b, N, hkv, d]
        need_dbias = bias_tensor is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros(q.shape[2], dtype=acc, device=q.device) if need_dbias else None  # per head
        plan = gathered_plan(rank, world, q.shape[1], ctx.causal, ctx.sharding)
        attend_grads(q, kv[0], kv[1], bias, do.contiguous(), plan, ctx.args, dq, dkv[0], dkv[1], dbias)
        # Rank r's rows of every rank's dK/dV, stacked in rank order, summed into rank r.
        by_rank = torch.cat([shard_sequence(dkv, r, world, ctx.sharding, dim=2) for r in range(world)])
        mine = dkv.new_empty((2,) + tuple(k.shape))  # [2, b, L, hkv, d]
        _reduce_scatter_single(mine, by_rank, group)
        dbias_out = None
        if dbias is not None:
            if ctx.reduce_bias_grad:
                dist.all_reduce(dbias, group=group)
            assert bias_tensor is not None
            dbias_out = (dbias.sum() if bias_tensor.dim() == 0 else dbias).to(bias_tensor.dtype)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), dbias_out, None, None, None, None, None, None


def all_gather_sigmoid_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    bias: float | torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    sharding: str = "zigzag",
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
    reduce_bias_grad: bool = False,
) -> torch.Tensor:
    """All-gather context-parallel sigmoid attention: same contract as ring_sigmoid_attn, simpler schedule.

    Gathers the whole sequence's K/V on every rank (world * seqlen_local * nheads_k * headdim * 2
    elements, transient), runs the local attention once per query chunk, and in the backward
    reduce-scatters dK/dV (fp32) to their owners. One collective per direction instead of W - 1 ring
    steps, but nothing overlaps it: the better choice when the sequence is short or nheads_k small.

    Arguments and return: as ring_sigmoid_attn.
    """
    world, bias_t, bias_f, args = _check(
        q, k, v, group, bias, scale, causal, sharding, window_size, alibi_slopes, deterministic, sigmoid_impl,
        backend, reduce_bias_grad,
    )
    return AllGatherSigmoidAttn.apply(q, k, v, bias_t, bias_f, group, causal, sharding, args, reduce_bias_grad)


def gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, sharding: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """Every rank's shard of `x` joined along `dim` in global order, on every rank (not differentiable).

    x: this rank's shard (as shard_sequence made it), one shape on every rank. For evaluation, logging and
    tests; training code keeps activations sharded.
    """
    gathered = _all_gather_stack(x, group, dist.get_world_size(group))
    return unshard_sequence(list(gathered.unbind(0)), sharding, dim=dim)
