"""Drop-in versions of the DINOv2 loss classes (facebookresearch/dinov2, dinov2/loss/).

- `DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)`: the CLS-token loss over lists of
  student and teacher tensors, with softmax centering or the Sinkhorn-Knopp teacher.
- `iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)`: the masked-patch loss,
  center of shape (1, 1, K).
- `KoLeoLoss()`: the Kozachenko-Leonenko regulariser on the CLS features.

Same constructor, methods, values, gradients, centers and state_dict (`{'center': ...}`) as the
official classes. Differences, all on inputs the official classes get wrong or refuse:
- no process group is needed (the official iBOT Sinkhorn-Knopp all-reduces unconditionally);
  with one initialised, the same sums are all-reduced over it (keyword `process_group`, default
  the default group);
- the Sinkhorn-Knopp teacher is computed in the log domain (dino_fast.sinkhorn): finite and
  exact where the official bare exp(x / tau) overflows to NaN;
- the losses are returned in fp32 whatever the input dtype (the official DINOLoss and iBOT
  forward compute a bf16 log-softmax for bf16 inputs); KoLeo computes in fp32 (the official fp16
  KoLeo rounds its eps 1e-8 to 0 and returns inf for duplicate features);
- bad input raises an error naming the argument before anything, the center included, changes;
- the center is updated in place (the buffer keeps its identity), and a teacher on another
  device than the center is an error (the official iBOT class moves its center to the teacher).

The cross-entropies go through `soft_cross_entropy` (one call per forward, every student crop
against every teacher crop, with pair and row weights), whose `backend` ("auto" | "triton" |
"eager", keyword-only in every constructor) picks the fused kernel or the eager path; the one
that ran is in `last_backend`. The same `backend` picks the Sinkhorn-Knopp step's path
(dino_fast.sinkhorn: fused on CUDA, no (rows, K) temporary), recorded in
`last_sinkhorn_backend`. KoLeo is eager.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dino_fast.backend import check_backend_name
from dino_fast.checks import check_floating_tensor, check_int, check_positive, check_unit_interval
from dino_fast.cross_entropy import select_backend, soft_cross_entropy
from dino_fast.sinkhorn import check_sinkhorn_inputs, select_sinkhorn_backend, sinkhorn_knopp_probs

# ------------------------------------------------------------------------------------ checks

def check_same_device(t: torch.Tensor, name: str, device: torch.device, what: str) -> None:
    """t must live on `device` (`what` names where that device comes from)."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {what} is on {device}; all must be on the "
                         f"same device (move the loss with .to(device) first)")


def check_logits(t, name: str, out_dim: int, dims: Union[int, tuple], device, what: str,
                 arg_dim: str = "out_dim") -> None:
    """A floating tensor with `dims` dimensions (an int or a tuple of allowed ones), at least one
    element, out_dim last, on `device`."""
    check_floating_tensor(t, name)
    allowed = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions (..., "
                         f"{arg_dim}), got shape {tuple(t.shape)}")
    if t.shape[-1] != out_dim:
        raise ValueError(f"{arg_dim} mismatch: the loss was built with {arg_dim}={out_dim}, "
                         f"{name} has {t.shape[-1]} in its last dimension")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    check_same_device(t, name, device, what)


def _process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


# --------------------------------------------------------------------- the shared loss cores

def crops_loss(student: torch.Tensor, teacher: torch.Tensor, n_student: int, n_teacher: int, *,
               student_temp: float, teacher_temp: Optional[float], center, ignore_diagonal: bool,
               mean_over_pairs: bool, backend: str) -> torch.Tensor:
    """Every student crop against every teacher crop (optionally not crop v against crop v).

    student: (n_student*N, K), teacher: (n_teacher*N, K), crop-major; teacher rows are
    probabilities (teacher_temp None) or logits centred by `center`. Returns
        sum_{pairs} mean_rows CE                       (mean_over_pairs False: DINOv2), or
        sum_{pairs} sum_rows CE / (N * #pairs)         (mean_over_pairs True: DINOv3),
    with one soft_cross_entropy call; `backend` is already resolved.
    """
    n_rows = student.shape[0] // n_student
    pair_weight = [[0.0 if ignore_diagonal and v == i else 1.0 for i in range(n_teacher)]
                   for v in range(n_student)]
    n_pairs = sum(map(sum, pair_weight))
    scale = 1.0 / (n_rows * n_pairs) if mean_over_pairs else 1.0 / n_rows
    return soft_cross_entropy(student, teacher, pair_weight, student_temp=student_temp,
                              teacher_temp=teacher_temp, center=center, scale=scale,
                              backend=backend)


def check_masked_inputs(student, teacher, masks_weight, n_images, n_masked_patches, out_dim,
                        device, what: str, *, teacher_name: str = "teacher_patch_tokens_masked"
                        ) -> int:
    """Validate the masked-patch inputs; return the number of rows that count (n)."""
    check_logits(student, "student_patch_tokens_masked", out_dim, 2, device, what,
                 "patch_out_dim")
    check_logits(teacher, teacher_name, out_dim, 2, device, what, "patch_out_dim")
    if teacher.shape != student.shape:
        raise ValueError(f"{teacher_name} must have the shape of student_patch_tokens_masked "
                         f"{tuple(student.shape)}, got {tuple(teacher.shape)}")
    check_int(n_images, "n_images (student_masks_flat.shape[0])", 1)
    rows = student.shape[0]
    if n_masked_patches is None:
        n = rows
    else:
        n = check_int(n_masked_patches, "n_masked_patches", 0)
        if n > rows:
            raise ValueError(f"n_masked_patches must be <= the {rows} rows of "
                             f"student_patch_tokens_masked, got {n}")
    check_floating_tensor(masks_weight, "masks_weight")
    if masks_weight.shape != (n,):
        raise ValueError(f"masks_weight must have shape ({n},) (one weight per masked patch that "
                         f"counts), got {tuple(masks_weight.shape)}")
    check_same_device(masks_weight, "masks_weight", device, what)
    return n


def masked_patch_loss(student: torch.Tensor, teacher: torch.Tensor, masks_weight: torch.Tensor,
                      n_images: int, n_masked_patches: Optional[int], *, student_temp: float,
                      teacher_temp: Optional[float], center, backend: str) -> torch.Tensor:
    """-sum_{r < n} masks_weight[r] * sum_k q_rk log_softmax(s_r / tau_s)_k / n_images, rows beyond
    n (n_masked_patches, default all) weighted 0. One soft_cross_entropy call, `backend` resolved.
    """
    n = student.shape[0] if n_masked_patches is None else n_masked_patches
    row_weight = masks_weight
    if n < student.shape[0]:
        row_weight = torch.cat([masks_weight, masks_weight.new_zeros(student.shape[0] - n)])
    return soft_cross_entropy(student, teacher, [[1.0]], student_temp=student_temp,
                              teacher_temp=teacher_temp, center=center, row_weight=row_weight,
                              scale=1.0 / n_images, backend=backend)


def ibot_masked_loss(student_patch_tokens_masked: torch.Tensor, teacher_patch_logits_masked:
                     torch.Tensor, masks_weight: torch.Tensor, n_images: int, *,
                     student_temp: float, teacher_temp: float, center: torch.Tensor,
                     n_masked_patches: Optional[int] = None,
                     backend: str = "auto") -> torch.Tensor:
    """iBOT masked-patch loss from the teacher's logits and a center: no (M, K) teacher
    probabilities are built. q = softmax((teacher - center) / teacher_temp); for the
    Sinkhorn-Knopp teacher pass `center = sinkhorn_knopp_center(teacher logits, teacher_temp)`,
    for softmax centering the loss's center buffer (after `apply_center_update()`).

    student_patch_tokens_masked, teacher_patch_logits_masked: (M, K); masks_weight: (n,) with
    n = n_masked_patches (default M); center: (K,), (1, K) or (1, 1, K). Returns the fp32 loss
    of `iBOTPatchLoss.forward_masked`, differentiable w.r.t. the student.
    """
    check_positive(student_temp, "student_temp")
    check_positive(teacher_temp, "teacher_temp")
    check_backend_name(backend)
    check_floating_tensor(student_patch_tokens_masked, "student_patch_tokens_masked")
    if student_patch_tokens_masked.dim() != 2:
        raise ValueError(f"student_patch_tokens_masked must be 2-D (masked patches, K), got "
                         f"shape {tuple(student_patch_tokens_masked.shape)}")
    K, device = student_patch_tokens_masked.shape[1], student_patch_tokens_masked.device
    check_center(center, K, device)
    check_masked_inputs(student_patch_tokens_masked, teacher_patch_logits_masked, masks_weight,
                        n_images, n_masked_patches, K, device, "the student",
                        teacher_name="teacher_patch_logits_masked")
    resolved = select_backend(backend, student_patch_tokens_masked, teacher_patch_logits_masked,
                              "ibot_masked_loss")
    return masked_patch_loss(student_patch_tokens_masked, teacher_patch_logits_masked,
                             masks_weight, n_images, n_masked_patches, student_temp=student_temp,
                             teacher_temp=teacher_temp, center=center, backend=resolved)


def check_center(center, out_dim: int, device) -> None:
    """A floating center of shape (K,), (1, K) or (1, 1, K), on `device`."""
    check_floating_tensor(center, "center")
    if center.shape not in ((out_dim,), (1, out_dim), (1, 1, out_dim)):
        raise ValueError(f"center must have shape ({out_dim},), (1, {out_dim}) or "
                         f"(1, 1, {out_dim}) for logits with {out_dim} columns, got "
                         f"{tuple(center.shape)}")
    if device is not None:
        check_same_device(center, "center", device, "the student")


# ---------------------------------------------------------------------- asynchronous center

class AsyncCenterLoss(nn.Module):
    """A loss with an EMA center of the teacher's batch mean, updated as DINOv2 does:
    `update_center(teacher)` sums the batch and launches the all-reduce (asynchronous when a
    process group is initialised), `apply_center_update()` (run by the next
    `softmax_center_teacher`) waits for it and sets c <- m*c + (1-m) * sum / (rows * world).
    Until then the center (and the state_dict) hold the previous value, as in the official code.
    """

    _len_attr = "len_teacher_output"

    def __init__(self, center_shape: tuple, student_temp: float, center_momentum: float,
                 backend: str, process_group, center_init: float):
        super().__init__()
        self.student_temp = check_positive(student_temp, "student_temp")
        self.center_momentum = check_unit_interval(center_momentum, "center_momentum")
        self.backend = check_backend_name(backend)
        self.process_group = process_group
        self.last_backend: Optional[str] = None
        self.last_sinkhorn_backend: Optional[str] = None
        self.register_buffer("center", torch.full(center_shape, center_init))
        self.updated = True
        self.reduce_handle = None
        setattr(self, self._len_attr, None)
        self.async_batch_center = None

    @property
    def out_dim(self) -> int:
        return self.center.shape[-1]

    def _world_size(self) -> int:
        return dist.get_world_size(self.process_group) if _process_group_active() else 1

    def _resolve(self, student: torch.Tensor, teacher: torch.Tensor) -> str:
        """"triton" or "eager" for these inputs (dino_fast.cross_entropy.select_backend)."""
        return select_backend(self.backend, student, teacher, type(self).__name__)

    @torch.no_grad()
    def _start_center_update(self, batch_sum: torch.Tensor, n_rows: int) -> None:
        """batch_sum: fp32, broadcastable to the center; n_rows: the local row count."""
        if self.reduce_handle is not None:  # an update that was never applied is superseded
            self.reduce_handle.wait()
            self.reduce_handle = None
        self.updated = False
        setattr(self, self._len_attr, n_rows)
        self.async_batch_center = batch_sum
        if _process_group_active():
            self.reduce_handle = dist.all_reduce(batch_sum, async_op=True,
                                                 group=self.process_group)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the pending center update, if any (waits for its all-reduce)."""
        if self.updated is False:
            world = self._world_size()
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
                self.reduce_handle = None
            batch_center = self.async_batch_center / (getattr(self, self._len_attr) * world)
            self.center.mul_(self.center_momentum).add_(
                batch_center.view(self.center.shape) * (1 - self.center_momentum))
            self.updated = True

    def _softmax_center(self, teacher: torch.Tensor, teacher_temp: float, name: str,
                        update_centers: bool = True) -> torch.Tensor:
        """softmax((teacher - center) / teacher_temp) after the pending center update (unless
        update_centers is False); `name` is the caller's argument name, for errors."""
        check_logits(teacher, name, self.out_dim, range(1, 9), self.center.device,
                     "the loss's center buffer", self._dim_name)
        teacher_temp = check_positive(teacher_temp, "teacher_temp")
        if update_centers:
            self.apply_center_update()
        return torch.softmax((teacher - self.center) / teacher_temp, dim=-1)

    _dim_name = "out_dim"


class DINOLoss(AsyncCenterLoss):
    """DINOv2's CLS-token loss, drop-in (see the module docstring).

    - `softmax_center_teacher(teacher_output, teacher_temp)`: applies the pending center update,
      returns softmax((teacher_output - center) / teacher_temp), fp32.
    - `sinkhorn_knopp_teacher(teacher_output (N, K), teacher_temp, n_iterations=3)`: the SK
      teacher probabilities (N, K) fp32, balanced over every rank of the process group; the
      path (`backend`: the fused kernels on CUDA) is recorded in `last_sinkhorn_backend`.
    - `forward(student_output_list, teacher_out_softmaxed_centered_list)`: with lists of equal
      shapes (..., K), -sum over every (student, teacher) pair of the mean over rows of
      sum_k t_k log_softmax(s / student_temp)_k; an fp32 scalar. Either list may be a tensor whose
      first dimension indexes the crops.
    - `update_center(teacher_output (N, K))`: starts the center update (see AsyncCenterLoss).

    Example:
        >>> loss_fn = DINOLoss(256)
        >>> teacher_logits = torch.randn(2 * 4, 256)       # 2 global crops of 4 images
        >>> student_logits = torch.randn(10 * 4, 256, requires_grad=True)   # 10 crops
        >>> t = loss_fn.sinkhorn_knopp_teacher(teacher_logits, teacher_temp=0.07).chunk(2)
        >>> loss = loss_fn(student_logits.chunk(10), t)    # 10 x 2 (student, teacher) pairs
        >>> loss.backward()
        >>> loss_fn.update_center(teacher_logits)          # applied by the next
        >>> q = loss_fn.softmax_center_teacher(teacher_logits, 0.07)  # softmax_center_teacher
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 *, backend: str = "auto", process_group=None):
        out_dim = check_int(out_dim, "out_dim", 1)
        super().__init__((1, out_dim), student_temp, center_momentum, backend, process_group,
                         center_init=0.0)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor,
                               teacher_temp: float) -> torch.Tensor:
        return self._softmax_center(teacher_output, teacher_temp, "teacher_output")

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        check_logits(teacher_output, "teacher_output", self.out_dim, 2, teacher_output.device,
                     "teacher_output")
        check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations)
        backend = select_sinkhorn_backend(self.backend, teacher_output, type(self).__name__)
        q = sinkhorn_knopp_probs(teacher_output, teacher_temp, n_iterations,
                                 process_group=self.process_group, backend=backend)
        self.last_sinkhorn_backend = backend
        return q

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list) -> torch.Tensor:
        student, n_s = _stack_crops(student_output_list, "student_output_list", self.out_dim,
                                    self.center.device)
        teacher, n_t = _stack_crops(teacher_out_softmaxed_centered_list,
                                    "teacher_out_softmaxed_centered_list", self.out_dim,
                                    self.center.device)
        if student.shape[0] // n_s != teacher.shape[0] // n_t:
            raise ValueError(
                f"every tensor of teacher_out_softmaxed_centered_list must have as many rows as "
                f"those of student_output_list ({student.shape[0] // n_s}), got "
                f"{teacher.shape[0] // n_t}")
        backend = self._resolve(student, teacher)
        loss = crops_loss(student, teacher.detach(), n_s, n_t, student_temp=self.student_temp,
                          teacher_temp=None, center=None, ignore_diagonal=False,
                          mean_over_pairs=False, backend=backend)
        self.last_backend = backend
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: torch.Tensor) -> None:
        check_logits(teacher_output, "teacher_output", self.out_dim, 2, self.center.device,
                     "the loss's center buffer")
        self._start_center_update(torch.sum(teacher_output, dim=0, keepdim=True,
                                            dtype=torch.float32), len(teacher_output))


def _stack_crops(crops: Union[torch.Tensor, Sequence[torch.Tensor]], name: str, out_dim: int,
                 device) -> tuple[torch.Tensor, int]:
    """A list of equal-shape (..., K) tensors (or a tensor indexed by crop) as (n*N, K), n."""
    if isinstance(crops, torch.Tensor):
        check_logits(crops, name, out_dim, range(2, 10), device, "the loss's center buffer")
        return crops.reshape(-1, out_dim), crops.shape[0]
    if not isinstance(crops, (list, tuple)) or len(crops) == 0:
        raise TypeError(f"{name} must be a non-empty list or tuple of tensors, got "
                        f"{type(crops).__name__}" + (" (empty)" if not crops else ""))
    for j, t in enumerate(crops):
        check_logits(t, f"{name}[{j}]", out_dim, range(1, 9), device, "the loss's center buffer")
        if t.shape != crops[0].shape:
            raise ValueError(f"every tensor of {name} must have the shape of {name}[0] "
                             f"{tuple(crops[0].shape)}, got {tuple(t.shape)} at index {j}")
    if len(crops) == 1:
        return crops[0].reshape(-1, out_dim), 1
    whole = _whole_of_chunks(crops)
    if whole is not None:  # `x.chunk(n)` of one tensor: no copy
        return whole.view(-1, out_dim), len(crops)
    return torch.cat([t.reshape(-1, out_dim) for t in crops]), len(crops)


def _whole_of_chunks(crops: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor the crops are consecutive contiguous pieces of, in order and covering all of
    it (as `x.chunk(n)` or `x.split(m)` make them), or None. The loss then reads x itself, whose
    gradient is the one the pieces would pass on."""
    base = crops[0]._base
    if base is None or not base.is_contiguous() or base.dtype != crops[0].dtype:
        return None
    step = crops[0].numel() * crops[0].element_size()
    for j, t in enumerate(crops):
        if t._base is not base or not t.is_contiguous() or t.requires_grad != base.requires_grad \
                or t.data_ptr() != base.data_ptr() + j * step:
            return None
    return base if len(crops) * crops[0].numel() == base.numel() else None


class iBOTPatchLoss(AsyncCenterLoss):  # noqa: N801  (the official name)
    """DINOv2's masked-patch (iBOT) loss, drop-in (see the module docstring); center (1, 1, K).

    - `softmax_center_teacher(teacher_patch_tokens, teacher_temp)`: applies the pending center
      update, returns softmax((teacher_patch_tokens - center) / teacher_temp), fp32, broadcast
      against the (1, 1, K) center as the official method does.
    - `sinkhorn_knopp_teacher(teacher_output (M, K), teacher_temp, n_masked_patches_tensor,
      n_iterations=3)`: the SK teacher over the M masked patches of every rank. As in the
      official code, `n_masked_patches_tensor` is all-reduced in place when a process group
      exists; its value cancels out of Q (every row given takes part).
    - `forward(student_patch_tokens (B, N, K), teacher_patch_tokens (B, N, K),
      student_masks_flat (B, N))`: -mean_b [sum_n mask_bn sum_k t log_softmax(s / tau_s)
      / max(sum_n mask_bn, 1)].
    - `forward_masked(student (M, K), teacher (M, K), student_masks_flat (B, N) bool,
      n_masked_patches=None, masks_weight=None)`: -sum_{r < n} w_r sum_k t log_softmax(s / tau_s)
      / B, with w_r = 1 / (masked patches of row r's image) by default (in mask order) and
      n = n_masked_patches (rows beyond are ignored; default all M).
    - `update_center(teacher_patch_tokens (B, N, K))`: center target mean_b mean_n T.

    Example:
        >>> masks = torch.zeros(2, 16, dtype=torch.bool)
        >>> masks[0, :6] = True; masks[1, :4] = True          # 10 masked patches in all
        >>> loss_fn = iBOTPatchLoss(128)
        >>> t = loss_fn.sinkhorn_knopp_teacher(torch.randn(10, 128), 0.07, torch.tensor([10]))
        >>> loss = loss_fn.forward_masked(torch.randn(10, 128), t, masks)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
    """

    _len_attr = "len_teacher_patch_tokens"
    _dim_name = "patch_out_dim"

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, backend: str = "auto", process_group=None):
        patch_out_dim = check_int(patch_out_dim, "patch_out_dim", 1)
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum, backend,
                         process_group, center_init=0.0)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor,
                               teacher_temp: float) -> torch.Tensor:
        return self._softmax_center(teacher_patch_tokens, teacher_temp, "teacher_patch_tokens")

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor,
                               n_iterations: int = 3) -> torch.Tensor:
        q, self.last_sinkhorn_backend = ibot_sinkhorn_knopp(
            teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations, self.out_dim,
            self.process_group, self.backend, type(self).__name__)
        return q

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor,
                student_masks_flat: torch.Tensor) -> torch.Tensor:
        device = self.center.device
        what = "the loss's center buffer"
        check_logits(student_patch_tokens, "student_patch_tokens", self.out_dim, 3, device, what,
                     "patch_out_dim")
        check_logits(teacher_patch_tokens, "teacher_patch_tokens", self.out_dim, 3, device, what,
                     "patch_out_dim")
        if teacher_patch_tokens.shape != student_patch_tokens.shape:
            raise ValueError(f"teacher_patch_tokens must have the shape of student_patch_tokens "
                             f"{tuple(student_patch_tokens.shape)}, got "
                             f"{tuple(teacher_patch_tokens.shape)}")
        B, N, K = student_patch_tokens.shape
        check_mask(student_masks_flat, (B, N), device, bool_only=False,
                   expected="(images, patches) of student_patch_tokens")
        backend = self._resolve(student_patch_tokens, teacher_patch_tokens)
        m = student_masks_flat.float()
        row_weight = (m / student_masks_flat.sum(dim=-1, keepdim=True).clamp(min=1.0)).reshape(-1)
        loss = soft_cross_entropy(student_patch_tokens.reshape(B * N, K),
                                  teacher_patch_tokens.detach().reshape(B * N, K), [[1.0]],
                                  student_temp=self.student_temp, row_weight=row_weight,
                                  scale=1.0 / B, backend=backend)
        self.last_backend = backend
        return loss

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor,
                       teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor, n_masked_patches: Optional[int] = None,
                       masks_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = self.center.device
        if not isinstance(student_masks_flat, torch.Tensor) or student_masks_flat.dim() != 2:
            raise ValueError("student_masks_flat must be a 2-D (images, patches) tensor, got "
                             + (f"shape {tuple(student_masks_flat.shape)}"
                                if isinstance(student_masks_flat, torch.Tensor)
                                else type(student_masks_flat).__name__))
        if masks_weight is None:
            check_mask(student_masks_flat, tuple(student_masks_flat.shape), device,
                       bool_only=True, expected="(images, patches)")
            masks_weight = default_masks_weight(student_masks_flat)
            n = check_masked_row_count(student_patch_tokens_masked, n_masked_patches)
            if masks_weight.shape[0] != n:
                raise ValueError(
                    f"student_masks_flat has {masks_weight.shape[0]} masked patches but "
                    f"{n} rows of student_patch_tokens_masked count (n_masked_patches="
                    f"{n_masked_patches}); without masks_weight they must be equal")
        else:
            check_same_device(student_masks_flat, "student_masks_flat", device,
                              "the loss's center buffer")
        check_masked_inputs(student_patch_tokens_masked, teacher_patch_tokens_masked,
                            masks_weight, student_masks_flat.shape[0], n_masked_patches,
                            self.out_dim, device, "the loss's center buffer")
        backend = self._resolve(student_patch_tokens_masked, teacher_patch_tokens_masked)
        loss = masked_patch_loss(student_patch_tokens_masked, teacher_patch_tokens_masked.detach(),
                                 masks_weight, student_masks_flat.shape[0], n_masked_patches,
                                 student_temp=self.student_temp, teacher_temp=None, center=None,
                                 backend=backend)
        self.last_backend = backend
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: torch.Tensor) -> None:
        check_logits(teacher_patch_tokens, "teacher_patch_tokens", self.out_dim, 3,
                     self.center.device, "the loss's center buffer", "patch_out_dim")
        batch_sum = torch.mean(teacher_patch_tokens, dim=1, dtype=torch.float32).sum(
            dim=0, keepdim=True)
        self._start_center_update(batch_sum, len(teacher_patch_tokens))


def check_mask(mask, shape: tuple, device, *, bool_only: bool, expected: str) -> None:
    """student_masks_flat: a tensor of `shape`, bool (or any real dtype unless bool_only)."""
    name = "student_masks_flat"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if bool_only and mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = masked patch) when masks_weight "
                        f"is not given, got dtype {mask.dtype}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool or real tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape) or mask.shape[0] == 0:
        raise ValueError(f"{name} must have shape {tuple(shape)} {expected}, got "
                         f"{tuple(mask.shape)}")
    check_same_device(mask, name, device, "the loss's center buffer")


def check_masked_row_count(student, n_masked_patches) -> int:
    rows = student.shape[0] if isinstance(student, torch.Tensor) and student.dim() > 0 else 0
    if n_masked_patches is None:
        return rows
    n = check_int(n_masked_patches, "n_masked_patches", 0)
    if n > rows:
        raise ValueError(f"n_masked_patches must be <= the {rows} rows of "
                         f"student_patch_tokens_masked, got {n}")
    return n


def default_masks_weight(student_masks_flat: torch.Tensor) -> torch.Tensor:
    """1 / (masked patches of its image) for each masked patch, in mask (row-major) order."""
    per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
    return per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]


@torch.no_grad()
def ibot_sinkhorn_knopp(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations,
                        out_dim: int, process_group, backend: str = "auto",
                        op: str = "iBOTPatchLoss") -> tuple[torch.Tensor, str]:
    """The iBOT SK teacher of DINOv2 and DINOv3 (see iBOTPatchLoss.sinkhorn_knopp_teacher) and
    the backend that computed it."""
    check_logits(teacher_output, "teacher_output", out_dim, 2, teacher_output.device,
                 "teacher_output", "patch_out_dim")
    if not isinstance(n_masked_patches_tensor, torch.Tensor) or \
            n_masked_patches_tensor.numel() != 1:
        raise TypeError("n_masked_patches_tensor must be a one-element tensor (the number of "
                        "masked patches of this rank), got "
                        + (f"shape {tuple(n_masked_patches_tensor.shape)}"
                           if isinstance(n_masked_patches_tensor, torch.Tensor)
                           else type(n_masked_patches_tensor).__name__))
    check_sinkhorn_inputs(teacher_output, teacher_temp, n_iterations)
    backend = select_sinkhorn_backend(backend, teacher_output, op)
    if _process_group_active():  # the official side effect: the caller's tensor becomes the total
        dist.all_reduce(n_masked_patches_tensor, group=process_group)
    return sinkhorn_knopp_probs(teacher_output, teacher_temp, n_iterations,
                                process_group=process_group, backend=backend), backend


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko regulariser (Sablayrolles et al. 2018), as DINOv2 / DINOv3 compute it:

        x = normalize(student_output)  (B, D), x_i / max(||x_i||, eps)
        nn(i) = argmax_{j != i} <x_i, x_j>
        loss = -mean_i log(||x_i - x_nn(i) + 1e-8||_2 + eps)

    (the 1e-8 inside the norm is nn.PairwiseDistance's eps, as in the official class). Computed in
    fp32 with autocast off whatever the input dtype, so eps survives (in fp16 1e-8 rounds to 0 and
    duplicate rows give log 0 = -inf); returns an fp32 scalar. Duplicate rows (distance 0) give a
    finite value and gradient. Eager only (a B x B computation): backend may be "auto" or "eager".

    Example:
        >>> x = torch.randn(8, 32)
        >>> x[1] = x[0]                                  # an exact neighbour
        >>> bool(torch.isfinite(KoLeoLoss()(x.half())))  # (B, D) -> fp32 scalar
        True
    """

    PAIRWISE_EPS = 1e-8

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = _eager_only(backend, type(self).__name__)
        self.last_backend: Optional[str] = None

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        check_floating_tensor(student_output, "student_output")
        if student_output.dim() != 2 or student_output.shape[0] < 2 or \
                student_output.shape[1] == 0:
            raise ValueError(f"student_output must be 2-D (batch, dim) with batch >= 2 (each "
                             f"sample needs a nearest other sample), got shape "
                             f"{tuple(student_output.shape)}")
        eps = check_positive(eps, "eps")
        with torch.autocast(student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-1)  # max inner product = nearest other sample
                nearest = torch.max(dots, dim=1).indices
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.PAIRWISE_EPS)
            loss = -torch.log(distances + eps).mean()
        self.last_backend = "eager"
        return loss


def _eager_only(backend: str, op: str) -> str:
    check_backend_name(backend)
    if backend == "triton":
        raise ValueError(f"{op} has no Triton kernel (it is a small eager computation); "
                         f"backend must be 'auto' or 'eager', got 'triton'")
    return backend
