"""Tests for sigattn.integrations.timm: a tiny random-init timm ViT converted to sigmoid attention."""

import copy
import math
import subprocess
import sys
import types

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import Attention, VisionTransformer  # noqa: E402

from sigattn.integrations.timm import SigmoidTimmAttention, convert, model_num_tokens  # noqa: E402


def _vit(**overrides) -> VisionTransformer:
    kwargs = dict(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, reg_tokens=1, qk_norm=True,
    )
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs).double().eval()
    with torch.no_grad():  # timm's init (std 0.02) leaves every score near 0; spread them so the formula matters
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.3)
    return model


def _formula(attn: Attention, bias: float, x: torch.Tensor, attn_mask=None, is_causal=False,
             compute: torch.dtype | None = torch.float64) -> torch.Tensor:
    """sigmoid attention by hand from a timm Attention's own submodules, in `compute` precision (None: x's dtype,
    PyTorch's own low-precision error, the tolerance budget)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).to(compute or x.dtype).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.sigmoid(attn.scale * q @ k.transpose(-1, -2) + bias)  # [B, H, N, N]
    if is_causal:
        weights = weights * torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
    if attn_mask is not None:
        weights = weights * attn_mask
    out = (weights @ v).transpose(1, 2).reshape(B, N, -1).to(x.dtype)
    return attn.proj(out)


def _oracle_copy(model: VisionTransformer, bias: float, compute: torch.dtype | None = torch.float64):
    """An unconverted copy whose Attention modules compute the formula above instead of softmax."""
    other = copy.deepcopy(model)
    for block in other.blocks:
        attn = block.attn
        attn.forward = types.MethodType(
            lambda self, x, attn_mask=None, is_causal=False: _formula(self, bias, x, attn_mask, is_causal, compute),
            attn,
        )
    return other


def test_convert_keeps_weights_and_matches_float64_formula():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    oracle = _oracle_copy(model, -math.log(2 * 2 + 2))  # 4 patches + class + register token
    assert convert(model) is model
    assert sum(isinstance(m, SigmoidTimmAttention) for m in model.modules()) == 2
    assert not any(type(m) is Attention for m in model.modules())
    assert model.blocks[0].attn.attn_bias == pytest.approx(-math.log(6))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[name] for name, p in model.named_parameters())

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, ref = model(x), oracle(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_bias_choices():
    assert model_num_tokens(_vit()) == 6
    assert convert(_vit(), train_seqlen=64).blocks[1].attn.attn_bias == pytest.approx(-math.log(64))
    assert convert(_vit(), bias=-1.5).blocks[1].attn.attn_bias == -1.5
    with pytest.raises(ValueError, match="not both"):
        convert(_vit(), bias=-1.0, train_seqlen=8)
    with pytest.raises(ValueError, match="no timm Attention"):
        convert(torch.nn.Linear(2, 2))

    model = convert(_vit(), learnable_bias=True)
    bias = model.blocks[0].attn.attn_bias
    assert isinstance(bias, torch.nn.Parameter) and bias.shape == (4,)
    model(torch.randn(1, 3, 16, 16, dtype=torch.float64)).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_attention_module_masks_and_causal():
    model = _vit()
    attn = model.blocks[0].attn
    new = SigmoidTimmAttention(attn, bias=-2.0)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(new(x, is_causal=True), _formula(attn, -2.0, x, is_causal=True), rtol=1e-10, atol=1e-10)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    torch.testing.assert_close(new(x, attn_mask=mask), _formula(attn, -2.0, x, attn_mask=mask), rtol=1e-10, atol=1e-10)
    per_call = SigmoidTimmAttention(attn, bias=None)
    torch.testing.assert_close(per_call(x), _formula(attn, -math.log(7), x), rtol=1e-10, atol=1e-10)


def test_training_with_attention_dropout():
    model = convert(_vit(attn_drop_rate=0.5)).train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = model(x)
    assert not torch.allclose(out, model.eval()(x))
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_create_model_by_name():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    convert(model)
    assert model.blocks[0].attn.attn_bias == pytest.approx(-math.log(4 * 4 + 1))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_import_sigattn_does_not_import_timm():
    code = "import sys, sigattn, sigattn.nn, sigattn.integrations; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "impl"), [(torch.float32, "accurate"), (torch.bfloat16, "fast")])
def test_converted_vit_on_gpu_uses_kernels_within_budget(dtype, impl, monkeypatch):
    """CUDA: the Triton kernels; output and gradients within 3x PyTorch's own error doing the math in `dtype`."""
    from sigattn.ops import custom_ops

    calls = []
    dense = custom_ops.sigmoid_attn_dense
    monkeypatch.setattr(custom_ops, "sigmoid_attn_dense", lambda *a: calls.append(1) or dense(*a))
    base = _vit(img_size=64, embed_dim=64, num_heads=2).cuda()  # 64 patches + 2 prefix tokens; head_dim 32
    bias = -math.log(66)
    truth = _oracle_copy(base, bias)
    base_low = copy.deepcopy(base).to(dtype)
    low = _oracle_copy(base_low, bias, compute=None)
    model = convert(base_low, sigmoid_impl=impl)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float64)
    outs = [truth(x), model(x.to(dtype)), low(x.to(dtype))]
    assert calls
    for out in outs:
        out.float().square().sum().backward()
    pairs = [(outs[0], outs[1], outs[2], "out")]
    pairs += [(p.grad, q.grad, r.grad, n) for (n, p), q, r in
              zip(truth.named_parameters(), model.parameters(), low.parameters())]
    for ref, got, lp, name in pairs:
        floor = torch.finfo(dtype).eps * ref.abs().max().item() * 16
        err = (got.double() - ref).abs().max().item()
        budget = 3 * (lp.double() - ref).abs().max().item() + floor
        assert err <= budget, f"{name}: {err:.3e} > {budget:.3e}"


def test_shared_attention_module_is_replaced_everywhere_once():
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    model.blocks[1].attn = model.blocks[0].attn
    convert(model)
    first, second = model.blocks[0].attn, model.blocks[1].attn
    assert isinstance(first, SigmoidTimmAttention) and second is first
