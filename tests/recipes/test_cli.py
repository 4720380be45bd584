"""`sigattn train lm|vit` smoke runs (a few steps; JSONL, PNG and table written) and the demo's quick_train."""

from __future__ import annotations

import argparse
import json

import pytest

from sigattn.recipes import cli
from tests.recipes import one_thread  # noqa: F401  (autouse fixture)
from tests.recipes.test_data import fake_fashion_mnist


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sigattn train")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def _check_outputs(out, variants: list[str]) -> list[dict]:
    table = (out / "results.md").read_text()
    assert all(f"| {v} |" in table for v in variants)
    assert (out / "curves.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results] == variants
    for v in variants:
        kinds = {json.loads(line)["kind"] for line in (out / v / "log.jsonl").read_text().splitlines()}
        assert kinds == {"config", "train", "val", "attn_norm", "summary"}
    return results


def test_train_lm_smoke(tmp_path, capsys):
    args = _parse(["lm", "--variants", "softmax", "sigmoid", "--steps", "4", "--batch-size", "8",
                   "--out", str(tmp_path), "--no-progress"])
    assert cli.main(args) == 0
    results = _check_outputs(tmp_path, ["softmax", "sigmoid"])
    assert all(r["last_step"] == 4 and r["val_loss"] < 6.0 for r in results)
    assert "Δ val loss vs softmax" in capsys.readouterr().out


def test_report_only_combines_separate_runs(tmp_path, capsys):
    """Variants trained by separate processes (bench/gpu_recipes.sh): --report-only writes one table of all."""
    for v in ("softmax", "sigmoid"):
        assert cli.main(_parse(["lm", "--variants", v, "--steps", "2", "--batch-size", "8", "--out", str(tmp_path),
                                "--no-progress"])) == 0
    (tmp_path / "results.md").unlink()
    capsys.readouterr()
    assert cli.main(_parse(["lm", "--variants", "all", "--steps", "2", "--out", str(tmp_path), "--report-only"])) == 0
    results = _check_outputs(tmp_path, ["softmax", "sigmoid"])
    assert [r["last_step"] for r in results] == [2, 2]
    assert "| sigmoid |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="report-only"):
        cli.main(_parse(["lm", "--variants", "sigmoid-b0", "--out", str(tmp_path), "--report-only"]))


def test_train_vit_smoke(tmp_path, capsys):
    data_dir = fake_fashion_mnist(tmp_path / "fashion")
    args = _parse(["vit", "--variants", "sigmoid", "sigmoid-alibi", "--steps", "3", "--batch-size", "16",
                   "--out", str(tmp_path / "out"), "--data-dir", str(data_dir), "--no-progress"])
    assert cli.main(args) == 0
    results = _check_outputs(tmp_path / "out", ["sigmoid", "sigmoid-alibi"])
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in results)
    assert "val acc" in capsys.readouterr().out


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        cli.main(_parse(["lm", "--variants", "sigmoid-b1", "--out", str(tmp_path)]))


def test_quick_train_prints_both_losses(capsys):
    summaries = cli.quick_train("cpu", steps=3)
    out = capsys.readouterr().out
    assert [s["variant"] for s in summaries] == ["softmax", "sigmoid"]
    assert "softmax: train loss" in out and "sigmoid: train loss" in out and "vs softmax" in out
