"""CPU-only: compile the Gluon forward (or backward, --bwd) for sm_90 and report registers, spills, shared memory
and SASS op counts (and ptxas's C7512 "wgmma serialized" warning, which shows up as WARPGROUP.DEPBAR after each HGMMA).

PYTHONPATH=$PWD python3 bench/gluon_probe.py [--d 64 128] [--causal] [--no-pingpong] [--varlen] [--dump DIR]
PYTHONPATH=$PWD python3 bench/gluon_probe.py --bwd [--d 64 128] [--causal] [--accurate] [--dbias]
"""

from __future__ import annotations

import argparse
import os
import subprocess

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from sigattn.ops import gluon_backward as gb
from sigattn.ops import gluon_forward as gf


def compile_fwd(d: int, causal: bool, pingpong: bool, mode: int = 1, config: tuple | None = None,
                dynamic: bool = False, varlen: bool = False):
    block_m, consumers, block_n, stages, regs = config or gf.GLUON_CONFIGS[d]
    b, n, h = 2, 256, 2048 // d
    t = torch.empty(b, n, h, d, dtype=torch.bfloat16)
    fn = gf._sigmoid_attn_fwd_gluon_kernel
    if varlen:
        p = torch.empty(b * n + n, h, d, dtype=torch.bfloat16)[n:]  # n rows of headroom (_seq_desc)
        descs = dict(q_desc=gf._seq_desc(p, block_m, d, n), k_desc=gf._seq_desc(p, block_n, d, n),
                     v_desc=gf._seq_desc(p, block_n, d, n), o_desc=gf._seq_desc(p, block_m, d, n))
    else:
        descs = dict(q_desc=gf._rank3_desc(t, block_m), k_desc=gf._rank3_desc(t, block_n),
                     v_desc=gf._rank3_desc(t, block_n), o_desc=gf._rank3_desc(t, block_m))
    cu = torch.empty(b + 1, dtype=torch.int32)
    args = dict(descs, Bias=torch.empty(h, dtype=torch.float32), Counter=torch.empty(1, dtype=torch.int32),
                CuSeqQ=cu, CuSeqK=cu, nheads_q=h, group=1, seqlen_q=n, seqlen_k=n, n_items=64,
                stride_bb=h if varlen else 0, qk_mul=0.5, zf=0.5)
    consts = dict(IS_CAUSAL=causal, DYNAMIC=dynamic, SIGMOID=mode, PINGPONG=pingpong, NUM_CONSUMERS=consumers,
                  HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=regs, VARLEN=varlen)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            v = args[name]
            sig[name] = "fp32" if isinstance(v, float) else "i32" if isinstance(v, int) else mangle_type(v)
    nwarps = 4 * consumers + 4
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": (65536 // (32 * nwarps)) // 8 * 8})


def compile_bwd(d: int, causal: bool, mode: int = 1, dbias: bool = False, config: tuple | None = None,
                varlen: bool = False):
    block_m, stages, split_d, regs = config or gb.GLUON_BWD_CONFIGS[d]
    b, n, h = 2, 256, 2048 // d
    t = torch.empty(b, n, h, d, dtype=torch.bfloat16)
    acc = torch.empty(b, n, h, d, dtype=torch.float32)
    dq_m = block_m if split_d else block_m // 2
    fn = gb._sigmoid_attn_bwd_gluon_kernel
    kv_rows = gb.NUM_CONSUMERS * gb.BLOCK_N
    if varlen:
        p = torch.empty(b * n + n, h, d, dtype=torch.bfloat16)[n:]  # n rows of headroom (_seq_desc)
        pacc = torch.empty(b * n + n, h, d, dtype=torch.float32)[n:]
        descs = dict(q_desc=gf._seq_desc(p, block_m, d, n), do_desc=gf._seq_desc(p, block_m, d, n),
                     k_desc=gf._seq_desc(p, kv_rows, d, n), v_desc=gf._seq_desc(p, kv_rows, d, n),
                     dq_desc=gf._seq_desc(pacc, dq_m, gb.DQ_CHUNK, n))
    else:
        descs = dict(q_desc=gb._rank3_desc(t, block_m, d), do_desc=gb._rank3_desc(t, block_m, d),
                     k_desc=gb._rank3_desc(t, kv_rows, d), v_desc=gb._rank3_desc(t, kv_rows, d),
                     dq_desc=gb._rank3_desc(acc, dq_m, gb.DQ_CHUNK))
    cu = torch.empty(b + 1, dtype=torch.int32)
    args = dict(descs, DK=t, DV=t, DBiasPart=acc, Bias=acc, CuSeqQ=cu, CuSeqK=cu,
                stride_kb=0 if varlen else n * h * d, stride_kn=h * d, stride_bb=h if varlen else 0, nheads_kv=h,
                group=1, seqlen_q=n, seqlen_k=n, qk_mul=0.5, zf=0.5, scale=0.1)
    consts = dict(IS_CAUSAL=causal, SIGMOID=mode, NEED_DBIAS=dbias, SPLIT_D=split_d, HEAD_DIM=d, BLOCK_M=block_m,
                  BLOCK_N=gb.BLOCK_N, STAGES=stages, CONSUMER_REGS=regs, VARLEN=varlen)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            v = args[name]
            sig[name] = "fp32" if isinstance(v, float) else "i32" if isinstance(v, int) else mangle_type(v)
    nwarps = 4 * gb.NUM_CONSUMERS + 4
    # Pointers 16-byte aligned and strides multiples of 16, as real launches specialise (bench/NOTES.md caveat).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in ("DK", "DV", "stride_kb", "stride_kn")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": (65536 // (32 * nwarps)) // 8 * 8})


def report(k, dump: str | None, tag: str) -> str:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gluon_probe_{tag}.cubin")
    with open(path, "wb") as fh:
        fh.write(k.asm["cubin"])
    res = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
    regs = " ".join(w for line in res.splitlines() if "REG" in line for w in line.split() if w[:4] in ("REG:", "STAC"))
    sass = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{tag}.{ext}"), "w") as fh:
                fh.write(k.asm[ext])
        with open(os.path.join(dump, f"{tag}.sass"), "w") as fh:
            fh.write(sass)
    ops = {op: sass.count(op) for op in ("HGMMA", "MUFU.TANH", "MUFU.EX2", "STL", "LDL", "STS", "LDS", "BAR.SYNC",
                                         "SHFL", "SETMAXNREG", "UTMALDG", "UTMASTG", "UTMAREDG", "SYNCS",
                                         "WARPGROUP.DEPBAR")}
    return f"{tag}: smem={k.metadata.shared} {regs} {ops}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--no-pingpong", action="store_true")
    ap.add_argument("--accurate", action="store_true")
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--bwd", action="store_true", help="the backward kernel (gluon_backward.py)")
    ap.add_argument("--varlen", action="store_true", help="the VARLEN form (packed sequences, _seq_desc views)")
    ap.add_argument("--dbias", action="store_true", help="backward with NEED_DBIAS")
    ap.add_argument("--config", help="backward config block_m,stages,split_d(0/1),regs")
    ap.add_argument("--dump")
    a = ap.parse_args()
    if a.bwd:
        for d in a.d:
            cfg = None
            if a.config:
                bm, stg, sd, rg = (int(x) for x in a.config.split(","))
                cfg = (bm, stg, bool(sd), rg)
            tag = f"bwd_d{d}{'_causal' if a.causal else ''}{'_acc' if a.accurate else ''}{'_dbias' if a.dbias else ''}"
            tag += "_varlen" if a.varlen else ""
            k = compile_bwd(d, a.causal, 0 if a.accurate else 1, a.dbias, cfg, a.varlen)
            print(report(k, a.dump, tag))
        return
    for d in a.d:
        tag = (f"d{d}{'_causal' if a.causal else ''}{'' if not a.no_pingpong else '_nopp'}{'_dyn' if a.dynamic else ''}"
               f"{'_varlen' if a.varlen else ''}")
        k = compile_fwd(d, a.causal, not a.no_pingpong, 0 if a.accurate else 1, dynamic=a.dynamic, varlen=a.varlen)
        print(report(k, a.dump, tag))


if __name__ == "__main__":
    main()
