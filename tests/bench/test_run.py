"""End to end on CPU: the quick sweep writes CSV/JSON/PNG; unavailable and failing providers give reason rows."""

import argparse
import csv
import json
from pathlib import Path

import torch

from sigattn.bench.providers import PROVIDERS, Provider, Unavailable, provider_status
from sigattn.bench.run import add_arguments, main, quick_bench, run_one
from sigattn.bench.shapes import Shape


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_sweep_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = _args(
        "--quick",
        "--device",
        "cpu",
        "--seqlens",
        "128",
        "--headdims",
        "32",
        "--causal",
        "both",
        "--providers",
        "sigattn-reference,sdpa-math,naive-sigmoid,flash-attn",
        "--baselines",
        "sdpa-math",
        "--warmup",
        "0",
        "--rep",
        "1",
        "--no-progress",
        "--out",
        str(out),
    )
    assert main(args) == 0
    for name in ("results.csv", "results.json", "table.txt", "table.md", "tflops.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert data["env"]["torch"] == torch.__version__
    rows = data["results"]
    assert len(rows) == 2 * 3 * 4  # causal x modes x providers
    ok = [r for r in rows if r["provider"] in ("sigattn-reference", "sdpa-math", "naive-sigmoid")]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 for r in ok), ok
    assert all(r["speedup_vs_sdpa-math"] > 0 for r in ok)
    fa = [r for r in rows if r["provider"] == "flash-attn"]
    assert all(r["status"] == "unavailable" and r["reason"] for r in fa)
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "tflops.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "results.partial.jsonl").exists()


def test_unknown_provider_is_an_argument_error(tmp_path: Path) -> None:
    assert main(_args("--device", "cpu", "--providers", "nope", "--out", str(tmp_path))) == 2


def test_failing_and_unavailable_providers_give_reason_rows() -> None:
    shape = Shape(1, 2, 64, 64, 32, False)
    cpu = torch.device("cpu")

    def boom(*_: object) -> None:
        raise RuntimeError("head dim 32 not supported\nsecond line")

    row = run_one(Provider("boom", boom, "sigmoid"), shape, "fwd", "fp32", cpu)
    assert row["status"] == "error" and row["reason"] == "RuntimeError: head dim 32 not supported"
    row = run_one(Provider("gone", lambda *_: Unavailable("not installed"), "sigmoid"), shape, "bwd", "fp32", cpu)
    assert (row["status"], row["reason"], row["ms"]) == ("unavailable", "not installed", None)
    row = run_one(PROVIDERS["sdpa-cudnn"], shape, "fwd", "fp32", cpu)
    assert (row["status"], row["reason"]) == ("unavailable", "needs a CUDA device")
    status = provider_status(cpu)
    assert status["sdpa-math"] == "available" and status["sdpa-cudnn"].startswith("unavailable: ")
    row = run_one(PROVIDERS["naive-sigmoid"], shape, "fwd", "fp32", cpu, max_materialized_seqlen=32)
    assert row["status"] == "skipped"


def test_quick_bench_cpu() -> None:
    rows = quick_bench("cpu")
    assert rows and all(r["status"] == "ok" for r in rows)
    assert {r["provider"] for r in rows} == {"sigattn-reference", "naive-sigmoid", "sdpa-math"}


def test_report_from_partial_jsonl(tmp_path: Path) -> None:
    shape = Shape(1, 2, 64, 64, 32, True)
    rows = [
        run_one(PROVIDERS[p], shape, "fwd", "fp32", torch.device("cpu"), 0, 1) for p in ("naive-sigmoid", "sdpa-math")
    ]
    partial = tmp_path / "results.partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "re"
    assert main(_args("--device", "cpu", "--from", str(partial), "--baselines", "sdpa-math", "--out", str(out))) == 0
    again = json.loads((out / "results.json").read_text())["results"]
    assert [r["provider"] for r in again] == ["naive-sigmoid", "sdpa-math"]
    assert again[1]["speedup_vs_sdpa-math"] == 1.0
    assert "naive-sigmoid" in (out / "table.md").read_text()
