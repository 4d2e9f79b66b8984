"""Literal references for the DINOv2 / DINOv3 loss tests: the official formulas (DINOv2 and
DINOv3 dinov2/loss, dinov3/loss) written out as plain PyTorch, and the tolerances, in one place.

Tolerances (relative RMS error, `rel_rms`), the oracle run in fp64 on the same (rounded) inputs:
- fp64: summation order only: 1e-10.
- fp32: fp32 accumulation over up to ~1e4 terms: 1e-5 (losses, gradients, centers); the SK
  probabilities, softmaxes of x / tau with |x / tau| up to a few hundred, carry the rounding of
  the fp32 logit, |x / tau| * 2^-24 ~ 2e-5 relative: 5e-5.
- bf16 / fp16: every loss is computed in fp32 from the rounded inputs, so it keeps the fp32
  bound; a gradient is returned in the input dtype and carries its rounding (bf16 2^-8 = 3.9e-3,
  fp16 2^-11 = 4.9e-4) plus margin.
"""
import torch
import torch.nn.functional as F

LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
CENTER_RTOL = 1e-6  # fp32 center from an fp32-accumulated batch sum
PROB_RTOL = 5e-5


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 in fp64 (0 when both are 0)."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------ teachers and centers

def official_softmax_center(teacher_output, center, teacher_temp):
    return F.softmax((teacher_output - center) / teacher_temp, dim=-1)


def official_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3, n_samples=None):
    """The official SK, single process: exp, then alternate prototype / sample normalisations.
    n_samples: the B of the official code (DINOv2/v3 DINO: rows * world; iBOT: the all-reduced
    n_masked_patches_tensor). Computed in teacher_output's dtype (the official casts to fp32;
    pass fp64 for the oracle)."""
    Q = torch.exp(teacher_output / teacher_temp).t()  # (K, N)
    B = Q.shape[1] if n_samples is None else n_samples
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)  # each prototype: total 1/K
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # each sample: total 1/B
        Q /= B
    Q *= B
    return Q.t()


def log_domain_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """The same iterations in fp64 and the log domain (log-sum-exps): the oracle where even the
    fp64 exp of the official formula overflows."""
    a = teacher_output.double() / teacher_temp
    log_q = a - torch.logsumexp(a.flatten(), 0)
    for _ in range(n_iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


class OfficialCenter:
    """The official asynchronous center, single process: `update` stores the batch statistics,
    `apply` (run by softmax_center_teacher) folds them in. patch=True: the iBOT center (1, 1, K)
    with the batch statistic sum_b mean_n T."""

    def __init__(self, out_dim, momentum=0.9, patch=False, init=0.0):
        shape = (1, 1, out_dim) if patch else (1, out_dim)
        self.center = torch.full(shape, init, dtype=torch.float64)
        self.momentum, self.patch = momentum, patch
        self.updated, self.pending, self.n = True, None, None

    def update(self, teacher):
        self.updated = False
        self.n = len(teacher)
        t = teacher.double()
        self.pending = torch.sum(t.mean(1), dim=0, keepdim=True) if self.patch else \
            torch.sum(t, dim=0, keepdim=True)

    def apply(self):
        if self.updated is False:
            batch_center = self.pending / self.n
            self.center = self.center * self.momentum + batch_center * (1 - self.momentum)
            self.updated = True


# ---------------------------------------------------------------------------------- losses

def official_dinov2_dino_forward(student_output_list, teacher_list, student_temp=0.1):
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total_loss -= torch.sum(t * lsm, dim=-1).mean()
    return total_loss


def official_dinov3_dino_forward(student_logits, teacher_probs, ignore_diagonal=False,
                                 student_temp=0.1):
    S, B, K = student_logits.shape
    T = teacher_probs.shape[0]
    lsm = F.log_softmax(student_logits / student_temp, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("sbk,tbk->", lsm, teacher_probs) / (B * S * T)
    loss = -torch.einsum("sbk,tbk->st", lsm, teacher_probs)
    m = min(S, T)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(m))
    return loss.sum() / (B * S * T - B * m)


def official_ibot_forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat,
                          student_temp=0.1):
    loss = torch.sum(teacher_patch_tokens * F.log_softmax(student_patch_tokens / student_temp,
                                                          dim=-1), dim=-1)
    loss = torch.sum(loss * student_masks_flat.to(loss.dtype), dim=-1) / \
        student_masks_flat.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def official_masks_weight(student_masks_flat):
    return (1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(
        student_masks_flat)[student_masks_flat]


def official_ibot_forward_masked(student, teacher, student_masks_flat, n_masked_patches=None,
                                 masks_weight=None, student_temp=0.1):
    loss = torch.sum(teacher * F.log_softmax(student / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = official_masks_weight(student_masks_flat)
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight.to(loss.dtype)
    return -loss.sum() / student_masks_flat.shape[0]


def official_koleo(student_output, eps=1e-8):
    """In the input's dtype, as the official (autocast off)."""
    x = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[nearest])
    return -torch.log(distances + eps).mean()


def official_gram(output_feats, target_feats, img_level=True, apply_norm=True, remove_neg=True,
                  remove_only_teacher_neg=False):
    """In fp64 (the official casts to fp32 first)."""
    output_feats, target_feats = output_feats.double(), target_feats.double()
    if apply_norm:
        target_feats = F.normalize(target_feats, dim=-1)
    if not img_level and target_feats.dim() == 3:
        target_feats = target_feats.flatten(0, 1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    if apply_norm:
        output_feats = F.normalize(output_feats, dim=-1)
    if not img_level and output_feats.dim() == 3:
        output_feats = output_feats.flatten(0, 1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
        target_sim[target_sim < 0] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


# ---------------------------------------------------------------------------------- inputs

def logits(*shape, dtype=torch.float32, scale=1.0, seed=0):
    """Cosine-like logits in [-scale, scale], rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(dtype)


def probs(*shape, dtype=torch.float32, seed=0):
    """Teacher probabilities (softmax of sharp logits) rounded to dtype."""
    return torch.softmax(logits(*shape, seed=seed) / 0.05, dim=-1).to(dtype)


def masks(n_images, n_patches, seed=0, empty_image=True):
    """A random bool mask (images, patches); image 0 has no masked patch when empty_image."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n_images, n_patches, generator=g) < 0.4
    m[-1, 0] = True
    if empty_image:
        m[0] = False
    return m
