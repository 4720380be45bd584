"""Compile the kernels a forward/backward call launches on sm_90, on a machine without a GPU, as the launch would.

The launchers run unchanged on meta tensors; each `launch_fitting` call is caught and its kernel compiled for
GPUTarget("cuda", 90, 32) with the specialization Triton's JIT applies at launch time (integer arguments equal to 1
become constexprs, integers and pointers divisible by 16 get tt.divisibility = 16, descriptors keep their block
shape), so `shared` is what `OutOfResources` would compare with the GPU's 232448 bytes. Needs the Triton compiler,
not the interpreter: run it in a process without TRITON_INTERPRET=1.

    python -m sigattn.bench.launch_compile --shape 2,388,4,1,128 --dtype float32   # one call, both directions
    python -m sigattn.bench.launch_compile --sweep                                 # every default config
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
from dataclasses import dataclass, field

import torch

SM90_SHARED_LIMIT = 232448  # bytes per block on H100/H200 (227 KiB), as Triton reads it from the driver
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Launch:
    """One kernel launch of a call, compiled for sm_90."""

    kernel: str
    num_stages: int
    num_warps: int
    constexprs: dict
    compiled: object = field(repr=False)

    @property
    def shared(self) -> int:
        return self.compiled.metadata.shared

    @property
    def fits(self) -> bool:
        return self.shared <= SM90_SHARED_LIMIT

    def describe(self) -> str:
        c = self.constexprs
        tile = f"BM={c.get('BLOCK_M')} BN={c.get('BLOCK_N')} warps={self.num_warps} stages={self.num_stages}"
        form = " ".join(f"{k}={c[k]}" for k in ("USE_TMA", "FUSED_DQ", "NEED_DBIAS", "VARLEN", "WIDE_OFFS") if k in c)
        return f"{self.kernel} {tile} {form}: smem={self.shared}{'' if self.fits else ' (> 232448)'}"


def compile_like_launch(kernel, args: tuple, kwargs: dict):
    """triton.compile of `kernel[grid](*args, **kwargs)` for sm_90, specialized as JITFunction.run would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): compile in a process without it")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


@contextlib.contextmanager
def recording(only: str | None = None, constexpr_overrides: dict | None = None):
    """Within: the forward/backward launchers compile (not launch) each kernel for sm_90 and append a Launch to the
    yielded list; the "fast" sigmoid takes its GPU form. only: compile just kernels whose name contains it."""
    import sigattn.ops.backward as bwd
    import sigattn.ops.forward as fwd

    launches: list[Launch] = []

    def record(kernel, grid, *args, num_stages: int, **kwargs) -> None:
        name = kernel.fn.__name__
        if only is not None and only not in name:
            return
        kwargs = dict(kwargs, **{k: v for k, v in (constexpr_overrides or {}).items() if k in kwargs})
        compiled = compile_like_launch(kernel, args, dict(kwargs, num_stages=num_stages))
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        launches.append(Launch(name, num_stages, kwargs.get("num_warps", 4), consts, compiled))

    def gpu_mode(sigmoid_impl: str, device: torch.device) -> int:
        return fwd.SIGMOID_ACCURATE if sigmoid_impl == "accurate" else fwd.SIGMOID_FAST_ASM

    saved = [(m, n, getattr(m, n)) for m in (fwd, bwd) for n in ("launch_fitting", "sigmoid_mode")]
    try:
        for m in (fwd, bwd):
            m.launch_fitting, m.sigmoid_mode = record, gpu_mode
        yield launches
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def _tensors(batch: int, seqlen: int, nheads_q: int, nheads_kv: int, head_dim: int, dtype: torch.dtype):
    q, do = (torch.empty(batch, seqlen, nheads_q, head_dim, dtype=dtype, device="meta") for _ in range(2))
    k, v = (torch.empty(batch, seqlen, nheads_kv, head_dim, dtype=dtype, device="meta") for _ in range(2))
    return q, k, v, do


def backward_launches(batch: int, seqlen: int, nheads_q: int, nheads_kv: int, head_dim: int,
                      dtype: torch.dtype = torch.bfloat16, causal: bool = False, need_dbias: bool = False,
                      deterministic: bool = False, configs=None, use_tma: bool = True, fused_dq: bool | None = None,
                      varlen: bool = False, only: str | None = None, constexpr_overrides: dict | None = None,
                      sigmoid_impl: str = "fast") -> list[Launch]:
    """The sm_90 compiles of one backward call (default configs: configs.sm90_backward_configs). varlen: the
    packed form with `batch` sequences of `seqlen` tokens."""
    from sigattn.ops import configs as cfgs
    from sigattn.ops.backward import sigmoid_attn_bwd, sigmoid_attn_varlen_bwd
    from sigattn.ops.forward import Varlen

    q, k, v, do = _tensors(batch, seqlen, nheads_q, nheads_kv, head_dim, dtype)
    bias = torch.full((nheads_q,), -math.log(seqlen), device="meta")
    configs = configs or cfgs.sm90_backward_configs(head_dim, dtype)
    fused = (cfgs.sm90_fused_dq() if fused_dq is None else fused_dq) and not deterministic
    args = (bias, head_dim**-0.5, causal, -1, -1, None, deterministic, sigmoid_impl)
    kw = dict(configs=configs, use_tma=use_tma, need_dbias=need_dbias, fused_dq=fused)
    with recording(only, constexpr_overrides) as launches:
        if varlen:
            cu = torch.empty(batch + 1, dtype=torch.int32, device="meta")
            vl = Varlen(cu, cu, seqlen, seqlen)
            flat = [t.reshape(batch * seqlen, *t.shape[2:]) for t in (do, q, k, v)]
            sigmoid_attn_varlen_bwd(*flat, vl, *args, **kw)
        else:
            sigmoid_attn_bwd(do, q, k, v, *args, **kw)
    return launches


def forward_launches(batch: int, seqlen: int, nheads_q: int, nheads_kv: int, head_dim: int,
                     dtype: torch.dtype = torch.bfloat16, causal: bool = False, config=None, use_tma: bool = True,
                     varlen: bool = False, constexpr_overrides: dict | None = None,
                     sigmoid_impl: str = "fast") -> list[Launch]:
    """The sm_90 compile of one portable-kernel forward call (default config: configs.sm90_forward_config)."""
    from sigattn.ops import configs as cfgs
    from sigattn.ops.forward import Varlen, sigmoid_attn_fwd, sigmoid_attn_varlen_fwd

    q, k, v, _ = _tensors(batch, seqlen, nheads_q, nheads_kv, head_dim, dtype)
    bias = torch.full((nheads_q,), -math.log(seqlen), device="meta")
    config = config or cfgs.sm90_forward_config(head_dim, dtype)
    args = (bias, head_dim**-0.5, causal, -1, -1, None, sigmoid_impl, config, use_tma)
    with recording(None, constexpr_overrides) as launches:
        if varlen:
            cu = torch.empty(batch + 1, dtype=torch.int32, device="meta")
            flat = [t.reshape(batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
            sigmoid_attn_varlen_fwd(*flat, Varlen(cu, cu, seqlen, seqlen), *args)
        else:
            sigmoid_attn_fwd(q, k, v, *args)
    return launches


SWEEP_DIMS = (32, 64, 96, 128, 192, 256)


def sweep(dtypes=("bfloat16", "float32"), dims=SWEEP_DIMS, verbose: bool = False) -> list[str]:
    """Every default sm_90 config (forward, dK/dV, dQ) under d x causal x GQA x need_dbias x B ∈ {1, 2} x dtype,
    N = 388 (no length divisible by 16); returns the launches that do not fit."""
    bad = []
    for dt, d, causal, (hq, hkv), dbias, b in itertools.product(dtypes, dims, (False, True), ((4, 4), (8, 2), (4, 1)),
                                                                   (False, True), (1, 2)):
        dtype = DTYPES[dt]
        runs = backward_launches(b, 388, hq, hkv, d, dtype, causal, dbias)
        if not dbias:  # the forward has no dbias form
            runs += forward_launches(b, 388, hq, hkv, d, dtype, causal)
        for launch in runs:
            line = f"{dt} d={d} causal={causal} hq={hq} hkv={hkv} dbias={dbias} B={b}: {launch.describe()}"
            if verbose:
                print(line, flush=True)
            if not launch.fits:
                bad.append(line)
    return bad


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("launch_compile needs the Triton compiler: unset TRITON_INTERPRET")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2,388,8,2,64", help="B,N,HQ,HKV,D")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dbias", action="store_true", help="the per-head bias gradient form")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="every default config; exit 1 if one overflows")
    args = ap.parse_args()
    if args.sweep:
        bad = sweep(verbose=True)
        print("\n".join(["", f"{len(bad)} launches over {SM90_SHARED_LIMIT} B"] + bad))
        sys.exit(1 if bad else 0)
    b, n, hq, hkv, d = (int(x) for x in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    for launch in (forward_launches(b, n, hq, hkv, d, dtype, args.causal)
                   + backward_launches(b, n, hq, hkv, d, dtype, args.causal, args.dbias, args.deterministic)):
        print(launch.describe())


if __name__ == "__main__":
    main()
