"""The recipes' GPT and ViT: shapes, causality, and forward/backward with finite gradients for every variant."""

from __future__ import annotations

import pytest
import torch

from sigattn.recipes.models import GPT, ModelShape, ViT, attention_modules
from sigattn.recipes.variants import VARIANTS
from tests.recipes import one_thread  # noqa: F401  (autouse fixture)

SHAPE = ModelShape(32, 2, 2)


def _check_grads(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gpt_forward_backward(name):
    model = GPT(SHAPE, VARIANTS[name], context=24)
    tokens = torch.randint(0, 256, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, 256) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    _check_grads(model)
    assert len(attention_modules(model)) == 2 and all(a.causal for a in attention_modules(model))


@pytest.mark.parametrize("name", ["sigmoid", "softmax", "sigmoid-alibi"])
def test_gpt_is_causal(name):
    model = GPT(SHAPE, VARIANTS[name], context=17)
    tokens = torch.randint(0, 256, (1, 17))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    torch.testing.assert_close(model(tokens)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(tokens)[:, 10:], model(changed)[:, 10:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vit_forward_backward(name):
    model = ViT(SHAPE, VARIANTS[name], image_size=28, patch=7, channels=1, num_classes=10)
    assert model.num_tokens == 17 and attention_modules(model)[0].train_seqlen == 17
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    _check_grads(model)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="multiple of patch"):
        ViT(SHAPE, VARIANTS["sigmoid"], image_size=28, patch=5, channels=1, num_classes=10)
    with pytest.raises(ValueError, match="seqlen <= 8"):
        GPT(SHAPE, VARIANTS["sigmoid"], context=8)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_autocast_keeps_one_dtype_for_q_k_v():
    model = GPT(SHAPE, VARIANTS["sigmoid"], context=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 256, (2, 16)))
    assert torch.isfinite(logits.float()).all()
