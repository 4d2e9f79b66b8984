"""The CPU kernels (kernels/cpu_rows.c), built at first use: the eager soft cross-entropy's rows,
the Sinkhorn-Knopp teacher's steps and the batched augmentation's photometric pass.

On a CPU a chain of PyTorch ops reads each cache-resident row of the student eight or nine times
(scale, max, shift, softmax, max, dot, gradient) and pays a call per op and chunk. The C kernel
takes each sample's teacher rows and student rows through in one go, two sweeps per student row
(an online softmax: a block's max, then its exp, sum and teacher dot while it is in L1; the
gradient, from L2), so fp32 runs near the speed of a softmax into a fresh tensor. It is compiled
once per machine with the system C compiler (`$CC`, else `cc`) into a cache directory
(`$DINO_FAST_CACHE/cpu_kernels`, else `~/.cache/dino_fast/cpu_kernels`, else one in the
temporary directory), keyed by the source, the flags and the CPU, and loaded with ctypes (a
cached build that does not load is rebuilt).

The loss, the Sinkhorn-Knopp steps and the photometric pass run on `torch.get_num_threads()`
threads, a range of samples (rows, images) each. Where the build links OpenMP and the process
then maps one OpenMP runtime (PyTorch's libgomp, which the build's libgomp.so.1 binds to), they
are that runtime's threads: after a PyTorch op those still spin, waiting for work, and any other
thread would compete with them for the cores (the loss a third slower on a 2-core VM).
Otherwise the loss and the photometric pass run on Python threads (ctypes releases the GIL) and
the Sinkhorn-Knopp steps on the calling thread. `thread_mode()` says which. A forked child runs
them so too: GNU OpenMP's pool does not survive a fork (PyTorch's own parallel ops hang in such a
child unless it runs one thread, as data-loader workers do).

The augmentation's colour jitter and grayscale (`photometric`) take each image through all of
their operations while it is in the cache, where the PyTorch ops make a pass over the batch per
elementary operation (about a hundred at CIFAR size).

`DINO_FAST_CPU_KERNEL` chooses: `auto` (default: the kernel when it builds, else the PyTorch
ops, with one warning), `0` (always the ops) or `1` (the kernel, an error when it cannot be
built). `status()` says which is in use and why.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).resolve().parent / "kernels" / "cpu_rows.c"
if not SOURCE.is_file():  # an editable install: dino_fast.kernels is the top-level kernels/
    SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "cpu_rows.c"
# -ffp-contract=off: no fused multiply-adds (clang's default would fuse), so the kernel rounds as
# the ops path does and the gradient's two products cancel exactly where they should;
# -fno-trapping-math: no floating-point traps to preserve (values unchanged), which lets the
# compiler vectorize the selects of branch-free loops such as the hue rotation's
# -fopenmp: the loss's threads come from the process's OpenMP runtime (module docstring); the
# sets after it go without
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"],
             ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math"],
             ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math"],
             ["-O3", "-ffp-contract=off"])
COMPILE_TIMEOUT_S = 120
ENV = "DINO_FAST_CPU_KERNEL"
# a block smaller than this runs on the calling thread: handing it out costs more than it saves
MIN_ELEMENTS_PER_THREAD = 1 << 16

_lock = threading.Lock()
_state: dict = {}  # "fn": the ctypes function or None; "why": the reason when None


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{ENV} must be auto, 0 or 1, got {value!r}")
    return value


def _cpu_signature() -> str:
    """What the compiled code depends on: -march=native code runs only on a CPU of the same kind
    (a home directory shared by machines of several kinds gets one build per kind)."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    info += line
    except OSError:
        pass
    return info


def _cache_dirs() -> list:
    """Where builds go: $DINO_FAST_CACHE or ~/.cache/dino_fast, then the temporary directory
    (a read-only home)."""
    root = os.environ.get("DINO_FAST_CACHE") or Path.home() / ".cache" / "dino_fast"
    tmp = Path(tempfile.gettempdir()) / f"dino_fast-{os.getuid() if hasattr(os, 'getuid') else 0}"
    return [Path(root) / "cpu_kernels", tmp / "cpu_kernels"]


def _load(path: Path) -> dict:
    runtimes = _openmp_runtimes()  # PyTorch's, loaded with torch
    lib = ctypes.CDLL(str(path))
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    fn = lib.dino_fast_soft_ce_f32
    fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32, f32, i64, i64, ptr, ptr, ptr,
                   ctypes.c_double, i64, i64, ptr, ptr, ptr]
    fn.restype = None
    batch = lib.dino_fast_soft_ce_f32_batch
    batch.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32, f32, i64, i64, ptr, ptr, ptr,
                      ctypes.c_double, i64, ptr, i64, ptr, ptr, ptr]
    batch.restype = None
    lib.dino_fast_openmp.restype = i64
    lib.dino_fast_soft_ce_work.argtypes = [i64, i64]
    lib.dino_fast_soft_ce_work.restype = i64
    photo = lib.dino_fast_photometric_f32
    photo.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                      ptr, f32, ptr, ptr, ptr, i64, i64]
    photo.restype = None
    photo_batch = lib.dino_fast_photometric_f32_batch
    photo_batch.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                            i64, ptr, f32, ptr, ptr, i64, i64, ptr, i64]
    photo_batch.restype = None
    colsum = lib.dino_fast_colsum_f32
    colsum.argtypes = [ptr, i64, i64, i64, ptr]
    colsum.restype = None
    sk = lib.dino_fast_sk_f32_batch
    sk.argtypes = [i64, ptr, i64, i64, i64, f32, ptr, i64, ptr, i64, ptr, i64, ptr]
    sk.restype = None
    # the OpenMP threads only where the build bound to the one runtime already loaded, a GNU one
    # (not a second runtime with threads of its own: clang's libomp, another libgomp)
    after = _openmp_runtimes()
    openmp = bool(lib.dino_fast_openmp()) and after is not None and after == runtimes and \
        len(after) == 1 and "libgomp" in os.path.basename(next(iter(after)))
    return {"fn": fn, "photometric": photo, "batch": batch if openmp else None,
            "work_floats": lib.dino_fast_soft_ce_work, "sinkhorn": sk, "colsum": colsum,
            "photometric_batch": photo_batch if openmp else None, "path": path}


def _openmp_runtimes() -> Optional[set]:
    """The OpenMP runtime libraries the process maps (GNU, LLVM, Intel), by real path; None where
    /proc/self/maps cannot be read (not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f
                     if any(n in line for n in ("libgomp", "libomp", "libiomp"))}
    except OSError:
        return None
    return {os.path.realpath(p) for p in paths}


def _compile(compiler: str, flags: list, target: Path) -> Optional[str]:
    """Build into target (atomically); returns None, or the error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as exc:
        return f"cannot write {target.parent}: {exc}"
    os.close(fd)
    cmd = [compiler, *flags, "-std=c99", "-fPIC", "-shared", str(SOURCE), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        error = proc.stderr.strip()[-500:] if proc.returncode != 0 else None
    except (OSError, subprocess.TimeoutExpired) as exc:  # no compiler, or a hung one
        error = str(exc)
    if error is not None:
        os.unlink(tmp)
        return f"{' '.join(cmd)}: {error}"
    os.replace(tmp, target)  # atomic: concurrent processes build the same file
    return None


def _build() -> dict:
    """Compile (or find the cached build of) the kernels and load them; raises with the compiler's
    messages when no flag set compiles."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or \
        shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install cc / gcc / clang)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()
                             + _cpu_signature().encode()).hexdigest()[:20]
        for cache in _cache_dirs():
            target = cache / f"cpu_rows-{key}.so"
            for _ in range(2):  # a cached file that does not load is rebuilt once
                if not target.is_file():
                    error = _compile(compiler, flags, target)
                    if error is not None:
                        errors.append(error)
                        break
                try:
                    return _load(target)
                except (OSError, AttributeError) as exc:
                    errors.append(f"{target}: {exc}")
                    try:
                        target.unlink()
                    except OSError:
                        break
            if errors and errors[-1].startswith("cannot write"):
                continue  # the next cache directory
            break
    raise RuntimeError("the C kernel could not be built or loaded: " + " | ".join(errors))


def _kernel(name: str):
    want = mode()
    if want == "0":
        return None
    with _lock:
        if "fn" not in _state:
            try:
                _state.update(_build(), why="compiled")
            except Exception as exc:  # no compiler, a failed build: the ops still run
                _state.update(fn=None, photometric=None, batch=None, photometric_batch=None,
                              sinkhorn=None, path=None, why=f"unavailable: {exc}")
                if want == "auto":
                    warnings.warn(f"dino_fast: the CPU kernels could not be built, the eager "
                                  f"loss, the Sinkhorn-Knopp steps and the batched augmentation "
                                  f"run on PyTorch ops (slower): {exc}", RuntimeWarning,
                                  stacklevel=4)
    if _state[name] is None and want == "1":
        raise RuntimeError(f"{ENV}=1 but the CPU kernels are {_state['why']}")
    return _state[name]


def kernel():
    """The compiled row function, or None when the ops are to be used (see the module doc)."""
    return _kernel("fn")


def photometric_kernel():
    """The compiled photometric pass, or None when the ops are to be used."""
    return _kernel("photometric")


def thread_mode() -> str:
    """How the kernels run their threads: "openmp" (the process's OpenMP runtime), "python
    threads", or "none" when the kernels are not in use."""
    if kernel() is None:
        return "none"
    return "openmp" if _state.get("batch") is not None else "python threads"


def status() -> str:
    """"compiled", "disabled (DINO_FAST_CPU_KERNEL=0)" or "unavailable: <why>"."""
    if mode() == "0":
        return f"disabled ({ENV}=0)"
    kernel()
    return _state["why"]


_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _forget_pool() -> None:
    """In a forked child (a data-loader worker): none of the pool's threads, and GNU OpenMP's
    pool does not survive a fork either (a parallel region would wait for its threads forever):
    the kernels run on Python threads there."""
    global _pool
    _pool = None
    for key in ("batch", "photometric_batch"):
        if _state.get(key) is not None:
            _state[key] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _threads(n: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=n,
                                                          thread_name_prefix="dino_fast_rows")
        return _pool


def _run(fn, calls: list) -> None:
    """fn(*call) for every call, the first on the calling thread, the others on the pool."""
    if len(calls) == 1:
        fn(*calls[0])
        return
    jobs = [_threads(len(calls) - 1).submit(fn, *c) for c in calls[1:]]
    try:
        fn(*calls[0])
    finally:
        for job in jobs:
            job.result()


MAX_TEACHER_CROPS = 64  # the kernel's per-sample table of teacher rows


def soft_cross_entropy(fn, student: torch.Tensor, teacher: torch.Tensor,
                       center: Optional[torch.Tensor], grad: Optional[torch.Tensor],
                       groups: list, n_teacher: int, student_temp: float,
                       teacher_temp: Optional[float], row_weight: Optional[torch.Tensor],
                       grad_scale: float, col_sum: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """Run the kernel: returns the (V*B,) fp64 per-row w_b CE, and writes grad (when given) =
    grad_scale * w_b * (Qsum softmax(S / tau_s) - Q) / tau_s and col_sum (when given, (K,) fp32)
    = the sum of the teacher's rows, in the kernel's one read of them (a compensated fp32 sum
    per thread, the threads' added in fp64).

    student, grad: (V*B, K) contiguous fp32; teacher: (G*B, K) contiguous fp32 logits
    (teacher_temp given) or probabilities; center: (K,) contiguous fp32 or None; groups: the
    spec's (v0, v1, weights) runs; row_weight: (B,) fp32 or None.
    """
    K = student.shape[1]
    B = teacher.shape[0] // n_teacher
    V = student.shape[0] // B
    bounds = torch.tensor([g[0] for g in groups] + [groups[-1][1]], dtype=torch.int64)
    weights = torch.tensor([g[2] for g in groups], dtype=torch.float32).contiguous()
    rw = None if row_weight is None else row_weight.to(torch.float32).contiguous()
    workers = max(1, min(torch.get_num_threads(), B, V * B * K // MIN_ELEMENTS_PER_THREAD))
    need = _state["work_floats"](n_teacher, K)  # then the column sum's partial, 2 K floats
    work = torch.empty(workers, need + (2 * K if col_sum is not None else 0),
                       dtype=torch.float32)
    ce = torch.empty(V * B, dtype=torch.float64)
    inv_t = 0.0 if teacher_temp is None else 1.0 / teacher_temp
    args = (student.data_ptr(), teacher.data_ptr(), 0 if center is None else center.data_ptr(),
            0 if grad is None else grad.data_ptr(), V, n_teacher, B, K, 1.0 / student_temp,
            inv_t, int(teacher_temp is None), len(groups), bounds.data_ptr(), weights.data_ptr(),
            0 if rw is None else rw.data_ptr(), grad_scale / student_temp)
    partial = None if col_sum is None else work[:, need:]
    batch = _state.get("batch")
    if batch is not None:  # the threads of the OpenMP runtime; the column sum added in C
        batch(*args, workers, work.data_ptr(), work.stride(0), ce.data_ptr(),
              0 if partial is None else partial.data_ptr(),
              0 if col_sum is None else col_sum.data_ptr())
        return ce
    edges = [B * i // workers for i in range(workers + 1)]
    _run(fn, [(*args, b0, b1, work[i].data_ptr(), ce.data_ptr(),
               0 if partial is None else partial[i].data_ptr())
              for i, (b0, b1) in enumerate(zip(edges[:-1], edges[1:]))])
    if col_sum is not None:  # in C: no PyTorch op (its threads) between the kernel's calls
        _state["colsum"](partial.data_ptr(), workers, work.stride(0), K, col_sum.data_ptr())
    return ce


SK_COL_MAX, SK_COL_SUM, SK_COL_STEP, SK_PROBS = range(4)  # kernels/cpu_rows.c's steps


def sinkhorn_kernel():
    """The compiled Sinkhorn-Knopp steps, or None when the ops are to be used."""
    return _kernel("sinkhorn")


def sinkhorn_step(fn, op: int, x: torch.Tensor, n: int, inv_t: float,
                  vec: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None
                  ) -> Optional[torch.Tensor]:
    """One Sinkhorn-Knopp step of kernels/cpu_rows.c on a = x * inv_t, rows 0 .. n - 1 of x
    ((rows, K) fp32 CPU, unit column stride, read in place): SK_COL_MAX, SK_COL_SUM (vec: the
    column max) and SK_COL_STEP (vec: log u) return a (K,) fp32 tensor; SK_PROBS writes
    softmax(a + vec) into out ((rows, K) fp32, unit column stride) and returns None. On the
    threads of the OpenMP runtime where the kernels run there, else on the calling thread."""
    K = x.shape[1]
    openmp = _state.get("batch") is not None
    workers = max(1, min(torch.get_num_threads() if openmp else 1, n,
                         n * K // MIN_ELEMENTS_PER_THREAD))
    work = torch.empty(workers, 2 * K, dtype=torch.float32)
    result = None if op == SK_PROBS else torch.empty(K, dtype=torch.float32)
    fn(op, x.data_ptr(), x.stride(0), n, K, inv_t, 0 if vec is None else vec.data_ptr(), workers,
       work.data_ptr(), work.stride(0), 0 if out is None else out.data_ptr(),
       0 if out is None else out.stride(0), 0 if result is None else result.data_ptr())
    return result


def photometric(fn, x: torch.Tensor, ops: torch.Tensor, factors: torch.Tensor,
                gray: torch.Tensor, blur: torch.Tensor, blur_taps: torch.Tensor, reach: int,
                solarize: torch.Tensor, threshold: float, mean: Optional[torch.Tensor],
                std: Optional[torch.Tensor], crop_from: Optional[tuple] = None
                ) -> torch.Tensor:
    """Run the photometric kernel on x in place and return it.

    x: (n, 3, H, W) contiguous fp32 CPU images in [0, 1]; or, with crop_from = (images, wy, wx),
    first written with the crops clamp(wy[n] @ images[n % B] @ wx[n]^T, 0, 1) (images (B, 3,
    H_in, W_in) contiguous fp32, wy (n, H, H_in), wx (n, W, W_in): `resized_crops`, H == W).
    ops: (n, 4) operation codes per jitter position (0 brightness, 1 contrast, 2 saturation,
    3 hue, -1 none); factors: (n, 4) (brightness, contrast, saturation, hue); gray, solarize:
    (n,) booleans; blur: (n,) the image's row in blur_taps (m, 2 * reach + 1), the box kernel of
    each of PIL's blur passes (`box_kernels`), or -1; threshold: the solarization's; mean, std:
    3 values each (normalised: (x - mean) / std), or None."""
    n, _, height, width = x.shape
    ops = ops.to(torch.int64).contiguous()
    factors = factors.to(torch.float32).contiguous()
    flags = [t.to(torch.uint8).contiguous() for t in (gray, solarize)]
    blur = blur.to(torch.int64).contiguous()
    blur_taps = blur_taps.to(torch.float32).contiguous()
    stats = [None if t is None else t.to(torch.float32).contiguous() for t in (mean, std)]
    images, wy, wx_t, batch, h_in, w_in = None, None, None, 1, 0, 0
    if crop_from is not None:
        images, wy, wx = crop_from
        batch, _, h_in, w_in = images.shape
        wy = wy.to(torch.float32).contiguous()
        wx_t = wx.to(torch.float32).transpose(-1, -2).contiguous()
    workers = max(1, min(torch.get_num_threads(), n,
                         n * 3 * height * width // MIN_ELEMENTS_PER_THREAD))
    work = torch.empty(workers, max(height, h_in) * width, dtype=torch.float32)
    def ptr(t):
        return 0 if t is None else t.data_ptr()

    args = (x.data_ptr(), height, width, ptr(images), batch, h_in, w_in, ptr(wy), ptr(wx_t),
            ops.data_ptr(), factors.data_ptr(), flags[0].data_ptr(), blur.data_ptr(),
            blur_taps.data_ptr(), reach, flags[1].data_ptr(), threshold, ptr(stats[0]),
            ptr(stats[1]))
    batch = _state.get("photometric_batch")
    if batch is not None:  # the threads of the OpenMP runtime, as the loss's
        batch(*args, n, workers, work.data_ptr(), work.stride(0))
        return x
    edges = [n * i // workers for i in range(workers + 1)]
    _run(fn, [(*args, work[i].data_ptr(), b0, b1)
              for i, (b0, b1) in enumerate(zip(edges[:-1], edges[1:]))])
    return x
