"""Within-run speedups and tables from a fabricated result set."""

import math
from typing import Any

import pytest

from sigattn.bench.report import add_speedups, geomean_speedups, pivot, render_markdown, speedup_field


def _row(provider: str, ms: float | None, seqlen: int = 1024, status: str = "ok", **kw: Any) -> dict[str, Any]:
    row = {
        "provider": provider,
        "kind": "softmax" if provider.startswith("sdpa") else "sigmoid",
        "mode": "fwd",
        "dtype": "bf16",
        "batch": 16,
        "nheads": 16,
        "seqlen_q": seqlen,
        "seqlen_k": seqlen,
        "headdim": 128,
        "causal": False,
        "status": status,
        "ms": ms,
        "tflops": None if ms is None else 1.0 / ms,
        "gbps": None,
        "peak_mem_mib": None,
        "reason": "" if status == "ok" else "why",
    }
    row.update(kw)
    return row


def fabricated() -> list[dict[str, Any]]:
    return [
        _row("sigattn-triton", 2.0),
        _row("sdpa-cudnn", 3.0),
        _row("sdpa-flash", 4.0),
        _row("sigattn-triton", 5.0, seqlen=2048),
        _row("sdpa-cudnn", 10.0, seqlen=2048),
        _row("sdpa-flash", None, seqlen=2048, status="error"),
        # Same provider, other mode: must not serve as the fwd baseline.
        _row("sdpa-cudnn", 1.0, mode="bwd"),
    ]


def test_speedups_are_same_shape_ratios() -> None:
    rows = add_speedups(fabricated(), ["sdpa-cudnn", "sdpa-flash"])
    cud, fla = speedup_field("sdpa-cudnn"), speedup_field("sdpa-flash")
    assert rows[0][cud] == pytest.approx(1.5) and rows[0][fla] == pytest.approx(2.0)
    assert rows[1][cud] == pytest.approx(1.0)
    assert rows[3][cud] == pytest.approx(2.0)
    assert rows[3][fla] is None  # baseline failed at that shape
    assert rows[5][cud] is None  # the row itself failed
    assert rows[6][cud] == pytest.approx(1.0) and rows[6][fla] is None


def test_geomean_and_pivot() -> None:
    rows = add_speedups(fabricated(), ["sdpa-cudnn", "sdpa-flash"])
    geo = {(p, m, b): (s, n) for p, m, b, s, n in geomean_speedups(rows, ["sdpa-cudnn"])}
    s, n = geo[("sigattn-triton", "fwd", "sdpa-cudnn")]
    assert n == 2 and s == pytest.approx(math.sqrt(1.5 * 2.0))
    header, body = pivot(rows, ["sdpa-cudnn", "sdpa-flash"])
    assert header[-2:] == ["vs sdpa-cudnn", "vs sdpa-flash"]
    line_2k = next(r for r in body if r[0] == "fwd" and r[3] == "2048")
    assert line_2k[header.index("sdpa-flash")] == "err"
    assert line_2k[-2:] == ["2.00x", ""]
    assert render_markdown(header, body).count("\n") == len(body) + 1
