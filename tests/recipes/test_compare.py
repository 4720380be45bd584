"""The comparison report: table cells (deltas against softmax, missing values, divergence) and its files."""

from __future__ import annotations

import json

from sigattn.recipes.compare import format_table, write_report
from sigattn.recipes.train import get_recipe
from tests.recipes import one_thread  # noqa: F401  (autouse fixture)


def test_lm_table_deltas_missing_values_and_divergence():
    summaries = [
        {"variant": "softmax", "last_step": 10, "train_loss": 2.0, "val_loss": 2.0, "attn_norm_init": 0.1},
        {"variant": "sigmoid", "last_step": 10, "train_loss": 2.1, "val_loss": 2.02, "tokens_per_s": 1234.4},
        {"variant": "sigmoid-b0", "last_step": 3, "train_loss": float("nan"), "diverged": True},
    ]
    lines = format_table(get_recipe("lm", "tiny"), summaries).splitlines()
    assert lines[0].startswith("| variant | steps | train loss | val loss | Δ val loss vs softmax |")
    assert "| sigmoid | 10 | 2.1000 | 2.0200 | +1.00% |" in lines[3] and "| 1234 |" in lines[3]
    assert lines[4].startswith("| sigmoid-b0 | 3 | — | — | — |") and lines[4].endswith("| yes |")


def test_vit_table_reports_accuracy_points():
    summaries = [{"variant": "softmax", "val_acc": 0.9, "val_loss": 0.3}, {"variant": "sigmoid", "val_acc": 0.895}]
    table = format_table(get_recipe("vit", "tiny"), summaries)
    assert "| val acc | Δ acc vs softmax (pt) |" in table and "| 89.50 | -0.50 |" in table


def test_write_report_without_runs_on_disk(tmp_path):
    summaries = [{"variant": "sigmoid", "last_step": 1, "val_loss": 5.0}]
    table = write_report(tmp_path, get_recipe("lm", "tiny"), ["sigmoid"], summaries, plot=False)
    assert (tmp_path / "results.md").read_text() == table + "\n"
    assert json.loads((tmp_path / "results.json").read_text()) == summaries
