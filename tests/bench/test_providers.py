"""Providers compute the same sigmoid attention as the reference, and time on random (not zero) inputs."""

import math

import pytest
import torch

from sigattn.bench.providers import PROVIDERS, default_providers, make_inputs, with_mode
from sigattn.bench.shapes import Shape


def _naive_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) - math.log(k.shape[1])
    p = torch.sigmoid(s)
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        p = p.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["naive-sigmoid", "sigattn-reference"])
def test_sigmoid_providers_match(name: str, causal: bool) -> None:
    shape = Shape(1, 2, 17, 33, 16, causal)
    built = PROVIDERS[name].build(shape, torch.float64, torch.device("cpu"), "fwd")
    out = built()
    if name == "naive-sigmoid":
        out = out.transpose(1, 2)
    q, k, v = make_inputs(shape, torch.float64, torch.device("cpu"), "bnhd", False)
    torch.testing.assert_close(out, _naive_out(q, k, v, causal))


def test_inputs_random_and_layouts_agree() -> None:
    shape = Shape(2, 3, 5, 7, 4, False)
    q1, k1, _ = make_inputs(shape, torch.float32, torch.device("cpu"), "bnhd", True)
    q2, k2, _ = make_inputs(shape, torch.float32, torch.device("cpu"), "bhnd", False)
    assert q1.is_leaf and q1.requires_grad and q2.is_contiguous()
    assert q1.std() > 0.5
    torch.testing.assert_close(q1.detach().transpose(1, 2), q2)
    torch.testing.assert_close(k1.detach().transpose(1, 2), k2)


def test_with_mode_bwd_repeats_without_accumulating() -> None:
    x = torch.randn(8, requires_grad=True)
    step = with_mode(lambda: (x * x).sum() * torch.ones(1), [x], "bwd")
    (g1,) = step()
    (g2,) = step()
    # d/dx of dout * sum(x^2) with a random scalar dout: parallel to 2x, and the same every step.
    torch.testing.assert_close(g1 / (2 * x.detach()), torch.full_like(g1, (g1[0] / (2 * x[0])).item()))
    torch.testing.assert_close(g2, g1)
    assert x.grad is None


def test_cpu_defaults_skip_interpreted_triton() -> None:
    names = default_providers("cpu")
    assert "sigattn-reference" in names and "sdpa-math" in names
    assert not any(n.startswith("sigattn-triton") for n in names)
