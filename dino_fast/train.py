"""DINO self-supervised training of a Vision Transformer, the official recipe end to end.

    python -m dino_fast.train                       # built-in procedural images, small ViT, CPU
    dino-fast-train --data_path /path/to/imagenet --arch vit_small --patch_size 16 ...
    torchrun --nproc_per_node=8 -m dino_fast.train --data_path ... # multi-GPU (DDP)

`train_dino` reads top to bottom as the official main_dino.py: data, models, loss, optimizer,
schedules, the training loop; `train_one_epoch` is one epoch of it. The flags and their checks
are in `dino_fast.train_args`, the networks and the evaluation data in `dino_fast.builders`.
Differences from the official script: the fused Triton loss and teacher EMA on CUDA, a compiled
ViT, gradient clipping without a host sync per parameter, weighted k-NN accuracy of the teacher
before, during and after training, atomic checkpoints with an exact `--resume`, and checks that
stop or warn on divergence and collapse.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from dino_fast import cpu_kernels, distributed
from dino_fast.augmentation import DataAugmentationDINO, collate_crops
from dino_fast.backend import resolve_backend
from dino_fast.batch_augmentation import (
    BatchedDataAugmentationDINO,
    collate_images,
    to_uint8_tensor,
)
from dino_fast.builders import build_backbone, build_head, build_ibot_head, build_knn_datasets
from dino_fast.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    restore_training_state,
    training_state,
)
from dino_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InMemoryDataset,
    build_dataset,
    cache_in_memory,
    subset,
)
from dino_fast.distributed import DistEnv
from dino_fast.ema import TeacherEMA
from dino_fast.knn import knn_accuracy
from dino_fast.masking import BlockMaskGenerator, MaskBatch, sample_masks
from dino_fast.models import MultiCropWrapper, compile_backbone, unwrap_model
from dino_fast.monitor import NonFiniteGuard, NonFiniteLoss, collapse_warning, teacher_entropies
from dino_fast.optim import (
    apply_schedules,
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
)
from dino_fast.progress import ProgressBar
from dino_fast.schedules import cosine_scheduler, scaled_lr
from dino_fast.train_args import (
    check_resume_compatible,
    get_args_parser,
    resume_path,
    validate_args,
)
from dino_fast.training_log import JsonlLog
from dino_fast.training_loss import TrainingLoss


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


@dataclass
class TrainingState:
    """What the training loop works on: the run's arguments and every object a step uses.

    student / teacher: MultiCropWrappers (the student possibly in DDP); teacher_ema updates the
    teacher from the student; loss: the DINO (+ iBOT + KoLeo) objective; lr_schedule /
    wd_schedule: one value per global iteration;
    scaler: the fp16 gradient scaler or None; amp_dtype: the autocast dtype or None (fp32);
    guard: stops the run on a non-finite loss; log: the run's log.jsonl.
    """
    args: argparse.Namespace
    env: DistEnv
    student: nn.Module
    teacher: nn.Module
    teacher_ema: TeacherEMA
    loss: TrainingLoss
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    amp_dtype: Optional[torch.dtype]
    guard: NonFiniteGuard
    log: JsonlLog


# ------------------------------------------------------------------------------------------------
# Training


def main(argv=None) -> None:
    """Command-line entry point (`python -m dino_fast.train`, `dino-fast-train`)."""
    run(argv)


def run(argv=None) -> dict:
    """Parse and check the arguments, train, and return the figures of the run.

    Args:
        argv: the command-line arguments (default: sys.argv[1:]); see `--help`.

    Returns:
        {"knn_before": ..., "knn_after": ... (each {"knn_top1": %, "knn_top5": %, ...}),
        "start_epoch", "epochs_trained", "train_time_s"}. Exits with status 2 on bad arguments
        and 1 when the loss becomes non-finite.

    Example:
        >>> result = run(["--epochs", "2", "--output_dir", "/tmp/dino"])  # doctest: +SKIP
        >>> result["knn_after"]["knn_top1"]                                # doctest: +SKIP
    """
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


def default_num_workers(device: torch.device) -> int:
    """--num_workers when not given: 0 on a CPU (the training threads take every core, so a
    loading process only takes time from them), else min(10, the CPUs per local process)."""
    if device.type == "cpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cpus or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(10, per_process))


def train_dino(args: argparse.Namespace) -> dict:
    """Train with already validated arguments (see `run`, which returns the same dict)."""
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
    ckpt = load_checkpoint(resume_path(args)) if args.resume is not None else None
    if args.num_workers is None:  # a resume keeps the run's (the PIL crops' random streams
        saved = (ckpt or {}).get("args", {}).get("num_workers")  # depend on it)
        args.num_workers = int(saved) if saved is not None else default_num_workers(device)
    backend = resolve_backend(args.backend, device, "train")
    kernel = f" (CPU kernels {cpu_kernels.status()})" if backend == "eager" and \
        device.type == "cpu" and precision == "fp32" else ""
    say(f"dino_fast: {env.world_size} process(es) on {device}, {precision}, "
        f"{'compiled' if use_compile else 'eager'} ViT, loss/EMA backend {backend}{kernel}")

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
    # without loader workers this process decodes (or draws) every image of every epoch and
    # evaluation: where the transform is deterministic, do it once and keep the tensors
    in_process = args.num_workers == 0
    if in_process and batch_augmentation is not None:
        dataset = cache_in_memory(dataset)
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
    if in_process:
        knn_train, knn_test = cache_in_memory(knn_train), cache_in_memory(knn_test)
    kept = [d.images.nbytes for d in (dataset, knn_train, knn_test)
            if isinstance(d, InMemoryDataset)]
    say(f"data: {args.data_path}, {len(dataset)} training images, {len(data_loader)} steps per "
        f"epoch; k-NN on {len(knn_train)} bank / {len(knn_test)} test images"
        + (f" ({sum(kept) / 2**20:.0f} MB of decoded images kept in memory)" if kept else ""))

    # ============ building student and teacher networks ... ============
    student_backbone, teacher_backbone = build_backbone(args), build_backbone(args, teacher=True)
    embed_dim = student_backbone.embed_dim
    student = MultiCropWrapper(student_backbone, build_head(args, embed_dim),
                               build_ibot_head(args, embed_dim))
    teacher = MultiCropWrapper(teacher_backbone, build_head(args, embed_dim),
                               build_ibot_head(args, embed_dim))
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
    say(f"model: {args.arch} depth {len(student_backbone.blocks)}, width {embed_dim} (MLP "
        f"{student_backbone.blocks[0].mlp.fc1.out_features}), patch "
        f"{args.patch_size}{' (conv stem)' if args.patch_embed == 'conv' else ''} at "
        f"{args.image_size} px, {n_params / 1e6:.2f} M backbone parameters; "
        f"head out_dim {args.out_dim}")
    say(f"recipe: {args.centering} teacher"
        + (f", iBOT x {args.ibot_loss_weight:g} ("
           + (f"separate head, {args.ibot_out_dim} prototypes" if args.ibot_separate_head
              else "shared head") + f", masks on {args.mask_sample_probability:g} of the global "
           f"crops, {args.mask_ratio_min_max[0]:g}-{args.mask_ratio_min_max[1]:g} of their "
           f"patches)" if args.ibot_loss_weight else "")
        + (f", KoLeo x {args.koleo_loss_weight:g}" if args.koleo_loss_weight else ""))

    # ============ preparing optimizer ... ============
    optimizer = build_optimizer(args.optimizer, get_params_groups(student))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    log = JsonlLog(output_dir / "log.jsonl", enabled=main_process)
    auto_epochs = args.epochs == "auto"
    if auto_epochs and ckpt is not None:  # the resumed run keeps the length it was given
        args.epochs, auto_epochs = int(ckpt["args"]["epochs"]), False
    if auto_epochs:  # provisional, for the calibration steps; replaced below
        args.epochs = max(1, args.warmup_epochs, args.warmup_teacher_temp_epochs)

    # ============ preparing loss and schedulers ... ============
    iters = len(data_loader)  # (auto: the provisional schedules also span the calibration)
    state = build_training_state(args, env, student, teacher, optimizer, scaler, amp_dtype,
                                 max(iters, sum(CALIBRATION_STEPS)) if auto_epochs else iters, log)

    # ============ optionally resume training ... ============
    start_epoch = 0
    if ckpt is not None:
        check_resume_compatible(ckpt, args, needs_scaler=scaler is not None)
        start_epoch = restore_training_state(ckpt, student=student, teacher=teacher,
                                             optimizer=optimizer, dino_loss=state.loss.dino,
                                             scaler=scaler, ibot_loss=state.loss.ibot)
        say(f"resumed from {resume_path(args)} at epoch {start_epoch}")
    log.keep_epochs_before(start_epoch)  # the log of the epochs the checkpoint holds

    results = {"start_epoch": start_epoch}
    knn_seconds = 0.0
    if args.knn_before and start_epoch == 0:
        knn_start = time.perf_counter()
        results["knn_before"] = evaluate_knn(state, knn_train, knn_test, 0, "before training")
        knn_seconds = time.perf_counter() - knn_start
    if auto_epochs:  # --epochs auto: as many as the measured speed fits in the time budget
        images_per_s = calibrate_speed(state, dataset, collate, batch_augmentation)
        knn_seconds = distributed.all_reduce_mean(knn_seconds, device)  # the same on every rank
        epoch_seconds = iters * args.batch_size_per_gpu * env.world_size / images_per_s
        args.epochs = epochs_for_budget(60 * args.max_train_minutes, epoch_seconds, knn_seconds,
                                        args.knn_freq)
        if args.epochs < max(args.warmup_epochs, args.warmup_teacher_temp_epochs):
            raise SystemExit(
                f"error: --epochs auto: {args.epochs} epoch(s) of about {epoch_seconds:.0f} s fit "
                f"in --max_train_minutes {args.max_train_minutes:g}, fewer than --warmup_epochs "
                f"({args.warmup_epochs}) or --warmup_teacher_temp_epochs "
                f"({args.warmup_teacher_temp_epochs}): raise the budget or lower those")
        say(f"epochs: {args.epochs} fit in --max_train_minutes {args.max_train_minutes:g} "
            f"(calibration: {images_per_s:.0f} img/s, about {epoch_seconds:.0f} s per epoch"
            + (f", k-NN {knn_seconds:.0f} s every {args.knn_freq} epochs" if args.knn_freq and
               knn_seconds else "") + ")")
        state = build_training_state(args, env, student, teacher, optimizer, scaler, amp_dtype,
                                     iters, log)

    # ============ training ... ============
    start_time = time.perf_counter()
    epoch_times, epochs_done, latest_knn = [], start_epoch, (None, None)
    # the epoch before's DINO loss, for the collapse test (from the log after a resume)
    # (rank 0 warns and owns the log: the other ranks do not read it while it is rewritten)
    records = log.read() if main_process else []
    previous_loss = next((r["dino_loss"] for r in reversed(records) if r.get("type") == "epoch"
                          and r.get("epoch") == start_epoch - 1 and "dino_loss" in r), None)
    for epoch in range(start_epoch, args.epochs):
        if epoch_times and args.max_train_minutes and distributed.any_rank(
                time.perf_counter() - start_time + epoch_times[-1] > 60 * args.max_train_minutes,
                device):  # every rank stops at the same epoch
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
        masks_of = make_masks_fn(args, derive_seed(args.seed, env.rank, epoch, stream=2), device)
        stats = train_one_epoch(state, data_loader, crops_of, epoch, masks_of)

        # ============ writing logs, checkpoints, evaluation ... ============
        epoch_times.append(time.perf_counter() - epoch_start)
        log.write(type="epoch", epoch=epoch, **stats, time_s=epoch_times[-1])
        terms = "".join(f", {name} {stats[name]:.4f}" for name in stats["terms"]) \
            if len(stats["terms"]) > 1 else ""
        say(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}{terms}, teacher entropy "
            f"{stats['teacher_entropy']:.3f} (batch mean {stats['marginal_entropy']:.3f}), "
            f"{stats['images_per_s']:.0f} img/s, {epoch_times[-1]:.0f} s")
        # the loss starts near ln(out_dim): judge it from the second epoch on
        warning = collapse_warning(stats["dino_loss"], stats["teacher_entropy"],
                                   stats["marginal_entropy"], args.out_dim,
                                   check_uniform=epoch > 0, previous_loss=previous_loss)
        previous_loss = stats["dino_loss"]
        if warning and main_process:
            log.write(type="warning", epoch=epoch, message=warning)
            warnings.warn(warning, RuntimeWarning, stacklevel=1)
        if main_process:
            save_checkpoint(state, epoch, output_dir)
        distributed.barrier()
        epochs_done = epoch + 1
        last = epoch + 1 == args.epochs
        if args.knn_freq and (epoch + 1) % args.knn_freq == 0 and not last:
            latest_knn = (epoch + 1, evaluate_knn(state, knn_train, knn_test, epoch + 1,
                                                  f"after epoch {epoch + 1}"))
        if main_process:
            plot_curves(log, output_dir)
    results["epochs_trained"] = epochs_done
    results["train_time_s"] = time.perf_counter() - start_time

    # ============ final evaluation and pictures ... ============
    if latest_knn[0] == epochs_done:  # stopped by the time budget right after an evaluation
        results["knn_after"] = latest_knn[1]
    else:
        results["knn_after"] = evaluate_knn(state, knn_train, knn_test, epochs_done,
                                            f"after {epochs_done} epochs")
    if main_process:
        plot_curves(log, output_dir)
        if args.attention_images:
            save_attention_picture(teacher, knn_test, args.attention_images, device, output_dir)
        if "knn_before" in results:
            say(f"k-NN top-1 of the teacher: {results['knn_before']['knn_top1']:.2f}% before, "
                f"{results['knn_after']['knn_top1']:.2f}% after training "
                f"({datetime.timedelta(seconds=round(results['train_time_s']))} of training)")
        say(f"outputs in {output_dir}/: checkpoint.pth, log.jsonl, training_curves.png"
            + (", attention_maps.png" if args.attention_images else ""))
    return results


def build_training_state(args: argparse.Namespace, env: DistEnv, student: nn.Module,
                         teacher: nn.Module, optimizer: torch.optim.Optimizer,
                         scaler: Optional[torch.amp.GradScaler], amp_dtype: Optional[torch.dtype],
                         iters: int, log: JsonlLog) -> TrainingState:
    """The loss, the schedules and the teacher EMA of a run of args.epochs epochs of `iters`
    steps (all depend on the run's length), with the given networks and optimizer."""
    loss_fn = TrainingLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                           args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs,
                           centering=args.centering, ibot_loss_weight=args.ibot_loss_weight,
                           ibot_out_dim=args.ibot_out_dim or None,
                           koleo_loss_weight=args.koleo_loss_weight,
                           backend=args.backend).to(env.device)
    lr_schedule = cosine_scheduler(
        scaled_lr(args.lr, args.batch_size_per_gpu * env.world_size), args.min_lr,
        args.epochs, iters, warmup_epochs=args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters)
    teacher_ema = TeacherEMA(student, teacher, args.momentum_teacher, 1.0,
                             total_steps=args.epochs * iters, backend=args.backend)
    return TrainingState(args=args, env=env, student=student, teacher=teacher,
                         teacher_ema=teacher_ema, loss=loss_fn, optimizer=optimizer,
                         scaler=scaler, lr_schedule=lr_schedule, wd_schedule=wd_schedule,
                         amp_dtype=amp_dtype, guard=NonFiniteGuard(env.device), log=log)


# --epochs auto: training steps untimed (first-step allocations, optimizer state, compilation,
# the loader's start), then timed, with the run's loader workers (on 2 cores they compete with
# the step's threads). The budget keeps a margin for the per-epoch checkpoint and curves and for
# the speed drifting during the run: the README's CIFAR-10 command on a 2-core AVX2 VM ran its
# epochs at 169-218 img/s; three calibrations there gave 161, 182 and 186.
CALIBRATION_STEPS = (3, 20)
BUDGET_MARGIN = 0.06


def calibrate_speed(state: TrainingState, dataset, collate: Callable,
                    batch_augmentation: Optional[BatchedDataAugmentationDINO]) -> float:
    """Training images per second (all ranks) of real training steps on the run's networks, data
    and augmentation, measured and then undone: the networks, the optimizer and the gradient
    scaler are restored exactly, so the run that follows is the one it would have been."""
    args, env = state.args, state.env
    saved = [copy.deepcopy(m.state_dict()) for m in (state.student, state.teacher,
                                                     state.optimizer)]
    saved_scaler = copy.deepcopy(state.scaler.state_dict()) if state.scaler else None
    quiet = dataclasses.replace(state, log=JsonlLog(".", enabled=False))
    seed = derive_seed(args.seed, env.rank, -1, stream=3)
    warm, timed = CALIBRATION_STEPS
    n = (warm + timed) * args.batch_size_per_gpu  # (indices repeat when the data set is smaller)
    loader = DataLoader(Subset(dataset, [i % len(dataset) for i in range(n)]),
                        batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                        drop_last=True, collate_fn=collate)
    make_crops, starts = make_crops_fn(batch_augmentation, seed, env.device), []

    def crops_of(images):  # called at the start of each step: the clock of the timed steps
        starts.append(time.perf_counter())
        return make_crops(images)

    train_one_epoch(quiet, loader, crops_of, 0, make_masks_fn(args, seed, env.device),
                    progress=False)
    seconds = time.perf_counter() - starts[warm]
    for module, state_dict in zip((state.student, state.teacher, state.optimizer), saved):
        module.load_state_dict(state_dict)
    if state.scaler is not None:
        state.scaler.load_state_dict(saved_scaler)
    state.optimizer.zero_grad(set_to_none=True)
    # every rank must choose the same number of epochs
    return distributed.all_reduce_mean(timed * args.batch_size_per_gpu * env.world_size / seconds,
                                       env.device)


def epochs_for_budget(budget_s: float, epoch_s: float, knn_s: float = 0.0,
                      knn_freq: int = 0, margin: float = BUDGET_MARGIN) -> int:
    """The most epochs (at least 1) whose training time, with the k-NN evaluations of every
    `knn_freq`-th epoch before the last (knn_s each), fits in (1 - margin) * budget_s seconds."""
    usable = (1 - margin) * budget_s
    epochs = 1
    while (epochs + 1) * epoch_s + (epochs // knn_freq if knn_freq else 0) * knn_s <= usable:
        epochs += 1
    return epochs


def make_crops_fn(batch_augmentation: Optional[BatchedDataAugmentationDINO], seed: int,
                  device: torch.device) -> Callable:
    """loader batch -> list of crop batches on `device`. With the batched augmentation the crops
    are made here, on the device, from a generator seeded once per epoch (so --resume is exact);
    otherwise the loader already made them."""
    if batch_augmentation is None:
        return lambda images: [im.to(device, non_blocking=True) for im in images]
    generator = torch.Generator().manual_seed(seed)
    return lambda images: batch_augmentation(images.to(device, non_blocking=True), generator)


def make_masks_fn(args: argparse.Namespace, seed: int, device: torch.device
                  ) -> Optional[Callable[[int], MaskBatch]]:
    """n_images -> the MaskBatch of a step's global crops (DINOv2's block masks, on `device`),
    from a random stream seeded once per epoch (so --resume is exact); None without iBOT."""
    if not args.ibot_loss_weight:
        return None
    grid = args.image_size // args.patch_size
    generator = BlockMaskGenerator((grid, grid))
    rng = random.Random(seed)
    return lambda n_images: sample_masks(n_images, (grid, grid), args.mask_ratio_min_max,
                                         args.mask_sample_probability, rng, generator
                                         ).to(device, non_blocking=True)


def train_one_epoch(state: TrainingState, data_loader: DataLoader, crops_of: Callable,
                    epoch: int, masks_of: Optional[Callable[[int], MaskBatch]] = None,
                    progress: bool = True) -> dict:
    """One epoch of DINO (or DINOv2): per step the schedules, the teacher and student forward
    passes, the loss, the student update and the teacher EMA.

    Args:
        state: the run's models, loss, optimizer, schedules and log.
        data_loader: batches of (images, labels); `crops_of(images)` turns the images into the
            list of crop batches (global crops first).
        epoch: the epoch index (the global iteration is len(data_loader) * epoch + step).
        masks_of: with iBOT, n_images -> the masks of the step's 2 x B global crops.
        progress: show the progress bar on a terminal.

    Returns:
        The epoch's figures: mean loss and mean of each term over all ranks ("terms" names
        them), mean teacher entropies (per image and of the batch mean), images/s, and the
        backends that ran the loss and the EMA.
    """
    args, env, log = state.args, state.env, state.log
    student, teacher, loss_fn = state.student, state.teacher, state.loss
    optimizer, scaler, guard = state.optimizer, state.scaler, state.guard
    device, amp_dtype = env.device, state.amp_dtype
    bar = ProgressBar(len(data_loader), desc=f"epoch {epoch + 1}/{args.epochs}",
                      enabled=progress and env.is_main and sys.stdout.isatty())
    loss_sum = torch.zeros((), device=device)
    term_sums: dict = {}
    entropies, shown = [], {}
    images_seen, start = 0, time.perf_counter()
    for step, (images, _) in enumerate(data_loader):
        it = len(data_loader) * epoch + step  # global training iteration
        apply_schedules(optimizer, state.lr_schedule[it], state.wd_schedule[it])
        images = crops_of(images)
        masks = masks_of(2 * images[0].shape[0]) if masks_of is not None else None
        mask = masks.masks if masks is not None else None
        select = masks.select if masks is not None else None  # CPU-computed: no host sync

        # teacher and student forward passes + compute the loss
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.no_grad():  # only the 2 global views pass the teacher, unmasked
                teacher_output = teacher(images[:2], patch_select=select, structured=True)
            student_output = student(images, masks=mask, patch_select=select, structured=True)
            loss, terms = loss_fn(student_output, teacher_output, epoch, masks)
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
        momentum = state.teacher_ema.update(it)

        # logging (the only host syncs of the step, every --log_freq steps)
        loss_sum += loss.detach()
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0) + value
        images_seen += images[0].shape[0] * env.world_size
        if step % args.log_freq == 0 or step + 1 == len(data_loader):
            guard.check()
            teacher_temp = loss_fn.teacher_temp(epoch)
            h, h_mean = teacher_entropies(teacher_output.logits, loss_fn.last_center,
                                          teacher_temp)
            entropies.append((h, h_mean))
            shown = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                     "lr": float(state.lr_schedule[it]),
                     "wd": float(state.wd_schedule[it]), "momentum": momentum,
                     "teacher_temp": teacher_temp}
            log.write(type="step", epoch=epoch, it=it, **shown, teacher_entropy=h,
                      marginal_entropy=h_mean,
                      images_per_s=images_seen / (time.perf_counter() - start))
        # the bar keeps to three figures so that it stays readable in 80 columns
        bar.update(step + 1, **{k: shown[k] for k in ("loss", "lr") if k in shown},
                   **{"img/s": round(images_seen / (time.perf_counter() - start))})
    bar.close()
    guard.check()
    seconds = time.perf_counter() - start
    mean_loss = distributed.all_reduce_mean(loss_sum.item() / len(data_loader), device)
    means = {name: distributed.all_reduce_mean(float(total) / len(data_loader), device)
             for name, total in term_sums.items()}
    return {"it": len(data_loader) * (epoch + 1) - 1, "loss": mean_loss, **means,
            "terms": list(means),
            "teacher_entropy": float(np.mean([e[0] for e in entropies])),
            "marginal_entropy": float(np.mean([e[1] for e in entropies])),
            "images_per_s": images_seen / seconds, "loss_backend": loss_fn.last_backend,
            "ema_backend": state.teacher_ema.last_backend}


def evaluate_knn(state: TrainingState, knn_train, knn_test, epochs_trained: int,
                 when: str) -> dict:
    """Weighted k-NN top-1/top-5 of the teacher backbone's CLS features (all ranks take part),
    logged and printed; returns knn_accuracy's dict."""
    args, env = state.args, state.env
    start = time.perf_counter()
    result = knn_accuracy(unwrap_model(state.teacher).backbone, knn_train, knn_test,
                          k=args.nb_knn, temperature=args.knn_temperature,
                          batch_size=max(args.batch_size_per_gpu, 128),
                          num_workers=args.num_workers, device=env.device,
                          amp_dtype=state.amp_dtype)
    state.log.write(type="knn", epochs_trained=epochs_trained, **result)
    if env.is_main:
        print(f"k-NN ({when}): top-1 {result['knn_top1']:.2f}%  top-5 {result['knn_top5']:.2f}%  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def save_checkpoint(state: TrainingState, epoch: int, output_dir: Path) -> None:
    """checkpoint.pth after epoch `epoch`, and a kept copy every --saveckp_freq epochs."""
    state.loss.synchronize()  # pending center updates applied: the saved centers are exact
    ckpt = training_state(epoch=epoch + 1, student=state.student, teacher=state.teacher,
                          optimizer=state.optimizer, dino_loss=state.loss.dino,
                          scaler=state.scaler, args=vars(state.args), ibot_loss=state.loss.ibot)
    atomic_torch_save(ckpt, output_dir / "checkpoint.pth")
    freq = state.args.saveckp_freq
    if freq and (epoch + 1) % freq == 0:
        atomic_torch_save(ckpt, output_dir / f"checkpoint{epoch + 1:04}.pth")


def plot_curves(log: JsonlLog, output_dir: Path) -> None:
    """training_curves.png from the log."""
    from dino_fast.visualize import plot_training_curves  # matplotlib only when drawing
    plot_training_curves(log.read(), output_dir / "training_curves.png")


def save_attention_picture(teacher: nn.Module, dataset, n_images: int, device: torch.device,
                           output_dir: Path) -> None:
    """attention_maps.png: the teacher's last-block CLS attention on the first held-out images."""
    from dino_fast.visualize import save_attention_maps  # matplotlib only when drawing
    n = min(n_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    save_attention_maps(unwrap_model(teacher).backbone, images,
                        output_dir / "attention_maps.png", IMAGENET_MEAN, IMAGENET_STD)


if __name__ == "__main__":
    main()
