"""The recipes' models: a byte-level GPT and a small ViT, both stacks of TransformerBlocks built from a Variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sigattn.nn import SigmoidAttention, TransformerBlock, make_norm
from sigattn.recipes.variants import Variant


@dataclass(frozen=True)
class ModelShape:
    """Width, depth and heads shared by both models; mlp is "gelu" or "swiglu"."""

    dim: int
    depth: int
    nheads: int
    mlp: str = "gelu"


def _blocks(shape: ModelShape, variant: Variant, train_seqlen: int, causal: bool, backend: str) -> nn.ModuleList:
    options: dict[str, Any] = variant.block_options(train_seqlen)
    return nn.ModuleList(
        TransformerBlock(shape.dim, shape.nheads, mlp=shape.mlp, causal=causal, backend=backend, layer_idx=i, **options)
        for i in range(shape.depth)
    )


def _init_weights(module: nn.Module) -> None:
    # GPT-2 style: N(0, 0.02) for linear and embedding weights, zero biases; norms keep their ones/zeros.
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class GPT(nn.Module):
    """Causal byte-level language model: tokens (batch, seqlen) int64 -> logits (batch, seqlen, vocab_size).

    Embedding, `depth` causal TransformerBlocks built from `variant` with b = -log(context), a final norm and
    an untied output head. Positions come from the variant (RoPE or ALiBi); there is no absolute embedding.
    """

    def __init__(
        self, shape: ModelShape, variant: Variant, *, context: int, vocab_size: int = 256, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, shape.dim)
        self.blocks = _blocks(shape, variant, context, causal=True, backend=backend)
        self.norm = make_norm("rms", shape.dim)
        self.head = nn.Linear(shape.dim, vocab_size, bias=False)
        _init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise ValueError(f"tokens must be (batch, seqlen <= {self.context}); got {tuple(tokens.shape)}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ViT(nn.Module):
    """Vision transformer: images (batch, channels, size, size) -> logits (batch, num_classes).

    Non-overlapping patch embedding, a class token, learned absolute position embeddings, `depth`
    bidirectional TransformerBlocks built from `variant` with b = -log(number of tokens) (the variant's
    RoPE or ALiBi acts along the raster order of the tokens, on top of the learned embedding), a final
    norm and a linear head on the class token.
    """

    def __init__(
        self,
        shape: ModelShape,
        variant: Variant,
        *,
        image_size: int,
        patch: int,
        channels: int,
        num_classes: int,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
        self.num_tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(channels, shape.dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, shape.dim))
        self.blocks = _blocks(shape, variant, self.num_tokens, causal=False, backend=backend)
        self.norm = make_norm("layer", shape.dim)
        self.head = nn.Linear(shape.dim, num_classes)
        _init_weights(self)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [batch, patches, dim]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # [batch, tokens, dim]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def attention_modules(model: nn.Module) -> list[SigmoidAttention]:
    """The model's attention modules in layer order (for forward hooks)."""
    return [m for m in model.modules() if isinstance(m, SigmoidAttention)]
