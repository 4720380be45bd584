"""Varlen benchmark: the packed-sequence kernels against the dense kernel and SDPA flash at equal total tokens.

    PYTHONPATH=$PWD python bench/varlen_bench.py --out $OUT/varlen                  # H100: ~3-5 min cold
    PYTHONPATH=$PWD python bench/varlen_bench.py --ds 128 --causal yes --packs mixed --modes bwd

Packs of --tokens tokens (default 16k), H = --hidden / d heads (default 2048), bf16, bias = -log n per sequence:
  equal:N     tokens / N sequences of length N: the dense batch (B, N) exactly
  mixed       lengths log-uniform in [128, 4096] (fixed seed), the last one trimmed; mixed:LO-HI for other bounds
Providers (a row per provider; a reason instead of a number where one cannot run):
  varlen            sigattn::varlen_fwd/varlen_bwd custom ops, default dispatch (on sm_90 the Gluon kernels' VARLEN
                    form where the dense dispatch takes Gluon: fwd d=128, bwd d=64/128; else portable with TMA)
  varlen-portable   the same custom ops with the Gluon kernels switched off (configs.set_gluon_forward/backward):
                    the portable kernels' VARLEN form, i.e. `varlen` before Gluon served it
  varlen-ptr        the same kernels on the pointer path (use_tma=False): the TMA-vs-pointer choice for varlen
  varlen-api        sigmoid_attn_varlen_func: adds argument checks and one host sync (cu_seqlens.tolist())
  dense             sigattn dense kernels on the padded batch (B, max_len): for equal packs the same problem
  dense-loop        one dense call per sequence (what varlen replaces when padding is too costly)
  sdpa-flash        torch SDPA flash (softmax) on the padded batch, no mask
  torch-varlen      torch.nn.attention.varlen.varlen_attn (softmax FlashAttention varlen), where torch has it
  flash-attn-varlen flash_attn.flash_attn_varlen_func, where installed
TFLOP/s counts only each sequence's own (query, key) pairs: 4·H·Σ n²·d (÷2 causal, ×2.5 backward) over the median
time of triton.testing.do_bench, so providers that compute padding get no credit for it. bwd times
autograd.grad(out, (q, k, v), dout) after one forward (bias fixed, as in the paper: no dbias reduction).
Writes table.md (one line per pack/d/causal/mode, TFLOP/s per provider and the ratios varlen/dense,
varlen/sdpa-flash, varlen/varlen-ptr) and results.json (every measurement, environment header) under --out,
rewritten after each pack so a run cut short still reports. Without CUDA it runs the kernels under Triton's
interpreter as a smoke test: --tokens 64 --hidden 32 --ds 16 --packs equal:32,mixed:8-40 --warmup-ms 0 --rep-ms 0.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sigattn import sigmoid_attn_func, sigmoid_attn_varlen_func  # noqa: E402
from sigattn.bench.flops import MODE_FLOP_FACTOR, tflops_per_s, varlen_attn_flops  # noqa: E402
from sigattn.bench.report import env_header, environment, render_markdown  # noqa: E402
from sigattn.bench.timing import measure  # noqa: E402
from sigattn.ops import custom_ops  # noqa: E402

PROVIDERS = ("varlen", "varlen-portable", "varlen-ptr", "varlen-api", "dense", "dense-loop", "sdpa-flash",
             "torch-varlen", "flash-attn-varlen")
RATIOS = (("varlen", "dense"), ("varlen", "varlen-portable"), ("varlen", "sdpa-flash"), ("varlen", "varlen-ptr"),
          ("varlen", "torch-varlen"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unavailable(Exception):
    """This provider cannot run here (missing package or API); the message goes in the row."""


def pack_lengths(spec: str, tokens: int) -> list[int]:
    """'equal:N' -> tokens // N sequences of length N; 'mixed[:LO-HI]' -> log-uniform lengths (seed 0) summing
    to `tokens`, the last one trimmed (never below 1)."""
    kind, _, arg = spec.partition(":")
    if kind == "equal":
        n = int(arg)
        if n <= 0 or tokens % n:
            raise ValueError(f"pack {spec!r}: N must divide --tokens {tokens}")
        return [n] * (tokens // n)
    if kind == "mixed":
        lo, hi = (int(x) for x in arg.split("-")) if arg else (128, 4096)
        g = torch.Generator().manual_seed(0)
        lens: list[int] = []
        while sum(lens) < tokens:
            u = torch.rand((), generator=g).item()
            lens.append(min(int(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))), tokens - sum(lens)))
        return lens
    raise ValueError(f"pack must be equal:N or mixed[:LO-HI]; got {spec!r}")


def cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def timed_step(forward: Callable[[], Any], inputs: list[torch.Tensor], mode: str) -> Callable[[], Any]:
    """fwd: the forward; bwd: autograd.grad of one recorded forward (as sigattn.bench.providers.with_mode)."""
    if mode == "fwd":
        return forward
    out = forward()
    outs = out if isinstance(out, (list, tuple)) else [out]
    douts = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, inputs, douts, retain_graph=True)


def build(provider: str, lens: list[int], nheads: int, d: int, causal: bool, dtype: torch.dtype,
          device: torch.device, mode: str, impl: str) -> Callable[[], Any]:
    """The measured step of `provider` on the pack `lens`; raises Unavailable where it cannot run."""
    grad = mode != "fwd"
    total, batch, max_len = sum(lens), len(lens), max(lens)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype, device=device).requires_grad_(grad)

    cu = cu_seqlens(lens, device)
    scale = d**-0.5
    bias = torch.tensor([-math.log(n) for n in lens], dtype=torch.float32, device=device)[:, None]
    bias = bias.expand(batch, nheads)
    if provider in ("varlen", "varlen-portable", "varlen-ptr", "varlen-api", "torch-varlen", "flash-attn-varlen"):
        q, k, v = randn(total, nheads, d), randn(total, nheads, d), randn(total, nheads, d)
        qkv = [q, k, v]
        if provider in ("varlen", "varlen-portable", "varlen-ptr"):
            bias = bias.contiguous()
            step = timed_step(lambda: custom_ops.sigmoid_attn_varlen(
                q, k, v, cu, cu, max_len, max_len, bias, scale, causal, -1, -1, None, False, impl), qkv, mode)
            return {"varlen": step, "varlen-portable": without_gluon(step)}.get(provider) or pointer_path(step)
        if provider == "varlen-api":
            backend = "triton" if device.type != "cuda" else "auto"
            return timed_step(lambda: sigmoid_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal,
                                                               sigmoid_impl=impl, backend=backend), qkv, mode)
        if provider == "torch-varlen":
            return timed_step(torch_varlen(q, k, v, cu, max_len, causal, device), qkv, mode)
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception as e:
            raise Unavailable(f"flash_attn not importable: {type(e).__name__}") from e
        return timed_step(lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal), qkv,
                          mode)
    if provider == "dense":
        q, k, v = (randn(batch, max_len, nheads, d) for _ in range(3))
        backend = "triton" if device.type != "cuda" else "auto"
        return timed_step(lambda: sigmoid_attn_func(q, k, v, causal=causal, sigmoid_impl=impl, backend=backend),
                          [q, k, v], mode)
    if provider == "dense-loop":
        q, k, v = randn(total, nheads, d), randn(total, nheads, d), randn(total, nheads, d)
        spans = [(a, b) for a, b in zip(cu.tolist(), cu.tolist()[1:])]
        backend = "triton" if device.type != "cuda" else "auto"
        return timed_step(lambda: [sigmoid_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal,
                                                     sigmoid_impl=impl, backend=backend) for a, b in spans],
                          [q, k, v], mode)
    if provider == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (randn(batch, nheads, max_len, d) for _ in range(3))

        def sdpa() -> torch.Tensor:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return timed_step(sdpa, [q, k, v], mode)
    raise ValueError(f"unknown provider {provider!r}")


def without_gluon(step: Callable[[], Any]) -> Callable[[], Any]:
    """step with the Gluon kernels switched off (the portable kernels serve) for the duration of each call."""
    from sigattn.ops import configs

    def run() -> Any:
        saved = configs.gluon_forward_enabled(), configs.gluon_backward_enabled()
        configs.set_gluon_forward(False), configs.set_gluon_backward(False)
        try:
            return step()
        finally:
            configs.set_gluon_forward(saved[0]), configs.set_gluon_backward(saved[1])

    return run


def pointer_path(step: Callable[[], Any]) -> Callable[[], Any]:
    """step with the kernels' TMA default switched off (the pointer path) for the duration of each call."""
    from sigattn.ops import backward, forward

    def run() -> Any:
        saved = forward.use_tma_default, backward.use_tma_default
        forward.use_tma_default = backward.use_tma_default = lambda device: False
        try:
            return step()
        finally:
            forward.use_tma_default, backward.use_tma_default = saved

    return run


def torch_varlen(q, k, v, cu: torch.Tensor, max_len: int, causal: bool, device: torch.device) -> Callable[[], Any]:
    """torch.nn.attention.varlen.varlen_attn, whose causal argument changed between releases."""
    if device.type != "cuda":
        raise Unavailable("needs a CUDA device")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn") from e
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        kw: dict[str, Any] = {"is_causal": causal}
    elif "window_size" in params:
        kw = {"window_size": (-1, 0) if causal else (-1, -1)}
    else:
        raise Unavailable("varlen_attn takes neither is_causal nor window_size")
    return lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def measure_row(provider: str, lens: list[int], pack: str, nheads: int, d: int, causal: bool, dtype_name: str,
                device: torch.device, mode: str, impl: str, warmup_ms: float | None,
                rep_ms: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"provider": provider, "pack": pack, "nseq": len(lens), "max_len": max(lens),
                           "tokens": sum(lens), "nheads": nheads, "headdim": d, "causal": causal, "mode": mode,
                           "dtype": dtype_name, "status": "ok", "ms": None, "tflops": None, "reason": ""}
    flops = varlen_attn_flops(lens, lens, nheads, d, causal, mode)
    try:
        step = build(provider, lens, nheads, d, causal, DTYPES[dtype_name], device, mode, impl)
        t = measure(step, device, warmup_ms, rep_ms)
        row.update(ms=t.ms, tflops=tflops_per_s(flops, t.ms),
                   peak_mem_mib=None if t.peak_bytes is None else t.peak_bytes / 2**20)
    except Unavailable as e:
        row.update(status="unavailable", reason=str(e))
    except Exception as e:  # OOM, compile failure: record and go on
        row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """One line per provider that was unavailable (same reason everywhere) and one per error."""
    seen: set[tuple[str, str]] = set()
    lines = []
    for r in rows:
        if r["status"] == "unavailable" and (r["provider"], r["reason"]) not in seen:
            seen.add((r["provider"], r["reason"]))
            lines.append(f"- {r['provider']}: unavailable: {r['reason']}")
        elif r["status"] == "error":
            lines.append(f"- {r['provider']} {r['pack']} d={r['headdim']} causal={r['causal']} {r['mode']}: "
                         f"error: {r['reason']}")
    return lines


def table(rows: list[dict[str, Any]], providers: list[str]) -> str:
    """Markdown: one line per (pack, d, causal, mode), TFLOP/s per provider, then time ratios."""
    keys: list[tuple[Any, ...]] = []
    by: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (r["pack"], r["nseq"], r["max_len"], r["headdim"], r["causal"], r["mode"])
        if key not in by:
            keys.append(key)
            by[key] = {}
        by[key][r["provider"]] = r
    ratios = [(a, b) for a, b in RATIOS if a in providers and b in providers]
    header = ["pack", "seqs", "max len", "d", "causal", "mode", *providers, *(f"{a}/{b}" for a, b in ratios)]
    body = []
    for key in keys:
        cells = by[key]
        line = [str(key[0]), str(key[1]), str(key[2]), str(key[3]), "T" if key[4] else "F", key[5]]
        for p in providers:
            r = cells.get(p)
            line.append("" if r is None else _num(r["tflops"]) if r["status"] == "ok" else r["status"][:5])
        for a, b in ratios:
            ra, rb = cells.get(a), cells.get(b)
            ok = ra and rb and ra["status"] == rb["status"] == "ok"
            line.append(f"{rb['ms'] / ra['ms']:.2f}" if ok else "")
        body.append(line)
    return render_markdown(header, body)


def write(out: Path, rows: list[dict[str, Any]], env: dict[str, Any], config: dict[str, Any],
          providers: list[str]) -> None:
    text = "\n".join([
        f"Varlen vs dense, {env_header(env)}",
        f"TFLOP/s over each sequence's own pairs (FLOP factors {MODE_FLOP_FACTOR}); ratios are speedups of varlen "
        "(the other's time / varlen's). Problems (unavailable / error) are listed below the table.",
        "",
        table(rows, providers),
        "",
        *problems(rows),
    ])
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"env": env, "config": config, "rows": rows}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "varlen"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048, help="nheads * headdim")
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--packs", default="equal:2048,equal:512,mixed")
    ap.add_argument("--modes", default="fwd,bwd")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--impl", choices=("fast", "accurate"), default="fast")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    dtype_name = args.dtype if device.type == "cuda" or args.dtype != "bf16" else "fp32"  # interpreter: no bf16
    config = vars(args) | {"dtype": dtype_name, "device": str(device)}
    env = environment(device)
    print(env_header(env), flush=True)
    rows: list[dict[str, Any]] = []
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    t0 = time.time()
    for pack in args.packs.split(","):
        lens = pack_lengths(pack, args.tokens)
        for d in (int(x) for x in args.ds.split(",")):
            nheads = max(1, args.hidden // d)
            for causal in causals:
                for mode in args.modes.split(","):
                    for p in providers:
                        row = measure_row(p, lens, pack, nheads, d, causal, dtype_name, device, mode, args.impl,
                                          args.warmup_ms, args.rep_ms)
                        rows.append(row)
                        shown = f"{row['tflops']:.1f} TFLOP/s" if row["status"] == "ok" else row["reason"]
                        print(f"[{time.time() - t0:6.1f}s] {pack} d={d} causal={causal} {mode} {p}: {shown}",
                              flush=True)
        write(out, rows, env, config, providers)
    print((out / "table.md").read_text())
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
