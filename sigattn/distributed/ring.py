"""Ring context parallelism: K/V shards travel peer to peer while each rank attends to the shard in hand."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sigattn.distributed.sharding import PairBlock, pair_plan
from sigattn.ops.api import sigmoid_attn_backward, sigmoid_attn_func

# One tag per stream of messages, so gloo never matches a K buffer against a dK receive (NCCL ignores tags).
TAG_K, TAG_V, TAG_DK, TAG_DV = 0, 1, 2, 3


@dataclass(frozen=True)
class LocalArgs:
    """The arguments every local sigmoid_attn_func / sigmoid_attn_backward call of one context-parallel call shares."""

    scale: float
    deterministic: bool
    sigmoid_impl: str
    backend: str


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs and gradients are summed in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: float | torch.Tensor,
    blocks: Sequence[PairBlock],
    args: LocalArgs,
    out: torch.Tensor,
) -> None:
    """Adds the blocks' attention outputs into `out` (fp32, shaped like q's rows): the partial over this K/V."""
    for b in blocks:
        o = sigmoid_attn_func(
            q[:, b.q_start : b.q_end], k[:, : b.kv_end], v[:, : b.kv_end], bias=bias, scale=args.scale,
            causal=b.causal, deterministic=args.deterministic, sigmoid_impl=args.sigmoid_impl, backend=args.backend,
        )
        out[:, b.q_start : b.q_end] += o


def block_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: float | torch.Tensor,
    do: torch.Tensor,
    block: PairBlock,
    args: LocalArgs,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias) of one block: dq for its query rows, dk/dv for its key prefix (inputs' dtypes), dbias
    per head ((nheads,), fp32/fp64) or None.

    One call of the backward entry point (the Triton dK/dV and dQ kernels on CUDA): sigmoid attention's
    backward needs only q, k, v and dO, so nothing of the forward is recomputed and blocks are independent.
    """
    qs, qe, ke = block.q_start, block.q_end, block.kv_end
    return sigmoid_attn_backward(
        do[:, qs:qe], q[:, qs:qe], k[:, :ke], v[:, :ke], bias=bias, scale=args.scale, causal=block.causal,
        deterministic=args.deterministic, sigmoid_impl=args.sigmoid_impl, backend=args.backend,
        need_dbias=need_dbias,
    )


def attend_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: float | torch.Tensor,
    do: torch.Tensor,
    blocks: Sequence[PairBlock],
    args: LocalArgs,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dbias: torch.Tensor | None,
) -> None:
    """Adds the blocks' gradients into dq, dk, dv (and the per-head dbias, when not None), fp32 accumulators."""
    for b in blocks:
        grads = block_grads(q, k, v, bias, do, b, args, dbias is not None)
        dq[:, b.q_start : b.q_end] += grads[0]
        dk[:, : b.kv_end] += grads[1]
        dv[:, : b.kv_end] += grads[2]
        if dbias is not None:
            dbias += grads[3]


def pair_kv_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: float | torch.Tensor,
    do: torch.Tensor,
    blocks: Sequence[PairBlock],
    args: LocalArgs,
    dq: torch.Tensor,
    dbias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard pair's (dk, dv), shaped like k and v, adding its dq (and per-head dbias) into the fp32 accumulators.

    dk/dv stay in k's dtype when one block makes them (every zigzag and contiguous pair): a single
    contribution, rounded once, as the kernel returns it. Several blocks are summed in fp32.
    """
    if len(blocks) == 1 and blocks[0].kv_end == k.shape[1]:
        grads = block_grads(q, k, v, bias, do, blocks[0], args, dbias is not None)
        dq[:, blocks[0].q_start : blocks[0].q_end] += grads[0]
        if dbias is not None:
            dbias += grads[3]
        return grads[1], grads[2]
    # The neighbour sizes its receive buffer from its own plan: with no block (a contiguous causal shard wholly
    # after the queries) the zeros must still travel in k's dtype, as a one-block plan's grads do.
    dtype = k.dtype if len(blocks) <= 1 else accumulation_dtype(k.dtype)
    dk = torch.zeros(k.shape, dtype=dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=v.device)
    attend_grads(q, k, v, bias, do, blocks, args, dq, dk, dv, dbias)
    return dk, dv


class StepTimer:
    """Timestamps at the ring's phase boundaries on this rank's compute stream, to see what the transfers cost.

    ``mark(label)`` records a CUDA event on the current stream when `cuda` (so it completes when the work queued
    before it does, the waits on transfers included), else the host clock (CPU ops and gloo waits block).
    After a synchronize, ``spans()`` gives (label, ms since the previous mark): a "…compute" span is a step's
    kernels, a "…wait" span the part of a transfer that the compute did not hide (exposed communication).
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, Any]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def spans(self) -> list[tuple[str, float]]:
        out = []
        for (_, a), (label, b) in zip(self.marks, self.marks[1:]):
            out.append((label, a.elapsed_time(b) if self.cuda else 1e3 * (b - a)))
        return out

    def clear(self) -> None:
        self.marks = []


@dataclass
class Transfer:
    """One posted exchange. It keeps its send buffers alive until ``wait`` (the transfer reads them meanwhile)."""

    sent: list[torch.Tensor]
    received: list[torch.Tensor]
    works: list[Any]

    def wait(self) -> list[torch.Tensor]:
        """The received tensors. On CUDA the current stream waits for the transfer; on CPU this call blocks."""
        for w in self.works:
            w.wait()
        self.sent = []
        return self.received


class Ring:
    """This rank's place in a process group seen as a ring: sends go to rank + 1, receives come from rank - 1."""

    def __init__(self, group: dist.ProcessGroup | None, timer: StepTimer | None = None) -> None:
        self.group, self.timer = group, timer
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # P2POp takes global ranks; in a sub-group (one CP group per data-parallel replica) they differ.
        whole = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(whole, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(whole, (self.rank - 1) % self.world)

    def exchange(self, tensors: Sequence[torch.Tensor], tags: Sequence[int]) -> Transfer:
        """Posts the sends of `tensors` to the next rank and receives of the same shapes from the previous one.

        Returns at once: the caller computes, then ``wait``s before reading what arrived. Every rank posts
        the same sequence of exchanges, so sends and receives pair up in order.
        """
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t, tag in zip(sent, tags)]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group, tag) for b, tag in zip(received, tags)]
        return Transfer(sent, received, dist.batch_isend_irecv(ops))

    def mark(self, label: str) -> None:
        """A StepTimer mark, when one is attached (the benchmark's overlap figures); otherwise nothing."""
        if self.timer is not None:
            self.timer.mark(label)


class RingSigmoidAttn(torch.autograd.Function):
    """Forward: W steps, each attending the local queries to the K/V shard in hand while the next one arrives.

    Backward: the same ring again, one backward-kernel call per block (no forward recomputed: the backward
    needs only q, k, v, dO). dQ stays local (fp32). A shard's dK/dV sum starts at the first rank after its
    owner and travels one step behind the shard's K/V (so each transfer overlaps the next step's compute),
    each rank adding its contribution; the last hop hands it to the owner, who adds its own share kept from
    step 0. W - 1 dK/dV transfers per shard, the first in k's dtype, the rest fp32; only the last one is
    exposed (nothing is left to compute while it travels).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias_tensor: torch.Tensor | None,
        bias_value: float,
        ring: Ring,
        causal: bool,
        sharding: str,
        args: LocalArgs,
        reduce_bias_grad: bool,
    ) -> torch.Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bias = bias_tensor if bias_tensor is not None else bias_value
        seqlen = q.shape[1]
        out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=accumulation_dtype(q.dtype), device=q.device)
        kv = [k, v]
        ring.mark("fwd.start")
        for step in range(ring.world):
            last = step + 1 == ring.world
            if not last:
                incoming = ring.exchange(kv, (TAG_K, TAG_V))  # posted before the compute it hides behind
            src = (ring.rank - step) % ring.world
            attend(q, kv[0], kv[1], bias, pair_plan(ring.rank, src, ring.world, seqlen, causal, sharding), args, out)
            ring.mark(f"fwd{step}.compute")
            if not last:
                kv = incoming.wait()
                ring.mark(f"fwd{step}.kv_wait")
        ctx.save_for_backward(q, k, v, bias_tensor)
        ctx.bias_value, ctx.ring, ctx.causal, ctx.sharding = bias_value, ring, causal, sharding
        ctx.args, ctx.reduce_bias_grad = args, reduce_bias_grad
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, bias_tensor = ctx.saved_tensors
        ring: Ring = ctx.ring
        bias = bias_tensor if bias_tensor is not None else ctx.bias_value
        do = do.contiguous()
        acc = accumulation_dtype(q.dtype)
        seqlen = q.shape[1]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        need_dbias = bias_tensor is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros(q.shape[2], dtype=acc, device=q.device) if need_dbias else None  # per head
        kv = [k, v]
        own: tuple[torch.Tensor, torch.Tensor] | None = None
        inbox: Transfer | None = None
        ring.mark("bwd.start")
        for step in range(ring.world):
            last = step + 1 == ring.world
            if not last:
                incoming = ring.exchange(kv, (TAG_K, TAG_V))
            src = (ring.rank - step) % ring.world
            plan = pair_plan(ring.rank, src, ring.world, seqlen, ctx.causal, ctx.sharding)
            dk, dv = pair_kv_grads(q, kv[0], kv[1], bias, do, plan, ctx.args, dq, dbias)
            ring.mark(f"bwd{step}.compute")
            if step == 0:
                own = (dk, dv)  # this rank's share of its own dK/dV waits here for the others' sum
            else:
                if inbox is not None:
                    # Ranks src + 1 .. rank - 1's sum for shard src, sent after their previous step.
                    got = inbox.wait()
                    dk, dv = got[0].to(acc).add_(dk), got[1].to(acc).add_(dv)
                    ring.mark(f"bwd{step}.dkdv_wait")
                # The sum for shard src travels on towards its owner; the first hop carries one
                # contribution in k's dtype (no rounding yet), later hops the fp32 sum.
                inbox = ring.exchange((dk, dv), (TAG_DK, TAG_DV))
            if not last:
                kv = incoming.wait()
                ring.mark(f"bwd{step}.kv_wait")
        assert own is not None
        dk, dv = own
        if inbox is not None:
            # The last hop went from rank - 1 (holding shard rank at step W - 1) to this rank, the owner. In
            # place: with W = 2 both terms are in k's dtype, and one rounded add equals fp32-add-then-cast.
            got = inbox.wait()
            dk, dv = got[0].add_(dk), got[1].add_(dv)
            ring.mark("bwd.dkdv_wait")
        dbias_out = None
        if dbias is not None:
            if ctx.reduce_bias_grad:
                dist.all_reduce(dbias, group=ring.group)
            assert bias_tensor is not None
            dbias_out = (dbias.sum() if bias_tensor.dim() == 0 else dbias).to(bias_tensor.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias_out, None, None, None, None, None, None
