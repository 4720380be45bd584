"""GPU: correctness of the Gluon forward against float64, then TFLOP/s against cuDNN and the portable kernel.

PYTHONPATH=$PWD python3 bench/gluon_check_bench.py --check all   # correctness table (fresh random inputs)
PYTHONPATH=$PWD python3 bench/gluon_check_bench.py --bench       # timings, B*N = 16k, H*d = 2048
(--check grid|persistent and --variants a,b --no-refs split the work into processes, so a hang costs one stage)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sigattn import sigmoid_attn_func

try:
    from sigattn.ops.gluon_forward import gluon_dense_fwd
except ImportError:  # run from a copy beside a checkout that lacks the module
    from gluon_forward import gluon_dense_fwd


def ref64(q, k, v, bias, scale, causal):
    """float64 sigmoid attention, (B, N, H, D) layout, bias (H,), causal bottom-right."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    g = qd.shape[1] // kd.shape[1]
    kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    s = qd @ kd.transpose(-1, -2) * scale + bias.double()[None, :, None, None]
    p = torch.sigmoid(s)
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        p = p.masked_fill(j > i + (nk - nq), 0.0)
    return (p @ vd).transpose(1, 2)


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


CASES = [
    # b, nq, nk, hq, hkv, d, causal, dtype, bias kind, sigmoid, pingpong
    (2, 1000, 1000, 4, 4, 128, False, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 128, True, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 64, False, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 64, True, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 128, False, torch.bfloat16, "scalar", "fast", False),
    (2, 1000, 1000, 4, 4, 128, True, torch.bfloat16, "scalar", "fast", False),
    (2, 1000, 1000, 4, 4, 64, True, torch.bfloat16, "scalar", "fast", False),
    (1, 4096, 4096, 2, 2, 128, True, torch.bfloat16, "head", "fast", True),
    (1, 4096, 4096, 2, 2, 64, True, torch.bfloat16, "head", "fast", True),
    (2, 300, 1000, 8, 2, 128, True, torch.bfloat16, "head", "fast", True),   # GQA 4, nq < nk
    (2, 1000, 300, 8, 2, 64, True, torch.bfloat16, "head", "fast", True),    # rows that see nothing
    (3, 17, 129, 2, 1, 128, False, torch.bfloat16, "head", "fast", True),
    (2, 1, 63, 2, 2, 64, False, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 128, False, torch.bfloat16, "head", "accurate", True),
    (2, 1000, 1000, 4, 4, 64, True, torch.float16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 64, True, torch.bfloat16, "head", "accurate", True),
    # More work items than SMs: each persistent program runs several items (ring/turn/Q/item phases carried over).
    (1, 4096, 4096, 16, 16, 128, True, torch.bfloat16, "head", "fast", True, dict(schedule="dynamic")),
    (1, 4096, 4096, 16, 16, 128, False, torch.bfloat16, "head", "fast", False, dict(schedule="dynamic")),
    (1, 4096, 4096, 32, 32, 64, True, torch.bfloat16, "head", "fast", True, dict(schedule="dynamic")),
    (1, 4096, 4096, 32, 32, 64, False, torch.bfloat16, "scalar", "fast", True, dict(schedule="dynamic")),
    (4, 1000, 1000, 32, 8, 64, True, torch.bfloat16, "head", "fast", True, dict(schedule="dynamic")),
    (4, 3000, 1000, 16, 4, 128, True, torch.bfloat16, "head", "fast", True, dict(schedule="dynamic")),
    (4, 1000, 1000, 32, 8, 64, True, torch.bfloat16, "head", "accurate", False, dict(schedule="dynamic")),
    (1, 4096, 4096, 16, 16, 128, True, torch.bfloat16, "head", "fast", True, dict(schedule="static")),
    (1, 4096, 4096, 32, 32, 64, True, torch.bfloat16, "head", "fast", True, dict(schedule="static")),
    (4, 3000, 1000, 16, 4, 128, True, torch.bfloat16, "head", "fast", True, dict(schedule="static")),
    (1, 4096, 4096, 16, 16, 128, True, torch.bfloat16, "head", "fast", True),
    (1, 4096, 4096, 32, 32, 64, False, torch.bfloat16, "head", "fast", True),
    # Tuning variants the benchmark times.
    (1, 4096, 4096, 16, 16, 128, True, torch.bfloat16, "head", "fast", True, dict(config=(64, 2, 64, 4, 240))),
    (2, 300, 1000, 8, 2, 64, True, torch.bfloat16, "head", "fast", True, dict(config=(64, 3, 64, 6, 160))),
    (1, 4096, 4096, 32, 32, 64, True, torch.bfloat16, "head", "fast", True, dict(config=(64, 2, 128, 4, 240))),
]


def check(which: str) -> bool:
    ok_all = True
    print("b nq nk hq hkv d causal dtype bias sigmoid pp cfg | gluon_rel portable_rel max|gluon-portable| nan ok",
          flush=True)
    for b, nq, nk, hq, hkv, d, causal, dt, bk, impl, pp, *cfg in CASES:
        cfg = cfg[0] if cfg else {}
        if (which == "persistent") != ("schedule" in cfg) and which != "all":
            continue
        torch.manual_seed(hash((b, nq, nk, d, causal)) % 1000)
        q = torch.randn(b, nq, hq, d, device="cuda", dtype=dt)
        k = torch.randn(b, nk, hkv, d, device="cuda", dtype=dt)
        v = torch.randn(b, nk, hkv, d, device="cuda", dtype=dt)
        if bk == "head":
            bias = -math.log(nk) + 0.5 * torch.randn(hq, device="cuda")
            bias_arg = bias
        else:
            bias_arg = -math.log(nk)
            bias = torch.full((hq,), bias_arg, device="cuda")
        scale = d**-0.5
        out = torch.full_like(q, float("nan"))
        t0 = time.time()
        o = gluon_dense_fwd(q, k, v, bias_arg, scale, causal, impl, pingpong=pp, out=out, **cfg)
        torch.cuda.synchronize()
        dt_s = time.time() - t0
        ref = ref64(q, k, v, bias, scale, causal)
        r = rel(o, ref)
        nan = bool(torch.isnan(o).any())
        po = sigmoid_attn_func(q, k, v, bias=bias, scale=scale, causal=causal, sigmoid_impl=impl, backend="triton")
        pr = rel(po, ref)
        # A second call on the same inputs must agree bitwise (a moving error is a race).
        o2 = gluon_dense_fwd(q, k, v, bias_arg, scale, causal, impl, pingpong=pp, **cfg)
        diff = (o.float() - po.float()).abs().max().item()
        same = bool(torch.equal(o, o2))
        ok = (not nan) and same and r <= 1.25 * pr + 2e-4
        ok_all &= ok
        print(f"{b} {nq} {nk} {hq} {hkv} {d} {causal} {str(dt)[6:]} {bk} {impl} {pp} {cfg} | {r:.3e} {pr:.3e} "
              f"{diff:.2e} {nan} "
              f"same={same} {'OK' if ok else 'FAIL'} ({dt_s:.1f}s)", flush=True)
    return ok_all


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


VARIANTS = {
    128: {"gluon": {}, "grid": dict(schedule="grid"), "dyn": dict(schedule="dynamic"),
          "static": dict(schedule="static"),
          "nopp": dict(pingpong=False)},
    64: {"gluon": {}, "grid": dict(schedule="grid"), "dyn": dict(schedule="dynamic"),
         "static": dict(schedule="static"),
         "nopp": dict(pingpong=False), "bn64": dict(config=(64, 3, 64, 6, 160))},
}


def bench(out_path: str | None, only: list[str] | None, refs: bool, seqlens: list[int]) -> None:
    rows = []
    for d in (128, 64):
        for n in seqlens:
            for causal in (False, True):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                bias = torch.full((h,), -math.log(n), device="cuda")
                f = 4 * b * h * n * n * d / (2 if causal else 1)
                row = {"d": d, "n": n, "causal": causal}
                for name, kw in VARIANTS[d].items():
                    if only is not None and name not in only:
                        continue
                    try:
                        t = bench_ms(lambda kw=kw: gluon_dense_fwd(q, k, v, bias, d**-0.5, causal, "fast", **kw))
                        row[name] = f / t * 1e-9
                    except Exception as exc:  # report and go on
                        print(f"{name} d={d} n={n}: {str(exc)[:200]}", flush=True)
                        row[name] = 0.0
                if refs:
                    t = bench_ms(lambda: sigmoid_attn_func(q, k, v, bias=bias, causal=causal, backend="triton"))
                    row["portable"] = f / t * 1e-9
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        t = bench_ms(lambda: sdpa(qt, kt, vt, is_causal=causal))
                    row["cudnn"] = f / t * 1e-9
                    # Default config timed again at the end: run-to-run spread of the same kernel.
                    t = bench_ms(lambda: gluon_dense_fwd(q, k, v, bias, d**-0.5, causal, "fast"))
                    row["gluon_again"] = f / t * 1e-9
                print(json.dumps({k2: (round(x, 1) if isinstance(x, float) else x) for k2, x in row.items()}),
                      flush=True)
                rows.append(row)
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)
    if not refs:
        return
    print("\n| d | N | causal | gluon (again) | variants | portable | cuDNN | gluon/cuDNN | gluon/portable |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        var = " ".join(f"{k2}={r[k2]:.0f}" for k2 in VARIANTS[r["d"]] if k2 != "gluon" and k2 in r)
        print(f"| {r['d']} | {r['n']} | {'T' if r['causal'] else 'F'} | {r['gluon']:.0f} ({r['gluon_again']:.0f}) | "
              f"{var} | {r['portable']:.0f} | {r['cudnn']:.0f} | {r['gluon'] / r['cudnn']:.2f} | "
              f"{r['gluon'] / r['portable']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", choices=["all", "grid", "persistent"])
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--variants", help="comma-separated subset of VARIANTS names")
    ap.add_argument("--no-refs", action="store_true", help="skip the portable kernel and cuDNN")
    ap.add_argument("--json")
    ap.add_argument("--seqlens", default="4096,16384", help="comma list of N (B = 16k / N)")
    a = ap.parse_args()
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name} | torch {torch.__version__} | triton {triton.__version__} | cuDNN "
          f"{torch.backends.cudnn.version()}", flush=True)
    rc = 0
    if a.check and not check(a.check):
        rc = 1
    if a.bench:
        tag = a.variants.replace(",", "_") if a.variants else "all"
        bench(a.json or (os.path.join(os.environ["OUT"], f"bench_{tag}.json") if "OUT" in os.environ else None),
              a.variants.split(",") if a.variants else None, not a.no_refs,
              [int(x) for x in a.seqlens.split(",")])
    sys.exit(rc)


if __name__ == "__main__":
    main()
