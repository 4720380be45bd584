"""SigmoidAttention: multi-head (GQA) self-attention with the paper's sigmoid recipe, or softmax for comparison."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sigattn.nn.alibi import alibi_slopes
from sigattn.nn.checks import BACKENDS, SIGMOID_IMPLS, check_choice, check_positive_float, check_positive_int
from sigattn.nn.kv_cache import KVCache
from sigattn.nn.norm import make_norm
from sigattn.nn.rope import RotaryEmbedding
from sigattn.ops.api import scaled_dot_product_sigmoid_attention, sigmoid_attn_func, sigmoid_attn_with_kvcache

ATTENTIONS = ("sigmoid", "softmax")
QK_NORMS = ("rms", "layer", None)
POSITIONALS = ("rope", "alibi", None)


class SigmoidAttention(nn.Module):
    """Self-attention ``o_proj(sigmoid(scale * q @ k^T + b [- alibi]) @ v)`` over (batch, seqlen, dim) inputs.

    Arguments:
        dim: model width (input and output features).
        nheads: query heads.
        nheads_kv: key/value heads (GQA/MQA); None means nheads. nheads must be a multiple of it;
            query head h uses kv head h // (nheads // nheads_kv).
        head_dim: per-head width; None means dim // nheads (then dim must be divisible by nheads).
        qkv_bias: additive bias in the q/k/v projections (default False). out_bias: in o_proj (False).
        attention: "sigmoid" (default) or "softmax" (F.scaled_dot_product_attention with the same
            projections, norms and positions, for comparisons; the sigmoid bias is ignored there, since
            softmax is invariant to a per-row constant).
        train_seqlen: the training sequence length n that sets the bias b = -log(n) (default 1024; for a
            ViT, the number of tokens). The bias is fixed, so decoding and longer inputs use the trained value.
        bias_init: the bias value instead of -log(train_seqlen); None (default) means -log(train_seqlen).
        learnable_bias: False (default): b is a Python float (``attn_bias``), not trained. True: b is an
            nn.Parameter ``attn_bias`` of shape (nheads,), one per head, initialised to the value above.
        qk_norm: "rms", "layer" or None (default): a norm over head_dim applied to q and to k (separate
            weights, shared by the heads) before the positional encoding; it bounds the logits.
        norm_eps: eps of the QK norms (default 1e-6).
        positional: "rope" (rotary, half rotation as Llama), "alibi" (per-head slopes 2^(-8 i / nheads)
            added as -slope * |i - j|) or None (default).
        rope_base: rotary frequency base (default 10000.0).
        causal: causal mask (default False: bidirectional). With a KV cache the mask is aligned to the
            cached length, so query t of a step sits at position seqlens[b] + t.
        scale: logit multiplier; None means 1 / sqrt(head_dim).
        layer_idx: which layer of a shared KVCache this module uses (default 0).
        sigmoid_impl, backend: passed to the sigmoid functions ("fast"/"accurate"; "auto"/"reference"/"triton").
        device, dtype: of the parameters.

    Shapes: forward takes x (batch, seqlen, dim) and returns (batch, seqlen, dim).
    """

    def __init__(
        self,
        dim: int,
        nheads: int,
        *,
        nheads_kv: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        attention: str = "sigmoid",
        train_seqlen: int = 1024,
        bias_init: float | None = None,
        learnable_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        positional: str | None = None,
        rope_base: float = 10000.0,
        causal: bool = False,
        scale: float | None = None,
        layer_idx: int = 0,
        sigmoid_impl: str = "fast",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("nheads", nheads)
        nheads_kv = nheads if nheads_kv is None else check_positive_int("nheads_kv", nheads_kv)
        if nheads % nheads_kv:
            raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
        if head_dim is None:
            if dim % nheads:
                raise ValueError(f"dim ({dim}) must be divisible by nheads ({nheads}) when head_dim is None")
            head_dim = dim // nheads
        check_positive_int("head_dim", head_dim)
        check_choice("attention", attention, ATTENTIONS)
        check_choice("qk_norm", qk_norm, QK_NORMS)
        check_choice("positional", positional, POSITIONALS)
        check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
        check_choice("backend", backend, BACKENDS)
        check_positive_int("train_seqlen", train_seqlen)
        check_positive_float("norm_eps", norm_eps)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool; got {causal!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite float or None; got {scale!r}")
        if bias_init is not None and (isinstance(bias_init, bool) or not isinstance(bias_init, (int, float))
                                      or not math.isfinite(bias_init)):
            raise ValueError(f"bias_init must be a finite float or None; got {bias_init!r}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0; got {layer_idx!r}")

        self.dim, self.nheads, self.nheads_kv, self.head_dim = dim, nheads, nheads_kv, head_dim
        self.attention, self.positional, self.causal = attention, positional, causal
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        self.layer_idx, self.sigmoid_impl, self.backend = layer_idx, sigmoid_impl, backend
        self.train_seqlen = train_seqlen
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(dim, nheads * head_dim, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(dim, nheads_kv * head_dim, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(dim, nheads_kv * head_dim, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(nheads * head_dim, dim, bias=out_bias, **factory)

        # The paper's b = -log(n): with it the row sums of sigmoid(q k^T / sqrt(d) + b) start near 1, as
        # softmax's do, instead of ~n/2 at b = 0, which is what makes sigmoid training stable.
        b = -math.log(train_seqlen) if bias_init is None else float(bias_init)
        self.attn_bias: float | nn.Parameter
        if learnable_bias:
            self.attn_bias = nn.Parameter(torch.full((nheads,), b, **factory))
        else:
            self.attn_bias = b

        self.q_norm = self.k_norm = None
        if qk_norm is not None:
            self.q_norm = make_norm(qk_norm, head_dim, eps=norm_eps, argname="qk_norm", **factory)
            self.k_norm = make_norm(qk_norm, head_dim, eps=norm_eps, argname="qk_norm", **factory)
        self.rope = RotaryEmbedding(head_dim, base=rope_base) if positional == "rope" else None
        slopes = alibi_slopes(nheads, device=device) if positional == "alibi" else None
        # Not persistent: derived from nheads, so old checkpoints load whatever the positional choice.
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # module.to(bfloat16) would round the ALiBi slopes (12 heads: 0.7071 -> 0.7070, an error that grows with
        # distance): keep them float32, only moving their device.
        slopes = self.alibi_slopes
        super()._apply(fn, recurse)
        if slopes is not None:
            self.alibi_slopes = slopes.to(device=self.alibi_slopes.device)
        return self

    def extra_repr(self) -> str:
        bias = "learnable" if isinstance(self.attn_bias, nn.Parameter) else f"{self.attn_bias:.4g}"
        return (
            f"attention={self.attention!r}, nheads={self.nheads}, nheads_kv={self.nheads_kv}, "
            f"head_dim={self.head_dim}, bias={bias}, positional={self.positional!r}, causal={self.causal}"
        )

    def forward(
        self, x: torch.Tensor, *, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend over x (batch, seqlen, dim); returns (batch, seqlen, dim).

        attn_mask: None (default), or a bool mask broadcastable to (batch, nheads, seqlen, seqlen), True =
            attend (a key padding mask is (batch, 1, 1, seqlen)); masked keys contribute exactly 0, and it is
            combined with `causal`. Not with a KV cache or ALiBi. Sigmoid with a mask runs on the reference
            backend (scaled_dot_product_sigmoid_attention), so backend="triton" raises for it.

        kv_cache: None (default) attends within x. A KVCache makes this a decode / chunked-prefill step:
            the step's keys and values are written into layer ``layer_idx`` of the cache at positions
            ``kv_cache.seqlens[b] ..`` (RoPE and ALiBi use those absolute positions) and the queries
            attend over everything cached so far. The cache's seqlens is not advanced here: every layer
            of a model writes at the same offset, so the caller calls ``kv_cache.advance(seqlen)``
            after the last layer. Contiguous and paged caches both work; on CUDA the sigmoid step runs the
            decode kernel (sigmoid_attn_with_kvcache).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seqlen, dim = {self.dim}); got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if attn_mask is not None and (kv_cache is not None or self.alibi_slopes is not None
                                      or attn_mask.dtype != torch.bool):
            raise ValueError("attn_mask must be a bool tensor, and cannot be combined with a KV cache or ALiBi")
        positions: torch.Tensor | int = 0
        if kv_cache is not None:
            kv_cache.reserve(seqlen)
            positions = kv_cache.seqlens.long()[:, None] + torch.arange(seqlen, device=x.device)
        q, k, v = self.project(x, positions)

        if attn_mask is not None:
            out = self._masked(q, k, v, attn_mask)
        elif self.attention == "softmax":
            out = self._softmax(q, k, v, kv_cache)
        elif kv_cache is None:
            out = sigmoid_attn_func(
                q, k, v, bias=self.attn_bias, scale=self.scale, causal=self.causal,
                alibi_slopes=self.alibi_slopes, sigmoid_impl=self.sigmoid_impl, backend=self.backend,
            )
        else:
            k_cache, v_cache = kv_cache.layer(self.layer_idx)
            out = sigmoid_attn_with_kvcache(
                q, k_cache, v_cache, k, v, cache_seqlens=kv_cache.cache_seqlens(), bias=self.attn_bias,
                block_table=kv_cache.block_table, scale=self.scale, causal=self.causal,
                alibi_slopes=self.alibi_slopes, sigmoid_impl=self.sigmoid_impl, backend=self.backend,
            )
        return self.o_proj(out.reshape(batch, seqlen, self.nheads * self.head_dim))

    def project(
        self, x: torch.Tensor, positions: torch.Tensor | int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v this module attends with: projections, QK norm, then RoPE at ``positions``.

        x: (batch, seqlen, dim); positions: an int offset, or (batch, seqlen) absolute positions (decode).
        Returns q (batch, seqlen, nheads, head_dim), k and v (batch, seqlen, nheads_kv, head_dim), one dtype.
        """
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.nheads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.nheads_kv, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.nheads_kv, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, k, positions)
        # CUDA autocast runs norms in float32: bring q/k back to v's dtype, the kernels take one dtype.
        return q.to(v.dtype), k.to(v.dtype), v

    def _masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Softmax (SDPA) or sigmoid attention under a bool attn_mask (and `causal`); q (batch, seqlen, nheads, d)."""
        if self.causal:
            seqlen = q.shape[1]
            attn_mask = attn_mask & torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        groups = self.nheads // self.nheads_kv
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, d]
        if self.attention == "softmax":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        else:
            out = scaled_dot_product_sigmoid_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                                       bias=self.attn_bias, sigmoid_impl=self.sigmoid_impl,
                                                       backend=self.backend)
        return out.transpose(1, 2)

    def _softmax(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """Softmax attention through SDPA with the same masks and positions; q (batch, seqlen, nheads, d)."""
        batch, seqlen = q.shape[:2]
        start = torch.zeros(batch, dtype=torch.long, device=q.device)  # position of each sequence's first query
        if kv_cache is not None:
            kv_cache.write(self.layer_idx, k, v)
            start = kv_cache.seqlens.long()
            k, v = kv_cache.gather(self.layer_idx, max(kv_cache.lengths) + seqlen)
        groups = self.nheads // self.nheads_kv
        # Repeat instead of SDPA's enable_gqa, which needs torch >= 2.5 (we support 2.4).
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, d]
        if kv_cache is None and self.alibi_slopes is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
            return out.transpose(1, 2)
        seqlen_k = k.shape[2]
        q_pos = start[:, None] + torch.arange(seqlen, device=q.device)  # [batch, seqlen]
        k_pos = torch.arange(seqlen_k, device=q.device)
        rel = q_pos[:, :, None] - k_pos  # [batch, seqlen, seqlen_k]
        visible = k_pos < (start + seqlen)[:, None, None]  # keys beyond a sequence's cached length
        if self.causal:
            visible = visible & (rel >= 0)
        mask = torch.zeros(rel.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        mask = mask[:, None]  # [batch, 1, seqlen, seqlen_k]
        if self.alibi_slopes is not None:
            slopes = self.alibi_slopes.to(q.dtype)[None, :, None, None]
            mask = mask - slopes * rel.abs().to(q.dtype)[:, None]  # [batch, nheads, seqlen, seqlen_k]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2)
