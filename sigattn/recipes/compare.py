"""Run several variants of one recipe and write their results table and curves (loss/accuracy, attention norms)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sigattn.recipes.train import LOG_NAME, Recipe, init_distributed, read_log, train
from sigattn.recipes.variants import Variant

TABLE_NAME, RESULTS_NAME, PLOT_NAME = "results.md", "results.json", "curves.png"


def run_comparison(
    recipe: Recipe,
    variants: list[Variant],
    out_dir: Path | str,
    *,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    data_dir: str | None = None,
    backend: str = "auto",
    amp: bool = True,
    progress: bool = True,
    plot: bool = True,
    compile: bool | str = False,
    context_parallel: int = 1,
) -> list[dict[str, Any]]:
    """Train each variant (same recipe, seed, data order and steps) into out_dir/<variant>/, then write the report.

    Writes results.md (the table), results.json (the summaries) and, with plot=True, curves.png into
    out_dir. Returns the summaries in variant order. Other arguments as train().
    """
    out = Path(out_dir)
    summaries = [
        train(recipe, v, out / v.name, device=device, seed=seed, resume=resume, data_dir=data_dir,
              backend=backend, amp=amp, progress=progress, compile=compile, context_parallel=context_parallel)
        for v in variants
    ]
    if init_distributed(device).main:
        write_report(out, recipe, [v.name for v in variants], summaries, plot=plot)
    return summaries


def write_report(
    out: Path, recipe: Recipe, names: list[str], summaries: list[dict[str, Any]], *, plot: bool = True
) -> str:
    """Write results.md, results.json and (plot=True) curves.png for runs out/<name>/; returns the table."""
    table = format_table(recipe, summaries)
    (out / TABLE_NAME).write_text(table + "\n")
    (out / RESULTS_NAME).write_text(json.dumps(summaries, indent=2) + "\n")
    if plot:
        plot_curves({n: read_log(out / n / LOG_NAME) for n in names}, out / PLOT_NAME, recipe)
    return table


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def format_asr_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of ASR summaries: CTC losses, CER/WER (%) on held-out voices, CER relative to softmax."""
    ref = next((s for s in summaries if s["variant"] == "softmax"), None)
    head = ["variant", "steps", "train CTC", "val CTC", "CER %", "WER %", "CER vs softmax (rel)", "best CER %",
            "attn norm init", "attn norm max", "utt/s", "peak mem GiB", "diverged"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cer, wer, best = (None if s.get(k) is None else 100 * s[k] for k in ("val_cer", "val_wer", "best_val_cer"))
        rel = None
        if ref is not None and ref.get("val_cer") and cer is not None:
            rel = 100 * (s["val_cer"] / ref["val_cer"] - 1)
        rows.append("| " + " | ".join([
            s["variant"], str(s.get("last_step", 0)), _fmt(s.get("train_loss"), ".3f"), _fmt(s.get("val_loss"), ".3f"),
            _fmt(cer, ".2f"), _fmt(wer, ".2f"), _fmt(rel, "+.1f") + ("%" if rel is not None else ""), _fmt(best, ".2f"),
            _fmt(s.get("attn_norm_init"), ".3g"), _fmt(s.get("attn_norm_max"), ".3g"),
            _fmt(s.get("utterances_per_s"), ".0f"), _fmt(s.get("peak_mem_gib"), ".2f"),
            "yes" if s.get("diverged") else "no"]) + " |")
    return "\n".join(rows)


def format_table(recipe: Recipe, summaries: list[dict[str, Any]]) -> str:
    """Markdown table of the summaries; the val-loss (LM) or accuracy (ViT) delta is against "softmax" if run."""
    if recipe.task == "asr":
        return format_asr_table(summaries)
    ref = next((s for s in summaries if s["variant"] == "softmax"), None)
    lm = recipe.task == "lm"
    speed = "tokens_per_s" if lm else "images_per_s"
    head = ["variant", "steps", "train loss", "val loss", "Δ val loss vs softmax" if lm else "val acc",
            "Δ acc vs softmax (pt)" if not lm else None, "attn norm init", "attn norm max", "row sum init",
            speed.replace("_per_s", "/s"), "peak mem GiB", "diverged"]
    head = [h for h in head if h is not None]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["variant"], str(s.get("last_step", 0)), _fmt(s.get("train_loss"), ".4f"),
                 _fmt(s.get("val_loss"), ".4f")]
        if lm:
            delta = None
            if ref is not None and ref.get("val_loss") and s.get("val_loss") is not None:
                delta = 100 * (s["val_loss"] / ref["val_loss"] - 1)
            cells.append(_fmt(delta, "+.2f") + ("%" if delta is not None else ""))
        else:
            cells.append(_fmt(None if s.get("val_acc") is None else 100 * s["val_acc"], ".2f"))
            delta = None
            if ref is not None and ref.get("val_acc") is not None and s.get("val_acc") is not None:
                delta = 100 * (s["val_acc"] - ref["val_acc"])
            cells.append(_fmt(delta, "+.2f"))
        cells += [_fmt(s.get("attn_norm_init"), ".3g"), _fmt(s.get("attn_norm_max"), ".3g"),
                  _fmt(s.get("row_sum_init"), ".3g"),
                  _fmt(s.get(speed), ".0f"), _fmt(s.get("peak_mem_gib"), ".2f"), "yes" if s.get("diverged") else "no"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None or not math.isfinite(acc) else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _layer_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def plot_curves(logs: dict[str, list[dict[str, Any]]], path: Path, recipe: Recipe) -> None:
    """Four panels: training loss (EMA), validation loss or accuracy, attention output norm and row sum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    axes = grid.ravel()
    vit, asr = recipe.task == "vit", recipe.task == "asr"
    for name, records in logs.items():
        train = [r for r in records if r["kind"] == "train"]
        val = [r for r in records if r["kind"] == "val"]
        diag = [r for r in records if r["kind"] == "attn_norm"]
        (line,) = axes[0].plot([r["step"] for r in train], _ema([r["loss"] for r in train]), label=name, lw=1.2)
        key = "val_acc" if vit else "val_cer" if asr else "val_loss"
        axes[1].plot([r["step"] for r in val], [r[key] * (100 if vit or asr else 1) for r in val], "o-", ms=3,
                     color=line.get_color(), label=name)
        steps = [max(r["step"], 0.5) for r in diag]  # step 0 (initialisation) drawn at 0.5 on the log axis
        for ax, stat in ((axes[2], "norms"), (axes[3], "row_sum")):
            ax.plot(steps, [_layer_mean(r.get(stat, [])) for r in diag], color=line.get_color(), label=name)
    unit = "" if vit else " (nats/byte)"
    axes[0].set(title="training loss (EMA 0.1)", xlabel="step", ylabel="CTC loss" if asr else "cross-entropy" + unit)
    axes[1].set(title="validation " + ("accuracy" if vit else "loss"), xlabel="step",
                ylabel="accuracy (%)" if vit else "cross-entropy" + unit)
    if asr:
        axes[1].set(title="character error rate, held-out voices (greedy CTC)", ylabel="CER (%)")
    # No attention diagnostics under context parallelism: log axes over no data would fail.
    scale = "log" if any(r["kind"] == "attn_norm" for records in logs.values() for r in records) else "linear"
    axes[2].set(title="attention module output norm (mean over layers)", xlabel="step (log)",
                ylabel="mean per-token L2 norm", xscale=scale, yscale=scale)
    axes[3].set(title="attention row sum, sampled rows (mean over layers; softmax = 1)", xlabel="step (log)",
                ylabel="sum over keys of the weights", xscale=scale, yscale=scale)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tokens = "utterances" if asr else f"context {recipe.context}" if not vit else "images"
    fig.suptitle(f"{recipe.task} / {recipe.size}: {recipe.steps} steps, batch {recipe.batch} ({tokens}), "
                 f"dim {recipe.shape.dim}, depth {recipe.shape.depth}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
