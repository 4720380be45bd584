"""The `sigattn` command line: info, check, bench, diagnose, train and demo."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

if not torch.cuda.is_available():
    # On a CPU-only machine the Triton kernels can still run, under Triton's interpreter; it is chosen when
    # triton is first imported, so set it before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _device(arg: str | None) -> str:
    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _versions() -> dict[str, str]:
    import sigattn

    info = {
        "sigattn": sigattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": str(torch.version.cuda),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        major, minor = torch.cuda.get_device_capability(0)
        info["capability"] = f"sm_{major}{minor}"
    else:
        info["gpu"] = "none"
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    return info


def cmd_info(args: argparse.Namespace) -> int:
    from sigattn import available_backends
    from sigattn.bench.providers import provider_status

    for key, val in _versions().items():
        print(f"{key:>20}: {val}")
    device = _device(args.device)
    print(f"{'device':>20}: {device}")
    print(f"{'backends':>20}: {', '.join(available_backends(device))}")
    print(f"{'bench providers':>20}:")
    for name, status in provider_status(torch.device(device)).items():
        print(f"{'':>22}{name:<24} {status}")
    return 0


def _print_check(rows: list, verbose: bool = True) -> bool:
    ok = True
    print(f"{'case':<22}{'backend':<11}{'dtype':<10}{'worst':<7}{'rel err':>10}{'budget':>10}  result")
    for r in rows:
        ok &= r.ok
        if verbose or not r.ok:
            print(
                f"{r.case:<22}{r.backend:<11}{r.dtype:<10}{r.worst:<7}{r.err:>10.2e}{r.budget:>10.2e}  "
                f"{'ok' if r.ok else 'FAIL'}"
            )
    return ok


def _check(device: str, quick: bool, backends: list[str] | None, sigmoid_impl: str) -> bool:
    from tqdm import tqdm

    from sigattn.check import default_backends, default_dtypes, grid, run_checks

    backends = backends or default_backends(device)
    dtypes = default_dtypes(device)
    total = len(grid(quick, device.startswith("cuda"))) * len(dtypes) * len(backends)
    rows = list(
        tqdm(run_checks(device, dtypes, backends, quick, sigmoid_impl), total=total, desc="check", leave=False)
    )
    ok = _print_check(rows)
    print(f"check: {sum(r.ok for r in rows)}/{len(rows)} within budget on {device} -> {'PASS' if ok else 'FAIL'}")
    return ok


def cmd_check(args: argparse.Namespace) -> int:
    return 0 if _check(_device(args.device), args.quick, args.backends, args.sigmoid_impl) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from sigattn.bench import run

    if args.decode:
        return _bench_decode(args)
    return run.main(args)


def _bench_decode(args: argparse.Namespace) -> int:
    """`sigattn bench --decode`: the decode benchmark (python -m sigattn.bench.decode has all its options); takes
    --device, --out, --dtype, --batch, --seqlens (contexts), --warmup, --rep from the bench options."""
    from sigattn.bench import decode

    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    dargs = parser.parse_args([])
    dargs.device, dargs.out, dargs.warmup, dargs.rep = args.device, args.out, args.warmup, args.rep
    if args.dtype:
        dargs.dtype = args.dtype
    if args.batch:
        dargs.batches = str(args.batch)
    if args.seqlens:
        dargs.contexts = args.seqlens
    return decode.main(dargs)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: on whatever device is here, a short correctness check and a short benchmark."""
    from sigattn.analysis.cli import quick_diagnose
    from sigattn.bench.run import quick_bench
    from sigattn.recipes.cli import quick_train

    device = _device(args.device)
    print(f"sigattn demo on {device}\n")
    for key, val in _versions().items():
        print(f"{key:>20}: {val}")
    print("\n== correctness: each backend vs the float64 reference (output and all gradients) ==")
    t0 = time.perf_counter()
    ok = _check(device, quick=True, backends=None, sigmoid_impl="fast")
    print(f"({time.perf_counter() - t0:.1f} s)\n")
    print("== speed: a short benchmark ==")
    quick_bench(torch.device(device))
    print("\n== attention statistics at init: bias -log n vs 0 (row sums ~1 vs ~n/2), sequence doubling ==")
    quick_diagnose(device)
    print("\n== training: a tiny byte-level LM, softmax vs the sigmoid recipe, same data and steps ==")
    quick_train(device, steps=args.train_steps)
    print("\nFull runs: `sigattn check`, `sigattn bench` (see BENCHMARKS.md for GPU results).")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    from sigattn.analysis import cli as diagnose_cli
    from sigattn.bench import run
    from sigattn.recipes import cli as recipes_cli

    parser = argparse.ArgumentParser(prog="sigattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, backends and benchmark providers")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every backend vs the float64 reference; non-zero exit on failure")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="three cases instead of the full grid")
    p.add_argument("--backends", nargs="+", default=None, help="default: all available here")
    p.add_argument("--sigmoid-impl", default="accurate", choices=["fast", "accurate"])
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("bench", help="benchmark sweep against SDPA softmax baselines and peers")
    run.add_arguments(p)
    p.add_argument("--decode", action="store_true",
                   help="the KV-cache decode benchmark instead (GB/s vs device copy; python -m sigattn.bench.decode)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "diagnose", help="per-layer attention statistics at init; --theory adds the regularity/doubling checks"
    )
    diagnose_cli.add_arguments(p)
    p.set_defaults(func=diagnose_cli.main)
    p = sub.add_parser("train", help="sigmoid vs softmax training comparison (LM, ViT or ASR): curves and a table")
    recipes_cli.add_arguments(p)
    p.set_defaults(func=recipes_cli.main)
    p = sub.add_parser("demo", help="the main job: a short check, benchmark, diagnosis and training run here")
    p.add_argument("--device", default=None)
    p.add_argument("--train-steps", type=int, default=200, help="steps of the tiny softmax-vs-sigmoid LM run")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
