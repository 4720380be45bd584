"""FLOP and byte models against hand counts."""

import pytest

from sigattn.bench.flops import attn_bytes, attn_flops, gb_per_s, tflops_per_s, varlen_attn_flops, visible_pairs


def test_forward_flops_hand_count() -> None:
    # q @ k^T: 2*Nq*Nk*d, p @ v: 2*Nq*Nk*d, per (batch, head): 2 * 3 * (4 * 512 * 512 * 64).
    assert attn_flops(2, 3, 512, 512, 64) == 2 * 3 * 4 * 512 * 512 * 64


def test_causal_square_is_exactly_half() -> None:
    assert attn_flops(1, 1, 1024, 1024, 128, causal=True) == attn_flops(1, 1, 1024, 1024, 128) / 2
    assert visible_pairs(7, 7, causal=True) == 24.5


@pytest.mark.parametrize(("mode", "factor"), [("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)])
def test_mode_factors(mode: str, factor: float) -> None:
    assert attn_flops(4, 16, 2048, 2048, 128, causal=True, mode=mode) == factor * 2 * 4 * 16 * 2048 * 2048 * 128


def test_causal_rectangular_is_bottom_right() -> None:
    # Nq=2, Nk=5: query 0 sees keys 0..3 (4), query 1 sees 0..4 (5).
    assert visible_pairs(2, 5, causal=True) == 9
    # Decode: one query sees every key.
    assert attn_flops(1, 1, 1, 1000, 64, causal=True) == 4 * 1000 * 64
    # Nq > Nk: the first Nq - Nk queries see nothing; query i sees i - (Nq - Nk) + 1 keys.
    assert visible_pairs(5, 2, causal=True) == 1 + 2


def test_bytes_hand_count() -> None:
    b, h, nq, nk, d, es = 2, 4, 8, 16, 32, 2
    q, kv = b * h * nq * d, b * h * nk * d
    assert attn_bytes(b, h, nq, nk, d, es, "fwd") == es * (q + 2 * kv + q)
    assert attn_bytes(b, h, nq, nk, d, es, "bwd") == es * (3 * q + 4 * kv)
    assert attn_bytes(b, h, nq, nk, d, es, "fwd+bwd") == es * (5 * q + 6 * kv)
    # GQA: K/V with 1 head.
    assert attn_bytes(b, h, nq, nk, d, es, "fwd", nheads_kv=1) == es * (2 * q + 2 * b * nk * d)


def test_rates() -> None:
    assert tflops_per_s(2e12, 1000.0) == pytest.approx(2.0)
    assert gb_per_s(3e9, 500.0) == pytest.approx(6.0)


def test_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode"):
        attn_flops(1, 1, 1, 1, 1, mode="backward")


def test_varlen_flops_sum_sequences() -> None:
    # An equal-length pack is the dense batch; mixed lengths count each sequence's own pairs only.
    assert varlen_attn_flops([512] * 4, [512] * 4, 8, 64, causal=True) == attn_flops(4, 8, 512, 512, 64, causal=True)
    assert varlen_attn_flops([3, 0, 5], [2, 7, 5], 2, 16, mode="bwd") == 2.5 * 4 * 2 * 16 * (3 * 2 + 5 * 5)
