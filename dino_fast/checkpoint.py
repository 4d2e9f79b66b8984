"""Checkpoints: training checkpoints written atomically and restored exactly, and official DINO
checkpoints loaded into dino_fast's models. `read_checkpoint` is the one file reader of both.

A training checkpoint is a plain dict of tensors and Python scalars (loadable with
`weights_only=True`):

    epoch       number of finished epochs (training resumes at this epoch index)
    student     state_dict of the student (MultiCropWrapper: backbone.* and head.*), unwrapped
                from DistributedDataParallel and torch.compile, so the keys never depend on how
                the run was launched
    teacher     state_dict of the teacher, same layout (the k-NN evaluation reads this one)
    optimizer   optimizer state_dict
    dino_loss   the DINO loss's state_dict (its center; the official checkpoint's entry)
    ibot_loss   the iBOT loss's state_dict (its center), or None without iBOT
    scaler      GradScaler state_dict, or None without fp16
    args        the run's arguments as a dict (enough to rebuild the models)

Writes go to a temporary file in the same folder, flushed and fsynced, then `os.replace`d onto
the target: a crash at any moment leaves either the old checkpoint or the new one, never a torn
file. Random states are not stored: the training loop derives every random stream of an epoch
from (seed, epoch, rank), so a resumed epoch draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from dino_fast.models import unwrap_model  # DDP / torch.compile wrappers off: stable keys

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
                   scaler: Optional[torch.amp.GradScaler], args: dict,
                   ibot_loss: Optional[nn.Module] = None) -> dict:
    """Everything `--resume` needs, as a checkpoint dict (see the module docstring).

    Args:
        epoch: the number of finished epochs.
        student, teacher: the networks (unwrapped from DDP / torch.compile for stable keys).
        optimizer, dino_loss, scaler: their states (scaler None without fp16).
        args: the run's arguments as a dict.
        ibot_loss: the iBOT loss (DINOv2 recipe), or None.

    Returns:
        The checkpoint dict; save it with `atomic_torch_save`.
    """
    return {
        "epoch": epoch,
        "student": unwrap_model(student).state_dict(),
        "teacher": unwrap_model(teacher).state_dict(),
        "optimizer": optimizer.state_dict(),
        "dino_loss": dino_loss.state_dict(),
        "ibot_loss": ibot_loss.state_dict() if ibot_loss is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "args": dict(args),
    }


def read_checkpoint(path: PathLike, allowed_globals: Sequence[type] = ()) -> dict:
    """Read a checkpoint file on the CPU with `torch.load(weights_only=True)`.

    Args:
        path: the file.
        allowed_globals: Python classes the file may hold besides tensors and plain values
            (official DINO checkpoints hold the run's `argparse.Namespace`).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds other Python objects (nothing of them is unpickled), or
            is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects other than tensors and plain values, "
                         f"which are not unpickled (for an official DINO checkpoint use "
                         f"dino_fast.checkpoint.load_official_checkpoint)") from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def load_checkpoint(path: PathLike) -> dict:
    """Read a dino_fast training checkpoint (see the module docstring for its entries).

    Raises FileNotFoundError when the file is missing and ValueError when it is not a dino_fast
    training checkpoint.
    """
    try:
        ckpt = read_checkpoint(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a dino_fast training checkpoint: {exc}") from None
    missing = [k for k in ("epoch", "student", "teacher", "args") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a dino_fast training checkpoint (missing {missing})")
    return ckpt


def restore_training_state(ckpt: dict, *, student: nn.Module, teacher: nn.Module,
                           optimizer: torch.optim.Optimizer, dino_loss: nn.Module,
                           scaler: Optional[torch.amp.GradScaler],
                           ibot_loss: Optional[nn.Module] = None) -> int:
    """Load a training checkpoint into the live objects (strictly).

    Args:
        ckpt: a dict from `load_checkpoint`.
        student, teacher, optimizer, dino_loss: the run's objects, built with the checkpoint's
            arguments.
        scaler: the fp16 gradient scaler, or None.
        ibot_loss: the iBOT loss of a DINOv2-recipe run, or None.

    Returns:
        The epoch to start from (the number of finished epochs).
    """
    unwrap_model(student).load_state_dict(ckpt["student"])
    unwrap_model(teacher).load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    dino_loss.load_state_dict(ckpt["dino_loss"])
    if ibot_loss is not None:
        if ckpt.get("ibot_loss") is None:
            raise ValueError("the run has an iBOT loss but the checkpoint has no iBOT center (it "
                             "was written by a run without iBOT)")
        ibot_loss.load_state_dict(ckpt["ibot_loss"])
    if scaler is not None:
        if ckpt.get("scaler") is None:
            raise ValueError("the run uses fp16 with a gradient scaler but the checkpoint has no "
                             "scaler state (it was written by a run without fp16)")
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["epoch"])


# --------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------

# Entries of an official training checkpoint (main_dino.py's checkpoint.pth) that hold weights,
# in the order they are tried when no key is given (the official evaluation default: teacher).
_CHECKPOINT_ENTRIES = ("teacher", "student", "state_dict", "model")


def _state_source(state_dict_or_path) -> tuple[Mapping, str]:
    if isinstance(state_dict_or_path, Mapping):
        return state_dict_or_path, "the given state dict"
    if not isinstance(state_dict_or_path, (str, os.PathLike)):
        raise TypeError(f"state_dict_or_path must be a mapping or a path, got "
                        f"{type(state_dict_or_path).__name__}")
    # official checkpoints also hold the argparse Namespace of the run under "args"
    ckpt = read_checkpoint(state_dict_or_path, allowed_globals=[argparse.Namespace])
    return ckpt, f"checkpoint {os.fspath(state_dict_or_path)}"


def _is_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip(key: str) -> str:
    """Drop the DistributedDataParallel `module.` and torch.compile `_orig_mod.` prefixes."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")


def load_official_checkpoint(module: nn.Module, state_dict_or_path, key: Optional[str] = None,
                             strict: bool = True):
    """Load an official DINO checkpoint (or a state dict in its key format) into `module`.

    Args:
        module: a backbone from `build_vit`, a `DINOHead`, or a `MultiCropWrapper` of both
            (wrapped in DDP or torch.compile or not).
        state_dict_or_path: a state dict, a whole checkpoint dict, or a path to either (read
            with `read_checkpoint`, on the CPU).
        key: the checkpoint entry to load ("teacher" or "student" in main_dino.py's
            checkpoints); by default the first of teacher, student, state_dict, model that
            exists, or the dict itself when it is already a state dict (the released backbone
            weights).
        strict: as nn.Module.load_state_dict, for the keys of `module`. A shape that differs
            (with either value), or with strict a missing or unexpected key, raises
            RuntimeError listing them before anything is loaded: the module is left untouched.

    Returns:
        load_state_dict's result (missing_keys, unexpected_keys).

    Keys lose their `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes; then the
    checkpoint's sub-tree that matches the module is taken: the whole dict for a wrapper,
    `backbone.*` for a backbone (the head keys are left out, as the official evaluation does),
    `head.*` for a head. A `pos_embed` stored at another grid size is resampled to the module's.

    Example:
        >>> vit = build_vit("vit_small", patch_size=16)                        # doctest: +SKIP
        >>> load_official_checkpoint(vit, "dino_deitsmall16_pretrain.pth")      # doctest: +SKIP
        >>> load_official_checkpoint(student, "checkpoint.pth", key="student")  # doctest: +SKIP
    """
    ckpt, source = _state_source(state_dict_or_path)
    if key is not None:
        if key not in ckpt:
            raise KeyError(f"{source} has no entry {key!r}; its entries are {sorted(ckpt)[:20]}")
        state = ckpt[key]
        source = f"{source}[{key!r}]"
    elif _is_state_dict(ckpt):
        state = ckpt
    else:
        found = [k for k in _CHECKPOINT_ENTRIES if isinstance(ckpt.get(k), Mapping)]
        if not found:
            raise ValueError(f"{source} is neither a state dict nor a checkpoint with one of the "
                             f"entries {list(_CHECKPOINT_ENTRIES)}; its entries are "
                             f"{sorted(ckpt)[:20]}; pass key=...")
        state = ckpt[found[0]]
        source = f"{source}[{found[0]!r}]"
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise ValueError(f"{source} is not a state dict (a non-empty mapping of tensors)")
    state = {_strip(k): v for k, v in state.items()}

    target = unwrap_model(module)
    wanted = set(target.state_dict())
    best, best_overlap = None, 0
    for prefix in ("", "backbone.", "head."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        overlap = len(wanted & set(sub))
        if overlap > best_overlap:
            best, best_overlap = sub, overlap
    if best is None:
        raise ValueError(f"no key of {source} matches {type(target).__name__}: the checkpoint "
                         f"has keys like {sorted(state)[:3]}, the module expects keys like "
                         f"{sorted(wanted)[:3]}")
    ours_conv = "patch_embed.proj.0.weight" in wanted
    if ours_conv != ("patch_embed.proj.0.weight" in best) and \
            "patch_embed.proj.weight" in (best if ours_conv else wanted):
        have, need = ("linear", "conv") if ours_conv else ("conv", "linear")
        raise ValueError(f"{source} holds a {have} patch embedding but the ViT has a {need} one: "
                         f"build it with build_vit(..., patch_embed={have!r}) "
                         f"(--patch_embed {have})")
    _resample_pos_embed(target, best)
    _check_loadable(target, best, strict, source)
    try:
        return target.load_state_dict(best, strict=strict)
    except RuntimeError as exc:
        raise RuntimeError(f"loading {source} into {type(target).__name__}: {exc}") from exc


def _check_loadable(target: nn.Module, state: Mapping, strict: bool, source: str) -> None:
    """Raise RuntimeError, before anything is loaded, when nn.Module.load_state_dict(state,
    strict) would fail: a shape differs (always an error), or (strict) a key is missing or
    unexpected. torch's own check runs while it copies, so it would raise with the other
    tensors already overwritten; this one leaves the module untouched."""
    own = target.state_dict()
    # load_state_dict fills a BatchNorm's missing num_batches_tracked of a dict without version
    # metadata (ours: the key-mapped copy), so that key is not missing for it
    optional = {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
                for name, m in target.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    mismatched = []
    for k, v in state.items():
        if k not in own or isinstance(own[k], nn.parameter.UninitializedParameter):
            continue
        shape, theirs = tuple(own[k].shape), tuple(v.shape)
        if shape != theirs and not (shape == () and theirs == (1,)):  # torch takes (1,) for ()
            mismatched.append(f"{k}: the checkpoint has {theirs}, the module {shape}")
    problems = [f"size mismatch for {_listed(mismatched)}"] if mismatched else []
    if strict:
        missing = [k for k in own if k not in state and k not in optional]
        unexpected = [k for k in state if k not in own]
        if missing:
            problems.append(f"Missing key(s) in the checkpoint: {_listed(missing)}")
        if unexpected:
            problems.append(f"Unexpected key(s) in the checkpoint: {_listed(unexpected)}")
    if problems:
        raise RuntimeError(f"loading {source} into {type(target).__name__}: nothing was loaded: "
                           + "; ".join(problems) + (" (strict=False loads the matching keys "
                                                    "when only keys are missing or unexpected)"
                                                    if strict and not mismatched else ""))


def _listed(items: list, limit: int = 10) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _resample_pos_embed(target: nn.Module, state: dict) -> None:
    """Resample a checkpoint's `pos_embed` (1, prefix + h*w, D) to the module's grid, in place."""
    own = getattr(target, "pos_embed", None)
    theirs = state.get("pos_embed")
    if not isinstance(own, torch.Tensor) or theirs is None or theirs.shape == own.shape:
        return
    if theirs.dim() != 3 or theirs.shape[-1] != own.shape[-1]:
        return  # let load_state_dict report the mismatch
    from timm.layers import resample_abs_pos_embed
    prefix = 0 if getattr(target, "no_embed_class", False) else target.num_prefix_tokens
    state["pos_embed"] = resample_abs_pos_embed(
        theirs, new_size=list(target.patch_embed.grid_size), num_prefix_tokens=prefix)
