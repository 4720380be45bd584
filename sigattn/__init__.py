"""sigattn: sigmoid self-attention (out = sigmoid(scale * q @ k^T + bias) @ v) for PyTorch."""

from sigattn.ops.api import (
    available_backends,
    scaled_dot_product_sigmoid_attention,
    sigmoid_attn_backward,
    sigmoid_attn_func,
    sigmoid_attn_varlen_func,
    sigmoid_attn_with_kvcache,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "scaled_dot_product_sigmoid_attention",
    "sigmoid_attn_backward",
    "sigmoid_attn_func",
    "sigmoid_attn_varlen_func",
    "sigmoid_attn_with_kvcache",
]
