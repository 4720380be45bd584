"""Argument checks for the public functions: each bad input raises a TypeError/ValueError that names it."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIGMOID_IMPLS = ("fast", "accurate")
BACKENDS = ("auto", "reference", "triton")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    """A floating tensor of rank `ndim`; `layout` names its dims for the error message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64; got {dtype_name(t.dtype)}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}; got shape {tuple(t.shape)}")
    return t


def check_same(tensors: dict[str, torch.Tensor]) -> None:
    """All tensors share one dtype and one device."""
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        t = tensors[n]
        if t.dtype != first.dtype:
            raise TypeError(
                f"{names[0]} and {n} must share one dtype; got {names[0]} {dtype_name(first.dtype)}, "
                f"{n} {dtype_name(t.dtype)}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{names[0]} and {n} must be on one device; got {names[0]} on {first.device}, "
                f"{n} on {t.device}"
            )


def check_qkv_heads(
    q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], head_axis: int, names: str
) -> tuple[int, int, int]:
    """Head dims equal, kv heads equal, nheads_q a multiple of nheads_kv; returns (hq, hkv, headdim)."""
    qn, kn, vn = names.split(",")
    d = q_shape[-1]
    if d == 0:
        raise ValueError(f"{qn} head dim must be positive; got shape {tuple(q_shape)}")
    if k_shape[-1] != d or v_shape[-1] != d:
        raise ValueError(
            f"{qn}, {kn} and {vn} must share one head dim; got {qn} {d}, {kn} {k_shape[-1]}, "
            f"{vn} {v_shape[-1]}"
        )
    hq, hkv = q_shape[head_axis], k_shape[head_axis]
    if v_shape[head_axis] != hkv:
        raise ValueError(f"{kn} and {vn} must have the same number of heads; got {hkv} and {v_shape[head_axis]}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"nheads of {qn} ({hq}) must be a positive multiple of nheads of {kn}/{vn} ({hkv}) (GQA/MQA rule)"
        )
    return hq, hkv, d


def check_batch_and_seqlen(
    q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], seq_axis: int, names: str
) -> None:
    """One batch size (dim 0) for all three, one key length (dim `seq_axis`) for k and v."""
    qn, kn, vn = names.split(",")
    if k_shape[0] != q_shape[0] or v_shape[0] != q_shape[0]:
        raise ValueError(
            f"{qn}, {kn} and {vn} must share one batch size; got {q_shape[0]}, {k_shape[0]}, {v_shape[0]}"
        )
    if v_shape[seq_axis] != k_shape[seq_axis]:
        raise ValueError(f"{kn} and {vn} must share one seqlen_k; got {k_shape[seq_axis]} and {v_shape[seq_axis]}")


def check_scale(scale: object, head_dim: int) -> float:
    """None → 1/sqrt(head_dim); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return float(scale)


def check_bias(bias: object, nheads: int, device: torch.device, default: float | None) -> float | torch.Tensor:
    """None → `default`; a finite float; or a floating tensor of shape () or (nheads,) on `device`."""
    if bias is None:
        if default is None:
            raise ValueError(
                "bias is required here: the KV length changes every decode step, so pass the value the model "
                "was trained with (the paper's b = -log(n) for training length n)"
            )
        return default
    if isinstance(bias, torch.Tensor):
        if not bias.is_floating_point():
            raise TypeError(f"bias tensor must be floating point; got {dtype_name(bias.dtype)}")
        if bias.device != device:
            raise ValueError(f"bias must be on the inputs' device {device}; got {bias.device}")
        if tuple(bias.shape) not in ((), (nheads,)):
            raise ValueError(f"bias tensor must have shape () or (nheads,) = ({nheads},); got {tuple(bias.shape)}")
        return bias
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise TypeError(f"bias must be a float, a tensor of shape (nheads,) or None; got {type(bias).__name__}")
    if not math.isfinite(bias):
        raise ValueError(f"bias must be finite; got {bias}")
    return float(bias)


def check_window(window_size: object, causal: bool) -> tuple[int, int]:
    """(left, right) ints ≥ -1 (-1 = unbounded); causal forces right = 0."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints; got {window_size!r}")
    left, right = window_size
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size {side} must be an int; got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1 = unbounded); got {w}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    return (left, 0 if causal else right)


def check_alibi(alibi_slopes: object, batch: int, nheads: int, device: torch.device) -> torch.Tensor | None:
    """None, or a floating tensor (nheads,) or (batch, nheads) on `device`; returned as float32."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None; got {type(alibi_slopes).__name__}")
    if not alibi_slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be floating point; got {dtype_name(alibi_slopes.dtype)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on the inputs' device {device}; got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(
            f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = ({batch}, {nheads}); "
            f"got {tuple(alibi_slopes.shape)}"
        )
    return alibi_slopes.float()


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_cu_seqlens(name: str, cu: object, total: int, device: torch.device) -> tuple[int, ...]:
    """int32 1-D, starts at 0, non-decreasing, ends at `total`; returns its values on the host (see cu_seqlens_values:
    one device read per tensor version)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape (batch + 1,); got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32; got {dtype_name(cu.dtype)}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must have shape (batch + 1,); got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}; got {cu.device}")
    vals = cu_seqlens_values(cu)
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0; got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing; got {list(vals)}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the total number of packed tokens ({total}); got {vals[-1]}")
    return vals


# Host copies of cu_seqlens tensors, keyed by the tensor's identity and checked against its version counter: every
# layer of a model passes the same cu_seqlens tensor, and reading it back is a device sync that stalls the host
# (the first call of a step reads it; the others reuse the values). An in-place change made through PyTorch bumps
# the version and is read again; a write that bypasses PyTorch (raw pointers, DLPack) is not seen.
_CU_VALUES: dict[int, tuple[weakref.ref, int, tuple[int, ...]]] = {}
_CU_VALUES_SIZE = 64


def _version_of(t: torch.Tensor) -> int | None:
    """t's version counter, or None where t's values must not be cached (subclasses such as fake tensors,
    inference-mode tensors, which have no version counter, and code being compiled)."""
    if type(t) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    try:
        return t._version
    except RuntimeError:
        return None


def cu_seqlens_values(cu: torch.Tensor) -> tuple[int, ...]:
    """cu's values on the host: read from the device once per tensor version (a sync), then from the cache."""
    version = _version_of(cu)
    key = id(cu)
    if version is not None:
        hit = _CU_VALUES.get(key)
        if hit is not None and hit[0]() is cu and hit[1] == version:
            return hit[2]
    vals = tuple(cu.tolist())
    if version is not None:
        if len(_CU_VALUES) >= _CU_VALUES_SIZE:
            _CU_VALUES.pop(next(iter(_CU_VALUES)))

        def drop(ref: weakref.ref, key: int = key) -> None:
            entry = _CU_VALUES.get(key)
            if entry is not None and entry[0] is ref:
                del _CU_VALUES[key]

        _CU_VALUES[key] = (weakref.ref(cu, drop), version, vals)
    return vals


def check_max_seqlen(name: str, value: object, cu: Sequence[int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    if value < longest:
        raise ValueError(f"{name} ({value}) is smaller than the longest sequence in its cu_seqlens ({longest})")
    return value


# Per-signature memo of passed checks. The dense checks are pure functions of the arguments' types, the tensors'
# dtypes, devices and shapes, and the Python scalars' values (never of tensor values, strides or requires_grad), so a
# key made of exactly those says the checks passed before and would pass again. A call whose key is new, or that has
# no key, runs every check; a call that raises is never remembered. ~1.1 µs to build and look up a dense key vs
# ~4 µs for check_tensor x3 + check_same + the dense argument checks (CPU, bench/NOTES.md "Host path v5").
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
# Exact types only: their (type, value) pairs hash and compare as the checks see them (True is not 1 here because the
# type is part of the key; -0.0 and 0.0 share a key, and every check treats them alike).
_SCALARS = frozenset({type(None), bool, int, float, str})
_CHECKED: dict[tuple[object, ...], tuple[object, ...]] = {}
CHECKED_SIZE = 256


def dense_signature(
    q: object, k: object, v: object, bias: object, scale: object, causal: object, window_size: object,
    alibi_slopes: object, deterministic: object, *choices: object,
) -> tuple[object, ...] | None:
    """The memo key of the dense checks (check_tensor x3, check_same, check_dense_args): q/k/v/bias/alibi dtypes,
    devices and shapes; bias's and alibi's types; the scalars' types and values (`choices`: sigmoid_impl, backend and
    whatever else a caller's checks read). None where a check could read more: a tensor subclass (fake, functional
    and wrapper tensors may answer differently), a scalar of another type, a window that is not a pair. Written out
    flat: ~1.5 µs, where generic per-argument helpers cost ~2.3."""
    if torch.compiler.is_compiling():  # the trace runs every check (and keeps no key in its guards)
        return None
    plain, scalars = _PLAIN_TENSORS, _SCALARS
    if type(q) not in plain or type(k) not in plain or type(v) not in plain:
        return None
    tw = type(window_size)
    if (tw is not tuple and tw is not list) or len(window_size) != 2:  # type: ignore[arg-type]
        return None
    left, right = window_size  # type: ignore[misc]
    types = (type(scale), type(causal), type(left), type(right), type(deterministic), *map(type, choices))
    for t in types:
        if t not in scalars:
            return None
    tb = type(bias)
    if tb in plain:
        bias = (bias.dtype, bias.device, bias.shape)  # type: ignore[attr-defined]
    elif tb not in scalars:
        return None
    ta = type(alibi_slopes)
    if ta in plain:
        alibi_slopes = (alibi_slopes.dtype, alibi_slopes.device, alibi_slopes.shape)  # type: ignore[attr-defined]
    elif alibi_slopes is not None:
        return None
    return (q.dtype, q.device, q.shape, k.dtype, k.device, k.shape, v.dtype, v.device, v.shape,  # type: ignore
            tb, bias, ta, alibi_slopes, types, scale, causal, left, right, deterministic, *choices)


def checked(key: tuple[object, ...] | None) -> tuple[object, ...] | None:
    """What `remember` stored for a call whose checks passed with this key, or None (run the checks). Nothing is
    cached while torch.compile traces: the trace must see the checks, not a global dict."""
    if key is None or torch.compiler.is_compiling():
        return None
    return _CHECKED.get(key)


def remember(key: tuple[object, ...] | None, value: tuple[object, ...]) -> None:
    """Record that the checks of `key` passed, with the shape-derived results `value`. At most CHECKED_SIZE keys
    (then the memo starts over: a model has a handful of signatures; clear() is safe against a concurrent get)."""
    if key is None or torch.compiler.is_compiling():
        return
    if len(_CHECKED) >= CHECKED_SIZE:
        _CHECKED.clear()
    _CHECKED[key] = value


def clear_checked() -> None:
    _CHECKED.clear()


# (batch, nheads_q, seqlen_k, scale, bias, window, alibi) with the defaults filled in.
DenseArgs = tuple[int, int, int, float, float | torch.Tensor, tuple[int, int], torch.Tensor | None]


def check_dense_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: object, scale: object, causal: object,
    window_size: object, alibi_slopes: object, deterministic: object, sigmoid_impl: object, backend: object,
) -> DenseArgs:
    """The dense form's argument checks after the tensors' own (shared by the function and its backward):
    (batch, nheads_q, seqlen_k, scale, bias, window, alibi) with the defaults filled in."""
    b = q.shape[0]
    check_batch_and_seqlen(q.shape, k.shape, v.shape, 1, "q,k,v")
    hq, _, d = check_qkv_heads(q.shape, k.shape, v.shape, 2, "q,k,v")
    sk = k.shape[1]
    scale = check_scale(scale, d)
    bias = check_bias(bias, hq, q.device, -math.log(sk) if sk > 0 else 0.0)
    window = check_window(window_size, causal)
    alibi = check_alibi(alibi_slopes, b, hq, q.device)
    check_flag("deterministic", deterministic)
    check_choice("sigmoid_impl", sigmoid_impl, SIGMOID_IMPLS)
    check_choice("backend", backend, BACKENDS)
    return b, hq, sk, scale, bias, window, alibi


def memo_of(args: DenseArgs, bias: object, scale: object) -> tuple[object, ...]:
    """What a memo hit cannot recompute from the call's own arguments: the shape-derived parts of `args` (batch,
    nheads_q, seqlen_k, window) and the defaults that replaced a None scale / bias (functions of head dim and
    seqlen_k, both in the key)."""
    b, hq, sk, scale_r, bias_r, window, _ = args
    return b, hq, sk, scale_r if scale is None else None, bias_r if bias is None else None, window


def from_memo(memo: tuple[object, ...], bias: object, scale: object, alibi_slopes: object) -> DenseArgs:
    """`check_dense_args`'s result for a call whose signature passed before: what check_scale / check_bias /
    check_alibi return for arguments of the types in the key (a float scale or bias as float, a tensor bias as
    itself, slopes as float32: tensor values are read per call, never cached)."""
    b, hq, sk, scale_r, bias_r, window = memo
    return (
        b, hq, sk,  # type: ignore[return-value]
        scale_r if scale is None else float(scale),  # type: ignore[arg-type]
        bias_r if bias is None else (bias if isinstance(bias, torch.Tensor) else float(bias)),  # type: ignore
        window,
        None if alibi_slopes is None else alibi_slopes.float(),  # type: ignore[union-attr]
    )


def check_dense_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: object, scale: object, causal: object,
    window_size: object, alibi_slopes: object, deterministic: object, sigmoid_impl: object, backend: object,
) -> DenseArgs:
    """sigmoid_attn_func's checks (its tensors', then `check_dense_args`), skipped for a signature that passed
    before (dense_signature: ~1.5 µs against ~4 µs of checks per call). A failing call raises before
    `remember`, so every bad input raises its error on every call."""
    key = dense_signature(q, k, v, bias, scale, causal, window_size, alibi_slopes, deterministic, sigmoid_impl,
                          backend)
    memo = checked(key)
    if memo is not None:
        return from_memo(memo, bias, scale, alibi_slopes)
    check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    check_tensor("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)")
    check_tensor("v", v, 4, "(batch, seqlen_k, nheads_k, headdim)")
    check_same({"q": q, "k": k, "v": v})
    args = check_dense_args(q, k, v, bias, scale, causal, window_size, alibi_slopes, deterministic, sigmoid_impl,
                             backend)
    remember(key, memo_of(args, bias, scale))
    return args
