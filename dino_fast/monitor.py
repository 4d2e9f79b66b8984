"""Training health: a non-finite loss stops the run, signs of collapse raise a warning.

DINO has two ways to collapse (Caron et al. 2021, section 5.3): the teacher's output becomes
uniform (centering won; the per-sample teacher entropy rises to ln(out_dim) and so does the loss),
or one dimension dominates for every image (sharpening won; the teacher entropy falls to 0 and
the batch-mean teacher distribution is one-hot as well). A healthy run has a low per-sample
teacher entropy but a high entropy of the batch mean: different images pick different
prototypes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# Collapse to a uniform output, judged after the first epoch: the loss within 10% of ln(K) and
# the teacher's per-image entropy above 0.87 ln(K), i.e. the teacher itself close to uniform and
# the student matching it. A high loss alone is not enough: the CPU CIFAR-10 runs of
# benchmarks/RESULTS.md sit at a loss of 0.91 ln(K) with a teacher at 0.83-0.84 ln(K) for a few
# epochs and then learn; the run that stalled for good sat at 0.955 and 0.91 ln(K). Collapse is
# also a loss that no longer falls: with the previous epoch's loss known, the warning needs it to
# have fallen by less than 0.5% of ln(K) (the README's Sinkhorn-Knopp CIFAR-10 command passes
# 0.97 ln(K) with a teacher at 0.88 ln(K) after epoch 2, falling 3% of ln(K) an epoch, and learns;
# the stalled run stayed at 6.62 from epoch to epoch).
UNIFORM_FRACTION = 0.9
UNIFORM_TEACHER_FRACTION = 0.87
UNIFORM_STUCK_FRACTION = 0.005
# The batch-mean teacher distribution is spread over fewer than ~1.1 prototypes (exp(H) < 1.1):
# every image picks the same output dimension.
COLLAPSED_MARGINAL_ENTROPY = math.log(1.1)


class NonFiniteLoss(RuntimeError):
    pass


class NonFiniteGuard:
    """Remembers the first step whose loss was not finite, without a host sync per step.

    `record(loss, step)` is a few device operations; `check()` reads the flag back (one sync) and
    raises NonFiniteLoss naming the step. The loop calls check() at every logged step and at the
    end of each epoch, before any checkpoint is written, so a checkpoint never holds a diverged
    model.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, hint: str = "") -> None:
        step = int(self.first_bad.item())
        if step >= 0:
            raise NonFiniteLoss(
                f"the loss became non-finite (NaN or inf) at step {step} (global iteration). "
                f"Training stopped; the last checkpoint written before it is intact. Try a lower "
                f"--lr, fp32 instead of mixed precision (--precision fp32), gradient clipping "
                f"(--clip_grad 3.0, or lower), or a longer --warmup_epochs.{hint}")


@torch.no_grad()
def teacher_entropies(teacher_output: torch.Tensor, center: torch.Tensor,
                      teacher_temp: float) -> tuple[float, float]:
    """(mean per-sample entropy, entropy of the batch-mean distribution) of the teacher, in nats.

    teacher_output (N, K) logits, center (1, K); q = softmax((T - c) / teacher_temp) as the loss.
    """
    logq = torch.log_softmax((teacher_output.float() - center) / teacher_temp, dim=-1)
    q = logq.exp()
    per_sample = -(q * logq).sum(-1).mean()
    mean_q = q.mean(0)
    marginal = -(mean_q * mean_q.clamp_min(1e-30).log()).sum()
    return float(per_sample), float(marginal)


def collapse_warning(epoch_loss: float, teacher_entropy: float, marginal_entropy: float,
                     out_dim: int, check_uniform: bool = True,
                     previous_loss: Optional[float] = None) -> Optional[str]:
    """A warning message when the epoch's statistics look like collapse, else None.

    Entropies in nats (see `teacher_entropies`). `check_uniform=False` skips the loss test, for
    the first epoch, which starts at ln(out_dim) by construction. `previous_loss`, the epoch
    before's loss where known: a loss near ln(out_dim) that still falls by 0.5% of ln(out_dim)
    an epoch or more is a run still leaving the uniform start, not a collapse.
    """
    ln_k = math.log(out_dim)
    falling = previous_loss is not None and \
        previous_loss - epoch_loss >= UNIFORM_STUCK_FRACTION * ln_k
    if check_uniform and not falling and epoch_loss > UNIFORM_FRACTION * ln_k \
            and teacher_entropy > UNIFORM_TEACHER_FRACTION * ln_k:
        before = "" if previous_loss is None else f" ({previous_loss:.3f} the epoch before)"
        return (f"possible collapse to a uniform output: the loss {epoch_loss:.3f}{before} is "
                f"stuck near ln(out_dim) = {ln_k:.3f} (teacher entropy {teacher_entropy:.3f}). "
                f"Try a lower --teacher_temp / --warmup_teacher_temp (sharper teacher), a lower "
                f"--lr, or --freeze_last_layer 1.")
    if marginal_entropy < COLLAPSED_MARGINAL_ENTROPY:
        return (f"possible collapse to one dimension: the teacher entropy is {teacher_entropy:.3f} "
                f"and the batch-mean teacher distribution has entropy {marginal_entropy:.3f} "
                f"(every image picks the same output). Try a higher --teacher_temp, a higher "
                f"--momentum_teacher, or a lower --lr.")
    return None
