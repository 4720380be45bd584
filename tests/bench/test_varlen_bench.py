"""bench/varlen_bench.py end to end on a tiny pack (kernels under the interpreter on CPU): table and JSON written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_varlen_bench_smoke(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "varlen_bench.py"), "--out", str(tmp_path), "--tokens", "48",
           "--hidden", "32", "--ds", "16", "--packs", "mixed:8-30", "--causal", "yes",
           "--providers", "varlen,dense,sdpa-flash,flash-attn-varlen", "--warmup-ms", "0", "--rep-ms", "0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["provider"], r["mode"]): r for r in data["rows"]}
    for mode in ("fwd", "bwd"):
        for p in ("varlen", "dense", "sdpa-flash"):
            assert rows[(p, mode)]["status"] == "ok", rows[(p, mode)]
            assert rows[(p, mode)]["tflops"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "varlen/dense" in table and "mixed:8-30" in table
