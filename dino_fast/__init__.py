"""dino_fast: the official DINO recipe with fused Triton kernels for the loss and the teacher EMA.

Public entry points:
    DINOLoss      drop-in replacement of the official training script's loss class.
    dino_loss     the loss as a function (loss, teacher row sum), for users with their own center.
"""
__version__ = "0.1.0"

from dino_fast.loss import DINOLoss, dino_loss, dino_loss_eager
from dino_fast.ema import TeacherEMA, ema_update_  # noqa: F401  (the teacher EMA, issue 4)

__all__ = ["DINOLoss", "dino_loss", "dino_loss_eager", "__version__"]
