"""Benchmark harness: FLOP/byte models, timing, providers, shape sweeps, reports and the `sigattn bench` runner."""
