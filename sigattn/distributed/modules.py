"""Context parallelism for a model's SigmoidAttention layers: each rank runs them on its shard, through the ring."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sigattn.distributed.context_parallel import all_gather_sigmoid_attn, ring_sigmoid_attn
from sigattn.distributed.sharding import SHARDINGS, shard_positions
from sigattn.nn.attention import SigmoidAttention
from sigattn.ops.validation import check_choice

__all__ = ["enable_context_parallel"]

SCHEDULES = ("ring", "all_gather")


def _cp_forward(
    module: SigmoidAttention,
    x: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    sharding: str,
    schedule: str,
    kv_cache: Any = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigmoidAttention.forward for a shard x (batch, seqlen / W, dim) of a sequence sharded over `group`."""
    if kv_cache is not None or attn_mask is not None:
        raise ValueError("a context-parallel attention layer takes no kv_cache or attn_mask")
    batch, local, _ = x.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # RoPE at the tokens' global positions: the shard is not a contiguous run of the sequence (zigzag).
    positions = shard_positions(local * world, rank, world, sharding, device=x.device).expand(batch, local)
    q, k, v = module.project(x, positions)
    fn = ring_sigmoid_attn if schedule == "ring" else all_gather_sigmoid_attn
    out = fn(q, k, v, group=group, bias=module.attn_bias, scale=module.scale, causal=module.causal,
             sharding=sharding, sigmoid_impl=module.sigmoid_impl, backend=module.backend)
    return module.o_proj(out.reshape(batch, local, module.nheads * module.head_dim))


def enable_context_parallel(
    model: nn.Module, group: dist.ProcessGroup | None = None, sharding: str = "zigzag", schedule: str = "ring"
) -> int:
    """Make every SigmoidAttention in `model` attend across the ranks of `group`; returns how many it changed.

    Afterwards each rank feeds the model its shard of every sequence, as ``shard_sequence(x, rank, W, sharding)``
    cuts it (tokens (batch, seqlen / W); targets and loss masks sharded alike). The attention layers attend over
    the whole sequence (ring or all-gather schedule) with RoPE at global positions; everything else in a
    transformer is per token and needs no change. Parameters and state_dict keys are untouched (the forward is
    replaced on the instances), so checkpoints move freely between context-parallel and ordinary runs.
    Gradients: each rank's parameter gradients hold the contribution of its own tokens (bias included,
    ``reduce_bias_grad=False``); sum them over the group, e.g. DDP over all data x context ranks with each rank's
    loss the mean over its equal share of tokens.

    Supported: sigmoid attention, causal or not, RoPE or no positions, float or learnable bias. Not: softmax
    layers, ALiBi, KV caches and attention masks (ValueError; the first two at this call).
    """
    check_choice("sharding", sharding, SHARDINGS)
    check_choice("schedule", schedule, SCHEDULES)
    layers = [m for m in model.modules() if isinstance(m, SigmoidAttention)]
    for m in layers:
        if m.attention != "sigmoid":
            raise ValueError(f"context parallelism needs sigmoid attention layers; got attention={m.attention!r}")
        if m.alibi_slopes is not None:
            raise ValueError("context parallelism does not support ALiBi (no global offsets in the local calls)")
    for m in layers:
        fwd = types.MethodType(
            lambda self, x, **kw: _cp_forward(self, x, group=group, sharding=sharding, schedule=schedule, **kw), m
        )
        m.forward = fwd  # type: ignore[method-assign]
    return len(layers)
