"""Fused DINO loss: forward, backward and the teacher's row sum for the center, in Triton.

Math (see dino_fast/loss.py; G = 2 teacher crops, V student crops, B samples, K = out_dim):

    x_ib = (T_ib - c) / tau_t,  q_ib = softmax(x_ib)          teacher rows, no gradient
    y_vb = S_vb / tau_s,        lse_vb = logsumexp(y_vb)      student rows
    L    = 1/(|P| B) * sum_b sum_v [ m_v lse_vb - sum_{i != v} <q_ib, y_vb> ]
    dL/dS_vb = (m_v softmax(y_vb) - sum_{i != v} q_ib) * grad / (|P| B tau_s)

with m_v = #{i < G : i != v} (1 for a global crop, 2 for a local one) and |P| = G V - G.

Memory traffic (the op is memory-bound): the forward reads S and T once, the backward reads S
and T once more and writes dS once; nothing of size (B, K) per crop pair is ever made. Beyond
that, the forward writes and re-reads 4 floats per row and column block (1/256 of S at
BLOCK_K = 1024) and one column sum of K floats per sample group. What the backward needs is saved
as per-row statistics only: lse_vb (V B floats) and the teacher's log-sum-exp (G B floats), plus
a copy of the center (K floats: the module updates its center in place after the forward, before
the backward runs).

Kernels and grid. K is cut into NCH = cdiv(K, BLOCK_K) column blocks and the B samples into
groups of `samples_per_program`; program (k, g) owns column block k of every row of the samples
of group g (both teacher rows and all V student rows of each sample), so the grid fills a GPU
whether B or K is the large one.
1. `_fwd_kernel`, per program and sample b: load the two teacher row blocks once; their block max
   and block sum-exp of x; for each crop v, the student row block's max and sum-exp of y and the
   block dot products sum_k exp(x_ibk - max) S_vbk, i = 0, 1. All are per-(row, block) partials
   relative to the block's own max (max-subtracted softmax: x reaches +-50 after centering, so no
   bare exp). The program also sums its samples' teacher rows column by column: one partial
   column sum per sample group, no atomics.
2. `_combine_kernel`, one program per sample: merge the partials over the column blocks
   (rescaling each by exp(block max - row max)), giving lse_vb, the teacher log-sum-exp,
   <q_ib, S_vb> = sum_blocks dot * exp(block max - max) / sum-exp, and the sample's loss term.
3. `_colsum_kernel`: sum the per-group column sums in a fixed order (deterministic center).
4. `_bwd_kernel`, same grid as the forward: recompute q_ib from T, c and the saved teacher
   statistics, softmax(y_vb) from S and the saved lse, and write dS in the student's dtype; the
   grad_output scalar is read on the device (no host sync).

Every load is cast to fp32 at once and every reduction runs in fp32 (the Triton interpreter has
no bf16 arithmetic either); the gradient is stored in the student's dtype. fp64 inputs are
computed in fp32 here (the loss comes back fp32, the gradient fp64); `DINOLoss(backend="auto")`
sends fp64 to the eager path, which computes in fp64. Inputs may be non-contiguous: the kernels
take row and column strides.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dino_fast.backend import resolve_backend
from dino_fast.loss import N_GLOBAL_CROPS, check_loss_inputs, num_pairs

# Columns per program. 1024 fp32 columns = 8 per thread at 4 warps: wide (16-byte) loads, few
# registers (the teacher blocks stay live across the crop loop), and at K = 65536 it leaves
# 64 column blocks, enough with the sample groups to fill a GPU.
MAX_BLOCK_K = 1024
MIN_BLOCK_K = 16
NUM_WARPS = 4
# Programs per streaming multiprocessor aimed at when choosing the sample-group size: several
# resident programs per SM keep enough loads in flight to approach the DRAM bandwidth.
PROGRAMS_PER_SM = 8


# --------------------------------------------------------------------------- kernels

@triton.jit
def _fwd_kernel(
    S, s_row, s_col,            # student logits (V*B, K), any float dtype, strides in elements
    T, t_row, t_col,            # teacher logits (2*B, K)
    C,                          # center (K,) fp32, contiguous
    part_tmax, part_tsum,       # (2*B, NCH) fp32: teacher block max / sum-exp of x
    part_smax, part_ssum,       # (V*B, NCH) fp32: student block max / sum-exp of y
    part_dot0, part_dot1,       # (V*B, NCH) fp32: sum_k exp(x_ik - blockmax_i) * S_vbk, i = 0, 1
    colsum,                     # (n_groups, K) fp32: teacher column sums per sample group
    B, V, K, NCH, samples_per_program,
    inv_tau_s, inv_tau_t,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    s_cols = offs.to(tl.int64) * s_col
    t_cols = offs.to(tl.int64) * t_col
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    col_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_start = pid_g * samples_per_program
    b_end = tl.minimum(b_start + samples_per_program, B)
    for b in range(b_start, b_end):
        # 1. the two teacher row blocks of sample b: loaded once, used by every crop below
        t0 = tl.load(T + tl.cast(b, tl.int64) * t_row + t_cols, mask=mask, other=0.0)
        t1 = tl.load(T + tl.cast(B + b, tl.int64) * t_row + t_cols, mask=mask, other=0.0)
        # crop 0's block, issued now so that its latency overlaps the teacher reductions
        s_next = tl.load(S + tl.cast(b, tl.int64) * s_row + s_cols, mask=mask, other=0.0)
        t0 = t0.to(tl.float32)
        t1 = t1.to(tl.float32)
        col_acc += t0 + t1  # center statistics: masked columns load 0 and are never stored
        x0 = tl.where(mask, (t0 - c) * inv_tau_t, float("-inf"))
        x1 = tl.where(mask, (t1 - c) * inv_tau_t, float("-inf"))
        m0 = tl.max(x0, axis=0)  # every block holds at least one column, so the max is finite
        m1 = tl.max(x1, axis=0)
        e0 = tl.exp(x0 - m0)  # 0 on masked columns
        e1 = tl.exp(x1 - m1)
        tl.store(part_tmax + b * NCH + pid_k, m0)
        tl.store(part_tsum + b * NCH + pid_k, tl.sum(e0, axis=0))
        tl.store(part_tmax + (B + b) * NCH + pid_k, m1)
        tl.store(part_tsum + (B + b) * NCH + pid_k, tl.sum(e1, axis=0))
        # 2. every student crop v of sample b: block max / sum-exp of y and the two dot products
        for v in range(V):
            row = v * B + b
            s = s_next.to(tl.float32)
            # prefetch crop v + 1 while this one is reduced, so that the program always has a
            # load in flight (the last crop reloads itself: an L2 hit)
            row_next = tl.minimum(v + 1, V - 1) * B + b
            s_next = tl.load(S + tl.cast(row_next, tl.int64) * s_row + s_cols, mask=mask,
                             other=0.0)
            y = tl.where(mask, s * inv_tau_s, float("-inf"))
            ms = tl.max(y, axis=0)
            tl.store(part_smax + row * NCH + pid_k, ms)
            tl.store(part_ssum + row * NCH + pid_k, tl.sum(tl.exp(y - ms), axis=0))
            tl.store(part_dot0 + row * NCH + pid_k, tl.sum(e0 * s, axis=0))
            tl.store(part_dot1 + row * NCH + pid_k, tl.sum(e1 * s, axis=0))
    tl.store(colsum + tl.cast(pid_g, tl.int64) * K + offs, col_acc, mask=mask)


@triton.jit
def _combine_kernel(
    part_tmax, part_tsum, part_smax, part_ssum, part_dot0, part_dot1,   # as in _fwd_kernel
    lse_s,                      # out (V*B,) fp32: logsumexp(S_vb / tau_s)
    t_lse,                      # out (2*B,) fp32: logsumexp(x_ib)
    loss_per_sample,            # out (B,) fp32: sample b's share of the loss
    B, V, NCH,
    inv_tau_s, loss_norm,       # loss_norm = 1 / (|P| B)
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < NCH
    # teacher rows b (crop 0) and B + b (crop 1): merge the block maxima and sums-exp
    tm0 = tl.load(part_tmax + b * NCH + cols, mask=cmask, other=float("-inf"))
    tm1 = tl.load(part_tmax + (B + b) * NCH + cols, mask=cmask, other=float("-inf"))
    ts0 = tl.load(part_tsum + b * NCH + cols, mask=cmask, other=0.0)
    ts1 = tl.load(part_tsum + (B + b) * NCH + cols, mask=cmask, other=0.0)
    M0 = tl.max(tm0, axis=0)
    M1 = tl.max(tm1, axis=0)
    r0 = tl.exp(tm0 - M0)  # rescales a block's partials from its own max to the row max
    r1 = tl.exp(tm1 - M1)
    Z0 = tl.sum(ts0 * r0, axis=0)
    Z1 = tl.sum(ts1 * r1, axis=0)
    tl.store(t_lse + b, M0 + tl.log(Z0))
    tl.store(t_lse + B + b, M1 + tl.log(Z1))
    # <q_ib, S_vb> = sum_blocks dot_i * exp(blockmax - M_i) / Z_i: fold 1/Z_i into the weights
    w0 = r0 / Z0
    w1 = r1 / Z1
    # the sample's pair terms, accumulated lane-wise and summed once at the end: the dot products
    # block by block, the log-sum-exps on lane 0
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for v in range(V):
        row = v * B + b
        sm = tl.load(part_smax + row * NCH + cols, mask=cmask, other=float("-inf"))
        ss = tl.load(part_ssum + row * NCH + cols, mask=cmask, other=0.0)
        Ms = tl.max(sm, axis=0)
        lse = Ms + tl.log(tl.sum(ss * tl.exp(sm - Ms), axis=0))
        tl.store(lse_s + row, lse)
        d0 = tl.load(part_dot0 + row * NCH + cols, mask=cmask, other=0.0)
        d1 = tl.load(part_dot1 + row * NCH + cols, mask=cmask, other=0.0)
        # crop v pairs with every teacher crop i != v: g_i = [i != v], m_v = g_0 + g_1
        g0 = tl.cast(v != 0, tl.float32)
        g1 = tl.cast(v != 1, tl.float32)
        # sum_{i != v} (lse_vb - <q_ib, y_vb>): the pair terms of crop v
        acc += tl.where(cols == 0, (g0 + g1) * lse, 0.0) - inv_tau_s * (g0 * d0 * w0 + g1 * d1 * w1)
    tl.store(loss_per_sample + b, tl.sum(acc, axis=0) * loss_norm)


@triton.jit
def _colsum_kernel(colsum, out, n_groups, K, BLOCK: tl.constexpr):
    """out[k] = sum_g colsum[g, k], summed in the order g = 0, 1, ... (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(n_groups):
        acc += tl.load(colsum + tl.cast(g, tl.int64) * K + offs, mask=mask, other=0.0)
    tl.store(out + offs, acc, mask=mask)


@triton.jit
def _bwd_kernel(
    S, s_row, s_col, T, t_row, t_col, C,    # as in _fwd_kernel
    lse_s, t_lse,               # saved statistics, see _combine_kernel
    grad_loss,                  # (1,) the incoming gradient of the loss, read on the device
    dS,                         # out (V*B, K) contiguous, the student's dtype
    B, V, K, samples_per_program,
    inv_tau_s, inv_tau_t, grad_norm,   # grad_norm = 1 / (|P| B tau_s)
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    s_cols = offs.to(tl.int64) * s_col
    t_cols = offs.to(tl.int64) * t_col
    d_cols = offs.to(tl.int64)
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(grad_loss).to(tl.float32) * grad_norm
    b_start = pid_g * samples_per_program
    b_end = tl.minimum(b_start + samples_per_program, B)
    for b in range(b_start, b_end):
        # q_ib = exp(x_ib - lse(x_ib)), recomputed from T, c and the saved statistics
        t0 = tl.load(T + tl.cast(b, tl.int64) * t_row + t_cols, mask=mask, other=0.0)
        t1 = tl.load(T + tl.cast(B + b, tl.int64) * t_row + t_cols, mask=mask, other=0.0)
        s_next = tl.load(S + tl.cast(b, tl.int64) * s_row + s_cols, mask=mask, other=0.0)
        q0 = tl.exp((t0.to(tl.float32) - c) * inv_tau_t - tl.load(t_lse + b))
        q1 = tl.exp((t1.to(tl.float32) - c) * inv_tau_t - tl.load(t_lse + B + b))
        for v in range(V):
            row = v * B + b
            s = s_next.to(tl.float32)
            row_next = tl.minimum(v + 1, V - 1) * B + b  # prefetch, as in _fwd_kernel
            s_next = tl.load(S + tl.cast(row_next, tl.int64) * s_row + s_cols, mask=mask,
                             other=0.0)
            p = tl.exp(s * inv_tau_s - tl.load(lse_s + row))  # softmax(y_vb)
            # dL/dS_vb = (m_v p_vb - sum_{i != v} q_ib) * grad / (|P| B tau_s), m_v = g_0 + g_1
            g0 = tl.cast(v != 0, tl.float32)
            g1 = tl.cast(v != 1, tl.float32)
            grad = ((g0 + g1) * p - (g0 * q0 + g1 * q1)) * scale
            grad = tl.where(mask, grad, 0.0)  # masked columns: never stored, keep them finite
            tl.store(dS + tl.cast(row, tl.int64) * K + d_cols, grad.to(dS.dtype.element_ty),
                     mask=mask)


# --------------------------------------------------------------------------- host launchers

@dataclass(frozen=True)
class LaunchConfig:
    """The forward and backward grid is (cdiv(K, block_k), cdiv(B, samples_per_program))."""
    block_k: int
    samples_per_program: int


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    # the interpreter runs one program at a time in numpy: fewer, larger programs are faster
    return 1


def launch_config(B: int, K: int, device: torch.device) -> LaunchConfig:
    """Column block as wide as MAX_BLOCK_K allows; sample groups small enough that the grid
    reaches the device's target program count (one group per sample at most)."""
    block_k = max(MIN_BLOCK_K, min(MAX_BLOCK_K, triton.next_power_of_2(K)))
    n_blocks = triton.cdiv(K, block_k)
    n_groups = max(1, min(B, _target_programs(device) // n_blocks))
    return LaunchConfig(block_k, triton.cdiv(B, n_groups))


def _check_config(config: LaunchConfig) -> None:
    bk, spp = config.block_k, config.samples_per_program
    if not (isinstance(bk, int) and bk >= MIN_BLOCK_K and bk & (bk - 1) == 0):
        raise ValueError(f"block_k must be a power of two >= {MIN_BLOCK_K}, got {bk!r}")
    if not (isinstance(spp, int) and spp >= 1):
        raise ValueError(f"samples_per_program must be a positive integer, got {spp!r}")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels fill; the tests swap this for a NaN fill to catch missed writes."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' one
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(student, teacher, center_vec, ncrops, student_temp, teacher_temp, config):
    """Run the forward kernels. Returns (loss, teacher_row_sum, lse_s, t_lse)."""
    G, V = N_GLOBAL_CROPS, ncrops
    B, K = student.shape[0] // V, student.shape[1]
    dev = student.device
    block_k, spp = config.block_k, config.samples_per_program
    n_blocks, n_groups = triton.cdiv(K, block_k), triton.cdiv(B, spp)
    f32 = torch.float32
    part_t = _empty((2, G * B, n_blocks), f32, dev)          # teacher max, sum-exp
    part_s = _empty((4, V * B, n_blocks), f32, dev)          # student max, sum-exp, dot0, dot1
    colsum = _empty((n_groups, K), f32, dev)
    lse_s = _empty((V * B,), f32, dev)
    t_lse = _empty((G * B,), f32, dev)
    loss_per_sample = _empty((B,), f32, dev)
    inv_tau_s, inv_tau_t = 1.0 / student_temp, 1.0 / teacher_temp
    with _device_guard(dev):
        _fwd_kernel[(n_blocks, n_groups)](
            student, student.stride(0), student.stride(1),
            teacher, teacher.stride(0), teacher.stride(1),
            center_vec, part_t[0], part_t[1], part_s[0], part_s[1], part_s[2], part_s[3], colsum,
            B, V, K, n_blocks, spp, inv_tau_s, inv_tau_t,
            BLOCK_K=block_k, num_warps=NUM_WARPS)
        _combine_kernel[(B,)](
            part_t[0], part_t[1], part_s[0], part_s[1], part_s[2], part_s[3],
            lse_s, t_lse, loss_per_sample,
            B, V, n_blocks, inv_tau_s, 1.0 / (num_pairs(V) * B),
            BLOCK_C=max(16, triton.next_power_of_2(n_blocks)), num_warps=NUM_WARPS)
        if n_groups == 1:
            row_sum = colsum[0]
        else:
            row_sum = _empty((K,), f32, dev)
            _colsum_kernel[(triton.cdiv(K, MAX_BLOCK_K),)](
                colsum, row_sum, n_groups, K, BLOCK=MAX_BLOCK_K, num_warps=NUM_WARPS)
    # B fp32 terms summed by torch in a fixed order: deterministic
    return loss_per_sample.sum(), row_sum, lse_s, t_lse


def _backward(grad_loss, student, teacher, center_vec, lse_s, t_lse, ncrops,
              student_temp, teacher_temp, config):
    V = ncrops
    B, K = student.shape[0] // V, student.shape[1]
    dev = student.device
    block_k, spp = config.block_k, config.samples_per_program
    grad_loss = grad_loss.reshape(1)
    dS = _empty((V * B, K), student.dtype, dev)
    with _device_guard(dev):
        _bwd_kernel[(triton.cdiv(K, block_k), triton.cdiv(B, spp))](
            student, student.stride(0), student.stride(1),
            teacher, teacher.stride(0), teacher.stride(1), center_vec,
            lse_s, t_lse, grad_loss, dS,
            B, V, K, spp, 1.0 / student_temp, 1.0 / teacher_temp,
            1.0 / (num_pairs(V) * B * student_temp),
            BLOCK_K=block_k, num_warps=NUM_WARPS)
    return dS


class DINOLossFunction(torch.autograd.Function):
    """The fused loss as an autograd op. Outputs (loss fp32 scalar, teacher row sum (K,) fp32);
    only the loss is differentiable, w.r.t. the student logits. Saves S and T (alive anyway),
    a copy of the center (K floats) and the per-row log-sum-exps (V*B + G*B floats)."""

    @staticmethod
    def forward(ctx, student, teacher, center, ncrops, student_temp, teacher_temp, config):
        # a private copy: DINOLoss updates its center in place before the backward runs
        center_vec = center.detach().reshape(-1).to(torch.float32, copy=True)
        loss, row_sum, lse_s, t_lse = _forward(
            student, teacher, center_vec, ncrops, student_temp, teacher_temp, config)
        ctx.save_for_backward(student, teacher, center_vec, lse_s, t_lse)
        ctx.ncrops, ctx.student_temp, ctx.teacher_temp, ctx.config = \
            ncrops, student_temp, teacher_temp, config
        ctx.mark_non_differentiable(row_sum)
        return loss, row_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_row_sum):
        student, teacher, center_vec, lse_s, t_lse = ctx.saved_tensors
        dS = None
        if ctx.needs_input_grad[0]:
            dS = _backward(grad_loss, student, teacher, center_vec, lse_s, t_lse,
                           ctx.ncrops, ctx.student_temp, ctx.teacher_temp, ctx.config)
        return dS, None, None, None, None, None, None


def dino_loss_triton(student_output: torch.Tensor, teacher_output: torch.Tensor,
                     center: torch.Tensor, ncrops: int, student_temp: float, teacher_temp: float,
                     *, block_k: int | None = None, samples_per_program: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO loss: returns (loss, teacher_row_sum), as `dino_fast.loss.dino_loss_eager`.

    student_output: (ncrops*B, K), crop-major; teacher_output: (2*B, K); center: (1, K).
    loss: fp32 scalar, differentiable w.r.t. student_output (gradient in its dtype).
    teacher_row_sum: (K,) fp32, the teacher's sum over rows, for the center update (the caller
    keeps its own center logic). Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
    block_k, samples_per_program: override the launch grid (see `launch_config`); for tests.
    Inputs are validated before any kernel runs; fp64 inputs are computed in fp32.
    """
    B, K = check_loss_inputs(student_output, teacher_output, center, ncrops,
                             student_temp=student_temp, teacher_temp=teacher_temp)
    resolve_backend("triton", student_output.device, "dino_loss_triton")
    default = launch_config(B, K, student_output.device)
    config = LaunchConfig(default.block_k if block_k is None else block_k,
                          default.samples_per_program if samples_per_program is None
                          else samples_per_program)
    _check_config(config)
    return DINOLossFunction.apply(student_output, teacher_output.detach(), center, int(ncrops),
                                  float(student_temp), float(teacher_temp), config)
