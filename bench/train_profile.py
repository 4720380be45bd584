"""Profile one training step of a recipe model per variant (CUDA): wall per step and the top kernels / ops.

    python bench/train_profile.py --task lm --variants softmax sigmoid [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sigattn.recipes.train import _optimizer, build_model, get_recipe
from sigattn.recipes.variants import get_variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="lm")
    ap.add_argument("--variants", nargs="+", default=["softmax", "sigmoid"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--size", default="gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    recipe = get_recipe(args.task, args.size)
    dev = torch.device(args.device)
    for name in args.variants:
        torch.manual_seed(0)
        model = build_model(recipe, get_variants([name])[0]).to(dev)
        opt = _optimizer(model, recipe)
        if args.compile:
            model = torch.compile(model)
        x = torch.randint(0, 256, (recipe.batch, recipe.context), device=dev)

        def step(model=model, opt=opt, x=x) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(x)
            F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(5):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - t) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events) / 3
        tag = " compiled" if args.compile else ""
        print(f"\n== {args.task} {name}{tag}: {wall * 1e3:.2f} ms/step wall, GPU busy {gpu_us / 1e3:.2f} ms/step")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
