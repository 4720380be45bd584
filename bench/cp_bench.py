"""Context-parallel benchmark: ring vs all-gather vs one GPU — fwd, bwd, fwd+bwd time, memory, comm/compute overlap.

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/cp_bench.py --out $OUT/cp
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/cp_bench.py --seqlens 32k,128k --heads 32

Per global sequence length N (bf16, causal, batch 1, H = 16 heads of 128 by default): "one" runs
sigmoid_attn_func over the whole sequence on rank 0 (the others wait); "ring" and "all_gather" hold N / W
zigzag-sharded tokens per rank. Each of fwd, bwd (the backward after an untimed forward) and fwd+bwd is the median
of --iters runs, each started from a barrier, the slowest rank's. Memory: the peak allocated on the fullest rank
during one forward + backward (inputs and gradients included), and what a forward leaves allocated for its
backward (retained: per layer, the part that stacks up with depth). TFLOP/s per GPU = 4·B·H·N²·d / 2 (causal)
× (1, 2.5, 3.5) / time / W.

Overlap (ring): one fwd+bwd with CUDA events at the ring's phase boundaries (sigattn.distributed.ring.StepTimer)
gives, per step, the compute span and the wait span that follows it (the part of the transfer the compute did
not hide: exposed communication). The same schedule with every exchange removed gives the compute alone, and
the exchanges alone (K/V hop, first dK/dV hop in the input dtype, later hops fp32) give the communication
alone. overlap = 1 - exposed / comm alone (100%: the transfers hide entirely); slowdown = compute with the
transfers running beside it / compute alone (NCCL kernels share the SMs and HBM).

Writes results.jsonl (a row per measurement as it lands), results.json (header + rows), table.md and cp_bench.png.
Without CUDA it runs on gloo as a smoke test of the script itself:
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/cp_bench.py --seqlens 256 --heads 2 \
        --headdim 16 --dtype float32 --iters 1 --warmup 0 --out /tmp/cp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sigattn import sigmoid_attn_func  # noqa: E402
from sigattn.bench.flops import attn_flops  # noqa: E402
from sigattn.distributed import all_gather_sigmoid_attn, ring_sigmoid_attn  # noqa: E402
from sigattn.distributed.ring import (  # noqa: E402
    TAG_DK,
    TAG_DV,
    TAG_K,
    TAG_V,
    LocalArgs,
    Ring,
    RingSigmoidAttn,
    StepTimer,
    Transfer,
)

VARIANTS = ("one", "ring", "all_gather")
MODES = ("fwd", "bwd", "fwd+bwd")
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_modes(attn: Attn, q, k, v, do, warmup: int, iters: int, aligned: bool) -> dict[str, float]:
    """Median ms of fwd, bwd (after an untimed forward) and fwd+bwd; `aligned` starts each run from a barrier."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def once(mode: str) -> float:
        for t in leaves:
            t.grad = None
        out = attn(*leaves) if mode == "bwd" else None
        sync()
        if aligned:
            dist.barrier()
        t0 = time.perf_counter()
        if mode == "fwd":
            out = attn(*leaves)
        elif mode == "bwd":
            out.backward(do)
        else:
            attn(*leaves).backward(do)
        sync()
        return 1e3 * (time.perf_counter() - t0)

    res = {}
    for mode in MODES:
        for _ in range(warmup):
            once(mode)
        res[mode] = statistics.median(once(mode) for _ in range(iters))
    return res


def peak_memory(attn: Attn, q, k, v, do) -> int:
    """Peak bytes allocated on this GPU during one fwd+bwd, everything live included (inputs, gradients); 0 on CPU."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if not CUDA:
        attn(*leaves).backward(do)
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    attn(*leaves).backward(do)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def retained_memory(attn: Attn, q, k, v) -> int:
    """Bytes a forward leaves allocated for the backward (output + saved tensors beyond the inputs); 0 on CPU."""
    if not CUDA:
        return 0
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = attn(*leaves)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del out
    return kept


class NoCommRing(Ring):
    """The ring's schedule with every exchange replaced by 'keep what you have': its compute alone."""

    def exchange(self, tensors, tags):  # type: ignore[override]
        return Transfer([], list(tensors), [])


def make_inputs(b: int, n: int, h: int, hkv: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    shapes = [(b, n, h, d), (b, n, hkv, d), (b, n, hkv, d), (b, n, h, d)]
    return [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]


def step_spans(ring: Ring, n: int, causal: bool, args: LocalArgs, q, k, v, do, reps: int) -> dict[str, float]:
    """Median ms per StepTimer label over `reps` ring fwd+bwd runs (after one untimed warm-up run)."""
    assert ring.timer is not None
    runs: dict[str, list[float]] = {}
    for rep in range(reps + 1):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        dist.barrier()
        ring.timer.clear()
        RingSigmoidAttn.apply(*leaves, None, -math.log(n), ring, causal, "zigzag", args, False).backward(do)
        sync()
        if rep:
            for label, ms in ring.timer.spans():
                runs.setdefault(label, []).append(ms)
    return {label: statistics.median(x) for label, x in runs.items()}


def hop_times(ring: Ring, k: torch.Tensor, v: torch.Tensor, reps: int) -> dict[str, float]:
    """Median ms of one ring hop alone: K/V (input dtype), the first dK/dV hop (input dtype), later ones (fp32)."""
    hops = {"kv": ([k, v], (TAG_K, TAG_V)), "dkdv_first": ([k, v], (TAG_DK, TAG_DV)),
            "dkdv_fp32": ([k.float(), v.float()], (TAG_DK, TAG_DV))}
    timer = StepTimer(CUDA)
    res = {}
    for name, (tensors, tags) in hops.items():
        times = []
        for rep in range(reps + 1):
            dist.barrier()
            timer.clear()
            timer.mark("start")
            ring.exchange(tensors, tags).wait()
            timer.mark("hop")
            sync()
            if rep:
                times.append(timer.spans()[0][1])
        res[name] = statistics.median(times)
    return res


def overlap_figures(n: int, causal: bool, d: int, q, k, v, do, reps: int) -> dict[str, Any]:
    """This rank's ring overlap numbers: per-step spans with and without the transfers, hop times, summaries."""
    args = LocalArgs(d**-0.5, False, "fast", "auto")
    world = dist.get_world_size()
    together = step_spans(Ring(None, StepTimer(CUDA)), n, causal, args, q, k, v, do, reps)
    alone = step_spans(NoCommRing(None, StepTimer(CUDA)), n, causal, args, q, k, v, do, reps)
    hops = hop_times(Ring(None), k, v, reps)

    def total(spans: dict[str, float], prefix: str, suffix: str) -> float:
        return sum(ms for label, ms in spans.items() if label.startswith(prefix) and label.endswith(suffix))

    comm = {"fwd": (world - 1) * hops["kv"],
            "bwd": (world - 1) * hops["kv"] + (hops["dkdv_first"] + (world - 2) * hops["dkdv_fp32"] if world > 1
                                                else 0.0)}
    res: dict[str, Any] = {"hop_ms": hops, "steps_together_ms": together, "steps_compute_alone_ms": alone}
    for direction in ("fwd", "bwd"):
        compute = total(together, direction, ".compute")
        exposed = total(together, direction, "_wait")
        res[direction] = {
            "compute_alone_ms": total(alone, direction, ".compute"),
            "compute_ms": compute,
            "comm_alone_ms": comm[direction],
            "exposed_comm_ms": exposed,
            "overlap": max(0.0, 1 - exposed / comm[direction]) if comm[direction] > 0 else 1.0,
            "slowdown": compute / max(1e-9, total(alone, direction, ".compute")),
        }
    return res


def measure(variant: str, n: int, b: int, h: int, hkv: int, d: int, dtype: torch.dtype, causal: bool,
            a: argparse.Namespace) -> dict[str, Any]:
    """This rank's numbers for one variant at global length n (empty for ranks that sit out "one")."""
    world = dist.get_world_size()
    if variant == "one":
        if dist.get_rank() != 0:
            return {}
        q, k, v, do = make_inputs(b, n, h, hkv, d, dtype)
        attn: Attn = lambda q_, k_, v_: sigmoid_attn_func(q_, k_, v_, causal=causal)  # noqa: E731
        aligned = False
    else:
        q, k, v, do = make_inputs(b, n // world, h, hkv, d, dtype)
        fn = ring_sigmoid_attn if variant == "ring" else all_gather_sigmoid_attn
        attn = lambda q_, k_, v_: fn(q_, k_, v_, causal=causal)  # noqa: E731
        aligned = True
    res: dict[str, Any] = {
        "peak_gib": peak_memory(attn, q, k, v, do) / 2**30,
        "retained_gib": retained_memory(attn, q, k, v) / 2**30,
        "ms": time_modes(attn, q, k, v, do, a.warmup, a.iters, aligned),
    }
    if variant == "ring" and not a.no_overlap:
        res["ring"] = overlap_figures(n, causal, d, q, k, v, do, max(1, a.iters // 2))
    return res


def merge(n: int, variant: str, every: list[dict[str, Any]], b: int, h: int, d: int, causal: bool,
          one: dict[str, Any] | None) -> dict[str, Any]:
    """One row from every rank's numbers: the slowest / fullest rank's, with throughput and speedups."""
    gpus = 1 if variant == "one" else len(every)
    row: dict[str, Any] = {"seqlen": n, "variant": variant, "gpus": gpus}
    every = [r for r in every if r]
    errors = [r["error"] for r in every if "error" in r]
    if errors:
        row["error"] = errors[0]
        return row
    row["peak_gib"] = max(r["peak_gib"] for r in every)
    row["retained_gib"] = max(r["retained_gib"] for r in every)
    for mode in MODES:
        ms = max(r["ms"][mode] for r in every)
        row[f"{mode}_ms"] = ms
        row[f"{mode}_tflops_per_gpu"] = attn_flops(b, h, n, n, d, causal, mode) / (ms * 1e-3) / gpus / 1e12
        if one is not None and "error" not in one:
            row[f"{mode}_speedup"] = one[f"{mode}_ms"] / ms
    row["tokens_per_s"] = b * n / (row["fwd+bwd_ms"] * 1e-3)
    rings = [r["ring"] for r in every if "ring" in r]
    if rings:
        # The slowest rank per figure; per-step spans and hop times from rank 0.
        row["ring"] = {
            direction: {key: max(r[direction][key] for r in rings) if key != "overlap"
                        else min(r[direction][key] for r in rings) for key in rings[0][direction]}
            for direction in ("fwd", "bwd")
        }
        row["ring"].update({key: rings[0][key] for key in ("hop_ms", "steps_together_ms", "steps_compute_alone_ms")})
    return row


def versions() -> str:
    if not CUDA:
        return f"{dist.get_world_size()} CPU processes (gloo smoke run), torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
            timeout=20,
        ).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        driver = "?"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return (
        f"{dist.get_world_size()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), driver {driver}, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_v}, NCCL {nccl}"
    )


def _cell(x: Any, pct: bool = False) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        if pct:
            return f"{100 * x:.0f}%"
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def render(rows: list[dict[str, Any]], header: str) -> str:
    """Markdown: throughput and memory per row, then the ring's overlap figures."""
    cols = ["seqlen", "variant", "gpus", "fwd_ms", "bwd_ms", "fwd+bwd_ms", "fwd_speedup", "bwd_speedup",
            "fwd+bwd_speedup", "fwd+bwd_tflops_per_gpu", "peak_gib", "retained_gib"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [fmt_len(r["seqlen"]), r["variant"], str(r["gpus"])]
        if "error" in r:
            cells += [r["error"]] + [""] * (len(cols) - 4)
        else:
            cells += [_cell(r.get(c)) for c in cols[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    ocols = ["seqlen", "dir", "compute alone ms", "compute with comm ms", "slowdown", "comm alone ms",
             "exposed comm ms", "overlap"]
    ring_rows = [r for r in rows if "ring" in r]
    if ring_rows:
        lines += ["", "Ring overlap (per fwd or bwd, summed over steps; slowest rank):", "",
                  "| " + " | ".join(ocols) + " |", "|" + "---|" * len(ocols)]
        for r in ring_rows:
            for direction in ("fwd", "bwd"):
                o = r["ring"][direction]
                cells = [fmt_len(r["seqlen"]), direction, _cell(o["compute_alone_ms"]), _cell(o["compute_ms"]),
                         f"{o['slowdown']:.3f}", _cell(o["comm_alone_ms"]), _cell(o["exposed_comm_ms"]),
                         _cell(o["overlap"], pct=True)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Three panels over N: fwd+bwd TFLOP/s per GPU, speedup vs one GPU (fwd, bwd, fwd+bwd), peak memory per GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ok = [r for r in rows if "error" not in r]
    for variant, marker, color in zip(VARIANTS, "os^", ("C0", "C1", "C2")):
        rs = [r for r in ok if r["variant"] == variant]
        if not rs:
            continue
        ns = [r["seqlen"] for r in rs]
        style = {"marker": marker, "color": color}
        axes[0].plot(ns, [r["fwd+bwd_tflops_per_gpu"] for r in rs], label=variant, **style)
        axes[2].plot(ns, [r["peak_gib"] for r in rs], label=variant, **style)
        for mode, ls in zip(MODES, (":", "--", "-")):
            pts = [(n, r[f"{mode}_speedup"]) for n, r in zip(ns, rs) if f"{mode}_speedup" in r]
            if pts:
                axes[1].plot(*zip(*pts), ls=ls, label=f"{variant} {mode}", **style)
    gpus = max((r["gpus"] for r in ok), default=2)
    axes[1].axhline(gpus, color="gray", lw=0.8)
    seqlens = sorted({r["seqlen"] for r in ok})
    axes[0].set(title="fwd+bwd TFLOP/s per GPU")
    axes[1].set(title=f"speedup vs one GPU (ideal {gpus})")
    axes[2].set(title="peak memory per GPU (GiB)",
                yscale="log" if any(r["peak_gib"] > 0 for r in ok) else "linear")
    for ax in axes:
        ax.set(xscale="log", xlabel="global seqlen (tokens)")
        if seqlens:
            ax.set_xticks(seqlens, [fmt_len(n) for n in seqlens])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="32k,64k,128k,256k", help="global sequence lengths, e.g. 32k,128k")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads (default: --heads)")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of one,ring,all_gather")
    ap.add_argument("--no-overlap", action="store_true", help="skip the ring's overlap measurements")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds; longer lengths are skipped once this is spent (a length costs ~4x the one before)")
    ap.add_argument("--out", default=os.environ.get("OUT", "cp_out"))
    a = ap.parse_args()

    if CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if CUDA else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    causal = not a.no_causal
    dtype = getattr(torch, a.dtype)
    h, hkv, d, b = a.heads, a.kv_heads or a.heads, a.headdim, a.batch
    variants = [x for x in a.variants.split(",") if x]
    out = Path(a.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").unlink(missing_ok=True)
    header = (
        f"context parallel: {versions()}; B={b} H={h} Hkv={hkv} d={d} {a.dtype} causal={causal} zigzag, "
        f"median of {a.iters}"
    )
    log(header)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for n in [parse_len(x) for x in a.seqlens.split(",")]:
        spent = time.perf_counter() - start
        if spent > a.budget:
            log(f"budget of {a.budget:.0f} s spent ({spent:.0f} s): skipping N={fmt_len(n)} and longer")
            break
        one: dict[str, Any] | None = None
        for variant in variants:
            local: dict[str, Any] = {}
            try:
                local = measure(variant, n, b, h, hkv, d, dtype, causal, a)
            except torch.cuda.OutOfMemoryError:
                local = {"error": "OOM"}
            except RuntimeError as e:
                local = {"error": str(e).split("\n")[0][:80]}
            if CUDA:
                torch.cuda.empty_cache()
            # Merged after the fact, so a rank that failed alone (OOM of "one" on rank 0) cannot desync
            # the others' collectives: "one" runs no collective inside measure().
            every: list[dict[str, Any]] = [{} for _ in range(world)]
            dist.all_gather_object(every, local)
            row = merge(n, variant, every, b, h, d, causal, one)
            if variant == "one":
                one = row
            rows.append(row)
            if rank == 0:
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            log(json.dumps({k: v for k, v in row.items() if k != "ring"}))
    table = render(rows, "# " + header)
    log(table)
    if rank == 0:
        (out / "table.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        try:
            plot(rows, out / "cp_bench.png", header)
        except ImportError as e:
            print(f"no plot: {e}")
        log(f"total {time.perf_counter() - start:.0f} s; wrote {out}/table.md, results.json, results.jsonl, "
            "cp_bench.png")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
