"""Training checkpoints: written atomically, restored exactly.

A checkpoint is a plain dict of tensors and Python scalars (loadable with `weights_only=True`):

    epoch       number of finished epochs (training resumes at this epoch index)
    student     state_dict of the student (MultiCropWrapper: backbone.* and head.*), unwrapped
                from DistributedDataParallel and torch.compile, so the keys never depend on how
                the run was launched
    teacher     state_dict of the teacher, same layout (the k-NN evaluation reads this one)
    optimizer   optimizer state_dict
    dino_loss   the loss's state_dict (its center)
    scaler      GradScaler state_dict, or None without fp16
    args        the run's arguments as a dict (enough to rebuild the models)

Writes go to a temporary file in the same folder, flushed and fsynced, then `os.replace`d onto
the target: a crash at any moment leaves either the old checkpoint or the new one, never a torn
file. Random states are not stored: the training loop derives every random stream of an epoch
from (seed, epoch, rank), so a resumed epoch draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from dino_fast.ema import unwrap_model  # DDP / torch.compile wrappers off: stable keys

PathLike = Union[str, os.PathLike]


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save `obj` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def training_state(*, epoch: int, student: nn.Module, teacher: nn.Module,
                   optimizer: torch.optim.Optimizer, dino_loss: nn.Module,
                   scaler: Optional[torch.amp.GradScaler], args: dict) -> dict:
    """Everything `--resume` needs, as a checkpoint dict (see the module docstring)."""
    return {
        "epoch": epoch,
        "student": unwrap_model(student).state_dict(),
        "teacher": unwrap_model(teacher).state_dict(),
        "optimizer": optimizer.state_dict(),
        "dino_loss": dino_loss.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "args": dict(args),
    }


def load_checkpoint(path: PathLike) -> dict:
    """Read a checkpoint on the CPU; a clear error when the file is missing or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # an official or foreign checkpoint holding Python objects
        raise ValueError(f"{path} is not a dino_fast training checkpoint: it holds Python objects "
                         f"other than tensors and plain values, which are not unpickled (for an "
                         f"official DINO checkpoint use dino_fast.models.load_official_checkpoint)"
                         ) from None
    missing = [k for k in ("epoch", "student", "teacher", "args") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a dino_fast training checkpoint (missing {missing})")
    return ckpt


def restore_training_state(ckpt: dict, *, student: nn.Module, teacher: nn.Module,
                           optimizer: torch.optim.Optimizer, dino_loss: nn.Module,
                           scaler: Optional[torch.amp.GradScaler]) -> int:
    """Load a checkpoint into the live objects (strictly); returns the epoch to start from."""
    unwrap_model(student).load_state_dict(ckpt["student"])
    unwrap_model(teacher).load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    dino_loss.load_state_dict(ckpt["dino_loss"])
    if scaler is not None:
        if ckpt.get("scaler") is None:
            raise ValueError("the run uses fp16 with a gradient scaler but the checkpoint has no "
                             "scaler state (it was written by a run without fp16)")
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["epoch"])
