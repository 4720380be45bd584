"""ALiBi slopes per head, the geometric sequence of Press et al. (2022)."""

from __future__ import annotations

import math

import torch


def _power_of_two_slopes(n: int) -> list[float]:
    # Head i (1-based) of n gets 2^(-8 i / n): the ALiBi paper's sequence, e.g. 1/2, 1/4, ..., 1/256 for n = 8.
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]


def alibi_slopes(nheads: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The ALiBi slopes of `nheads` heads as a float32 (nheads,) tensor, all positive.

    For a power of two n, head i (0-based) gets 2^(-8 (i + 1) / n). Otherwise (as the paper's reference
    code) the n' = 2^floor(log2 n) slopes of n' heads come first, then every other slope of 2 n' heads
    until nheads are filled. The public functions add ``-slope * |i - j|`` to the scores, so positive
    slopes penalise distance.
    """
    if isinstance(nheads, bool) or not isinstance(nheads, int) or nheads <= 0:
        raise ValueError(f"nheads must be a positive int; got {nheads!r}")
    closest = 2 ** math.floor(math.log2(nheads))
    slopes = _power_of_two_slopes(closest)
    if closest < nheads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: nheads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
