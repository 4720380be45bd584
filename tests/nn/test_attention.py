"""SigmoidAttention against hand-written float64 attention built from the module's own weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sigattn.nn import KVCache, SigmoidAttention

DIM, NHEADS = 32, 4
TOL = {"atol": 1e-10, "rtol": 1e-10}


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _layer(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Pairs (i, i + d/2) rotated by angle p * base^(-2i/d); positions (batch, seqlen)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[..., None, None] * theta  # [batch, seqlen, 1, d/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), dim=-1)


def manual_attention(m: SigmoidAttention, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """The module's math spelled out in float64: projections, QK norm, RoPE/ALiBi, bias, mask, sigmoid or softmax."""
    kind = kind or m.attention
    b, n, _ = x.shape
    h, hkv, d = m.nheads, m.nheads_kv, m.head_dim

    def proj(lin: torch.nn.Linear, heads: int) -> torch.Tensor:
        y = x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        return y.view(b, n, heads, d)

    q, k, v = proj(m.q_proj, h), proj(m.k_proj, hkv), proj(m.v_proj, hkv)
    if m.q_norm is not None:
        norm = _rms if isinstance(m.q_norm, torch.nn.RMSNorm) else _layer
        q, k = norm(q, m.q_norm), norm(k, m.k_norm)
    pos = torch.arange(n).expand(b, n)
    if m.positional == "rope":
        q, k = _rope(q, pos, m.rope.base), _rope(k, pos, m.rope.base)
    group = h // hkv
    k = torch.stack([k[:, :, i // group] for i in range(h)], dim=2)
    v = torch.stack([v[:, :, i // group] for i in range(h)], dim=2)
    s = m.scale * torch.einsum("bqhd,bkhd->bhqk", q, k)  # [b, h, n, n]
    rel = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).double()
    if m.positional == "alibi":
        s = s - m.alibi_slopes.double()[:, None, None] * rel.abs()
    visible = rel >= 0 if m.causal else torch.ones(n, n, dtype=torch.bool)
    if kind == "sigmoid":
        bias = m.attn_bias if isinstance(m.attn_bias, float) else m.attn_bias.double()[:, None, None]
        p = torch.sigmoid(s + bias) * visible
    else:
        p = torch.softmax(s.masked_fill(~visible, -math.inf), dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, h * d)
    return o @ m.o_proj.weight.T + (m.o_proj.bias if m.o_proj.bias is not None else 0)


@pytest.mark.parametrize("attention", ["sigmoid", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positional", [None, "rope", "alibi"])
@pytest.mark.parametrize("qk_norm", [None, "rms", "layer"])
def test_matches_manual_formula(attention: str, causal: bool, positional: str | None, qk_norm: str | None) -> None:
    m = SigmoidAttention(
        DIM, NHEADS, nheads_kv=2, attention=attention, causal=causal, positional=positional, qk_norm=qk_norm,
        qkv_bias=True, out_bias=True, train_seqlen=64, dtype=torch.float64,
    )
    if qk_norm is not None:  # non-trivial norm weights, so a swapped or skipped norm shows
        for p in (*m.q_norm.parameters(), *m.k_norm.parameters()):
            p.data.normal_()
    x = torch.randn(2, 17, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x), manual_attention(m, x), **TOL)


@pytest.mark.parametrize("nheads_kv", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_weights(nheads_kv: int) -> None:
    gqa = SigmoidAttention(DIM, NHEADS, nheads_kv=nheads_kv, causal=True, positional="rope", dtype=torch.float64)
    mha = SigmoidAttention(DIM, NHEADS, causal=True, positional="rope", dtype=torch.float64)
    group, d = NHEADS // nheads_kv, DIM // NHEADS
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for src, dst in ((gqa.k_proj, mha.k_proj), (gqa.v_proj, mha.v_proj)):
            dst.weight.copy_(src.weight.view(nheads_kv, 1, d, DIM).expand(nheads_kv, group, d, DIM).reshape(DIM, DIM))
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    assert gqa.k_proj.weight.shape == (nheads_kv * d, DIM)
    torch.testing.assert_close(gqa(x), mha(x), **TOL)


def test_bias_is_minus_log_train_seqlen() -> None:
    assert SigmoidAttention(DIM, NHEADS, train_seqlen=256).attn_bias == pytest.approx(-math.log(256))
    assert SigmoidAttention(DIM, NHEADS, bias_init=-2.5).attn_bias == -2.5
    learned = SigmoidAttention(DIM, NHEADS, train_seqlen=100, learnable_bias=True)
    torch.testing.assert_close(learned.attn_bias.data, torch.full((NHEADS,), -math.log(100)))


def test_learnable_bias_gets_gradient_fixed_bias_does_not() -> None:
    x = torch.randn(2, 8, DIM)
    learned = SigmoidAttention(DIM, NHEADS, learnable_bias=True, causal=True)
    learned(x).square().sum().backward()
    assert learned.attn_bias.grad is not None and learned.attn_bias.grad.shape == (NHEADS,)
    assert bool((learned.attn_bias.grad != 0).all())

    fixed = SigmoidAttention(DIM, NHEADS, causal=True)
    fixed(x).square().sum().backward()
    assert isinstance(fixed.attn_bias, float)
    assert all("bias" not in name for name, _ in fixed.named_parameters())


def test_learnable_bias_gradient_matches_float64_autograd() -> None:
    m = SigmoidAttention(DIM, NHEADS, nheads_kv=2, learnable_bias=True, causal=True, positional="alibi",
                         dtype=torch.float64)
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    m(x).square().sum().backward()
    got = m.attn_bias.grad.clone()
    m.attn_bias.grad = None
    manual_attention(m, x).square().sum().backward()
    torch.testing.assert_close(got, m.attn_bias.grad, **TOL)


def _decode(m: SigmoidAttention, x: torch.Tensor, prefill: int, page_size: int | None = None) -> torch.Tensor:
    cache = KVCache(1, x.shape[0], x.shape[1] + 2, m.nheads_kv, m.head_dim, dtype=x.dtype, page_size=page_size)
    outs = [m(x[:, :prefill], kv_cache=cache)]
    cache.advance(prefill)
    for t in range(prefill, x.shape[1]):
        outs.append(m(x[:, t : t + 1], kv_cache=cache))
        cache.advance(1)
    assert cache.seqlens.tolist() == [x.shape[1]] * x.shape[0]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("attention", ["sigmoid", "softmax"])
@pytest.mark.parametrize("positional", ["rope", "alibi"])
@pytest.mark.parametrize("nheads_kv", [1, 4])
@pytest.mark.parametrize("page_size", [None, 4])
def test_decode_with_cache_equals_full_causal_forward(
    attention: str, positional: str, nheads_kv: int, page_size: int | None
) -> None:
    m = SigmoidAttention(DIM, NHEADS, nheads_kv=nheads_kv, attention=attention, positional=positional,
                         qk_norm="rms", causal=True, dtype=torch.float64)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    torch.testing.assert_close(_decode(m, x, prefill=4, page_size=page_size), m(x), **TOL)


@pytest.mark.parametrize("attention", ["sigmoid", "softmax"])
@pytest.mark.parametrize("positional", ["rope", "alibi"])
@pytest.mark.parametrize("page_size", [None, 2])
def test_decode_with_different_lengths_per_sequence(attention: str, positional: str, page_size: int | None) -> None:
    """Sequences at cache positions 3 and 5: each new token sees exactly its own prefix at its own position."""
    m = SigmoidAttention(DIM, NHEADS, nheads_kv=2, attention=attention, positional=positional, causal=True,
                         dtype=torch.float64)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    cache = KVCache(1, 2, 8, 2, DIM // NHEADS, dtype=torch.float64, page_size=page_size)
    m(x[:, :5], kv_cache=cache)
    cache.advance(torch.tensor([3, 5], dtype=torch.int32))  # sequence 0 keeps 3 tokens; slots 3, 4 are stale
    new = x[:, 5:6]
    got = m(new, kv_cache=cache)
    for b, n in enumerate((3, 5)):
        full = m(torch.cat((x[b : b + 1, :n], new[b : b + 1]), dim=1))
        torch.testing.assert_close(got[b], full[0, -1:], **TOL)


@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_on_the_triton_kernel_matches_reference(page_size: int | None) -> None:
    """The decode step through the Triton kernel (interpreter on CPU) against the same module on the reference."""
    kw = dict(nheads_kv=2, positional="rope", causal=True, train_seqlen=64)
    m = SigmoidAttention(64, 4, **kw, backend="triton", sigmoid_impl="accurate")
    ref = SigmoidAttention(64, 4, **kw, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 21, 64)
    with torch.no_grad():  # the kernel is inference-only: with grad enabled, backend="triton" raises
        got, want = _decode(m, x, prefill=17, page_size=page_size), _decode(ref, x, prefill=17, page_size=page_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_softmax_mode_matches_sdpa_module_free() -> None:
    """Softmax mode without positions is exactly SDPA on the projections."""
    m = SigmoidAttention(DIM, NHEADS, attention="softmax", causal=True, dtype=torch.float64)
    x = torch.randn(1, 5, DIM, dtype=torch.float64)
    q, k, v = (p(x).view(1, 5, NHEADS, -1).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 5, DIM)
    torch.testing.assert_close(m(x), m.o_proj(o), **TOL)


def test_backward_reaches_every_parameter() -> None:
    m = SigmoidAttention(DIM, NHEADS, nheads_kv=2, qk_norm="layer", positional="rope", learnable_bias=True,
                         qkv_bias=True, causal=True)
    m(torch.randn(2, 7, DIM)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_explicit_reference_backend_and_head_dim() -> None:
    m = SigmoidAttention(DIM, NHEADS, head_dim=6, backend="reference", sigmoid_impl="accurate", dtype=torch.float64)
    x = torch.randn(1, 5, DIM, dtype=torch.float64)
    assert m.q_proj.weight.shape == (NHEADS * 6, DIM)
    torch.testing.assert_close(m(x), manual_attention(m, x), **TOL)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"nheads": 4, "nheads_kv": 3}, "nheads"),
        ({"nheads": 3}, "dim"),
        ({"attention": "linear"}, "attention"),
        ({"qk_norm": "batch"}, "qk_norm"),
        ({"positional": "sinusoidal"}, "positional"),
        ({"backend": "cuda"}, "backend"),
        ({"sigmoid_impl": "slow"}, "sigmoid_impl"),
        ({"train_seqlen": 0}, "train_seqlen"),
        ({"nheads_kv": 0}, "nheads_kv"),
        ({"head_dim": 5, "positional": "rope"}, "head_dim"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, argument: str) -> None:
    kwargs = {"nheads": NHEADS, **kwargs}
    with pytest.raises(ValueError, match=argument):
        SigmoidAttention(DIM, **kwargs)


def test_cache_overflow_raises() -> None:
    m = SigmoidAttention(DIM, NHEADS, causal=True)
    cache = KVCache(1, 1, 4, NHEADS, DIM // NHEADS)
    with pytest.raises(ValueError, match="max_seqlen"):
        m(torch.randn(1, 5, DIM), kv_cache=cache)


def test_float32_qk_norm_output_under_autocast_is_cast_back():
    """CUDA autocast runs LayerNorm in float32 while the projections give bf16: q/k must follow v's dtype."""
    m = SigmoidAttention(32, 4, qk_norm="layer", positional="rope", causal=True).to(torch.bfloat16)
    real_q, real_k = m.q_norm.forward, m.k_norm.forward
    m.q_norm.forward = lambda t: real_q(t).float()
    m.k_norm.forward = lambda t: real_k(t).float()
    out = m(torch.randn(2, 9, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_alibi_slopes_stay_float32_when_the_module_is_cast():
    m = SigmoidAttention(48, 12, positional="alibi")
    before = m.alibi_slopes.clone()
    m = m.to(torch.bfloat16)
    assert m.alibi_slopes.dtype == torch.float32 and torch.equal(m.alibi_slopes, before)
    assert m.q_proj.weight.dtype == torch.bfloat16
