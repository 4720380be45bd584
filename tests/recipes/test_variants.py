"""The named variants differ from the paper's sigmoid recipe in exactly the fields they claim, and nothing else."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sigattn.nn import LayerScale
from sigattn.recipes.models import GPT, ModelShape, attention_modules
from sigattn.recipes.variants import SIGMOID, VARIANTS, get_variants
from tests.recipes import one_thread  # noqa: F401  (autouse fixture)

META = {"name", "description", "changes"}


def _differences(a, b) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if f.name not in META and getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_differs_in_exactly_its_claimed_fields(name):
    variant = VARIANTS[name]
    assert _differences(variant, SIGMOID) == set(variant.changes)
    assert (name == "sigmoid") == (not variant.changes)


def test_paper_recipe():
    opts = SIGMOID.block_options(train_seqlen=128)
    assert opts == {"attention": "sigmoid", "train_seqlen": 128, "bias_init": None, "layerscale": 1e-4,
                    "norm_placement": "hybrid", "qk_norm": "rms", "positional": "rope"}
    assert VARIANTS["sigmoid-b0"].bias == 0.0 and VARIANTS["softmax"].attention == "softmax"


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "sigmoid"])
def test_models_share_every_common_weight_with_the_sigmoid_model(name):
    shape = ModelShape(32, 2, 2)
    torch.manual_seed(0)
    ref = GPT(shape, SIGMOID, context=16)
    torch.manual_seed(0)
    model = GPT(shape, VARIANTS[name], context=16)
    ref_state, state = ref.state_dict(), model.state_dict()
    for key in ref_state.keys() & state.keys():
        assert torch.equal(ref_state[key], state[key]), key
    attn, ref_attn = attention_modules(model)[0], attention_modules(ref)[0]
    assert ref_attn.attn_bias == pytest.approx(-math.log(16))
    assert attn.attn_bias == pytest.approx(0.0 if name == "sigmoid-b0" else -math.log(16))
    assert attn.attention == ("softmax" if name == "softmax" else "sigmoid")
    assert attn.positional == ("alibi" if name == "sigmoid-alibi" else "rope")
    assert (attn.q_norm is None) == (name == "sigmoid-no-qknorm")
    has_layerscale = any(isinstance(m, LayerScale) for m in model.modules())
    assert has_layerscale == (name != "sigmoid-no-layerscale")
    assert all(b.norm_placement == "hybrid" for b in model.blocks)
    tokens = torch.randint(0, 256, (2, 16))
    assert not torch.allclose(model(tokens), ref(tokens))


def test_get_variants():
    assert [v.name for v in get_variants(None)] == list(VARIANTS)
    assert [v.name for v in get_variants(["all"])] == list(VARIANTS)
    assert [v.name for v in get_variants(["sigmoid", "softmax", "sigmoid"])] == ["sigmoid", "softmax"]
    with pytest.raises(ValueError, match="unknown variant.*nope"):
        get_variants(["nope"])
