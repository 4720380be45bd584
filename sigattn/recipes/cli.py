"""`sigattn train lm|vit|asr`: arguments, the comparison run, and the demo's quick softmax-vs-sigmoid LM run."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sigattn.recipes.compare import PLOT_NAME, RESULTS_NAME, TABLE_NAME, run_comparison, write_report
from sigattn.recipes.train import SIZES, SUMMARY_NAME, TASKS, get_recipe, init_distributed
from sigattn.recipes.variants import VARIANTS, get_variants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` subcommand's arguments to parser."""
    parser.add_argument("task", choices=TASKS, help="lm: byte-level GPT on the Python stdlib; vit: Fashion-MNIST; "
                        "asr: CTC on espeak-ng speech (needs `apt-get install -y espeak-ng`)")
    parser.add_argument("--variants", nargs="+", default=["all"], metavar="NAME",
                        help=f"any of {', '.join(VARIANTS)}, or all (default)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny (CPU, default) or gpu (reported results)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the size's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the size's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the size's)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<task>-<size>)")
    parser.add_argument("--resume", action="store_true", help="continue each variant from its checkpoint")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        metavar="MODE",
                        help="torch.compile the training forward/backward, optionally with a torch.compile mode "
                        "(reduce-overhead: CUDA graphs, no per-call host cost); diagnostic steps and evaluation stay "
                        "eager")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the table and curves of the variants whose summary.json is in --out "
                        "(e.g. runs made by separate processes or machines)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="lm: a source tree to read *.py from (default: the Python stdlib); vit: a directory "
                        "with the Fashion-MNIST idx files (default: Debian's /usr/share/datasets/fashion-mnist, "
                        "else scikit-learn's digits); asr: the speech cache (default $SIGATTN_ASR_DIR, "
                        "else ~/.cache/sigattn/asr)")
    parser.add_argument("--corpus", default=None, help="asr: the synthetic corpus, tiny or gpu (default: the size's)")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                        help="sigmoid attention backend (default auto: Triton kernels on CUDA)")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="lm under torchrun: N consecutive ranks share each sequence (zigzag shards, ring "
                        "attention); the batch is split over world / N replicas (default 1: data parallel only)")
    parser.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA (default: bfloat16 autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run the comparison that args describe; print the table and where the outputs are."""
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get_recipe(args.task, args.size, steps=args.steps, batch=args.batch_size, lr=args.lr,
                        corpus=getattr(args, "corpus", None))
    variants = get_variants(args.variants)
    out = Path(args.out or f"runs/{args.task}-{args.size}")
    if args.report_only:
        done = [v.name for v in variants if (out / v.name / SUMMARY_NAME).exists()]
        if not done:
            raise FileNotFoundError(f"--report-only: no {SUMMARY_NAME} under {out}/<variant>/ for {args.variants}")
        summaries = [json.loads((out / n / SUMMARY_NAME).read_text()) for n in done]
        print(write_report(out, recipe, done, summaries))
        return 0
    t0 = time.perf_counter()
    summaries = run_comparison(
        recipe, variants, out, device=args.device, seed=args.seed, resume=args.resume, data_dir=args.data_dir,
        backend=args.backend, amp=not args.no_amp, progress=not args.no_progress, compile=args.compile,
        context_parallel=getattr(args, "context_parallel", 1),
    )
    dist = init_distributed(args.device)
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not dist.main or not summaries:
        return 0
    print((out / TABLE_NAME).read_text())
    print(f"{len(variants)} run(s) in {time.perf_counter() - t0:.0f} s; wrote {out / TABLE_NAME}, "
          f"{out / RESULTS_NAME}, {out / PLOT_NAME} and <variant>/log.jsonl")
    return 0


def quick_train(device: str | torch.device, steps: int = 200) -> list[dict[str, Any]]:
    """The demo's training check: the tiny LM with softmax and with the sigmoid recipe, same data and steps.

    About 20-40 s on a CPU. Prints the final train/val losses (and the val-loss gap) and returns the summaries.
    """
    recipe = get_recipe("lm", "tiny", steps=steps)
    with tempfile.TemporaryDirectory(prefix="sigattn-train-") as tmp:
        t0 = time.perf_counter()
        summaries = run_comparison(recipe, get_variants(["softmax", "sigmoid"]), tmp, device=str(device),
                                   progress=False, plot=False)
    for s in summaries:
        print(f"{s['variant']:>8}: train loss {s['train_loss']:.4f}  val loss {s['val_loss']:.4f}  (nats/byte)")
    soft, sig = summaries
    gap = 100 * (sig["val_loss"] / soft["val_loss"] - 1)
    print(f"tiny byte-level LM, {steps} steps each, {time.perf_counter() - t0:.0f} s: sigmoid val loss "
          f"{gap:+.2f}% vs softmax (full comparison: `sigattn train lm`; EXPERIMENTS.md)")
    return summaries


if __name__ == "__main__":
    # `python -m sigattn.recipes.cli lm ...` is the same as `sigattn train lm ...`.
    _parser = argparse.ArgumentParser(prog="sigattn train", description=__doc__)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
