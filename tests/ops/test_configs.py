"""sm_90 default configs fit the H100/H200's 227 KB of shared memory, compiled as their launches compile them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton's sm_90 toolchain (ptxas) is not installed")


def _compile(code: str, timeout: int) -> str:
    """Runs code in a process with the Triton compiler (this one interprets: TRITON_INTERPRET=1)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


# The 2-GPU ring test's single-process step (tests/distributed, gpu-ring-full-zigzag-fp32): fp32, d=128, MQA,
# non-causal, N=388, B=2. dK/dV asked for 262152 B, dQ for 327688 B with the old fp32 configs. Beside it, the
# case the failure was first blamed on (bf16 d=64 GQA, per-head bias gradient, causal) at B = 1 and 2.
_CASES = """
import torch
from sigattn.bench.launch_compile import SM90_SHARED_LIMIT, backward_launches, forward_launches
runs = (forward_launches(2, 388, 4, 1, 128, torch.float32) + backward_launches(2, 388, 4, 1, 128, torch.float32)
        + [l for b in (1, 2) for l in backward_launches(b, 388, 8, 2, 64, torch.bfloat16, True, True)])
for launch in runs:
    print(launch.describe())
assert all(launch.shared <= SM90_SHARED_LIMIT for launch in runs)
"""


def test_ring_fp32_and_gqa_backward_fit_sm90() -> None:
    out = _compile(_CASES, timeout=600)
    assert "dkdv" in out and "dq_kernel" in out


@pytest.mark.skipif(os.environ.get("SIGATTN_SMEM_SWEEP") != "1",
                    reason="~15 min of sm_90 compiles on 2 CPU cores: set SIGATTN_SMEM_SWEEP=1")
def test_every_default_config_fits_sm90() -> None:
    """d ∈ {32..256} x causal x GQA x need_dbias x B ∈ {1, 2} x {bf16, fp32}: forward, dK/dV and dQ."""
    out = _compile("from sigattn.bench.launch_compile import sweep\nbad = sweep()\nprint('\\n'.join(bad))\n"
                   "assert not bad", timeout=3600)
    assert not out.strip()

