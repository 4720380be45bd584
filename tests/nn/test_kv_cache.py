"""KVCache: layout, writes at per-sequence positions, advance, reset, overflow, paging and its block allocator."""

from __future__ import annotations

import pytest
import torch

from sigattn.nn import KVCache


def test_layout_and_lengths() -> None:
    cache = KVCache(3, 2, 10, 4, 8, dtype=torch.float64)
    k, v = cache.layer(2)
    assert k.shape == v.shape == (2, 10, 4, 8) and k.dtype == torch.float64
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [0, 0]
    assert cache.nlayers == 3 and cache.batch == 2 and cache.block_table is None
    with pytest.raises(ValueError, match="layer_idx"):
        cache.layer(3)


def test_write_lands_at_each_sequence_length_and_advance_reset() -> None:
    cache = KVCache(1, 2, 6, 1, 2)
    cache.advance(torch.tensor([1, 3], dtype=torch.int32))
    k = torch.arange(8.0).view(2, 2, 1, 2)
    cache.write(0, k, -k)
    kc, vc = cache.layer(0)
    assert torch.equal(kc[0, 1:3], k[0]) and torch.equal(kc[1, 3:5], k[1])
    assert torch.equal(vc[1, 3:5], -k[1]) and not kc[0, 3:].any() and not kc[1, :3].any()
    assert cache.seqlens.tolist() == [1, 3]  # writing does not advance
    cache.advance(2)
    assert cache.seqlens.tolist() == [3, 5]
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0]


def test_overflow_and_bad_arguments_raise() -> None:
    cache = KVCache(1, 1, 4, 1, 2)
    cache.advance(3)
    with pytest.raises(ValueError, match="max_seqlen"):
        cache.advance(2)
    with pytest.raises(ValueError, match="max_seqlen"):
        cache.write(0, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2))
    with pytest.raises(ValueError, match="seqlen_new"):
        cache.advance(-1)
    with pytest.raises(ValueError, match="max_seqlen"):
        KVCache(1, 1, 0, 1, 2)


def test_paged_layout_and_allocator() -> None:
    """Blocks are assigned as sequences grow (interleaved across sequences), -1 marks pages without a block."""
    cache = KVCache(2, 2, 10, 3, 4, page_size=4)
    k, v = cache.layer(1)
    assert cache.paged and k.shape == v.shape == (6, 4, 3, 4)
    assert cache.block_table.shape == (2, 3) and (cache.block_table == -1).all() and cache.free_blocks == 6
    cache.reserve(3)
    assert cache.block_table[:, 0].tolist() == [0, 1] and cache.free_blocks == 4
    cache.reserve(3)  # idempotent until advance
    assert cache.free_blocks == 4
    cache.advance(3)
    cache.reserve(2)  # positions 3, 4: each sequence's second page
    assert cache.block_table[:, :2].tolist() == [[0, 2], [1, 3]] and cache.block_table[:, 2].tolist() == [-1, -1]
    cache.release(0)
    assert cache.block_table[0].tolist() == [-1, -1, -1] and cache.lengths == [0, 3] and cache.free_blocks == 4
    cache.reset()
    assert cache.free_blocks == 6 and cache.seqlens.tolist() == [0, 0]


def test_paged_write_and_gather_equal_contiguous() -> None:
    flat, paged = KVCache(1, 2, 9, 2, 4), KVCache(1, 2, 9, 2, 4, page_size=2)
    for cache in (flat, paged):
        cache.advance(torch.tensor([1, 4], dtype=torch.int32))
    for step in (3, 1):
        k, v = torch.randn(2, step, 2, 4), torch.randn(2, step, 2, 4)
        for cache in (flat, paged):
            cache.write(0, k, v)
            cache.advance(step)
    kf, vf = flat.gather(0, 8)
    kp, vp = paged.gather(0, 8)
    for b, n in enumerate(paged.lengths):
        assert torch.equal(kp[b, :n], kf[b, :n]) and torch.equal(vp[b, :n], vf[b, :n])


def test_uniform_lengths_pass_an_int() -> None:
    cache = KVCache(1, 2, 8, 1, 2)
    assert cache.cache_seqlens() == 0
    cache.advance(torch.tensor([1, 2], dtype=torch.int32))
    assert cache.cache_seqlens() is cache.seqlens and cache.lengths == [1, 2]


def test_paged_out_of_blocks_and_bad_arguments_raise() -> None:
    cache = KVCache(1, 2, 8, 1, 2, page_size=4, num_blocks=3)
    cache.advance(4)  # one block each
    with pytest.raises(ValueError, match="out of blocks"):
        cache.reserve(4)
    assert cache.free_blocks == 1 and (cache.block_table[:, 1] == -1).all()  # nothing assigned by the failed call
    cache.release(1)
    cache.reserve(4)
    with pytest.raises(ValueError, match="page_size"):
        KVCache(1, 1, 4, 1, 2, page_size=0)
    with pytest.raises(ValueError, match="num_blocks needs page_size"):
        KVCache(1, 1, 4, 1, 2, num_blocks=3)
