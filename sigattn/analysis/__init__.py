"""Theory checks of sigmoid attention: Jacobian regularity vs softmax, and the sequence-doubling test."""

from sigattn.analysis.doubling import doubling_table
from sigattn.analysis.regularity import (
    exact_jacobian_norm,
    growth_exponents,
    jacobian_spectral_norm,
    regularity_table,
    single_head_attention,
)

__all__ = [
    "doubling_table",
    "exact_jacobian_norm",
    "growth_exponents",
    "jacobian_spectral_norm",
    "regularity_table",
    "single_head_attention",
]
