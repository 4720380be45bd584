"""One training loop for the recipes (byte LM, ViT, CTC ASR): presets, AdamW + cosine, AMP, resume, DDP, JSONL logs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sigattn.distributed import enable_context_parallel, shard_sequence
from sigattn.nn.diagnostics import AttentionDiagnostics
from sigattn.recipes import data as datasets
from sigattn.recipes.asr import AsrTask
from sigattn.recipes.models import GPT, ModelShape, ViT
from sigattn.recipes.variants import Variant

TASKS = ("lm", "vit", "asr")
SIZES = ("tiny", "gpu")
LOG_NAME, CKPT_NAME, SUMMARY_NAME = "log.jsonl", "checkpoint.pt", "summary.json"


@dataclass(frozen=True)
class Recipe:
    """Everything but the variant that fixes a run: model shape, data shape, optimisation and logging cadence.

    context: LM sequence length (the LM's n in b = -log n). patch: ViT patch size for Fashion-MNIST's 28x28
    images; 0, or a size that leaves fewer than 4x4 patches (the 8x8 digits fallback), means image_size // 4.
    eval_batches: LM validation batches; eval_limit: ViT validation images (None: all).
    asr: context is the n of b = -log n (0: the median encoder length of the training data); corpus names an
    asr_data.CORPORA entry ("": the size's).
    norm_every: interval of the attention diagnostics (output norms, row sums, entropy, gradient norms; also at
    steps 0, 1, 2, 4, ... below it); diag_rows: query rows they sample per layer.
    """

    task: str
    size: str
    shape: ModelShape
    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    eval_every: int
    norm_every: int
    ckpt_every: int
    log_every: int = 10
    context: int = 0
    patch: int = 0
    eval_batches: int = 8
    eval_limit: int | None = None
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    augment: bool = True
    diag_rows: int = 16
    corpus: str = ""


RECIPES: dict[tuple[str, str], Recipe] = {
    ("lm", "tiny"): Recipe(
        "lm", "tiny", ModelShape(64, 2, 4), steps=150, batch=32, context=64, lr=3e-3, warmup=15,
        weight_decay=0.1, eval_every=50, eval_batches=8, norm_every=10, ckpt_every=50,
    ),
    ("lm", "gpu"): Recipe(
        "lm", "gpu", ModelShape(384, 6, 6), steps=5000, batch=32, context=512, lr=1e-3, warmup=200,
        weight_decay=0.1, eval_every=250, eval_batches=32, norm_every=50, ckpt_every=500, log_every=25,
    ),
    ("vit", "tiny"): Recipe(
        "vit", "tiny", ModelShape(64, 2, 4), steps=150, batch=64, lr=2e-3, warmup=15, weight_decay=0.05,
        eval_every=50, eval_limit=2000, norm_every=10, ckpt_every=50, augment=False,
    ),
    ("vit", "gpu"): Recipe(
        "vit", "gpu", ModelShape(192, 6, 3), steps=6000, batch=256, patch=4, lr=1e-3, warmup=300,
        weight_decay=0.05, eval_every=500, norm_every=50, ckpt_every=1000, log_every=25,
    ),
    ("asr", "tiny"): Recipe(
        "asr", "tiny", ModelShape(96, 3, 4), steps=500, batch=32, lr=2e-3, warmup=50, weight_decay=0.05,
        eval_every=100, norm_every=20, ckpt_every=100,
    ),
    ("asr", "gpu"): Recipe(
        "asr", "gpu", ModelShape(256, 8, 4), steps=6000, batch=64, lr=1e-3, warmup=400, weight_decay=0.05,
        eval_every=500, norm_every=100, ckpt_every=1000, log_every=25,
    ),
}


def get_recipe(task: str, size: str = "tiny", **overrides: Any) -> Recipe:
    """The preset for (task, size) with the non-None overrides applied (e.g. steps=300, batch=16)."""
    if (task, size) not in RECIPES:
        raise ValueError(f"no recipe for task {task!r} size {size!r}; tasks {TASKS}, sizes {SIZES}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(RECIPES[task, size], **changes)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun).

    cp: context-parallel ranks per sequence. Ranks cp * i .. cp * i + cp - 1 form data-parallel replica i (one
    node's GPUs when cp divides the GPUs per node): each holds a zigzag shard of every sequence of the
    replica's slice of the batch.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    cp: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp


def init_distributed(device: str | None) -> Dist:
    """Join the process group when WORLD_SIZE > 1 (torchrun); NCCL on CUDA, else Gloo. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank)


_CP_GROUPS: dict[int, Any] = {}


def context_parallel_group(dist: Dist) -> Any:
    """This rank's context-parallel process group (made once per size: new_group is collective, all ranks call)."""
    import torch.distributed as tdist

    if dist.cp not in _CP_GROUPS:
        groups = [tdist.new_group(list(range(i * dist.cp, (i + 1) * dist.cp))) for i in range(dist.dp)]
        _CP_GROUPS[dist.cp] = groups[dist.dp_rank]
    return _CP_GROUPS[dist.cp]


def _check_context_parallel(recipe: Recipe, variant: Variant, dist: Dist) -> None:
    if dist.cp == 1:
        return
    if dist.world % dist.cp:
        raise ValueError(f"context_parallel ({dist.cp}) must divide the world size ({dist.world})")
    if recipe.task != "lm":
        raise ValueError(f"context parallelism is for the LM recipe; got task {recipe.task!r}")
    if variant.attention != "sigmoid" or variant.positional == "alibi":
        raise ValueError(f"context parallelism needs sigmoid attention without ALiBi; variant {variant.name!r} has "
                         f"attention={variant.attention!r}, positional={variant.positional!r} (use --variants "
                         "sigmoid, sigmoid-b0, sigmoid-no-layerscale or sigmoid-no-qknorm)")
    if recipe.context % (2 * dist.cp):
        raise ValueError(f"context ({recipe.context}) must be divisible by 2 * context_parallel ({2 * dist.cp}): "
                         "zigzag sharding cuts each sequence into 2 chunks per rank")


def _resolve_device(device: str | None, dist: Dist) -> torch.device:
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and dist.world > 1:
        name = f"cuda:{dist.local_rank}"
    return torch.device(name)


# Diagnostics logged per layer at the norm steps: log key -> AttentionDiagnostics.summary() key.
DIAGNOSTICS = {
    "norms": "module_out_norm",  # mean per-token L2 norm of the attention module's output (after o_proj)
    "out_norm": "out_norm",  # the same before o_proj: sigmoid(q k^T + b) v itself
    "row_sum": "row_sum_mean",  # mean row sum of the attention weights over sampled query rows
    "entropy": "entropy_mean",
    "logit_absmax": "logit_absmax",
    "grad_out_norm": "grad_out_norm",
}


def diagnostics_record(step: int, diag: AttentionDiagnostics) -> dict[str, Any]:
    """The attn_norm log record of one measured step: per-layer lists of the DIAGNOSTICS statistics."""
    rows = diag.summary()
    nan = float("nan")
    return {"kind": "attn_norm", "step": step,
            **{key: [nan if r.get(src) is None else r[src] for r in rows] for key, src in DIAGNOSTICS.items()}}


def _norm_step(step: int, every: int) -> bool:
    # Early steps are where the large initial norms show (the paper's figure), so log 0, 1, 2, 4, 8, ... too.
    return step % every == 0 or (step < every and step & (step - 1) == 0)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode_of(compile: bool | str | None) -> str | None:
    """The torch.compile mode a `compile` argument asks for: None (eager) for False/None, "default" for True."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if not isinstance(compile, str) or compile not in COMPILE_MODES:
        raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}; got {compile!r}")
    return compile


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr_ratio at `steps`."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = min(1.0, (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(recipe: Recipe, variant: Variant, images: datasets.ImageData | None = None,
                backend: str = "auto") -> nn.Module:
    """The recipe's model for `variant` (the ViT needs the image data for its input and class shapes)."""
    if recipe.task == "lm":
        return GPT(recipe.shape, variant, context=recipe.context, backend=backend)
    if images is None:
        raise ValueError("the ViT recipe needs the image data to size its model")
    size, patch = images.image_size, recipe.patch
    if not patch or size % patch or size // patch < 4:
        patch = size // 4
    return ViT(recipe.shape, variant, image_size=images.image_size, patch=patch, channels=images.channels,
               num_classes=images.num_classes, backend=backend)


def _optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices decay; norms, LayerScale, biases and the ViT's position/class embeddings do not.
        (decay if p.dim() >= 2 and name.split(".")[-1] not in ("pos", "cls") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)


def read_log(path: Path | str) -> list[dict[str, Any]]:
    """The records of a JSONL log (a missing file reads as no records)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    # A run killed after its last checkpoint logged steps that the resumed run will redo: drop them.
    # attn_norm of step s is measured in the forward of update s + 1, which the resumed run redoes: keep only s < step.
    def redone(r: dict[str, Any]) -> bool:
        s = r.get("step", 0)
        return r["kind"] == "summary" or s > step or (s == step and r["kind"] == "attn_norm")

    keep = [r for r in read_log(path) if not redone(r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _check_same_run(state: dict[str, Any], recipe: Recipe, variant: Variant, seed: int, path: Path) -> None:
    # Resuming under other settings would silently mix two runs in one log; only `steps` may grow.
    now = {"seed": seed, "recipe": {**dataclasses.asdict(recipe), "steps": None},
           "variant": dataclasses.asdict(variant)}
    then = {"seed": state.get("seed"), "recipe": {**state.get("recipe", {}), "steps": None},
            "variant": state.get("variant")}
    changed = [k for k in now if json.dumps(now[k], sort_keys=True) != json.dumps(then[k], sort_keys=True)]
    if changed:
        raise ValueError(f"cannot resume {path}: its {', '.join(changed)} differ from this run's (only --steps "
                         "may change); use another --out or drop --resume")


class _Task:
    """The data and loss side of a recipe: training batches, the loss, and evaluation."""

    def __init__(self, recipe: Recipe, seed: int, dist: Dist, device: torch.device, data_dir: str | None) -> None:
        self.recipe, self.seed, self.dist, self.device = recipe, seed, dist, device
        if recipe.batch % dist.dp:
            raise ValueError(f"batch ({recipe.batch}) must be divisible by the data-parallel size ({dist.dp})")
        self.corpus = datasets.load_corpus(data_dir) if recipe.task == "lm" else None
        self.images = datasets.load_images(data_dir) if recipe.task == "vit" else None
        if self.corpus is not None:
            self.eval_set = datasets.lm_eval_batches(self.corpus.val, recipe.eval_batches, recipe.batch, recipe.context)
            self.items_per_step = recipe.batch * recipe.context
        else:
            assert self.images is not None
            self.eval_set = datasets.image_eval_batches(self.images, recipe.batch, recipe.eval_limit)
            self.items_per_step = recipe.batch

    def data_info(self) -> dict[str, Any]:
        if self.corpus is not None:
            c = self.corpus
            return {"data": "python-stdlib", "root": c.root, "digest": c.digest, "train_bytes": c.train.numel(),
                    "val_bytes": c.val.numel(), "train_files": c.train_files, "val_files": c.val_files}
        assert self.images is not None
        return {"data": self.images.name, "train_images": self.images.train_x.shape[0],
                "val_images": self.images.val_x.shape[0]}

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        # The global batch is the same whatever the world size; each replica takes its contiguous slice, and
        # under context parallelism each of its ranks a zigzag shard of every sequence.
        per = t.shape[0] // self.dist.dp
        t = t[self.dist.dp_rank * per : (self.dist.dp_rank + 1) * per]
        return self._shard_sequence(t).to(self.device, non_blocking=True)

    def _shard_sequence(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.cp == 1:
            return t
        return shard_sequence(t, self.dist.cp_rank, self.dist.cp, "zigzag", dim=1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.recipe
        if self.corpus is not None:
            x, y = datasets.lm_batch(self.corpus.train, step, r.batch, r.context, self.seed)
        else:
            assert self.images is not None
            x, y = datasets.image_batch(self.images, step, r.batch, self.seed, augment=r.augment)
        return self._shard(x), self._shard(y)

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: Any) -> dict[str, float]:
        """Mean validation loss (and accuracy for the ViT) over this rank's share of the fixed eval set."""
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # [loss sum, correct, count]
        for x, y in self.eval_set:
            # tensor_split: uneven shares (weighted by their counts below) keep the one-process eval set.
            rank, world = self.dist.dp_rank, self.dist.dp
            x, y = (self._shard_sequence(t.tensor_split(world)[rank]).to(self.device, non_blocking=True)
                    for t in (x, y))
            if y.numel() == 0:
                continue
            with autocast():
                logits = model(x)
            n = y.numel()
            total += torch.stack([self.loss(logits, y).double() * n,
                                  (logits.argmax(-1) == y).sum().double(),
                                  torch.tensor(float(n), dtype=torch.float64, device=self.device)])
        if self.dist.world > 1:
            torch.distributed.all_reduce(total)
        out = {"val_loss": float(total[0] / total[2])}
        if self.images is not None:
            out["val_acc"] = float(total[1] / total[2])
        return out


def train(
    recipe: Recipe,
    variant: Variant,
    out_dir: Path | str,
    *,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    data_dir: str | None = None,
    backend: str = "auto",
    amp: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
    compile: bool | str = False,
    context_parallel: int = 1,
) -> dict[str, Any]:
    """Train `variant` under `recipe` into out_dir; returns the run's summary (also written to summary.json).

    out_dir receives log.jsonl (records of kind config, train, val, attn_norm, summary), checkpoint.pt and
    summary.json. The batch of every step is a function of (seed, step) only, and the weights are drawn
    from `seed`, so variants see the same data in the same order and a resumed run repeats an
    uninterrupted one.

    device: None means cuda if available, else cpu. resume: continue from out_dir's checkpoint (a finished
    run returns its summary; a checkpoint of another seed, variant or recipe, `steps` aside, raises);
    without it out_dir's old log and checkpoint are replaced. data_dir: the LM's
    corpus root (None: the standard library) or the ViT's Fashion-MNIST directory (None: as
    data.load_images). backend: the sigmoid attention backend. amp: bfloat16 autocast on CUDA (no effect on
    CPU). stop_at: stop after this many steps, checkpointed, as an interruption would (for tests). compile:
    torch.compile the training forward/backward (the models are elementwise-bound in eager mode: fp32 norms,
    LayerScale, RoPE): True or "default", or a torch.compile mode ("reduce-overhead" replays CUDA graphs, which
    removes the per-call host cost of every op); the steps that record attention diagnostics and the evaluations
    run eagerly on the same weights.
    context_parallel: ranks per sequence (LM only; default 1): under torchrun, groups of this many consecutive
    ranks each hold a zigzag shard of every sequence and run the attention as a ring (sigattn.distributed);
    the batch is split over world / context_parallel replicas. Same losses as without it (up to rounding);
    checkpoints are interchangeable. No attention diagnostics (attn_norm records) under it: they would see
    only the local keys.
    A non-finite training loss ends the run early with ``diverged: true`` in the summary. Records: a train
    loss at step s is that of the s-th update's batch; val at step s is after s updates; attn_norm at step
    s is measured in the forward of batch s, after s updates (s = 0: at initialisation).
    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 writes the files.
    """
    dist = dataclasses.replace(init_distributed(device), cp=context_parallel)
    _check_context_parallel(recipe, variant, dist)
    dev = _resolve_device(device, dist)
    out = Path(out_dir)
    log_path, ckpt_path, summary_path = out / LOG_NAME, out / CKPT_NAME, out / SUMMARY_NAME
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)

    task: _Task | AsrTask = (AsrTask if recipe.task == "asr" else _Task)(recipe, seed, dist, dev, data_dir)
    torch.manual_seed(seed)
    if isinstance(task, AsrTask):
        model = task.build_model(recipe.shape, variant, backend).to(dev)
    else:
        model = build_model(recipe, variant, task.images, backend).to(dev)
    if dist.cp > 1:
        enable_context_parallel(model, context_parallel_group(dist))
    optimizer = _optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    start = 0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        _check_same_run(state, recipe, variant, seed, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        if start >= recipe.steps and summary_path.exists():
            return json.loads(summary_path.read_text())
        if dist.main:
            _truncate_log(log_path, start)
    elif dist.main:
        for p in (log_path, ckpt_path, summary_path):
            p.unlink(missing_ok=True)
    ddp_model: nn.Module = model
    if dist.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # Diagnostics hooks and evaluation use the eager module (hooks would force recompiles); same parameters.
    compile_mode = compile_mode_of(compile)
    step_model: nn.Module = (torch.compile(ddp_model, mode=None if compile_mode == "default" else compile_mode)
                             if compile_mode else ddp_model)

    use_amp = amp and dev.type == "cuda"

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp)

    def log(record: dict[str, Any]) -> None:
        if dist.main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    params = sum(p.numel() for p in model.parameters())
    log({"kind": "config", "step": start, "variant": dataclasses.asdict(variant), "recipe": dataclasses.asdict(recipe),
         "seed": seed, "device": str(dev), "world": dist.world, "context_parallel": dist.cp, "amp": use_amp,
         "compile": compile_mode or False, "params": params,
         "resumed": start > 0, **task.data_info()})
    end = recipe.steps if stop_at is None else min(stop_at, recipe.steps)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss) not yet logged
    pending_diag: list[tuple[int, AttentionDiagnostics]] = []  # measured steps not yet logged
    diverged, train_time, steps_timed = False, 0.0, 0
    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=recipe.steps, initial=start, desc=f"{recipe.task} {variant.name}", leave=False)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def flush() -> bool:
        """Log the pending losses and norms (one host sync per interval); False when a loss is not finite."""
        for s, diag in pending_diag:
            log(diagnostics_record(s, diag))
        pending_diag.clear()
        if not pending:
            return True
        losses = torch.stack([loss for _, _, loss in pending])
        if dist.world > 1:
            torch.distributed.all_reduce(losses)
            losses /= dist.world
        values = losses.tolist()
        for (s, lr, _), value in zip(pending, values):
            log({"kind": "train", "step": s, "loss": value, "lr": lr})
        pending.clear()
        if bar is not None:
            bar.set_postfix(loss=f"{values[-1]:.4f}")
        return all(math.isfinite(v) for v in values)

    def checkpoint(step: int) -> None:
        if dist.main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "seed": seed,
                     "recipe": dataclasses.asdict(recipe), "variant": dataclasses.asdict(variant)}
            torch.save(state, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a kill mid-save keeps the old one

    model.train()
    timed_from = start + min(20, (end - start) // 10)
    t0 = time.perf_counter()
    for step in range(start, end):
        # Diagnostics hooks only on the measured steps; their statistics stay on the device until flush.
        measure = _norm_step(step, recipe.norm_every) and dist.cp == 1
        diag = AttentionDiagnostics(model, sample_rows=recipe.diag_rows) if measure else None
        x, y = task.batch(step)
        with diag if diag is not None else contextlib.nullcontext():
            with autocast():
                fwd = ddp_model if measure else step_model
                logits = fwd(*x) if isinstance(x, tuple) else fwd(x)
            loss = task.loss(logits, y)
            loss.backward()
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        pending.append((done, lr, loss.detach()))
        if diag is not None:
            pending_diag.append((step, diag))
        if bar is not None:
            bar.update(1)
        if done == timed_from and done < end:
            # Throughput leaves out the first steps of an invocation (Triton compiles, allocator warm-up).
            sync()
            train_time, t0 = 0.0, time.perf_counter()
        boundary = done % recipe.log_every == 0 or done % recipe.eval_every == 0 or done == end
        if not boundary and done % recipe.ckpt_every:
            continue
        sync()
        train_time += time.perf_counter() - t0
        steps_timed = done - timed_from if done > timed_from else done - start
        if not flush():
            diverged = True
            break
        if done % recipe.eval_every == 0 or done == end:
            model.eval()
            log({"kind": "val", "step": done, **task.evaluate(model, autocast)})
            model.train()
        if done % recipe.ckpt_every == 0 or done == end:
            checkpoint(done)
        t0 = time.perf_counter()
    if bar is not None:
        bar.close()
    if stop_at is not None and stop_at < recipe.steps and not diverged:
        return {"variant": variant.name, "stopped_at": end}

    summary = summarize(read_log(log_path)) if dist.main else {}
    summary.update({
        "variant": variant.name, "task": recipe.task, "size": recipe.size, "steps": recipe.steps,
        "diverged": diverged, "params": params, "device": str(dev), "world": dist.world,
        "compile": compile_mode or False,
    })
    if steps_timed and train_time > 0:
        # Only this invocation's steps after its first ones (a resumed run times its own part); eval and
        # checkpoints excluded.
        unit = {"lm": "tokens_per_s", "vit": "images_per_s", "asr": "utterances_per_s"}[recipe.task]
        summary[unit] = steps_timed * task.items_per_step / train_time
    if dev.type == "cuda":
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    log({"kind": "summary", **summary})
    if dist.main:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final numbers of a log: train loss (mean of the last 10% of steps), last/best val, attention norms."""
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    norm = [r for r in records if r["kind"] == "attn_norm"]
    out: dict[str, Any] = {"last_step": train[-1]["step"] if train else 0}
    if train:
        tail = train[-max(1, len(train) // 10):]
        out["train_loss"] = sum(r["loss"] for r in tail) / len(tail)
    if val:
        out["val_loss"] = val[-1]["val_loss"]
        out["best_val_loss"] = min(r["val_loss"] for r in val)
        if "val_acc" in val[-1]:
            out["val_acc"] = val[-1]["val_acc"]
            out["best_val_acc"] = max(r["val_acc"] for r in val)
        for key in ("val_cer", "val_wer"):
            if key in val[-1]:
                out[key] = val[-1][key]
                out["best_" + key] = min(r[key] for r in val)
    if norm:
        out["attn_norm_init"] = max(norm[0]["norms"])
        out["attn_norm_max"] = max(max(r["norms"]) for r in norm)
        out["attn_norm_final"] = max(norm[-1]["norms"])
        out["row_sum_init"] = max(norm[0]["row_sum"])
    return out
