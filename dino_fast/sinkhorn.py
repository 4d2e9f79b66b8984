"""Sinkhorn-Knopp teacher (DINOv2 / DINOv3) as a centred softmax, in the log domain.

The official teacher (teacher logits X of shape (N, K), temperature tau, 3 iterations) starts from
exp(X / tau) and alternately divides every prototype column by its sum over all samples of all
ranks and every sample row by its sum, then scales rows to sum 1. Every step multiplies by a
vector, so the result is exactly

    Q_bk = softmax_k(X_bk / tau + log u_k)                                      (1)

for one per-prototype vector u (the row factors cancel in the final row normalisation, and so
do the global factors 1/K, 1/B and 1/sum(Q)). Equivalently Q = softmax((X - c) / tau) with the
center c = -tau * log u: the loss then consumes (X, c) exactly as it does for softmax centering,
and the SK step only has to produce K floats.

Computing u (a = X / tau, fp32):
- iteration 1, from exp(a): log u_k = -logsumexp_b a_bk, the column log-sum-exp shifted by the
  column's max over all ranks (one MAX all-reduce of K floats), so it is exact however large or
  small the logits: the official bare exp(a) overflows fp32 once a > 88 (a NaN teacher) and
  underflows to an all-zero column once a < -103 for every sample (0 / 0, NaN again);
- iterations 2..n, from the row-normalised P = softmax(a + log u): log u_k -= log sum_b P_bk.
  P lies in [0, 1]; after a column step every column holds 1/K of the mass and every row at most
  all of it, so each column sum of P is at least 1/K: nothing to underflow.
When a process group is initialised: one MAX all-reduce of K floats (the column maxima) and one
SUM all-reduce of K floats per iteration, as many collectives as the official code (its total
and one column sum per iteration); none without a process group.

Backends (`backend="auto" | "triton" | "eager"`, see dino_fast.backend; "auto" is Triton on
CUDA): both run the same iterations and collectives (`sinkhorn_log_scale`) on their own steps.
The eager steps on fp32 CPU logits run in C (`dino_fast.cpu_kernels`: each step one read of X in
place, one exponential per entry, K floats per thread); otherwise (other dtypes, no C compiler,
`DINO_FAST_CPU_KERNEL=0`) PyTorch ops holding a and one (n, K) fp32 workspace; the Triton steps
(dino_fast/kernels/sinkhorn.py) read X in place, 2n - 1 passes for n iterations, and hold O(K +
N) floats. The probabilities Q are the only (N, K) tensor `sinkhorn_knopp_probs` adds.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from dino_fast import cpu_kernels
from dino_fast.backend import check_backend_name, resolve_backend
from dino_fast.checks import check_floating_tensor, check_int, check_positive


def _group_active(group) -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _group_active(group):
        dist.all_reduce(t, op=op, group=group)
    return t


def check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations, n_valid_rows=None,
                          name: str = "teacher_output") -> tuple[int, int, int]:
    """Validate the SK inputs; return (N, K, n_valid_rows). teacher_output: (N, K), N >= 1; with
    a process group initialised a rank may give no valid row (N = 0 or n_valid_rows = 0): it
    still takes part in the collectives, so the other ranks do not wait for it forever."""
    check_floating_tensor(teacher_output, name)
    check_positive(teacher_temp, "teacher_temp")
    check_int(n_iterations, "n_iterations", 1)
    min_rows = 0 if _group_active(None) else 1
    if teacher_output.dim() != 2 or teacher_output.shape[0] < min_rows or \
            teacher_output.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (samples, prototypes) with at least one sample "
                         f"(none is allowed only with a process group) and one prototype, got "
                         f"shape {tuple(teacher_output.shape)}")
    n = teacher_output.shape[0]
    if n_valid_rows is None:
        n_valid_rows = n
    else:
        n_valid_rows = check_int(n_valid_rows, "n_valid_rows", min_rows)
        if n_valid_rows > n:
            raise ValueError(f"n_valid_rows must be <= the {n} rows of {name}, got {n_valid_rows}")
    return n, teacher_output.shape[1], n_valid_rows


def select_sinkhorn_backend(backend: str, teacher_output: torch.Tensor,
                            op: str = "sinkhorn_knopp") -> str:
    """"triton" or "eager" for teacher logits on this device (see dino_fast.backend): "auto"
    is Triton on CUDA, eager elsewhere. Both compute in fp32 whatever the input dtype."""
    check_backend_name(backend)
    return resolve_backend(backend, teacher_output.device, op)


class _EagerSteps:
    """The SK steps of `sinkhorn_log_scale` in plain PyTorch, on a = X / tau (n, K) fp32 (owned:
    overwritten by `probs`), with one (n, K) fp32 workspace besides a."""

    def __init__(self, a: torch.Tensor, n_valid_rows: int):
        self.a, self.n = a, n_valid_rows
        self.work = torch.empty_like(a[:n_valid_rows])

    def first_column_step(self):
        """(col_max, col_sum), col_sum_k = sum_b exp(a_bk - col_max_k) over the n rows."""
        a = self.a[:self.n]
        col_max = a.amax(dim=0)
        return col_max, torch.sub(a, col_max, out=self.work).exp_().sum(dim=0)

    def column_step(self, log_u: torch.Tensor) -> torch.Tensor:
        """Column sums of the row step P = softmax(a + log u) = E / r, with E = exp(a + log u -
        row max) and r its row sums: sum_b P_bk = (1 / r) @ E, P never written."""
        work = torch.add(self.a[:self.n], log_u, out=self.work)
        work.sub_(work.amax(dim=-1, keepdim=True)).exp_()
        return torch.mv(work.t(), work.sum(dim=-1).reciprocal_())

    def probs(self, log_u: torch.Tensor) -> torch.Tensor:
        """softmax(a + log u) over every row of a, in place."""
        self.work = None
        a = self.a.add_(log_u)
        a.sub_(a.amax(dim=-1, keepdim=True)).exp_()
        return a.div_(a.sum(dim=-1, keepdim=True))


class _CpuKernelSteps:
    """The eager steps on fp32 CPU logits with the C kernel of `dino_fast.cpu_kernels`
    (kernels/cpu_rows.c): the same formulas, each step one read of x in place and one
    exponential per entry, on the OpenMP runtime's threads; O(K) floats of work."""

    def __init__(self, fn, x: torch.Tensor, teacher_temp: float, n_valid_rows: int):
        self.fn, self.x, self.n = fn, x, n_valid_rows
        self.inv_t = 1.0 / float(teacher_temp)

    def _step(self, op, vec=None, out=None):
        return cpu_kernels.sinkhorn_step(self.fn, op, self.x, self.n if out is None else
                                         self.x.shape[0], self.inv_t, vec, out)

    def first_column_step(self):
        col_max = self._step(cpu_kernels.SK_COL_MAX)
        return col_max, self._step(cpu_kernels.SK_COL_SUM, col_max)

    def column_step(self, log_u: torch.Tensor) -> torch.Tensor:
        return self._step(cpu_kernels.SK_COL_STEP, log_u.contiguous())

    def probs(self, log_u: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.x.shape, dtype=torch.float32)
        self._step(cpu_kernels.SK_PROBS, log_u.contiguous(), out)
        return out


def _cpu_kernel_for(x: torch.Tensor):
    """The C kernel's SK steps when they apply (fp32 CPU logits with unit column stride, not
    under torch.compile) and are built, else None (the PyTorch ops)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] == 0 or \
            (x.shape[1] > 1 and x.stride(1) != 1) or torch.compiler.is_compiling():
        return None
    return cpu_kernels.sinkhorn_kernel()


class _NoRowSteps:
    """The steps of a rank with no valid row (only with a process group): it adds nothing to
    the column maxima and sums but joins every collective; its probabilities are those of its
    (padding) rows under the group's log u."""

    def __init__(self, teacher_output: torch.Tensor, teacher_temp: float):
        self.x, self.tau = teacher_output, teacher_temp
        self.zeros = torch.zeros(teacher_output.shape[1], dtype=torch.float32,
                                 device=teacher_output.device)

    def first_column_step(self):
        return torch.full_like(self.zeros, -torch.inf), self.zeros.clone()

    def column_step(self, log_u: torch.Tensor) -> torch.Tensor:
        return self.zeros.clone()

    def probs(self, log_u: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.x.float() / self.tau + log_u, dim=-1)


def _steps(teacher_output: torch.Tensor, teacher_temp: float, n_valid_rows: int, backend: str,
           *, all_rows: bool):
    """The steps of `backend` ("triton" or "eager"); all_rows: the eager a covers every row of
    teacher_output (for `probs`), not only the n valid ones."""
    if n_valid_rows == 0:
        return _NoRowSteps(teacher_output, teacher_temp)
    if backend == "triton":
        # imported on first use: kernel modules must be imported after TRITON_INTERPRET is set
        from dino_fast.kernels.sinkhorn import TritonSinkhornSteps
        return TritonSinkhornSteps(teacher_output, teacher_temp, n_valid_rows)
    rows = teacher_output if all_rows else teacher_output[:n_valid_rows]
    fn = _cpu_kernel_for(rows)
    if fn is not None:
        return _CpuKernelSteps(fn, rows, teacher_temp, n_valid_rows)
    return _EagerSteps(rows.float() / teacher_temp, n_valid_rows)  # a fresh (rows, K) fp32


def sinkhorn_log_scale(steps, n_iterations: int, process_group) -> torch.Tensor:
    """log u (K,) fp32 after n_iterations, from a backend's steps (`_EagerSteps`,
    dino_fast.kernels.sinkhorn.TritonSinkhornSteps): the iterations and the collectives, the
    same for every backend. With a process group: one MAX all-reduce of the K column maxima
    (each rank's column sums are rescaled to the global maxima before they are summed) and one
    SUM all-reduce of K floats per iteration."""
    col_max, col_sum = steps.first_column_step()
    if _group_active(process_group):
        global_max = _all_reduce(col_max.clone(), dist.ReduceOp.MAX, process_group)
        col_sum = _all_reduce(col_sum * torch.exp(col_max - global_max), dist.ReduceOp.SUM,
                              process_group)
        col_max = global_max
    log_u = -(col_max + torch.log(col_sum))
    for _ in range(n_iterations - 1):
        p_col_sum = _all_reduce(steps.column_step(log_u), dist.ReduceOp.SUM, process_group)
        log_u -= torch.log(p_col_sum.clamp_min(torch.finfo(torch.float32).tiny))
    return log_u


@torch.no_grad()
def sinkhorn_knopp_log_scale(teacher_output: torch.Tensor, teacher_temp: float,
                             n_iterations: int = 3, *, n_valid_rows: Optional[int] = None,
                             process_group=None, backend: str = "auto") -> torch.Tensor:
    """log u of equation (1): a (K,) fp32 vector with softmax(X / tau + log u) = the SK teacher.

    teacher_output: (N, K) teacher logits, any floating dtype (computed in fp32).
    n_valid_rows: only the first n rows take part in the column sums (the rest is padding, as in
        a fixed-size buffer of masked patches); the official classes use every row given.
    process_group: the group whose samples are balanced together (default: the default group when
        one is initialised; a single process otherwise). With a group, a rank without samples
        (N = 0 or n_valid_rows = 0) still joins every collective and gets the group's log u
        (NaN when no rank of the group has a sample).
    backend: "auto" (Triton on CUDA, eager elsewhere), "triton" (on CPU only under
        TRITON_INTERPRET=1) or "eager". The Triton path reads the logits 2 * n_iterations - 1
        times and holds O(K + N) floats; the eager path on fp32 CPU logits (C) n + 1 times and
        K floats per thread, otherwise two (n, K) fp32 tensors.
    log u is defined up to an additive constant (it cancels in the softmax).
    """
    _, _, n_valid = check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations, n_valid_rows)
    resolved = select_sinkhorn_backend(backend, teacher_output, "sinkhorn_knopp_log_scale")
    steps = _steps(teacher_output, teacher_temp, n_valid, resolved, all_rows=False)
    return sinkhorn_log_scale(steps, n_iterations, process_group)


def sinkhorn_knopp_center(teacher_output: torch.Tensor, teacher_temp: float,
                          n_iterations: int = 3, *, n_valid_rows: Optional[int] = None,
                          process_group=None, backend: str = "auto") -> torch.Tensor:
    """The SK teacher as a center: c (K,) fp32 with softmax((X - c) / tau) = the SK teacher.

    c = -tau * log u (see `sinkhorn_knopp_log_scale`, same arguments). Pass it with the teacher
    logits to a loss that takes a center, so the (N, K) teacher probabilities are never built.

    Example:
        >>> x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 5
        >>> c = sinkhorn_knopp_center(x, 0.04)
        >>> q = torch.softmax((x - c) / 0.04, dim=-1)
        >>> torch.allclose(q, sinkhorn_knopp_probs(x, 0.04), atol=1e-5)
        True
    """
    log_u = sinkhorn_knopp_log_scale(teacher_output, teacher_temp, n_iterations,
                                     n_valid_rows=n_valid_rows, process_group=process_group,
                                     backend=backend)
    return log_u.mul_(-float(teacher_temp))


@torch.no_grad()
def sinkhorn_knopp_probs(teacher_output: torch.Tensor, teacher_temp: float,
                         n_iterations: int = 3, *, n_valid_rows: Optional[int] = None,
                         process_group=None, backend: str = "auto") -> torch.Tensor:
    """The SK teacher probabilities Q (N, K) fp32, rows summing to 1: what the official
    `sinkhorn_knopp_teacher` returns where it is finite, and the same formula, finite, where the
    official exp overflows or underflows. Arguments as `sinkhorn_knopp_log_scale`; Q is the
    only (N, K) tensor the Triton path allocates."""
    _, _, n_valid = check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations, n_valid_rows)
    resolved = select_sinkhorn_backend(backend, teacher_output, "sinkhorn_knopp_probs")
    steps = _steps(teacher_output, teacher_temp, n_valid, resolved, all_rows=True)
    return steps.probs(sinkhorn_log_scale(steps, n_iterations, process_group))
