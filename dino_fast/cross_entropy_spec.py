"""What a soft cross-entropy call is (`CrossEntropySpec`) and the checks of its inputs, shared by
the eager op (dino_fast/cross_entropy.py) and its Triton kernels (kernels/cross_entropy.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dino_fast.checks import check_finite, check_floating_tensor, check_positive


@dataclass(frozen=True)
class CrossEntropySpec:
    """The static description of one soft cross-entropy call (see the module docstring)."""
    pair_weight: tuple  # (V, G) python floats
    student_temp: float
    teacher_temp: Optional[float]  # None: the teacher rows are probabilities
    scale: float

    @property
    def n_student(self) -> int:
        return len(self.pair_weight)

    @property
    def n_teacher(self) -> int:
        return len(self.pair_weight[0])

    def groups(self) -> list[tuple[int, int, tuple]]:
        """Runs of consecutive student crops with the same pair weights: (v0, v1, weights)."""
        runs: list[tuple[int, int, tuple]] = []
        for v, w in enumerate(self.pair_weight):
            if runs and runs[-1][2] == w and runs[-1][1] == v:
                runs[-1] = (runs[-1][0], v + 1, w)
            else:
                runs.append((v, v + 1, w))
        return runs


def normalize_pair_weight(pair_weight) -> tuple:
    """(V, G) pair weights as a tuple of tuples of python floats; raises on a bad table."""
    if isinstance(pair_weight, torch.Tensor):
        pair_weight = pair_weight.detach().cpu().tolist()
    try:
        rows = tuple(tuple(float(x) for x in row) for row in pair_weight)
    except (TypeError, ValueError):
        raise TypeError(f"pair_weight must be a (n_student_crops, n_teacher_crops) table of "
                        f"numbers, got {pair_weight!r}") from None
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"pair_weight must be a non-empty rectangular (n_student_crops, "
                         f"n_teacher_crops) table, got {pair_weight!r}")
    if not all(math.isfinite(x) for r in rows for x in r):
        raise ValueError(f"pair_weight entries must be finite, got {pair_weight!r}")
    return rows


def check_cross_entropy_inputs(student, teacher, pair_weight, *, student_temp, teacher_temp,
                               center, row_weight, scale) -> tuple[CrossEntropySpec, int, int]:
    """Validate a soft cross-entropy call; return (spec, B, K). Raises before any work."""
    pw = normalize_pair_weight(pair_weight)
    V, G = len(pw), len(pw[0])
    check_positive(student_temp, "student_temp")
    if teacher_temp is not None:
        check_positive(teacher_temp, "teacher_temp")
    elif center is not None:
        raise ValueError("center is only used with teacher logits: pass teacher_temp too, or "
                         "center=None for teacher probabilities")
    check_finite(scale, "scale")
    check_floating_tensor(student, "student")
    check_floating_tensor(teacher, "teacher")
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"student and teacher must be 2-D (crops*batch, K), got shapes "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    rows, K = student.shape
    if K == 0:
        raise ValueError(f"student must have at least one column (K >= 1 prototypes), got "
                         f"shape {tuple(student.shape)}")
    if rows == 0 or rows % V:
        raise ValueError(f"student has {rows} rows, which is not a positive multiple of the "
                         f"{V} student crops of pair_weight (rows must be crops*batch, "
                         f"crop-major)")
    B = rows // V
    if teacher.shape != (G * B, K):
        raise ValueError(f"teacher must have shape ({G}*batch, K) = {(G * B, K)} for the {G} "
                         f"teacher crops of pair_weight and batch={B}, got "
                         f"{tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if center is not None:
        check_floating_tensor(center, "center")
        if center.numel() != K or center.dim() > 3 or any(s != 1 for s in center.shape[:-1]):
            raise ValueError(f"center must have K={K} entries as (K,), (1, K) or (1, 1, K), got "
                             f"shape {tuple(center.shape)}")
        if center.device != student.device:
            raise ValueError(f"center is on {center.device} but student is on {student.device}")
    if row_weight is not None:
        check_floating_tensor(row_weight, "row_weight")
        if row_weight.shape != (B,):
            raise ValueError(f"row_weight must have shape (batch,) = ({B},), got "
                             f"{tuple(row_weight.shape)}")
        if row_weight.device != student.device:
            raise ValueError(f"row_weight is on {row_weight.device} but student is on "
                             f"{student.device}")
    spec = CrossEntropySpec(pw, float(student_temp),
                            None if teacher_temp is None else float(teacher_temp), float(scale))
    return spec, B, K


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 when any input is fp64 (the exactness tests), fp32 otherwise: every reduction
    accumulates at least in fp32."""
    return (torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors)
            else torch.float32)
