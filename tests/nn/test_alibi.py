"""ALiBi slopes: the paper's geometric sequence, for powers of two and otherwise."""

from __future__ import annotations

import pytest
import torch

from sigattn.nn import alibi_slopes


def test_power_of_two_heads() -> None:
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))


def test_other_head_counts_interleave_the_next_power() -> None:
    # 6 heads: the 4-head slopes, then every other 8-head slope (2^-1, 2^-3), as the ALiBi reference code.
    expected = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected))
    assert alibi_slopes(12).shape == (12,) and bool((alibi_slopes(12) > 0).all())


def test_bad_nheads_raises() -> None:
    with pytest.raises(ValueError, match="nheads"):
        alibi_slopes(0)
