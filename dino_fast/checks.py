"""Argument checks shared by the public functions: each names the argument and says what was
expected, and returns the value normalised (int / float) so callers store what they checked."""
from __future__ import annotations

import math
import numbers

import torch


def check_int(value, name: str, minimum: int) -> int:
    """An integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_finite(value, name: str) -> float:
    """A finite real number (not a bool): schedule values, loss scales."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_positive(value, name: str) -> float:
    """A positive finite real number (temperatures, learning rates)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def check_unit_interval(value, name: str) -> float:
    """A real number in [0, 1] (momenta); NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_floating_tensor(t, name: str) -> None:
    """A torch.Tensor of a floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16 or float16), "
                        f"got dtype {t.dtype}")


def check_index(value, name: str, size: int, meaning: str) -> int:
    """An integer in [0, size): an epoch or an iteration into a schedule; `meaning` says what the
    bound is (e.g. "the schedule has nepochs=100 entries")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [0, {size}), got {value!r}")
    if not 0 <= value < size:
        raise ValueError(f"{name} must be in [0, {size}) ({meaning}), got {value}")
    return int(value)
