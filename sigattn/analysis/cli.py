"""`sigattn diagnose`: per-layer attention statistics of a small transformer at init, and the theory checks."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sigattn.nn.block import NORM_PLACEMENTS, TransformerBlock
from sigattn.nn.diagnostics import AttentionDiagnostics, format_table, plot_summary

__all__ = ["add_arguments", "build_model", "diagnose", "main", "quick_diagnose"]


def _bias_arg(value: str) -> str | float:
    """'-logn' (b = -log n), 'both' (-log n and 0, two runs) or a number."""
    if value in ("-logn", "both"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -logn, both or a number; got {value!r}") from None


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _optional_choice(value: str) -> str | None:
    return None if value.lower() == "none" else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `sigattn diagnose`."""
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seqlen", type=int, default=256,
                        help="sequence length n; also the training length that sets b = -log n (default 256)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--bias", type=_bias_arg, default="both",
                        help="sigmoid bias: -logn, 0 (or any number), or both = one run each of -log n and 0 "
                             "(default both; write --bias=-logn, since argparse reads '-logn' as an option)")
    parser.add_argument("--attention", choices=("sigmoid", "softmax"), default="sigmoid")
    parser.add_argument("--norm-placement", choices=NORM_PLACEMENTS, default="pre")
    parser.add_argument("--layerscale", type=_optional_float, default=1e-4,
                        help="initial LayerScale, or none to turn it off (default 1e-4)")
    parser.add_argument("--qk-norm", type=_optional_choice, choices=("rms", "layer", None), default=None,
                        help="rms, layer or none (default none)")
    parser.add_argument("--positional", type=_optional_choice, choices=("rope", "alibi", None), default=None,
                        help="rope, alibi or none (default none)")
    parser.add_argument("--causal", action="store_true", help="causal attention (default bidirectional)")
    parser.add_argument("--sample-rows", type=int, default=64,
                        help="query rows per layer for row sums and entropy (default 64)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="sigattn-diagnose.png",
                        help="PNG of the per-layer statistics (default sigattn-diagnose.png); --theory writes "
                             "<stem>-regularity.png and <stem>-doubling.png beside it")
    parser.add_argument("--theory", action="store_true",
                        help="also run the Jacobian regularity and sequence-doubling checks and plot them")


def build_model(
    *,
    layers: int,
    dim: int,
    heads: int,
    seqlen: int,
    bias: str | float,
    attention: str = "sigmoid",
    norm_placement: str = "pre",
    layerscale: float | None = 1e-4,
    qk_norm: str | None = None,
    positional: str | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """A stack of TransformerBlocks at init; bias "-logn" means -log(seqlen) (the module default), else a float."""
    bias_init = None if bias == "-logn" else float(bias)
    return nn.Sequential(*[
        TransformerBlock(
            dim, heads, norm_placement=norm_placement, layerscale=layerscale, layer_idx=i, attention=attention,
            train_seqlen=seqlen, bias_init=bias_init, qk_norm=qk_norm, positional=positional, causal=causal,
            device=device,
        )
        for i in range(layers)
    ])


def _label(attention: str, bias: str | float) -> str:
    if attention == "softmax":
        return "softmax"
    return "sigmoid b=-log n" if bias == "-logn" else f"sigmoid b={float(bias):g}"


def diagnose(
    *,
    layers: int = 4,
    dim: int = 64,
    heads: int = 4,
    seqlen: int = 256,
    batch: int = 2,
    bias: str | float = "both",
    attention: str = "sigmoid",
    norm_placement: str = "pre",
    layerscale: float | None = 1e-4,
    qk_norm: str | None = None,
    positional: str | None = None,
    causal: bool = False,
    sample_rows: int | None = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """One forward + backward of a random batch through a model at init, under AttentionDiagnostics.

    The input is x ~ N(0, 1) (batch, seqlen, dim), the loss the MSE to a random N(0, 1) target. Each run
    (bias "both" gives two; softmax ignores the bias and gives one) rebuilds the model from `seed`, so the runs
    share their weights. Returns {run label: AttentionDiagnostics.summary() rows}.
    """
    biases: list[str | float] = ["-logn", 0.0] if bias == "both" else [bias]
    if attention == "softmax":
        biases = biases[:1]
    runs = {}
    for b in biases:
        torch.manual_seed(seed)
        model = build_model(
            layers=layers, dim=dim, heads=heads, seqlen=seqlen, bias=b, attention=attention,
            norm_placement=norm_placement, layerscale=layerscale, qk_norm=qk_norm, positional=positional,
            causal=causal, device=device,
        )
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        x = torch.randn(batch, seqlen, dim, generator=gen).to(device)
        target = torch.randn(batch, seqlen, dim, generator=gen).to(device)
        with AttentionDiagnostics(model, sample_rows=sample_rows) as diag:
            F.mse_loss(model(x), target).backward()
        runs[_label(attention, b)] = diag.summary()
    return runs


def _print_runs(runs: dict[str, list[dict[str, Any]]]) -> None:
    for label, rows in runs.items():
        print(f"-- {label}")
        print(format_table(rows))
    row = next((r for rows in runs.values() for r in rows if r.get("keys_mean") and r.get("bias") is not None), None)
    if row is not None:
        keys, n = row["keys_mean"], row["seqlen"]
        print(f"(reference levels, n = {n:g}, {keys:g} visible keys per sampled row on average: row sums start near "
              f"keys/2 = {keys / 2:.4g} at b = 0 and keys/n = {keys / n:.3g} at b = -log n; "
              f"a uniform row's entropy = {row['entropy_uniform']:.3f})")


def _theory(plot_stem: Path | None) -> None:
    from sigattn.analysis import doubling, regularity  # the modules

    t0 = time.perf_counter()
    reg = regularity.regularity_table()
    print("\n== regularity: Jacobian spectral norm of single-head attention vs token norm R "
          f"(n = {reg[0]['seqlen']}, max over random inputs) ==")
    labels = list(dict.fromkeys(r["label"] for r in reg))
    radii = sorted({r["radius"] for r in reg})
    print(f"{'R':>6}" + "".join(f"{lab:>20}" for lab in labels))
    for radius in radii:
        vals = {r["label"]: r["jac_norm_max"] for r in reg if r["radius"] == radius}
        print(f"{radius:>6g}" + "".join(f"{vals[lab]:>20.4g}" for lab in labels))
    slopes = regularity.growth_exponents(reg)
    print(f"{'slope':>6}" + "".join(f"{slopes.get(lab, math.nan):>20.2f}" for lab in labels)
          + "   (log-log growth over the larger radii)")

    dbl = doubling.doubling_table()
    print("\n== sequence doubling: ||out(dup x)[::2] - out(x)|| / ||out(x)|| and norm ratio ==")
    labels = list(dict.fromkeys(r["label"] for r in dbl))
    print(f"{'n':>6}" + "".join(f"{lab:>28}" for lab in labels))
    for n in sorted({r["seqlen"] for r in dbl}):
        cells = {r["label"]: f"{r['rel_change']:.2e} (x{r['norm_ratio']:.3f})" for r in dbl if r["seqlen"] == n}
        print(f"{n:>6}" + "".join(f"{cells[lab]:>28}" for lab in labels))
    if plot_stem is not None:
        reg_path = plot_stem.with_name(plot_stem.stem + "-regularity.png")
        dbl_path = plot_stem.with_name(plot_stem.stem + "-doubling.png")
        regularity.plot(reg, str(reg_path))
        doubling.plot(dbl, str(dbl_path))
        print(f"wrote {reg_path} and {dbl_path}")
    print(f"({time.perf_counter() - t0:.1f} s)")


def main(args: argparse.Namespace) -> int:
    """Run `sigattn diagnose` with parsed `args` (see add_arguments); prints tables, writes PNGs, returns 0."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    qk_norm, positional = args.qk_norm, args.positional
    print(f"sigattn diagnose on {device}: {args.layers} x TransformerBlock(dim={args.dim}, heads={args.heads}, "
          f"{args.norm_placement}-norm, layerscale={args.layerscale}, qk_norm={qk_norm}, positional={positional}, "
          f"causal={args.causal}), {args.attention} attention, batch {args.batch} x n = {args.seqlen}, at init")
    runs = diagnose(
        layers=args.layers, dim=args.dim, heads=args.heads, seqlen=args.seqlen, batch=args.batch, bias=args.bias,
        attention=args.attention, norm_placement=args.norm_placement, layerscale=args.layerscale, qk_norm=qk_norm,
        positional=positional, causal=args.causal, sample_rows=args.sample_rows, device=device, seed=args.seed,
    )
    _print_runs(runs)
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        plot_summary(runs, str(plot_path))
        print(f"wrote {plot_path}")
    if args.theory:
        _theory(plot_path)
    return 0


def quick_diagnose(device: torch.device | str) -> None:
    """A few-second look for the demo: row sums at b = -log n vs b = 0 on a 2-layer model, and the doubling test."""
    t0 = time.perf_counter()
    seqlen = 256
    runs = diagnose(layers=2, dim=64, heads=4, seqlen=seqlen, batch=1, device=device)
    _print_runs(runs)
    from sigattn.analysis import doubling

    dbl = doubling.doubling_table(seqlens=(256,), device=device)
    print("sequence doubling at n = 256 (relative output change): "
          + ", ".join(f"{r['label']} {r['rel_change']:.2e}" for r in dbl))
    print(f"({time.perf_counter() - t0:.1f} s; `sigattn diagnose --theory` for the full checks and plots)")
