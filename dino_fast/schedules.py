"""Per-iteration schedules of the DINO recipe: one value per optimisation step, as numpy arrays.

The training loop reads `schedule[it]` with `it = epoch * iters_per_epoch + step`, so a schedule is
a pure function of the global step: a resumed run sees exactly the values it would have seen.
"""
from __future__ import annotations

import numpy as np

from dino_fast.checks import check_finite, check_int, check_positive


def _check_warmup(warmup, name: str, total, total_name: str) -> int:
    """An integer in [0, total]."""
    warmup = check_int(warmup, name, 0)
    if warmup > total:
        raise ValueError(f"{name} must be in [0, {total_name}={total}], got {warmup}")
    return warmup


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

    epochs and niter_per_ep are integers >= 1, warmup_epochs an integer in [0, epochs], the values
    finite real numbers; anything else is a TypeError / ValueError naming the argument.
    """
    base_value = check_finite(base_value, "base_value")
    final_value = check_finite(final_value, "final_value")
    start_warmup_value = check_finite(start_warmup_value, "start_warmup_value")
    epochs = check_int(epochs, "epochs", 1)
    niter_per_ep = check_int(niter_per_ep, "niter_per_ep", 1)
    warmup_epochs = _check_warmup(warmup_epochs, "warmup_epochs", epochs, "epochs")
    total = epochs * niter_per_ep
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    i = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * i / max(len(i), 1)))
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != total:  # the official assert; cannot fail once the inputs are checked
        raise RuntimeError(f"cosine_scheduler built {len(schedule)} values instead of "
                           f"epochs * niter_per_ep = {total}")
    return schedule


def scaled_lr(base_lr: float, total_batch_size: int) -> float:
    """The linear scaling rule of the official recipe: lr = base_lr * total_batch / 256."""
    return base_lr * total_batch_size / 256.0


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float,
                          warmup_teacher_temp_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (the official schedule).

    Returns `nepochs` values: the first `warmup_teacher_temp_epochs` rise linearly from
    `warmup_teacher_temp` to `teacher_temp` (both ends included), the rest equal `teacher_temp`.
    The temperatures are positive finite numbers, nepochs an integer >= 1 and
    warmup_teacher_temp_epochs an integer in [0, nepochs].
    """
    warmup_teacher_temp = check_positive(warmup_teacher_temp, "warmup_teacher_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    nepochs = check_int(nepochs, "nepochs", 1)
    warmup_teacher_temp_epochs = _check_warmup(warmup_teacher_temp_epochs,
                                               "warmup_teacher_temp_epochs", nepochs, "nepochs")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))
