"""Modules built on the public sigmoid-attention functions: attention, transformer block, positions, KV cache."""

from sigattn.nn.alibi import alibi_slopes
from sigattn.nn.attention import SigmoidAttention
from sigattn.nn.block import LayerScale, TransformerBlock
from sigattn.nn.kv_cache import KVCache
from sigattn.nn.mlp import MLP
from sigattn.nn.norm import make_norm
from sigattn.nn.rope import RotaryEmbedding, rotate_half

__all__ = [
    "KVCache",
    "LayerScale",
    "MLP",
    "RotaryEmbedding",
    "SigmoidAttention",
    "TransformerBlock",
    "alibi_slopes",
    "make_norm",
    "rotate_half",
]
