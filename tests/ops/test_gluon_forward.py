"""Gluon (sm_90) forward kernel against the float64 reference and the portable Triton forward (H100 only)."""

from __future__ import annotations

import math

import pytest
import torch

from sigattn.ops.reference import sigmoid_attn

IS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not IS_SM90, reason="needs an sm_90 GPU")]

CASES = [
    # b, nq, nk, hq, hkv, d, causal
    (2, 1000, 1000, 4, 4, 128, False),
    (2, 1000, 1000, 4, 4, 64, True),
    (2, 300, 1000, 8, 2, 128, True),  # GQA 4, nq < nk
    (2, 1000, 300, 8, 2, 64, True),  # rows that see no key output 0
    (3, 17, 129, 2, 1, 128, False),
    (2, 1, 63, 2, 2, 64, False),
    (1, 4096, 4096, 16, 16, 128, True),  # more work items than SMs (persistent schedules loop)
]


@pytest.mark.parametrize("schedule", ["grid", "dynamic", "static"])
@pytest.mark.parametrize("impl", ["fast", "accurate"])
@pytest.mark.parametrize("case", CASES)
def test_gluon_forward(case, impl, schedule):
    from sigattn.ops.forward import sigmoid_attn_fwd
    from sigattn.ops.gluon_forward import gluon_dense_fwd

    b, nq, nk, hq, hkv, d, causal = case
    q = torch.randn(b, nq, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(b, nk, hkv, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(b, nk, hkv, d, dtype=torch.bfloat16, device="cuda")
    bias = -math.log(nk) + torch.randn(hq, device="cuda")
    out = torch.full_like(q, float("nan"))
    o = gluon_dense_fwd(q, k, v, bias, d**-0.5, causal, impl, schedule=schedule, out=out)
    ref = sigmoid_attn(q.double(), k.double(), v.double(), scale=d**-0.5, bias=bias.double(), causal=causal)
    portable = sigmoid_attn_fwd(q, k, v, bias, d**-0.5, causal, -1, -1, None, impl, use_tma=True)  # forced: portable
    assert not torch.isnan(o).any()
    err = ((o.double() - ref).norm() / ref.norm()).item()
    err_portable = ((portable.double() - ref).norm() / ref.norm()).item()
    assert err <= 1.25 * err_portable + 2e-4, (err, err_portable)
    assert torch.equal(o, gluon_dense_fwd(q, k, v, bias, d**-0.5, causal, impl, schedule=schedule))
