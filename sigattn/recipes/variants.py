"""The named attention recipes that the training comparisons run: softmax, the paper's sigmoid, and its ablations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """How the attention sublayers of a model are built; every field maps to a TransformerBlock option.

    bias: the sigmoid bias b; None means the paper's b = -log(n), n = the training sequence length
        (context for the LM, number of tokens for the ViT). Softmax ignores it (row-shift invariant).
    changes: the fields in which this variant differs from "sigmoid" (the tests check that it differs in
        exactly these), so a comparison changes one thing at a time.
    """

    name: str
    description: str
    attention: str = "sigmoid"
    bias: float | None = None
    layerscale: float | None = 1e-4
    norm_placement: str = "hybrid"
    qk_norm: str | None = "rms"
    positional: str | None = "rope"
    changes: tuple[str, ...] = ()

    def block_options(self, train_seqlen: int) -> dict[str, Any]:
        """Keyword arguments for TransformerBlock (and so SigmoidAttention) with sequence length train_seqlen."""
        return {
            "attention": self.attention,
            "train_seqlen": train_seqlen,
            "bias_init": self.bias,
            "layerscale": self.layerscale,
            "norm_placement": self.norm_placement,
            "qk_norm": self.qk_norm,
            "positional": self.positional,
        }


SIGMOID = Variant("sigmoid", "the paper's recipe: sigmoid, b = -log(n), LayerScale 1e-4, hybrid norm, QK RMSNorm, RoPE")


def _ablation(name: str, description: str, **changes: Any) -> Variant:
    return dataclasses.replace(SIGMOID, name=name, description=description, changes=tuple(sorted(changes)), **changes)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _ablation("softmax", "softmax (SDPA) with the same blocks as 'sigmoid'", attention="softmax"),
        SIGMOID,
        _ablation("sigmoid-b0", "sigmoid without the bias: b = 0", bias=0.0),
        _ablation("sigmoid-no-layerscale", "sigmoid without LayerScale", layerscale=None),
        _ablation("sigmoid-no-qknorm", "sigmoid without QK norm", qk_norm=None),
        _ablation("sigmoid-alibi", "sigmoid with ALiBi instead of RoPE", positional="alibi"),
    )
}


def get_variants(names: list[str] | tuple[str, ...] | None) -> list[Variant]:
    """The variants named (in that order, duplicates dropped); None, [] or a list with "all" means every variant."""
    if not names or "all" in names:
        return list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)} or 'all'")
    return [VARIANTS[n] for n in dict.fromkeys(names)]
