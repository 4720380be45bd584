"""Host (CPU) cost of one attention call, forward and forward+backward, where the GPU work is negligible.

    python bench/host_overhead.py [--profile]

At a tiny shape the GPU finishes long before the next launch, so wall time per call is the host path: argument
checks, custom-op dispatch, autograd, the Triton launcher. Compared with SDPA's host path at the same shape.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import sigattn


def per_call(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="cProfile the sigattn forward+backward")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    b, n, h, d = 1, 128, 6, 64
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))

    def ours_fwd():
        with torch.no_grad():
            sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-6.2)

    def ours_fb():
        sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-6.2).sum().backward()

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def sdpa_fb():
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).sum().backward()

    def empty_fb():  # the .sum().backward() part alone
        (q * 1).sum().backward()

    rows = [("sigattn fwd", ours_fwd), ("sdpa fwd", sdpa_fwd), ("sigattn fwd+bwd", ours_fb),
            ("sdpa fwd+bwd", sdpa_fb), ("mul+sum+bwd (floor)", empty_fb)]
    print(f"host cost per call, B={b} N={n} H={h} d={d} bf16 causal (us)")
    for name, fn in rows:
        print(f"  {name:22s} {per_call(fn):8.1f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [ours_fb() for _ in range(200)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
