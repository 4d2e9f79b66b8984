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

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dino_fast.backend import check_backend_name, resolve_backend
from dino_fast.checks import (check_floating_tensor, check_index, check_int, check_positive,
                              check_unit_interval)

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


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64 (the exactness tests), fp32 otherwise: every reduction of the
    loss accumulates at least in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def crop_multiplicities(ncrops: int, n_global: int = N_GLOBAL_CROPS) -> tuple[int, int]:
    """(m_global, m_local): how many teacher crops each student crop is paired with."""
    return n_global - 1, n_global


def num_pairs(ncrops: int, n_global: int = N_GLOBAL_CROPS) -> int:
    return n_global * ncrops - n_global


def _scaled_crop(crop: torch.Tensor, temp: float, out: torch.Tensor) -> torch.Tensor:
    """out <- crop / temp, computed in out's dtype (bf16/fp16 crops are widened first)."""
    if crop.dtype == out.dtype:
        return torch.div(crop, temp, out=out)
    return out.copy_(crop).div_(temp)


class _DINOLossEager(torch.autograd.Function):
    """Eager loss with the closed-form gradient (see the module docstring), one crop at a time.

    Per student crop v, in the compute dtype: y = S_v / tau_s, p = softmax(y) (torch's fused row
    kernel), and a row's term -<Q, log p> from the row maxima: log p = (y - max y) + log max p,
    as the largest p is exp(0) / sum exp(y - max y) >= 1/K (no underflow), so the term is
    -<Q, y - max y> - (sum_k Q_k) log max p, two non-negative parts: no cancellation, however
    large the logits (lse and <Q, y> apart would cancel when the student agrees with a peaked
    teacher). When the student needs a gradient and is stored in the compute dtype (fp32/fp64),
    the same p becomes dL/dS_v at once, written into the gradient tensor, so the backward only
    hands it over (scaled by grad_output unless that is 1): S is read once per step instead of
    twice, and no (B, K) tensor exists per pair.
    The price: the gradient (the size of S) is held from the forward until the backward (or
    until the graph is freed), where the official formulation holds one log_softmax per pair;
    it is kept on ctx, not saved with save_for_backward, so saved-tensor hooks (save_on_cpu)
    do not see it. Whether to build it is decided by the caller (grad mode on and the student
    requiring grad), as needs_input_grad is also true under no_grad.
    Low-precision students (bf16/fp16) get their gradient in the backward instead, from p
    recomputed in fp32 and scaled by grad_output before rounding: fp16 cannot hold the unscaled
    gradient (~1e-7, below its normal range), which is why a loss scaler multiplies it.
    Temporaries: a (B, K) work buffer or two allocated once per call and reused by every crop,
    and the three distinct Q_v (scaled for the gradient when it is built in the forward).
    """

    @staticmethod
    def forward(ctx, student, teacher, center, ncrops, student_temp, teacher_temp,
                grad_in_forward):
        G, V = N_GLOBAL_CROPS, ncrops
        B, K = student.shape[0] // V, student.shape[1]
        cdt = compute_dtype(student, teacher)
        q = torch.softmax((teacher.to(cdt) - center.to(cdt)) / teacher_temp, dim=-1).view(G, B, K)
        pair_q = _paired_teacher_probs(q)
        pair_q_rows = _paired_teacher_probs(q.sum(dim=-1))  # (B,) each: 1 up to rounding
        crops = student.view(V, B, K)
        m_global, m_local = crop_multiplicities(V)
        scale = 1.0 / (num_pairs(V) * B * student_temp)  # dL/dS at grad_output = 1
        grad = None
        if grad_in_forward and student.dtype == cdt:
            grad = torch.empty((V, B, K), dtype=cdt, device=student.device)
            neg_q = [t * -scale for t in pair_q]
        y = torch.empty((B, K), dtype=cdt, device=student.device)
        p = None if grad is not None else torch.empty_like(y)
        total = torch.zeros((), dtype=cdt, device=student.device)
        for v in range(V):
            m = m_global if v < G else m_local
            Q = pair_q[min(v, G)]
            y = _scaled_crop(crops[v], student_temp, y)
            p_v = grad[v] if grad is not None else p
            torch.ops.aten._softmax.out(y, -1, False, out=p_v)
            # -<Q, log p> = -<Q, y - max y> - (sum_k Q_k) log max p. Row dots, then their sum:
            # torch.dot over all B*K terms goes to BLAS, whose fp32 dot (MKL on an AMD EPYC)
            # was 8e-6 off over 2M terms, vecdot 1e-7
            y.sub_(torch.amax(y, dim=-1, keepdim=True))
            total -= (torch.linalg.vecdot(Q, y, dim=-1)
                      + pair_q_rows[min(v, G)] * torch.log(torch.amax(p_v, dim=-1))).sum()
            if grad is not None:  # dL/dS_v = (m p - Q_v) * scale, in place
                torch.add(neg_q[min(v, G)], p_v, alpha=m * scale, out=p_v)
        loss = total / (num_pairs(V) * B)
        ctx.save_for_backward(student, q)
        ctx.ncrops, ctx.student_temp = V, student_temp
        ctx.grad = grad  # handed over by the first backward (a retained graph recomputes it)
        return loss.to(torch.float64 if cdt == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, q = ctx.saved_tensors
        V = ctx.ncrops
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            # on CPU reading grad_loss costs nothing; elsewhere scale without a host sync
            if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
                grad.mul_(grad_loss.to(grad.dtype))
            return grad.view(student.shape), None, None, None, None, None, None
        with torch.autocast(student.device.type, enabled=False):
            grad = _recompute_grad(student, q, V, ctx.student_temp, grad_loss)
        return grad, None, None, None, None, None, None


def _recompute_grad(student, q, V, tau_s, grad_loss):
    """dL/dS_vb = (m_v p_vb - Q_vb) * scale, scale = grad / (|P| B tau_s), Q_v = sum_{i != v} q_i,
    p_vb = softmax(S_vb / tau_s), one crop at a time, computed in q's dtype and rounded once."""
    G = N_GLOBAL_CROPS
    B, K = student.shape[0] // V, student.shape[1]
    scale = grad_loss.to(q.dtype) / (num_pairs(V) * B * tau_s)
    m_global, m_local = crop_multiplicities(V)
    neg_q = [t * -scale for t in _paired_teacher_probs(q)]
    grad = torch.empty((V, B, K), dtype=student.dtype, device=student.device)
    crops = student.view(V, B, K)
    y = torch.empty((B, K), dtype=q.dtype, device=student.device)
    p = torch.empty_like(y)
    for v in range(V):
        torch.ops.aten._softmax.out(_scaled_crop(crops[v], tau_s, y), -1, False, out=p)
        m = m_global if v < G else m_local
        if grad.dtype == p.dtype:  # write the gradient in one pass
            torch.addcmul(neg_q[min(v, G)], p, scale, value=m, out=grad[v])
        else:
            grad[v].copy_(torch.addcmul(neg_q[min(v, G)], p, scale, value=m, out=y))
    return grad.view(V * B, K)


def _paired_teacher_probs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three distinct Q_v = sum_{i != v} q_i, q of shape (2, B, K): Q_v is entry min(v, 2).
    Crop 0 pairs with teacher crop 1 only, crop 1 with crop 0 only, a local crop with both."""
    return q[1], q[0], q[0] + q[1]


def dino_loss_eager(student_output: torch.Tensor, teacher_output: torch.Tensor,
                    center: torch.Tensor, ncrops: int, student_temp: float,
                    teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager DINO loss: returns (loss, teacher_row_sum).

    loss: fp32 scalar (fp64 for fp64 inputs), differentiable w.r.t. student_output.
    teacher_row_sum: (K,) fp32, the sum of teacher_output over its rows, for the center update.
    The teacher gets no gradient. Inputs are validated (see `check_loss_inputs`).
    """
    check_loss_inputs(student_output, teacher_output, center, ncrops,
                      student_temp=student_temp, teacher_temp=teacher_temp)
    teacher = teacher_output.detach()
    grad_in_forward = torch.is_grad_enabled() and student_output.requires_grad
    # the loss computes in its inputs' dtype, as on CUDA; CPU autocast would round the row
    # dots (vecdot) to bf16/fp16 (5e-4 relative on the loss under bf16)
    with torch.autocast(student_output.device.type, enabled=False):
        loss = _DINOLossEager.apply(student_output, teacher, center.detach(), ncrops,
                                    float(student_temp), float(teacher_temp), grad_in_forward)
    row_sum = torch.sum(teacher, dim=0, dtype=torch.float32)
    return loss, row_sum


def _loss_path(backend: str):
    """The functional loss of a resolved backend, "triton" or "eager"."""
    if backend == "triton":
        # imported on first use: kernel modules must be imported after TRITON_INTERPRET is set
        from dino_fast.kernels.dino_loss import dino_loss_triton
        return dino_loss_triton
    return dino_loss_eager


def select_loss_backend(backend: str, student_output: torch.Tensor,
                        teacher_output: torch.Tensor, op: str = "dino_loss") -> str:
    """"triton" or "eager" for these inputs (see dino_fast.backend). "auto" also sends fp64
    inputs to the eager path: the kernels compute in fp32, fp64 asks for fp64 exactness."""
    resolved = resolve_backend(backend, student_output.device, op)
    if backend == "auto" and compute_dtype(student_output, teacher_output) == torch.float64:
        return "eager"
    return resolved


def dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
              ncrops: int, student_temp: float, teacher_temp: float, *,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Functional DINO loss, for users who keep their own center logic: (loss, teacher_row_sum).

    Same inputs and outputs as `dino_loss_eager`; `backend` as in `DINOLoss` ("auto": the fused
    Triton kernels on CUDA, the eager path on CPU and for fp64). The center is only read.
    """
    check_loss_inputs(student_output, teacher_output, center, ncrops,
                      student_temp=student_temp, teacher_temp=teacher_temp)
    backend = select_loss_backend(backend, student_output, teacher_output)
    return _loss_path(backend)(student_output, teacher_output, center, ncrops, student_temp,
                               teacher_temp)


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float,
                          warmup_teacher_temp_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (the official schedule)."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


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
        nepochs = check_int(nepochs, "nepochs", 1)
        warmup_teacher_temp_epochs = check_int(warmup_teacher_temp_epochs,
                                                "warmup_teacher_temp_epochs", 0)
        if warmup_teacher_temp_epochs > nepochs:
            raise ValueError(f"warmup_teacher_temp_epochs must be <= nepochs={nepochs}, got "
                             f"{warmup_teacher_temp_epochs}")
        check_positive(warmup_teacher_temp, "warmup_teacher_temp")
        check_positive(teacher_temp, "teacher_temp")
        self.student_temp = check_positive(student_temp, "student_temp")
        self.center_momentum = check_unit_interval(center_momentum, "center_momentum")
        self.backend = check_backend_name(backend)
        self.async_center = bool(async_center)
        self.last_backend: Optional[str] = None
        self.register_buffer("center", torch.zeros(1, out_dim))
        # we apply the same per-epoch schedule as the official script
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self._pending_center = None  # (work handle, row sum, global row count) when async
        self.register_state_dict_pre_hook(lambda module, *args, **kwargs: module.synchronize_center())

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
        backend = select_loss_backend(self.backend, student_output, teacher_output, "DINOLoss")
        loss, row_sum = _loss_path(backend)(student_output, teacher_output, self.center,
                                            self.ncrops, self.student_temp,
                                            float(self.teacher_temp_schedule[epoch]))
        self.last_backend = backend
        self.update_center(row_sum, teacher_output.shape[0])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_row_sum: torch.Tensor, n_rows: int) -> None:
        """EMA of the teacher's batch mean: c <- m*c + (1-m) * sum_rows(T) / (rows * world)."""
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
