"""`sigattn check`: every backend on this device against the float64 reference over a grid of features."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch

from sigattn.ops import reference
from sigattn.ops.api import available_backends, sigmoid_attn_func
from sigattn.ops.validation import dtype_name

# tanh.approx.f32 has a max relative error of 2^-10.99 (PTX ISA); "fast" mode may add that much.
FAST_SIGMOID_REL_ERR = 2.0**-10.99


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape/feature combination of the check grid."""

    name: str
    batch: int = 2
    seqlen_q: int = 65
    seqlen_k: int = 65
    nheads: int = 4
    nheads_kv: int = 4
    headdim: int = 64
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    alibi: bool = False
    per_head_bias: bool = False


def grid(quick: bool, on_gpu: bool) -> list[Case]:
    """The feature grid; GPU sizes are larger and cross tile boundaries several times."""
    n, m = (1031, 517) if on_gpu else (65, 33)
    cases = [
        Case("plain", seqlen_q=n, seqlen_k=n),
        Case("causal", seqlen_q=n, seqlen_k=n, causal=True),
        Case("causal sq<sk", seqlen_q=m, seqlen_k=n, causal=True),
        Case("gqa 4:1 causal", seqlen_q=n, seqlen_k=n, nheads=8, nheads_kv=2, causal=True),
        Case("window (32,16)", seqlen_q=n, seqlen_k=n, window=(32, 16)),
        Case("alibi causal", seqlen_q=n, seqlen_k=n, causal=True, alibi=True, per_head_bias=True),
        Case("headdim 128", seqlen_q=m, seqlen_k=n, headdim=128, per_head_bias=True),
        Case("headdim 96", seqlen_q=m, seqlen_k=m, headdim=96),
        Case("seqlen 1", seqlen_q=1, seqlen_k=n),
    ]
    return cases[:3] if quick else cases


def _inputs(case: Case, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    b, h, hk, d = case.batch, case.nheads, case.nheads_kv, case.headdim
    t = {
        "q": torch.randn(b, case.seqlen_q, h, d, device=device, dtype=dtype),
        "k": torch.randn(b, case.seqlen_k, hk, d, device=device, dtype=dtype),
        "v": torch.randn(b, case.seqlen_k, hk, d, device=device, dtype=dtype),
        "bias": (torch.randn(h, device=device) - math.log(case.seqlen_k))
        if case.per_head_bias
        else torch.tensor(-math.log(case.seqlen_k), device=device),
        "dout": torch.randn(b, case.seqlen_q, h, d, device=device, dtype=dtype),
    }
    if case.alibi:
        t["alibi"] = torch.rand(h, device=device) * 0.1
    return t


def _naive_low_precision(t: dict[str, torch.Tensor], case: Case, scale: float) -> torch.Tensor:
    """The formula done by PyTorch in the inputs' dtype: the yardstick for the error budget."""
    q, k, v = t["q"], t["k"], t["v"]
    g = case.nheads // case.nheads_kv
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + t["bias"].to(q.dtype).reshape(-1, 1, 1)
    if case.alibi:
        s = s + reference.alibi_bias(t["alibi"], case.seqlen_q, case.seqlen_k).to(q.dtype)
    vis = reference.visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window, q.device)
    p = torch.where(vis, torch.sigmoid(s), torch.zeros((), dtype=q.dtype, device=q.device))
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _run(
    t: dict[str, torch.Tensor], case: Case, backend: str, sigmoid_impl: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Output and gradients of q, k, v, bias for one backend (or the naive formula) in `dtype`."""
    def leaf(n: str) -> torch.Tensor:
        keep = n == "bias" and dtype != torch.float64  # the kernels take a float32 bias
        return t[n].detach().to(t[n].dtype if keep else dtype).requires_grad_()

    leaves = {n: leaf(n) for n in ("q", "k", "v", "bias")}
    scale = 1.0 / math.sqrt(case.headdim)
    if backend == "naive":
        out = _naive_low_precision(leaves | {"alibi": t.get("alibi")}, case, scale)
    else:
        out = sigmoid_attn_func(
            leaves["q"], leaves["k"], leaves["v"], bias=leaves["bias"], scale=scale, causal=case.causal,
            window_size=case.window, alibi_slopes=t.get("alibi"), sigmoid_impl=sigmoid_impl, backend=backend,
        )
    grads = torch.autograd.grad(out, list(leaves.values()), t["dout"].to(dtype))
    return {"out": out.detach()} | {f"d{n}": gr for n, gr in zip(leaves, grads, strict=True)}


def _rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖x - ref‖ / ‖scale‖ (default scale: ref); inf when x holds a non-finite value."""
    if not bool(torch.isfinite(x).all()):
        return math.inf
    x, ref = x.double(), ref.double()
    denom = ref if scale is None else scale.double()
    return (torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(denom).clamp_min(1e-30)).item()


def _dbias_magnitude(t: dict[str, torch.Tensor], case: Case, scale: float) -> torch.Tensor:
    """sum |dS| per bias entry, in float64: the size of the terms the bias gradient sums.

    The bias gradient is a sum of dS = dP * p * (1 - p) of both signs that largely cancels, so its error is
    measured against this magnitude (the sum's condition), not against the small cancelled result.
    """
    q, k, v, dout = (t[n].double() for n in ("q", "k", "v", "dout"))
    g = case.nheads // case.nheads_kv
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + t["bias"].double().reshape(-1, 1, 1)
    if case.alibi:
        s = s + reference.alibi_bias(t["alibi"].double(), case.seqlen_q, case.seqlen_k)
    p = torch.sigmoid(s)
    vis = reference.visible_mask(case.seqlen_q, case.seqlen_k, case.causal, case.window, q.device)
    ds = torch.where(vis, torch.einsum("bqhd,bkhd->bhqk", dout, v) * p * (1 - p), 0.0)
    per_head = ds.abs().sum(dim=(0, 2, 3))  # [nheads]
    return per_head if case.per_head_bias else per_head.sum()


@dataclasses.dataclass
class Row:
    """One line of the check table: the worst tensor of a case, with its error and budget."""

    case: str
    backend: str
    dtype: str
    worst: str
    err: float
    budget: float

    @property
    def ok(self) -> bool:
        return self.err <= self.budget


def run_checks(
    device: str, dtypes: list[torch.dtype], backends: list[str], quick: bool = False, sigmoid_impl: str = "accurate"
) -> Iterator[Row]:
    """For each case, backend and dtype: errors of output and all gradients vs float64 (yields rows).

    The oracle is float64 math on the same inputs rounded to `dtype`, so only the computation's error is
    measured. Errors are relative to the reference's norm, except the bias gradient's, which is relative to
    the sum of |dS| it adds up (see _dbias_magnitude). Budget per tensor = 2 x the error of the naive formula
    in `dtype`, plus the tanh.approx bound when sigmoid_impl is "fast" on the Triton backend, plus a
    float32-accumulation floor of 4 * eps32 * sqrt(terms summed into each entry).
    """
    eps32 = torch.finfo(torch.float32).eps
    for case in grid(quick, device.startswith("cuda")):
        t32 = _inputs(case, torch.float32, device)
        g = case.nheads // case.nheads_kv
        terms = {"out": case.seqlen_k, "dq": case.seqlen_k, "dk": case.seqlen_q * g, "dv": case.seqlen_q * g,
                 "dbias": case.batch * case.seqlen_q * case.seqlen_k * (1 if case.per_head_bias else case.nheads)}
        for dtype in dtypes:
            t = {n: x.to(dtype).to(x.dtype) if n in ("q", "k", "v", "dout") else x for n, x in t32.items()}
            oracle = _run(t, case, "reference", "accurate", torch.float64)
            naive = _run(t, case, "naive", "accurate", dtype)
            denom = {"dbias": _dbias_magnitude(t, case, 1.0 / math.sqrt(case.headdim))}
            fast = FAST_SIGMOID_REL_ERR if sigmoid_impl == "fast" else 0.0
            for backend in backends:
                got = _run(t, case, backend, sigmoid_impl, dtype)
                worst = None
                for name, ref in oracle.items():
                    err = _rel_err(got[name], ref, denom.get(name))
                    floor = 4 * eps32 * math.sqrt(terms[name]) + (fast if backend == "triton" else 0.0)
                    budget = 2.0 * _rel_err(naive[name], ref, denom.get(name)) + floor
                    row = Row(case.name, backend, dtype_name(dtype), name, err, budget)
                    if worst is None or row.err / row.budget > worst.err / worst.budget:
                        worst = row
                yield worst


def default_dtypes(device: str) -> list[torch.dtype]:
    return [torch.bfloat16, torch.float16] if device.startswith("cuda") else [torch.float32, torch.float16]


def default_backends(device: str) -> list[str]:
    return available_backends(device)
