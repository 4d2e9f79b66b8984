"""Per-iteration schedules of the DINO recipe: one value per optimisation step, as numpy arrays.

The training loop reads `schedule[it]` with `it = epoch * iters_per_epoch + step`, so a schedule is
a pure function of the global step: a resumed run sees exactly the values it would have seen.
"""
from __future__ import annotations

import numpy as np


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warm-up, then a half-cosine from `base_value` down (or up) to `final_value`.

    Returns an array of `epochs * niter_per_ep` values (float64). The first
    `warmup_epochs * niter_per_ep` values rise linearly from `start_warmup_value` to `base_value`
    (both ends included); the rest follow
        final + (base - final) * (1 + cos(pi * i / n)) / 2,   i = 0 .. n-1,
    so the cosine starts exactly at `base_value` and approaches `final_value` at the last step.
    Used for the learning rate (warm-up then decay to min_lr), the weight decay (0.04 -> 0.4) and
    the teacher momentum (0.996 -> 1), as in the official DINO script.
    """
    if epochs < 1 or niter_per_ep < 1:
        raise ValueError(f"need epochs >= 1 and niter_per_ep >= 1, got epochs={epochs}, "
                         f"niter_per_ep={niter_per_ep}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    total = epochs * niter_per_ep
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    i = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * i / max(len(i), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def scaled_lr(base_lr: float, total_batch_size: int) -> float:
    """The linear scaling rule of the official recipe: lr = base_lr * total_batch / 256."""
    return base_lr * total_batch_size / 256.0


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float,
                          warmup_teacher_temp_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (the official schedule)."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))
