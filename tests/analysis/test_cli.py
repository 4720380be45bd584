"""`sigattn diagnose`: option parsing, the per-layer run at init, the PNGs and the demo hook."""

from __future__ import annotations

import argparse
import functools

import pytest

from sigattn.analysis import cli, doubling, regularity

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--layers", "2", "--dim", "32", "--heads", "2", "--seqlen", "64", "--batch", "1"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_parse_options() -> None:
    args = _parse(["--bias=-logn", "--layerscale", "none", "--qk-norm", "rms", "--positional", "none"])
    assert args.bias == "-logn" and args.layerscale is None and args.qk_norm == "rms" and args.positional is None
    assert _parse([]).bias == "both" and _parse(["--bias", "0"]).bias == 0.0
    with pytest.raises(SystemExit):
        _parse(["--bias", "minus-log"])


def test_row_sums_at_init() -> None:
    """The issue's headline: at init, row sums ~ n/2 with b = 0 and ~ 1 with b = -log n."""
    n = 128
    runs = cli.diagnose(layers=2, dim=32, heads=2, seqlen=n, batch=1, sample_rows=16, norm_placement="hybrid")
    assert list(runs) == ["sigmoid b=-log n", "sigmoid b=0"]
    for row in runs["sigmoid b=0"]:
        assert row["row_sum_mean"] == pytest.approx(n / 2, rel=0.05)
    for row in runs["sigmoid b=-log n"]:
        assert row["row_sum_mean"] == pytest.approx(1.0, abs=0.3)
        assert row["grad_out_norm"] > 0 and row["param_grad_norm"] > 0
    # b = 0 sums ~n/2 values of ~0.5-weight: the attention output is ~n/2 times larger than at b = -log n.
    ratio = runs["sigmoid b=0"][0]["out_norm"] / runs["sigmoid b=-log n"][0]["out_norm"]
    assert ratio > n / 8
    (softmax,) = cli.diagnose(layers=1, dim=32, heads=2, seqlen=n, batch=1, attention="softmax").values()
    assert softmax[0]["row_sum_mean"] == pytest.approx(1.0, rel=1e-5) and softmax[0]["bias"] is None


def test_main_writes_png(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "diag.png"
    assert cli.main(_parse([*SMALL, "--causal", "--positional", "rope", "--plot", str(path)])) == 0
    assert path.read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "row_sum" in out and "sigmoid b=0" in out and "1.attn" in out


def test_main_theory(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(regularity, "regularity_table", functools.partial(
        regularity.regularity_table, radii=(1.0, 4.0), seqlen=4, dim=4, head_dim=4, samples=1))
    monkeypatch.setattr(doubling, "doubling_table", functools.partial(doubling.doubling_table, seqlens=(8, 16)))
    path = tmp_path / "d.png"
    assert cli.main(_parse([*SMALL, "--bias", "0", "--theory", "--plot", str(path)])) == 0
    for name in ("d.png", "d-regularity.png", "d-doubling.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    out = capsys.readouterr().out
    assert "regularity" in out and "sequence doubling" in out and "sigmoid b=-log n" in out


def test_quick_diagnose(capsys: pytest.CaptureFixture[str]) -> None:
    cli.quick_diagnose("cpu")
    out = capsys.readouterr().out
    assert "sigmoid b=-log n" in out and "sigmoid b=0" in out and "sequence doubling" in out
