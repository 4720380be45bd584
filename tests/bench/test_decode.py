"""Decode benchmark on CPU: tiny shapes write the table, JSON and plot; failures and missing backends give rows."""

import argparse
import json
from pathlib import Path

from sigattn.bench import decode
from sigattn.cli import build_parser


def _args(out: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    tiny = ["--device", "cpu", "--batches", "2", "--contexts", "40", "--nheads", "4", "--nheads-kv", "2",
            "--headdim", "16", "--pages", "16", "--dtype", "fp32", "--copy-mib", "4", "--warmup", "0", "--rep", "1"]
    return parser.parse_args(tiny + ["--out", str(out), *argv])


def test_decode_bench_end_to_end(tmp_path: Path) -> None:
    assert decode.main(_args(tmp_path)) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    rows = {(r["provider"], r["layout"]): r for r in data["rows"]}
    assert data["meta"]["copy_gbps"] > 0
    for layout in ("contiguous", "paged16"):
        r = rows[("sigattn", layout)]
        assert r["ms"] > 0 and r["max_err"] < 1e-4 and "splits=" in r["note"]  # interpreter on CPU
        assert rows[("sigattn-api", layout)]["max_err"] < 1e-4
        assert rows[("sigattn-step", layout)]["max_err"] < 1e-4
    assert rows[("sdpa-flash", "contiguous")]["note"].startswith("unavailable")
    assert rows[("naive-sigmoid", "contiguous")]["gbps"] > 0
    table = (tmp_path / "decode.md").read_text()
    assert "% of copy" in table and "| 2 | 40 | paged16 | sigattn |" in table
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_cli_bench_decode_maps_options(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(decode, "main", lambda a: seen.update(vars(a)) or 0)
    args = build_parser().parse_args(["bench", "--decode", "--device", "cpu", "--out", str(tmp_path),
                                      "--batch", "4", "--seqlens", "1k", "--dtype", "fp16"])
    assert args.func(args) == 0
    assert (seen["batches"], seen["contexts"], seen["dtype"], seen["out"]) == ("4", "1k", "fp16", str(tmp_path))
    assert decode._ints("4k,32k,100") == [4096, 32768, 100]
