"""TransformerBlock: norm placements spelled out from its own parts, LayerScale, MLP variants, cached decode."""

from __future__ import annotations

import pytest
import torch

from sigattn.nn import KVCache, LayerScale, TransformerBlock

DIM, NHEADS = 32, 4
TOL = {"atol": 1e-10, "rtol": 1e-10}


@pytest.mark.parametrize("norm_placement", ["pre", "post", "hybrid"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_forward_backward_reach_every_parameter(norm_placement: str, norm: str, mlp: str) -> None:
    block = TransformerBlock(DIM, NHEADS, norm_placement=norm_placement, norm=norm, mlp=mlp, layerscale=0.1,
                             nheads_kv=2, positional="rope", causal=True, learnable_bias=True)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("norm_placement", ["pre", "post", "hybrid"])
def test_placement_is_the_documented_composition(norm_placement: str) -> None:
    block = TransformerBlock(DIM, NHEADS, norm_placement=norm_placement, layerscale=0.3, positional="alibi",
                             causal=True, dtype=torch.float64)
    for p in block.parameters():  # every norm and LayerScale weight distinct, so a swapped part shows
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    b = block
    if norm_placement == "pre":
        h = x + b.attn_scale(b.attn(b.attn_norm(x)))
        y = h + b.mlp_scale(b.mlp(b.mlp_norm(h)))
    elif norm_placement == "post":
        h = b.attn_norm(x + b.attn_scale(b.attn(x)))
        y = b.mlp_norm(h + b.mlp_scale(b.mlp(h)))
    else:
        h = x + b.attn_scale(b.attn_out_norm(b.attn(b.attn_norm(x))))
        y = h + b.mlp_scale(b.mlp_out_norm(b.mlp(b.mlp_norm(h))))
    torch.testing.assert_close(block(x), y, **TOL)


def test_hybrid_norm_bounds_the_branch_whatever_the_attention_output() -> None:
    """With RMSNorm weights 1 and LayerScale 1, each hybrid branch adds a vector of RMS exactly 1 per token."""
    block = TransformerBlock(DIM, NHEADS, norm_placement="hybrid", layerscale=1.0, dtype=torch.float64)
    with torch.no_grad():
        block.attn.o_proj.weight.mul_(1e4)  # a huge attention output, as at init without b = -log n
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    branch = block._sublayer(x, block.attn, block.attn_norm, block.attn_out_norm, block.attn_scale) - x
    torch.testing.assert_close(branch.pow(2).mean(-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm_placement", ["pre", "hybrid"])
def test_layerscale_zero_makes_the_block_the_identity(norm_placement: str) -> None:
    block = TransformerBlock(DIM, NHEADS, norm_placement=norm_placement, layerscale=0.0, causal=True)
    x = torch.randn(2, 6, DIM)
    assert torch.equal(block(x), x)


def test_layerscale_zero_post_norm_is_just_the_norms() -> None:
    block = TransformerBlock(DIM, NHEADS, norm_placement="post", layerscale=0.0)
    x = torch.randn(2, 6, DIM)
    torch.testing.assert_close(block(x), block.mlp_norm(block.attn_norm(x)))


def test_layerscale_init_and_off() -> None:
    default = TransformerBlock(DIM, NHEADS)
    assert isinstance(default.attn_scale, LayerScale)
    assert torch.equal(default.attn_scale.gamma, torch.full((DIM,), 1e-4))
    custom = TransformerBlock(DIM, NHEADS, layerscale=0.25)
    assert torch.equal(custom.mlp_scale.gamma, torch.full((DIM,), 0.25))
    off = TransformerBlock(DIM, NHEADS, layerscale=None)
    assert isinstance(off.attn_scale, torch.nn.Identity) and isinstance(off.mlp_scale, torch.nn.Identity)
    assert not any("gamma" in name for name, _ in off.named_parameters())


def test_attention_options_pass_through() -> None:
    block = TransformerBlock(DIM, NHEADS, nheads_kv=1, attention="softmax", qk_norm="layer", positional="alibi",
                             causal=True, train_seqlen=128, backend="reference", norm_eps=1e-5, layer_idx=3)
    a = block.attn
    assert (a.nheads_kv, a.attention, a.positional, a.causal, a.backend, a.layer_idx) == (
        1, "softmax", "alibi", True, "reference", 3
    )
    assert a.q_norm.eps == 1e-5 and isinstance(a.q_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("attention", ["sigmoid", "softmax"])
def test_two_blocks_decode_with_one_cache_equal_full_forward(attention: str) -> None:
    blocks = [
        TransformerBlock(DIM, NHEADS, layer_idx=i, norm_placement="hybrid", layerscale=0.5, nheads_kv=2,
                         attention=attention, positional="rope", qk_norm="rms", causal=True, dtype=torch.float64)
        for i in range(2)
    ]
    x = torch.randn(2, 8, DIM, dtype=torch.float64)

    def model(h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for blk in blocks:
            h = blk(h, kv_cache=cache)
        return h

    cache = KVCache(2, 2, 8, 2, DIM // NHEADS, dtype=torch.float64)
    outs = [model(x[:, :3], cache)]
    cache.advance(3)
    for t in range(3, 8):
        outs.append(model(x[:, t : t + 1], cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), model(x), **TOL)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"norm_placement": "sandwich"}, "norm_placement"),
        ({"norm": "batch"}, "norm"),
        ({"mlp": "relu"}, "mlp"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"layerscale": "1e-4"}, "layerscale"),
        ({"nheads_kv": 3}, "nheads"),
        ({"positional": "xpos"}, "positional"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        TransformerBlock(DIM, NHEADS, **kwargs)
