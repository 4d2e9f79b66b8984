"""The DINO loss: a drop-in replacement of the official training script's `DINOLoss`.

Math (crop-major rows; G = 2 teacher crops, V student crops, B samples, K = out_dim):

    q_ib  = softmax((T_ib - c) / tau_t)                      teacher, no gradient
    P     = {(i, v) : i < G, v < V, v != i},  |P| = G*V - G
    L     = 1/|P| * sum_{(i,v) in P} mean_b [ -sum_k q_ib,k * log_softmax(S_vb / tau_s)_k ]

Since sum_k q = 1, a pair term is lse(S_vb/tau_s) - <q_ib, S_vb>/tau_s, so one log-sum-exp per
student row and the teacher/student dot products give the whole loss; no pair ever needs its own
(B, K) tensor. With m_v = #{i < G : i != v} and Q_vb = sum_{i != v} q_ib:

    dL/dS_vb = (m_v * softmax(S_vb / tau_s) - Q_vb) / (|P| * B * tau_s)

The center is updated after the loss (which used the old center) from the teacher's row sum,
all-reduced over the process group when there is one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dino_fast.backend import check_backend_name
from dino_fast.checks import (
    check_floating_tensor,
    check_index,
    check_int,
    check_positive,
    check_unit_interval,
)
from dino_fast.cross_entropy import select_backend, soft_cross_entropy
from dino_fast.schedules import teacher_temp_schedule

N_GLOBAL_CROPS = 2  # the teacher sees the two global crops, rows 0..2B-1 of the student too


def check_loss_inputs(student_output, teacher_output, center, ncrops: int, *,
                      student_temp=None, teacher_temp=None) -> tuple[int, int]:
    """Validate the loss inputs; return (B, K). Raises before anything is computed or written.

    student_output: (ncrops*B, K), teacher_output: (2*B, K), center: (1, K) fp32, ncrops >= 2;
    the temperatures, when given, positive and finite (the module checks its own at construction).
    """
    check_int(ncrops, "ncrops", N_GLOBAL_CROPS)
    if student_temp is not None:
        check_positive(student_temp, "student_temp")
    if teacher_temp is not None:
        check_positive(teacher_temp, "teacher_temp")
    check_floating_tensor(student_output, "student_output")
    check_floating_tensor(teacher_output, "teacher_output")
    if student_output.dim() != 2:
        raise ValueError(f"student_output must be 2-D (ncrops*batch, out_dim), got shape "
                         f"{tuple(student_output.shape)}")
    if teacher_output.dim() != 2:
        raise ValueError(f"teacher_output must be 2-D (2*batch, out_dim), got shape "
                         f"{tuple(teacher_output.shape)}")
    rows, K = student_output.shape
    if rows == 0 or rows % ncrops != 0:
        raise ValueError(f"student_output has {rows} rows, which is not a positive multiple of "
                         f"ncrops={ncrops} (rows must be ncrops*batch, crop-major)")
    B = rows // ncrops
    if teacher_output.shape[0] != N_GLOBAL_CROPS * B:
        raise ValueError(f"teacher_output must have {N_GLOBAL_CROPS}*batch = {N_GLOBAL_CROPS * B} "
                         f"rows (batch={B} from student_output), got {teacher_output.shape[0]}")
    check_floating_tensor(center, "center")
    if center.dim() != 2 or center.shape[0] != 1:
        raise ValueError(f"center must have shape (1, out_dim), got {tuple(center.shape)}")
    if center.shape != (1, K) or teacher_output.shape[1] != K:
        raise ValueError(f"out_dim mismatch: the loss was built with out_dim={center.shape[1]}, "
                         f"student_output has {K} columns and teacher_output has "
                         f"{teacher_output.shape[1]}")
    if teacher_output.device != student_output.device:
        raise ValueError(f"teacher_output is on {teacher_output.device} but student_output is on "
                         f"{student_output.device}; both must be on the same device")
    if center.device != student_output.device:
        raise ValueError(f"the loss's center buffer is on {center.device} but student_output is on "
                         f"{student_output.device}; move the loss there first (loss.to(device) or "
                         f"loss.cuda(), as the official script does)")
    return B, K


def num_pairs(ncrops: int, n_global: int = N_GLOBAL_CROPS) -> int:
    """|P|: the (teacher crop, student crop) pairs of the loss, every crop but the same one."""
    return n_global * ncrops - n_global


def dino_pair_weight(ncrops: int, n_global: int = N_GLOBAL_CROPS) -> tuple:
    """The (ncrops, n_global) pair table of the DINO loss: W[v][i] = 1 when v != i, else 0."""
    return tuple(tuple(0.0 if v == i else 1.0 for i in range(n_global)) for v in range(ncrops))


def _scaled_crop(crop: torch.Tensor, temp: float, out: torch.Tensor) -> torch.Tensor:
    """out <- crop / temp, computed in out's dtype (bf16/fp16 crops are widened first)."""
    if crop.dtype == out.dtype:
        return torch.div(crop, temp, out=out)
    return out.copy_(crop).div_(temp)


def dino_loss_eager(student_output: torch.Tensor, teacher_output: torch.Tensor,
                    center: torch.Tensor, ncrops: int, student_temp: float,
                    teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager DINO loss: returns (loss, teacher_row_sum).

    loss: fp32 scalar (fp64 for fp64 inputs), differentiable w.r.t. student_output.
    teacher_row_sum: (K,) fp32, the sum of teacher_output over its rows, for the center update.
    The teacher gets no gradient. Inputs are validated (see `check_loss_inputs`).
    """
    B, _ = check_loss_inputs(student_output, teacher_output, center, ncrops,
                             student_temp=student_temp, teacher_temp=teacher_temp)
    return _dino_loss(student_output, teacher_output, center, ncrops, student_temp,
                      teacher_temp, "eager")


def _dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp,
               backend):
    """The DINO loss as one soft cross-entropy call, on validated inputs."""
    B = student_output.shape[0] // ncrops
    return soft_cross_entropy(
        student_output, teacher_output, dino_pair_weight(ncrops), student_temp=student_temp,
        teacher_temp=teacher_temp, center=center, scale=1.0 / (num_pairs(ncrops) * B),
        teacher_sum=True, backend=backend)


def dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
              ncrops: int, student_temp: float, teacher_temp: float, *,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Functional DINO loss, for users who keep their own center logic: (loss, teacher_row_sum).

    Same inputs and outputs as `dino_loss_eager`; `backend` as in `DINOLoss` ("auto": the fused
    Triton kernels on CUDA, the eager path on CPU and for fp64). The center is only read.
    """
    check_loss_inputs(student_output, teacher_output, center, ncrops,
                      student_temp=student_temp, teacher_temp=teacher_temp)
    backend = select_backend(backend, student_output, teacher_output, "dino_loss")
    return _dino_loss(student_output, teacher_output, center, ncrops, student_temp,
                      teacher_temp, backend)


class DINOLoss(nn.Module):
    """Drop-in replacement of the official DINO training script's `DINOLoss`.

    Same constructor, `forward(student_output, teacher_output, epoch)`, `center` buffer (1, out_dim)
    fp32, `teacher_temp_schedule` numpy array and state_dict (`{'center': ...}`) as the official
    class. Extras, keyword-only:

    backend: "auto" (Triton on CUDA, eager on CPU and for fp64 inputs, which the eager path
        computes in fp64), "triton" (fp64 inputs then computed in fp32) or "eager". After each
        call, `last_backend` says which ran.
    async_center: launch the center's all-reduce asynchronously and wait for it at the next use
        of the center (next forward, state_dict, or `synchronize_center()`), as DINOv2 does.

    Unlike the official class, no process group is required; with one initialized, the teacher's
    row sum is all-reduced (SUM) and divided by the global row count.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, backend: str = "auto",
                 async_center: bool = False):
        super().__init__()
        out_dim = check_int(out_dim, "out_dim", 1)
        self.ncrops = check_int(ncrops, "ncrops", N_GLOBAL_CROPS)
        # we apply the same per-epoch schedule as the official script (it checks its arguments)
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.student_temp = check_positive(student_temp, "student_temp")
        self.center_momentum = check_unit_interval(center_momentum, "center_momentum")
        self.backend = check_backend_name(backend)
        self.async_center = bool(async_center)
        self.last_backend: Optional[str] = None
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending_center = None  # (work handle, row sum, global row count) when async
        self.register_state_dict_pre_hook(
            lambda module, *args, **kwargs: module.synchronize_center())

    @property
    def out_dim(self) -> int:
        return self.center.shape[1]

    def _check_epoch(self, epoch) -> int:
        n = len(self.teacher_temp_schedule)
        return check_index(epoch, "epoch", n, f"the teacher temperature schedule has "
                                              f"nepochs={n} entries")

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> torch.Tensor:
        """Cross-entropy between softmax outputs of the teacher and student networks.

        student_output: (ncrops*B, out_dim), crop-major; teacher_output: (2*B, out_dim), the two
        global crops. Returns the loss, an fp32 scalar, and then updates the center.
        """
        epoch = self._check_epoch(epoch)
        check_loss_inputs(student_output, teacher_output, self.center, self.ncrops)
        self.synchronize_center()
        backend = select_backend(self.backend, student_output, teacher_output, "DINOLoss")
        loss, row_sum = _dino_loss(student_output, teacher_output, self.center, self.ncrops,
                                   self.student_temp, float(self.teacher_temp_schedule[epoch]),
                                   backend)
        self.last_backend = backend
        self._update_center_from_sum(row_sum, teacher_output.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Update the center used for the teacher output, as the official method:
        c <- m*c + (1-m) * mean over the rows of teacher_output (and over the process group).

        teacher_output: (rows, out_dim) logits, floating, on the center's device. `forward` does
        this itself (from the row sum its kernel computed); the method is for users who update
        the center from other outputs.
        """
        check_floating_tensor(teacher_output, "teacher_output")
        if teacher_output.dim() != 2 or teacher_output.shape[0] == 0:
            raise ValueError(f"teacher_output must be 2-D (rows, out_dim) with at least one row, "
                             f"got shape {tuple(teacher_output.shape)}")
        if teacher_output.shape[1] != self.out_dim:
            raise ValueError(f"out_dim mismatch: the loss was built with out_dim={self.out_dim}, "
                             f"teacher_output has {teacher_output.shape[1]} columns")
        if teacher_output.device != self.center.device:
            raise ValueError(f"teacher_output is on {teacher_output.device} and the center on "
                             f"{self.center.device}: move the loss module (.to(device)) or the "
                             f"tensor so that both are on one device")
        self.synchronize_center()
        self._update_center_from_sum(teacher_output.float().sum(0), teacher_output.shape[0])

    @torch.no_grad()
    def _update_center_from_sum(self, teacher_row_sum: torch.Tensor, n_rows: int) -> None:
        """The center update from the teacher's row sum over this rank's n_rows rows (checked by
        the caller): c <- m*c + (1-m) * sum_rows(T) / (rows * world)."""
        row_sum = teacher_row_sum.to(torch.float32).view(1, -1)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if self.async_center:
                work = dist.all_reduce(row_sum, async_op=True)
                self._pending_center = (work, row_sum, n_rows * world)
                return
            dist.all_reduce(row_sum)
        self._apply_center(row_sum, n_rows * world)

    def _apply_center(self, row_sum: torch.Tensor, total_rows: int) -> None:
        batch_center = row_sum / total_rows
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    @torch.no_grad()
    def synchronize_center(self) -> None:
        """Finish an asynchronous center update, if one is pending (no-op otherwise)."""
        if self._pending_center is not None:
            work, row_sum, total_rows = self._pending_center
            self._pending_center = None
            work.wait()
            self._apply_center(row_sum, total_rows)
