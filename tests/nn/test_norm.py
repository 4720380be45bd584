"""make_norm: names to modules, and errors that name the caller's argument."""

from __future__ import annotations

import pytest
import torch

from sigattn.nn import make_norm


def test_names_build_the_norms() -> None:
    rms = make_norm("rms", 8, eps=1e-5)
    assert isinstance(rms, torch.nn.RMSNorm) and rms.eps == 1e-5
    assert isinstance(make_norm("layer", 8), torch.nn.LayerNorm)


def test_bad_name_reports_the_callers_argument() -> None:
    with pytest.raises(ValueError, match="qk_norm"):
        make_norm("batch", 8, argname="qk_norm")
