"""bench/cp_bench.py runs end to end on 2 gloo processes (the lead's GPU command must not die on a script bug)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_cp_bench_smoke_on_gloo(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "bench/cp_bench.py", "--seqlens", "64,128", "--heads", "2", "--kv-heads", "1", "--headdim", "16",
           "--dtype", "float32", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["seqlen"], r["variant"]) for r in rows] == [(n, v) for n in (64, 128)
                                                           for v in ("one", "ring", "all_gather")]
    assert all("error" not in r and r["fwd+bwd_ms"] > 0 for r in rows)
    ring = rows[1]["ring"]
    assert ring["fwd"]["comm_alone_ms"] > 0 and 0 <= ring["bwd"]["overlap"] <= 1
    assert {"kv", "dkdv_first", "dkdv_fp32"} == set(ring["hop_ms"])
    assert "bwd1.compute" in ring["steps_together_ms"] and "bwd1.compute" in ring["steps_compute_alone_ms"]
    assert "Ring overlap" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "cp_bench.png").stat().st_size > 10_000
