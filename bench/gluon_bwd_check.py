"""GPU: correctness of the Gluon backward against float64 and the portable backward, then TFLOP/s against the portable
backward and SDPA cuDNN / flash backward (H100; < 5 min cold).

PYTHONPATH=$PWD python3 bench/gluon_bwd_check.py             # check, then bench
PYTHONPATH=$PWD python3 bench/gluon_bwd_check.py --check      # correctness only
PYTHONPATH=$PWD python3 bench/gluon_bwd_check.py --bench      # timings only (B*N = 16k, H*d = 2048)
A hung kernel ends the process after --hang-s seconds (faulthandler), with the stage it was in printed.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sigattn.ops.backward import sigmoid_attn_bwd
from sigattn.ops.forward import sigmoid_attn_fwd
from sigattn.ops.gluon_backward import gluon_dense_bwd
from sigattn.ops.reference import sigmoid_attn

CASES = [
    # b, nq, nk, hq, hkv, d, causal, dtype, bias kind, sigmoid, need_dbias
    (2, 1000, 1000, 4, 4, 128, False, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 128, True, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 64, False, torch.bfloat16, "head", "fast", True),
    (2, 1000, 1000, 4, 4, 64, True, torch.bfloat16, "head", "fast", True),
    (2, 300, 1000, 8, 2, 128, True, torch.bfloat16, "head", "fast", True),  # GQA 4, nq < nk
    (2, 1000, 300, 8, 2, 64, True, torch.bfloat16, "head", "fast", True),  # GQA 4, rows that see nothing
    (3, 17, 300, 2, 1, 128, False, torch.bfloat16, "scalar", "fast", True),
    (2, 1, 17, 2, 2, 64, True, torch.bfloat16, "head", "fast", True),
    (2, 300, 17, 4, 2, 128, True, torch.bfloat16, "head", "fast", False),
    (2, 1000, 1000, 4, 4, 128, True, torch.bfloat16, "head", "accurate", True),
    (2, 1000, 1000, 4, 4, 64, False, torch.bfloat16, "head", "accurate", True),
    (2, 1000, 1000, 4, 4, 128, False, torch.float16, "head", "fast", True),
    (1, 4096, 4096, 4, 4, 64, True, torch.bfloat16, "head", "fast", True),
    (1, 4096, 4096, 2, 2, 128, True, torch.bfloat16, "scalar", "fast", True),
]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison(nbytes: int) -> None:
    """Fill freed caching-allocator memory with NaN so that outputs a kernel fails to write show up as NaN."""
    torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device="cuda").fill_(float("nan"))


def check() -> bool:
    ok_all = True
    print("b nq nk hq hkv d causal dtype bias sigmoid dbias | rel err vs float64 gluon/portable: dq dk dv dbias | "
          "dv==portable max|ddq| nan same ok", flush=True)
    for b, nq, nk, hq, hkv, d, causal, dt, bk, impl, need_dbias in CASES:
        faulthandler.dump_traceback_later(STAGE_S, exit=True)
        torch.manual_seed(hash((b, nq, nk, d, causal, impl)) % 1000)
        q = torch.randn(b, nq, hq, d, device="cuda", dtype=dt)
        k = torch.randn(b, nk, hkv, d, device="cuda", dtype=dt)
        v = torch.randn(b, nk, hkv, d, device="cuda", dtype=dt)
        do = torch.randn(b, nq, hq, d, device="cuda", dtype=dt)
        bias = -math.log(nk) + 0.5 * torch.randn(hq, device="cuda")
        bias_arg = bias if bk == "head" else float(bias[0])
        if bk != "head":
            bias = torch.full((hq,), bias_arg, device="cuda")
        scale = d**-0.5
        poison(8 * (q.numel() + k.numel() + v.numel()))
        t0 = time.time()
        dq, dk, dv, db = gluon_dense_bwd(do, q, k, v, bias_arg, scale, causal, impl, need_dbias=need_dbias)
        torch.cuda.synchronize()
        dt_s = time.time() - t0
        # float64 reference gradients.
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        b64 = bias.double().requires_grad_()
        o64 = sigmoid_attn(q64, k64, v64, scale=scale, bias=b64, causal=causal)
        rq, rk, rv, rb = torch.autograd.grad(o64, (q64, k64, v64, b64), do.double())
        # Portable backward (default form on this GPU), same inputs.
        pq, pk, pv, pb = sigmoid_attn_bwd(do, q, k, v, bias, scale, causal, -1, -1, None, False, impl,
                                          need_dbias=True)
        errs = [rel(dq, rq), rel(dk, rk), rel(dv, rv)]
        perrs = [rel(pq, rq), rel(pk, rk), rel(pv, rv)]
        if need_dbias:
            errs.append(rel(db, rb))
            perrs.append(rel(pb, rb))
        nan = any(bool(torch.isnan(t).any()) for t in (dq, dk, dv) + ((db,) if need_dbias else ()))
        dv_same = bool(torch.equal(dv, pv))
        ddq = (dq.float() - pq.float()).abs().max().item()
        # dK/dV have a fixed summation order (bitwise reproducible); dQ is a sum of fp32 reduce-adds (not).
        _, dk2, dv2, _ = gluon_dense_bwd(do, q, k, v, bias_arg, scale, causal, impl, need_dbias=need_dbias)
        same = bool(torch.equal(dk, dk2) and torch.equal(dv, dv2))
        ok = (not nan) and same and all(e <= 1.25 * p + 2e-4 for e, p in zip(errs, perrs))
        ok_all &= ok
        print(f"{b} {nq} {nk} {hq} {hkv} {d} {causal} {str(dt)[6:]} {bk} {impl} {need_dbias} | "
              + " ".join(f"{e:.2e}/{p:.2e}" for e, p in zip(errs, perrs))
              + f" | {dv_same} {ddq:.1e} {nan} {same} {'OK' if ok else 'FAIL'} ({dt_s:.1f}s)", flush=True)
    faulthandler.cancel_dump_traceback_later()
    return ok_all


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_shape(d: int, n: int, causal: bool) -> dict:
    """TFLOP/s of each provider at one shape (B*N = 16k, H*d = 2048, bf16, fast sigmoid, no dbias)."""
    b, h = 16384 // n, 2048 // d
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.full((h,), -math.log(n), device="cuda")
    scale = d**-0.5
    f = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
    row = {"d": d, "n": n, "causal": causal}

    def run(name, fn):
        try:
            row[name] = f / bench_ms(fn) * 1e-9
        except Exception as exc:  # report and go on
            print(f"{name} d={d} n={n} causal={causal}: {str(exc)[:200]}", flush=True)
            row[name] = 0.0

    def gluon():
        return gluon_dense_bwd(do, q, k, v, bias, scale, causal, "fast", need_dbias=False)

    run("gluon", gluon)
    run("portable", lambda: sigmoid_attn_bwd(do, q, k, v, bias, scale, causal, -1, -1, None, False, "fast",
                                             need_dbias=False))
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([backend]):
            o = sdpa(qt, kt, vt, is_causal=causal)
            run(name, lambda o=o: o.backward(dot, retain_graph=True))
        qt.grad = kt.grad = vt.grad = None
    # Same kernel again at the end of the shape: the within-run spread.
    run("gluon_again", gluon)
    return row


def bench(out_path: str | None) -> None:
    rows = []
    for d in (128, 64):
        for n in (4096, 16384):
            for causal in (False, True):
                faulthandler.dump_traceback_later(STAGE_S, exit=True)
                row = bench_shape(d, n, causal)
                print(json.dumps({k2: (round(x, 1) if isinstance(x, float) else x) for k2, x in row.items()}),
                      flush=True)
                rows.append(row)
    faulthandler.cancel_dump_traceback_later()
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)
    print("\n| d | N | causal | gluon (again) | portable | cuDNN | flash | gluon/cuDNN | gluon/portable |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['n']} | {'T' if r['causal'] else 'F'} | {r['gluon']:.0f} ({r['gluon_again']:.0f}) | "
              f"{r['portable']:.0f} | {r['cudnn']:.0f} | {r['flash']:.0f} | "
              f"{r['gluon'] / max(r['cudnn'], 1e-9):.2f} | {r['gluon'] / max(r['portable'], 1e-9):.2f} |")


STAGE_S = 120


def main() -> None:
    global STAGE_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--hang-s", type=int, default=120, help="seconds one check case or bench shape may take")
    ap.add_argument("--json")
    a = ap.parse_args()
    STAGE_S = a.hang_s
    both = not (a.check or a.bench)
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name} | torch {torch.__version__} | triton {triton.__version__} | cuDNN "
          f"{torch.backends.cudnn.version()}", flush=True)
    # Forward once, so a broken environment fails here and not inside the backward's first case.
    x = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    sigmoid_attn_fwd(x, x, x, torch.zeros(2, device="cuda"), 0.125, False, -1, -1, None, "fast")
    rc = 0
    if (a.check or both) and not check():
        rc = 1
    if a.bench or both:
        bench(a.json or (os.path.join(os.environ["OUT"], "gluon_bwd_bench.json") if "OUT" in os.environ else None))
    sys.exit(rc)


if __name__ == "__main__":
    main()
