"""Normalisation layers by name ("rms" | "layer"), shared by QK norm and the transformer block."""

from __future__ import annotations

import torch
from torch import nn

from sigattn.nn.checks import check_choice

NORMS = ("rms", "layer")


def make_norm(
    name: str,
    dim: int,
    *,
    eps: float = 1e-6,
    argname: str = "norm",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """RMSNorm or LayerNorm over the last dim of size `dim`, with a learnable scale (and shift for "layer").

    `argname` is the constructor argument that named the norm, so a bad name is reported as the
    caller's argument (e.g. ``qk_norm must be one of 'rms', 'layer', None``).
    """
    check_choice(argname, name, NORMS)
    if name == "rms":
        return nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
