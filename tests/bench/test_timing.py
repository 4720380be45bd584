"""CPU timing: a median of several perf_counter runs; peak memory is not measured on CPU."""

import time

from sigattn.bench.timing import measure, time_cpu


def test_time_cpu_is_a_median_of_repeats() -> None:
    calls = []

    def fn() -> None:
        calls.append(None)
        time.sleep(0.002)

    ms = time_cpu(fn, warmup_ms=0.0, rep_ms=10.0)
    assert 1.5 < ms < 50.0
    assert len(calls) >= 1 + 3  # the estimate call, then at least 3 timed repeats


def test_measure_cpu_has_no_peak_memory() -> None:
    t = measure(lambda: sum(range(100)), "cpu", warmup_ms=0.0, rep_ms=1.0)
    assert t.ms > 0 and t.peak_bytes is None
