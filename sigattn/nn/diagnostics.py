"""Attention diagnostics: hooks that record, per SigmoidAttention layer, output and q/k norms, sampled row sums and
entropy of the attention weights, and gradient norms."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sigattn.nn.attention import SigmoidAttention
from sigattn.ops.reference import relative_positions

__all__ = [
    "AttentionDiagnostics",
    "attention_weights",
    "format_table",
    "plot_summary",
    "projected_qkv",
    "sample_rows",
]

# Columns of `format_table`, in order: (record key, header, format).
TABLE_COLUMNS = (
    ("layer", "layer", "{}"),
    ("seqlen", "n", "{:g}"),
    ("bias", "bias", "{:.3g}"),
    ("out_norm", "out_norm", "{:.4g}"),
    ("row_sum_mean", "row_sum", "{:.4g}"),
    ("entropy_mean", "entropy", "{:.3f}"),
    ("entropy_uniform", "log(keys)", "{:.3f}"),
    ("q_norm", "q_norm", "{:.3g}"),
    ("k_norm", "k_norm", "{:.3g}"),
    ("grad_out_norm", "grad_out", "{:.3g}"),
    ("param_grad_norm", "grad_params", "{:.3g}"),
)


def sample_rows(seqlen: int, count: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 query rows to sample: ``count`` evenly spaced rows of ``range(seqlen)``, first and last included.

    None, or count >= seqlen, means every row. Deterministic, so sampling never draws from the RNG.
    """
    if count is None or count >= seqlen:
        return torch.arange(seqlen, device=device)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if count == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    # Built on the host: torch.unique on a GPU tensor would sync the device.
    rows = sorted({round(i * (seqlen - 1) / (count - 1)) for i in range(count)})
    return torch.tensor(rows, dtype=torch.long, device=device)


def projected_qkv(module: SigmoidAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v that ``module.forward(x)`` (no KV cache) attends with: post QK-norm, post RoPE.

    x: (batch, seqlen, dim). Returns q (batch, seqlen, nheads, head_dim), k and v (batch, seqlen, nheads_kv,
    head_dim), through the module's own ``project`` (projections, norms, rotary); test_diagnostics checks that
    ``o_proj(attention_weights @ v)`` reproduces the module output.
    """
    return module.project(x)


# Score elements per chunk of the sampled-row statistics: 2^24 fp32 = 64 MiB per live [heads, rows, seqlen] tensor,
# so 64 rows of a 128k-token, 32-head layer are done a few heads at a time.
CHUNK_ELEMENTS = 2**24


def _scores(
    module: SigmoidAttention, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logit parts of query ``rows`` and query ``heads``: (content ``scale * q.k``, content + bias - alibi, visible).

    q (batch, seqlen, nheads, d), k (batch, seqlen, nheads_kv, d). Returns two (batch, len(heads), len(rows),
    seqlen) tensors in float32 (float64 for float64 q) and a bool (len(rows), seqlen). Softmax gets no bias.
    """
    seqlen = k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = module.nheads // module.nheads_kv
    qr = q[:, rows][:, :, heads].to(cdt).transpose(1, 2)  # [batch, heads, rows, d]
    kt = k[:, :, heads // groups].to(cdt).permute(0, 2, 3, 1)  # [batch, heads, d, seqlen]
    content = torch.matmul(qr, kt) * module.scale  # [batch, heads, rows, seqlen]
    rel = relative_positions(seqlen, seqlen, rows=rows)  # [rows, seqlen]
    logits = content
    if module.attention == "sigmoid":
        b = module.attn_bias
        logits = logits + (b.detach()[heads].to(cdt).reshape(1, -1, 1, 1) if isinstance(b, torch.Tensor) else b)
    if module.alibi_slopes is not None:
        logits = logits - module.alibi_slopes[heads].to(cdt)[None, :, None, None] * rel.abs().to(cdt)
    visible = rel <= 0 if module.causal else torch.ones_like(rel, dtype=torch.bool)
    return content, logits, visible


def _weights(logits: torch.Tensor, visible: torch.Tensor, attention: str) -> torch.Tensor:
    if attention == "softmax":
        return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.where(visible, torch.sigmoid(logits), torch.zeros((), dtype=logits.dtype, device=logits.device))


def attention_weights(
    module: SigmoidAttention,
    x: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    *,
    qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights of ``module`` on x for the query ``rows`` only: (batch, len(heads), len(rows), seqlen).

    Sigmoid: ``sigmoid(scale * q k^T + bias - alibi)``, unnormalised, masked entries exactly 0 (as the op).
    Softmax (``module.attention == "softmax"``): the softmax over the visible keys (bias ignored, as the module).
    x: (batch, seqlen, dim), or qk: the (q, k) of ``projected_qkv`` to skip recomputing them. rows: int64
    query indices; None means all rows (materialises N x N: for small n only). heads: int64 query heads; None
    means all. Self-attention without a KV cache: causal masks key j > i. Math in float32 (float64 for float64
    inputs), outside autograd.
    """
    with torch.no_grad():
        if qk is None:
            if x is None:
                raise ValueError("attention_weights needs x or qk")
            q, k, _ = projected_qkv(module, x)
        else:
            q, k = qk
        if rows is None:
            rows = torch.arange(q.shape[1], device=q.device)
        if heads is None:
            heads = torch.arange(module.nheads, device=q.device)
        _, logits, visible = _scores(module, q, k, rows, heads)
        return _weights(logits, visible, module.attention)


def _sampled_stats(
    module: SigmoidAttention, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Row sums, row entropy (nats, of each row normalised to sum 1) and content-logit max over the sampled rows.

    Done one batch element and a few heads at a time (at most CHUNK_ELEMENTS scores live); the means are
    over every (batch, head, row).
    """
    seqlen = k.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(1, len(rows) * seqlen))
    zero = torch.zeros((), dtype=torch.float64, device=q.device)
    total_sum, total_ent, count = zero, zero, 0
    lo, hi, absmax = zero + math.inf, zero - math.inf, zero
    for i in range(q.shape[0]):
        for h0 in range(0, module.nheads, step):
            heads = torch.arange(h0, min(h0 + step, module.nheads), device=q.device)
            content, logits, visible = _scores(module, q[i : i + 1], k[i : i + 1], rows, heads)
            w = _weights(logits, visible, module.attention)
            row_sum = w.sum(-1)  # [1, heads, rows]
            p = w / row_sum.clamp_min(torch.finfo(w.dtype).tiny)[..., None]
            entropy = -torch.special.xlogy(p, p).sum(-1)  # [1, heads, rows]
            total_sum = total_sum + row_sum.double().sum()
            total_ent = total_ent + entropy.double().sum()
            count += row_sum.numel()
            lo, hi = torch.minimum(lo, row_sum.min().double()), torch.maximum(hi, row_sum.max().double())
            absmax = torch.maximum(absmax, content.abs().max().double())
    visible_keys = rows + 1 if module.causal else torch.full_like(rows, seqlen)
    return {
        "row_sum_mean": total_sum / count,
        "row_sum_min": lo,
        "row_sum_max": hi,
        "entropy_mean": total_ent / count,
        "entropy_uniform": visible_keys.double().log().mean(),
        "keys_mean": visible_keys.double().mean(),
        "logit_absmax": absmax,
    }


def _token_norm(t: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (and heads, for a 4-d tensor) of the L2 norm of the last dim, as float32."""
    return t.detach().float().norm(dim=-1).mean()


class AttentionDiagnostics:
    """Context manager recording per-layer attention statistics of every SigmoidAttention inside ``model``.

    Usage::

        with AttentionDiagnostics(model, sample_rows=64) as diag:
            loss = model(x).square().mean()
            loss.backward()
        diag.records      # one dict per layer per forward call (floats; None where not measured)
        diag.summary()    # one dict per layer, averaged over its calls

    Each record has:
        layer, call (the layer's call index), attention, seqlen, bias (mean over heads; None for softmax),
            cached (a KV-cache call), sampled_rows;
        out_norm: mean per-token L2 norm of the attention output before o_proj (heads concatenated);
        module_out_norm: the same for the module output (after o_proj);
        q_norm, k_norm: mean per-head, per-token L2 norm of q and k as attended (after QK norm and RoPE);
        row_sum_mean/min/max, entropy_mean (nats, of each row normalised to sum 1), entropy_uniform (mean
            log of the visible key count: a uniform row's entropy), keys_mean (mean visible key count: n, or
            ~n/2 causal; row sums start near keys_mean/2 at b = 0 and keys_mean/n at b = -log n), logit_absmax
            (max |scale q.k|, the content logits without bias, ALiBi or mask):
            over ``sample_rows`` evenly spaced query rows of every batch element and head, recomputed
            from the layer's q and k with its bias, mask, ALiBi and RoPE (``attention_weights``), one
            batch element and a few heads at a time (at most CHUNK_ELEMENTS = 2^24 scores live), never
            N x N for all rows. None for calls with a KV cache (the keys live in the cache);
        grad_out_norm: Frobenius norm of d loss / d (attention output before o_proj), set by backward;
        param_grad_norm: Frobenius norm of the gradients of the layer's parameters, set by backward. A
            parameter's gradient arrives once per backward summed over all calls of the layer, so it is
            recorded on the layer's latest record.

    sample_rows: query rows per layer and call (default 64); None means all rows. Statistics are kept as
    device tensors during the run (no host sync in forward or backward) and turned into floats when
    ``records`` is read.
    Hooks are removed on exit; the model is not otherwise changed.
    """

    def __init__(self, model: nn.Module, sample_rows: int | None = 64) -> None:
        if sample_rows is not None and (isinstance(sample_rows, bool) or not isinstance(sample_rows, int)
                                        or sample_rows < 0):
            raise ValueError(f"sample_rows must be an int >= 0 or None; got {sample_rows!r}")
        self.model = model
        self.sample_rows = sample_rows
        self.layers: dict[str, SigmoidAttention] = {
            name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, SigmoidAttention)
        }
        self._records: list[dict[str, Any]] = []
        self._latest: dict[str, dict[str, Any]] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> AttentionDiagnostics:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.o_proj.register_forward_pre_hook(self._o_proj_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))
            for p in module.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._param_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (called on exit); the records stay."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget the records (hooks stay)."""
        self._records.clear()
        self._latest.clear()
        self._calls.clear()

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: SigmoidAttention, args: tuple, kwargs: dict) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            b = module.attn_bias
            record: dict[str, Any] = {
                "layer": name, "call": call, "attention": module.attention,
                "bias": None if module.attention == "softmax"  # the module ignores its bias there
                else b.detach().float().mean() if isinstance(b, torch.Tensor) else float(b),
                "cached": kwargs.get("kv_cache") is not None, "_open": True,
            }
            self._records.append(record)
            self._latest[name] = record

        return hook

    def _o_proj_hook(self, name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple) -> None:
            record = self._latest.get(name)
            if record is None or not record["_open"]:  # o_proj called outside the attention forward
                return
            out = args[0]  # [batch, seqlen, nheads * head_dim]: the attention output before o_proj
            record["out_norm"] = _token_norm(out)
            if out.requires_grad:
                out.register_hook(lambda g: record.__setitem__("grad_out_norm", g.detach().float().norm()))

        return hook

    def _param_hook(self, name: str) -> Callable[..., None]:
        def hook(grad: torch.Tensor) -> None:
            record = self._latest.get(name)
            if record is not None:
                sq = grad.detach().float().square().sum()
                record["_param_grad_sq"] = record.get("_param_grad_sq", 0.0) + sq

        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: SigmoidAttention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            record = self._latest[name]
            record["_open"] = False
            x = args[0] if args else kwargs["x"]
            record["seqlen"] = x.shape[1]
            record["module_out_norm"] = _token_norm(output)
            with torch.no_grad():
                q, k, _ = projected_qkv(module, x.detach())
                record["q_norm"], record["k_norm"] = _token_norm(q), _token_norm(k)
                if record["cached"]:
                    return
                rows = sample_rows(x.shape[1], self.sample_rows, x.device)
                record["sampled_rows"] = int(rows.numel())
                if rows.numel() > 0:
                    record.update(_sampled_stats(module, q, k, rows))

        return hook

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per layer per call, floats (None where a statistic was not measured); see the class doc."""
        keys = (
            "out_norm", "module_out_norm", "q_norm", "k_norm", "row_sum_mean", "row_sum_min", "row_sum_max",
            "entropy_mean", "entropy_uniform", "keys_mean", "logit_absmax", "grad_out_norm", "param_grad_norm",
        )
        out = []
        for r in self._records:
            rec = {k: v for k, v in r.items() if not k.startswith("_")}
            if "_param_grad_sq" in r:
                rec["param_grad_norm"] = float(torch.as_tensor(r["_param_grad_sq"]).sqrt())
            rec["bias"] = None if rec["bias"] is None else float(rec["bias"])
            for key in keys:
                val = rec.get(key)
                rec[key] = None if val is None else float(val)
            rec.setdefault("seqlen", None)
            rec.setdefault("sampled_rows", None)
            out.append(rec)
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One dict per layer (model order): each numeric statistic averaged over the layer's calls, plus ``calls``."""
        by_layer: dict[str, list[dict[str, Any]]] = {}
        for rec in self.records:
            by_layer.setdefault(rec["layer"], []).append(rec)
        rows = []
        for name in self.layers:
            recs = by_layer.get(name)
            if not recs:
                continue
            row: dict[str, Any] = {"layer": name, "calls": len(recs), "attention": recs[-1]["attention"]}
            for key, val in recs[-1].items():
                if key in row or key in ("call", "cached") or not isinstance(val, (int, float, type(None))):
                    continue
                vals = [r[key] for r in recs if r.get(key) is not None]
                row[key] = sum(vals) / len(vals) if vals else None
            rows.append(row)
        return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of ``summary()`` (or ``records``) rows; missing values print as '-'."""
    cells = [[header for _, header, _ in TABLE_COLUMNS]]
    for r in rows:
        line = []
        for key, _, fmt in TABLE_COLUMNS:
            val = r.get(key)
            line.append("-" if val is None else fmt.format(val))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def plot_summary(runs: dict[str, list[dict[str, Any]]], path: str) -> None:
    """PNG of per-layer statistics, one line per run (label -> ``summary()`` rows): output norm, row sums
    (dotted: the b = 0 and b = -log n starting levels, keys/2 and keys/n), entropy (dotted: a uniform row's),
    q/k norms, content logits and gradient norms (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("out_norm", "attention output norm (before o_proj)", True),
        ("row_sum_mean", "row sum (sampled rows)", True),
        ("entropy_mean", "row entropy (nats)", False),
        ("q_norm", "q norm (solid), k norm (dashed)", False),
        ("logit_absmax", "max |scale q.k| (sampled rows)", False),
        ("grad_out_norm", "grad norm: attn output (solid), params (dashed)", True),
    )
    fig, grid = plt.subplots(2, 3, figsize=(13.5, 7.0))
    axes = grid.ravel()
    levels: set[tuple[float, float, float]] = set()  # (b = 0 row sum, b = -log n row sum, uniform entropy)
    for label, rows in runs.items():
        xs = list(range(len(rows)))
        for r in rows:
            if r.get("keys_mean") and r.get("seqlen"):
                levels.add((r["keys_mean"] / 2, r["keys_mean"] / r["seqlen"], r["entropy_uniform"]))
        for ax, (key, title, _) in zip(axes, panels):
            ys = [math.nan if r.get(key) is None else r[key] for r in rows]
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            second = {"q_norm": "k_norm", "grad_out_norm": "param_grad_norm"}.get(key)
            if second:
                ys2 = [math.nan if r.get(second) is None else r[second] for r in rows]
                ax.plot(xs, ys2, marker="s", linestyle="--", color=line.get_color())
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("layer")
            ax.set_xticks(xs, [r["layer"] for r in rows], fontsize=7)
    for half, one, entropy in levels:
        axes[1].axhline(half, color="gray", linestyle=":", linewidth=1)
        axes[1].axhline(one, color="gray", linestyle=":", linewidth=1)
        axes[2].axhline(entropy, color="gray", linestyle=":", linewidth=1)
    for ax, (_, _, log) in zip(axes, panels):
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
