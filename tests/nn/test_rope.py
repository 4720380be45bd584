"""RotaryEmbedding: norm preservation, relative-position property, offsets and table growth."""

from __future__ import annotations

import pytest
import torch

from sigattn.nn import RotaryEmbedding


def test_rotation_keeps_norms_and_scores_depend_on_distance_only() -> None:
    rope = RotaryEmbedding(8)
    q = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    qa, ka = rope(q, k, 5)
    qb, kb = rope(q, k, 105)
    torch.testing.assert_close(qa.norm(dim=-1), q.norm(dim=-1))
    # <R(p) q, R(p) k> is the same for every p; so is <R(p + 3) q, R(p) k>.
    torch.testing.assert_close((qa * ka).sum(-1), (qb * kb).sum(-1))
    q3, _ = rope(q, k, 8)
    q103, _ = rope(q, k, 108)
    torch.testing.assert_close((q3 * ka).sum(-1), (q103 * kb).sum(-1))


def test_position_zero_is_identity_and_offsets_match_position_tensors() -> None:
    rope = RotaryEmbedding(16, max_seqlen=4)  # small table: the calls below must grow it
    q, k = torch.randn(2, 6, 3, 16), torch.randn(2, 6, 1, 16)
    q0, k0 = rope(q[:, :1], k[:, :1], 0)
    assert torch.equal(q0, q[:, :1]) and torch.equal(k0, k[:, :1])
    by_offset = rope(q, k, 10)
    by_tensor = rope(q, k, torch.arange(10, 16))
    per_batch = rope(q, k, torch.arange(10, 16).expand(2, 6))
    for a, b, c in zip(by_offset, by_tensor, per_batch):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(7)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="positions"):
        rope(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), torch.arange(4))
