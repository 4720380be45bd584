"""Constructor argument checks for the modules: each bad value raises a ValueError that names the argument."""

from __future__ import annotations

from collections.abc import Sequence

from sigattn.ops.validation import BACKENDS, SIGMOID_IMPLS

__all__ = ["BACKENDS", "SIGMOID_IMPLS", "check_choice", "check_positive_int", "check_positive_float"]


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """`value` must be one of `choices` (None allowed only when listed)."""
    if value not in choices:
        listed = ", ".join("None" if c is None else repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)
