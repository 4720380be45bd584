"""HF transformers adapter: ``attn_implementation="sigmoid"`` for models that dispatch through AttentionInterface.

Usage::

    from sigattn.integrations import transformers as sigattn_hf

    sigattn_hf.register()
    config = LlamaConfig(..., sigmoid_attn_train_seqlen=2048)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sigmoid")  # or from_pretrained(...)

It serves models whose attention layers dispatch through ``ALL_ATTENTION_FUNCTIONS.get_interface(...)``, with
transformers' mask helpers (masking_utils): tested on Llama, Qwen2 and Mistral (forward, backward, generate with
dynamic and static caches, padding) and BERT and ViT encoders. Importing this module imports transformers;
``import sigattn`` never does.

The bias b (``sigmoid(scale * q @ k^T + b) @ v``) is one fixed number per model, resolved per call in this order:

1. ``module.sigmoid_attn_bias`` on the attention layer, if set (float or tensor () / (nheads,); a learnable
   ``nn.Parameter`` you attach receives gradients);
2. ``config.sigmoid_attn_bias`` (float);
3. ``-log(config.sigmoid_attn_train_seqlen)``;
4. the default ``-log(n)`` with n = ``config.max_position_embeddings`` (decoders, BERT), or for a ViT-style config
   without it the token count ``(image_size // patch_size) ** 2 + 1`` (patches plus the class token).

Paths: calls with no mask (no padding; plain causal or bidirectional) and no attention dropout run sigmoid_attn_func
(the Triton kernels on CUDA); among them, cached decode steps (q_length < kv_length, q_length <= 16, nothing
requiring grad) run sigmoid_attn_with_kvcache over the cache's tensors (the decode kernel on CUDA: each K/V byte read
once per GQA group, split-KV for small batches). transformers skips the mask of cached steps only for one query, so
in practice these are the single-token steps of generate(). Padded batches, packed sequences, sliding-window
layers (Mistral), static caches (their mask covers the unfilled slots) and attention dropout run the reference with
transformers' materialised bool mask: correct, not fused. K/V live in transformers' own Cache objects (DynamicCache,
StaticCache), not in sigattn.nn.KVCache; transformers' paged continuous-batching cache is not supported.

Set ``sigmoid_attn_train_seqlen`` when the model was (or will be) trained at a length other than
max_position_embeddings (e.g. Llama configs that advertise a 128k context). The bias does not follow the length
of each call: a cached decode step then computes exactly what a full recompute computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sigattn.ops.api import scaled_dot_product_sigmoid_attention, sigmoid_attn_func, sigmoid_attn_with_kvcache
from sigattn.ops.reference import visible_mask
from sigattn.ops.validation import BACKENDS, SIGMOID_IMPLS, check_choice

__all__ = ["attention_bias", "config_bias", "make_attention_forward", "register", "sigmoid_mask"]

NAME = "sigmoid"
# Longest query chunk sent to the decode kernel (speculative decoding); longer chunks take the dense kernel.
DECODE_MAX_SEQLEN_Q = 16


def _pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def _default_train_seqlen(config: Any) -> int:
    mpe = getattr(config, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        return mpe
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image_size is not None and patch_size is not None:
        (ih, iw), (ph, pw) = _pair(image_size), _pair(patch_size)
        return (ih // ph) * (iw // pw) + 1
    raise ValueError(
        f"cannot derive the sigmoid attention bias from {type(config).__name__}: it has neither "
        "max_position_embeddings nor image_size/patch_size; set config.sigmoid_attn_train_seqlen (b = -log(n)) "
        "or config.sigmoid_attn_bias"
    )


def config_bias(config: Any) -> float:
    """The bias b for a model config: ``sigmoid_attn_bias``, else ``-log(sigmoid_attn_train_seqlen)``, else
    ``-log(max_position_embeddings)`` (ViT-style configs: ``-log((image_size // patch_size) ** 2 + 1)``)."""
    b = getattr(config, "sigmoid_attn_bias", None)
    if b is not None:
        b = float(b)
        if not math.isfinite(b):
            raise ValueError(f"config.sigmoid_attn_bias must be finite; got {b!r}")
        return b
    n = getattr(config, "sigmoid_attn_train_seqlen", None)
    if n is None:
        n = _default_train_seqlen(config)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"config.sigmoid_attn_train_seqlen must be an int >= 1; got {n!r}")
    return -math.log(n)


def attention_bias(module: torch.nn.Module) -> float | torch.Tensor:
    """The bias for one attention layer: ``module.sigmoid_attn_bias`` if set, else ``config_bias(module.config)``."""
    b = getattr(module, "sigmoid_attn_bias", None)
    if b is not None:
        return b
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(
            f"{type(module).__name__} has no .config to read the sigmoid bias from; set module.sigmoid_attn_bias"
        )
    return config_bias(config)


def sigmoid_mask(**kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` (bool (batch, 1, q_length, kv_length), True = attend, or None), except that a
    causal mask is only skipped where q_length == kv_length or q_length == 1.

    None then always means "causal bottom-right from module.is_causal, or no mask" in the attention function.
    SDPA's own rule also skips the mask for a static-cache prefill (kv_length > q_length, q_offset = 0), where it
    relies on SDPA's top-left ``is_causal``, an alignment sigmoid_attn_func does not have. Keyword arguments are
    passed through, so both signatures work (transformers 5: q_length/q_offset; 4.5x: cache_position).
    """
    q_length = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
    if q_length != kwargs["kv_length"] and q_length != 1:
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**kwargs)


def make_attention_forward(*, sigmoid_impl: str = "fast", backend: str = "auto") -> Callable[..., Any]:
    """The function to register in transformers' AttentionInterface; sigmoid_impl, backend: as sigmoid_attn_func."""

    def sigmoid_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Sigmoid attention in transformers' calling convention.

        query: (batch, nheads, seqlen_q, headdim); key, value: (batch, nheads_k, seqlen_k, headdim) (GQA when
        nheads_k < nheads). attention_mask: None, or bool / additive float broadcastable to
        (batch, 1 or nheads, seqlen_q, seqlen_k) (cached decoding: the mask is bottom-right aligned by transformers).
        With no mask, causal comes from `is_causal` or else `module.is_causal` (default True), aligned bottom-right.
        No mask and no dropout run sigmoid_attn_func (the Triton kernels on CUDA), or for cached steps of up to 16
        queries sigmoid_attn_with_kvcache (the decode kernel on CUDA); otherwise the SDPA-style function.

        Returns ((batch, seqlen_q, nheads, headdim), None): attention weights are never materialised.
        """
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("sigmoid attention does not support logit softcapping")
        if kwargs.get("position_bias") is not None:
            raise NotImplementedError("sigmoid attention does not support an additive position_bias (T5-style)")
        if kwargs.get("cache") is not None:
            raise NotImplementedError("sigmoid attention does not support the paged (continuous-batching) cache")
        bias = attention_bias(module)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        sq, sk = query.shape[2], key.shape[2]
        dropout = float(dropout or 0.0)
        if attention_mask is None and dropout == 0.0:
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            needs_grad = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, bias)
            )
            if 1 <= sq <= DECODE_MAX_SEQLEN_Q and sq < sk and not needs_grad:
                # A cached step: key/value already hold this step's tokens, so the "cache" is all sk of them.
                out = sigmoid_attn_with_kvcache(
                    q, k, v, cache_seqlens=sk, bias=bias, scale=scaling, causal=causal,
                    sigmoid_impl=sigmoid_impl, backend=backend,
                )
            else:
                out = sigmoid_attn_func(
                    q, k, v, bias=bias, scale=scaling, causal=causal, sigmoid_impl=sigmoid_impl, backend=backend,
                )
            return out, None
        mask = attention_mask
        if mask is None:
            if causal:
                mask = visible_mask(sq, sk, causal=True, device=query.device)
        else:
            if mask.shape[-1] > sk:
                mask = mask[..., :sk]
            if mask.dtype != torch.bool:
                mask = mask.to(query.dtype)
        out = scaled_dot_product_sigmoid_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1], bias=bias, sigmoid_impl=sigmoid_impl, backend=backend,
        )
        return out.transpose(1, 2).contiguous(), None

    return sigmoid_attention_forward


def register(name: str = NAME, *, sigmoid_impl: str = "fast", backend: str = "auto") -> str:
    """Register sigmoid attention under `name` in transformers' AttentionInterface and AttentionMaskInterface.

    Afterwards ``attn_implementation=name`` works in ``from_pretrained``, ``from_config``, model constructors and
    ``model.set_attn_implementation(name)``. Idempotent; registering again replaces the functions (e.g. to switch
    `backend`: "auto" = Triton kernels on CUDA, reference on CPU; "reference"; "triton"). Returns `name`.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash_attention"):
        raise ValueError(f"name must be a new attention implementation name; got {name!r}")
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    AttentionInterface.register(name, make_attention_forward(sigmoid_impl=sigmoid_impl, backend=backend))
    AttentionMaskInterface.register(name, sigmoid_mask)
    return name
