"""Backend dispatch shared by every fused op: `backend="auto" | "triton" | "eager"`.

- ``auto``: Triton when the tensors are on CUDA and Triton imports, eager otherwise.
- ``triton``: on CUDA, or on CPU only under the Triton interpreter (``TRITON_INTERPRET=1`` set
  before any kernel module is imported); anything else raises a clear error.
- ``eager``: PyTorch, the CPU production path and the reference of the fused kernels (the soft
  cross-entropy's fp32 CPU sweep runs a small C kernel, `dino_fast.cpu_kernels`, when a C
  compiler builds it).

Each op records the backend it ran (``last_backend`` attribute on the module), so the choice is
never silent.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "eager")


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors, in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package can be imported (it has Linux wheels only)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent: the eager path still runs
        return False
    return True


def check_backend_name(backend: str, arg: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return "triton" or "eager" for an op whose tensors live on `device`.

    Raises ValueError for an unknown name and RuntimeError when "triton" was asked for where it
    cannot run.
    """
    check_backend_name(backend)
    on_cuda = device.type == "cuda"
    if backend == "eager":
        return "eager"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "eager"
    # backend == "triton"
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' was requested but Triton cannot be imported; "
                           "install triton or use backend='eager'")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: backend='triton' on a {device.type} tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before dino_fast's kernels are imported, move the tensors to CUDA, "
            "or use backend='eager'")
    return "triton"
