"""The training script's command line: the flags (named as the official main_dino.py's), their
data-set dependent defaults, and the checks that reject a bad combination before any work starts.

    from dino_fast.train_args import get_args_parser, validate_args
    parser = get_args_parser()
    args = parser.parse_args(["--data_path", "cifar10", "--epochs", "30"])
    validate_args(args, parser)        # fills the defaults; exits with status 2 on bad flags
"""
from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dino_fast.augmentation import check_crop_scale, check_crop_size
from dino_fast.backend import interpreter_enabled, triton_available
from dino_fast.checks import check_int, check_positive, check_unit_interval
from dino_fast.data import build_dataset, eval_split
from dino_fast.masking import check_mask_ratio
from dino_fast.models import PATCH_EMBEDS, VIT_ARCHS, check_vit_args
from dino_fast.optim import OPTIMIZERS

# Defaults that depend on the data set: (the quick CPU demo on the procedural images, real data).
# The demo trains a narrower ViT (width 96, 3 heads: 1.7x the images/s of vit_tiny's 192) with
# the batched augmentation and the DINOv2 recipe: on the procedural shapes the DINO objective
# alone barely lifts k-NN in minutes, iBOT + KoLeo + Sinkhorn-Knopp lift it by 15 points
# (benchmarks/RESULTS.md). Real data sets use all their images, the architecture's own width,
# the official DINO recipe and the per-image augmentation, unless the flags say otherwise.
DATASET_DEFAULTS = {
    "train_samples": (2000, 0), "knn_train_samples": (2000, 0), "knn_test_samples": (1000, 0),
    "embed_dim": (96, 0), "num_heads": (3, 0), "epochs": (20, 10),
    "recipe": ("dinov2", "dino"), "augmentation": ("batched", "pil"),
}

# Arguments that fix the shapes of the saved networks: a checkpoint resumes only with the same.
# (use_mask_token and ibot_separate_head are derived by validate_args from the iBOT flags.)
MODEL_ARGS = ("arch", "patch_size", "patch_embed", "depth", "embed_dim", "num_heads", "mlp_ratio",
              "image_size", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head",
              "norm_last_layer", "local_crops_number", "use_mask_token", "ibot_separate_head",
              "ibot_out_dim")

# What a checkpoint written before a flag existed was trained with (its args lack the key).
LEGACY_ARGS = {"patch_embed": "linear", "mlp_ratio": 4.0, "use_mask_token": False,
               "ibot_separate_head": False,
               "ibot_out_dim": 0, "recipe": "dino", "centering": "centering",
               "ibot_loss_weight": 0.0, "koleo_loss_weight": 0.0, "mask_ratio_min_max": [0.1, 0.5],
               "mask_sample_probability": 0.5, "augmentation": "pil"}

# The objective's flags: a resume that changes one warns (the run is no longer the
# uninterrupted one).
LOSS_ARGS = ("centering", "ibot_loss_weight", "koleo_loss_weight", "mask_ratio_min_max",
             "mask_sample_probability")

# The loss flags each --recipe sets (explicit flags win): the official DINO script's objective,
# and DINOv2's (its ViT-L/g training configs: Sinkhorn-Knopp centering, iBOT with its own head,
# KoLeo 0.1; masks on half of the global crops, 10-50 % of their patches).
RECIPES = {
    "dino": {"centering": "centering", "ibot_loss_weight": 0.0, "ibot_separate_head": False,
             "koleo_loss_weight": 0.0},
    "dinov2": {"centering": "sinkhorn_knopp", "ibot_loss_weight": 1.0,
               "ibot_separate_head": True, "koleo_loss_weight": 0.1},
}


# how check_vit_args names build_vit's arguments in the messages
_VIT_FLAGS = {"arch": "--arch", "patch_size": "--patch_size", "drop_path_rate": "--drop_path_rate",
              "embed_dim": "--embed_dim", "num_heads": "--num_heads",
              "patch_embed": "--patch_embed", "mlp_ratio": "--mlp_ratio"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (x86: AVX-512 BF16 or AMX, as
    torch reports them; other architectures are assumed to). Without it, oneDNN emulates them,
    orders of magnitude slower than fp32."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)


def bool_flag(s: str) -> bool:
    """argparse type for `--flag true|false` (the official script's style)."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def get_args_parser() -> argparse.ArgumentParser:
    """The training script's parser; `validate_args` completes and checks what it parses."""
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
    p.add_argument("--patch_embed", default="linear", choices=PATCH_EMBEDS,
                   help="how images become patch tokens: linear, the official ViT's patchify "
                        "layer, or conv, a small convolutional stem with the same token grid "
                        "(log2(patch_size) stride-2 3x3 convolutions; patch_size a power of "
                        "two), for small images (on CIFAR-10 about 4 points of k-NN ahead "
                        "after 8 epochs, within seed noise at the end: benchmarks/RESULTS.md)")
    p.add_argument("--depth", default=4, type=int,
                   help="number of transformer blocks; 0 keeps the architecture's own (12 for "
                        "every official ViT). The default 4 is the quick CPU model.")
    p.add_argument("--embed_dim", default=None, type=int,
                   help="override the architecture's width (0: keep it; 192/384/768 for "
                        "vit_tiny/small/base). Default: 96 on the procedural demo, 0 otherwise")
    p.add_argument("--num_heads", default=None, type=int,
                   help="override the number of attention heads (0: keep the architecture's). "
                        "Default: 3 on the procedural demo, 0 otherwise")
    p.add_argument("--mlp_ratio", default=4.0, type=float,
                   help="width of each block's MLP over --embed_dim (every official ViT: 4). "
                        "The MLPs are two thirds of a block's multiply-adds: 2 makes the blocks "
                        "a third cheaper and 1 half as costly, for CPU runs in a fixed time "
                        "(benchmarks/RESULTS.md)")
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
                        "performance with vit_small if training is stable (on CIFAR-10 with the "
                        "Sinkhorn-Knopp teacher, false was 2.1 points of k-NN ahead after 4 "
                        "epochs).")
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
                        "0.025 sharpens enough there. On CIFAR-10, 0.04 does better "
                        "(benchmarks/RESULTS.md).")
    p.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                   help="number of epochs of linear warm-up from --warmup_teacher_temp to "
                        "--teacher_temp (the paper uses 30 of 100+)")

    # * Training/Optimization parameters
    p = parser.add_argument_group("training and optimisation")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="mixed precision of the forward passes: bf16 (auto's choice on CUDA), "
                        "fp16 (with a gradient scaler) or fp32 (auto's choice on CPU). bf16/fp16 "
                        "also run on the CPU (torch's CPU autocast): bf16 can be a little faster "
                        "than fp32 on a CPU with AVX-512 BF16 or AMX, and is many times slower "
                        "without (a warning says so); fp16 is slow on CPUs. Use fp32 if the loss "
                        "becomes unstable.")
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
                        "minutes 64 does better than 32 and 128 (benchmarks/RESULTS.md)")
    p.add_argument("--epochs", default=None, type=epochs_value,
                   help="number of training epochs, or 'auto' (with --max_train_minutes): as "
                        "many as fit in the budget at the speed of a few training steps timed "
                        "(and undone) before the run, counting the k-NN evaluations at the time "
                        "of the one before training; the run is then the one with that number. "
                        "Default: 20 on the procedural demo, 10 otherwise")
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

    # * DINOv2 recipe (DINOv2's config names)
    p = parser.add_argument_group("DINOv2 recipe: iBOT, KoLeo, Sinkhorn-Knopp")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="preset of the loss flags below: 'dino' (the official DINO objective: "
                        "softmax centering, no iBOT, no KoLeo) or 'dinov2' (Sinkhorn-Knopp "
                        "centering, iBOT loss 1.0 with a separate head, KoLeo 0.1). Explicit "
                        "flags override the preset. Default: dinov2 on the procedural demo "
                        "(where it lifts k-NN far more in minutes), dino otherwise")
    p.add_argument("--centering", default=None, choices=("centering", "sinkhorn_knopp"),
                   help="the teachers' normalisation: an EMA center subtracted before the "
                        "softmax (DINO), or the Sinkhorn-Knopp teacher over the batch (DINOv2; "
                        "with the DINO recipe on CIFAR-10 it was 2.6 points of k-NN ahead of "
                        "centering after 4 epochs). Default: the recipe's")
    p.add_argument("--ibot_loss_weight", default=None, type=float,
                   help="weight of the iBOT masked-patch loss (0: none): the student sees "
                        "masked global crops (a learnable mask token replaces the masked "
                        "patches) and predicts the teacher's patch tokens there. Default: the "
                        "recipe's (dinov2: 1.0)")
    p.add_argument("--ibot_separate_head", default=None, type=bool_flag,
                   help="give the patch tokens their own head (with --ibot_out_dim "
                        "prototypes) instead of sharing the DINO head. Default: the recipe's "
                        "(dinov2: true)")
    p.add_argument("--ibot_out_dim", default=None, type=int,
                   help="prototypes of the separate iBOT head (default: --out_dim)")
    p.add_argument("--mask_ratio_min_max", default=(0.1, 0.5), type=float, nargs=2,
                   help="range of the fraction of a masked crop's patches that are masked")
    p.add_argument("--mask_sample_probability", default=0.5, type=float,
                   help="fraction of the global crops that are masked")
    p.add_argument("--koleo_loss_weight", default=None, type=float,
                   help="weight of the KoLeo regulariser on the student's CLS features of each "
                        "global crop (0: none; DINOv2: 0.1). Default: the recipe's")

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
    p.add_argument("--augmentation", default=None, choices=("pil", "batched"),
                   help="'pil': the official per-image pipeline in the data loader; 'batched': "
                        "the same recipe on whole batches of tensors on the training device "
                        "(several times faster; needs images of one size, e.g. CIFAR-10). "
                        "Default: batched on the procedural demo, pil otherwise")

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
    p.add_argument("--num_workers", default=None, type=int,
                   help="data loading processes per training process (0: load in the training "
                        "process). Default: 0 on a CPU, where the training threads use every "
                        "core and a loading process only competes with them (one was 4-11 %% "
                        "slower on a 2-core VM); on a GPU 10 (the official default) or the CPUs "
                        "per process, whichever is fewer")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: the process's GPU when CUDA is available, else the CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "eager"),
                   help="fused Triton kernels (loss and EMA) or the eager PyTorch ops; auto: "
                        "Triton on CUDA, eager on CPU")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the ViTs (default: on with CUDA, off on CPU)")
    p.add_argument("--max_train_minutes", default=0.0, type=float,
                   help="time budget: do not start an epoch expected to end past this many "
                        "minutes of training (0: no limit). The schedules still span --epochs "
                        "(--epochs auto fits them to the budget); a later --resume continues.")
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


def epochs_value(value: str):
    """--epochs: a whole number, or 'auto'."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number or 'auto', got {value!r}") from None


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject missing paths and incompatible flags with a message that says what to change.
    Also fills the data-set dependent defaults (DATASET_DEFAULTS)."""
    def fail(msg):  # the message alone: the whole usage would bury it
        parser.exit(2, f"{parser.prog}: error: {msg}\n")

    demo = args.data_path == "procedural"
    for name, (demo_value, real_value) in DATASET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, demo_value if demo else real_value)

    # the checks the library's own functions make, with the flags' names in the messages
    auto_epochs = args.epochs == "auto"
    if auto_epochs and not args.max_train_minutes > 0:
        fail("--epochs auto sizes the run to --max_train_minutes: give a time budget "
             "(--max_train_minutes M > 0) or a number of epochs")
    try:
        for name in ("batch_size_per_gpu", "log_freq", "out_dim", "nb_knn",
                     "head_hidden_dim", "head_bottleneck_dim"):
            check_int(getattr(args, name), f"--{name}", 1)
        if not auto_epochs:
            check_int(args.epochs, "--epochs", 1)
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer",
                     "local_crops_number", "saveckp_freq", "knn_freq", "depth",
                     "embed_dim", "num_heads", "train_samples", "knn_train_samples",
                     "knn_test_samples", "attention_images"):
            check_int(getattr(args, name), f"--{name}", 0)
        if args.num_workers is not None:
            check_int(args.num_workers, "--num_workers", 0)
        for name in ("lr", "warmup_teacher_temp", "teacher_temp", "knn_temperature"):
            check_positive(getattr(args, name), f"--{name}")
        check_unit_interval(args.momentum_teacher, "--momentum_teacher")
        for name in ("global_crops_scale", "local_crops_scale"):
            check_crop_scale(getattr(args, name), f"--{name}")
        for name in ("image_size", "local_crop_size"):
            check_crop_size(getattr(args, name), f"--{name}")
            check_vit_args(args.arch, args.patch_size, getattr(args, name), args.drop_path_rate,
                           args.embed_dim, args.num_heads,
                           names={**_VIT_FLAGS, "img_size": f"--{name}"},
                           patch_embed=args.patch_embed, mlp_ratio=args.mlp_ratio)
    except (TypeError, ValueError) as exc:
        fail(str(exc))
    check_recipe_args(args, fail)
    # flags that only the command line combines
    if not auto_epochs and args.warmup_epochs > args.epochs:  # (auto: checked once sized)
        fail(f"--warmup_epochs ({args.warmup_epochs}) cannot exceed --epochs ({args.epochs})")
    if not auto_epochs and args.warmup_teacher_temp_epochs > args.epochs:
        fail(f"--warmup_teacher_temp_epochs ({args.warmup_teacher_temp_epochs}) cannot exceed "
             f"--epochs ({args.epochs})")
    for name in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad", "max_train_minutes"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")

    # hardware: the device, the precision and the kernels must be able to run
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was requested but CUDA is not available; use --device cpu")
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        fail("this GPU does not support bf16: use --precision fp16 or fp32")
    if args.precision == "bf16" and not on_cuda and not cpu_has_native_bf16():
        warnings.warn("--precision bf16: this CPU has no native bf16 arithmetic (no AVX-512 BF16 "
                      "or AMX), so bf16 matrix products are emulated; on a 2-core AVX2 VM the "
                      "CIFAR-10 command ran 12x slower than with --precision fp32 (a 1024 x "
                      "1024 matrix product 200x slower). Use --precision fp32 here",
                      RuntimeWarning, stacklevel=2)
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


def check_recipe_args(args, fail) -> None:
    """Fill the --recipe preset into the loss flags left unset, check them and derive
    use_mask_token (the ViT gets a mask token when iBOT is on)."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("ibot_loss_weight", "koleo_loss_weight"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            fail(f"--{name} must be a finite number >= 0, got {value}")
    try:
        args.mask_ratio_min_max = check_mask_ratio(args.mask_ratio_min_max, "--mask_ratio_min_max")
        check_unit_interval(args.mask_sample_probability, "--mask_sample_probability")
        if args.ibot_out_dim is not None:
            check_int(args.ibot_out_dim, "--ibot_out_dim", 1)
    except (TypeError, ValueError) as exc:
        fail(str(exc))
    ibot = args.ibot_loss_weight > 0
    if ibot:
        masked = int(2 * args.batch_size_per_gpu * args.mask_sample_probability)
        if args.mask_ratio_min_max[1] == 0 or masked == 0:
            fail(f"--ibot_loss_weight {args.ibot_loss_weight:g} needs masked patches, but "
                 f"--mask_ratio_min_max {args.mask_ratio_min_max[0]:g} "
                 f"{args.mask_ratio_min_max[1]:g} with --mask_sample_probability "
                 f"{args.mask_sample_probability:g} masks {0 if masked == 0 else 'no patch'} of "
                 f"the {2 * args.batch_size_per_gpu} global crops: raise them, or set "
                 f"--ibot_loss_weight 0")
        grid = args.image_size // args.patch_size
        if int(grid * grid * args.mask_ratio_min_max[1]) == 0 and grid >= 2:
            fail(f"--mask_ratio_min_max max {args.mask_ratio_min_max[1]:g} masks no patch of the "
                 f"{grid}x{grid} patch grid: raise it to at least {1 / (grid * grid):.3g}")
        if grid < 2:
            fail(f"--ibot_loss_weight needs patch tokens to mask: --image_size "
                 f"{args.image_size} / --patch_size {args.patch_size} gives a {grid}x{grid} "
                 f"grid (at least 2x2 needed)")
        if args.ibot_out_dim is not None and not args.ibot_separate_head and \
                args.ibot_out_dim != args.out_dim:
            fail(f"--ibot_out_dim {args.ibot_out_dim} needs --ibot_separate_head true (the "
                 f"shared head has --out_dim {args.out_dim} prototypes)")
    if args.koleo_loss_weight > 0 and args.batch_size_per_gpu < 2:
        fail("--koleo_loss_weight needs --batch_size_per_gpu >= 2 (each image's nearest "
             "neighbour among the others)")
    # what the networks are built with (in MODEL_ARGS: a checkpoint resumes only with the same)
    args.use_mask_token = ibot
    args.ibot_separate_head = bool(ibot and args.ibot_separate_head)
    args.ibot_out_dim = (args.ibot_out_dim or args.out_dim) if args.ibot_separate_head \
        else (args.out_dim if ibot else 0)


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
    """The checkpoint --resume reads: its path, or output_dir/checkpoint.pth without a value."""
    return Path(args.output_dir, "checkpoint.pth") if args.resume == "auto" else Path(args.resume)


def check_resume_compatible(ckpt: dict, args, needs_scaler: bool) -> None:
    """The networks of a checkpoint must have the shapes this run builds, and an fp16 run needs
    the gradient scaler's state."""
    saved = {**LEGACY_ARGS, **ckpt["args"]}
    flag = {"use_mask_token": "mask token (--ibot_loss_weight > 0)"}
    diff = [f"{flag.get(k, '--' + k)} {saved.get(k)!r} (checkpoint) vs {getattr(args, k)!r} (now)"
            for k in MODEL_ARGS if k in saved and _norm(saved[k]) != _norm(getattr(args, k))]
    if diff:
        hint = (f" (it was trained with --recipe {saved['recipe']}: pass --recipe "
                f"{saved['recipe']})" if saved["recipe"] != args.recipe else "")
        raise SystemExit("error: --resume: the checkpoint was trained with other model settings: "
                         + "; ".join(diff) + f". Pass the checkpoint's values{hint}.")
    if saved["augmentation"] != args.augmentation:
        warnings.warn(f"--resume: the checkpoint was trained with --augmentation "
                      f"{saved['augmentation']} and this run uses "
                      f"{args.augmentation}: training continues, but the crops differ from "
                      f"those the uninterrupted run would have drawn", RuntimeWarning,
                      stacklevel=2)
    ibot = saved["ibot_loss_weight"] > 0 or args.ibot_loss_weight > 0  # masks matter only then
    changed = [f"--{k} {_show(saved[k])} (checkpoint) vs {_show(getattr(args, k))} (now)"
               for k in LOSS_ARGS if _norm(saved[k]) != _norm(getattr(args, k))
               and (ibot or not k.startswith("mask_"))]
    if changed:
        warnings.warn("--resume: the checkpoint was trained with another objective: "
                      + "; ".join(changed) + ". Training continues with this run's values, so "
                      "it is not the uninterrupted run", RuntimeWarning, stacklevel=2)
    if needs_scaler and ckpt.get("scaler") is None:
        raise SystemExit(f"error: --resume: this run uses --precision fp16, whose gradient scaler "
                         f"the checkpoint has no state for (it was trained with --precision "
                         f"{saved.get('precision')}): resume with that precision")


def _norm(v):
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def _show(v) -> str:
    return " ".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else (
        f"{v:g}" if isinstance(v, float) else str(v))


def train_args_from_checkpoint(ckpt: dict) -> argparse.Namespace:
    """The training arguments stored in a checkpoint, on top of the current defaults (flags
    added after the checkpoint was written keep their default)."""
    args = get_args_parser().parse_args([])
    for key, value in ckpt["args"].items():
        setattr(args, key, value)
    return args
