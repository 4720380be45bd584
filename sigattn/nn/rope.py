"""Rotary position embedding (half rotation, as Llama) with a cached cos/sin table and position offsets."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (split in halves, as Llama; not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary embedding of q and k: ``x * cos(p θ) + rotate_half(x) * sin(p θ)`` at position p.

    Arguments:
        head_dim: even size of the rotated last dim; frequencies θ_i = base^(-2i / head_dim),
            i < head_dim / 2, each used for dims i and i + head_dim / 2.
        base: the frequency base (default 10000.0, as Llama).
        max_seqlen: initial size of the cos/sin table (default 2048); it grows on demand.

    The table is built in float64 and cast to the input's dtype when applied, so the angles of large
    positions do not lose precision before the cast; it is not part of the state dict.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, max_seqlen: int = 2048) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int for rope; got {head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"rope base must be a number > 1; got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._initial = max(int(max_seqlen), 1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def _table(self, needed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin float64 (n, head_dim) with n >= needed; rebuilt (doubling) when short or on another device."""
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != device:
            n = max(self._initial, needed)
            if self._cos is not None and self._cos.device == device:
                n = max(n, 2 * self._cos.shape[0])
            inv_freq = self.base ** (
                -torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
            )
            angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq  # [n, d/2]
            angles = torch.cat((angles, angles), dim=-1)  # [n, d]
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of integer `positions` (any shape, all >= 0), shaped positions.shape + (head_dim,) in `dtype`.

        Reads positions.max() on the host (one device sync); forward with an int offset avoids it.
        """
        if positions.numel() == 0:
            cos, sin = self._table(1, positions.device)
        else:
            if int(positions.min().item()) < 0:
                raise ValueError("rope positions must be >= 0")
            cos, sin = self._table(int(positions.max().item()) + 1, positions.device)
        positions = positions.long()
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (batch, seqlen, nheads, head_dim) and k (batch, seqlen, nheads_kv, head_dim).

        positions: an int offset (token t gets position offset + t; default 0), or an integer tensor
            (seqlen,) or (batch, seqlen) of positions, e.g. ``cache_seqlens[:, None] + arange(seqlen)``
            when decoding sequences of different lengths.
        Returns the rotated (q, k), same shapes and dtypes.
        """
        seqlen = q.shape[1]
        if isinstance(positions, int):
            if positions < 0:
                raise ValueError(f"rope position offset must be >= 0; got {positions}")
            # Host-side slice: no device sync on the training path (the table size is known here).
            cos, sin = self._table(positions + seqlen, q.device)
            cos = cos[positions : positions + seqlen].to(q.dtype)
            sin = sin[positions : positions + seqlen].to(q.dtype)
        else:
            if positions.dim() not in (1, 2) or positions.shape[-1] != seqlen:
                raise ValueError(
                    f"positions must be an int or have shape (seqlen,) or (batch, seqlen) with seqlen = {seqlen}; "
                    f"got {tuple(positions.shape)}"
                )
            cos, sin = self.cos_sin(positions, q.dtype)
        cos, sin = cos[..., None, :], sin[..., None, :]  # [(batch,) seqlen, 1, head_dim]: broadcast over heads
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
