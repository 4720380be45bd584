"""The benchmark sweep and its command line (`sigattn bench`, `python -m sigattn.bench`) and the demo's quick_bench."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sigattn.bench import report, shapes
from sigattn.bench.flops import MODES, attn_bytes, attn_flops, gb_per_s, tflops_per_s
from sigattn.bench.providers import Provider, Unavailable, default_providers, providers_for
from sigattn.bench.shapes import Shape
from sigattn.bench.timing import measure

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_MATERIALIZED_SEQLEN = 8192
REASON_CHARS = 300


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def _base_row(provider: Provider, shape: Shape, mode: str, dtype_name: str) -> dict[str, Any]:
    return {
        "provider": provider.name,
        "kind": provider.kind,
        "mode": mode,
        "dtype": dtype_name,
        "batch": shape.batch,
        "nheads": shape.nheads,
        "seqlen_q": shape.seqlen_q,
        "seqlen_k": shape.seqlen_k,
        "headdim": shape.headdim,
        "causal": shape.causal,
        "status": "ok",
        "ms": None,
        "tflops": None,
        "gbps": None,
        "peak_mem_mib": None,
        "reason": "",
    }


def run_one(
    provider: Provider,
    shape: Shape,
    mode: str,
    dtype_name: str,
    device: torch.device,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
    max_materialized_seqlen: int | None = None,
) -> dict[str, Any]:
    """One result row; never raises for a provider's failure (the row's status and reason say what happened).

    status: 'ok', 'unavailable' (cannot run here), 'skipped' (materializes scores past the limit), or
    'error' (raised at this shape: OOM, unsupported head dim or dtype, ...).
    """
    row = _base_row(provider, shape, mode, dtype_name)
    longest = max(shape.seqlen_q, shape.seqlen_k)
    if provider.materializes and max_materialized_seqlen is not None and longest > max_materialized_seqlen:
        row.update(
            status="skipped",
            reason=f"materializes N x N scores; seqlen {longest} > --max-materialized-seqlen {max_materialized_seqlen}",
        )
        return row
    why_not = provider.check(device)
    if why_not is not None:
        row.update(status="unavailable", reason=why_not)
        return row
    caught: list[warnings.WarningMessage] = []
    built = None
    try:
        with warnings.catch_warnings(record=True) as caught, provider.context():
            warnings.simplefilter("always")
            built = provider.build(shape, DTYPES[dtype_name], device, mode)
            if isinstance(built, Unavailable):
                row.update(status="unavailable", reason=built.reason)
                return row
            timing = measure(built, device, warmup_ms, rep_ms)
    except torch.cuda.OutOfMemoryError:
        row.update(status="error", reason="out of memory")
    except Exception as e:
        # SDPA explains why a backend refused the call only in warnings raised before the error.
        why = [_first_line(str(w.message)) for w in caught]
        reason = "; ".join([f"{type(e).__name__}: {_first_line(str(e))}", *dict.fromkeys(why)])
        row.update(status="error", reason=reason[:REASON_CHARS])
    else:
        flops = attn_flops(shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k, shape.headdim, shape.causal, mode)
        nbytes = attn_bytes(
            shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k, shape.headdim, DTYPES[dtype_name].itemsize, mode
        )
        row.update(
            ms=timing.ms,
            tflops=tflops_per_s(flops, timing.ms),
            gbps=gb_per_s(nbytes, timing.ms),
            peak_mem_mib=None if timing.peak_bytes is None else timing.peak_bytes / 2**20,
        )
    finally:
        del built
    if row["status"] == "error" and device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_sweep(
    shape_list: Sequence[Shape],
    provider_names: Sequence[str],
    modes: Sequence[str],
    dtype_name: str,
    device: torch.device | str,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
    max_materialized_seqlen: int | None = DEFAULT_MAX_MATERIALIZED_SEQLEN,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for every (shape, mode, provider), providers measured back to back at each shape."""
    dev = torch.device(device)
    registry = providers_for(dev)
    unknown = [p for p in provider_names if p not in registry]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {sorted(registry)}")
    jobs = [(s, m, registry[p]) for s in shape_list for m in modes for p in provider_names]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the GPU machines run from a checkout, maybe without tqdm
        tqdm = None
    rows = []
    # disable=None: a bar on a terminal only; logs get results.partial.jsonl instead.
    bar = tqdm(jobs, desc="bench", unit="run", disable=None if progress else True) if tqdm else None
    for shape, mode, provider in bar if bar is not None else jobs:
        if bar is not None:
            bar.set_postfix_str(
                f"{provider.name} {mode} N={shape.seqlen_k} d={shape.headdim}{' causal' if shape.causal else ''}",
                refresh=False,
            )
        row = run_one(provider, shape, mode, dtype_name, dev, warmup_ms, rep_ms, max_materialized_seqlen)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _split(text: str) -> list[str]:
    return [p for p in text.replace(" ", ",").split(",") if p]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `sigattn bench`; defaults depend on the device (CPU: quick preset, fp32; GPU: full sweep, bf16)."""
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--providers",
        default=None,
        help="comma list, or 'all' (default: every provider on GPU; on CPU all but sigattn-triton*)",
    )
    parser.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma list of fwd, bwd, fwd+bwd")
    parser.add_argument("--headdims", default=None, help="comma list (default: 64,128; quick: 32,64)")
    parser.add_argument(
        "--seqlens", default=None, help="comma list, k suffix allowed (default: 512,1k,2k,4k,8k,16k; quick: 128,256)"
    )
    parser.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="fixed batch (default: 16k tokens / seqlen; quick: 1)")
    parser.add_argument("--nheads", type=int, default=None, help="fixed heads (default: 2048 / headdim; quick: 2)")
    parser.add_argument(
        "--baselines",
        default=",".join(report.DEFAULT_BASELINES),
        help="providers to compute speedups against, within this run at the same shape",
    )
    parser.add_argument("--out", default="bench_out", help="output directory (default: ./bench_out)")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny shapes that a CPU runs in seconds")
    preset.add_argument("--full", action="store_true", help="the FlashAttention-paper sweep (default on GPU)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up time per measurement, ms")
    parser.add_argument("--rep", type=float, default=None, help="measured time per measurement, ms")
    parser.add_argument(
        "--max-materialized-seqlen",
        type=int,
        default=DEFAULT_MAX_MATERIALIZED_SEQLEN,
        help="skip providers that build the N x N score matrix (naive-sigmoid, sdpa-math, "
        "sigattn-reference) above this seqlen; 0 = never skip",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--from",
        dest="from_file",
        default=None,
        help="measure nothing: rebuild tables and plot from a results.json or results.partial.jsonl into --out",
    )


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The concrete sweep an argument namespace asks for (device, dtype, shapes, providers, modes, ...)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or (device.type != "cuda" and not args.full)
    causal = shapes.causal_flags(args.causal)
    seqlens = shapes.parse_sizes(args.seqlens) if args.seqlens else None
    headdims = shapes.parse_sizes(args.headdims) if args.headdims else None
    if quick:
        shape_list = shapes.quick_sweep(
            seqlens or shapes.QUICK_SEQLENS, headdims or shapes.QUICK_HEADDIMS, causal, args.batch, args.nheads
        )
    else:
        shape_list = shapes.flash_sweep(
            seqlens or shapes.FLASH_SEQLENS,
            headdims or shapes.FLASH_HEADDIMS,
            causal,
            batch=args.batch,
            nheads=args.nheads,
        )
    if args.providers in (None, ""):
        providers = default_providers(device)
    elif args.providers == "all":
        providers = list(providers_for(device))
    else:
        providers = _split(args.providers)
    modes = _split(args.modes)
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"unknown modes {bad_modes}; known: {list(MODES)}")
    known = providers_for(device)
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {sorted(known)}")
    return {
        "device": device,
        "dtype": args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
        "preset": "quick" if quick else "flash",
        "shapes": shape_list,
        "providers": providers,
        "modes": modes,
        "baselines": _split(args.baselines),
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "max_materialized_seqlen": args.max_materialized_seqlen or None,
        "out": Path(args.out),
        "progress": not args.no_progress,
    }


def main(args: argparse.Namespace) -> int:
    """Run the sweep, print the short table, write CSV/JSON/markdown/PNG to --out.

    Returns 0 when at least one measurement succeeded, 1 when none did, 2 on bad arguments.
    """
    try:
        cfg = resolve(args)
    except ValueError as e:
        print(f"sigattn bench: {e}", file=sys.stderr)
        return 2
    out: Path = cfg["out"]
    out.mkdir(parents=True, exist_ok=True)
    if args.from_file:
        return _report_from(Path(args.from_file), cfg)
    env = report.environment(cfg["device"])
    config = {k: v for k, v in cfg.items() if k not in ("shapes", "out", "progress")}
    config["shapes"] = [s.key() for s in cfg["shapes"]]
    partial = out / "results.partial.jsonl"
    with partial.open("w") as f:

        def keep(row: dict[str, Any]) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        rows = run_sweep(
            cfg["shapes"],
            cfg["providers"],
            cfg["modes"],
            cfg["dtype"],
            cfg["device"],
            cfg["warmup_ms"],
            cfg["rep_ms"],
            cfg["max_materialized_seqlen"],
            cfg["progress"],
            keep,
        )
    rows = report.add_speedups(rows, cfg["baselines"])
    report.print_summary(rows, env, cfg["baselines"])
    paths = report.write_all(rows, env, config, out, cfg["baselines"])
    partial.unlink()
    print(f"wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _report_from(path: Path, cfg: dict[str, Any]) -> int:
    rows, env, config = report.load_results(path)
    env = env or report.environment(cfg["device"])
    rows = report.add_speedups(rows, cfg["baselines"])
    report.print_summary(rows, env, cfg["baselines"])
    paths = report.write_all(rows, env, config, cfg["out"], cfg["baselines"])
    print(f"wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def quick_bench(device: torch.device | str, show: bool = True) -> list[dict[str, Any]]:
    """A few-second forward comparison for `sigattn demo`: prints a short table (show=True) and returns
    the rows with speedups; writes no file.

    GPU: B=4, H=16, d=64/128, N=1k/4k, bf16, sigattn-triton vs sdpa-flash and sdpa-cudnn.
    CPU: the quick preset's non-causal shapes in fp32, sigattn-reference vs naive-sigmoid and sdpa-math.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        shape_list = shapes.flash_sweep((1024, 4096), (64, 128), (False,), batch=4, nheads=16)
        names, baselines, dtype_name = (
            ["sigattn-triton", "sdpa-flash", "sdpa-cudnn"],
            ["sdpa-flash", "sdpa-cudnn"],
            "bf16",
        )
        warmup_ms, rep_ms = 10.0, 30.0
    else:
        shape_list = shapes.quick_sweep(causal=(False,))
        names, baselines, dtype_name = ["sigattn-reference", "naive-sigmoid", "sdpa-math"], ["sdpa-math"], "fp32"
        warmup_ms, rep_ms = 2.0, 10.0
    rows = run_sweep(shape_list, names, ["fwd"], dtype_name, dev, warmup_ms, rep_ms, progress=False)
    rows = report.add_speedups(rows, baselines)
    if show:
        print(report.summary_text(rows, None, baselines), flush=True)
    return rows
