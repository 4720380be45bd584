"""Host (CPU) cost of one attention call per form (dense, varlen, decode) against SDPA, where GPU work is negligible.

    python bench/host_overhead.py [--profile]                 # on a GPU
    TRITON_INTERPRET=1 python bench/host_overhead.py --stub   # CPU: the Python path alone, Triton launches stubbed

At tiny shapes the GPU finishes long before the next launch, so wall time per call is the host path: argument
checks, dispatch, autograd, the Triton launcher. Compared with SDPA's host path at the same shapes (on CPU with
--stub the SDPA rows are CPU compute, not comparable). --profile: cProfile of each sigattn row, by cumulative time.
cProfile sees only the calling thread: on CUDA, autograd runs backward nodes on its device thread, so a fwd+bwd row's
profile misses the backward's Python; the "dense bwd (direct)" row runs the same launchers on the calling thread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sigattn
from sigattn.ops import custom_ops, decode  # noqa: F401  (custom_ops registers torch.ops.sigattn)


def stub_kernels() -> None:
    """Replace every Triton kernel of sigattn.ops by a no-op launch (measures the Python path on CPU)."""
    import triton

    from sigattn.ops import backward, forward

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kinds = tuple(c for c in (getattr(triton.runtime, "JITFunction", None),
                              getattr(triton.runtime.interpreter, "InterpretedFunction", None)) if c)
    for mod in (forward, backward, decode):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, kinds):
                setattr(mod, name, _Stub())


def per_call(fn: Callable[[], object], sync: Callable[[], None], n: int) -> float:
    for _ in range(max(5, n // 10)):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="cProfile each sigattn row (cumulative, top 25)")
    ap.add_argument("--stub", action="store_true", help="no-op Triton launches (CPU: needs TRITON_INTERPRET=1)")
    ap.add_argument("-n", type=int, default=300, help="calls per row")
    args = ap.parse_args()
    if args.stub:
        stub_kernels()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dt = torch.bfloat16
    b, n, h, d = 1, 128, 6, 64
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    # varlen: 4 sequences, 512 tokens packed
    lens = [100, 156, 128, 128]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    tot = sum(lens)
    qv, kv, vv = (torch.randn(tot, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    # decode: batch 1, 4k context, one new token
    ctx, cap = 4095, 4096
    kc, vc = (torch.randn(1, cap, h, d, device=dev, dtype=dt) for _ in range(2))
    qd, kn, vn = (torch.randn(1, 1, h, d, device=dev, dtype=dt) for _ in range(3))
    seqlens = torch.full((1,), ctx, dtype=torch.int32, device=dev)
    bias_t = torch.full((h,), -6.2, dtype=torch.float32, device=dev)
    backend = "triton" if args.stub else "auto"

    def ours_fwd():
        with torch.no_grad():
            sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-6.2, backend=backend)

    def ours_fb():
        sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-6.2, backend=backend).sum().backward()

    bias_h = torch.full((h,), -6.2, device=dev)

    def ours_op_fb():  # through the custom op, as torch.compile'd graphs and traced calls run it
        torch.ops.sigattn.dense_fwd(q, k, v, bias_h, d**-0.5, True, -1, 0, None, False, "fast").sum().backward()

    def ours_varlen_fb():
        sigattn.sigmoid_attn_varlen_func(qv, kv, vv, cu, cu, max(lens), max(lens), causal=True, bias=-6.2,
                                         backend=backend).sum().backward()

    def ours_decode_kernel():
        decode.sigmoid_attn_kvcache(qd, kc, vc, kn, vn, seqlens, None, bias_t, d**-0.5, True, -1, 0, None, "fast")

    def ours_decode_api():
        sigattn.sigmoid_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=seqlens, bias=-6.2, causal=True,
                                          backend=backend)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def sdpa_fb():
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).sum().backward()

    def sdpa_varlen_fb():  # same packed tokens, one padded batch (no varlen in SDPA's public API)
        x = qv.view(4, tot // 4, h, d).transpose(1, 2)
        F.scaled_dot_product_attention(x, x, x, is_causal=True).sum().backward()

    kct, vct = kc.transpose(1, 2), vc.transpose(1, 2)

    def sdpa_decode():  # append + attend over the first ctx + 1 keys
        kc[:, ctx:ctx + 1].copy_(kn)
        vc[:, ctx:ctx + 1].copy_(vn)
        F.scaled_dot_product_attention(qd.transpose(1, 2), kct[:, :, :ctx + 1], vct[:, :, :ctx + 1])

    def empty_fb():  # the .sum().backward() part alone
        (q * 1).sum().backward()

    class _Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    def pynode_fb():  # the floor plus one Python autograd node (on CUDA it runs on autograd's device thread)
        (_Identity.apply(q) * 1).sum().backward()

    do = torch.randn_like(q)

    def ours_bwd_direct():  # the backward launchers alone, on the calling thread, no autograd
        sigattn.sigmoid_attn_backward(do, q, k, v, causal=True, bias=-6.2, need_dbias=False, backend=backend)


    rows = [
        ("dense fwd", ours_fwd, sdpa_fwd),
        ("dense fwd+bwd", ours_fb, sdpa_fb),
        ("dense fwd+bwd (op)", ours_op_fb, sdpa_fb),
        ("varlen fwd+bwd", ours_varlen_fb, sdpa_varlen_fb),
        ("decode kernel-level", ours_decode_kernel, sdpa_decode),
        ("decode API", ours_decode_api, sdpa_decode),
    ]
    print(f"host us per call on {dev}{' (Triton launches stubbed)' if args.stub else ''}: dense B={b} N={n} H={h} "
          f"d={d} bf16 causal; varlen {lens}; decode B=1 ctx {ctx}+1")
    print(f"  {'form':22s} {'sigattn':>9s} {'sdpa':>9s} {'ratio':>7s}")
    for name, ours, sdpa in rows:
        a, s = per_call(ours, sync, args.n), per_call(sdpa, sync, args.n)
        print(f"  {name:22s} {a:9.1f} {s:9.1f} {a / s:7.2f}")
    print(f"  {'mul+sum+bwd (floor)':22s} {per_call(empty_fb, sync, args.n):9.1f}")
    # Where the backward's host time goes: fwd+bwd - fwd - floor against the launchers called directly, and what one
    # Python autograd node adds to the floor (autograd runs CUDA backward nodes on a device thread that needs the GIL).
    print(f"  {'floor + Python node':22s} {per_call(pynode_fb, sync, args.n):9.1f}")
    print(f"  {'dense bwd (direct)':22s} {per_call(ours_bwd_direct, sync, args.n):9.1f}")
    from sigattn.ops import fast_launch

    if not fast_launch.interpreting():  # the same rows with the other fast_launch setting (A/B in one run)
        before = fast_launch.enabled()
        fast_launch.set_enabled(not before)
        tag = ", no fast" if before else ", fast"
        for name, fn in (("dense fwd", ours_fwd), ("dense fwd+bwd", ours_fb), ("dense bwd (direct)", ours_bwd_direct)):
            print(f"  {name + tag:22s} {per_call(fn, sync, args.n):9.1f}")
        fast_launch.set_enabled(before)
    if args.profile:
        for name, ours, _ in rows + [("dense bwd (direct)", ours_bwd_direct, None)]:
            print(f"\n=== cProfile: {name}, 200 calls, by cumulative time ===")
            prof = cProfile.Profile()
            prof.runcall(lambda fn=ours: [fn() for _ in range(200)])
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
