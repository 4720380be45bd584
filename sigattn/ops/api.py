"""Public sigmoid-attention functions: argument checks, default resolution and the one backend dispatch."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import torch

from sigattn.ops import reference
from sigattn.ops.configs import lazy_module
from sigattn.ops.validation import (
    BACKENDS,
    SIGMOID_IMPLS,
    DenseArgs,
    check_alibi,
    check_batch_and_seqlen,
    check_bias,
    check_choice,
    check_cu_seqlens,
    check_dense_args,
    check_dense_call,
    check_flag,
    check_max_seqlen,
    check_qkv_heads,
    check_same,
    check_scale,
    check_tensor,
    check_window,
    checked,
    dense_signature,
    dtype_name,
    from_memo,
    memo_of,
    remember,
)

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
# tl.dot needs K >= 16: smaller head dims fail to compile on the GPU (seen on H100, head dim 8).
TRITON_MIN_HEAD_DIM = 16


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sigattn[gpu]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "on CPU the kernels need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
    return f"no Triton kernels for device type {device.type!r}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: cuda if present, else cpu), best first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return (["triton"] if _triton_unavailable(device) is None else []) + ["reference"]


def _resolve_backend(backend: str, device: torch.device, triton_gap: str | None) -> str:
    """The one dispatch rule: auto → Triton on CUDA when it can serve the call, else the reference.

    `triton_gap` is why the kernels cannot serve this particular call (a feature or dtype), or None.
    An explicitly requested backend that cannot serve the call raises; it never falls back.
    """
    match backend:
        case "reference":
            return "reference"
        case "triton":
            reason = _triton_unavailable(device) or triton_gap
            if reason is not None:
                raise ValueError(f"backend='triton' cannot serve this call: {reason}")
            return "triton"
        case "auto":
            usable = device.type == "cuda" and _triton_unavailable(device) is None and triton_gap is None
            return "triton" if usable else "reference"
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def _dense_triton_gap(q: torch.Tensor, alibi_slopes: torch.Tensor | None) -> str | None:
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} (the kernels take float16, bfloat16 and float32)"
    if not TRITON_MIN_HEAD_DIM <= q.shape[-1] <= TRITON_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernels take {TRITON_MIN_HEAD_DIM} to {TRITON_MAX_HEAD_DIM})"
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        return "alibi_slopes that require grad (the kernels return no slope gradient; the reference does)"
    return None


def _per_head_bias(bias: float | torch.Tensor, nheads: int, device: torch.device) -> torch.Tensor:
    """The kernels take a float32 (nheads,) bias; gradients flow back to a user tensor through expand. A float bias
    (modules pass their fixed -log n) is filled once per (value, nheads, device) and reused: a fill per call cost a
    kernel launch of host time."""
    if isinstance(bias, torch.Tensor):
        return bias.float().expand(nheads)
    return _cached_device_tensor(
        _BIAS_CACHE, (bias, nheads, device), device,
        lambda: torch.full((nheads,), bias, dtype=torch.float32, device=device),
    )


_BIAS_CACHE: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def _cached_device_tensor(cache: dict, key: tuple, device: torch.device, make) -> torch.Tensor:
    """make()'s read-only tensor, built once per key and reused (at most 64 entries per cache; past that, built per
    call). Not cached under torch.compile (a traced constant) or CUDA graph capture (the build would only be
    recorded, not run)."""
    if torch.compiler.is_compiling():
        return make()
    cached = cache.get(key)
    if cached is not None:
        return cached
    if len(cache) >= 64 or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return make()
    # A normal tensor even inside inference_mode, so later autograd calls can save it for backward. Entries are
    # never evicted: a captured CUDA graph may hold a pointer to one.
    with torch.inference_mode(False):
        t = make()
    if device.type == "cuda":
        # Once per entry: the build is queued on this stream, and a later call on another stream would otherwise
        # read the tensor with no ordering after it.
        torch.cuda.current_stream(device).synchronize()
    cache[key] = t
    return t


def sigmoid_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: float | torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid attention, ``out = sigmoid(scale * q @ k^T + bias [- alibi]) @ v`` with no row normaliser.

    Arguments (layout as flash_attn_func):
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_k, headdim).
        v: (batch, seqlen_k, nheads_k, headdim).
            float16, bfloat16, float32 or float64, one dtype and one device for all three.
            GQA/MQA: nheads must be a multiple of nheads_k; query head h attends with kv head
            h // (nheads // nheads_k).
        bias: float, or a tensor of shape () or (nheads,) (learnable: its gradient is returned).
            None means -log(seqlen_k), the paper's b = -log(n). Modules pass the fixed value of their
            training length instead.
        scale: multiplier of q @ k^T. None means 1 / sqrt(headdim).
        causal: causal mask, aligned to the bottom-right corner when seqlen_q != seqlen_k
            (as flash_attn). With seqlen_q = 2, seqlen_k = 5 (1 = attend)::

                1 1 1 1 0
                1 1 1 1 1

            With seqlen_q = 5, seqlen_k = 2 the first three rows see nothing and output 0::

                0 0
                0 0
                0 0
                1 0
                1 1

        window_size: (left, right) sliding window; query i attends key j iff
            i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right; -1 = unbounded.
            causal=True sets right to 0.
        alibi_slopes: (nheads,) or (batch, nheads); adds -slope * |i + seqlen_k - seqlen_q - j| to the
            score in full (sigmoid is not shift-invariant, so the row-constant part is kept).
            Used as float32.
        deterministic: bitwise-reproducible backward (no atomics) on the Triton backend.
        sigmoid_impl: "fast" (tanh.approx on GPU) or "accurate" (exp-based). The reference ignores it.
        backend: "auto" (Triton on CUDA when it serves the call, else the reference), "triton" (CUDA,
            or CPU under TRITON_INTERPRET=1; raises if it cannot serve the call), "reference".

    Masked positions contribute exactly 0; a query row that sees no key outputs 0.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
    """
    args = check_dense_call(
        q, k, v, bias, scale, causal, window_size, alibi_slopes, deterministic, sigmoid_impl, backend
    )
    return _dense_attention(q, k, v, args, causal, deterministic, sigmoid_impl, backend)


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: DenseArgs, causal: bool, deterministic: bool,
    sigmoid_impl: str, backend: str,
) -> torch.Tensor:
    """sigmoid_attn_func after its checks (`args`: `check_dense_args`'s result): the backend rule and the call. The
    SDPA-style function's dense calls enter here too, so their arguments are checked once, not twice."""
    b, hq, sk, scale, bias, window, alibi = args
    backend = _resolve_backend(backend, q.device, _dense_triton_gap(q, alibi))
    if q.numel() == 0 or sk == 0:
        return _empty_attention(q, k, v, bias)
    match backend:
        case "triton":
            custom_ops = lazy_module("sigattn.ops.custom_ops")
            if alibi is not None:
                alibi = alibi.expand(b, hq).contiguous()
            return custom_ops.sigmoid_attn_dense(
                q, k, v, _per_head_bias(bias, hq, q.device), scale, causal, window[0], window[1],
                alibi, deterministic, sigmoid_impl,
            )
        case _:
            return reference.sigmoid_attn(
                q, k, v, scale=scale, bias=bias, causal=causal, window_size=window, alibi_slopes=alibi
            )


def sigmoid_attn_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: float | torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
    need_dbias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of ``sigmoid_attn_func`` on its own: gradients from dO with no forward pass and no autograd.

    Sigmoid attention's backward needs only q, k, v and dO (dS = dP * p * (1 - p): no saved output, no LSE),
    so callers that schedule the pieces themselves (context parallelism: one call per ring step, the
    partial gradients over disjoint key shards simply add) pay no recomputed forward.

    Arguments: do is (batch, seqlen_q, nheads, headdim) like the output; everything else exactly as
    sigmoid_attn_func (same defaults, masks, GQA rule, backends). need_dbias=False skips the bias reduction.

    Returns:
        (dq, dk, dv, dbias): dq, dk, dv shaped and typed like q, k, v (GQA: dk/dv summed over the query heads
        of each kv head); dbias is the gradient of a per-head bias, (nheads,) float32 (float64 for float64
        inputs), summed over batch, queries and keys (sum it again for a scalar bias), or None when
        need_dbias=False. No gradient for alibi_slopes.
    """
    # Memo key: the forward's, need_dbias, and what the do checks read (its type, dtype, device, shape).
    dense_key = dense_signature(q, k, v, bias, scale, causal, window_size, alibi_slopes, deterministic, sigmoid_impl,
                                backend, need_dbias)
    plain_do = type(do) is torch.Tensor
    sig = None if dense_key is None or not plain_do else ("bwd", dense_key, do.dtype, do.device, do.shape)
    memo = checked(sig)
    if memo is not None:
        b, hq, sk, scale, bias, window, alibi = from_memo(memo, bias, scale, alibi_slopes)
    else:
        check_tensor("do", do, 4, "(batch, seqlen_q, nheads, headdim)")
        check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
        check_tensor("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)")
        check_tensor("v", v, 4, "(batch, seqlen_k, nheads_k, headdim)")
        check_same({"q": q, "k": k, "v": v, "do": do})
        if do.shape[:-1] != q.shape[:-1] or do.shape[-1] != v.shape[-1]:
            raise ValueError(f"do must be shaped like the output {tuple(q.shape)}; got {tuple(do.shape)}")
        args = check_dense_args(q, k, v, bias, scale, causal, window_size, alibi_slopes, deterministic,
                                 sigmoid_impl, backend)
        check_flag("need_dbias", need_dbias)
        remember(sig, memo_of(args, bias, scale))
        b, hq, sk, scale, bias, window, alibi = args
    # No slope gradient either way, so slopes that require grad need not go to the reference here.
    backend = _resolve_backend(backend, q.device, _dense_triton_gap(q, None if alibi is None else alibi.detach()))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.numel() == 0 or sk == 0:
        dbias = torch.zeros(hq, dtype=acc, device=q.device) if need_dbias else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    match backend:
        case "triton":
            custom_ops = lazy_module("sigattn.ops.custom_ops")
            if alibi is not None:
                alibi = alibi.detach().expand(b, hq).contiguous()
            return custom_ops.sigmoid_attn_dense_bwd(
                do, q.detach(), k.detach(), v.detach(), _per_head_bias(bias, hq, q.device).detach(), scale,
                causal, window[0], window[1], alibi, deterministic, sigmoid_impl, need_dbias,
            )
        case _:
            # The reference has no hand-written backward: autograd through it (it recomputes its scores per
            # chunk anyway, to bound memory). It is the oracle and the CPU path, not the fast one.
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            bias_leaf = (bias.detach().to(acc) if isinstance(bias, torch.Tensor) else torch.tensor(bias, dtype=acc,
                         device=q.device)).expand(hq).clone().requires_grad_(need_dbias)
            with torch.enable_grad():
                out = reference.sigmoid_attn(
                    *leaves, scale=scale, bias=bias_leaf, causal=causal, window_size=window,
                    alibi_slopes=None if alibi is None else alibi.detach(),
                )
                grads = torch.autograd.grad(out, leaves + ([bias_leaf] if need_dbias else []), do)
            return grads[0], grads[1], grads[2], (grads[3] if need_dbias else None)


def _empty_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: float | torch.Tensor
) -> torch.Tensor:
    """The result when a dimension is 0: shaped like q, exact zeros, connected to autograd (zero gradients).

    Sums over empty slices are exactly 0 whatever the inputs hold (a sum of the inputs times 0 is NaN when they
    hold inf, or overflow in fp16).
    """
    leaves = [q, k, v] + ([bias] if isinstance(bias, torch.Tensor) else [])
    zero = sum(t.reshape(-1)[:0].sum().to(q.dtype) for t in leaves)
    return torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device) + zero


def sigmoid_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    bias: float | torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid attention over a packed batch of variable-length sequences (as flash_attn_varlen_func).

    Arguments:
        q: (total_q, nheads, headdim), the sequences' queries packed one after another.
        k: (total_k, nheads_k, headdim).
        v: (total_k, nheads_k, headdim).
        cu_seqlens_q: int32 (batch + 1,), starts at 0, non-decreasing, ends at total_q; sequence i is
            q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]. Sequences of length 0 are allowed.
        cu_seqlens_k: int32 (batch + 1,), likewise for k and v, ending at total_k.
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence of each.
        bias: float or tensor () / (nheads,). None means -log(seqlen_k) of each sequence, so the call
            equals running each sequence alone through sigmoid_attn_func with bias=None.
        scale, causal, window_size, alibi_slopes ((nheads,) or (batch, nheads)), deterministic,
        sigmoid_impl, backend: as sigmoid_attn_func, per sequence (causal aligned bottom-right within
            each sequence).

    Backends: "auto" runs the Triton kernels on CUDA (the dense kernels' VARLEN form: one program per query or
    key block of a sequence; the grid is sized by the longest sequence and blocks past a shorter one's end idle;
    on sm_90 the Gluon kernels' VARLEN form where the dense call would take Gluon) and the reference elsewhere.
    "triton" serves what it serves for sigmoid_attn_func (float16, bfloat16 and
    float32, head dims 16-256, alibi_slopes without grad) and raises for the rest. Validation reads cu_seqlens on
    the host once per tensor version (a device sync; later calls with the same, unmodified tensor — every layer of
    a model — reuse the values; an in-place change made through PyTorch is seen, a write that bypasses it is not).

    Returns:
        out: (total_q, nheads, headdim), dtype of q.
    """
    check_tensor("q", q, 3, "(total_q, nheads, headdim)")
    check_tensor("k", k, 3, "(total_k, nheads_k, headdim)")
    check_tensor("v", v, 3, "(total_k, nheads_k, headdim)")
    check_same({"q": q, "k": k, "v": v})
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"k and v must share one total_k; got {k.shape[0]} and {v.shape[0]}")
    hq, _, d = check_qkv_heads(q.shape, k.shape, v.shape, 1, "q,k,v")
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    # Self-attention passes one tensor for both: its checks and values hold for k too (one device read, not two).
    same_cu = cu_seqlens_k is cu_seqlens_q and k.shape[0] == q.shape[0]
    cu_k = cu_q if same_cu else check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); got {len(cu_q)} and {len(cu_k)}"
        )
    check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_k)
    scale = check_scale(scale, d)
    bias = None if bias is None else check_bias(bias, hq, q.device, None)
    window = check_window(window_size, causal)
    alibi = check_alibi(alibi_slopes, len(cu_q) - 1, hq, q.device)
    check_flag("deterministic", deterministic)
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    backend = _resolve_backend(backend, q.device, _dense_triton_gap(q, alibi))
    match backend:
        case "triton":
            if q.numel() == 0 or k.shape[0] == 0:
                return _empty_attention(q, k, v, 0.0 if bias is None else bias)
            custom_ops = lazy_module("sigattn.ops.custom_ops")
            batch = len(cu_q) - 1
            if alibi is not None:
                alibi = alibi.expand(batch, hq).contiguous()
            # The longest sequences size the kernels' grids; a generous max_seqlen would only add idle programs.
            longest_q, longest_k = (max(b - a for a, b in zip(c, c[1:])) for c in (cu_q, cu_k))
            return custom_ops.sigmoid_attn_varlen(
                q, k, v, cu_seqlens_q, cu_seqlens_k, longest_q, longest_k,
                _varlen_bias(bias, cu_k, hq, q.device), scale, causal, window[0], window[1], alibi, deterministic,
                sigmoid_impl,
            )
        case _:
            return reference.sigmoid_attn_varlen(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale=scale, bias=bias, causal=causal, window_size=window, alibi_slopes=alibi,
            )


def _varlen_bias(bias: float | torch.Tensor | None, cu_k: Sequence[int], nheads: int,
                 device: torch.device) -> torch.Tensor:
    """The varlen kernels' float32 (batch, nheads) bias: None is each sequence's -log(seqlen_k) (0 without keys,
    where any value gives 0); a float or (nheads,) tensor is shared, its gradient summed back through expand."""
    batch = len(cu_k) - 1
    if bias is None:
        return _default_varlen_bias(tuple(cu_k), device)[:, None].expand(batch, nheads)
    return _per_head_bias(bias, nheads, device).expand(batch, nheads)


def _default_varlen_bias(cu_k: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """-log(seqlen_k) per sequence (0 without keys), float32 on device; cached per packing (_cached_device_tensor),
    since building it copies from host memory, which waits for the device, and every layer of a model passes the
    same packing."""
    def make() -> torch.Tensor:
        lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
        return torch.tensor([-math.log(n) if n > 0 else 0.0 for n in lens], dtype=torch.float32, device=device)

    return _cached_device_tensor(_VARLEN_BIAS_CACHE, (cu_k, device), device, make)


_VARLEN_BIAS_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def sigmoid_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | int,
    bias: float | torch.Tensor,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid attention against a KV cache, appending new keys/values in place (as flash_attn_with_kvcache).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim); seqlen_q is 1 for plain decoding.
        k_cache, v_cache: contiguous cache (batch, seqlen_cache, nheads_k, headdim), or, with block_table,
            a paged cache (num_blocks, page_block_size, nheads_k, headdim).
        k, v: None, or new tokens (batch, seqlen_new, nheads_k, headdim), written into the cache in
            place at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1. Both or neither.
        cache_seqlens: int32 (batch,) or an int: tokens already in each sequence's cache (not updated).
            Attention runs over the first cache_seqlens[b] + seqlen_new keys of sequence b, and
            cache_seqlens + seqlen_new must fit in the cache.
        bias: required (float or tensor () / (nheads,)): the KV length changes every step, so pass the
            value the model was trained with.
        block_table: None, or int32 (batch, max_blocks_per_seq): logical position p of sequence b lives
            in block block_table[b, p // page_block_size] at offset p % page_block_size.
        scale, causal (bottom-right aligned to each sequence's new length), window_size, alibi_slopes,
        sigmoid_impl, backend: as sigmoid_attn_func.

    Backends: "triton" runs the decode kernel (sigattn.ops.decode; the Triton interpreter on CPU): float16,
    bfloat16 and float32 (matmuls in 3xTF32, as the dense kernels), head dims 16-256, any seqlen_q (tuned for 1-16:
    speculative decoding), contiguous or paged caches of any page size, with unit stride along headdim. The query
    heads of a GQA group share one read of each cached K/V byte, and short batches split each sequence's keys across
    SMs (partial outputs add in fp32: sigmoid has no normaliser). Inference only: with inputs that require grad
    it raises, and "auto" runs the reference. "auto" runs the kernel on CUDA whenever it serves the call.
    No device sync: cache_seqlens and block_table values are checked (ValueError) only when they are free to read,
    an int cache_seqlens or CPU tensors. CUDA tensors' values are not read back (that would sync every step); the
    kernel keeps bad ones inside the cache instead: cache_seqlens[b] is clamped to [0, capacity - seqlen_new], and
    block ids outside [0, num_blocks) read as zero keys/values with their appends dropped. Such values then give
    wrong outputs, never out-of-bounds memory accesses; check them yourself where they can be wrong. With CUDA
    cache_seqlens the split-KV heuristic sizes splits by the cache capacity (an int sizes them exactly).

    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
    """
    check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cache_layout = (
        "(num_blocks, page_block_size, nheads_k, headdim)" if paged else "(batch, seqlen_cache, nheads_k, headdim)"
    )
    check_tensor("k_cache", k_cache, 4, cache_layout)
    check_tensor("v_cache", v_cache, 4, cache_layout)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    b, sq, _, _ = q.shape
    seqlen_new = 0
    if k is not None:
        check_tensor("k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
        check_tensor("v", v, 4, "(batch, seqlen_new, nheads_k, headdim)")
        tensors |= {"k": k, "v": v}
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"k and v must have one shape; got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != b:
            raise ValueError(f"k must have q's batch size {b}; got shape {tuple(k.shape)}")
        if tuple(k.shape[2:]) != tuple(k_cache.shape[2:]):
            raise ValueError(
                f"k must have (nheads_k, headdim) = {tuple(k_cache.shape[2:])} as k_cache; got {tuple(k.shape[2:])}"
            )
        seqlen_new = k.shape[1]
    check_same(tensors)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(
            f"k_cache and v_cache must have one shape; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    hq, _, d = check_qkv_heads(q.shape, k_cache.shape, v_cache.shape, 2, "q,k_cache,v_cache")
    if paged:
        capacity = _check_block_table(block_table, b, k_cache.shape[0], k_cache.shape[1], q.device)
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache must have q's batch size {b} in dim 0; got shape {tuple(k_cache.shape)}")
        capacity = k_cache.shape[1]
    if seqlen_new > capacity:
        raise ValueError(f"seqlen_new ({seqlen_new}) must fit in the cache ({capacity} positions per sequence)")
    # Values are checked only where reading them is free: an int, or tensors on the CPU. Reading a CUDA tensor
    # back would sync every decode step; the kernels keep out-of-range device values inside the cache instead.
    lens = [cache_seqlens] * b if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool) else None
    cache_seqlens = _check_cache_seqlens(cache_seqlens, b, q.device)
    if lens is None and cache_seqlens.device.type == "cpu":
        lens = cache_seqlens.tolist()
    if lens is not None:
        _check_cache_values(lens, block_table if paged and block_table.device.type == "cpu" else None, seqlen_new,
                            capacity, k_cache.shape[1], k_cache.shape[0])
    scale = check_scale(scale, d)
    bias = check_bias(bias, hq, q.device, None)
    window = check_window(window_size, causal)
    alibi = check_alibi(alibi_slopes, b, hq, q.device)
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    gap = _kvcache_triton_gap(q, k_cache, v_cache, [*tensors.values(), bias, alibi])
    resolved = _resolve_backend(backend, q.device, gap)
    if resolved == "reference" and (lens is None or (paged and block_table.device.type != "cpu")):
        # The reference reads the values on the host anyway: check them all here.
        _check_cache_values(cache_seqlens.tolist(), block_table, seqlen_new, capacity, k_cache.shape[1],
                            k_cache.shape[0])
    match resolved:
        case "triton":
            from sigattn.ops import decode

            if alibi is not None:
                alibi = alibi.expand(b, hq)
            return decode.sigmoid_attn_kvcache(
                q, k_cache, v_cache, k, v, cache_seqlens, block_table, _per_head_bias(bias, hq, q.device), scale,
                causal, window[0], window[1], alibi, sigmoid_impl,
                max_seqlen_k=None if lens is None else max(lens, default=0) + seqlen_new,
            )
        case _:
            return reference.sigmoid_attn_with_kvcache(
                q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, bias=bias, scale=scale,
                causal=causal, window_size=window, alibi_slopes=alibi, block_table=block_table,
            )


def _kvcache_triton_gap(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tensors: list[object]
) -> str | None:
    """Why the decode kernel cannot serve this KV-cache call, or None."""
    gap = _dense_triton_gap(q, None)
    if gap is not None:
        return gap
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "a k_cache/v_cache without unit stride along headdim (the kernel appends into it in place)"
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return "inputs that require grad (the decode kernel is inference-only; the reference has a backward)"
    return None


def _check_cache_seqlens(cache_seqlens: object, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor (batch,); got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32; got {dtype_name(cache_seqlens.dtype)}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape (batch,) = ({batch},); got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on the inputs' device {device}; got {cache_seqlens.device}")
    return cache_seqlens


def _check_block_table(block_table: object, batch: int, num_blocks: int, page: int, device: torch.device) -> int:
    """Returns the capacity per sequence, max_blocks_per_seq * page_block_size."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(
            f"block_table must be an int32 tensor (batch, max_blocks_per_seq); got {type(block_table).__name__}"
        )
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32; got {dtype_name(block_table.dtype)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table must have shape (batch, max_blocks_per_seq) with batch = {batch}; "
            f"got {tuple(block_table.shape)}"
        )
    if block_table.device != device:
        raise ValueError(f"block_table must be on the inputs' device {device}; got {block_table.device}")
    if page == 0 or num_blocks == 0:
        raise ValueError(f"a paged k_cache needs num_blocks > 0 and page_block_size > 0; got ({num_blocks}, {page})")
    return block_table.shape[1] * page


def _check_cache_values(
    lens: list[int], block_table: torch.Tensor | None, seqlen_new: int, capacity: int, page: int, num_blocks: int
) -> None:
    """Host-side value checks of cache_seqlens (as a list) and, unless None, of block_table."""
    if any(n < 0 for n in lens):
        raise ValueError(f"cache_seqlens must be >= 0; got {lens}")
    if lens and max(lens) + seqlen_new > capacity:
        raise ValueError(
            f"cache_seqlens + seqlen_new must fit in the cache ({capacity} positions per sequence); got "
            f"max(cache_seqlens) = {max(lens)} + {seqlen_new} new tokens"
        )
    if block_table is not None:
        _check_block_ids(block_table, lens, seqlen_new, page, num_blocks)


def _check_block_ids(block_table: torch.Tensor, lens: list[int], seqlen_new: int, page: int, num_blocks: int) -> None:
    """Every block a sequence uses must name a block of the cache."""
    table = block_table.tolist()
    for bi, n in enumerate(lens):
        used = table[bi][: -(-(n + seqlen_new) // page)]
        bad = [x for x in used if not 0 <= x < num_blocks]
        if bad:
            raise ValueError(
                f"block_table[{bi}] names blocks outside the cache (0 <= id < {num_blocks}): {bad[:4]}"
            )


def scaled_dot_product_sigmoid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    bias: float | torch.Tensor | None = None,
    sigmoid_impl: str = "fast",
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid attention with the signature and semantics of F.scaled_dot_product_attention.

    Swap ``F.scaled_dot_product_attention(q, k, v, ...)`` for this function by changing its name.

    Arguments (SDPA layout):
        query: (batch, nheads, seqlen_q, headdim).
        key, value: (batch, nheads_k, seqlen_k, headdim); nheads_k != nheads needs enable_gqa=True and
            nheads a multiple of nheads_k (query head h uses kv head h // (nheads // nheads_k)).
        attn_mask: None, or a mask broadcastable to (batch, nheads, seqlen_q, seqlen_k): bool
            (True = attend; False contributes exactly 0) or float of query's dtype (added to the scores).
        dropout_p: dropout probability on the attention weights, applied whenever > 0 (as SDPA: pass
            0.0 in eval). Reference backend only.
        is_causal: causal mask aligned to the TOP-LEFT corner, as SDPA (query i sees keys j <= i);
            not allowed together with attn_mask.
        scale: None means 1 / sqrt(headdim).
        enable_gqa: allow nheads_k != nheads.
        bias: float or tensor () / (nheads,); None means -log(seqlen_k).
        sigmoid_impl, backend: as sigmoid_attn_func. Calls with attn_mask, dropout or top-left causal with
            seqlen_q != seqlen_k go to the reference (backend="triton" raises for them).

    Returns:
        (batch, nheads, seqlen_q, headdim), dtype of query.
    """
    # One memo entry per signature of the dense form (no attn_mask): its checks below and the dense ones, with q/k/v
    # names in the head checks' messages as when this function called sigmoid_attn_func.
    sig = None
    if attn_mask is None:
        dense_key = dense_signature(query, key, value, bias, scale, is_causal, (-1, -1), None, False, sigmoid_impl,
                                    backend, enable_gqa, dropout_p)
        sig = None if dense_key is None else ("sdpa", dense_key)
    memo = checked(sig)
    if memo is not None:
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        args = from_memo(memo, bias, scale, None)
        return _dense_attention(q, k, v, args, is_causal, False, sigmoid_impl, backend).transpose(1, 2)
    check_tensor("query", query, 4, "(batch, nheads, seqlen_q, headdim)")
    check_tensor("key", key, 4, "(batch, nheads_k, seqlen_k, headdim)")
    check_tensor("value", value, 4, "(batch, nheads_k, seqlen_k, headdim)")
    check_same({"query": query, "key": key, "value": value})
    check_batch_and_seqlen(query.shape, key.shape, value.shape, 2, "query,key,value")
    check_flag("is_causal", is_causal)
    check_flag("enable_gqa", enable_gqa)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for GQA/MQA (as SDPA)"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")
    sq, sk = query.shape[2], key.shape[2]
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask and is_causal cannot be used together (as SDPA)")
        _check_attn_mask(attn_mask, query, key)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    dense = attn_mask is None and dropout_p == 0.0 and (not is_causal or sq == sk)
    if dense:
        # q/k/v passed check_tensor and check_same above as query/key/value: only check_dense_args is left.
        args = check_dense_args(q, k, v, bias, scale, is_causal, (-1, -1), None, False, sigmoid_impl, backend)
        remember(sig, memo_of(args, bias, scale))
        return _dense_attention(q, k, v, args, is_causal, False, sigmoid_impl, backend).transpose(1, 2)
    hq, _, d = check_qkv_heads(q.shape, k.shape, v.shape, 2, "query,key,value")
    scale = check_scale(scale, d)
    bias = check_bias(bias, hq, query.device, -math.log(sk) if sk > 0 else 0.0)
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    if is_causal:
        attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril()
    gap = "attn_mask, dropout and top-left causal with seqlen_q != seqlen_k run on the reference only"
    _resolve_backend(backend, query.device, gap)
    if query.numel() == 0 or sk == 0:
        return _empty_attention(q, k, v, bias).transpose(1, 2)
    out = reference.sigmoid_attn(q, k, v, scale=scale, bias=bias, attn_mask=attn_mask, dropout_p=float(dropout_p))
    return out.transpose(1, 2)


def _check_attn_mask(attn_mask: object, query: torch.Tensor, key: torch.Tensor) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None; got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise TypeError(
            f"attn_mask must be bool or query's dtype {dtype_name(query.dtype)}; "
            f"got {dtype_name(attn_mask.dtype)}"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask must be on query's device {query.device}; got {attn_mask.device}")
    full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    try:
        if torch.broadcast_shapes(attn_mask.shape, full) != torch.Size(full):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attn_mask must broadcast to (batch, nheads, seqlen_q, seqlen_k) = {full}; got {tuple(attn_mask.shape)}"
        ) from None
