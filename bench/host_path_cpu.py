"""CPU measurement of the dense attention host path through Triton's real launch code (compile and driver faked).

    python bench/host_path_cpu.py [--sm90] [--profile] [-n 300]     # NOT under TRITON_INTERPRET
    python bench/host_path_cpu.py --sm90 --api [-d 128]             # the public functions' rows only

Triton's `JITFunction.run` runs as on a GPU (binder, specialization key, cache lookup, launch metadata); only the
compile (a fake CompiledKernel per key), the driver (device 0, stream 0, an sm_90 target) and the C launcher (a
counter) are replaced. --sm90: the launchers take the branches they take on an H100 (TMA, sm_90 configs, the Gluon
backward at d=64/128, the Gluon forward at d=128), whose device checks are patched to accept CPU tensors. Tensors are
CPU tensors, so aten ops (allocations, fills, the dQ cast) run CPU work: one thread, small shapes. Per row: host µs
per call, Triton launches, aten ops that would launch a GPU kernel, allocations, and compiles after warm-up (must be
0: a miss of Triton's cache there would be a compile per call). --api: the public functions (sigmoid_attn_func,
scaled_dot_product_sigmoid_attention, SigmoidAttention's call of it) from the top, with their "auto" backend
resolved as for a CUDA device (`simulate_cuda_api`), so they take the Triton path for CPU tensors.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import Counter
from collections.abc import Callable

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: this measures Triton's compiled-kernel launch path")

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import jit as triton_jit
from triton.runtime.driver import driver


class _FakeDriver:
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


LAUNCHES: Counter = Counter()
COMPILES: Counter = Counter()


class _FakeCompiled:
    """What JITFunction.run and fast_launch use of a CompiledKernel; `run` counts launches."""

    function = 1
    packed_metadata = ()
    _run = True  # handles loaded

    def __init__(self, name: str) -> None:
        self.name = name

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args) -> None:
        LAUNCHES[self.name] += 1


def _fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    name = self.fn.__name__
    COMPILES[name] += 1
    kernel = _FakeCompiled(name)
    self.device_caches[device][0][key] = kernel
    return kernel


def install_fakes() -> None:
    driver.set_active(_FakeDriver())
    triton_jit.JITFunction._do_compile = _fake_compile


def simulate_sm90() -> None:
    """Make the launchers take their H100 branches for CPU tensors (module globals only; kernels unchanged)."""
    from sigattn.ops import backward, configs, forward, gluon_backward, gluon_forward

    forward.use_tma_default = lambda device: True
    backward.use_tma_default = lambda device: True
    forward.forward_config = lambda head_dim, dtype, device, causal: configs.sm90_forward_config(head_dim, dtype)
    backward.backward_configs = lambda head_dim, dtype, device: configs.sm90_backward_configs(head_dim, dtype)
    backward.use_fused_dq = lambda deterministic, device: False if deterministic else configs.sm90_fused_dq()
    gluon_types = (torch.bfloat16, torch.float16)
    backward._gluon_bwd_ready = lambda q: q.dtype in gluon_types and q.shape[-1] in (64, 128)
    forward._gluon_ready = lambda q: q.dtype in gluon_types and q.shape[-1] == 128
    gluon_forward.cuda_capability = lambda device: (9, 0)
    gluon_forward._num_sms = lambda device: 132
    original = gluon_forward.gluon_supports

    def supports(q, k, v):  # the real checks, with q's device type seen as cuda
        why = original(q, k, v)
        return None if why == "needs an sm_90 GPU" else why

    gluon_forward.gluon_supports = supports
    gluon_backward.gluon_supports = supports


def simulate_cuda_api() -> None:
    """The public functions' backend rule sees a CUDA device (CPU tensors would go to the reference): the bench wraps
    api._resolve_backend, which every tree of this repo calls by its module global on a backend decision."""
    from sigattn.ops import api

    cuda = torch.device("cuda", 0)
    resolve = api._resolve_backend

    def resolve_as_cuda(backend, device, triton_gap):
        return resolve(backend, cuda if device.type == "cpu" else device, triton_gap)

    api._resolve_backend = resolve_as_cuda


GPU_OPS = ("aten::zeros", "aten::fill_", "aten::zero_", "aten::full", "aten::copy_", "aten::mul", "aten::sum",
           "aten::clone", "aten::contiguous", "aten::add", "aten::to", "aten::_to_copy")
ALLOC_OPS = ("aten::empty", "aten::empty_strided", "aten::empty_like")


def op_counts(fn: Callable[[], object]) -> tuple[int, int, int, int, str]:
    """(Triton launches, aten ops that launch a GPU kernel, allocations, compiles) of one warm call, and the ops."""
    fn()
    LAUNCHES.clear()
    COMPILES.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = Counter()
    for ev in prof.events():  # top-level aten ops only (zeros' own zero_, mul's internal copy_ are not more kernels)
        parent = ev.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            ops[ev.name] += 1
    kernels = sum(ops[o] for o in GPU_OPS)
    allocs = sum(ops[o] for o in ALLOC_OPS)
    shown = " ".join(f"{o.removeprefix('aten::')}={ops[o]}" for o in GPU_OPS + ALLOC_OPS if ops[o])
    return sum(LAUNCHES.values()), kernels, allocs, sum(COMPILES.values()), shown


def per_call(fn: Callable[[], object], n: int, fast: bool | None) -> float:
    """Best of 7 timings of n calls (the machine is shared: the minimum is the repeatable number). fast: switch
    sigattn's fast launches on/off first (None: the tree has none)."""
    if fast is not None:
        from sigattn.ops import fast_launch

        fast_launch.set_enabled(fast)
    for _ in range(max(5, n // 10)):
        fn()
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sm90", action="store_true", help="take the H100 branches (TMA, sm_90 configs, Gluon)")
    ap.add_argument("--profile", action="store_true", help="cProfile each row (tottime, top 30)")
    ap.add_argument("-n", type=int, default=300, help="calls per timing")
    ap.add_argument("--api", action="store_true", help="rows of the public functions (see the module docstring)")
    ap.add_argument("-d", type=int, default=64, help="head dim (128 takes the Gluon forward with --sm90)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine made a 50k-element cast take ~12 ms
    install_fakes()
    if args.sm90:
        simulate_sm90()
    from sigattn.ops import backward, custom_ops, forward

    b, n, h, d = 1, 128, 6, args.d
    dt = torch.bfloat16 if args.sm90 else torch.float16
    q, k, v = (torch.randn(b, n, h, d, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(b, n, h, d, dtype=dt)
    bias = torch.full((h,), -6.2)
    scale = d**-0.5

    def fwd():
        with torch.no_grad():
            custom_ops.sigmoid_attn_dense(q, k, v, bias, scale, True, -1, 0, None, False, "fast")

    def bwd_direct():
        backward.dense_bwd(do, q.detach(), k.detach(), v.detach(), bias, scale, True, -1, 0, None, False, "fast",
                           False)

    def fwd_bwd():
        out = custom_ops.sigmoid_attn_dense(q, k, v, bias, scale, True, -1, 0, None, False, "fast")
        out.backward(do)

    def launch_only():
        forward._launch_fwd(q.detach(), k.detach(), v.detach(), bias, scale, True, -1, 0, None, "fast", None, None,
                            None)

    lens = [100, 156, 128, 128]  # varlen: 4 sequences, 512 tokens packed
    cu = torch.tensor([0, 100, 256, 384, 512], dtype=torch.int32)
    qv, kv, vv = (torch.randn(sum(lens), h, d, dtype=dt, requires_grad=True) for _ in range(3))
    dov = torch.randn(sum(lens), h, d, dtype=dt)

    def varlen_fwd_bwd():
        out = custom_ops.sigmoid_attn_varlen(qv, kv, vv, cu, cu, max(lens), max(lens), bias, scale, True, -1, 0, None,
                                             False, "fast")
        out.backward(dov)

    import sigattn
    from sigattn.nn import SigmoidAttention

    simulate_cuda_api()
    q0, k0, v0 = (t.detach() for t in (q, k, v))
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))

    def api_fwd():
        sigattn.sigmoid_attn_func(q0, k0, v0, causal=True)

    def api_fwd_nograd_ctx():  # bench/host_overhead.py's "dense fwd" row: explicit float bias, under no_grad
        with torch.no_grad():
            sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-6.2)

    def api_fwd_grad():
        sigattn.sigmoid_attn_func(q, k, v, causal=True)

    def api_fwd_bwd():
        sigattn.sigmoid_attn_func(q, k, v, causal=True).backward(do)

    def api_bwd_direct():  # bench/host_overhead.py's "dense bwd (direct)" row: the public backward, no autograd
        sigattn.sigmoid_attn_backward(do, q0, k0, v0, causal=True, bias=-6.2, need_dbias=False)

    def api_sdpa_fwd():
        sigattn.scaled_dot_product_sigmoid_attention(qt, kt, vt, is_causal=True)

    module = SigmoidAttention(h * d, h, causal=True, train_seqlen=512).to(dt)
    module.project = lambda x, positions=0: (q0, k0, v0)  # the attention call alone: no projections/RoPE
    module.o_proj = torch.nn.Identity()
    x = torch.randn(b, n, h * d, dtype=dt)

    def module_fwd():
        module(x)

    api_rows = [("api fwd", api_fwd), ("api fwd bias=-6.2 no_grad", api_fwd_nograd_ctx),
                ("api fwd requires_grad", api_fwd_grad), ("api fwd+bwd", api_fwd_bwd),
                ("api bwd direct", api_bwd_direct),
                ("api sdpa-style fwd", api_sdpa_fwd), ("module attn fwd", module_fwd)]

    rows = api_rows if args.api else [
        ("dense fwd", fwd), ("dense bwd (direct)", bwd_direct), ("dense fwd+bwd", fwd_bwd),
        ("portable fwd launcher", launch_only), ("varlen fwd+bwd", varlen_fwd_bwd)]
    try:
        from sigattn.ops import fast_launch  # noqa: F401
        modes: list[bool | None] = [False, True]
    except ImportError:
        modes = [None]
    print(f"host us per call, CPU, Triton run path with faked compile/driver{', sm_90 branches' if args.sm90 else ''}"
          f"; B={b} N={n} H={h} d={d} {dt} causal; {sys.modules['sigattn'].__file__}")
    heads = "".join(f"{'us ' + ('-' if m is None else 'fast ' + ('on' if m else 'off')):>12s}" for m in modes)
    print(f"  {'form':26s}{heads} {'triton':>7s} {'aten-k':>7s} {'allocs':>7s} {'compiles':>8s}  aten ops")
    for name, fn in rows:
        launches, kernels, allocs, compiles, shown = op_counts(fn)
        times = "".join(f"{per_call(fn, args.n, m):12.1f}" for m in modes)
        print(f"  {name:26s}{times} {launches:7d} {kernels:7d} {allocs:7d} {compiles:8d}  {shown}")
    if args.profile:
        for name, fn in rows:
            print(f"\n=== cProfile: {name}, 200 calls, by tottime ===")
            prof = cProfile.Profile()
            prof.runcall(lambda fn=fn: [fn() for _ in range(200)])
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
