"""Preallocated key/value cache for decoding: per-layer buffers, per-sequence lengths, optional paging."""

from __future__ import annotations

import torch

from sigattn.nn.checks import check_positive_int


class KVCache:
    """Per-layer key/value cache for batched decoding with the attention modules, contiguous or paged.

    Arguments:
        nlayers: number of attention layers that share the cache (layer i uses ``layer(i)``).
        batch: number of sequences.
        max_seqlen: positions per sequence (prompt + generated tokens).
        nheads_kv, head_dim: as the attention modules' key/value heads.
        dtype: dtype of the cache, which must equal the activations' (default float32).
        device: device of the cache (default: torch's default device).
        page_size: None (default): contiguous buffers (batch, max_seqlen, nheads_kv, head_dim). An int: paged
            buffers (num_blocks, page_size, nheads_kv, head_dim) shared by all sequences, with ``block_table``
            mapping each sequence's pages to blocks; blocks are handed out as sequences grow (a free list) and
            come back on ``release``/``reset``. Multiples of 16 suit the kernel's key tiles (any size works).
        num_blocks: paged only: blocks per layer (default: enough for every sequence at max_seqlen). Fewer blocks
            than that share memory between sequences of different lengths; running out raises.

    State:
        k[i], v[i]: layer i's buffers, zero-filled.
        seqlens: int32 (batch,), tokens already in each sequence's cache, shared by all layers. Change it only
            through ``advance``/``release``/``reset``: a host copy (``lengths``) mirrors it, so steps need no sync.
        block_table: None (contiguous), or int32 (batch, ceil(max_seqlen / page_size)): page p of sequence b is
            block ``block_table[b, p]``; -1 where no block is assigned yet.

    One step of a model: ``reserve(seqlen_new)`` (the modules call it; it assigns pages), every layer's attention
    writes its new keys/values at positions ``seqlens[b] ..`` and attends over them (seqlens is not changed by the
    layers, since every layer must see the same offset); after the last layer the caller calls
    ``advance(seqlen_new)``.
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
        page_size: int | None = None,
        num_blocks: int | None = None,
    ) -> None:
        for name, value in (
            ("nlayers", nlayers), ("batch", batch), ("max_seqlen", max_seqlen),
            ("nheads_kv", nheads_kv), ("head_dim", head_dim),
        ):
            check_positive_int(name, value)
        self.max_seqlen = max_seqlen
        self.page_size = None if page_size is None else check_positive_int("page_size", page_size)
        if self.page_size is None:
            if num_blocks is not None:
                raise ValueError("num_blocks needs page_size (a paged cache)")
            shape = (batch, max_seqlen, nheads_kv, head_dim)
        else:
            pages_per_seq = -(-max_seqlen // self.page_size)
            num_blocks = batch * pages_per_seq if num_blocks is None else check_positive_int("num_blocks", num_blocks)
            shape = (num_blocks, self.page_size, nheads_kv, head_dim)
        # Zeros, not empty: unwritten slots are never read, but zeros keep a stray read finite and visible.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(nlayers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(nlayers)]
        dev = self.k[0].device
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=dev)
        self._lengths = [0] * batch
        self.block_table: torch.Tensor | None = None
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        self._free: list[int] = []
        if self.page_size is not None:
            self.block_table = torch.full((batch, -(-max_seqlen // self.page_size)), -1, dtype=torch.int32, device=dev)
            # Popped from the end: block 0 first, and sequences growing together get interleaved blocks.
            self._free = list(range(shape[0] - 1, -1, -1))

    @property
    def nlayers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def lengths(self) -> list[int]:
        """Host copy of seqlens."""
        return list(self._lengths)

    @property
    def free_blocks(self) -> int:
        """Paged: blocks not assigned to any sequence (0 for a contiguous cache)."""
        return len(self._free)

    def cache_seqlens(self) -> torch.Tensor | int:
        """What to pass as sigmoid_attn_with_kvcache's cache_seqlens: an int when every sequence has the same
        length (the call then needs no device-to-host read), else the seqlens tensor."""
        first = self._lengths[0]
        return first if all(n == first for n in self._lengths) else self.seqlens

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer `layer_idx`: (batch, max_seqlen, nheads_kv, head_dim), or paged
        (num_blocks, page_size, nheads_kv, head_dim)."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.nlayers:
            raise ValueError(f"layer_idx must be an int in [0, {self.nlayers}); got {layer_idx!r}")
        return self.k[layer_idx], self.v[layer_idx]

    def check_room(self, seqlen_new: int) -> None:
        """Raise if `seqlen_new` more tokens do not fit in every sequence."""
        longest = max(self._lengths)
        if longest + seqlen_new > self.max_seqlen:
            raise ValueError(
                f"KV cache full: {longest} cached + {seqlen_new} new tokens exceed max_seqlen = {self.max_seqlen}"
            )

    def reserve(self, seqlen_new: int) -> None:
        """Make room for `seqlen_new` more tokens in every sequence: check max_seqlen and, paged, assign the blocks
        that positions seqlens[b] .. seqlens[b] + seqlen_new - 1 need. Idempotent until ``advance``."""
        self.check_room(seqlen_new)
        self._assign([n + seqlen_new for n in self._lengths])

    def _assign(self, lengths: list[int]) -> None:
        if self.block_table is None or self.page_size is None:
            return
        missing = [max(0, -(-n // self.page_size) - len(pages)) for n, pages in zip(lengths, self._pages)]
        if sum(missing) > len(self._free):
            raise ValueError(
                f"KV cache out of blocks: lengths {lengths} need {sum(missing)} more pages of {self.page_size} and "
                f"{len(self._free)} of {self.k[0].shape[0]} blocks are free (pass a larger num_blocks)"
            )
        for pages, m in zip(self._pages, missing):
            pages.extend(self._free.pop() for _ in range(m))
        if any(missing):
            table = [pages + [-1] * (self.block_table.shape[1] - len(pages)) for pages in self._pages]
            # In place: callers (CUDA graphs, modules) may hold this tensor.
            self.block_table.copy_(torch.tensor(table, dtype=torch.int32), non_blocking=True)

    def slots(self, seqlen_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Index pair into a layer's buffers of positions seqlens[b] + t, t < seqlen_new: each (batch, seqlen_new)."""
        dev = self.seqlens.device
        pos = self.seqlens.long()[:, None] + torch.arange(seqlen_new, device=dev)  # [batch, seqlen_new]
        if self.block_table is None or self.page_size is None:
            return torch.arange(self.batch, device=dev)[:, None].expand_as(pos), pos
        blocks = self.block_table.long().gather(1, pos // self.page_size)
        return blocks, pos % self.page_size

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new k, v (batch, seqlen_new, nheads_kv, head_dim) of a layer at positions seqlens[b] + t.

        For attention paths that do not append themselves (softmax); the sigmoid path lets
        ``sigmoid_attn_with_kvcache`` append in place instead. seqlens is not changed.
        """
        seqlen_new = k.shape[1]
        self.reserve(seqlen_new)
        k_cache, v_cache = self.layer(layer_idx)
        idx = self.slots(seqlen_new)
        k_cache[idx] = k.to(k_cache.dtype)
        v_cache[idx] = v.to(v_cache.dtype)

    def gather(self, layer_idx: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 .. seqlen - 1 of every sequence of a layer as (batch, seqlen, nheads_kv, head_dim) k and v: a
        view (contiguous) or a copy (paged). Positions past a sequence's length hold stale or zero values."""
        k_cache, v_cache = self.layer(layer_idx)
        if self.block_table is None or self.page_size is None:
            return k_cache[:, :seqlen], v_cache[:, :seqlen]
        pos = torch.arange(seqlen, device=k_cache.device)
        blocks = self.block_table.long()[:, pos // self.page_size].clamp_min(0)  # [batch, seqlen]
        return k_cache[blocks, pos % self.page_size], v_cache[blocks, pos % self.page_size]

    def advance(self, seqlen_new: int | torch.Tensor) -> None:
        """Count `seqlen_new` more tokens (an int, or an int tensor (batch,) per sequence) as cached."""
        step: int | torch.Tensor
        if isinstance(seqlen_new, torch.Tensor):
            if tuple(seqlen_new.shape) not in ((), (self.batch,)):
                raise ValueError(f"seqlen_new must be >= 0 with shape () or (batch,); got {tuple(seqlen_new.shape)}")
            step = seqlen_new.to(device=self.seqlens.device, dtype=torch.int32)
            steps = step.expand(self.batch).tolist()  # the host copy needs the values: one read
        else:
            if isinstance(seqlen_new, bool) or not isinstance(seqlen_new, int):
                raise ValueError(f"seqlen_new must be an int >= 0; got {seqlen_new!r}")
            step, steps = seqlen_new, [seqlen_new] * self.batch
        if any(s < 0 for s in steps):
            raise ValueError(f"seqlen_new must be >= 0; got {seqlen_new!r}")
        lengths = [n + s for n, s in zip(self._lengths, steps)]
        if max(lengths) > self.max_seqlen:
            raise ValueError(f"advancing by {seqlen_new} overflows max_seqlen = {self.max_seqlen}")
        self._assign(lengths)
        self._lengths = lengths
        self.seqlens += step

    def release(self, seq: int) -> None:
        """Forget sequence `seq`'s tokens and return its blocks (paged), e.g. to start a new request in its slot."""
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < self.batch:
            raise ValueError(f"seq must be an int in [0, {self.batch}); got {seq!r}")
        self._free.extend(reversed(self._pages[seq]))
        self._pages[seq] = []
        self._lengths[seq] = 0
        self.seqlens[seq] = 0
        if self.block_table is not None:
            self.block_table[seq] = -1

    def reset(self) -> None:
        """Forget every cached token (buffers are kept; stale values are never read); paged: free every block."""
        for b in range(self.batch):
            self.release(b)
