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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from dino_fast.checks import check_floating_tensor, check_int, check_positive


def _group_active(group) -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _group_active(group):
        dist.all_reduce(t, op=op, group=group)
    return t


def check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations, n_valid_rows=None,
                          name: str = "teacher_output") -> tuple[int, int, int]:
    """Validate the SK inputs; return (N, K, n_valid_rows). teacher_output: (N, K), N >= 1."""
    check_floating_tensor(teacher_output, name)
    check_positive(teacher_temp, "teacher_temp")
    check_int(n_iterations, "n_iterations", 1)
    if teacher_output.dim() != 2 or teacher_output.shape[0] == 0 or teacher_output.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D (samples, prototypes) with at least one sample and "
                         f"one prototype, got shape {tuple(teacher_output.shape)}")
    n = teacher_output.shape[0]
    if n_valid_rows is None:
        n_valid_rows = n
    else:
        n_valid_rows = check_int(n_valid_rows, "n_valid_rows", 1)
        if n_valid_rows > n:
            raise ValueError(f"n_valid_rows must be <= the {n} rows of {name}, got {n_valid_rows}")
    return n, teacher_output.shape[1], n_valid_rows


@torch.no_grad()
def sinkhorn_knopp_log_scale(teacher_output: torch.Tensor, teacher_temp: float,
                             n_iterations: int = 3, *, n_valid_rows: Optional[int] = None,
                             process_group=None) -> torch.Tensor:
    """log u of equation (1): a (K,) fp32 vector with softmax(X / tau + log u) = the SK teacher.

    teacher_output: (N, K) teacher logits, any floating dtype (computed in fp32).
    n_valid_rows: only the first n rows take part in the column sums (the rest is padding, as in
        a fixed-size buffer of masked patches); the official classes use every row given.
    process_group: the group whose samples are balanced together (default: the default group when
        one is initialised; a single process otherwise).
    log u is defined up to an additive constant (it cancels in the softmax).
    """
    _, _, n_valid = check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations, n_valid_rows)
    return _log_scale(teacher_output[:n_valid].float() / teacher_temp, n_iterations, process_group)


def _log_scale(a: torch.Tensor, n_iterations: int, process_group) -> torch.Tensor:
    """log u from a = X / tau (n, K) fp32; one (n, K) workspace besides a."""
    # iteration 1: column log-sum-exp of a, shifted by the column max over all ranks
    col_max = _all_reduce(a.amax(dim=0), dist.ReduceOp.MAX, process_group)
    work = torch.sub(a, col_max)
    col_sum = _all_reduce(work.exp_().sum(dim=0), dist.ReduceOp.SUM, process_group)
    log_u = -(col_max + torch.log(col_sum))
    for _ in range(n_iterations - 1):
        # the row step, P = softmax(a + log u) = E / r with E = exp(a + log u - row max) and r
        # its row sums, then the column step on P: sum_b P_bk = (1 / r) @ E, P never written
        torch.add(a, log_u, out=work)
        work.sub_(work.amax(dim=-1, keepdim=True)).exp_()
        p_col_sum = _all_reduce(torch.mv(work.t(), work.sum(dim=-1).reciprocal_()),
                                dist.ReduceOp.SUM, process_group)
        log_u -= torch.log(p_col_sum.clamp_min(torch.finfo(torch.float32).tiny))
    return log_u


def sinkhorn_knopp_center(teacher_output: torch.Tensor, teacher_temp: float,
                          n_iterations: int = 3, *, n_valid_rows: Optional[int] = None,
                          process_group=None) -> torch.Tensor:
    """The SK teacher as a center: c (K,) fp32 with softmax((X - c) / tau) = the SK teacher.

    c = -tau * log u (see `sinkhorn_knopp_log_scale`, same arguments). Pass it with the teacher
    logits to a loss that takes a center, so the (N, K) teacher probabilities are never built.

    Example:
        >>> x = torch.randn(8, 16) * 5
        >>> c = sinkhorn_knopp_center(x, 0.04)
        >>> q = torch.softmax((x - c) / 0.04, dim=-1)
        >>> torch.allclose(q, sinkhorn_knopp_probs(x, 0.04), atol=1e-6)
        True
    """
    log_u = sinkhorn_knopp_log_scale(teacher_output, teacher_temp, n_iterations,
                                     n_valid_rows=n_valid_rows, process_group=process_group)
    return log_u.mul_(-float(teacher_temp))


@torch.no_grad()
def sinkhorn_knopp_probs(teacher_output: torch.Tensor, teacher_temp: float,
                         n_iterations: int = 3, *, n_valid_rows: Optional[int] = None,
                         process_group=None) -> torch.Tensor:
    """The SK teacher probabilities Q (N, K) fp32, rows summing to 1: what the official
    `sinkhorn_knopp_teacher` returns where it is finite, and the same formula, finite, where the
    official exp overflows or underflows. Arguments as `sinkhorn_knopp_log_scale`."""
    _, _, n_valid = check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations, n_valid_rows)
    a = teacher_output.float() / teacher_temp  # a fresh (N, K) fp32 tensor: becomes Q
    log_u = _log_scale(a[:n_valid], n_iterations, process_group)
    a.add_(log_u)
    a.sub_(a.amax(dim=-1, keepdim=True)).exp_()
    return a.div_(a.sum(dim=-1, keepdim=True))
