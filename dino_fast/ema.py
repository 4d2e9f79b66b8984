"""The teacher EMA of DINO: teacher <- m * teacher + (1 - m) * student, over every parameter.

Two entry points:

- `ema_update_(teacher_params, student_params, momentum, backend="auto")`: the update itself, on
  two lists of tensors. Triton (`dino_fast.kernels.ema`) runs it in one launch on CUDA; the eager
  path, `torch._foreach_lerp_` per dtype group, on CPU and wherever Triton cannot run.
- `TeacherEMA(student, teacher, total_steps=...)`: the official per-iteration cosine momentum
  schedule (0.996 -> 1) and the update of the teacher's parameters (optionally also its floating
  buffers) from a student that may be wrapped in DDP and/or torch.compile.

`teacher.lerp_(student, 1 - m)` is `m * teacher + (1 - m) * student` up to rounding, so both
paths compute the official update; the official per-parameter loop
(`param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`, three kernels and a temporary per
tensor) is only the oracle of the tests and the baseline of the benchmark.

Every input is validated before the first write: on a bad input (count, shape, device, dtype,
momentum, a step past the schedule) a clear error names the argument and nothing is modified.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import nn

from dino_fast.backend import check_backend_name, resolve_backend
from dino_fast.checks import check_index, check_int, check_unit_interval
from dino_fast.models import unwrap_model
from dino_fast.schedules import cosine_scheduler

# ----------------------------------------------------------------------------------------------
# validation (shared by both backends, runs before any write)

def check_ema_inputs(teachers: Sequence, students: Sequence,
                     names: Optional[Sequence[str]] = None, *,
                     one_device: bool = True) -> Optional[torch.device]:
    """Check the tensor lists of an EMA update; return their (single) device.

    Same number of tensors; every entry a floating-point tensor; teacher_params[i] and
    student_params[i] of the same shape; every tensor on one device (unless one_device is
    False: then None is returned). `names` (parameter names) only enrich the messages.
    """
    if len(teachers) != len(students):
        raise ValueError(f"teacher_params has {len(teachers)} tensors but student_params has "
                         f"{len(students)}; they must pair up one to one")
    if len(teachers) == 0:
        raise ValueError("teacher_params and student_params are empty: nothing to update (was a "
                         "generator such as model.parameters() consumed before?)")
    device = None
    for i, (t, s) in enumerate(zip(teachers, students)):
        label = f"[{i}]" if names is None else f"[{i}] ({names[i]})"
        for tensor, arg in ((t, "teacher_params"), (s, "student_params")):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{arg}{label} must be a torch.Tensor, got "
                                f"{type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(f"{arg}{label} must be a floating-point tensor, got dtype "
                                f"{tensor.dtype}")
        if t.shape != s.shape:
            raise ValueError(f"teacher_params{label} has shape {tuple(t.shape)} but "
                             f"student_params{label} has shape {tuple(s.shape)}")
        if not one_device:
            continue
        if device is None:
            device = t.device
        for tensor, arg in ((t, "teacher_params"), (s, "student_params")):
            if tensor.device != device:
                raise ValueError(f"{arg}{label} is on {tensor.device} but teacher_params[0] is on "
                                 f"{device}; every teacher and student tensor must be on one "
                                 "device (move both models there first)")
    return device


# ----------------------------------------------------------------------------------------------
# the update

@torch.no_grad()
def ema_update_eager_(teachers: Sequence[torch.Tensor], students: Sequence[torch.Tensor],
                      momentum: float) -> None:
    """Eager path: `torch._foreach_lerp_(teachers, students, 1 - momentum)` per dtype pair.

    Same-dtype pairs are updated with no temporary, in the tensors' opmath (fp32 for bf16/fp16,
    fp64 for fp64). `_foreach_lerp_` needs one dtype, so a student whose dtype differs from its
    teacher's is first cast to the teacher's dtype (exact when the teacher is wider; for a bf16
    teacher and an fp32 student it adds at most (1 - m) * half a bf16 ulp of the student before
    the result's own rounding).
    """
    weight = 1.0 - momentum
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list, list]] = {}
    for t, s in zip(teachers, students):
        ts, ss = groups.setdefault((t.dtype, s.dtype), ([], []))
        ts.append(t)
        ss.append(s)
    for (t_dtype, s_dtype), (ts, ss) in groups.items():
        if s_dtype != t_dtype:
            ss = [s.to(t_dtype) for s in ss]
        torch._foreach_lerp_(ts, ss, weight)


def _ema_update(teachers: list, students: list, momentum, backend: str,
                names: Optional[Sequence[str]] = None) -> str:
    check_backend_name(backend)
    momentum = check_unit_interval(momentum, "momentum")
    device = check_ema_inputs(teachers, students, names)
    chosen = resolve_backend(backend, device, "ema_update_")
    if chosen == "triton":
        from dino_fast.kernels.ema import check_triton_inputs
        try:
            check_triton_inputs(teachers, students, names)
        except (TypeError, ValueError):
            if backend != "auto":
                raise
            chosen = "eager"  # e.g. fp64 or a strided view: auto falls back, and says so
    if chosen == "triton":
        from dino_fast.kernels.ema import ema_update_triton_
        ema_update_triton_(teachers, students, momentum)
    else:
        ema_update_eager_(teachers, students, momentum)
    return chosen


def ema_update_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
                momentum: float, *, backend: str = "auto") -> str:
    """In place, for every pair: teacher <- momentum * teacher + (1 - momentum) * student.

    Args:
        teacher_params, student_params: tensors (or parameters) paired one to one, same shapes,
            all on one device, any floating dtypes (a bf16 teacher with an fp32 student works);
            the math runs in fp32 at least (fp64 for fp64 tensors), the teacher keeps its dtype.
        momentum: a number in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.
        backend: "auto" (Triton on CUDA, eager otherwise), "triton" or "eager"
            (see dino_fast.backend). With "auto", tensors the kernel does not take (fp64, strided
            views with gaps, teacher and student laid out differently) go to the eager path.

    Returns:
        The backend that ran, "triton" or "eager".

    Everything is validated before the first write: on a bad input a ValueError/TypeError names
    the argument and no tensor is modified.

    Example:
        >>> teacher, student = [torch.zeros(3)], [torch.ones(3)]
        >>> ema_update_(teacher, student, momentum=0.75)
        'eager'
        >>> teacher[0]
        tensor([0.2500, 0.2500, 0.2500])
    """
    return _ema_update(list(teacher_params), list(student_params), momentum, backend)


# ----------------------------------------------------------------------------------------------
# schedule and module-level EMA

class TeacherEMA:
    """The DINO teacher update with the official per-iteration cosine momentum schedule.

        ema = TeacherEMA(student, teacher, total_steps=epochs * len(data_loader))
        for it, batch in enumerate(...):       # it = global iteration, as the official script
            ...; optimizer.step()
            ema.update(it)                     # or ema.step(), which counts iterations itself

    Args:
        student, teacher: modules with the same parameter names and shapes; either may be wrapped
            in DistributedDataParallel / DataParallel and/or torch.compile (unwrapped to the
            module).
        base_momentum, final_momentum: the schedule goes from base (iteration 0) towards final
            (official: --momentum_teacher 0.996 -> 1.0), over `total_steps` iterations
            (epochs * iterations per epoch): momentum(it) = final + (base - final) * (1 +
            cos(pi * it / total_steps)) / 2.
        total_steps: number of iterations of the schedule (keyword-only).
        include_buffers: also average the floating-point buffers (e.g. BatchNorm running stats)
            with the same momentum; integer buffers (num_batches_tracked) are never touched. The
            official recipe averages parameters only (the default).
        backend: "auto" | "triton" | "eager" (see `ema_update_`); `last_backend` says which ran.

    Tensors are looked up by name at every update, so a student whose storage moved (`.to()`,
    `load_state_dict(assign=True)`) is followed, and the Triton tables are rebuilt for it.
    `state_dict()` / `load_state_dict()` hold the iteration counter used by `step()`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, *, total_steps: int, include_buffers: bool = False,
                 backend: str = "auto"):
        self.base_momentum = check_unit_interval(base_momentum, "base_momentum")
        self.final_momentum = check_unit_interval(final_momentum, "final_momentum")
        self.total_steps = check_int(total_steps, "total_steps", 1)
        self.include_buffers = bool(include_buffers)
        self.backend = check_backend_name(backend)
        for module, arg in ((student, "student"), (teacher, "teacher")):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{arg} must be an nn.Module, got {type(module).__name__}")
        self.student = unwrap_model(student)
        self.teacher = unwrap_model(teacher)
        if self.student is self.teacher:
            raise ValueError("student and teacher are the same module; the teacher must be a "
                             "separate copy (e.g. copy.deepcopy(student) before wrapping)")
        # the official array (float64, numpy's cos): cosine_scheduler over total_steps iterations
        self._schedule = cosine_scheduler(self.base_momentum, self.final_momentum,
                                          self.total_steps, 1)
        self.num_updates = 0
        self.last_backend: Optional[str] = None
        self.last_momentum: Optional[float] = None
        self._check_models()  # fail now, not at the first update, when the models do not match

    def _check_models(self) -> None:
        """What the models themselves decide (names, counts, floating dtypes, shapes), once, at
        construction. Devices and what the Triton kernel takes are checked at each update: the
        models may still move (`.to()`, `.cuda()`) after the EMA is built."""
        names, teachers, students = self._pairs()
        check_ema_inputs(teachers, students, names, one_device=False)

    def momentum(self, step: int) -> float:
        """The teacher momentum of iteration `step`, 0 <= step < total_steps."""
        step = check_index(step, "step", self.total_steps,
                           f"total_steps={self.total_steps}: one momentum per iteration")
        return float(self._schedule[step])

    def _pairs(self) -> tuple[list, list, list]:
        """(names, teacher tensors, student tensors), in the teacher's order, matched by name."""
        teacher = list(self.teacher.named_parameters())
        student = dict(self.student.named_parameters())
        kind = "parameters"
        if self.include_buffers:
            teacher += [(n, b) for n, b in self.teacher.named_buffers() if b.is_floating_point()]
            student.update((n, b) for n, b in self.student.named_buffers()
                           if b.is_floating_point())
            kind = "parameters and floating buffers"
        names = [n for n, _ in teacher]
        missing = [n for n in names if n not in student]
        extra = sorted(set(student) - set(names))
        if missing or extra:
            raise ValueError(f"student and teacher {kind} do not match by name: missing in the "
                             f"student: {missing[:5]}{' ...' if len(missing) > 5 else ''}; only "
                             f"in the student: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        return names, [t for _, t in teacher], [student[n] for n in names]

    def update(self, step: int) -> float:
        """Update the teacher with the momentum of iteration `step`; return that momentum.

        The counter used by `step()` becomes step + 1. Nothing is modified on a bad step or input.
        """
        momentum = self.momentum(step)
        names, teachers, students = self._pairs()
        self.last_backend = _ema_update(teachers, students, momentum, self.backend, names)
        self.last_momentum = momentum
        self.num_updates = int(step) + 1
        return momentum

    def step(self) -> float:
        """Update the teacher with the momentum of the next iteration (counted from 0)."""
        return self.update(self.num_updates)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore the iteration counter (the schedule itself comes from the constructor).

        `state` is what `state_dict()` returned: {"num_updates": an integer in [0, total_steps]}
        (total_steps: the schedule is finished). On a bad state nothing is changed.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (from TeacherEMA.state_dict()), got "
                            f"{type(state).__name__}")
        if set(state) != {"num_updates"}:
            raise ValueError(f"state must have exactly the key 'num_updates' (from "
                             f"TeacherEMA.state_dict()), got keys {sorted(map(str, state))}")
        num_updates = check_int(state["num_updates"], "state['num_updates']", 0)
        if num_updates > self.total_steps:
            raise ValueError(f"state['num_updates'] must be in [0, total_steps={self.total_steps}] "
                             f"(the iterations of this schedule), got {num_updates}")
        self.num_updates = num_updates

    def __repr__(self) -> str:
        return (f"TeacherEMA(base_momentum={self.base_momentum}, final_momentum="
                f"{self.final_momentum}, total_steps={self.total_steps}, include_buffers="
                f"{self.include_buffers}, backend={self.backend!r}, num_updates="
                f"{self.num_updates})")
