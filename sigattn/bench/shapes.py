"""Benchmark shape sweeps: the FlashAttention-paper sweep (16k tokens, hidden 2048) and a tiny CPU preset."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FLASH_TOKENS = 16 * 1024  # batch * seqlen, constant across the sweep
FLASH_HIDDEN = 2048  # nheads * headdim
FLASH_SEQLENS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
FLASH_HEADDIMS: tuple[int, ...] = (64, 128)

QUICK_BATCH = 1
QUICK_NHEADS = 2
QUICK_SEQLENS: tuple[int, ...] = (128, 256)
QUICK_HEADDIMS: tuple[int, ...] = (32, 64)


@dataclass(frozen=True)
class Shape:
    """One attention problem: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads, headdim)."""

    batch: int
    nheads: int
    seqlen_q: int
    seqlen_k: int
    headdim: int
    causal: bool

    def key(self) -> tuple[int, int, int, int, int, bool]:
        return (self.batch, self.nheads, self.seqlen_q, self.seqlen_k, self.headdim, self.causal)


def causal_flags(causal: str) -> tuple[bool, ...]:
    """'yes' -> (True,), 'no' -> (False,), 'both' -> (False, True)."""
    flags = {"yes": (True,), "no": (False,), "both": (False, True)}
    if causal not in flags:
        raise ValueError(f"causal must be one of {sorted(flags)}, got {causal!r}")
    return flags[causal]


def flash_sweep(
    seqlens: Sequence[int] = FLASH_SEQLENS,
    headdims: Sequence[int] = FLASH_HEADDIMS,
    causal: Iterable[bool] = (False, True),
    tokens: int = FLASH_TOKENS,
    hidden: int = FLASH_HIDDEN,
    batch: int | None = None,
    nheads: int | None = None,
) -> list[Shape]:
    """The FlashAttention-2 paper's sweep: batch = tokens // seqlen, nheads = hidden // headdim.

    An explicit batch / nheads overrides the derived value for every shape.
    """
    shapes = []
    for is_causal in causal:
        for d in headdims:
            for n in seqlens:
                b = batch if batch is not None else max(1, tokens // n)
                h = nheads if nheads is not None else max(1, hidden // d)
                shapes.append(Shape(b, h, n, n, d, is_causal))
    return shapes


def quick_sweep(
    seqlens: Sequence[int] = QUICK_SEQLENS,
    headdims: Sequence[int] = QUICK_HEADDIMS,
    causal: Iterable[bool] = (False, True),
    batch: int | None = None,
    nheads: int | None = None,
) -> list[Shape]:
    """Tiny shapes (B=1, H=2, N=128..256, d=32/64) that a CPU sweeps in seconds."""
    b = QUICK_BATCH if batch is None else batch
    h = QUICK_NHEADS if nheads is None else nheads
    return [Shape(b, h, n, n, d, c) for c in causal for d in headdims for n in seqlens]


def parse_size(text: str) -> int:
    """'512' -> 512, '2k' -> 2048, '16K' -> 16384."""
    t = text.strip().lower()
    if t.endswith("k"):
        return int(t[:-1]) * 1024
    return int(t)


def parse_sizes(text: str) -> list[int]:
    """Comma- or space-separated sizes with an optional k suffix: '512,1k,2k' -> [512, 1024, 2048]."""
    return [parse_size(p) for p in text.replace(",", " ").split()]
