"""timm adapter: convert a timm ViT's softmax attention modules to sigmoid attention in place, keeping the weights.

Usage::

    import timm
    from sigattn.integrations.timm import convert

    model = convert(timm.create_model("vit_small_patch16_224", pretrained=False))

Importing this module imports timm (which needs torchvision); ``import sigattn`` never does.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from sigattn.ops.api import scaled_dot_product_sigmoid_attention, sigmoid_attn_func
from sigattn.ops.validation import BACKENDS, SIGMOID_IMPLS, check_choice

__all__ = ["SigmoidTimmAttention", "convert", "model_num_tokens"]


class SigmoidTimmAttention(nn.Module):
    """Drop-in for ``timm.models.vision_transformer.Attention`` computing ``sigmoid(scale * q @ k^T + b) @ v``.

    It adopts the converted module's submodules under the same names (qkv, q_norm, k_norm, attn_drop, norm, gate,
    proj, proj_drop): the parameters are the same tensors and the state_dict keys are unchanged, so checkpoints load
    into either form. With ``learnable_bias`` the only new entry is ``attn_bias`` (nheads,).

    Arguments:
        attn: the timm Attention module to take over.
        bias: float b, or None: -log(N) of each call's token count N.
        learnable_bias: make b an nn.Parameter ``attn_bias`` of shape (nheads,) initialised to `bias` (which must
            then be a float).
        sigmoid_impl, backend: as sigmoid_attn_func.

    Shapes: forward takes x (batch, N, dim) and returns (batch, N, dim_out), as timm's Attention.
    """

    def __init__(
        self,
        attn: nn.Module,
        *,
        bias: float | None,
        learnable_bias: bool = False,
        sigmoid_impl: str = "fast",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        # `norm` (scale_norm) and `gate` exist in newer timm releases only.
        norm = getattr(attn, "norm", None)
        self.norm = nn.Identity() if norm is None else norm
        self.gate = getattr(attn, "gate", None)
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self.sigmoid_impl, self.backend = sigmoid_impl, backend
        self.attn_bias: float | None | nn.Parameter
        if learnable_bias:
            if bias is None:
                raise ValueError("learnable_bias=True needs a float bias (pass bias= or train_seqlen=)")
            w = attn.qkv.weight
            self.attn_bias = nn.Parameter(torch.full((self.num_heads,), float(bias), device=w.device, dtype=w.dtype))
        else:
            self.attn_bias = bias
        self.train(attn.training)

    def extra_repr(self) -> str:
        if isinstance(self.attn_bias, nn.Parameter):
            bias = "learnable"
        else:
            bias = "-log(N)" if self.attn_bias is None else f"{self.attn_bias:.4g}"
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, bias={bias}"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: (batch, N, dim). attn_mask: None, bool (True = attend) or float (added to the scores), broadcastable
        to (batch, nheads, N, N). is_causal: causal mask (N x N, so its alignment does not matter)."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and dropout == 0.0:
            out = sigmoid_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias=self.attn_bias, scale=self.scale,
                causal=is_causal, sigmoid_impl=self.sigmoid_impl, backend=self.backend,
            )  # [B, N, H, D]
        else:
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(q.dtype)
            out = scaled_dot_product_sigmoid_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale,
                bias=self.attn_bias, sigmoid_impl=self.sigmoid_impl, backend=self.backend,
            ).transpose(1, 2)
        x = self.norm(out.reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def model_num_tokens(model: nn.Module) -> int | None:
    """Tokens a timm ViT attends over at its configured image size: patches plus prefix (class and register)
    tokens; None when the model does not say (no ``patch_embed.num_patches``)."""
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(patches, int):
        return None
    return patches + int(getattr(model, "num_prefix_tokens", 0))


def convert(
    model: nn.Module,
    *,
    bias: float | None = None,
    train_seqlen: int | None = None,
    learnable_bias: bool = False,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
) -> nn.Module:
    """Replace every ``timm.models.vision_transformer.Attention`` in `model` by SigmoidTimmAttention, in place.

    Weights are kept (the new modules hold the same parameter tensors under the same state_dict keys); the
    training/eval mode of each module is kept. Subclasses of Attention, which may compute something else, and
    other attention classes (AttentionRope, attention pooling) are left alone.

    Arguments:
        model: a timm model, usually a VisionTransformer (also works on any module containing timm Attention).
        bias: the fixed b for every layer. Mutually exclusive with train_seqlen.
        train_seqlen: n for b = -log(n).
        If both are None: n = the model's token count at its configured image size, patches plus class and
            register tokens (``patch_embed.num_patches + num_prefix_tokens``; e.g. 197 for a 224/16 ViT with a
            class token), fixed like the paper's b = -log(n); for a model without ``patch_embed`` the bias is
            -log(N) of each call's token count N.
        learnable_bias: b becomes a per-layer nn.Parameter ``attn_bias`` (nheads,) initialised as above.
        sigmoid_impl, backend: as sigmoid_attn_func ("auto": Triton kernels on CUDA, reference on CPU).

    Returns the same `model`. Raises ValueError if it contains no timm Attention module. Count the converted
    modules with ``sum(isinstance(m, SigmoidTimmAttention) for m in model.modules())``.
    """
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    if bias is not None and train_seqlen is not None:
        raise ValueError("pass bias or train_seqlen, not both")
    if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)):
        raise ValueError(f"bias must be a finite float or None; got {bias!r}")
    if train_seqlen is not None and (isinstance(train_seqlen, bool) or not isinstance(train_seqlen, int)
                                     or train_seqlen < 1):
        raise ValueError(f"train_seqlen must be an int >= 1 or None; got {train_seqlen!r}")
    if bias is None:
        n = train_seqlen if train_seqlen is not None else model_num_tokens(model)
        bias = None if n is None else -math.log(n)
    else:
        bias = float(bias)

    # remove_duplicate=False: an Attention shared by several blocks is replaced at every place it is registered.
    targets = [
        (name, module) for name, module in model.named_modules(remove_duplicate=False) if type(module) is Attention
    ]
    if not targets:
        raise ValueError(f"no timm Attention module found in {type(model).__name__}")
    if targets[0][0] == "":
        raise ValueError("model is itself a timm Attention module; wrap it with SigmoidTimmAttention(model, ...)")
    replaced: dict[int, SigmoidTimmAttention] = {}  # one replacement per module, so sharing stays sharing
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(module) not in replaced:
            replaced[id(module)] = SigmoidTimmAttention(
                module, bias=bias, learnable_bias=learnable_bias, sigmoid_impl=sigmoid_impl, backend=backend
            )
        setattr(parent, child, replaced[id(module)])
    return model
