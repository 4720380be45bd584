"""Benchmark reporting: environment header, within-run speedups, terminal/markdown tables, CSV, JSON and a PNG plot."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

ROW_FIELDS: tuple[str, ...] = (
    "provider",
    "kind",
    "mode",
    "dtype",
    "batch",
    "nheads",
    "seqlen_q",
    "seqlen_k",
    "headdim",
    "causal",
    "status",
    "ms",
    "tflops",
    "gbps",
    "peak_mem_mib",
    "reason",
)
# Rows measure the same problem when these agree; ratios are taken only between such rows.
SHAPE_FIELDS: tuple[str, ...] = ("mode", "dtype", "batch", "nheads", "seqlen_q", "seqlen_k", "headdim", "causal")
DEFAULT_BASELINES: tuple[str, ...] = ("sdpa-cudnn", "sdpa-flash")
PRIMARY_CANDIDATES: tuple[str, ...] = ("sigattn-triton", "sigattn-reference")


def speedup_field(baseline: str) -> str:
    """Column name of the speedup over `baseline`: baseline time / row time (> 1 means faster)."""
    return f"speedup_vs_{baseline}"


def _shape_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(f) for f in SHAPE_FIELDS)


def add_speedups(rows: Sequence[dict[str, Any]], baselines: Sequence[str]) -> list[dict[str, Any]]:
    """Copies of rows with speedup_vs_<baseline> = baseline ms / row ms at the same shape of this run.

    None where the row or the baseline at that shape did not run (status != 'ok').
    """
    best: dict[tuple[tuple[Any, ...], str], float] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("provider") in baselines and r.get("ms"):
            best[(_shape_key(r), r["provider"])] = float(r["ms"])
    out = []
    for r in rows:
        new = dict(r)
        for b in baselines:
            base_ms = best.get((_shape_key(r), b))
            ok = r.get("status") == "ok" and r.get("ms") and base_ms is not None
            new[speedup_field(b)] = base_ms / float(r["ms"]) if ok else None
        out.append(new)
    return out


def geomean_speedups(
    rows: Sequence[dict[str, Any]], baselines: Sequence[str]
) -> list[tuple[str, str, str, float, int]]:
    """(provider, mode, baseline, geometric-mean speedup, number of shapes) over rows that have the ratio."""
    acc: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        for b in baselines:
            s = r.get(speedup_field(b))
            if s and r["provider"] != b:
                acc.setdefault((r["provider"], r["mode"], b), []).append(math.log(s))
    return [(p, m, b, math.exp(sum(v) / len(v)), len(v)) for (p, m, b), v in acc.items()]


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """GPU name, driver, torch/triton/CUDA/cuDNN versions, peers' versions, git commit and date."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flash_attn": _version("flash-attn"),
        "triton_sigmoid": _version("triton-sigmoid"),
        "git": _run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"]),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        smi = _run(["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else None
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def env_header(env: dict[str, Any]) -> str:
    """One line naming the hardware and software a table or plot was measured with."""
    hw = f"{env.get('gpu')} (driver {env.get('driver')})" if env.get("gpu") else f"CPU {env.get('cpu')}"
    parts = [hw, f"torch {env.get('torch')}", f"triton {env.get('triton')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    parts.append(str(env.get("date")))
    return " | ".join(parts)


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return ""
    if row.get("status") != "ok":
        return {"unavailable": "n/a", "skipped": "skip"}.get(str(row.get("status")), "err")
    value = row.get(metric)
    return "" if value is None else f"{value:.3g}"


def _primary(rows: Sequence[dict[str, Any]]) -> str | None:
    ran = {r["provider"] for r in rows if r.get("status") == "ok"}
    return next((p for p in PRIMARY_CANDIDATES if p in ran), None)


def pivot(
    rows: Sequence[dict[str, Any]], baselines: Sequence[str], metric: str = "tflops", primary: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and body of the short table: one line per shape, one column per provider (metric),
    then 'vs <baseline>' columns: the primary provider's speedup over each baseline (default primary:
    sigattn-triton, else sigattn-reference, whichever ran).

    Cells: the value, 'n/a' (unavailable), 'skip' (over --max-materialized-seqlen), 'err' (failed).
    """
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    if primary is None:
        primary = _primary(rows)
    providers_run = {r["provider"] for r in rows}
    ratio_cols = [b for b in baselines if primary is not None and b != primary and b in providers_run]
    by_shape: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_shape.setdefault(_shape_key(r), {})[r["provider"]] = r
    header = ["mode", "causal", "d", "N", "B", "H", *providers, *[f"vs {b}" for b in ratio_cols]]
    body = []
    for key, cells in by_shape.items():
        shape = dict(zip(SHAPE_FIELDS, key))
        n = (
            str(shape["seqlen_q"])
            if shape["seqlen_q"] == shape["seqlen_k"]
            else f"{shape['seqlen_q']}x{shape['seqlen_k']}"
        )
        line = [
            str(shape["mode"]),
            "yes" if shape["causal"] else "no",
            str(shape["headdim"]),
            n,
            str(shape["batch"]),
            str(shape["nheads"]),
        ]
        line += [_cell(cells.get(p), metric) for p in providers]
        for b in ratio_cols:
            s = (cells.get(primary) or {}).get(speedup_field(b))
            line.append("" if s is None else f"{s:.2f}x")
        body.append(line)
    return header, body


def render_plain(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Fixed-width text table, right-aligned numbers; readable in a log file."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def render_markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """GitHub-flavoured markdown table (for BENCHMARKS.md)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def problems(rows: Iterable[dict[str, Any]]) -> list[str]:
    """One line per distinct (provider, status, reason) of the rows that did not run."""
    seen = dict.fromkeys((r["provider"], r["status"], r.get("reason") or "") for r in rows if r.get("status") != "ok")
    return [f"{p}: {s}: {why}" for p, s, why in seen]


def summary_text(
    rows: Sequence[dict[str, Any]], env: dict[str, Any] | None, baselines: Sequence[str], markdown: bool = False
) -> str:
    """Header line (none when env is None), the short TFLOP/s table, geometric-mean speedups and the
    reasons of rows that did not run."""
    primary = _primary(rows)
    header, body = pivot(rows, baselines, primary=primary)
    render = render_markdown if markdown else render_plain
    item = "- " if markdown else "  "
    dtypes = ", ".join(sorted({str(r["dtype"]) for r in rows}))
    caption = f"TFLOP/s (dtype {dtypes}; FLOPs = 4·B·H·Nq·Nk·d, /2 causal, x2.5 bwd)"
    if any(h.startswith("vs ") for h in header):
        caption += f"; 'vs X' = {primary} speedup over X"
    parts = ([env_header(env), ""] if env is not None else []) + [caption, "", render(header, body)]
    geo = geomean_speedups([r for r in rows if r.get("kind") == "sigmoid"], baselines)
    if geo:
        parts += [
            "",
            "Geometric-mean speedup of the sigmoid providers (baseline ms / provider ms, same shapes, this run):",
            "",
        ]
        parts += [f"{item}{p:<24} {m:<8} vs {b:<14} {s:6.2f}x over {n} shapes" for p, m, b, s, n in sorted(geo)]
    notes = problems(rows)
    if notes:
        parts += ["", "Not measured:", ""] + [f"{item}{n}" for n in notes]
    return "\n".join(parts)


def print_summary(rows: Sequence[dict[str, Any]], env: dict[str, Any], baselines: Sequence[str]) -> None:
    """Print the summary; through rich when stdout is a terminal, plain text otherwise (log files)."""
    text = summary_text(rows, env, baselines)
    if sys.stdout.isatty():
        try:
            from rich.console import Console

            Console().print(text, markup=False, highlight=False, soft_wrap=True)
            return
        except ImportError:
            pass
    print(text, flush=True)


def _csv_value(v: Any) -> Any:
    return "" if v is None else v


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """All rows, ROW_FIELDS first, then speedup columns; empty cells for None."""
    fields = list(ROW_FIELDS) + sorted({k for r in rows for k in r} - set(ROW_FIELDS))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})


def write_json(rows: Sequence[dict[str, Any]], env: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """{'env': ..., 'config': ..., 'results': [...]} with null for missing values."""
    path.write_text(json.dumps({"env": env, "config": config, "results": list(rows)}, indent=1, default=str))


def plot(rows: Sequence[dict[str, Any]], env: dict[str, Any], path: Path) -> None:
    """TFLOP/s vs seqlen per provider, one panel per (headdim, causal, mode); softmax baselines dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, Agg canvas

    ok = [r for r in rows if r.get("status") == "ok" and r.get("tflops") is not None]
    panels = sorted(
        {(r["headdim"], r["causal"], r["mode"]) for r in ok},
        key=lambda p: (["fwd", "bwd", "fwd+bwd"].index(p[2]) if p[2] in ("fwd", "bwd", "fwd+bwd") else 9, p[0], p[1]),
    )
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    ncols = min(4, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    for ax, (d, causal, mode) in zip(axes.flat, panels):
        for p in providers:
            pts = sorted(
                (r["seqlen_k"], r["tflops"])
                for r in ok
                if (r["provider"], r["headdim"], r["causal"], r["mode"]) == (p, d, causal, mode)
            )
            if not pts:
                continue
            kind = next(r.get("kind") for r in ok if r["provider"] == p)
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                marker="o",
                ms=3,
                color=colors[p],
                linestyle="--" if kind == "softmax" else "-",
                label=p,
            )
        ax.set_xscale("log", base=2)
        seqlens = sorted({r["seqlen_k"] for r in ok if (r["headdim"], r["causal"], r["mode"]) == (d, causal, mode)})
        ax.set_xticks(seqlens, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in seqlens])
        ax.set_title(f"{mode}, d={d}, {'causal' if causal else 'non-causal'}", fontsize=10)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if providers:
        handles, labels = next(iter(axes.flat)).get_legend_handles_labels()
        for ax in axes.flat:
            h, lab = ax.get_legend_handles_labels()
            if len(lab) > len(labels):
                handles, labels = h, lab
        fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)), fontsize=8)
    dtypes = ", ".join(sorted({str(r["dtype"]) for r in rows}))
    fig.suptitle(f"{env_header(env)}  [{dtypes}]", fontsize=9)
    fig.savefig(path, dpi=120)


def write_all(
    rows: Sequence[dict[str, Any]],
    env: dict[str, Any],
    config: dict[str, Any],
    out_dir: Path,
    baselines: Sequence[str] = DEFAULT_BASELINES,
) -> dict[str, Path]:
    """Write results.csv, results.json, table.txt, table.md and tflops.png into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
        "txt": out_dir / "table.txt",
        "md": out_dir / "table.md",
        "png": out_dir / "tflops.png",
    }
    write_csv(rows, paths["csv"])
    write_json(rows, env, config, paths["json"])
    paths["txt"].write_text(summary_text(rows, env, baselines) + "\n")
    paths["md"].write_text(summary_text(rows, env, baselines, markdown=True) + "\n")
    try:
        plot(rows, env, paths["png"])
    except ImportError as e:  # the GPU machines run from a checkout, maybe without matplotlib
        print(f"no plot: {e}", file=sys.stderr)
        del paths["png"]
    return paths


def load_results(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """(rows, env, config) of a results.json, or (rows, None, {}) of a results.partial.jsonl left by a cut-off run."""
    text = Path(path).read_text()
    if Path(path).suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()], None, {}
    data = json.loads(text)
    return data["results"], data.get("env"), data.get("config", {})
