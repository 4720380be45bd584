"""Feed-forward sublayer of the transformer block: GELU MLP or SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sigattn.nn.checks import check_choice, check_positive_float, check_positive_int

MLPS = ("gelu", "swiglu")


def hidden_size(dim: int, ratio: float, multiple_of: int) -> int:
    """int(ratio * dim) rounded up to a multiple of `multiple_of` (as Llama's multiple_of)."""
    hidden = max(int(ratio * dim), 1)
    return -(-hidden // multiple_of) * multiple_of


class MLP(nn.Module):
    """``fc2(gelu(fc1 x))`` ("gelu") or ``w2(silu(w1 x) * w3 x)`` ("swiglu"), (..., dim) -> (..., dim).

    Arguments:
        dim: input/output width.
        kind: "gelu" (default) or "swiglu".
        ratio: hidden width = ratio * dim (default 4.0), rounded up to `multiple_of` (default 1). SwiGLU
            has three matrices, so ratio 8/3 gives it the parameter count of a 4x GELU MLP.
        bias: additive bias in the linear layers (default False).
    """

    def __init__(
        self,
        dim: int,
        kind: str = "gelu",
        *,
        ratio: float = 4.0,
        multiple_of: int = 1,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_choice("mlp", kind, MLPS)
        check_positive_float("mlp_ratio", ratio)
        check_positive_int("mlp_multiple_of", multiple_of)
        self.kind = kind
        self.hidden = hidden_size(dim, ratio, multiple_of)
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Linear(dim, self.hidden, bias=bias, **factory)
        self.w3 = nn.Linear(dim, self.hidden, bias=bias, **factory) if kind == "swiglu" else None
        self.w2 = nn.Linear(self.hidden, dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
