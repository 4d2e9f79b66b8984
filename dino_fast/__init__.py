"""dino_fast: the official DINO recipe with fused Triton kernels for the loss and the teacher EMA.

The DINOv2 / DINOv3 loss classes are in `dino_fast.dinov2` and `dino_fast.dinov3`.

    from dino_fast import DINOLoss, TeacherEMA, DINOHead, MultiCropWrapper, build_vit

    student = MultiCropWrapper(build_vit("vit_small"), DINOHead(384, 65536))
    teacher = MultiCropWrapper(build_vit("vit_small"), DINOHead(384, 65536))
    teacher.load_state_dict(student.state_dict())
    dino_loss = DINOLoss(65536, ncrops=10, warmup_teacher_temp=0.04, teacher_temp=0.04,
                         warmup_teacher_temp_epochs=0, nepochs=100)
    ema = TeacherEMA(student, teacher, total_steps=100 * len(data_loader))

Importing dino_fast loads no Triton kernel: the kernel modules (dino_fast.kernels.*) are imported
on the first call that runs one, so TRITON_INTERPRET can still be set after `import dino_fast`.
"""
import importlib

__version__ = "0.1.0"

from dino_fast.augmentation import DataAugmentationDINO
from dino_fast.batch_augmentation import BatchedDataAugmentationDINO
from dino_fast.checkpoint import load_official_checkpoint
from dino_fast.cross_entropy import soft_cross_entropy
from dino_fast.data import ProceduralShapes, build_dataset
from dino_fast.ema import TeacherEMA, ema_update_
from dino_fast.head import DINOHead
from dino_fast.loss import DINOLoss, dino_loss, dino_loss_eager
from dino_fast.models import MultiCropWrapper, build_vit, last_selfattention
from dino_fast.schedules import cosine_scheduler

__all__ = [
    # losses
    "DINOLoss", "dino_loss", "dino_loss_eager", "soft_cross_entropy",
    # teacher EMA
    "TeacherEMA", "ema_update_",
    # models
    "build_vit", "DINOHead", "MultiCropWrapper", "last_selfattention", "load_official_checkpoint",
    # data and augmentation
    "DataAugmentationDINO", "BatchedDataAugmentationDINO", "ProceduralShapes", "build_dataset",
    # schedules and evaluation
    "cosine_scheduler", "knn_accuracy",
    "__version__",
]

# Names from modules that are also scripts (`python -m dino_fast.knn`): imported on first use, so
# that running the script does not find its module already imported by the package.
_LAZY = {"knn_accuracy": "dino_fast.knn"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dino_fast' has no attribute {name!r}")
