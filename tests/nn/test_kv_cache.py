"""KVCache: layout, writes at per-sequence positions, advance, reset and overflow."""

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
