"""The training script's objective: the DINO recipe, or DINOv2's (iBOT, KoLeo, Sinkhorn-Knopp).

    loss = dino_weight * DINO(CLS tokens) + ibot_weight * iBOT(masked patch tokens)
           + koleo_weight * sum over the 2 global crops of KoLeo(student CLS features)

as DINOv2's `SSLMetaArch.forward_backward` combines them:
- DINO: every (student crop, teacher global crop) pair except a global crop with itself, the
  mean over the batch of each pair's cross-entropy, averaged over the 2 * (2 + n_local) - 2
  pairs: the DINO loss of the official DINO script and DINOv2's local + global terms alike. The
  teacher is `softmax((t - c) / tau)` with the EMA center c ("centering") or DINOv2's
  Sinkhorn-Knopp teacher over the batch ("sinkhorn_knopp", `dino_fast.sinkhorn`, as a center
  for the same fused loss).
- iBOT: `iBOTPatchLoss.forward_masked` on the masked patch tokens of the global crops (the
  student's with the mask token, the teacher's of the unmasked crops at the same positions),
  each image's patches weighted 1 / (its masked patches), summed and divided by the number of
  global-crop images; its own EMA center (shape (1, 1, K)) or Sinkhorn-Knopp over the masked
  patches. The teacher probabilities are never built: teacher logits and a center go to the
  fused loss.
- KoLeo: on the student's backbone CLS features of each global crop separately.
The teacher temperature (the DINO loss's schedule) is shared by both teachers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dino_fast.checks import check_positive
from dino_fast.cross_entropy import select_backend
from dino_fast.dinov2 import KoLeoLoss, ibot_masked_loss, iBOTPatchLoss
from dino_fast.distributed import get_world_size
from dino_fast.loss import N_GLOBAL_CROPS, DINOLoss, dino_loss
from dino_fast.masking import MaskBatch
from dino_fast.models import MultiCropOutput
from dino_fast.sinkhorn import sinkhorn_knopp_center

CENTERINGS = ("centering", "sinkhorn_knopp")


class TrainingLoss(nn.Module):
    """DINO, iBOT and KoLeo terms combined as DINOv2 does (see the module docstring).

    Args:
        out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
        student_temp, center_momentum: as `DINOLoss` (the DINO term; its center and schedule).
        centering: "centering" (EMA centers) or "sinkhorn_knopp" (Sinkhorn-Knopp teachers, 3
            iterations, no center kept).
        ibot_loss_weight: weight of the iBOT term (0: none); ibot_out_dim: the patch head's
            number of prototypes (out_dim when the head is shared).
        koleo_loss_weight: weight of the KoLeo term (0: none).
        backend: "auto" | "triton" | "eager", for every cross-entropy.

    forward(student: MultiCropOutput, teacher: MultiCropOutput, epoch, masks: MaskBatch or None)
    -> (loss, terms): the fp32 loss to back-propagate and a dict of the detached terms
    ("dino_loss", and "ibot_loss" / "koleo_loss" when on, each unweighted). `last_center` is
    the DINO teacher's center of the last call (the EMA center or the Sinkhorn-Knopp one), for
    logging the teacher's entropy.

    State: `dino` (a `DINOLoss`, the official state dict) and `ibot` (an `iBOTPatchLoss` or None).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int, *,
                 centering: str = "centering", ibot_loss_weight: float = 0.0,
                 ibot_out_dim: Optional[int] = None, koleo_loss_weight: float = 0.0,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 backend: str = "auto"):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering
        self.dino = DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                             warmup_teacher_temp_epochs, nepochs, student_temp, center_momentum,
                             backend=backend)
        self.ibot_loss_weight = _check_weight(ibot_loss_weight, "ibot_loss_weight")
        self.koleo_loss_weight = _check_weight(koleo_loss_weight, "koleo_loss_weight")
        self.ibot = None
        if self.ibot_loss_weight > 0:
            self.ibot = iBOTPatchLoss(ibot_out_dim if ibot_out_dim is not None else out_dim,
                                      student_temp, center_momentum, backend=backend)
        self.koleo = KoLeoLoss() if self.koleo_loss_weight > 0 else None
        self.backend = backend
        self.last_center: Optional[torch.Tensor] = None

    @property
    def last_backend(self) -> Optional[str]:
        return self.dino.last_backend

    @property
    def uses_patches(self) -> bool:
        return self.ibot is not None

    def teacher_temp(self, epoch: int) -> float:
        return float(self.dino.teacher_temp_schedule[self.dino._check_epoch(epoch)])

    def forward(self, student: MultiCropOutput, teacher: MultiCropOutput, epoch: int,
                masks: Optional[MaskBatch] = None) -> tuple[torch.Tensor, dict]:
        for name, out in (("student", student), ("teacher", teacher)):
            if not isinstance(out, MultiCropOutput):
                raise TypeError(f"{name} must be a MultiCropOutput (MultiCropWrapper(..., "
                                f"structured=True)), got {type(out).__name__}")
        temp = self.teacher_temp(epoch)
        if self.ibot is not None:
            self._check_patches(student, teacher, masks)
        terms = {}
        if self.centering == "centering":
            self.last_center = self.dino.center.clone()
            dino = self.dino(student.logits, teacher.logits, epoch)
        else:
            center = sinkhorn_knopp_center(teacher.logits, temp)
            self.last_center = center.view(1, -1)
            backend = select_backend(self.backend, student.logits, teacher.logits,
                                     "TrainingLoss")
            dino, _ = dino_loss(student.logits, teacher.logits, center.view(1, -1),
                                self.dino.ncrops,
                                self.dino.student_temp, temp, backend=backend)
            self.dino.last_backend = backend
        loss = dino
        terms["dino_loss"] = dino.detach()
        if self.koleo is not None:
            koleo = sum(self.koleo(f) for f in student.global_features.chunk(N_GLOBAL_CROPS))
            loss = loss + self.koleo_loss_weight * koleo
            terms["koleo_loss"] = koleo.detach()
        if self.ibot is not None:
            ibot = self._ibot(student.patch_logits, teacher.patch_logits, masks, temp)
            loss = loss + self.ibot_loss_weight * ibot
            terms["ibot_loss"] = ibot.detach()
        return loss, terms

    def _check_patches(self, student, teacher, masks) -> None:
        if not isinstance(masks, MaskBatch):
            raise TypeError(f"the iBOT term needs the batch's masks (a MaskBatch), got "
                            f"{type(masks).__name__}")
        for name, out in (("student", student), ("teacher", teacher)):
            if out.patch_logits is None:
                raise ValueError(f"the iBOT term needs the {name}'s patch tokens: run the "
                                 f"{name} with masks= / patch_select= (no patch_logits given)")
            if out.patch_logits.shape != (masks.n_masked, self.ibot.out_dim):
                raise ValueError(f"{name}.patch_logits must have shape ({masks.n_masked}, "
                                 f"{self.ibot.out_dim}) (masked patches, ibot_out_dim), got "
                                 f"{tuple(out.patch_logits.shape)}")
        n_images = masks.masks.shape[0]
        if n_images != student.global_features.shape[0]:
            raise ValueError(f"masks has {n_images} rows but the student has "
                             f"{student.global_features.shape[0]} global-crop images")

    def _ibot(self, student_patches, teacher_patches, masks: MaskBatch, temp) -> torch.Tensor:
        n_images = masks.masks.shape[0]
        if masks.n_masked == 0:  # no masked patch in the batch: a zero term with a graph
            if get_world_size() > 1:
                self._join_ibot_collectives(teacher_patches, temp)
            return student_patches.float().sum() * 0.0
        if self.centering == "centering":
            self.ibot.apply_center_update()
            center = self.ibot.center
        else:
            center = sinkhorn_knopp_center(teacher_patches, temp)
        loss = ibot_masked_loss(student_patches, teacher_patches, masks.weights, n_images,
                                student_temp=self.ibot.student_temp, teacher_temp=temp,
                                center=center, backend=self.backend)
        if self.centering == "centering":
            self.ibot.update_center(teacher_patches.unsqueeze(0))
        return loss

    @torch.no_grad()
    def _join_ibot_collectives(self, teacher_patches, temp) -> None:
        """A rank without masked patches while others have some: it joins the collectives the
        others make, so none of them waits forever. Sinkhorn-Knopp: the column sums, without
        rows. Centering: the center all-reduce, with the current center as this rank's batch
        mean, so its share of the update leaves the center where it is (DINOv2's mean over zero
        patches would be NaN)."""
        if self.centering == "centering":
            self.ibot.apply_center_update()
            self.ibot.reduce_center_update(self.ibot.center.detach().view(1, 1, -1).clone())
        else:
            sinkhorn_knopp_center(teacher_patches, temp)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Apply pending center updates (before a checkpoint: its state is then exact)."""
        self.dino.synchronize_center()
        if self.ibot is not None:
            self.ibot.apply_center_update()


def _check_weight(value, name: str) -> float:
    if value == 0:
        return 0.0
    return check_positive(value, name)
