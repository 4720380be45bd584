"""Context-parallel sigmoid attention over torch.distributed (ring and all-gather) and sequence sharding helpers."""

from sigattn.distributed.context_parallel import all_gather_sigmoid_attn, gather_sequence, ring_sigmoid_attn
from sigattn.distributed.sharding import SHARDINGS, shard_positions, shard_sequence, unshard_sequence

__all__ = [
    "SHARDINGS",
    "all_gather_sigmoid_attn",
    "gather_sequence",
    "ring_sigmoid_attn",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
