"""Preallocated key/value cache for decoding: per-layer buffers and per-sequence lengths."""

from __future__ import annotations

import torch

from sigattn.nn.checks import check_positive_int


class KVCache:
    """Contiguous per-layer key/value cache for batched decoding with the attention modules.

    Arguments:
        nlayers: number of attention layers that share the cache (layer i uses ``layer(i)``).
        batch: number of sequences.
        max_seqlen: positions per sequence (prompt + generated tokens).
        nheads_kv, head_dim: as the attention modules' key/value heads.
        dtype: dtype of the cache, which must equal the activations' (default float32).
        device: device of the cache (default: torch's default device).

    State:
        k[i], v[i]: layer i's buffers (batch, max_seqlen, nheads_kv, head_dim), zero-filled.
        seqlens: int32 (batch,), tokens already in each sequence's cache, shared by all layers.

    One step of a model: every layer's attention writes its new keys/values at positions
    ``seqlens[b] ..`` and attends over them (seqlens is not changed by the layers, since every layer
    must see the same offset); after the last layer the caller calls ``advance(seqlen_new)``.
    Paged storage (issue 4) fits behind the same interface: ``block_table`` is None here, and the
    modules pass it to ``sigmoid_attn_with_kvcache`` as it is.
    """

    def __init__(
        self,
        nlayers: int,
        batch: int,
        max_seqlen: int,
        nheads_kv: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (
            ("nlayers", nlayers), ("batch", batch), ("max_seqlen", max_seqlen),
            ("nheads_kv", nheads_kv), ("head_dim", head_dim),
        ):
            check_positive_int(name, value)
        shape = (batch, max_seqlen, nheads_kv, head_dim)
        # Zeros, not empty: unwritten slots are never read, but zeros keep a stray read finite and visible.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(nlayers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(nlayers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k[0].device)
        self.block_table: torch.Tensor | None = None
        self.max_seqlen = max_seqlen

    @property
    def nlayers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer `layer_idx`, each (batch, max_seqlen, nheads_kv, head_dim)."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.nlayers:
            raise ValueError(f"layer_idx must be an int in [0, {self.nlayers}); got {layer_idx!r}")
        return self.k[layer_idx], self.v[layer_idx]

    def check_room(self, seqlen_new: int) -> None:
        """Raise if `seqlen_new` more tokens do not fit in every sequence."""
        longest = int(self.seqlens.max().item())
        if longest + seqlen_new > self.max_seqlen:
            raise ValueError(
                f"KV cache full: {longest} cached + {seqlen_new} new tokens exceed max_seqlen = {self.max_seqlen}"
            )

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new k, v (batch, seqlen_new, nheads_kv, head_dim) of a layer at positions seqlens[b] + t.

        For attention paths that do not append themselves (softmax); the sigmoid path lets
        ``sigmoid_attn_with_kvcache`` append in place instead. seqlens is not changed.
        """
        seqlen_new = k.shape[1]
        self.check_room(seqlen_new)
        k_cache, v_cache = self.layer(layer_idx)
        rows = torch.arange(self.batch, device=k_cache.device)[:, None]  # [batch, 1]
        cols = self.seqlens.long()[:, None] + torch.arange(seqlen_new, device=k_cache.device)  # [batch, seqlen_new]
        k_cache[rows, cols] = k.to(k_cache.dtype)
        v_cache[rows, cols] = v.to(v_cache.dtype)

    def advance(self, seqlen_new: int | torch.Tensor) -> None:
        """Count `seqlen_new` more tokens (an int, or an int tensor (batch,) per sequence) as cached."""
        if isinstance(seqlen_new, torch.Tensor):
            step = seqlen_new.to(device=self.seqlens.device, dtype=torch.int32)
            if tuple(step.shape) not in ((), (self.batch,)) or bool((step < 0).any()):
                raise ValueError(f"seqlen_new must be >= 0 with shape () or (batch,); got {tuple(step.shape)}")
        else:
            if isinstance(seqlen_new, bool) or not isinstance(seqlen_new, int) or seqlen_new < 0:
                raise ValueError(f"seqlen_new must be an int >= 0; got {seqlen_new!r}")
            step = seqlen_new
        if int((self.seqlens + step).max().item()) > self.max_seqlen:
            raise ValueError(f"advancing by {seqlen_new} overflows max_seqlen = {self.max_seqlen}")
        self.seqlens += step

    def reset(self) -> None:
        """Forget every cached token (buffers are kept; stale values are never read)."""
        self.seqlens.zero_()
