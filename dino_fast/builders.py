"""The networks and the evaluation data of a training run, built from its arguments: shared by
the training script and by `python -m dino_fast.knn`, which rebuilds a checkpoint's run from the
arguments stored in it.

    from dino_fast.builders import build_backbone, build_head, build_ibot_head, build_knn_datasets
    student = MultiCropWrapper(build_backbone(args), build_head(args, embed_dim))
"""
from __future__ import annotations

import argparse
from typing import Optional

from torch import nn
from torch.utils.data import Dataset

from dino_fast.augmentation import eval_transform
from dino_fast.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, eval_split, subset
from dino_fast.head import DINOHead
from dino_fast.models import build_vit


def build_backbone(args: argparse.Namespace, teacher: bool = False) -> nn.Module:
    """The run's ViT (`build_vit` with --arch, --patch_size, --patch_embed, --image_size,
    --mlp_ratio, --depth, --embed_dim, --num_heads; 0 keeps the architecture's value), with
    DINOv2's mask token when the run has iBOT on (`args.use_mask_token`, set by the argument
    checks).

    Args:
        args: the training arguments.
        teacher: True for the teacher, which has no stochastic depth (--drop_path_rate is the
            student's).

    Returns:
        The backbone: images (B, 3, H, W) -> CLS features (B, embed_dim).
    """
    overrides = {k: getattr(args, k) for k in ("depth", "embed_dim", "num_heads")
                 if getattr(args, k)}
    overrides["mlp_ratio"] = float(getattr(args, "mlp_ratio", 4.0))  # (older checkpoints: 4)
    return build_vit(args.arch, args.patch_size, img_size=args.image_size,
                     drop_path_rate=0.0 if teacher else args.drop_path_rate,
                     mask_token=bool(getattr(args, "use_mask_token", False)),
                     patch_embed=getattr(args, "patch_embed", "linear"), **overrides)


def build_head(args: argparse.Namespace, embed_dim: int) -> nn.Module:
    """The run's DINO projection head: (N, embed_dim) features -> (N, --out_dim) logits."""
    return DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                    norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                    bottleneck_dim=args.head_bottleneck_dim)


def build_ibot_head(args: argparse.Namespace, embed_dim: int) -> Optional[nn.Module]:
    """The run's separate iBOT head (--ibot_out_dim prototypes, the DINO head's widths), or None
    when the patch tokens share the DINO head or iBOT is off."""
    if not getattr(args, "ibot_separate_head", False):
        return None
    return DINOHead(embed_dim, args.ibot_out_dim, use_bn=args.use_bn_in_head,
                    norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                    bottleneck_dim=args.head_bottleneck_dim)


def build_knn_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """The k-NN evaluation's images, with the evaluation transform at --image_size.

    Returns:
        (bank, queries): the training split (a fixed subset of --knn_train_samples images,
        0: all) and the held-out split (`eval_split`; --knn_test_samples images).
    """
    transform = eval_transform(args.image_size, IMAGENET_MEAN, IMAGENET_STD)
    train = build_dataset(args.data_path, "train", transform, image_size=args.image_size)
    test = build_dataset(args.data_path, eval_split(args.data_path), transform,
                         image_size=args.image_size)
    return (subset(train, args.knn_train_samples, args.seed),
            subset(test, args.knn_test_samples, args.seed + 1))
