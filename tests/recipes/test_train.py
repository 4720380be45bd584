"""The training loop: resume repeats an uninterrupted run, logs, divergence, schedule and attention-norm hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sigattn.recipes import train as train_mod
from sigattn.recipes.train import DIAGNOSTICS, get_recipe, lr_factor, read_log, train
from sigattn.recipes.variants import VARIANTS
from tests.recipes import one_thread  # noqa: F401  (autouse fixture)

CORPUS = str(Path(json.__file__).parent)  # the stdlib's json package: a small offline corpus
def _small() -> dict:
    return {"steps": 6, "batch": 4, "context": 16, "warmup": 2, "eval_every": 3, "eval_batches": 1, "ckpt_every": 3,
            "log_every": 1, "norm_every": 2}


RECIPE = get_recipe("lm", "tiny", **_small())


def _run(out: Path, **kw) -> dict:
    return train(RECIPE, VARIANTS["sigmoid"], out, data_dir=CORPUS, progress=False, **kw)


def _kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def test_resume_continues_from_the_checkpoint_and_repeats_the_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full")
    assert _run(tmp_path / "part", stop_at=3) == {"variant": "sigmoid", "stopped_at": 3}
    log = tmp_path / "part" / "log.jsonl"
    assert [r["step"] for r in _kind(read_log(log), "train")] == [1, 2, 3]
    # Steps logged after the last checkpoint by a killed run are dropped on resume, not duplicated.
    with log.open("a") as f:
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 99.0, "lr": 0.0}) + "\n")
    resumed = _run(tmp_path / "part", resume=True)

    a, b = read_log(tmp_path / "full" / "log.jsonl"), read_log(log)
    configs = _kind(b, "config")
    assert [c["resumed"] for c in configs] == [False, True] and configs[1]["step"] == 3
    assert [r["step"] for r in _kind(b, "train")] == list(range(1, 7))
    for kind in ("train", "val", "attn_norm"):
        assert _kind(a, kind) == _kind(b, kind), kind
    for key in ("train_loss", "val_loss", "attn_norm_max", "last_step"):
        assert resumed[key] == full[key], key
    # Resuming a finished run returns its summary and trains nothing.
    assert _run(tmp_path / "part", resume=True)["val_loss"] == resumed["val_loss"]
    assert read_log(log) == b


def test_resume_refuses_other_settings_but_not_more_steps(tmp_path):
    _run(tmp_path, stop_at=3)
    with pytest.raises(ValueError, match="cannot resume .*recipe differ"):
        train(get_recipe("lm", "tiny", **{**_small(), "lr": 1e-4}), VARIANTS["sigmoid"], tmp_path,
              data_dir=CORPUS, progress=False, resume=True)
    with pytest.raises(ValueError, match="seed differ"):
        _run(tmp_path, resume=True, seed=1)
    longer = train(get_recipe("lm", "tiny", **{**_small(), "steps": 7}), VARIANTS["sigmoid"], tmp_path,
                   data_dir=CORPUS, progress=False, resume=True)
    assert longer["last_step"] == 7


def test_log_records_and_summary(tmp_path):
    summary = _run(tmp_path)
    records = read_log(tmp_path / "log.jsonl")
    assert records[0]["kind"] == "config" and records[0]["recipe"]["context"] == 16 and records[0]["params"] > 0
    assert [r["step"] for r in _kind(records, "val")] == [3, 6]
    assert [r["step"] for r in _kind(records, "attn_norm")] == [0, 1, 2, 4]
    assert all(len(r["norms"]) == 2 for r in _kind(records, "attn_norm"))
    assert records[-1]["kind"] == "summary" and not summary["diverged"] and summary["tokens_per_s"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "checkpoint.pt").exists()


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch):
    real_loss = train_mod._Task.loss
    monkeypatch.setattr(train_mod._Task, "loss", staticmethod(lambda logits, y: real_loss(logits, y) * float("nan")))
    summary = _run(tmp_path)
    assert summary["diverged"] and summary["last_step"] == 1


def test_lr_schedule():
    r = get_recipe("lm", "tiny", steps=100, warmup=10, lr=1.0)
    assert lr_factor(0, r) == pytest.approx(0.1) and lr_factor(9, r) == pytest.approx(1.0)
    assert lr_factor(10, r) == pytest.approx(1.0) and lr_factor(100, r) == pytest.approx(r.min_lr_ratio)
    assert all(lr_factor(s, r) >= lr_factor(s + 1, r) for s in range(10, 100))


def test_get_recipe_overrides():
    assert get_recipe("vit", "gpu", steps=7, batch=None).steps == 7
    with pytest.raises(ValueError, match="no recipe"):
        get_recipe("lm", "huge")
    with pytest.raises(ValueError, match="unknown recipe field"):
        get_recipe("lm", "tiny", colour="red")


def test_diagnostics_show_the_large_initial_norm_and_row_sums_without_the_bias(tmp_path):
    recipe = get_recipe("lm", "tiny", steps=1, batch=4, context=64, eval_batches=1)
    first = {}
    for name in ("sigmoid", "sigmoid-b0", "softmax"):
        train(recipe, VARIANTS[name], tmp_path / name, data_dir=CORPUS, progress=False)
        first[name] = _kind(read_log(tmp_path / name / "log.jsonl"), "attn_norm")[0]
        assert first[name]["step"] == 0 and set(DIAGNOSTICS) <= set(first[name])
        assert all(len(first[name][key]) == recipe.shape.depth for key in DIAGNOSTICS)
    # At initialisation the causal row sums are ~ keys/2 ~ 16 at b = 0 and ~ (keys/n) E[exp(logit)] ~ 0.5 * 1.5
    # at b = -log n (softmax: exactly 1), so the attention output is ~20x larger without the bias.
    assert all(14 < r < 18 for r in first["sigmoid-b0"]["row_sum"])
    assert all(0.3 < r < 1.2 for r in first["sigmoid"]["row_sum"])
    assert first["softmax"]["row_sum"] == pytest.approx([1.0, 1.0])
    assert all(b0 > 4 * b for b0, b in zip(first["sigmoid-b0"]["norms"], first["sigmoid"]["norms"]))


def test_vit_patch_fits_the_images():
    from sigattn.recipes.data import ImageData
    from sigattn.recipes.train import build_model

    def images(size: int) -> ImageData:
        x = torch.zeros(2, 1, size, size, dtype=torch.uint8)
        return ImageData("fake", x, torch.zeros(2, dtype=torch.long), x, torch.zeros(2, dtype=torch.long), 10, 0.5, 0.3)

    assert build_model(get_recipe("vit", "gpu"), VARIANTS["sigmoid"], images(28)).num_tokens == 7 * 7 + 1
    assert build_model(get_recipe("vit", "gpu"), VARIANTS["sigmoid"], images(8)).num_tokens == 4 * 4 + 1
    assert build_model(get_recipe("vit", "tiny"), VARIANTS["sigmoid"], images(28)).num_tokens == 4 * 4 + 1
    with pytest.raises(ValueError, match="needs the image data"):
        build_model(get_recipe("vit", "tiny"), VARIANTS["sigmoid"])


TORCHRUN_ARGS = ["lm", "--variants", "sigmoid", "--steps", "2", "--batch-size", "4", "--data-dir", CORPUS,
                 "--no-progress", "--threads", "1"]


def _cli(out: Path, *extra: str, nproc: int = 1) -> list[dict]:
    """`sigattn train` (under torchrun when nproc > 1) with TORCHRUN_ARGS; returns the sigmoid run's log."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                 if nproc > 1 else [])
    run = subprocess.run([*launch, "-m", "sigattn.recipes.cli", *TORCHRUN_ARGS, *extra, "--out", str(out)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return read_log(out / "sigmoid" / "log.jsonl")


@pytest.fixture(scope="module")
def one_process_log(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _cli(tmp_path_factory.mktemp("one"))


def test_ddp_under_torchrun_matches_one_process(tmp_path, one_process_log):
    """Two Gloo ranks, each with half of the same global batch, log the losses of the one-process run."""
    ddp, one = _cli(tmp_path / "ddp", nproc=2), one_process_log
    assert _kind(ddp, "config")[0]["world"] == 2
    assert [r["loss"] for r in _kind(ddp, "train")] == pytest.approx([r["loss"] for r in _kind(one, "train")], rel=1e-5)
    assert _kind(ddp, "val")[0]["val_loss"] == pytest.approx(_kind(one, "val")[0]["val_loss"], rel=1e-5)


def test_context_parallel_under_torchrun_matches_one_process(tmp_path, one_process_log):
    """`--context-parallel 2` on two Gloo ranks (each a zigzag half of every sequence, ring attention, DDP over
    both) logs the losses of the one-process run; the checkpoint loads into an ordinary model."""
    cp, one = _cli(tmp_path / "cp", "--context-parallel", "2", nproc=2), one_process_log
    assert _kind(cp, "config")[0]["world"] == 2 and _kind(cp, "config")[0]["context_parallel"] == 2
    assert [r["loss"] for r in _kind(cp, "train")] == pytest.approx([r["loss"] for r in _kind(one, "train")], rel=1e-5)
    assert _kind(cp, "val")[0]["val_loss"] == pytest.approx(_kind(one, "val")[0]["val_loss"], rel=1e-5)
    assert not _kind(cp, "attn_norm")
    state = torch.load(tmp_path / "cp" / "sigmoid" / "checkpoint.pt", weights_only=True)
    train_mod.build_model(RECIPE, VARIANTS["sigmoid"]).load_state_dict(state["model"])


def test_context_parallel_refuses_what_it_cannot_run(tmp_path):
    dist2 = train_mod.Dist(rank=0, world=2, cp=2)
    for recipe, variant, match in (
        (get_recipe("vit", "tiny"), "sigmoid", "for the LM recipe"),
        (RECIPE, "softmax", "needs sigmoid attention without ALiBi"),
        (RECIPE, "sigmoid-alibi", "needs sigmoid attention without ALiBi"),
        (get_recipe("lm", "tiny", context=18), "sigmoid", "divisible by 2 \\* context_parallel"),
    ):
        with pytest.raises(ValueError, match=match):
            train_mod._check_context_parallel(recipe, VARIANTS[variant], dist2)
    with pytest.raises(ValueError, match="must divide the world size"):
        train_mod._check_context_parallel(RECIPE, VARIANTS["sigmoid"], train_mod.Dist(rank=0, world=3, cp=2))


def test_truncate_log_drops_what_the_resumed_run_redoes(tmp_path):
    """attn_norm of step s is measured during update s + 1: resuming from checkpoint s must drop it."""
    path = tmp_path / "log.jsonl"
    records = [
        {"kind": "train", "step": 3}, {"kind": "attn_norm", "step": 3}, {"kind": "train", "step": 4},
        {"kind": "attn_norm", "step": 4}, {"kind": "train", "step": 5}, {"kind": "summary", "step": 5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train_mod._truncate_log(path, 4)
    assert [(r["kind"], r["step"]) for r in read_log(path)] == [("train", 3), ("attn_norm", 3), ("train", 4)]


def test_compile_modes():
    from sigattn.recipes.train import COMPILE_MODES, compile_mode_of

    assert compile_mode_of(False) is None and compile_mode_of(None) is None
    assert compile_mode_of(True) == "default"
    for mode in COMPILE_MODES:
        assert compile_mode_of(mode) == mode
    with pytest.raises(ValueError, match="compile must be a bool or one of"):
        compile_mode_of("fast")


def test_cli_compile_flag_takes_an_optional_mode():
    import argparse

    from sigattn.recipes import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    task = ["lm"]
    assert parser.parse_args(task).compile is None
    assert parser.parse_args(task + ["--compile"]).compile == "default"
    assert parser.parse_args(task + ["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit):
        parser.parse_args(task + ["--compile", "fast"])
