"""DINO self-supervised training of a Vision Transformer, the official recipe end to end.

    python -m dino_fast.train                       # built-in procedural images, small ViT, CPU
    dino-fast-train --data_path /path/to/imagenet --arch vit_small --patch_size 16 ...
    torchrun --nproc_per_node=8 -m dino_fast.train --data_path ... # multi-GPU (DDP)

Reads top to bottom as the official main_dino.py: arguments, data, models, loss, optimizer,
schedules, the training loop. Differences: the fused Triton loss and teacher EMA on CUDA, a
compiled ViT, gradient clipping without a host sync per parameter, weighted k-NN accuracy of the
teacher before, during and after training, atomic checkpoints with an exact `--resume`, and
checks that stop or warn on divergence and collapse.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dino_fast import distributed
from dino_fast.augmentation import (IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO,
                                    collate_crops)
from dino_fast.backend import interpreter_enabled, resolve_backend, triton_available
from dino_fast.batch_augmentation import (BatchedDataAugmentationDINO, collate_images,
                                          to_uint8_tensor)
from dino_fast.checkpoint import (atomic_torch_save, load_checkpoint, restore_training_state,
                                  training_state, unwrap_model)
from dino_fast.data import build_dataset
from dino_fast.ema import TeacherEMA
from dino_fast.head import DINOHead
from dino_fast.knn import eval_transform, knn_accuracy, subset
from dino_fast.loss import DINOLoss
from dino_fast.models import VIT_ARCHS, MultiCropWrapper, build_vit, compile_backbone
from dino_fast.monitor import NonFiniteGuard, NonFiniteLoss, collapse_warning, teacher_entropies
from dino_fast.optim import (OPTIMIZERS, apply_schedules, build_optimizer,
                             cancel_gradients_last_layer, clip_gradients, get_params_groups)
from dino_fast.progress import JsonlLog, ProgressBar
from dino_fast.schedules import cosine_scheduler, scaled_lr

# Defaults that depend on the data set: (the quick CPU demo on the procedural images, real data).
# The demo trains a narrower ViT (width 96, 3 heads: 1.7x the images/s of vit_tiny's 192) for
# more steps, which is what lifted its k-NN within minutes (README); real data sets use all their
# images and the architecture's own width.
DATASET_DEFAULTS = {
    "train_samples": (2000, 0), "knn_train_samples": (2000, 0), "knn_test_samples": (1000, 0),
    "embed_dim": (96, 0), "num_heads": (3, 0), "epochs": (30, 10),
}

# Arguments that fix the shapes of the saved networks: a checkpoint resumes only with the same.
MODEL_ARGS = ("arch", "patch_size", "depth", "embed_dim", "num_heads", "image_size", "out_dim",
              "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head", "norm_last_layer",
              "local_crops_number")


def bool_flag(s: str) -> bool:
    """argparse type for `--flag true|false` (the official script's style)."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "dino-fast-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="DINO self-supervised training of a Vision Transformer. With no argument: "
                    "a small ViT on the built-in procedural images, on the CPU, in a few "
                    "minutes, reporting k-NN accuracy before and after training.")

    # * Model parameters
    p = parser.add_argument_group("model")
    p.add_argument("--arch", default="vit_tiny", choices=sorted(VIT_ARCHS),
                   help="ViT architecture (width and heads; 12 blocks unless --depth). vit_small "
                        "is the paper's workhorse; vit_tiny for small images and CPUs.")
    p.add_argument("--patch_size", default=8, type=int,
                   help="size in pixels of the ViT patches. The paper uses 16 (or 8: better, "
                        "but 4x the tokens) at 224 px. At 32 px, 8 (4x4 patches) is the quick "
                        "CPU demo; 4 sees finer shapes at 4x the cost.")
    p.add_argument("--depth", default=4, type=int,
                   help="number of transformer blocks; 0 keeps the architecture's own (12 for "
                        "every official ViT). The default 4 is the quick CPU model.")
    p.add_argument("--embed_dim", default=None, type=int,
                   help="override the architecture's width (0: keep it; 192/384/768 for "
                        "vit_tiny/small/base). Default: 96 on the procedural demo, 0 otherwise")
    p.add_argument("--num_heads", default=None, type=int,
                   help="override the number of attention heads (0: keep the architecture's). "
                        "Default: 3 on the procedural demo, 0 otherwise")
    p.add_argument("--out_dim", default=1024, type=int,
                   help="dimensionality of the DINO head output (the number of prototypes). "
                        "The paper uses 65536 on ImageNet; for complex data use a large value, "
                        "a few thousand suffices for small data sets.")
    p.add_argument("--head_hidden_dim", default=512, type=int,
                   help="width of the head's MLP (the paper: 2048; 512 keeps the quick CPU "
                        "model's head small next to its backbone)")
    p.add_argument("--head_bottleneck_dim", default=256, type=int,
                   help="dimension of the L2-normalised bottleneck before the last layer (the "
                        "paper: 256)")
    p.add_argument("--norm_last_layer", default=True, type=bool_flag,
                   help="whether to weight-normalise (and freeze the norm of) the last layer of "
                        "the head. Normalising makes training more stable; set false for better "
                        "performance with vit_small if training is stable.")
    p.add_argument("--momentum_teacher", default=0.99, type=float,
                   help="base EMA momentum of the teacher, raised to 1 with a cosine schedule "
                        "over training. The paper: 0.996 (0.9995 with batch size 256); short "
                        "runs of a few hundred steps need a teacher that moves faster (0.99).")
    p.add_argument("--use_bn_in_head", default=False, type=bool_flag,
                   help="whether to use batch normalisation in the projection head (false "
                        "for ViTs)")
    p.add_argument("--drop_path_rate", default=0.1, type=float,
                   help="stochastic depth rate of the student")

    # * Temperature teacher parameters
    p = parser.add_argument_group("teacher temperature")
    p.add_argument("--warmup_teacher_temp", default=0.025, type=float,
                   help="initial teacher temperature (the paper: 0.04). Try lowering it if the "
                        "loss does not decrease.")
    p.add_argument("--teacher_temp", default=0.025, type=float,
                   help="final teacher temperature. The paper uses 0.04 and raises it slowly (up "
                        "to 0.07, with a warm-up) if training is stable. Short runs of a small "
                        "ViT on the procedural demo stay near the uniform output at 0.04; "
                        "0.025 sharpens enough there. On CIFAR-10, 0.04 did better (README).")
    p.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                   help="number of epochs of linear warm-up from --warmup_teacher_temp to "
                        "--teacher_temp (the paper uses 30 of 100+)")

    # * Training/Optimization parameters
    p = parser.add_argument_group("training and optimisation")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="mixed precision of the forward passes: bf16 (auto's choice on CUDA), "
                        "fp16 (with a gradient scaler) or fp32 (auto's choice on CPU). bf16/fp16 "
                        "also run on the CPU (torch's CPU autocast), usually slower than fp32 "
                        "there: for checking the mixed-precision path without a GPU. Use fp32 if "
                        "the loss becomes unstable.")
    p.add_argument("--weight_decay", default=0.04, type=float,
                   help="initial weight decay (cosine schedule to --weight_decay_end); biases "
                        "and norms are never decayed")
    p.add_argument("--weight_decay_end", default=0.4, type=float,
                   help="final weight decay. A cosine rise of the weight decay works better "
                        "with ViTs.")
    p.add_argument("--clip_grad", default=3.0, type=float,
                   help="maximal L2 norm of each parameter's gradient (0: no clipping). Clipping "
                        "helps optimisation of larger ViTs; try values around 0.3 to 1.0.")
    p.add_argument("--batch_size_per_gpu", default=32, type=int,
                   help="images per process and step (the total batch is this times the number "
                        "of processes; the learning rate scales with it). On CIFAR-10 in 28 CPU "
                        "minutes 64 did better than 32 and 128 (README)")
    p.add_argument("--epochs", default=None, type=int,
                   help="number of training epochs. Default: 30 on the procedural demo, 10 "
                        "otherwise")
    p.add_argument("--freeze_last_layer", default=10, type=int,
                   help="number of epochs during which the output layer is kept fixed. The "
                        "paper: 1; increase it if the loss does not decrease. In the CPU demo "
                        "releasing it at epoch 10 raises the loss (the teacher moves towards the "
                        "uniform output) while k-NN keeps rising.")
    p.add_argument("--lr", default=0.004, type=float,
                   help="peak learning rate at a total batch of 256 (linearly scaled with the "
                        "total batch size), reached after --warmup_epochs. The paper uses "
                        "0.0005 for 100+ epochs; short runs on small data like higher values.")
    p.add_argument("--warmup_epochs", default=1, type=int,
                   help="epochs of linear learning-rate warm-up (the paper: 10)")
    p.add_argument("--min_lr", default=1e-6, type=float,
                   help="learning rate at the end of the cosine schedule")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw is recommended for ViTs; sgd with momentum or lars for convnets")

    # * Multi-crop parameters
    p = parser.add_argument_group("multi-crop augmentation")
    p.add_argument("--global_crops_scale", default=(0.4, 1.0), type=float, nargs=2,
                   help="scale range of the two global crops, as fractions of the image area. "
                        "The paper uses (0.4, 1.) without local crops and (0.14, 1.) or "
                        "(0.25, 1.) with several.")
    p.add_argument("--local_crops_number", default=4, type=int,
                   help="number of small local crops (0: none; the paper uses 8 or 10)")
    p.add_argument("--local_crops_scale", default=(0.05, 0.4), type=float, nargs=2,
                   help="scale range of the local crops. Keep its upper end at the lower end "
                        "of --global_crops_scale.")
    p.add_argument("--image_size", default=32, type=int,
                   help="side of the global crops in pixels (the paper: 224); the position "
                        "embeddings are stored at this size")
    p.add_argument("--local_crop_size", default=16, type=int,
                   help="side of the local crops in pixels (the paper: 96)")
    p.add_argument("--augmentation", default="pil", choices=("pil", "batched"),
                   help="'pil': the official per-image pipeline in the data loader; 'batched': "
                        "the same recipe on whole batches of tensors on the training device "
                        "(several times faster; needs images of one size, e.g. CIFAR-10)")

    # * Misc
    p = parser.add_argument_group("data, output and run control")
    p.add_argument("--data_path", default="procedural", type=str,
                   help="'procedural' (built-in images, no download), a folder of class "
                        "subfolders (its train/ subfolder when there is one, ImageNet-style), "
                        "or 'cifar10[:root]' (torchvision's CIFAR-10 files under root)")
    p.add_argument("--train_samples", default=None, type=int,
                   help="train on a fixed random subset of this many images (0: all). Default: "
                        "all images of a real data set, 2000 of the procedural one (the quick "
                        "CPU demo)")
    p.add_argument("--output_dir", default="dino_output", type=str,
                   help="where checkpoints, the log (log.jsonl) and the pictures go")
    p.add_argument("--saveckp_freq", default=20, type=int,
                   help="also keep a copy checkpointNNNN.pth every this many epochs "
                        "(checkpoint.pth is rewritten after every epoch)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run from a checkpoint: a path, or no value for "
                        "output_dir/checkpoint.pth. Resuming reproduces the uninterrupted run "
                        "exactly (same random streams and data order).")
    p.add_argument("--seed", default=0, type=int, help="random seed")
    p.add_argument("--num_workers", default=1, type=int,
                   help="data loading processes per GPU (0: load in the training process)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: the process's GPU when CUDA is available, else the CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "eager"),
                   help="fused Triton kernels (loss and EMA) or the eager PyTorch ops; auto: "
                        "Triton on CUDA, eager on CPU")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the ViTs (default: on with CUDA, off on CPU)")
    p.add_argument("--max_train_minutes", default=0.0, type=float,
                   help="time budget: do not start an epoch expected to end past this many "
                        "minutes of training (0: no limit). The schedules still span --epochs; "
                        "a later --resume continues.")
    p.add_argument("--log_freq", default=10, type=int,
                   help="log (log.jsonl, progress bar loss) every this many steps")

    # * Evaluation
    p = parser.add_argument_group("evaluation")
    p.add_argument("--knn_freq", default=5, type=int,
                   help="weighted k-NN accuracy of the teacher every this many epochs (0: only "
                        "before and after training)")
    p.add_argument("--knn_before", default=True, type=bool_flag,
                   help="also evaluate the randomly initialised teacher before training")
    p.add_argument("--nb_knn", default=20, type=int, help="number of neighbours k")
    p.add_argument("--knn_temperature", default=0.07, type=float,
                   help="temperature of the exp(cosine / T) neighbour votes")
    p.add_argument("--knn_train_samples", default=None, type=int,
                   help="k-NN bank: a fixed random subset of this many training images (0: all; "
                        "default: all of a real data set, 2000 procedural images)")
    p.add_argument("--knn_test_samples", default=None, type=int,
                   help="k-NN queries: a fixed random subset of this many test images (0: all; "
                        "default: all of a real data set, 1000 procedural images)")
    p.add_argument("--attention_images", default=4, type=int,
                   help="held-out images in the attention-map picture (0: no picture)")
    return parser


# ------------------------------------------------------------------------------------------------
# Validation: every check that can fail runs before any work starts


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject missing paths and incompatible flags with a message that says what to change.
    Also fills the data-set dependent defaults (DATASET_DEFAULTS)."""
    def fail(msg):  # the message alone: the whole usage would bury it
        parser.exit(2, f"{parser.prog}: error: {msg}\n")

    demo = args.data_path == "procedural"
    for name, (demo_value, real_value) in DATASET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, demo_value if demo else real_value)

    for name in ("epochs", "batch_size_per_gpu", "log_freq", "image_size", "local_crop_size",
                 "patch_size", "out_dim", "nb_knn", "head_hidden_dim",
                 "head_bottleneck_dim"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                 "local_crops_number", "num_workers", "saveckp_freq", "knn_freq", "depth",
                 "embed_dim", "num_heads", "train_samples", "knn_train_samples",
                 "knn_test_samples", "attention_images"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.warmup_epochs > args.epochs:
        fail(f"--warmup_epochs ({args.warmup_epochs}) cannot exceed --epochs ({args.epochs})")
    if args.warmup_teacher_temp_epochs > args.epochs:
        fail(f"--warmup_teacher_temp_epochs ({args.warmup_teacher_temp_epochs}) cannot exceed "
             f"--epochs ({args.epochs})")
    for name in ("lr", "warmup_teacher_temp", "teacher_temp", "knn_temperature"):
        if not getattr(args, name) > 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad", "max_train_minutes"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.momentum_teacher <= 1:
        fail(f"--momentum_teacher must be in [0, 1], got {args.momentum_teacher}")
    if not 0 <= args.drop_path_rate < 1:
        fail(f"--drop_path_rate must be in [0, 1), got {args.drop_path_rate}")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(args, name)
        if not 0 < lo <= hi <= 1:
            fail(f"--{name} must be two fractions 0 < min <= max <= 1, got {lo} {hi}")
    for name in ("image_size", "local_crop_size"):
        if getattr(args, name) % args.patch_size:
            fail(f"--{name} ({getattr(args, name)}) must be a multiple of --patch_size "
                 f"({args.patch_size})")
    width = args.embed_dim or VIT_ARCHS[args.arch][0]
    heads = args.num_heads or VIT_ARCHS[args.arch][2]
    if width % heads:
        fail(f"the ViT width ({width}) must be a multiple of its number of heads ({heads}): "
             f"change --embed_dim or --num_heads")

    # hardware: the device, the precision and the kernels must be able to run
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was requested but CUDA is not available; use --device cpu")
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        fail("this GPU does not support bf16: use --precision fp16 or fp32")
    if args.backend == "triton":
        if not triton_available():
            fail("--backend triton was requested but Triton cannot be imported: install triton "
                 "or use --backend auto")
        if not on_cuda and not interpreter_enabled():
            fail("--backend triton on the CPU needs the Triton interpreter (TRITON_INTERPRET=1, "
                 "slow; for tests only): use --backend auto, or run on CUDA")

    # data and output locations
    check_data_path(args, fail)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} exists and is not a folder")
    if args.resume is not None:
        ckpt = resume_path(args)
        if not ckpt.is_file():
            fail(f"--resume: no checkpoint at {ckpt}" + (
                " (--resume without a value reads output_dir/checkpoint.pth)"
                if args.resume == "auto" else ""))
    elif (out / "checkpoint.pth").exists():
        fail(f"{out / 'checkpoint.pth'} exists from an earlier run: pass --resume to continue it, "
             f"or choose another --output_dir")


def check_data_path(args, fail) -> None:
    """Open the training and test splits once (file listing only) so that a wrong path fails now;
    for --augmentation batched, check that a sample of training images share one size."""
    for split in ("train", eval_split(args.data_path)):
        try:
            dataset = build_dataset(args.data_path, split, None, image_size=args.image_size)
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            fail(f"--data_path {args.data_path}: {exc}")
        if split == "train" and args.augmentation == "batched" and len(dataset):
            probe = np.linspace(0, len(dataset) - 1, min(len(dataset), 32)).round().astype(int)
            sizes = sorted({image_size_of(dataset, int(i)) for i in probe})
            if len(sizes) > 1:
                fail(f"--augmentation batched needs training images of one size; {args.data_path} "
                     f"has several (width x height: {', '.join(f'{w}x{h}' for w, h in sizes)}): "
                     f"use --augmentation pil or resize the images")


def image_size_of(dataset, index: int) -> tuple[int, int]:
    """(width, height) of a dataset's image, from the file header where the dataset has paths."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:  # ImageFolder: no decoding
        with Image.open(samples[index][0]) as image:
            return image.size
    return dataset[index][0].size


def resume_path(args) -> Path:
    return Path(args.output_dir, "checkpoint.pth") if args.resume == "auto" else Path(args.resume)


def check_resume_compatible(ckpt: dict, args, needs_scaler: bool) -> None:
    """The networks of a checkpoint must have the shapes this run builds, and an fp16 run needs
    the gradient scaler's state."""
    saved = ckpt["args"]
    diff = [f"--{k} {saved.get(k)!r} (checkpoint) vs {getattr(args, k)!r} (now)"
            for k in MODEL_ARGS if k in saved and _norm(saved[k]) != _norm(getattr(args, k))]
    if diff:
        raise SystemExit("error: --resume: the checkpoint was trained with other model settings: "
                         + "; ".join(diff) + ". Pass the checkpoint's values.")
    if saved.get("augmentation", "pil") != args.augmentation:
        warnings.warn(f"--resume: the checkpoint was trained with --augmentation "
                      f"{saved.get('augmentation', 'pil')} and this run uses "
                      f"{args.augmentation}: training continues, but the crops differ from "
                      f"those the uninterrupted run would have drawn", RuntimeWarning,
                      stacklevel=2)
    if needs_scaler and ckpt.get("scaler") is None:
        raise SystemExit(f"error: --resume: this run uses --precision fp16, whose gradient scaler "
                         f"the checkpoint has no state for (it was trained with --precision "
                         f"{saved.get('precision')}): resume with that precision")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def train_args_from_checkpoint(ckpt: dict) -> argparse.Namespace:
    """The training arguments stored in a checkpoint, on top of today's defaults."""
    args = get_args_parser().parse_args([])
    for key, value in ckpt["args"].items():
        setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------------
# Building blocks shared with `python -m dino_fast.knn`


def build_backbone(args, teacher: bool = False) -> nn.Module:
    """The ViT of the run (the teacher has no stochastic depth). Output: (B, embed_dim) CLS."""
    overrides = {k: getattr(args, k) for k in ("depth", "embed_dim", "num_heads")
                 if getattr(args, k)}
    return build_vit(args.arch, args.patch_size, img_size=args.image_size,
                     drop_path_rate=0.0 if teacher else args.drop_path_rate, **overrides)


def build_head(args, embed_dim: int) -> nn.Module:
    """The DINO projection head: (N, embed_dim) -> (N, out_dim) logits."""
    return DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                    norm_last_layer=args.norm_last_layer, hidden_dim=args.head_hidden_dim,
                    bottleneck_dim=args.head_bottleneck_dim)


def build_knn_datasets(args):
    """(bank, queries): the training and test splits with the evaluation transform."""
    transform = eval_transform(args.image_size, IMAGENET_MEAN, IMAGENET_STD)
    train = build_dataset(args.data_path, "train", transform, image_size=args.image_size)
    test = build_dataset(args.data_path, eval_split(args.data_path), transform,
                         image_size=args.image_size)
    return (subset(train, args.knn_train_samples, args.seed),
            subset(test, args.knn_test_samples, args.seed + 1))


def eval_split(data_path: str) -> str:
    """'test', or 'val' for an image folder that has val/ and no test/ (ImageNet)."""
    path = Path(data_path)
    if path.is_dir() and not (path / "test").is_dir() and (path / "val").is_dir():
        return "val"
    return "test"


def derive_seed(seed: int, rank: int, epoch: int = -1, stream: int = 0) -> int:
    """A 32-bit seed for (seed, rank, epoch); epoch -1 is the model initialisation. stream > 0
    gives independent seeds for other random streams of the same epoch (1: the batched
    augmentation's generator)."""
    entropy = [seed, rank, epoch + 1] + ([stream] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None) -> None:
    """Command-line entry point (`python -m dino_fast.train`, `dino-fast-train`)."""
    run(argv)


def run(argv=None) -> dict:
    """Parse and check the arguments, train, and return the figures of the run: knn_before,
    knn_after ({"knn_top1": %, "knn_top5": %, ...}), start_epoch, epochs_trained, train_time_s.
    Exits with status 2 on bad arguments and 1 when the loss becomes non-finite."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    try:
        return train_dino(args)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        distributed.destroy()


def train_dino(args) -> dict:
    env = distributed.init_distributed(args.device)
    device, main_process = env.device, env.is_main
    say = print if main_process else (lambda *a, **k: None)
    # every rank builds the same networks (the teacher copies its rank's student before DDP
    # would broadcast rank 0's); the data streams differ by rank from the first epoch on
    seed_everything(derive_seed(args.seed, rank=0))
    output_dir = Path(args.output_dir)
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the patch embedding is a convolution
    say(f"dino_fast: {env.world_size} process(es) on {device}, {precision}, "
        f"{'compiled' if use_compile else 'eager'} ViT, "
        f"loss/EMA backend {resolve_backend(args.backend, device, 'train')}")

    # ============ preparing data ... ============
    crop_args = (args.global_crops_scale, args.local_crops_scale, args.local_crops_number)
    crop_kwargs = dict(global_size=args.image_size, local_size=args.local_crop_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if args.augmentation == "batched":  # the loader gives uint8 images, the crops come later
        batch_augmentation = BatchedDataAugmentationDINO(*crop_args, **crop_kwargs)
        transform, collate = to_uint8_tensor, collate_images
    else:
        batch_augmentation = None
        transform, collate = DataAugmentationDINO(*crop_args, **crop_kwargs), collate_crops
    dataset = subset(build_dataset(args.data_path, "train", transform, image_size=args.image_size),
                     args.train_samples, args.seed)
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                 shuffle=True, seed=args.seed)  # order = f(seed, epoch)
    data_loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                             num_workers=args.num_workers, pin_memory=device.type == "cuda",
                             drop_last=True, collate_fn=collate)
    if len(data_loader) == 0:
        raise SystemExit(f"error: {len(dataset)} training images make no full batch of "
                         f"{args.batch_size_per_gpu} x {env.world_size} processes: lower "
                         f"--batch_size_per_gpu")
    knn_train, knn_test = build_knn_datasets(args)
    say(f"data: {args.data_path}, {len(dataset)} training images, {len(data_loader)} steps per "
        f"epoch; k-NN on {len(knn_train)} bank / {len(knn_test)} test images")

    # ============ building student and teacher networks ... ============
    student_backbone, teacher_backbone = build_backbone(args), build_backbone(args, teacher=True)
    embed_dim = student_backbone.embed_dim
    student = MultiCropWrapper(student_backbone, build_head(args, embed_dim))
    teacher = MultiCropWrapper(teacher_backbone, build_head(args, embed_dim))
    student, teacher = student.to(device), teacher.to(device)
    if args.use_bn_in_head and env.distributed:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    # the teacher starts as the student and is never trained by gradient
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    if use_compile:
        compile_backbone(student)
        compile_backbone(teacher)
    student = distributed.wrap_ddp(student, env)
    n_params = sum(p.numel() for p in student_backbone.parameters())
    say(f"model: {args.arch} depth {len(student_backbone.blocks)}, width {embed_dim}, patch "
        f"{args.patch_size} at {args.image_size} px, {n_params / 1e6:.2f} M backbone parameters; "
        f"head out_dim {args.out_dim}")

    # ============ preparing loss ... ============
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs,
                         backend=args.backend).to(device)

    # ============ preparing optimizer ... ============
    optimizer = build_optimizer(args.optimizer, get_params_groups(student))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    # ============ init schedulers ... ============
    iters = len(data_loader)
    lr_schedule = cosine_scheduler(
        scaled_lr(args.lr, args.batch_size_per_gpu * env.world_size), args.min_lr,
        args.epochs, iters, warmup_epochs=args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters)
    teacher_ema = TeacherEMA(student, teacher, args.momentum_teacher, 1.0,
                             total_steps=args.epochs * iters, backend=args.backend)

    # ============ optionally resume training ... ============
    start_epoch = 0
    log = JsonlLog(output_dir / "log.jsonl", enabled=main_process)
    if args.resume is not None:
        ckpt = load_checkpoint(resume_path(args))
        check_resume_compatible(ckpt, args, needs_scaler=scaler is not None)
        start_epoch = restore_training_state(ckpt, student=student, teacher=teacher,
                                             optimizer=optimizer, dino_loss=dino_loss,
                                             scaler=scaler)
        say(f"resumed from {resume_path(args)} at epoch {start_epoch}")
    if main_process:  # keep the log of the epochs the checkpoint holds, drop the rest
        kept = [r for r in log.read() if r.get("epoch", math.inf) < start_epoch
                or r.get("epochs_trained", math.inf) <= start_epoch] if start_epoch else []
        log.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # ============ training ... ============
    results = {"start_epoch": start_epoch}
    if args.knn_before and start_epoch == 0:
        results["knn_before"] = evaluate_knn(teacher, knn_train, knn_test, 0, args, env, log,
                                             amp_dtype, "before training")
    guard = NonFiniteGuard(device)
    start_time = time.perf_counter()
    epoch_times, epochs_done, latest_knn = [], start_epoch, (None, None)
    for epoch in range(start_epoch, args.epochs):
        if epoch_times and args.max_train_minutes and (
                time.perf_counter() - start_time + epoch_times[-1] > 60 * args.max_train_minutes):
            say(f"stopping before epoch {epoch + 1}: it would end past --max_train_minutes "
                f"{args.max_train_minutes:g} (resume with --resume to continue)")
            break
        epoch_start = time.perf_counter()
        # every random stream of the epoch derives from (seed, rank, epoch): --resume is exact
        seed_everything(derive_seed(args.seed, env.rank, epoch))
        sampler.set_epoch(epoch)

        # ============ training one epoch of DINO ... ============
        crops_of = make_crops_fn(batch_augmentation,
                                 derive_seed(args.seed, env.rank, epoch, stream=1), device)
        stats = train_one_epoch(student, teacher, teacher_ema, dino_loss, data_loader, crops_of,
                                optimizer, scaler, lr_schedule, wd_schedule, epoch, amp_dtype,
                                guard, args, env, log)

        # ============ writing logs, checkpoints, evaluation ... ============
        epoch_times.append(time.perf_counter() - epoch_start)
        record = {"type": "epoch", "epoch": epoch, **stats, "time_s": epoch_times[-1]}
        log.write(**record)
        say(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}, teacher entropy "
            f"{stats['teacher_entropy']:.3f} (batch mean {stats['marginal_entropy']:.3f}), "
            f"{stats['images_per_s']:.0f} img/s, {epoch_times[-1]:.0f} s")
        # the loss starts near ln(out_dim): judge it from the second epoch on
        warning = collapse_warning(stats["loss"], stats["teacher_entropy"],
                                   stats["marginal_entropy"], args.out_dim,
                                   check_uniform=epoch > 0)
        if warning and main_process:
            log.write(type="warning", epoch=epoch, message=warning)
            warnings.warn(warning, RuntimeWarning, stacklevel=1)
        if main_process:
            save_checkpoint(epoch, student, teacher, optimizer, dino_loss, scaler, args,
                            output_dir)
        distributed.barrier()
        epochs_done = epoch + 1
        last = epoch + 1 == args.epochs
        if args.knn_freq and (epoch + 1) % args.knn_freq == 0 and not last:
            latest_knn = (epoch + 1, evaluate_knn(teacher, knn_train, knn_test, epoch + 1, args,
                                                  env, log, amp_dtype, f"after epoch {epoch + 1}"))
        if main_process:
            plot_curves(log, output_dir)
    results["epochs_trained"] = epochs_done
    results["train_time_s"] = time.perf_counter() - start_time

    # ============ final evaluation and pictures ... ============
    if latest_knn[0] == epochs_done:  # stopped by the time budget right after an evaluation
        results["knn_after"] = latest_knn[1]
    else:
        results["knn_after"] = evaluate_knn(teacher, knn_train, knn_test, epochs_done, args, env,
                                            log, amp_dtype, f"after {epochs_done} epochs")
    if main_process:
        plot_curves(log, output_dir)
        if args.attention_images:
            save_attention_picture(teacher, knn_test, args, device, output_dir)
        if "knn_before" in results:
            say(f"k-NN top-1 of the teacher: {results['knn_before']['knn_top1']:.2f}% before, "
                f"{results['knn_after']['knn_top1']:.2f}% after training "
                f"({datetime.timedelta(seconds=round(results['train_time_s']))} of training)")
        say(f"outputs in {output_dir}/: checkpoint.pth, log.jsonl, training_curves.png"
            + (", attention_maps.png" if args.attention_images else ""))
    return results


def make_crops_fn(batch_augmentation, seed: int, device: torch.device):
    """loader batch -> list of crop batches on `device`. With the batched augmentation the crops
    are made here, on the device, from a generator seeded once per epoch (so --resume is exact);
    otherwise the loader already made them."""
    if batch_augmentation is None:
        return lambda images: [im.to(device, non_blocking=True) for im in images]
    generator = torch.Generator().manual_seed(seed)
    return lambda images: batch_augmentation(images.to(device, non_blocking=True), generator)


def train_one_epoch(student, teacher, teacher_ema, dino_loss, data_loader, crops_of, optimizer,
                    scaler, lr_schedule, wd_schedule, epoch, amp_dtype, guard, args, env,
                    log) -> dict:
    device = env.device
    bar = ProgressBar(len(data_loader), desc=f"epoch {epoch + 1}/{args.epochs}",
                      enabled=env.is_main and sys.stdout.isatty())
    loss_sum = torch.zeros((), device=device)
    entropies, shown = [], {}
    images_seen, start = 0, time.perf_counter()
    for step, (images, _) in enumerate(data_loader):
        it = len(data_loader) * epoch + step  # global training iteration
        apply_schedules(optimizer, lr_schedule[it], wd_schedule[it])
        images = crops_of(images)

        # teacher and student forward passes + compute dino loss
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.no_grad():
                teacher_output = teacher(images[:2])  # only the 2 global views pass the teacher
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        guard.record(loss, it)

        # student update
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)  # clip the true gradients
        if args.clip_grad:
            clip_gradients(student, args.clip_grad)
        cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

        # EMA update for the teacher
        momentum = teacher_ema.update(it)

        # logging (the only host syncs of the step, every --log_freq steps)
        loss_sum += loss.detach()
        images_seen += images[0].shape[0] * env.world_size
        if step % args.log_freq == 0 or step + 1 == len(data_loader):
            guard.check()
            h, h_mean = teacher_entropies(teacher_output, dino_loss.center,
                                          dino_loss.teacher_temp_schedule[epoch])
            entropies.append((h, h_mean))
            shown = {"loss": loss.item(), "lr": float(lr_schedule[it]),
                     "wd": float(wd_schedule[it]), "momentum": momentum,
                     "teacher_temp": float(dino_loss.teacher_temp_schedule[epoch])}
            log.write(type="step", epoch=epoch, it=it, **shown, teacher_entropy=h,
                      marginal_entropy=h_mean,
                      images_per_s=images_seen / (time.perf_counter() - start))
        bar.update(step + 1, **shown,
                   **{"img/s": round(images_seen / (time.perf_counter() - start))})
    bar.close()
    guard.check()
    seconds = time.perf_counter() - start
    mean_loss = distributed.all_reduce_mean(loss_sum.item() / len(data_loader), device)
    return {"it": len(data_loader) * (epoch + 1) - 1, "loss": mean_loss,
            "teacher_entropy": float(np.mean([e[0] for e in entropies])),
            "marginal_entropy": float(np.mean([e[1] for e in entropies])),
            "images_per_s": images_seen / seconds, "loss_backend": dino_loss.last_backend,
            "ema_backend": teacher_ema.last_backend}


def evaluate_knn(teacher, knn_train, knn_test, epochs_trained, args, env, log, amp_dtype,
                 when: str) -> dict:
    """Weighted k-NN top-1/top-5 of the teacher backbone's CLS features (all ranks take part)."""
    start = time.perf_counter()
    result = knn_accuracy(unwrap_model(teacher).backbone, knn_train, knn_test,
                          k=args.nb_knn, temperature=args.knn_temperature,
                          batch_size=max(args.batch_size_per_gpu, 128),
                          num_workers=args.num_workers, device=env.device, amp_dtype=amp_dtype)
    log.write(type="knn", epochs_trained=epochs_trained, **result)
    if env.is_main:
        print(f"k-NN ({when}): top-1 {result['knn_top1']:.2f}%  top-5 {result['knn_top5']:.2f}%  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def save_checkpoint(epoch, student, teacher, optimizer, dino_loss, scaler, args,
                    output_dir: Path) -> None:
    state = training_state(epoch=epoch + 1, student=student, teacher=teacher,
                           optimizer=optimizer, dino_loss=dino_loss, scaler=scaler,
                           args=vars(args))
    atomic_torch_save(state, output_dir / "checkpoint.pth")
    if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
        atomic_torch_save(state, output_dir / f"checkpoint{epoch + 1:04}.pth")


def plot_curves(log: JsonlLog, output_dir: Path) -> None:
    from dino_fast.visualize import plot_training_curves
    plot_training_curves(log.read(), output_dir / "training_curves.png")


def save_attention_picture(teacher, dataset, args, device, output_dir: Path) -> None:
    from dino_fast.visualize import save_attention_maps
    n = min(args.attention_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    save_attention_maps(unwrap_model(teacher).backbone, images,
                        output_dir / "attention_maps.png", IMAGENET_MEAN, IMAGENET_STD)


if __name__ == "__main__":
    main()
