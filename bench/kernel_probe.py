"""GPU-only probe of the attention kernels: sigmoid error figures, config sweeps, speed vs SDPA (flash, cuDNN).

Run on an H100/H200: PYTHONPATH=$PWD python3 bench/kernel_probe.py [--sweep] [--quick] [--out DIR]
On any machine (no GPU): ... kernel_probe.py --ptxas fwd:128:128,64,4,2 dkdv:128:64,128,8,3:fused [--dtype float32]
(compiled as a launch compiles them: sigattn.bench.launch_compile)
FLOPs = 4*B*H*N^2*d (halved for causal, x2.5 for the backward); medians from triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from sigattn.ops.backward import sigmoid_attn_bwd
from sigattn.ops.configs import AttnConfig, backward_configs, forward_config
from sigattn.ops.forward import sigmoid_attn_fwd
from sigattn.ops.primitives import sigmoid_from_z, z_factor
from sigattn.ops.reference import sigmoid_attn


@triton.jit
def _sigmoid_probe_kernel(X, P, n, zf, SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(P + offs, sigmoid_from_z(x * zf, SIGMOID), mask=offs < n)


def sigmoid_error_table() -> list[str]:
    """Elementwise error of both kernel sigmoid modes against float64, by logit range."""
    x = torch.linspace(-30, 30, 2**22, device="cuda", dtype=torch.float32)
    ref = torch.sigmoid(x.double())
    rows = ["| logit range | mode | max abs err | max rel err |", "|---|---|---|---|"]
    for mode, name in ((0, "accurate"), (1, "fast")):
        p = torch.empty_like(x)
        _sigmoid_probe_kernel[(triton.cdiv(x.numel(), 1024),)](x, p, x.numel(), z_factor(mode), SIGMOID=mode,
                                                                BLOCK=1024)
        for lo, hi in ((-30, -12), (-12, -6), (-6, -2), (-2, 2), (2, 30)):
            sel = (x >= lo) & (x < hi)
            err = (p.double() - ref)[sel].abs()
            rel = err / ref[sel]
            rows.append(f"| [{lo}, {hi}) | {name} | {err.max().item():.2e} | {rel.max().item():.2e} |")
    return rows


def e2e_error_table() -> list[str]:
    """Relative error (||out - ref|| / ||ref||) vs float64 at b = -log n, and SDPA's own bf16 error on softmax."""
    rows = ["| N | d | what | out rel err | dq | dk | dv |", "|---|---|---|---|---|---|---|"]
    for n, d in ((1024, 64), (4096, 128)):
        b, h = 1, 4
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        bias = torch.full((h,), -math.log(n), device="cuda")
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref = sigmoid_attn(*leaves, scale=d**-0.5, bias=-math.log(n))
        rg = torch.autograd.grad(ref, leaves, do.double())
        for impl in ("accurate", "fast"):
            o = sigmoid_attn_fwd(q, k, v, bias, d**-0.5, False, -1, -1, None, impl)
            g = sigmoid_attn_bwd(do, q, k, v, bias, d**-0.5, False, -1, -1, None, True, impl)[:3]
            errs = [rel(o, ref)] + [rel(a, r) for a, r in zip(g, rg)]
            rows.append(f"| {n} | {d} | sigattn {impl} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
        lq = [t.transpose(1, 2).double().requires_grad_() for t in (q, k, v)]
        sref = sdpa(*lq)
        sg = torch.autograd.grad(sref, lq, do.transpose(1, 2).double())
        for name, be in (("SDPA flash bf16 (softmax)", SDPBackend.FLASH_ATTENTION),
                         ("SDPA cuDNN bf16 (softmax)", SDPBackend.CUDNN_ATTENTION)):
            lb = [t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
            with sdpa_kernel([be]):
                so = sdpa(*lb)
                g = torch.autograd.grad(so, lb, do.transpose(1, 2))
            errs = [rel(so, sref)] + [rel(a, r) for a, r in zip(g, sg)]
            rows.append(f"| {n} | {d} | {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    return rows


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def bench(fn, reps: int = 100) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def flops(b: int, h: int, n: int, d: int, causal: bool) -> float:
    return 4 * b * h * n * n * d / (2 if causal else 1)


def one_shape(b: int, h: int, n: int, d: int, causal: bool, impl: str, cfg: AttnConfig | None) -> dict:
    """TFLOP/s of ours, SDPA cuDNN and SDPA flash, forward and backward, at one shape (bf16)."""
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.full((h,), -math.log(n), device="cuda")
    f = flops(b, h, n, d, causal)
    t_f = bench(lambda: sigmoid_attn_fwd(q, k, v, bias, d**-0.5, causal, -1, -1, None, impl, cfg))
    # Fixed bias (the paper's b = -log n): no dbias reduction, as the autograd path does when bias needs no grad.
    t_b = bench(lambda: sigmoid_attn_bwd(do, q, k, v, bias, d**-0.5, causal, -1, -1, None, False, impl,
                                         need_dbias=False))
    t_bd = bench(lambda: sigmoid_attn_bwd(do, q, k, v, bias, d**-0.5, causal, -1, -1, None, False, impl,
                                          need_dbias=False, fused_dq=True))
    res = {"d": d, "n": n, "causal": causal, "ours_fwd": f / t_f * 1e-9, "ours_bwd": 2.5 * f / t_b * 1e-9,
           "ours_bwd_det": 2.5 * f / t_bd * 1e-9}
    qt, kt, vt, dot = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v, do))
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([be]):
            tf = bench(lambda: sdpa(qt, kt, vt, is_causal=causal))
            o = sdpa(qt, kt, vt, is_causal=causal)
            tb = bench(lambda o=o: o.backward(dot, retain_graph=True))
        res[f"{name}_fwd"], res[f"{name}_bwd"] = f / tf * 1e-9, 2.5 * f / tb * 1e-9
    return res


def safe_one_shape(b: int, h: int, n: int, d: int, causal: bool, impl: str) -> dict:
    """one_shape, with SDPA backends that refuse a head dim reported as 0."""
    try:
        return one_shape(b, h, n, d, causal, impl, None)
    except Exception as exc:  # SDPA refusing the head dim
        print(f"d={d}: {str(exc)[:120]}", flush=True)
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.full((h,), -math.log(n), device="cuda")
    f = flops(b, h, n, d, causal)
    t_f = bench(lambda: sigmoid_attn_fwd(q, k, v, bias, d**-0.5, causal, -1, -1, None, impl))
    t_b = bench(lambda: sigmoid_attn_bwd(do, q, k, v, bias, d**-0.5, causal, -1, -1, None, False, impl,
                                         need_dbias=False))
    return {"d": d, "n": n, "causal": causal, "ours_fwd": f / t_f * 1e-9, "ours_bwd": 2.5 * f / t_b * 1e-9,
            "ours_bwd_det": 0.0, "cudnn_fwd": 0.0, "cudnn_bwd": 0.0, "fa2_fwd": 0.0, "fa2_bwd": 0.0}


def extra_head_dims(ds: list[int], impl: str) -> list[str]:
    """Ours (and SDPA where it runs) at N=4096 for the other head dims."""
    rows = ["| d | causal | fwd ours | fwd cuDNN | fwd FA2 | bwd ours | bwd cuDNN | bwd FA2 |",
            "|---|---|---|---|---|---|---|---|"]
    for d in ds:
        for causal in (False, True):
            r = safe_one_shape(4, 2048 // d if d in (32, 64, 128, 256) else 16, 4096, d, causal, impl)
            rows.append(f"| {d} | {causal} | {r['ours_fwd']:.0f} | {r['cudnn_fwd']:.0f} | {r['fa2_fwd']:.0f} "
                        f"| {r['ours_bwd']:.0f} | {r['cudnn_bwd']:.0f} | {r['fa2_bwd']:.0f} |")
            print(rows[-1], flush=True)
    return rows


def speed_table(ns: list[int], ds: list[int], impl: str, fwd_cfg: dict | None = None) -> tuple[list[str], list]:
    rows = [
        "| d | N | causal | fwd ours | fwd cuDNN | fwd FA2 | fwd ours/cuDNN | bwd ours | bwd cuDNN | bwd FA2 "
        "| bwd ours/cuDNN | bwd ours atomic-dQ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    raw = []
    for d in ds:
        for n in ns:
            for causal in (False, True):
                cfg = None if fwd_cfg is None else fwd_cfg.get(d)
                res = one_shape(16384 // n, 2048 // d, n, d, causal, impl, cfg)
                raw.append(res)
                rows.append(
                    f"| {d} | {n} | {causal} | {res['ours_fwd']:.0f} | {res['cudnn_fwd']:.0f} | {res['fa2_fwd']:.0f} "
                    f"| {res['ours_fwd'] / res['cudnn_fwd']:.2f} | {res['ours_bwd']:.0f} | {res['cudnn_bwd']:.0f} "
                    f"| {res['fa2_bwd']:.0f} | {res['ours_bwd'] / res['cudnn_bwd']:.2f} | {res['ours_bwd_det']:.0f} |"
                )
                print(rows[-1], flush=True)
    return rows, raw


def time_forward(q, k, v, bias, causal: bool, impl: str, cfg: AttnConfig, tma: bool = True) -> float | None:
    d = q.shape[-1]
    try:
        return bench(lambda: sigmoid_attn_fwd(q, k, v, bias, d**-0.5, causal, -1, -1, None, impl, cfg, tma), reps=50)
    except Exception as exc:  # out of shared memory / registers
        print(f"d={d} {cfg}: {type(exc).__name__}", flush=True)
        return None


FWD_CANDIDATES = {
    64: [(128, 64, 8, 4), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
    128: [(128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
}


def sweep_forward(n: int, ds: list[int], causal: bool, impl: str) -> dict[int, AttnConfig]:
    """Time every candidate forward config at one shape per head dim; return the best per head dim."""
    best = {}
    for d in ds:
        h, b = 2048 // d, 16384 // n
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        bias = torch.full((h,), -math.log(n), device="cuda")
        f = flops(b, h, n, d, causal)
        results = []
        for bm, bn, w, st in FWD_CANDIDATES[d]:
            for pipe in (False, True):
                cfg = AttnConfig(bm, bn, w, st, pipe)
                t = time_forward(q, k, v, bias, causal, impl, cfg)
                if t is not None:
                    results.append((f / t * 1e-9, cfg))
        results.sort(key=lambda r: -r[0])
        for tf, cfg in results:
            print(f"sweep fwd d={d} n={n} causal={causal}: {tf:.0f} TFLOP/s {cfg}", flush=True)
        best[d] = results[0][1]
    return best


def time_backward(q, k, v, do, bias, causal: bool, impl: str, det: bool, cfgs) -> float | None:
    d = q.shape[-1]
    try:
        return bench(lambda: sigmoid_attn_bwd(do, q, k, v, bias, d**-0.5, causal, -1, -1, None, det, impl, cfgs,
                                              need_dbias=False), reps=50)
    except Exception as exc:  # out of shared memory / registers
        print(f"bwd d={d} {cfgs[0]}: {type(exc).__name__}", flush=True)
        return None


def sweep_backward(n: int, ds: list[int], causal: bool, impl: str, deterministic: bool) -> dict[int, AttnConfig]:
    """Time candidate dK/dV(/dQ) kernel configs (the dQ kernel keeps its default) per head dim; return the best."""
    best = {}
    for d in ds:
        h, b = 2048 // d, 16384 // n
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        bias = torch.full((h,), -math.log(n), device="cuda")
        f = 2.5 * flops(b, h, n, d, causal)
        cfg_q = backward_configs(d, torch.bfloat16, q.device)[1]
        results = []
        for bm in (32, 64):
            for bn in (64, 128):
                for w in (4, 8):
                    for s in (2, 3):
                        cfg = AttnConfig(bm, bn, w, s)
                        t = time_backward(q, k, v, do, bias, causal, impl, deterministic, (cfg, cfg_q))
                        if t is None:
                            continue
                        results.append((f / t * 1e-9, cfg))
        results.sort(key=lambda r: -r[0])
        for tf, cfg in results[:5]:
            print(f"sweep bwd d={d} n={n} det={deterministic}: {tf:.0f} TFLOP/s {cfg}", flush=True)
        best[d] = results[0][1]
    return best


# Candidates chosen from local ptxas reports (no spills): see bench/NOTES.md.
FWD_EXP = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3, True), (128, 64, 4, 4), (64, 64, 4, 3)],
    128: [(128, 64, 4, 2), (128, 32, 4, 2), (128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2, True),
          (128, 64, 8, 3, True)],
}
DKDV_EXP = {
    64: [(64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 3)],
    128: [(64, 128, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2)],
}
DQ_EXP = {
    64: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3)],
}


def experiments(n: int, ds: list[int], impl: str) -> list[str]:
    """Grid order under causal (forward, both backward forms) and backward tile configs, at one N per head dim."""
    rows = ["| exp | d | variant | TFLOP/s |", "|---|---|---|---|"]
    for d in ds:
        h, b = 2048 // d, 16384 // n
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        bias = torch.full((h,), -math.log(n), device="cuda")
        fcfg = forward_config(d, torch.bfloat16, q.device, True)
        kv_cfg, q_cfg = backward_configs(d, torch.bfloat16, q.device)
        for major in (False, True):
            t = time_forward(q, k, v, bias, True, impl, replace(fcfg, block_major=major))
            rows.append(f"| fwd causal | {d} | block_major={major} | {flops(b, h, n, d, True) / t * 1e-9:.0f} |")
            for det in (False, True):
                cfgs = (replace(kv_cfg, block_major=major), replace(q_cfg, block_major=major))
                t = time_backward(q, k, v, do, bias, True, impl, det, cfgs)
                tf = 2.5 * flops(b, h, n, d, True) / t * 1e-9
                rows.append(f"| bwd causal det={det} | {d} | block_major={major} | {tf:.0f} |")
            print("\n".join(rows[-3:]), flush=True)
        f = flops(b, h, n, d, False)
        for cfg in FWD_EXP[d]:
            t = time_forward(q, k, v, bias, False, impl, AttnConfig(*cfg))
            if t is not None:
                rows.append(f"| fwd cfg | {d} | {cfg} | {f / t * 1e-9:.0f} |")
                print(rows[-1], flush=True)
        for det in (False, True):
            for cfg in DKDV_EXP[d]:
                t = time_backward(q, k, v, do, bias, False, impl, det, (AttnConfig(*cfg), q_cfg))
                if t is not None:
                    rows.append(f"| bwd det={det} dK/dV cfg | {d} | {cfg} | {2.5 * f / t * 1e-9:.0f} |")
                    print(rows[-1], flush=True)
        for cfg in DQ_EXP[d]:
            t = time_backward(q, k, v, do, bias, False, impl, True, (kv_cfg, AttnConfig(*cfg)))
            if t is not None:
                rows.append(f"| bwd det dQ cfg | {d} | {cfg} | {2.5 * f / t * 1e-9:.0f} |")
                print(rows[-1], flush=True)
    return rows


CAUSAL_EXP = {
    64: [(128, 64, 4, 3), (128, 64, 4, 3, False, True), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3),
         (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3, False, True)],
    128: [(128, 64, 4, 2), (128, 64, 4, 2, False, True), (128, 32, 4, 3), (128, 32, 4, 3, False, True),
          (64, 64, 4, 2)],
}


def causal_experiments(ns: list[int], ds: list[int], impl: str) -> list[str]:
    """Forward causal tile configs and grid order across sequence lengths (same process, same GPU)."""
    rows = ["| d | N | config (BM, BN, warps, stages, pipeline, block_major) | causal fwd TFLOP/s |",
            "|---|---|---|---|"]
    for d in ds:
        for n in ns:
            h, b = 2048 // d, 16384 // n
            q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            bias = torch.full((h,), -math.log(n), device="cuda")
            for cfg in CAUSAL_EXP[d]:
                t = time_forward(q, k, v, bias, True, impl, AttnConfig(*cfg))
                if t is not None:
                    rows.append(f"| {d} | {n} | {cfg} | {flops(b, h, n, d, True) / t * 1e-9:.0f} |")
                    print(rows[-1], flush=True)
    return rows


def ptxas_report(kernel: str, d: int, cfg: tuple[int, ...], fused: bool = False, tma: bool = True,
                 varlen: bool = False, wide: bool = False, dtype: str = "bfloat16",
                 shape: tuple[int, int, int, int] = (2, 4096, 16, 16)) -> str:
    """Registers / spill bytes / shared memory / SASS op counts of one kernel compiled for sm_90 on this machine
    (no GPU needed: Triton ships ptxas and cuobjdump). kernel: "fwd", "dkdv" or "dq"; fast sigmoid; varlen: the
    packed-sequence form; wide: int64 pointer-tile offsets (WIDE_OFFS=True forced). The kernel is compiled as a
    launch of shape (B, N, Hq, Hkv) compiles it (sigattn.bench.launch_compile: the launcher's own arguments, Triton's
    ==1 / divisible-by-16 specialization), so the reading is the launch's; PROBE_DBIAS=1: the per-head bias gradient
    form. A TMA request the launcher refuses (e.g. padded d > 128) reports the pointer path, as the launch runs."""
    from sigattn.bench.launch_compile import DTYPES, backward_launches, forward_launches
    from sigattn.ops.configs import sm90_backward_configs

    bm, bn, warps, stages = cfg[:4]
    acfg = AttnConfig(bm, bn, warps, stages, pipeline_qk=bool(cfg[4:5] and cfg[4]))
    b, n, hq, hkv = shape
    dt = DTYPES[dtype]
    over = {"WIDE_OFFS": True} if wide else None
    if kernel == "fwd":
        launches = forward_launches(b, n, hq, hkv, d, dt, config=acfg, use_tma=tma, varlen=varlen,
                                    constexpr_overrides=over)
    else:
        kv_cfg, q_cfg = sm90_backward_configs(d, dt)
        cfgs = (acfg, q_cfg) if kernel == "dkdv" else (kv_cfg, acfg)
        launches = backward_launches(b, n, hq, hkv, d, dt, need_dbias=os.environ.get("PROBE_DBIAS") == "1",
                                     configs=cfgs, use_tma=tma, fused_dq=fused and kernel == "dkdv", varlen=varlen,
                                     only="dkdv" if kernel == "dkdv" else "dq_kernel", constexpr_overrides=over)
    launch = launches[0]
    k = launch.compiled
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "sigattn_probe.cubin")
    with open(path, "wb") as fh:
        fh.write(k.asm["cubin"])
    res = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
    regs = " ".join(w for line in res.splitlines() if "REG" in line for w in line.split() if w[:4] in ("REG:", "STAC"))
    sass = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    ops = {op: sass.count(op) for op in ("HGMMA", "MUFU.TANH", "STL", "LDL")}
    c = launch.constexprs
    form = (f"{dtype} shape={shape} fused={c.get('FUSED_DQ', False)} tma={c['USE_TMA']} varlen={c['VARLEN']} "
            f"wide={c['WIDE_OFFS']} dbias={c.get('NEED_DBIAS', False)}")
    return f"{kernel} d={d} {cfg} {form}: smem={k.metadata.shared} {regs} {ops}"


def header() -> list[str]:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    cudnn = torch.backends.cudnn.version()
    return [f"GPU: {smi}; torch {torch.__version__}; triton {triton.__version__}; cuDNN {cudnn}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--causal-ns", default="1024,4096,16384", help="--exp-causal: sequence lengths")
    ap.add_argument("--sweep-bwd", action="store_true")
    ap.add_argument("--exp", action="store_true")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--extra-ds", default="")
    ap.add_argument("--exp-causal", action="store_true")
    ap.add_argument("--ptxas", nargs="+", metavar="KERNEL:D:BM,BN,WARPS,STAGES[:fused][:ptr][:varlen][:wide]",
                    help="CPU-only: resource report of kernels compiled for sm_90 as a launch of --shape/--dtype "
                         "compiles them, e.g. dkdv:128:64,128,8,3:fused")
    ap.add_argument("--shape", default="2,4096,16,16", help="--ptxas launch shape B,N,HQ,HKV")
    ap.add_argument("--dtype", default="bfloat16", help="--ptxas dtype: bfloat16, float16 or float32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--impl", default="fast")
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--no-errors", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.ptxas:
        for spec in args.ptxas:
            kernel, d, cfg, *rest = spec.split(":")
            print(ptxas_report(kernel, int(d), tuple(int(x) for x in cfg.split(",")), fused="fused" in rest,
                               tma="ptr" not in rest, varlen="varlen" in rest, wide="wide" in rest,
                               dtype=args.dtype, shape=tuple(int(x) for x in args.shape.split(","))))
        return
    ns, ds = [int(x) for x in args.ns.split(",")], [int(x) for x in args.ds.split(",")]
    out = header()
    if not args.no_errors:
        out += ["", "sigmoid elementwise error"] + sigmoid_error_table()
        out += ["", "end-to-end error vs float64, b = -log n"] + e2e_error_table()
    cfgs = None
    if args.sweep:
        cfgs = sweep_forward(8192, ds, False, args.impl)
        out += ["", f"forward sweep best: {cfgs}"]
    if args.sweep_bwd:
        out += ["", f"backward sweep best (fused): {sweep_backward(8192, ds, False, args.impl, False)}"]
    if args.exp:
        out += ["", "experiments at N=8192"] + experiments(8192, ds, args.impl)
    if args.exp_causal:
        out += ["", "causal forward configs"] + causal_experiments(
            [int(x) for x in args.causal_ns.split(",")], ds, args.impl)
    if args.extra_ds:
        out += ["", "other head dims, N=4096, B=4 (H = 2048/d, or 16 for d=96/192)"]
        out += extra_head_dims([int(x) for x in args.extra_ds.split(",")], args.impl)
    if not args.no_table:
        rows, raw = speed_table(ns, ds, args.impl, cfgs)
        out += ["", f"speed, TFLOP/s, sigmoid_impl={args.impl}"] + rows
        with open(os.path.join(args.out, "probe.json"), "w") as fh:
            json.dump(raw, fh)
    print("\n".join(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
