"""The `sigattn` CLI on CPU: info, check, bench and demo run and report."""

from __future__ import annotations

import pytest

from sigattn import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends" in out and "reference" in out


def test_check_quick_reference(capsys):
    assert cli.main(["check", "--quick", "--backends", "reference"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "causal" in out


def test_check_unknown_backend_fails_clearly():
    with pytest.raises(ValueError, match="backend must be one of"):
        cli.main(["check", "--quick", "--backends", "nope"])


def test_bench_quick_writes_outputs(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--providers", "sigattn-reference,sdpa-math", "--out", str(tmp_path)])
    assert rc == 0
    assert list(tmp_path.glob("*.csv")) and list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.png"))


def test_demo(capsys):
    assert cli.main(["demo", "--train-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "correctness" in out and "speed" in out and "PASS" in out and "val loss" in out
