"""Shape sweeps: the FlashAttention-paper sweep keeps 16k tokens and hidden 2048; size parsing."""

import pytest

from sigattn.bench.shapes import causal_flags, flash_sweep, parse_sizes, quick_sweep


def test_flash_sweep_constant_tokens_and_hidden() -> None:
    shapes = flash_sweep()
    assert len(shapes) == 6 * 2 * 2
    for s in shapes:
        assert s.batch * s.seqlen_q == 16384
        assert s.nheads * s.headdim == 2048
        assert s.seqlen_q == s.seqlen_k
    assert sorted({s.seqlen_q for s in shapes}) == [512, 1024, 2048, 4096, 8192, 16384]


def test_quick_sweep_is_tiny() -> None:
    shapes = quick_sweep()
    assert {(s.batch, s.nheads) for s in shapes} == {(1, 2)}
    assert max(s.seqlen_k for s in shapes) <= 256


def test_parse_sizes_and_causal_flags() -> None:
    assert parse_sizes("512,1k 16K") == [512, 1024, 16384]
    assert causal_flags("both") == (False, True)
    with pytest.raises(ValueError):
        causal_flags("maybe")
