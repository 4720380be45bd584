"""Context-parallel sigmoid attention over torch.distributed (ring and all-gather), for models, and sharding helpers."""

from sigattn.distributed.context_parallel import all_gather_sigmoid_attn, gather_sequence, ring_sigmoid_attn
from sigattn.distributed.modules import enable_context_parallel
from sigattn.distributed.sharding import SHARDINGS, shard_positions, shard_sequence, unshard_sequence

__all__ = [
    "SHARDINGS",
    "all_gather_sigmoid_attn",
    "enable_context_parallel",
    "gather_sequence",
    "ring_sigmoid_attn",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
