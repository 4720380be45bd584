"""Context-parallel benchmark: ring vs all-gather vs one GPU, throughput and peak memory per GPU (torchrun, NCCL).

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/cp_bench.py --out $OUT/cp
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/cp_bench.py --seqlens 32k,128k --heads 32

Per sequence length N (bf16, causal, forward + backward, batch 1 by default): "one" runs sigmoid_attn_func over
the whole sequence on rank 0 (the others wait); "ring" and "all_gather" hold N / W zigzag-sharded tokens per
rank. Time is the median of --iters runs, each bracketed by barriers, the slowest rank's; memory is the
peak allocated on the busiest rank during one forward + backward, inputs and gradients included, and what a
forward leaves allocated for its backward (retained: per layer, the part that stacks up with depth). For the ring
it also times the same local calls with no communication ("compute") and the ring exchanges alone ("comm"),
and reports overlap = (compute + comm - ring) / min(compute, comm): 100% means the transfers hide entirely.
TFLOP/s per GPU = 4·B·H·N²·d / 2 (causal) × 3.5 (fwd + bwd) / time / W. Writes results.jsonl and table.txt.
Without CUDA it runs on gloo as a smoke test of the script itself:
    python -m torch.distributed.run --nproc-per-node 2 bench/cp_bench.py --seqlens 256 --heads 2 --headdim 16 \
        --dtype float32 --iters 1 --warmup 0 --out /tmp/cp
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
from sigattn.distributed.ring import TAG_DK, TAG_DV, TAG_K, TAG_V, LocalArgs, Ring, RingSigmoidAttn, Transfer  # noqa: E402

VARIANTS = ("one", "ring", "all_gather")
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def timed(fn: Callable[[], Any], warmup: int, iters: int, aligned: bool) -> float:
    """Median seconds of fn() over iters runs after warmup; `aligned` starts each run from a barrier."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if aligned:
            dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated on this GPU during fn(), everything live included (inputs, gradients); 0 on CPU."""
    if not CUDA:
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


class NoCommRing(Ring):
    """The ring's schedule with every exchange replaced by 'keep what you have': its compute alone."""

    def exchange(self, tensors, tags):  # type: ignore[override]
        return Transfer([], list(tensors), [])


def make_inputs(b: int, n: int, h: int, hkv: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    shapes = [(b, n, h, d), (b, n, hkv, d), (b, n, hkv, d), (b, n, h, d)]
    return [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]


def fwd_bwd(attn: Callable[..., torch.Tensor], q, k, v, do) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step() -> None:
        for t in leaves:
            t.grad = None
        attn(*leaves).backward(do)

    return step


def retained_memory(attn: Callable[..., torch.Tensor], q, k, v) -> int:
    """Bytes a forward leaves allocated for the backward (output + saved tensors beyond the inputs); 0 on CPU.

    Per layer of a model this is what stacks up with depth, unlike the backward's transient buffers.
    """
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


def comm_only(ring: Ring, k: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """The ring's transfers alone: W - 1 K/V hops (forward), W - 1 K/V and W - 1 dK/dV hops (backward).

    The backward's first dK/dV hop carries k's dtype and later ones fp32, as the ring sends them.
    """
    dk32, dv32 = k.float(), v.float()

    def step() -> None:
        for _ in range(2):
            kv = [k, v]
            for _ in range(ring.world - 1):
                kv = ring.exchange(kv, (TAG_K, TAG_V)).wait()
        for hop in range(ring.world - 1):
            ring.exchange([k, v] if hop == 0 else [dk32, dv32], (TAG_DK, TAG_DV)).wait()

    return step


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


def measure(
    variant: str, n: int, b: int, h: int, hkv: int, d: int, dtype: torch.dtype, causal: bool, a: argparse.Namespace
) -> dict[str, Any]:
    """This rank's numbers for one variant at global length n: ms, peak_gib (+ compute_ms, comm_ms for the ring)."""
    world = dist.get_world_size()
    if variant == "one":
        if dist.get_rank() != 0:
            return {}
        q, k, v, do = make_inputs(b, n, h, hkv, d, dtype)
        attn = lambda q_, k_, v_: sigmoid_attn_func(q_, k_, v_, causal=causal)  # noqa: E731
        step = fwd_bwd(attn, q, k, v, do)
        return {
            "peak_gib": peak_memory(step) / 2**30,
            "retained_gib": retained_memory(attn, q, k, v) / 2**30,
            "ms": 1e3 * timed(step, a.warmup, a.iters, aligned=False),
        }
    q, k, v, do = make_inputs(b, n // world, h, hkv, d, dtype)
    fn = ring_sigmoid_attn if variant == "ring" else all_gather_sigmoid_attn
    attn = lambda q_, k_, v_: fn(q_, k_, v_, causal=causal)  # noqa: E731
    step = fwd_bwd(attn, q, k, v, do)
    res = {
        "peak_gib": peak_memory(step) / 2**30,
        "retained_gib": retained_memory(attn, q, k, v) / 2**30,
        "ms": 1e3 * timed(step, a.warmup, a.iters, aligned=True),
    }
    if variant == "ring" and not a.no_overlap:
        args, nocomm = LocalArgs(d**-0.5, False, "fast", "auto"), NoCommRing(None)
        compute = fwd_bwd(
            lambda q_, k_, v_: RingSigmoidAttn.apply(q_, k_, v_, None, -math.log(n), nocomm, causal, "zigzag", args,
                                                     False),
            q, k, v, do,
        )
        res["compute_ms"] = 1e3 * timed(compute, a.warmup, a.iters, aligned=True)
        res["comm_ms"] = 1e3 * timed(comm_only(Ring(None), k, v), a.warmup, a.iters, aligned=True)
    return res


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
    ap.add_argument("--no-overlap", action="store_true", help="skip the ring's compute-only / comm-only runs")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later lengths are skipped past it")
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
    header = (
        f"# context parallel: {versions()}\n# B={b} H={h} Hkv={hkv} d={d} {a.dtype} causal={causal} "
        f"zigzag, fwd+bwd, median of {a.iters}"
    )
    log(header)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for n in [parse_len(x) for x in a.seqlens.split(",")]:
        if time.perf_counter() - start > a.budget:
            log(f"budget of {a.budget:.0f} s spent: skipping N={n} and longer")
            break
        one_ms = None
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
            gpus = 1 if variant == "one" else world
            row: dict[str, Any] = {"seqlen": n, "variant": variant, "gpus": gpus}
            errors = [r["error"] for r in every if "error" in r]
            if errors:
                row["error"] = errors[0]
            else:
                for key in ("ms", "peak_gib", "retained_gib", "compute_ms", "comm_ms"):
                    values = [r[key] for r in every if key in r]
                    if values:
                        row[key] = max(values)  # the slowest / fullest rank
                flops = attn_flops(b, h, n, n, d, causal, "fwd+bwd")
                row["tflops_per_gpu"] = flops / (row["ms"] * 1e-3) / gpus / 1e12
                row["tokens_per_s"] = b * n / (row["ms"] * 1e-3)
                if variant == "one":
                    one_ms = row["ms"]
                elif one_ms is not None:
                    row["speedup_vs_one"] = one_ms / row["ms"]
                if "comm_ms" in row:
                    hidden = row["compute_ms"] + row["comm_ms"] - row["ms"]
                    row["overlap"] = max(0.0, hidden) / max(1e-9, min(row["compute_ms"], row["comm_ms"]))
            rows.append(row)
            if rank == 0:
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            log(json.dumps(row))
    table = render(rows, header)
    log(table)
    if rank == 0:
        (out / "table.txt").write_text(table + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def render(rows: list[dict[str, Any]], header: str) -> str:
    cols = ["seqlen", "variant", "gpus", "ms", "speedup_vs_one", "tflops_per_gpu", "peak_gib", "retained_gib",
            "compute_ms", "comm_ms", "overlap"]
    lines = [header, " | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c, r.get("error", "") if c == "ms" else "")
            if c == "seqlen":
                x = f"{x // 1024}k" if x % 1024 == 0 else str(x)
            elif c == "overlap" and isinstance(x, float):
                x = f"{100 * x:.0f}%"
            elif isinstance(x, float):
                x = f"{x:.3g}" if x < 100 else f"{x:.0f}"
            cells.append(str(x))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
