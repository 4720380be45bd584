"""TransformerBlock: attention + MLP sublayers with pre-, post- or hybrid norm and LayerScale."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sigattn.nn.attention import SigmoidAttention
from sigattn.nn.checks import check_choice, check_positive_float
from sigattn.nn.kv_cache import KVCache
from sigattn.nn.mlp import MLP
from sigattn.nn.norm import NORMS, make_norm

NORM_PLACEMENTS = ("pre", "post", "hybrid")


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma * x`` with gamma (dim,) initialised to `init` (Touvron et al. 2021)."""

    def __init__(
        self, dim: int, init: float = 1e-4, *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return x * self.gamma


class TransformerBlock(nn.Module):
    """One transformer layer, (batch, seqlen, dim) -> (batch, seqlen, dim), with a SigmoidAttention sublayer.

    With f a sublayer (attention, then MLP), N a norm and LS the LayerScale:
        "pre":    x + LS(f(N(x)))
        "post":   N(x + LS(f(x)))
        "hybrid": x + LS(N'(f(N(x))))      (the paper's hybrid norm: the branch output is normalised too,
                                            which keeps large initial attention outputs from the residual)

    Arguments:
        dim, nheads: model width and query heads.
        norm_placement: "pre" (default), "post" or "hybrid".
        norm: "rms" (default) or "layer"; norm_eps (default 1e-6) is also passed to the QK norm.
        layerscale: initial LayerScale value (default 1e-4); None turns LayerScale off.
        mlp: "gelu" (default) or "swiglu"; mlp_ratio (default 4.0), mlp_multiple_of (default 1) and
            mlp_bias (default False) as MLP.
        layer_idx: this block's layer in a shared KVCache (default 0).
        **attention_options: passed to SigmoidAttention (nheads_kv, head_dim, attention, train_seqlen,
            learnable_bias, qk_norm, positional, causal, backend, sigmoid_impl, ...).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        dim: int,
        nheads: int,
        *,
        norm_placement: str = "pre",
        norm: str = "rms",
        norm_eps: float = 1e-6,
        layerscale: float | None = 1e-4,
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        mlp_multiple_of: int = 1,
        mlp_bias: bool = False,
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **attention_options: Any,
    ) -> None:
        super().__init__()
        check_choice("norm_placement", norm_placement, NORM_PLACEMENTS)
        check_choice("norm", norm, NORMS)
        check_positive_float("norm_eps", norm_eps)
        if layerscale is not None and (isinstance(layerscale, bool) or not isinstance(layerscale, (int, float))):
            raise ValueError(f"layerscale must be a float or None; got {layerscale!r}")
        self.norm_placement = norm_placement
        factory = {"device": device, "dtype": dtype}
        attention_options.setdefault("norm_eps", norm_eps)
        self.attn = SigmoidAttention(dim, nheads, layer_idx=layer_idx, **attention_options, **factory)
        self.mlp = MLP(dim, mlp, ratio=mlp_ratio, multiple_of=mlp_multiple_of, bias=mlp_bias, **factory)

        def new_norm() -> nn.Module:
            return make_norm(norm, dim, eps=norm_eps, **factory)

        # "pre"/"post" use one norm per sublayer; "hybrid" adds one on each branch's output.
        self.attn_norm, self.mlp_norm = new_norm(), new_norm()
        hybrid = norm_placement == "hybrid"
        self.attn_out_norm = new_norm() if hybrid else None
        self.mlp_out_norm = new_norm() if hybrid else None
        self.attn_scale: nn.Module = nn.Identity() if layerscale is None else LayerScale(dim, layerscale, **factory)
        self.mlp_scale: nn.Module = nn.Identity() if layerscale is None else LayerScale(dim, layerscale, **factory)

    def _sublayer(
        self,
        x: torch.Tensor,
        f: Callable[[torch.Tensor], torch.Tensor],
        norm: nn.Module,
        out_norm: nn.Module | None,
        scale: nn.Module,
    ) -> torch.Tensor:
        """One residual sublayer x -> x' around branch f, per norm_placement (see the class docstring)."""
        match self.norm_placement:
            case "pre":
                return x + scale(f(norm(x)))
            case "post":
                return norm(x + scale(f(x)))
            case _:
                assert out_norm is not None
                return x + scale(out_norm(f(norm(x))))

    def forward(
        self, x: torch.Tensor, *, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (batch, seqlen, dim) -> (batch, seqlen, dim); kv_cache and attn_mask as SigmoidAttention.forward."""
        x = self._sublayer(
            x,
            lambda h: self.attn(h, kv_cache=kv_cache, attn_mask=attn_mask),
            self.attn_norm,
            self.attn_out_norm,
            self.attn_scale,
        )
        return self._sublayer(x, self.mlp, self.mlp_norm, self.mlp_out_norm, self.mlp_scale)
