"""Drop-in versions of the DINOv3 loss classes (facebookresearch/dinov3, dinov3/loss/).

- `DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)`: the CLS-token loss on
  [crops, batch, K] tensors, `forward(student_logits, teacher_probs, ignore_diagonal=False)`.
- `iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)`: the masked-patch loss.
- `KoLeoLoss()`: the same regulariser as DINOv2's (dino_fast.dinov2.KoLeoLoss).
- `GramLoss(apply_norm=True, img_level=True, remove_neg=True, remove_only_teacher_neg=False)`.

As the official classes, the centers start as NaN (shape (1, K) and (1, 1, K)) until
`init_weights()` zeroes them, and `softmax_center_teacher` takes `update_centers=True`. The
differences from the official classes are those listed in dino_fast.dinov2 (no process group
needed, `process_group` keyword in place of DINOv3's process subgroup, log-domain Sinkhorn-Knopp,
fp32 losses, validated inputs, in-place center updates); the official iBOT class holds its
Sinkhorn-Knopp step as a (parameter-free, compiled) submodule, here it is a method.
`dino_crops_loss` is the functional form of the CLS-token loss that takes teacher logits and a
center, so the teacher probabilities are never built.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dino_fast import dinov2
from dino_fast.backend import check_backend_name
from dino_fast.checks import check_floating_tensor, check_positive
from dino_fast.cross_entropy import select_backend
from dino_fast.dinov2 import KoLeoLoss, check_center, check_logits, crops_loss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "GramLoss", "dino_crops_loss"]


def check_crops(student_logits, teacher, out_dim: int, device, what: str, ignore_diagonal,
                teacher_name: str = "teacher_probs") -> tuple[int, int, int]:
    """student_logits [S, B, K], teacher [T, B, K]; return (S, T, B)."""
    check_logits(student_logits, "student_logits", out_dim, 3, device, what)
    check_logits(teacher, teacher_name, out_dim, 3, device, what)
    S, B, _ = student_logits.shape
    T = teacher.shape[0]
    if teacher.shape[1] != B:
        raise ValueError(f"{teacher_name} must be [teacher crops, batch={B}, K] like "
                         f"student_logits {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if not isinstance(ignore_diagonal, bool):
        raise TypeError(f"ignore_diagonal must be a bool, got {ignore_diagonal!r}")
    if ignore_diagonal and S == 1 and T == 1:
        raise ValueError("ignore_diagonal=True with one student and one teacher crop leaves no "
                         "pair to average over")
    return S, T, B


def dino_crops_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    student_temp: float, teacher_temp: float, center: torch.Tensor,
                    ignore_diagonal: bool = False, backend: str = "auto") -> torch.Tensor:
    """DINOv3's CLS-token loss from the teacher's logits and a center.

    q = softmax((teacher_logits - center) / teacher_temp); for the Sinkhorn-Knopp teacher pass
    `center = sinkhorn_knopp_center(teacher_logits.flatten(0, 1), teacher_temp)`.
    student_logits: [S, B, K], teacher_logits: [T, B, K], center (K,) / (1, K) / (1, 1, K).
    Returns mean over (student crop, teacher crop, sample) of
    -sum_k q log_softmax(s / student_temp), without the s == t pairs when ignore_diagonal:
    `DINOLoss.forward` on the teacher probabilities, as an fp32 scalar.

    Example:
        >>> from dino_fast.sinkhorn import sinkhorn_knopp_center
        >>> s_logits, t_logits = torch.randn(10, 4, 256), torch.randn(2, 4, 256) * 10
        >>> c = sinkhorn_knopp_center(t_logits.flatten(0, 1), 0.07)
        >>> loss = dino_crops_loss(s_logits, t_logits, student_temp=0.1, teacher_temp=0.07,
        ...                        center=c)
        >>> bool(torch.isfinite(loss))   # the official SK teacher is NaN at x / tau ~ 400
        True
    """
    check_positive(student_temp, "student_temp")
    check_positive(teacher_temp, "teacher_temp")
    check_backend_name(backend)
    check_floating_tensor(student_logits, "student_logits")
    K, device = student_logits.shape[-1] if student_logits.dim() else 0, student_logits.device
    S, T, B = check_crops(student_logits, teacher_logits, K, device, "student_logits",
                          ignore_diagonal, "teacher_logits")
    check_center(center, K, device)
    resolved = select_backend(backend, student_logits, teacher_logits, "dino_crops_loss")
    return crops_loss(student_logits.reshape(S * B, K), teacher_logits.detach().reshape(T * B, K),
                      S, T, student_temp=student_temp, teacher_temp=teacher_temp, center=center,
                      ignore_diagonal=ignore_diagonal, mean_over_pairs=True, backend=resolved)


class DINOLoss(dinov2.DINOLoss):
    """DINOv3's CLS-token loss, drop-in (see the module docstring); center (1, K), NaN until
    `init_weights()`.

    - `softmax_center_teacher(teacher_output, teacher_temp, update_centers=True)`,
      `sinkhorn_knopp_teacher(teacher_output (N, K), teacher_temp, n_iterations=3)`,
      `update_center(teacher_output (N, K))`: as in dino_fast.dinov2.DINOLoss.
    - `forward(student_logits [S, B, K], teacher_probs [T, B, K], ignore_diagonal=False)`: the
      mean over (s, t, b) of -sum_k teacher_probs[t, b] log_softmax(student_logits[s, b] / tau_s),
      leaving out s == t when ignore_diagonal; an fp32 scalar.

    Example:
        >>> loss_fn = DINOLoss(256)
        >>> loss_fn.init_weights()
        >>> s_logits, t_logits = torch.randn(2, 4, 256), torch.randn(2, 4, 256)  # [crops, B, K]
        >>> t = loss_fn.sinkhorn_knopp_teacher(t_logits.flatten(0, 1), 0.07).unflatten(0, (2, 4))
        >>> loss = loss_fn(s_logits, t, ignore_diagonal=True)   # pairs (0, 1) and (1, 0)
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 *, backend: str = "auto", process_group=None):
        super().__init__(out_dim, student_temp, center_momentum, backend=backend,
                         process_group=process_group)
        self.center.fill_(math.nan)

    def init_weights(self) -> None:
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               update_centers: bool = True) -> torch.Tensor:
        return self._softmax_center(teacher_output, teacher_temp, "teacher_output",
                                    update_centers)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                ignore_diagonal: bool = False) -> torch.Tensor:
        S, T, B = check_crops(student_logits, teacher_probs, self.out_dim, self.center.device,
                              "the loss's center buffer", ignore_diagonal)
        K = self.out_dim
        backend = self._resolve(student_logits, teacher_probs)
        loss = crops_loss(student_logits.reshape(S * B, K),
                          teacher_probs.detach().reshape(T * B, K), S, T,
                          student_temp=self.student_temp, teacher_temp=None, center=None,
                          ignore_diagonal=ignore_diagonal, mean_over_pairs=True, backend=backend)
        self.last_backend = backend
        return loss


class iBOTPatchLoss(dinov2.iBOTPatchLoss):  # noqa: N801  (the official name)
    """DINOv3's masked-patch (iBOT) loss, drop-in: dino_fast.dinov2.iBOTPatchLoss with the
    center (1, 1, K) NaN until `init_weights()` and `softmax_center_teacher(teacher_patch_tokens,
    teacher_temp, update_centers=True)`.

    Example:
        >>> masks = torch.zeros(2, 16, dtype=torch.bool)
        >>> masks[0, :6] = True; masks[1, :4] = True          # 10 masked patches in all
        >>> weights = (1 / masks.sum(-1)).unsqueeze(-1).expand_as(masks)[masks]
        >>> loss_fn = iBOTPatchLoss(128)
        >>> loss_fn.init_weights()
        >>> t = loss_fn.sinkhorn_knopp_teacher(torch.randn(12, 128), 0.07, torch.tensor([10]))
        >>> loss = loss_fn.forward_masked(torch.randn(12, 128), t, masks, n_masked_patches=10,
        ...                               masks_weight=weights)   # rows 10, 11: padding
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, backend: str = "auto", process_group=None):
        super().__init__(patch_out_dim, student_temp, center_momentum, backend=backend,
                         process_group=process_group)
        self.center.fill_(math.nan)

    def init_weights(self) -> None:
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float,
                               update_centers: bool = True) -> torch.Tensor:
        return self._softmax_center(teacher_patch_tokens, teacher_temp, "teacher_patch_tokens",
                                    update_centers)


class GramLoss(nn.Module):
    """DINOv3's Gram loss: MSE between the patch-similarity (Gram) matrices of student and
    teacher features.

        G_s = X_s X_s^T, G_t = X_t X_t^T per image (img_level) or over the whole batch, X rows
        L2-normalised (apply_norm); negative similarities zeroed in both (remove_neg) or, with
        remove_only_teacher_neg, the teacher's negatives and the student's where the teacher's
        is negative too; loss = mean (G_s - G_t)^2.

    forward(output_feats, target_feats, img_level=True): (B, N, D) each, or (B*N, D) when
    img_level is False. Computed in fp32 with autocast off whatever the input dtype; returns an
    fp32 scalar. The constructor's img_level is accepted as the official one is and, as there,
    unused: forward's own argument decides. Eager only: backend may be "auto" or "eager".

    Example:
        >>> gram = GramLoss()
        >>> loss = gram(torch.randn(2, 49, 64), torch.randn(2, 49, 64))   # (B, N, D) each
        >>> loss.shape
        torch.Size([])
    """

    NORMALIZE_EPS = 1e-12  # F.normalize's default, as the official class uses it

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, *, backend: str = "auto"):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg cannot both be True")
        self.apply_norm = bool(apply_norm)
        self.remove_neg = bool(remove_neg)
        self.remove_only_teacher_neg = bool(remove_only_teacher_neg)
        self.backend = dinov2._eager_only(backend, type(self).__name__)
        self.last_backend: Optional[str] = None

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor,
                img_level: bool = True) -> torch.Tensor:
        check_floating_tensor(output_feats, "output_feats")
        check_floating_tensor(target_feats, "target_feats")
        allowed = (3,) if img_level else (2, 3)
        for name, t in (("output_feats", output_feats), ("target_feats", target_feats)):
            if t.dim() not in allowed or t.numel() == 0:
                raise ValueError(f"{name} must be " + ("(B, N, dim)" if img_level else
                                                       "(B, N, dim) or (B*N, dim)")
                                 + f" with img_level={img_level}, got shape {tuple(t.shape)}")
        patches = (lambda t: t.shape[:-1]) if img_level else (lambda t: t.shape[:-1].numel())
        if patches(output_feats) != patches(target_feats):
            raise ValueError(f"output_feats {tuple(output_feats.shape)} and target_feats "
                             f"{tuple(target_feats.shape)} must hold the same patches "
                             + ("(same B, N)" if img_level else "(same B*N)"))
        if target_feats.device != output_feats.device:
            raise ValueError(f"target_feats is on {target_feats.device} but output_feats is on "
                             f"{output_feats.device}; both must be on the same device")
        with torch.autocast(output_feats.device.type, enabled=False):
            target_sim = self._similarities(target_feats.float(), img_level)
            student_sim = self._similarities(output_feats.float(), img_level)
            if self.remove_neg:
                target_sim = torch.where(target_sim < 0, 0.0, target_sim)
                student_sim = torch.where(student_sim < 0, 0.0, student_sim)
            elif self.remove_only_teacher_neg:
                student_sim = torch.where((student_sim < 0) & (target_sim < 0), 0.0, student_sim)
                target_sim = torch.where(target_sim < 0, 0.0, target_sim)
            loss = F.mse_loss(student_sim, target_sim)
        self.last_backend = "eager"
        return loss

    def _similarities(self, feats: torch.Tensor, img_level: bool) -> torch.Tensor:
        if self.apply_norm:
            feats = F.normalize(feats, dim=-1, eps=self.NORMALIZE_EPS)
        if not img_level and feats.dim() == 3:
            feats = feats.flatten(0, 1)
        return feats @ feats.transpose(-1, -2)
