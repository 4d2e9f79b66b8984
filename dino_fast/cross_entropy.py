"""Soft cross-entropy between teacher distributions and student log-softmaxes: the op behind
every DINO-family loss (DINO, DINOv2/v3's DINO and iBOT terms).

Layout: V student crops and G teacher crops of the same B samples, crop-major (row v*B + b of
the student is crop v of sample b; the teacher likewise). With y_vb = S_vb / tau_s,

    q_ib  = softmax((T_ib - c) / tau_t)        teacher logits and a center (c = 0 when None),
         or T_ib as given                      teacher probabilities (teacher_temp=None)
    loss  = scale * sum_b w_b sum_{v, i} W[v, i] * CE(q_ib, y_vb)
    CE(q, y) = -sum_k q_k log_softmax(y)_k = (sum_k q_k) lse(y) - <q, y>

with W the (V, G) pair weights (DINO: W[v, i] = [v != i]) and w the optional per-sample row
weights (iBOT: 1 / masked patches of the image). With Q_vb = sum_i W[v, i] q_ib,

    dloss/dS_vb = scale * w_b * ((sum_k Q_vb,k) softmax(y_vb) - Q_vb) / tau_s

so one log-sum-exp per student row and one dot with Q per student row give the loss, and one
softmax per row gives the gradient: no (B, K) tensor per crop pair.

Eager path (CPU, and the reference of the Triton kernels). For fp32 tensors on a CPU it runs the
C kernel of `dino_fast.cpu_kernels` (kernels/cpu_rows.c: per sample, the teacher softmaxes and
two sweeps per student row, the gradient written in the forward); where that
cannot be built, and for other dtypes, the PyTorch ops below. Those cut the samples into chunks
small enough for the working set to stay in the CPU caches; per chunk the teacher
probabilities are computed once and every crop's rows are swept once. When the student needs a
gradient and is fp32/fp64, the gradient is written in the same sweep and handed over by the
backward: S is read once from memory and the gradient written once, as a softmax into a fresh
tensor would. The only full-size allocation is that gradient (on CPU the memory of the last
one is reused once nothing holds it, so a training step does not pay a page fault and the
zeroing of every page it writes; see `empty_gradient`); the work buffers are chunk-sized and
reused by every chunk.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
import threading
from collections.abc import Sequence
from typing import Optional, Union

import torch

from dino_fast import cpu_kernels
from dino_fast.backend import check_backend_name, resolve_backend
from dino_fast.cross_entropy_spec import CrossEntropySpec, check_cross_entropy_inputs, compute_dtype

# Elements of fp32 work per chunk of rows (y and p of one crop group): ~8 MB, inside the L2 +
# L3 share of one CPU core pair, and large enough that per-op overheads stay small.
CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------- gradient memory

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise on Linux, None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


REUSE_ENV = "DINO_FAST_REUSE_GRADIENT"
REUSE_SLOTS = 2  # a DINO and an iBOT gradient per training step
_reuse_lock = threading.Lock()
_reuse: list = []  # flat CPU buffers of the last large gradients, most recently used first


def _python_refs(slots: list, i: int) -> int:
    return sys.getrefcount(slots[i])


# references to an object held only by a list slot, counted as _unshared counts them
_SLOT_REFS = _python_refs([object()], 0)


def _unshared(slots: list, i: int) -> bool:
    """Whether buffer i is held by nothing but the list: no other Python reference, no C++
    owner (autograd, .grad, a view of it) and no other tensor on its storage."""
    t = slots[i]
    storage_refs = torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    del t
    return _python_refs(slots, i) == _SLOT_REFS and slots[i]._use_count() == 1 and \
        storage_refs == 2  # the buffer's and the temporary storage object's


def release_cached_gradients() -> None:
    """Frees the CPU gradient memory `empty_gradient` keeps for reuse."""
    with _reuse_lock:
        _reuse.clear()


def _forget_cached_gradients() -> None:  # a forked child: a fresh lock, none of the buffers
    global _reuse_lock
    _reuse_lock = threading.Lock()
    _reuse.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_cached_gradients)


def _dispatch_mode_active() -> bool:
    """A torch dispatch mode (FakeTensorMode, say) is on: its tensors are not memory."""
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool(stack_len and stack_len())


def empty_gradient(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a large gradient (a (rows, K) tensor that is written in full).

    On a CPU, fresh memory costs a page fault and the zeroing of each page at its first write,
    as much as computing the gradient, at a price that varies by machine. So the memory of the
    last REUSE_SLOTS large CPU gradients is kept, and a request that fits in one of them gets a
    view of it once nothing else holds it (in training: the next step's gradient reuses the
    memory of this step's, already mapped). Otherwise the memory is fresh, its untouched pages
    marked for transparent huge pages (madvise; a no-op where the kernel does not offer them),
    one fault per 2 MB instead of per 4 KB. `release_cached_gradients()` frees the kept memory;
    `DINO_FAST_REUSE_GRADIENT=0` turns the reuse off."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    large = torch.device(device).type == "cpu" and nbytes >= 4 * _HUGE_PAGE
    reuse = large and os.environ.get(REUSE_ENV, "1").strip() != "0" and \
        not torch.compiler.is_compiling() and not _dispatch_mode_active()
    if reuse:
        with _reuse_lock:
            fits = [i for i in range(len(_reuse)) if _reuse[i].dtype == dtype and
                    _reuse[i].numel() >= numel and _unshared(_reuse, i)]
            if fits:  # the smallest that fits (a DINO and an iBOT gradient of varying size)
                i = min(fits, key=lambda j: _reuse[j].numel())
                _reuse.insert(0, _reuse.pop(i))
                return _reuse[0][:numel].view(shape)
    flat = reuse
    out = torch.empty(numel if flat else shape, dtype=dtype, device=device)
    real = type(out) is torch.Tensor  # not a fake or other subclass tensor without memory
    reuse = reuse and real
    madvise = _madvise() if large and real else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: failure changes nothing
    if reuse:
        with _reuse_lock:
            _reuse.insert(0, out)
            del _reuse[REUSE_SLOTS:]
    return out.view(shape) if flat else out


# --------------------------------------------------------------------------- eager sweep

def _view(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous view of the first prod(shape) elements of a flat work buffer."""
    return buf[:math.prod(shape)].view(shape)


def _sweep(student: torch.Tensor, teacher: torch.Tensor, center: Optional[torch.Tensor],
           row_weight: Optional[torch.Tensor], spec: CrossEntropySpec, *,
           want_loss: bool, grad: Optional[torch.Tensor],
           grad_factor: Union[float, torch.Tensor] = 1.0,
           col_sum: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """One sweep over the student rows, chunk of samples by chunk of samples.

    Returns the loss (compute dtype, 0-dim) when want_loss; writes into `grad` (shape of the
    student, any float dtype) dL/dS * grad_factor when given, and into `col_sum` ((K,) fp32)
    the teacher's column sum when given (the C kernel: in its one read of the teacher).
    grad_factor is a python float or a 0-dim tensor (the backward's grad_output on a device
    where reading it would sync).
    """
    V, G = spec.n_student, spec.n_teacher
    B, K = student.shape[0] // V, student.shape[1]
    dev = student.device
    cdt = compute_dtype(student, teacher)
    S3, T3 = student.view(V, B, K), teacher.view(G, B, K)
    G3 = None if grad is None else grad.view(V, B, K)
    c = None if center is None else center.view(1, 1, K)  # the forward's (K,) copy in cdt
    groups = spec.groups()
    widest = max(v1 - v0 for v0, v1, _ in groups)
    nb = max(1, min(B, CHUNK_ELEMENTS // (widest * K)))
    inv_s = 1.0 / spec.student_temp
    # gradient of each row: scale * w_b * (Qsum p - Q) / tau_s * grad_factor = a p + nQ
    f = grad_factor * (spec.scale * inv_s)
    weighted = row_weight is not None
    probs_given = spec.teacher_temp is None
    w_all = None if not weighted else row_weight.detach().to(cdt)
    kernel = _cpu_kernel(student, teacher, grad, cdt, grad_factor, G)
    if kernel is not None:  # the C kernel (dino_fast.cpu_kernels): fp32 on a CPU
        ce = cpu_kernels.soft_cross_entropy(
            kernel, student, teacher, center, grad, groups, G, spec.student_temp,
            spec.teacher_temp, None if row_weight is None else row_weight.detach(),
            spec.scale * grad_factor, col_sum)
        return ce.sum().mul_(spec.scale).to(cdt) if want_loss else None
    if col_sum is not None:
        torch.sum(teacher, dim=0, dtype=torch.float32, out=col_sum)
    # work buffers, allocated once and reused by every chunk; each chunk takes contiguous views
    # of them (a partial last chunk too: softmax's out= must be contiguous)
    y_buf = torch.empty(widest * nb * K, dtype=cdt, device=dev)
    p_buf = torch.empty(widest * nb * K, dtype=cdt, device=dev)
    q_buf = torch.empty(G * nb * K, dtype=cdt, device=dev)
    x_buf = None if probs_given else torch.empty(G * nb * K, dtype=cdt, device=dev)
    # one group's combined Q (and its scaled negative) is live at a time
    comb_buf = torch.empty(nb * K, dtype=cdt, device=dev)
    nq_buf = None if grad is None else torch.empty(nb * K, dtype=cdt, device=dev)
    dots_buf = torch.empty(widest * nb, dtype=cdt, device=dev)
    total = torch.zeros((), dtype=cdt, device=dev)
    for b0 in range(0, B, nb):
        b1 = min(B, b0 + nb)
        n = b1 - b0
        # 1. teacher probabilities of the chunk's samples, every teacher crop
        t_rows = T3[:, b0:b1]
        if probs_given:
            q = t_rows if t_rows.dtype == cdt else _view(q_buf, G, n, K).copy_(t_rows)
        else:
            x = _view(x_buf, G, n, K)
            torch.sub(t_rows, c, out=x) if c is not None else x.copy_(t_rows)
            x.mul_(1.0 / spec.teacher_temp)
            q = _view(q_buf, G, n, K)
            torch.ops.aten._softmax.out(x, -1, False, out=q)
        q_sum = q.sum(dim=-1)  # (G, n): 1 up to rounding for a softmax
        w = None if not weighted else w_all[b0:b1]
        for v0, v1, pw in groups:
            nv = v1 - v0
            # 2. the group's combined teacher Q = sum_i W[v, i] q_i and its row sums
            active = [(i, wi) for i, wi in enumerate(pw) if wi != 0.0]
            if not active:
                Q = None
            elif len(active) == 1 and active[0][1] == 1.0:
                Q = q[active[0][0]]
            else:
                Q = _view(comb_buf, n, K)
                torch.mul(q[active[0][0]], active[0][1], out=Q)
                for i, wi in active[1:]:
                    Q.add_(q[i], alpha=wi)
            Q_sum = sum(wi * q_sum[i] for i, wi in active) if active else None
            if Q is None:  # crops paired with no teacher crop: no loss, zero gradient
                if G3 is not None:
                    G3[v0:v1, b0:b1].zero_()
                continue
            # 3. y' = S / tau_s - max, p = softmax(y'), per row (crop v of sample b)
            y, p = _view(y_buf, nv, n, K), _view(p_buf, nv, n, K)
            if student.dtype == cdt:
                torch.mul(S3[v0:v1, b0:b1], inv_s, out=y)
            else:  # widen first: a bf16 product would be rounded to bf16 before the store
                y.copy_(S3[v0:v1, b0:b1]).mul_(inv_s)
            y.sub_(torch.amax(y, dim=-1, keepdim=True))
            torch.ops.aten._softmax.out(y, -1, False, out=p)
            if want_loss:
                # CE = Qsum lse(y) - <Q, y> = -<Q, y'> - Qsum log max p, as lse(y') = -log max p:
                # two non-negative parts, no cancellation however large the logits
                d = _view(dots_buf, nv, n)
                # matrix-vector products read y' in place (einsum's batched product was
                # 3e-5 off in fp32 at K = 65536; BLAS's mv 5e-7)
                for j in range(n):
                    torch.mv(y[:, j], Q[j], out=d[:, j])
                term = d + Q_sum * torch.log(torch.amax(p, dim=-1))  # (nv, n) = -CE
                if weighted:
                    term = term * w
                total -= term.sum()
            if G3 is not None:
                # 4. dL/dS = a p + nQ, a = f w Qsum, nQ = -f w Q
                out = G3[v0:v1, b0:b1]
                if weighted:
                    fw = (w * f).view(n, 1)
                    nQ = torch.mul(Q, fw, out=_view(nq_buf, n, K)).neg_()
                    torch.addcmul(nQ, p, (fw.view(n) * Q_sum).view(1, n, 1), out=out)
                elif probs_given or isinstance(f, torch.Tensor):
                    nQ = torch.mul(Q, f, out=_view(nq_buf, n, K)).neg_()
                    a = (Q_sum * f).view(1, n, 1)
                    torch.addcmul(nQ, p, a, out=out)
                else:
                    # a softmax teacher: Qsum = sum_i W[v, i] up to rounding (1e-7)
                    nQ = torch.mul(Q, -f, out=_view(nq_buf, n, K))
                    torch.add(nQ, p, alpha=f * sum(wi for _, wi in active), out=out)
    return total * spec.scale if want_loss else None


def _cpu_kernel(student, teacher, grad, cdt, grad_factor, n_teacher):
    """The C kernel when it applies (fp32 contiguous CPU tensors, a python-float gradient
    factor, at most MAX_TEACHER_CROPS teacher crops) and is built, else None (the ops)."""
    if student.device.type != "cpu" or cdt != torch.float32 or \
            student.dtype != torch.float32 or teacher.dtype != torch.float32 or \
            not student.is_contiguous() or not teacher.is_contiguous() or \
            (grad is not None and (grad.dtype != torch.float32 or not grad.is_contiguous())) or \
            isinstance(grad_factor, torch.Tensor) or n_teacher > cpu_kernels.MAX_TEACHER_CROPS \
            or torch.compiler.is_compiling():
        return None
    return cpu_kernels.kernel()


class _SoftCrossEntropyEager(torch.autograd.Function):
    """The eager op with the closed-form gradient (module docstring).

    When the student needs a gradient and is stored in the compute dtype (fp32/fp64), the
    gradient is written in the forward's sweep and kept on ctx (not save_for_backward, so
    saved-tensor hooks do not see it); the first backward hands it over, scaled by grad_output
    unless that is 1. Low-precision students (bf16/fp16) and a retained graph's second
    backward recompute it from S instead, scaled by grad_output before rounding (fp16 cannot
    hold the unscaled gradient, ~1e-7, which is why a loss scaler multiplies it).
    Saved: S and T (alive anyway) and a copy of the center (K floats). With want_col_sum, a
    second output: the teacher's column sum (K,) fp32, not differentiable.
    """

    @staticmethod
    def forward(ctx, student, teacher, center, row_weight, spec, grad_in_forward, want_col_sum):
        cdt = compute_dtype(student, teacher)
        grad = None
        if grad_in_forward and student.dtype == cdt:
            grad = empty_gradient(student.shape, cdt, student.device)
        center = None if center is None else center.detach().reshape(-1).to(cdt, copy=True)
        col_sum = (torch.empty(student.shape[1], dtype=torch.float32, device=student.device)
                   if want_col_sum else None)
        loss = _sweep(student, teacher, center, row_weight, spec, want_loss=True, grad=grad,
                      col_sum=col_sum)
        ctx.save_for_backward(student, teacher, center, row_weight)
        ctx.spec, ctx.grad = spec, grad
        loss = loss.to(torch.float64 if cdt == torch.float64 else torch.float32)
        if col_sum is None:
            return loss
        ctx.mark_non_differentiable(col_sum)
        return loss, col_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        student, teacher, center, row_weight = ctx.saved_tensors
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            # on CPU reading grad_loss costs nothing; elsewhere scale without a host sync
            if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
                grad.mul_(grad_loss.to(grad.dtype))
            return grad, None, None, None, None, None, None
        factor = grad_loss.item() if grad_loss.device.type == "cpu" else grad_loss.to(
            compute_dtype(student, teacher))
        grad = empty_gradient(student.shape, student.dtype, student.device)
        with torch.autocast(student.device.type, enabled=False):
            _sweep(student, teacher, center, row_weight, ctx.spec, want_loss=False, grad=grad,
                   grad_factor=factor)
        return grad, None, None, None, None, None, None


def soft_cross_entropy_eager(student, teacher, spec: CrossEntropySpec, center=None,
                             row_weight=None, teacher_sum: bool = False):
    """The eager op on validated inputs (see `soft_cross_entropy`): the loss, or with
    teacher_sum (loss, the teacher's column sum (K,) fp32)."""
    grad_in_forward = torch.is_grad_enabled() and student.requires_grad
    # computed in the inputs' dtype, as on CUDA; CPU autocast would round the row dots
    with torch.autocast(student.device.type, enabled=False):
        return _SoftCrossEntropyEager.apply(
            student, teacher.detach(), center, None if row_weight is None else
            row_weight.detach(), spec, grad_in_forward, teacher_sum)


def select_backend(backend: str, student: torch.Tensor, teacher: torch.Tensor, op: str) -> str:
    """"triton" or "eager" for these inputs (see dino_fast.backend). "auto" also sends fp64
    inputs to the eager path: the kernels compute in fp32, fp64 asks for fp64 exactness."""
    resolved = resolve_backend(backend, student.device, op)
    if backend == "auto" and compute_dtype(student, teacher) == torch.float64:
        return "eager"
    return resolved


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor,
                       pair_weight: Sequence[Sequence[float]], *, student_temp: float,
                       teacher_temp: Optional[float] = None,
                       center: Optional[torch.Tensor] = None,
                       row_weight: Optional[torch.Tensor] = None, scale: float = 1.0,
                       teacher_sum: bool = False, backend: str = "auto"):
    """Soft cross-entropy of teacher distributions against student log-softmaxes, over crop
    pairs, without a (B, K) tensor per pair: the op behind DINO's, DINOv2's and DINOv3's losses.

        loss = scale * sum_b row_weight[b] * sum_{v, i} pair_weight[v][i] * CE(q_ib, S_vb)
        CE(q, s) = -sum_k q_k * log_softmax(s / student_temp)_k

    Args:
        student: (V*B, K) student logits, crop-major (row v*B + b is crop v of sample b);
            fp32, bf16, fp16 or fp64.
        teacher: (G*B, K) teacher rows, same layout: logits when `teacher_temp` is given
            (q = softmax((teacher - center) / teacher_temp)), else probabilities used as given
            (they need not sum to 1). Gets no gradient.
        pair_weight: (V, G) table of python floats: the weight of each (student crop, teacher
            crop) pair. DINO: [[0, 1], [1, 0], [1, 1], ...] (a crop is not paired with itself).
        student_temp, teacher_temp: temperatures (teacher_temp None: probabilities given).
        center: K entries ((K,), (1, K) or (1, 1, K)) subtracted from the teacher logits.
        row_weight: (B,) per-sample weights (None: 1), e.g. iBOT's 1 / masked patches.
        scale: a factor on the whole loss (DINO: 1 / (pairs * B)).
        teacher_sum: also return the teacher's column sum (K,) fp32, for a center update.
        backend: "auto" (Triton on CUDA, eager on CPU and for fp64), "triton" or "eager".

    Returns:
        The loss, an fp32 scalar (fp64 for fp64 inputs on the eager path), differentiable
        w.r.t. `student`; with teacher_sum, (loss, teacher column sum).

    Example:
        >>> S, T = torch.randn(4 * 8, 100), torch.randn(2 * 8, 100)
        >>> W = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]   # DINO pairs, 2 + 2 crops
        >>> loss = soft_cross_entropy(S, T, W, student_temp=0.1, teacher_temp=0.04,
        ...                           scale=1 / (6 * 8))
    """
    check_backend_name(backend)
    spec, B, K = check_cross_entropy_inputs(
        student, teacher, pair_weight, student_temp=student_temp, teacher_temp=teacher_temp,
        center=center, row_weight=row_weight, scale=scale)
    resolved = select_backend(backend, student, teacher, "soft_cross_entropy")
    if resolved == "triton":
        # imported on first use: kernel modules must be imported after TRITON_INTERPRET is set
        from dino_fast.kernels.cross_entropy import run_soft_cross_entropy_triton
        loss, col_sum = run_soft_cross_entropy_triton(student, teacher, spec, center,
                                                      row_weight, teacher_sum=teacher_sum)
    else:
        out = soft_cross_entropy_eager(student, teacher, spec, center, row_weight, teacher_sum)
        # detached: under torch.compile the Function's non-differentiable mark is not kept
        loss, col_sum = (out[0], out[1].detach()) if teacher_sum else (out, None)
    return (loss, col_sum) if teacher_sum else loss
