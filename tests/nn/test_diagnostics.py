"""AttentionDiagnostics: sampled row statistics against the full attention matrix, norms, gradients and hooks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sigattn.nn import KVCache, SigmoidAttention, TransformerBlock
from sigattn.nn.diagnostics import (
    AttentionDiagnostics,
    attention_weights,
    format_table,
    plot_summary,
    projected_qkv,
    sample_rows,
)

DIM, NHEADS = 32, 4

CONFIGS = {
    "plain": {},
    "rope-qknorm-causal": {"positional": "rope", "qk_norm": "rms", "causal": True},
    "alibi-gqa-learnable": {"positional": "alibi", "nheads_kv": 2, "learnable_bias": True, "qk_norm": "layer"},
    "softmax-rope-causal": {"attention": "softmax", "positional": "rope", "causal": True},
    "softmax-alibi": {"attention": "softmax", "positional": "alibi"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_reproduce_module_output(name: str) -> None:
    """o_proj(weights @ v) from the recomputed q/k/v equals the module's own output: the recompute follows forward."""
    m = SigmoidAttention(DIM, NHEADS, train_seqlen=64, dtype=torch.float64, **CONFIGS[name])
    if isinstance(m.attn_bias, nn.Parameter):
        with torch.no_grad():
            m.attn_bias.copy_(torch.linspace(-4.0, -1.0, NHEADS, dtype=torch.float64))
    x = torch.randn(2, 19, DIM, dtype=torch.float64)
    w = attention_weights(m, x)  # [2, nheads, 19, 19]
    _, _, v = projected_qkv(m, x)
    v = v.repeat_interleave(m.nheads // m.nheads_kv, dim=2).transpose(1, 2)  # [2, nheads, 19, d]
    out = m.o_proj((w @ v).transpose(1, 2).reshape(2, 19, -1))
    torch.testing.assert_close(out, m(x), atol=1e-12, rtol=1e-12)


def _direct_weights(m: SigmoidAttention, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(q k^T / sqrt(d) + b) written out for a plain module: (batch, nheads, n, n)."""
    b, n, _ = x.shape
    q = (x @ m.q_proj.weight.T).view(b, n, m.nheads, m.head_dim).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(b, n, m.nheads, m.head_dim).transpose(1, 2)
    return torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(m.head_dim) + m.attn_bias)


@pytest.mark.parametrize("count", [5, None])
def test_sampled_row_stats_match_full_matrix(count: int | None) -> None:
    n = 17
    m = SigmoidAttention(DIM, NHEADS, train_seqlen=n, dtype=torch.float64)
    x = torch.randn(3, n, DIM, dtype=torch.float64)
    with AttentionDiagnostics(m, sample_rows=count) as diag:
        m(x)
    (rec,) = diag.records
    rows = sample_rows(n, count)
    assert rec["sampled_rows"] == len(rows) == (n if count is None else count)
    w = _direct_weights(m, x)[:, :, rows]  # [3, nheads, rows, n]
    sums = w.sum(-1)
    p = w / sums[..., None]
    entropy = -(p * p.log()).sum(-1)
    assert rec["row_sum_mean"] == pytest.approx(sums.mean().item(), rel=1e-6)
    assert rec["row_sum_min"] == pytest.approx(sums.min().item(), rel=1e-6)
    assert rec["row_sum_max"] == pytest.approx(sums.max().item(), rel=1e-6)
    assert rec["entropy_mean"] == pytest.approx(entropy.mean().item(), rel=1e-6)
    assert rec["entropy_uniform"] == pytest.approx(math.log(n), rel=1e-6)
    scores = w.logit() - m.attn_bias
    assert rec["logit_absmax"] == pytest.approx(scores.abs().max().item(), rel=1e-5)


def test_sample_rows_even_and_deterministic() -> None:
    state = torch.random.get_rng_state()
    rows = sample_rows(1000, 64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(rows) == 64 and rows[0] == 0 and rows[-1] == 999
    assert torch.equal(sample_rows(10, 64), torch.arange(10))
    assert sample_rows(10, 0).numel() == 0


def test_causal_rows_see_prefix_only() -> None:
    m = SigmoidAttention(DIM, NHEADS, causal=True, train_seqlen=8)
    x = torch.randn(1, 8, DIM)
    rows = torch.tensor([0, 3, 7])
    w = attention_weights(m, x, rows)
    assert w.shape == (1, NHEADS, 3, 8)
    for i, r in enumerate(rows.tolist()):
        assert (w[:, :, i, r + 1 :] == 0).all() and (w[:, :, i, : r + 1] > 0).all()
    with AttentionDiagnostics(m, sample_rows=None) as diag:
        m(x)
    assert diag.records[0]["entropy_uniform"] == pytest.approx(sum(math.log(i + 1) for i in range(8)) / 8, rel=1e-6)


def _model(bias_init: float | None, n: int, layers: int = 2) -> nn.Sequential:
    return nn.Sequential(*[
        TransformerBlock(64, 4, train_seqlen=n, bias_init=bias_init, layer_idx=i, positional="rope")
        for i in range(layers)
    ])


@pytest.mark.parametrize(("bias_init", "lo", "hi"), [(0.0, 0.95 * 128, 1.05 * 128), (None, 0.9, 1.3)])
def test_row_sums_at_init(bias_init: float | None, lo: float, hi: float) -> None:
    """Random inputs at init: row sums ~ n/2 at b = 0 and ~ 1 at b = -log n (n = 256); entropy near log n."""
    n = 256
    model = _model(bias_init, n)
    with AttentionDiagnostics(model, sample_rows=32) as diag:
        model(torch.randn(2, n, 64))
    for row in diag.summary():
        assert lo < row["row_sum_mean"] < hi
        assert 0.95 * math.log(n) < row["entropy_mean"] <= math.log(n) + 1e-4


def test_norms_and_gradients() -> None:
    n = 33
    model = _model(None, n)
    x = torch.randn(2, n, 64)
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def capture(name: str, attn: SigmoidAttention) -> None:
        def o_proj_in(_: nn.Module, args: tuple) -> None:
            args[0].retain_grad()
            seen[name]["attn_out"] = args[0]

        def attn_in(_: nn.Module, args: tuple) -> None:
            seen[name] = {"x": args[0].detach()}

        attn.register_forward_pre_hook(attn_in)
        attn.o_proj.register_forward_pre_hook(o_proj_in)

    for i, block in enumerate(model):
        capture(f"{i}.attn", block.attn)
    with AttentionDiagnostics(model) as diag:
        out = model(x)
        out.square().mean().backward()
    records = diag.records
    assert [r["layer"] for r in records] == ["0.attn", "1.attn"]
    for rec, block in zip(records, model):
        got = seen[rec["layer"]]
        assert rec["out_norm"] == pytest.approx(got["attn_out"].norm(dim=-1).mean().item(), rel=1e-5)
        q, k, _ = projected_qkv(block.attn, got["x"])
        assert rec["q_norm"] == pytest.approx(q.norm(dim=-1).mean().item(), rel=1e-5)
        assert rec["k_norm"] == pytest.approx(k.norm(dim=-1).mean().item(), rel=1e-5)
        assert rec["grad_out_norm"] > 0 and rec["param_grad_norm"] > 0
        assert rec["grad_out_norm"] == pytest.approx(got["attn_out"].grad.norm().item(), rel=1e-5)
        grads = torch.cat([p.grad.flatten() for p in block.attn.parameters()])
        assert rec["param_grad_norm"] == pytest.approx(grads.norm().item(), rel=1e-5)


def test_calls_summary_and_hook_removal() -> None:
    model = _model(None, 16)
    hooks_before = [len(b.attn._forward_hooks) + len(b.attn._forward_pre_hooks) for b in model]
    with AttentionDiagnostics(model, sample_rows=4) as diag:
        with torch.no_grad():
            model(torch.randn(1, 16, 64))
            model(torch.randn(1, 16, 64))
    assert [b.attn._forward_hooks or b.attn._forward_pre_hooks for b in model] == [{}, {}]
    assert [len(b.attn._forward_hooks) + len(b.attn._forward_pre_hooks) for b in model] == hooks_before
    model(torch.randn(1, 16, 64))
    records = diag.records
    assert len(records) == 4 and [r["call"] for r in records] == [0, 0, 1, 1]
    assert all(r["grad_out_norm"] is None and r["param_grad_norm"] is None for r in records)
    summary = diag.summary()
    assert [s["layer"] for s in summary] == ["0.attn", "1.attn"] and all(s["calls"] == 2 for s in summary)
    first = [r["row_sum_mean"] for r in records if r["layer"] == "0.attn"]
    assert summary[0]["row_sum_mean"] == pytest.approx(sum(first) / 2)
    table = format_table(summary)
    assert "row_sum" in table and "0.attn" in table and "-" in table  # no gradients: '-'


def test_kv_cache_call_records_norms_only() -> None:
    m = SigmoidAttention(DIM, NHEADS, positional="rope", causal=True)
    cache = KVCache(1, 1, 8, NHEADS, DIM // NHEADS)
    with AttentionDiagnostics(m) as diag:
        m(torch.randn(1, 3, DIM), kv_cache=cache)
    (rec,) = diag.records
    assert rec["cached"] and rec["row_sum_mean"] is None and rec["out_norm"] > 0 and rec["q_norm"] > 0


def test_plot_summary(tmp_path) -> None:
    model = _model(None, 16)
    with AttentionDiagnostics(model) as diag:
        model(torch.randn(1, 16, 64)).sum().backward()
    path = tmp_path / "diag.png"
    plot_summary({"run": diag.summary()}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_sample_rows() -> None:
    with pytest.raises(ValueError, match="sample_rows"):
        AttentionDiagnostics(nn.Linear(2, 2), sample_rows=-1)


def test_head_chunking_gives_the_same_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long sequences are done a few heads at a time; forcing one head per chunk changes nothing."""
    import sigattn.nn.diagnostics as diagnostics

    m = SigmoidAttention(DIM, NHEADS, nheads_kv=2, positional="alibi", causal=True, learnable_bias=True,
                         dtype=torch.float64)
    x = torch.randn(2, 20, DIM, dtype=torch.float64)
    results = []
    for elements in (diagnostics.CHUNK_ELEMENTS, 1):
        monkeypatch.setattr(diagnostics, "CHUNK_ELEMENTS", elements)
        with AttentionDiagnostics(m, sample_rows=7) as diag:
            m(x)
        results.append(diag.records[0])
    for key in ("row_sum_mean", "row_sum_min", "row_sum_max", "entropy_mean", "logit_absmax"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-12)


def test_o_proj_outside_forward_is_ignored() -> None:
    m = SigmoidAttention(DIM, NHEADS)
    with AttentionDiagnostics(m) as diag:
        m.o_proj(torch.randn(1, 2, DIM))
        m(torch.randn(1, 4, DIM))
        m.o_proj(torch.randn(1, 2, DIM) * 100)
    (rec,) = diag.records
    assert rec["out_norm"] < 50
