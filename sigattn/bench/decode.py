"""Decode benchmark: the KV-cache kernel's GB/s against device copy bandwidth, SDPA flash/cuDNN and eager sigmoid.

GPU (the lead's command; ~2 min on an H100 with a cold Triton cache):

    PYTHONPATH=$PWD python -m sigattn.bench.decode --out $OUT/decode        # or: sigattn bench --decode --out ...

Shapes: batch 1/8/32 x context 4k/32k, 32 query heads, 8 kv heads, head dim 128, bf16, one query, contiguous and
paged caches. Bytes = K and V read once (GQA: the 8 kv heads) + q read + out written, for every provider, so GB/s
columns compare times at one byte count. The copy reference is torch's copy of a 1 GiB buffer, bytes read + written,
measured in the same run. Medians of triton.testing.do_bench (L2 flushed before every call).
Providers: sigattn (the launcher, no append), sigattn-step (the launcher appending this step's token: the one fused
launch a decode step makes), sigattn-api (the public function: checks + the same launch), SDPA, eager sigmoid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sigattn.bench import report
from sigattn.bench.timing import measure

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINE = "sdpa-flash"
# Candidate (block_n, num_warps, num_stages, num_stages_paged) for --sweep, from sm_90 ptxas reports (no spills).
SWEEP = [(64, 4, 3, 5), (64, 4, 4, 6), (128, 4, 3, 5), (128, 8, 3, 5), (64, 8, 3, 5), (32, 4, 4, 6)]


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    context: int  # keys each query attends over
    nheads: int
    nheads_kv: int
    headdim: int
    seqlen_q: int = 1
    page: int | None = None  # None: contiguous cache

    @property
    def layout(self) -> str:
        return "contiguous" if self.page is None else f"paged{self.page}"

    def nbytes(self, element_size: int) -> int:
        kv = 2 * self.batch * self.context * self.nheads_kv * self.headdim
        qo = 2 * self.batch * self.seqlen_q * self.nheads * self.headdim
        return (kv + qo) * element_size


Step = Callable[[], Any]


def _inputs(shape: DecodeShape, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, dtype=dtype, device=device)

    b, n, hkv, d = shape.batch, shape.context, shape.nheads_kv, shape.headdim
    t = {"q": randn(b, shape.seqlen_q, shape.nheads, d)}
    if shape.page is None:
        t["k_cache"], t["v_cache"] = randn(b, n, hkv, d), randn(b, n, hkv, d)
    else:
        per_seq = -(-n // shape.page)
        t["k_cache"], t["v_cache"] = (randn(b * per_seq, shape.page, hkv, d) for _ in range(2))
        perm = torch.randperm(b * per_seq, generator=torch.Generator().manual_seed(0)).to(device)
        t["block_table"] = perm.view(b, per_seq).to(torch.int32)
    t["seqlens"] = torch.full((b,), n, dtype=torch.int32, device=device)
    t["bias"] = torch.full((shape.nheads,), -math.log(n), dtype=torch.float32, device=device)
    return t


def _sigattn_kernel(config: tuple[int, ...] | None = None, num_splits: int | None = None) -> Callable[..., Step]:
    """The launcher itself (no argument checks, no host sync), attending over `context` cached keys; config / num_splits
    force the tile config / split-KV count (None: the launcher's own choice)."""

    def build(shape: DecodeShape, t: dict[str, torch.Tensor]) -> Step:
        from sigattn.ops.configs import decode_config
        from sigattn.ops.decode import sigmoid_attn_kvcache

        cfg = None
        if config is not None:
            base = decode_config(shape.headdim, t["q"].dtype, t["q"].device, split_bucket=True)
            cfg = replace(base, block_n=config[0], num_warps=config[1], num_stages=config[2],
                          num_stages_paged=config[3])
        return lambda: sigmoid_attn_kvcache(
            t["q"], t["k_cache"], t["v_cache"], None, None, t["seqlens"], t.get("block_table"), t["bias"],
            shape.headdim**-0.5, True, -1, 0, None, "fast", max_seqlen_k=shape.context, config=cfg,
            num_splits=num_splits,
        )

    return build


def _step_tokens(shape: DecodeShape, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_new, v_new, cache_seqlens before the step): this step's tokens are the cache's last seqlen_q entries, so
    appending them rewrites what is there and every call sees the same cache."""
    pos = torch.arange(shape.context - shape.seqlen_q, shape.context, device=t["q"].device)
    if shape.page is None:
        k_new, v_new = t["k_cache"][:, pos].clone(), t["v_cache"][:, pos].clone()
    else:
        blocks = t["block_table"][:, pos // shape.page].long()
        k_new, v_new = t["k_cache"][blocks, pos % shape.page], t["v_cache"][blocks, pos % shape.page]
    return k_new, v_new, t["seqlens"] - shape.seqlen_q


def _sigattn_step(shape: DecodeShape, t: dict[str, torch.Tensor]) -> Step:
    """The launcher as a decode step runs it: append of this step's k/v fused into the attention launch."""
    from sigattn.ops.decode import sigmoid_attn_kvcache

    k_new, v_new, before = _step_tokens(shape, t)
    return lambda: sigmoid_attn_kvcache(
        t["q"], t["k_cache"], t["v_cache"], k_new, v_new, before, t.get("block_table"), t["bias"],
        shape.headdim**-0.5, True, -1, 0, None, "fast", max_seqlen_k=shape.context,
    )


def _sigattn_api(shape: DecodeShape, t: dict[str, torch.Tensor]) -> Step:
    """The public function as a model calls it: argument checks (no device sync: CUDA cache_seqlens / block_table
    values are not read back), append of this step's k/v, attention over context keys."""
    import sigattn

    k_new, v_new, before = _step_tokens(shape, t)
    return lambda: sigattn.sigmoid_attn_with_kvcache(
        t["q"], t["k_cache"], t["v_cache"], k_new, v_new, cache_seqlens=before, bias=t["bias"],
        block_table=t.get("block_table"), causal=True,
    )


def _bhnd(shape: DecodeShape, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return t["q"].transpose(1, 2), t["k_cache"].transpose(1, 2), t["v_cache"].transpose(1, 2)


def _sdpa(backend: Any) -> Callable[..., Step]:
    """SDPA softmax on (B, H, N, D) tensors made contiguous in that layout (what SDPA kernels prefer), with
    enable_gqa=True where the backend takes it, else with the kv heads expanded to 32 (noted in the row)."""

    def build(shape: DecodeShape, t: dict[str, torch.Tensor]) -> Step | str:
        from torch.nn.attention import sdpa_kernel

        if t["q"].device.type != "cuda":
            return "unavailable: needs CUDA"
        q, k, v = (x.contiguous() for x in _bhnd(shape, t))
        with sdpa_kernel([backend]):
            try:
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                step: Step = lambda: _in(backend, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                step.note = "enable_gqa=True"  # type: ignore[attr-defined]
                return step
            except RuntimeError:
                pass
            g = shape.nheads // shape.nheads_kv
            ke, ve = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            F.scaled_dot_product_attention(q, ke, ve)
        step = lambda: _in(backend, lambda: F.scaled_dot_product_attention(q, ke, ve))
        step.note = f"kv heads expanded x{g} (no enable_gqa kernel)"  # type: ignore[attr-defined]
        return step

    return build


def _in(backend: Any, fn: Step) -> Any:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return fn()


def _naive(shape: DecodeShape, t: dict[str, torch.Tensor]) -> Step:
    """Eager sigmoid in the inputs' dtype, GQA by a (kv head, group) view: no expanded K/V."""
    b, sq, hq, d = t["q"].shape
    hkv, g = shape.nheads_kv, hq // shape.nheads_kv
    q = t["q"].view(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    k, v = t["k_cache"].transpose(1, 2), t["v_cache"].transpose(1, 2)  # [b, hkv, n, d] views
    bias = -math.log(shape.context)
    return lambda: torch.sigmoid(q @ k.transpose(-1, -2) * d**-0.5 + bias) @ v


def _reference_out(shape: DecodeShape, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 eager result, one sequence at a time (paged caches gathered), for the error column."""
    hq, d = shape.nheads, shape.headdim
    hkv, g, sq = shape.nheads_kv, hq // shape.nheads_kv, shape.seqlen_q
    pos = torch.arange(shape.context, device=t["q"].device)
    outs = []
    for b in range(shape.batch):
        if shape.page is None:
            k, v = t["k_cache"][b], t["v_cache"][b]
        else:
            blocks = t["block_table"][b, pos // shape.page].long()
            k, v = t["k_cache"][blocks, pos % shape.page], t["v_cache"][blocks, pos % shape.page]
        q = t["q"][b].float().view(sq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * sq, d)
        k, v = k.transpose(0, 1).float(), v.transpose(0, 1).float()  # [hkv, n, d]
        o = torch.sigmoid(q @ k.transpose(-1, -2) * d**-0.5 - math.log(shape.context)) @ v  # [hkv, g*sq, d]
        outs.append(o.view(hkv, g, sq, d).permute(2, 0, 1, 3).reshape(sq, hq, d))
    return torch.stack(outs)


def providers(layout_paged: bool) -> dict[str, Callable[..., Any]]:
    from torch.nn.attention import SDPBackend

    out: dict[str, Callable[..., Any]] = {"sigattn": _sigattn_kernel(), "sigattn-step": _sigattn_step,
                                          "sigattn-api": _sigattn_api}
    if not layout_paged:
        out |= {"sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
                "naive-sigmoid": _naive}
    return out


def copy_gbps(device: torch.device, nbytes: int, warmup_ms: float | None, rep_ms: float | None) -> float:
    """Device-to-device copy bandwidth, bytes read + written, of an nbytes buffer."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, warmup_ms, rep_ms).ms
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    copy = copy_gbps(device, args.copy_mib * 2**20, args.warmup, args.rep)
    print(f"device copy: {copy:.0f} GB/s (read + write, {args.copy_mib} MiB)", flush=True)
    layouts = [None] + [int(p) for p in args.pages.split(",") if p]
    rows: list[dict[str, Any]] = []
    for batch in _ints(args.batches):
        for context in _ints(args.contexts):
            for page in layouts:
                shape = DecodeShape(batch, context, args.nheads, args.nheads_kv, args.headdim, args.seqlen_q, page)
                rows += _run_shape(shape, dtype, device, copy, args)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    meta = {"copy_gbps": copy, "copy_mib": args.copy_mib, "dtype": args.dtype,
            "env": report.environment(device), "args": vars(args)}
    return rows, meta


def _run_shape(shape: DecodeShape, dtype: torch.dtype, device: torch.device, copy: float,
               args: argparse.Namespace) -> list[dict[str, Any]]:
    t = _inputs(shape, dtype, device)
    nbytes = shape.nbytes(dtype.itemsize)
    ref = _reference_out(shape, t)
    builders = providers(shape.page is not None)
    if args.providers:
        builders = {n: b for n, b in builders.items() if n in args.providers.split(",")}
    if args.sweep:
        builders |= {f"sigattn{list(c)}": _sigattn_kernel(c) for c in SWEEP}
    if args.splits:
        builders |= {f"sigattn-splits{n}": _sigattn_kernel(num_splits=n) for n in _ints(args.splits)}
    rows = []
    for name, build in builders.items():
        row: dict[str, Any] = asdict(shape) | {"layout": shape.layout, "provider": name, "ms": None, "gbps": None,
                                               "pct_copy": None, "max_err": None, "note": ""}
        try:
            step = build(shape, t)
            if isinstance(step, str):
                row["note"] = step
                rows.append(row)
                continue
            row["note"] = getattr(step, "note", "")
            out = step()
            if name.startswith("sigattn"):
                row["max_err"] = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            ms = measure(step, device, args.warmup, args.rep).ms
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(ms=ms, gbps=gbps, pct_copy=100 * gbps / copy)
        except Exception as e:  # a provider that fails at a shape gives a row saying why
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(_line(row), flush=True)
    for r in rows:
        if r["provider"] == "sigattn":
            r["note"] = (r["note"] + f" splits={_splits(shape, t)}").strip()
    return rows


def _splits(shape: DecodeShape, t: dict[str, torch.Tensor]) -> str:
    """The split-KV count and (block_n, warps, stages, paged stages) the launcher picks at this shape."""
    from sigattn.ops.decode import default_config, launch_plan

    dev = t["q"].device
    cfg = default_config(shape.batch, shape.seqlen_q, shape.nheads, shape.nheads_kv, shape.headdim, t["q"].dtype, dev)
    n = launch_plan(shape.batch, shape.seqlen_q, shape.nheads, shape.nheads_kv, shape.context, cfg, dev)[2]
    return f"{n} cfg={[cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.num_stages_paged]}"


def _line(row: dict[str, Any]) -> str:
    ms = "-" if row["ms"] is None else f"{row['ms'] * 1e3:9.1f} us {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}%"
    return f"B={row['batch']:<3} ctx={row['context']:<6} {row['layout']:<10} {row['provider']:<24} {ms} {row['note']}"


def _ints(text: str) -> list[int]:
    out = []
    for p in text.replace(" ", ",").split(","):
        if p:
            out.append(int(float(p[:-1]) * 1024) if p[-1] in "kK" else int(p))
    return out


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Per shape and layout: each provider's µs, GB/s and % of copy bandwidth; ratio = baseline time / time."""
    env = meta["env"]
    head = (f"Decode, {meta['dtype']}, {env.get('gpu') or env.get('cpu')} (driver {env.get('driver')}), torch "
            f"{env['torch']}, triton {env['triton']}, cuDNN {env.get('cudnn')}; device copy "
            f"{meta['copy_gbps']:.0f} GB/s (read + write, {meta['copy_mib']} MiB). Bytes = K + V + q + out once.")
    cols = ["batch", "context", "layout", "provider", "µs", "GB/s", "% of copy", "vs sdpa-flash", "rel. err", "note"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base = {(r["batch"], r["context"]): r["ms"] for r in rows if r["provider"] == BASELINE and r["ms"]}
    for r in rows:
        b = base.get((r["batch"], r["context"]))
        cells = [str(r["batch"]), str(r["context"]), r["layout"], r["provider"],
                 "-" if r["ms"] is None else f"{r['ms'] * 1e3:.1f}",
                 "-" if r["gbps"] is None else f"{r['gbps']:.0f}",
                 "-" if r["pct_copy"] is None else f"{r['pct_copy']:.1f}",
                 f"{b / r['ms']:.2f}" if b and r["ms"] else "-",
                 "-" if r["max_err"] is None else f"{r['max_err']:.1e}", r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["gbps"] is not None and not r["provider"].startswith("sigattn[")]
    groups = list(dict.fromkeys((r["batch"], r["context"]) for r in ok))
    series = list(dict.fromkeys((r["provider"], r["layout"]) for r in ok))
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (prov, layout) in enumerate(series):
        xs, ys = [], []
        for j, g in enumerate(groups):
            hit = [r for r in ok if (r["batch"], r["context"]) == g and (r["provider"], r["layout"]) == (prov, layout)]
            if hit:
                xs.append(j + i * width)
                ys.append(hit[0]["gbps"])
        ax.bar(xs, ys, width, label=f"{prov} ({layout})")
    ax.axhline(meta["copy_gbps"], color="k", ls="--", lw=1, label="device copy")
    ax.axhline(0.85 * meta["copy_gbps"], color="gray", ls=":", lw=1, label="85% of copy")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"B={b}\nctx={c}" for b, c in groups])
    ax.set_ylabel("GB/s (K+V+q+out bytes / time)")
    env = meta["env"]
    ax.set_title(f"sigmoid decode, {meta['dtype']}, {env.get('gpu') or env.get('cpu')}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ptxas_report(
    config: tuple[int, ...], paged: bool, headdim: int = 128, block_m: int = 16, split: bool = True
) -> str:
    """Registers, spills, shared memory and SASS op counts of the decode kernel compiled for sm_90 on this machine
    (no GPU: Triton ships ptxas and cuobjdump). bf16, fast sigmoid; pointers and the strides of a B=8, 32k-token
    cache marked 16-divisible as a real launch specialises them: without that, Triton cannot prove 16-byte
    alignment and emits neither cp.async nor a pipelined loop (bench/kernel_probe.py --ptxas compiles that way).
    split: the form with the fused split sum (ticket atomics, last program sums)."""
    import os
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sigattn.ops.decode import _sigmoid_attn_decode_kernel as kernel

    block_n, warps, stages, stages_paged = config
    hkv, d = 8, headdim
    rows = (64 if paged else 32768) * hkv * d
    ints = dict(stride_qb=32 * d, stride_qn=32 * d, stride_qh=d, stride_kb=rows, stride_kn=hkv * d, stride_kh=d,
                stride_vb=rows, stride_vn=hkv * d, stride_vh=d, stride_nb=hkv * d, stride_nn=hkv * d, stride_nh=d,
                stride_vnb=hkv * d, stride_vnn=hkv * d, stride_vnh=d, stride_ob=32 * d, stride_on=32 * d,
                stride_oh=d, stride_ws=8 * 32 * d, stride_wb=32 * d, stride_wn=32 * d, stride_tb=512, stride_sb=32,
                nheads_kv=hkv, group=4, seqlen_q=1, seqlen_new=1, page_size=64 if paged else 1, num_splits=4,
                num_m_blocks=1, win_left=40000, win_right=0, capacity=32768, num_blocks=4096 if paged else 8)
    consts: dict[str, Any] = dict(PAGED=paged, HAS_ALIBI=False, SIGMOID=1, SPLIT=split, HEAD_DIM=d,
                                  BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_n, NEW_N=16,
                                  DOT_PRECISION="ieee")
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif ints.get(name) == 1:  # Triton specialises ints equal to 1 into constants
            sig[name], consts[name] = "constexpr", 1
        elif name in ("scale", "zf"):
            sig[name] = "fp32"
        elif name[0].isupper():
            sig[name] = {"Bias": "*fp32", "Slopes": "*fp32", "Ws": "*fp32", "Counters": "*i32",
                         "CacheSeqlens": "*i32", "BlockTable": "*i32"}.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages_paged if paged else stages})
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "sigattn_decode_probe.cubin")
    with open(path, "wb") as fh:
        fh.write(k.asm["cubin"])
    res = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
    regs = " ".join(w for line in res.splitlines() if "REG" in line for w in line.split() if w[:4] in ("REG:", "STAC"))
    sass = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    ops = {op: sass.count(op) for op in ("HMMA", "HGMMA", "LDGSTS", "STL", "LDL", "ATOMG", "BAR.SYNC")}
    buffers = k.asm["ttgir"].count("async_copy_global_to_local")
    return (f"decode d={d} {'paged' if paged else 'contiguous'} {config} block_m={block_m} split={split}: "
            f"smem={k.metadata.shared} "
            f"{regs} {ops} async copies in TTGIR={buffers}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--out", default="bench_out/decode", help="output directory")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="4k,32k", help="keys per sequence (k suffix = 1024)")
    parser.add_argument("--pages", default="256", help="paged layouts to add (comma list; '' for none)")
    parser.add_argument("--nheads", type=int, default=32)
    parser.add_argument("--nheads-kv", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--seqlen-q", type=int, default=1)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--providers", default="", help="comma list (default: all)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel with each config of SWEEP")
    parser.add_argument("--splits", default="", help="also time the kernel at each forced split-KV count (comma list)")
    parser.add_argument("--ptxas", action="store_true",
                        help="no timing: sm_90 resource reports of the SWEEP configs (works without a GPU)")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth buffer")
    parser.add_argument("--warmup", type=float, default=None, help="ms (default: timing's device default)")
    parser.add_argument("--rep", type=float, default=None, help="ms (default: timing's device default)")


def main(args: argparse.Namespace) -> int:
    if args.ptxas:
        for config in SWEEP:
            for paged in (False, True):
                for split in (False, True):
                    print(ptxas_report(config, paged, args.headdim, split=split), flush=True)
        return 0
    rows, meta = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    table = markdown(rows, meta)
    (out / "decode.md").write_text(table)
    print(table, flush=True)
    try:
        plot(rows, meta, out / "decode.png")
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    return 0 if any(r["ms"] is not None for r in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sigattn.bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
