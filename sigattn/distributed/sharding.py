"""Sequence sharding for context parallelism: zigzag and contiguous layouts, their inverse, the mask plans."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHARDINGS = ("zigzag", "contiguous")

__all__ = [
    "SHARDINGS",
    "PairBlock",
    "chunk_ids",
    "gathered_plan",
    "pair_plan",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]


def _check_layout(sharding: str, rank: int, world: int) -> None:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(map(repr, SHARDINGS))}; got {sharding!r}")
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need world >= 1 and 0 <= rank < world; got rank {rank}, world {world}")


def chunk_ids(rank: int, world: int, sharding: str) -> tuple[int, ...]:
    """Which equal chunks of the global sequence a rank holds, in local order (always ascending).

    contiguous: the sequence is cut into `world` chunks and rank r holds chunk r.
    zigzag: it is cut into 2 * world chunks and rank r holds chunks r and 2 * world - 1 - r, so under a
    causal mask every rank has the same amount of work (an early chunk with little to see, a late one
    with a lot). With world = 4 the 8 chunks go to ranks 0 1 2 3 3 2 1 0.
    """
    _check_layout(sharding, rank, world)
    return (rank,) if sharding == "contiguous" else (rank, 2 * world - 1 - rank)


def _chunks_per_rank(sharding: str) -> int:
    return 1 if sharding == "contiguous" else 2


def shard_sequence(x: torch.Tensor, rank: int, world: int, sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The part of the global sequence `x` that `rank` holds (a new contiguous tensor).

    x: any tensor whose `dim` is the global sequence, e.g. (batch, seqlen, nheads, headdim) with dim=1;
    its length must be divisible by `world` (contiguous) or 2 * world (zigzag).
    Returns x with `dim` cut to seqlen / world: the chunks of ``chunk_ids(rank, world, sharding)``
    concatenated in that (ascending) order.
    """
    ids = chunk_ids(rank, world, sharding)
    n = x.shape[dim]
    parts = world * _chunks_per_rank(sharding)
    if n % parts != 0:
        raise ValueError(
            f"{sharding} sharding over {world} ranks needs the sequence length (dim {dim}) divisible by {parts}; "
            f"got {n}"
        )
    chunks = x.chunk(parts, dim=dim)
    return torch.cat([chunks[i] for i in ids], dim=dim).contiguous()


def unshard_sequence(shards: list[torch.Tensor], sharding: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence``: the global sequence from every rank's shard, given in rank order.

    shards: list of world tensors of one shape, shard r from rank r (e.g. from dist.all_gather).
    Returns them joined along `dim` in global order.
    """
    if not shards:
        raise ValueError("unshard_sequence needs at least one shard")
    world = len(shards)
    _check_layout(sharding, 0, world)
    per = _chunks_per_rank(sharding)
    n = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"all shards must have one shape; got {[tuple(s.shape) for s in shards]}")
    if n % per != 0:
        raise ValueError(f"zigzag shards hold two equal chunks, so their length must be even; got {n}")
    ordered: list[torch.Tensor | None] = [None] * (world * per)
    for r, s in enumerate(shards):
        for i, piece in zip(chunk_ids(r, world, sharding), s.chunk(per, dim=dim)):
            ordered[i] = piece
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


def shard_positions(
    seqlen: int, rank: int, world: int, sharding: str = "zigzag", device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64, (seqlen / world,)) of the tokens `rank` holds: RoPE / position ids for a shard."""
    return shard_sequence(torch.arange(seqlen, device=device), rank, world, sharding, dim=0)


@dataclass(frozen=True)
class PairBlock:
    """One local attention call of a (query shard, key/value shard) pair.

    Queries ``q[:, q_start:q_end]`` attend keys/values ``kv[:, :kv_end]`` of the other shard, with a
    causal (diagonal) mask or none. Rows of q outside every block of a pair see no key of that shard.
    """

    q_start: int
    q_end: int
    kv_end: int
    causal: bool


def pair_plan(q_rank: int, kv_rank: int, world: int, seqlen_local: int, causal: bool, sharding: str) -> list[PairBlock]:
    """The local attention calls that give q_rank's queries their contribution from kv_rank's keys.

    Masks are relative to global positions. Both shards are unions of equal chunks in ascending order,
    so under a causal mask each query chunk sees a prefix of the other shard's chunks: all of those
    before it (no mask) and, on the diagonal shard (q_rank == kv_rank), itself (causal). Query chunks
    that see the same prefix share one call. Zigzag, world = 2, rank 0 holds chunks (0, 3), rank 1 (1, 2):

        q rank 0 x kv rank 1: chunk 0 sees nothing, chunk 3 sees chunks 1 and 2 → one call, q[c:] x kv[:2c]
        q rank 1 x kv rank 0: chunks 1 and 2 both see chunk 0 → one call, q[:] x kv[:c]
        q rank r x kv rank r: one causal call over the whole shard (local order is global order)

    An empty list means the pair contributes nothing (a shard entirely after the queries).
    """
    if not causal:
        return [PairBlock(0, seqlen_local, seqlen_local, False)]
    if q_rank == kv_rank:
        return [PairBlock(0, seqlen_local, seqlen_local, True)]
    q_ids, kv_ids = chunk_ids(q_rank, world, sharding), chunk_ids(kv_rank, world, sharding)
    size = seqlen_local // len(q_ids)
    blocks: list[PairBlock] = []
    for i, qc in enumerate(q_ids):
        seen = sum(kc < qc for kc in kv_ids) * size
        if seen == 0:
            continue
        last = blocks[-1] if blocks else None
        if last is not None and last.q_end == i * size and last.kv_end == seen:
            blocks[-1] = PairBlock(last.q_start, (i + 1) * size, seen, False)
        else:
            blocks.append(PairBlock(i * size, (i + 1) * size, seen, False))
    return blocks


def gathered_plan(rank: int, world: int, seqlen_local: int, causal: bool, sharding: str) -> list[PairBlock]:
    """The local attention calls of `rank`'s queries against the whole gathered sequence (global order).

    Non-causal: one call over everything. Causal: each of the rank's chunks attends the global prefix
    that ends with it, with a bottom-right aligned causal mask (its last query sees the whole prefix).
    """
    if not causal:
        return [PairBlock(0, seqlen_local, world * seqlen_local, False)]
    ids = chunk_ids(rank, world, sharding)
    size = seqlen_local // len(ids)
    return [PairBlock(i * size, (i + 1) * size, (c + 1) * size, True) for i, c in enumerate(ids)]
