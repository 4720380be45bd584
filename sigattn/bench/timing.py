"""Median wall time and peak memory of a zero-argument callable, on CUDA (do_bench) or CPU (perf_counter)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Defaults in milliseconds of warm-up / measured time, as triton.testing.do_bench takes them.
GPU_WARMUP_MS = 25.0
GPU_REP_MS = 100.0
CPU_WARMUP_MS = 2.0
CPU_REP_MS = 10.0
CPU_MIN_REPEATS = 3
CPU_MAX_REPEATS = 200


@dataclass(frozen=True)
class Timing:
    """A median time in ms and the peak extra memory of one call in bytes (None where not measured)."""

    ms: float
    peak_bytes: int | None


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def time_gpu(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    """Median ms over `rep_ms` of calls after `warmup_ms` of warm-up; L2 flushed before every call."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_cpu(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    """Median ms with time.perf_counter, same budget semantics as do_bench (ms of warm-up / measurement)."""
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, int(warmup_ms / estimate_ms) - 1)):
        fn()
    n = min(CPU_MAX_REPEATS, max(CPU_MIN_REPEATS, int(rep_ms / estimate_ms)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_gpu(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Bytes allocated by one call above what was live before it (its outputs and workspace)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - baseline)


def measure(
    fn: Callable[[], Any],
    device: torch.device | str,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
) -> Timing:
    """Median time of `fn` on `device`; peak memory on CUDA, None on CPU (no allocator statistics there).

    None for warmup_ms/rep_ms means the device's default (GPU 25/100 ms, CPU 2/10 ms).
    """
    if _is_cuda(device):
        warmup = GPU_WARMUP_MS if warmup_ms is None else warmup_ms
        rep = GPU_REP_MS if rep_ms is None else rep_ms
        ms = time_gpu(fn, warmup, rep)
        return Timing(ms=ms, peak_bytes=peak_memory_gpu(fn, device))
    warmup = CPU_WARMUP_MS if warmup_ms is None else warmup_ms
    rep = CPU_REP_MS if rep_ms is None else rep_ms
    return Timing(ms=time_cpu(fn, warmup, rep), peak_bytes=None)
