"""Fused soft cross-entropy (the DINO-family loss) in Triton: loss, gradient and the teacher's
column sum for the center, S read once.

Math (see dino_fast/cross_entropy.py): V student crops, G teacher crops, B samples, K columns,
row r = v*B + b of the student paired with teacher rows i*B + b with weights W[v, i],

    q_ib = exp(x_ib - lse(x_ib)), x_ib = (T_ib - c) / tau_t    (or T_ib as given: probabilities)
    Q_vb = sum_i W[v, i] q_ib,  y_vb = S_vb / tau_s
    CE_vb = Qsum_vb lse(y_vb) - <Q_vb, y_vb>
          = -<Q_vb, y_vb - m_vb> + Qsum_vb log sumexp(y_vb - m_vb)
    loss  = scale * sum_vb w_b CE_vb
    dloss/dS_vb = scale * w_b * (Qsum_vb softmax(y_vb) - Q_vb) / tau_s

with m_vb the row max, so both parts of CE are non-negative (no cancellation, however large the
logits) and every exp is max-subtracted (x reaches +-50 after centering at tau_t = 0.04).

Two launch paths:
1. Rows (the one-pass plan), for enough rows to fill the device. `_teacher_kernel` first reads T
   once: per teacher row its log-sum-exp (from per-block partials merged by `_lse_kernel`) and,
   for a center, the column sums (per row group, merged in a fixed order by `_colsum_kernel`:
   deterministic, no atomics). Then `_rows_kernel`: persistent programs, each owning whole
   student rows in turn (consecutive rows are the crops of one sample, so the two teacher rows
   they share stay in cache): a first sweep over the row's column blocks gives the online max,
   sum-exp, <Q, y - m> and Qsum, with q recomputed from T, c and the teacher lse; a second sweep
   writes dloss/dS for grad_output = 1. The second read of a row (256 KB at K = 65536 fp32)
   comes from L2, which holds one row per program in flight; DRAM traffic is |S| + |T| + |dS|.
   The backward hands dS over; `_scale_kernel` multiplies it by grad_output read on the device
   and returns at once when that is 1 (no host sync, no traffic in the usual step). fp16
   students (a loss scaler's 65536 * 1e-7 gradient must be formed before rounding to fp16) and
   a retained graph's second backward recompute dS from S and the saved row statistics.
2. Split (DINO's pairs only, G = 2, teacher logits, no row weights), for few rows (small B,
   few crops), which cannot fill the device with row-owning programs: programs own a column
   block of a group of samples; per-(row, block) partials are merged by `_combine_kernel`, and
   the backward (`_split_bwd_kernel`) reads S and T again.

Every load is cast to fp32 at once and every reduction runs in fp32 (the Triton interpreter has
no bf16 arithmetic either); the gradient is stored in the student's dtype. fp64 inputs are
computed in fp32 here; backend="auto" sends fp64 to the eager path. Inputs may be
non-contiguous: the kernels take row and column strides.
"""
import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from dino_fast.backend import resolve_backend
from dino_fast.cross_entropy_spec import CrossEntropySpec, check_cross_entropy_inputs

# Rows path: columns per block of a row sweep. 2048 fp32 columns = 8 per thread at 8 warps:
# 16-byte loads and few registers (the G teacher blocks are live with the student block).
ROWS_BLOCK_K = 2048
ROWS_NUM_WARPS = 8
# Persistent programs per streaming multiprocessor on the rows path: the second sweep of a row
# must find it in L2, so the rows in flight (one per program, 256 KB each at K = 65536 fp32)
# must fit there: 132 SMs x 1 x 256 KB = 34 MB of an H200's 60 MB L2.
ROWS_PROGRAMS_PER_SM = 1
# The rows path needs this many rows per program slot to keep every SM busy; below it, the
# split path (which also cuts K) is used.
MIN_ROWS_PER_SM = 2
# Split path: at most this many columns per program (8 per thread at 4 warps).
SPLIT_MAX_BLOCK_K = 1024
MIN_BLOCK_K = 16
SPLIT_NUM_WARPS = 4
SPLIT_PROGRAMS_PER_SM = 8
TEACHER_BLOCK_K = 1024
TEACHER_NUM_WARPS = 4


# --------------------------------------------------------------------------- kernels: rows path

@triton.jit
def _teacher_kernel(
    T, t_row, t_col,            # teacher (n_rows, K), any float dtype, strides in elements
    C,                          # center (K,) fp32 (ignored unless HAS_CENTER)
    part_max, part_sum,         # out (n_rows, NCH) fp32: block max / sum-exp of x (WANT_LSE)
    colsum,                     # out (n_groups, K) fp32: column sums per row group (WANT_SUM)
    n_rows, K, NCH, rows_per_program, inv_tau_t,
    HAS_CENTER: tl.constexpr, WANT_LSE: tl.constexpr, WANT_SUM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (k, g): column block k of the teacher rows of group g, T read once."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    cols = offs.to(tl.int64) * t_col
    if HAS_CENTER:
        c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in range(rows_per_program):
        r = pid_g * rows_per_program + j
        valid = r < n_rows  # the last group may be short: its extra iterations touch nothing
        t = tl.load(T + r.to(tl.int64) * t_row + cols, mask=mask & valid, other=0.0)
        t = t.to(tl.float32)
        if WANT_SUM:
            acc += t
        if WANT_LSE:
            x = tl.where(mask, (t - c) * inv_tau_t, float("-inf"))
            m = tl.max(x, axis=0)  # every block holds at least one column: finite
            tl.store(part_max + r * NCH + pid_k, m, mask=valid)
            tl.store(part_sum + r * NCH + pid_k, tl.sum(tl.exp(x - m), axis=0), mask=valid)
    if WANT_SUM:
        tl.store(colsum + pid_g.to(tl.int64) * K + offs, acc, mask=mask)


@triton.jit
def _lse_kernel(part_max, part_sum, lse, NCH, BLOCK_C: tl.constexpr):
    """lse[r] = log sum_k exp(x_rk), merged from the per-block partials of row r."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < NCH
    m = tl.load(part_max + r * NCH + cols, mask=cmask, other=float("-inf"))
    s = tl.load(part_sum + r * NCH + cols, mask=cmask, other=0.0)
    M = tl.max(m, axis=0)
    tl.store(lse + r, M + tl.log(tl.sum(s * tl.exp(m - M), axis=0)))


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
def _teacher_block(T, t_row, t_col, C, t_lse, PW, v, b, B, offs, mask, valid, inv_tau_t,
                   G: tl.constexpr, PROBS: tl.constexpr, HAS_CENTER: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Q = sum_i W[v, i] q_ib on one column block (0 on masked columns)."""
    if HAS_CENTER:
        c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BLOCK_K], dtype=tl.float32)
    Q = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(G):
        w = tl.load(PW + v * G + i)
        trow = (i * B + b).to(tl.int64)
        t = tl.load(T + trow * t_row + offs.to(tl.int64) * t_col, mask=mask, other=0.0)
        t = t.to(tl.float32)
        if PROBS:
            q = t
        else:
            # mask: an idle iteration of a persistent program (b >= B) reads nothing
            lse_t = tl.load(t_lse + trow, mask=valid, other=0.0)
            q = tl.where(mask, tl.exp((t - c) * inv_tau_t - lse_t), 0.0)
        Q += w * q
    return Q


@triton.jit
def _rows_kernel(
    S, s_row, s_col,            # student (V*B, K), any float dtype
    T, t_row, t_col,            # teacher (G*B, K): logits (with t_lse) or probabilities (PROBS)
    C, t_lse,                   # center (K,) fp32; teacher log-sum-exp (G*B,) fp32
    PW, RW,                     # pair weights (V, G) fp32; row weights (B,) (HAS_RW)
    dS,                         # out (V*B, K) contiguous, the student's dtype (WRITE_GRAD)
    row_stats,                  # (3, V*B) fp32: CE term * w, lse(y), Qsum; written by FORWARD
    grad_output,                # (1,) read on the device by the backward (not FORWARD)
    B, V, K, n_programs, rows_per_program,
    inv_tau_s, inv_tau_t, grad_norm,   # grad_norm = scale / tau_s
    G: tl.constexpr, PROBS: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_RW: tl.constexpr,
    FORWARD: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_rows = V * B
    for j in range(rows_per_program):
        # rows in (sample, crop) order: the programs in flight share the teacher rows of a few
        # samples; r = b * V + v is student row v * B + b
        r = pid + j * n_programs
        valid = r < n_rows
        b = r // V
        v = r % V
        row = (v * B + b).to(tl.int64)
        s_base = S + row * s_row
        w_row = 1.0
        if HAS_RW:
            w_row = tl.load(RW + b, mask=valid, other=0.0).to(tl.float32)
        if FORWARD:
            # 1. one sweep: online max m, sum-exp se of y - m, A = <Q, y - m>, Qsum
            m = float("-inf")
            se = 0.0
            A = 0.0
            qs = 0.0
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                mask = (offs < K) & valid
                # evict_last: the second sweep reads the row again from L2
                s = tl.load(s_base + offs.to(tl.int64) * s_col, mask=mask, other=0.0,
                            eviction_policy="evict_last")
                y = tl.where(mask, s.to(tl.float32) * inv_tau_s, float("-inf"))
                Q = _teacher_block(T, t_row, t_col, C, t_lse, PW, v, b, B, offs, mask, valid,
                                   inv_tau_t, G, PROBS, HAS_CENTER, BLOCK_K)
                m_new = tl.maximum(m, tl.max(y, axis=0))
                m_new = tl.where(valid, m_new, 0.0)  # an idle iteration stays finite
                # <Q, y - m_new> = <Q, y - m> - (m_new - m) Qsum: both parts <= 0
                shift = tl.where(m > float("-inf"), m_new - m, 0.0) * qs
                A = A - shift + tl.sum(Q * tl.where(mask, y - m_new, 0.0), axis=0)
                se = se * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
                qs += tl.sum(Q, axis=0)
                m = m_new
            log_se = tl.log(tl.where(valid, se, 1.0))
            lse = m + log_se
            tl.store(row_stats + row, (qs * log_se - A) * w_row, mask=valid)
            tl.store(row_stats + n_rows + row, lse, mask=valid)
            tl.store(row_stats + 2 * n_rows + row, qs, mask=valid)
            g = grad_norm * w_row
        else:
            lse = tl.load(row_stats + n_rows + row, mask=valid, other=0.0)
            qs = tl.load(row_stats + 2 * n_rows + row, mask=valid, other=0.0)
            g = grad_norm * w_row * tl.load(grad_output).to(tl.float32)
        if WRITE_GRAD:
            # 2. second sweep (the row is in L2): dS = g (Qsum softmax(y) - Q)
            d_base = dS + row * K
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                mask = (offs < K) & valid
                s = tl.load(s_base + offs.to(tl.int64) * s_col, mask=mask, other=0.0,
                            eviction_policy="evict_first")
                p = tl.exp(s.to(tl.float32) * inv_tau_s - lse)
                Q = _teacher_block(T, t_row, t_col, C, t_lse, PW, v, b, B, offs, mask, valid,
                                   inv_tau_t, G, PROBS, HAS_CENTER, BLOCK_K)
                grad = tl.where(mask, g * (qs * p - Q), 0.0)
                tl.store(d_base + offs, grad.to(dS.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first")


@triton.jit
def _scale_kernel(X, grad_output, n, BLOCK: tl.constexpr):
    """X *= grad_output, read on the device; nothing is read or written when it is 1."""
    g = tl.load(grad_output).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + offs, (x * g).to(X.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- kernels: split path

@triton.jit
def _split_fwd_kernel(
    S, s_row, s_col, T, t_row, t_col, C,
    part_tmax, part_tsum,       # (2*B, NCH) fp32: teacher block max / sum-exp of x
    part_smax, part_ssum,       # (V*B, NCH) fp32: student block max / sum-exp of y
    part_dot0, part_dot1,       # (V*B, NCH) fp32: sum_k exp(x_ik - blockmax_i) * S_vbk, i = 0, 1
    colsum,                     # (n_groups, K) fp32: teacher column sums per sample group
    B, V, K, NCH, samples_per_program,
    inv_tau_s, inv_tau_t,
    BLOCK_K: tl.constexpr,
):
    """Program (k, g): column block k of every row (2 teacher, V student) of sample group g."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    s_cols = offs.to(tl.int64) * s_col
    t_cols = offs.to(tl.int64) * t_col
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    col_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in range(samples_per_program):
        b = pid_g * samples_per_program + j
        valid = b < B  # the last group may be short
        lmask = mask & valid
        t0 = tl.load(T + b.to(tl.int64) * t_row + t_cols, mask=lmask, other=0.0).to(tl.float32)
        t1 = tl.load(T + (B + b).to(tl.int64) * t_row + t_cols, mask=lmask,
                     other=0.0).to(tl.float32)
        col_acc += t0 + t1  # center statistics: masked columns load 0 and are never stored
        x0 = tl.where(mask, (t0 - c) * inv_tau_t, float("-inf"))
        x1 = tl.where(mask, (t1 - c) * inv_tau_t, float("-inf"))
        m0 = tl.max(x0, axis=0)
        m1 = tl.max(x1, axis=0)
        e0 = tl.exp(x0 - m0)  # 0 on masked columns
        e1 = tl.exp(x1 - m1)
        tl.store(part_tmax + b * NCH + pid_k, m0, mask=valid)
        tl.store(part_tsum + b * NCH + pid_k, tl.sum(e0, axis=0), mask=valid)
        tl.store(part_tmax + (B + b) * NCH + pid_k, m1, mask=valid)
        tl.store(part_tsum + (B + b) * NCH + pid_k, tl.sum(e1, axis=0), mask=valid)
        for v in range(V):
            row = v * B + b
            s = tl.load(S + row.to(tl.int64) * s_row + s_cols, mask=lmask,
                        other=0.0).to(tl.float32)
            y = tl.where(mask, s * inv_tau_s, float("-inf"))
            ms = tl.max(y, axis=0)
            tl.store(part_smax + row * NCH + pid_k, ms, mask=valid)
            tl.store(part_ssum + row * NCH + pid_k, tl.sum(tl.exp(y - ms), axis=0), mask=valid)
            tl.store(part_dot0 + row * NCH + pid_k, tl.sum(e0 * s, axis=0), mask=valid)
            tl.store(part_dot1 + row * NCH + pid_k, tl.sum(e1 * s, axis=0), mask=valid)
    tl.store(colsum + pid_g.to(tl.int64) * K + offs, col_acc, mask=mask)


@triton.jit
def _combine_kernel(
    part_tmax, part_tsum, part_smax, part_ssum, part_dot0, part_dot1,   # as in _split_fwd_kernel
    lse_s,                      # out (V*B,) fp32: logsumexp(S_vb / tau_s)
    t_lse,                      # out (2*B,) fp32: logsumexp(x_ib)
    loss_per_sample,            # out (B,) fp32: sample b's share of the loss
    B, V, NCH,
    inv_tau_s, loss_norm,       # loss_norm = 1 / (|P| B)
    BLOCK_C: tl.constexpr,
):
    """Program b: merge sample b's partials over the column blocks (each rescaled by
    exp(block max - row max)) into the row log-sum-exps and the sample's loss terms."""
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < NCH
    tm0 = tl.load(part_tmax + b * NCH + cols, mask=cmask, other=float("-inf"))
    tm1 = tl.load(part_tmax + (B + b) * NCH + cols, mask=cmask, other=float("-inf"))
    ts0 = tl.load(part_tsum + b * NCH + cols, mask=cmask, other=0.0)
    ts1 = tl.load(part_tsum + (B + b) * NCH + cols, mask=cmask, other=0.0)
    M0 = tl.max(tm0, axis=0)
    M1 = tl.max(tm1, axis=0)
    r0 = tl.exp(tm0 - M0)
    r1 = tl.exp(tm1 - M1)
    Z0 = tl.sum(ts0 * r0, axis=0)
    Z1 = tl.sum(ts1 * r1, axis=0)
    tl.store(t_lse + b, M0 + tl.log(Z0))
    tl.store(t_lse + B + b, M1 + tl.log(Z1))
    # <q_ib, S_vb> = sum_blocks dot_i * exp(blockmax - M_i) / Z_i: fold 1/Z_i into the weights
    w0 = r0 / Z0
    w1 = r1 / Z1
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
        acc += tl.where(cols == 0, (g0 + g1) * lse, 0.0) - inv_tau_s * (g0 * d0 * w0 + g1 * d1 * w1)
    tl.store(loss_per_sample + b, tl.sum(acc, axis=0) * loss_norm)


@triton.jit
def _split_bwd_kernel(
    S, s_row, s_col, T, t_row, t_col, C,
    lse_s, t_lse, grad_output, dS,
    B, V, K, samples_per_program,
    inv_tau_s, inv_tau_t, grad_norm,   # grad_norm = 1 / (|P| B tau_s)
    BLOCK_K: tl.constexpr,
):
    """dS = (m_v softmax(y_vb) - sum_{i != v} q_ib) * grad_output * grad_norm; S, T read again."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    s_cols = offs.to(tl.int64) * s_col
    t_cols = offs.to(tl.int64) * t_col
    c = tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(grad_output).to(tl.float32) * grad_norm
    for j in range(samples_per_program):
        b = pid_g * samples_per_program + j
        valid = b < B
        lmask = mask & valid
        t0 = tl.load(T + b.to(tl.int64) * t_row + t_cols, mask=lmask, other=0.0).to(tl.float32)
        t1 = tl.load(T + (B + b).to(tl.int64) * t_row + t_cols, mask=lmask,
                     other=0.0).to(tl.float32)
        q0 = tl.exp((t0 - c) * inv_tau_t - tl.load(t_lse + b, mask=valid, other=0.0))
        q1 = tl.exp((t1 - c) * inv_tau_t - tl.load(t_lse + B + b, mask=valid, other=0.0))
        for v in range(V):
            row = v * B + b
            s = tl.load(S + row.to(tl.int64) * s_row + s_cols, mask=lmask,
                        other=0.0).to(tl.float32)
            p = tl.exp(s * inv_tau_s - tl.load(lse_s + row, mask=valid, other=0.0))
            g0 = tl.cast(v != 0, tl.float32)
            g1 = tl.cast(v != 1, tl.float32)
            grad = ((g0 + g1) * p - (g0 * q0 + g1 * q1)) * scale
            grad = tl.where(lmask, grad, 0.0)
            tl.store(dS + row.to(tl.int64) * K + offs, grad.to(dS.dtype.element_ty), mask=lmask)


# --------------------------------------------------------------------------- host side

PATHS = ("auto", "rows", "split")


@dataclass(frozen=True)
class LaunchConfig:
    """path "rows": `programs` persistent programs over the rows, columns in blocks of
    `block_k`, after a teacher pass in `teacher_groups` row groups. path "split": grid
    (cdiv(K, block_k), cdiv(B, samples_per_program))."""
    path: str
    block_k: int
    programs: int = 1
    samples_per_program: int = 1
    teacher_groups: int = 1


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs one program at a time in numpy: few, large programs


def _is_dino_layout(spec: CrossEntropySpec, row_weight) -> bool:
    """The split path's pairs: 2 teacher crops, W[v, i] = [v != i], logits, no row weights."""
    return (spec.n_teacher == 2 and spec.teacher_temp is not None and row_weight is None
            and spec.pair_weight == tuple(tuple(0.0 if v == i else 1.0 for i in range(2))
                                          for v in range(spec.n_student)))


def launch_config(spec: CrossEntropySpec, B: int, K: int, device: torch.device,
                  row_weight=None, path: str = "auto", block_k: Optional[int] = None,
                  samples_per_program: Optional[int] = None, programs: Optional[int] = None,
                  teacher_groups: Optional[int] = None) -> LaunchConfig:
    """The rows path when there are at least MIN_ROWS_PER_SM rows per multiprocessor (or on
    the interpreter), else the split path where the layout allows it (DINO's pairs)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    sms = _multiprocessors(device)
    rows = spec.n_student * B
    if path == "auto":
        few = device.type == "cuda" and rows < MIN_ROWS_PER_SM * sms
        path = "split" if few and _is_dino_layout(spec, row_weight) else "rows"
    if path == "split" and not _is_dino_layout(spec, row_weight):
        raise ValueError("path='split' supports the DINO pairs only (2 teacher crops, "
                         "W[v, i] = [v != i], teacher logits, no row weights)")
    if path == "rows":
        bk = (min(ROWS_BLOCK_K, max(MIN_BLOCK_K, triton.next_power_of_2(K)))
              if block_k is None else block_k)
        if programs is None:
            programs = max(1, min(rows, ROWS_PROGRAMS_PER_SM * sms))
        if teacher_groups is None:
            nch = triton.cdiv(K, TEACHER_BLOCK_K)
            target = 4 * sms if device.type == "cuda" else 1
            teacher_groups = max(1, min(spec.n_teacher * B, target // nch))
        for name, value in (("programs", programs), ("teacher_groups", teacher_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        config = LaunchConfig("rows", bk, programs=programs, teacher_groups=teacher_groups)
    else:
        bk = (max(MIN_BLOCK_K, min(SPLIT_MAX_BLOCK_K, triton.next_power_of_2(K)))
              if block_k is None else block_k)
        if samples_per_program is None:
            target = SPLIT_PROGRAMS_PER_SM * sms if device.type == "cuda" else 1
            n_groups = max(1, min(B, target // triton.cdiv(K, bk)))
            samples_per_program = triton.cdiv(B, n_groups)
        config = LaunchConfig("split", bk, samples_per_program=samples_per_program)
    _check_config(config)
    return config


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


def _teacher_pass(teacher, center_vec, inv_tau_t, want_lse: bool, want_sum: bool,
                  n_groups: int):
    """(lse (n_rows,) or None, column sum (K,) or None), T read once by programs over column
    blocks x `n_groups` row groups."""
    n_rows, K = teacher.shape
    dev = teacher.device
    f32 = torch.float32
    nch = triton.cdiv(K, TEACHER_BLOCK_K)
    n_groups = max(1, min(n_rows, n_groups))
    rpp = triton.cdiv(n_rows, n_groups)
    n_groups = triton.cdiv(n_rows, rpp)
    part = _empty((2, n_rows, nch), f32, dev) if want_lse else _empty((2, 1, 1), f32, dev)
    colsum = _empty((n_groups, K), f32, dev) if want_sum else _empty((1, 1), f32, dev)
    has_center = center_vec is not None
    _teacher_kernel[(nch, n_groups)](
        teacher, teacher.stride(0), teacher.stride(1),
        center_vec if has_center else part, part[0], part[1], colsum,
        n_rows, K, nch, rpp, inv_tau_t,
        HAS_CENTER=has_center, WANT_LSE=want_lse, WANT_SUM=want_sum,
        BLOCK_K=TEACHER_BLOCK_K, num_warps=TEACHER_NUM_WARPS)
    lse = col = None
    if want_lse:
        lse = _empty((n_rows,), f32, dev)
        _lse_kernel[(n_rows,)](part[0], part[1], lse, nch,
                               BLOCK_C=max(16, triton.next_power_of_2(nch)),
                               num_warps=TEACHER_NUM_WARPS)
    if want_sum:
        col = _reduce_colsum(colsum, K)
    return lse, col


def _reduce_colsum(colsum, K):
    if colsum.shape[0] == 1:
        return colsum[0]
    out = _empty((K,), torch.float32, colsum.device)
    _colsum_kernel[(triton.cdiv(K, TEACHER_BLOCK_K),)](
        colsum, out, colsum.shape[0], K, BLOCK=TEACHER_BLOCK_K, num_warps=TEACHER_NUM_WARPS)
    return out


_PAIR_TABLES: dict = {}


def _pair_table(pair_weight: tuple, device: torch.device) -> torch.Tensor:
    """The (V*G,) fp32 pair table on the device, made once per table and device: a copy from
    host memory at every call would wait for the device's queue to drain (a host sync)."""
    key = (pair_weight, str(device))
    table = _PAIR_TABLES.get(key)
    if table is None:
        table = torch.tensor(pair_weight, dtype=torch.float32).reshape(-1).to(device)
        _PAIR_TABLES[key] = table
    return table


def _launch_rows(student, teacher, center_vec, t_lse, pw, row_weight, spec, config, dS,
                 row_stats, grad_output, forward: bool):
    V, G = spec.n_student, spec.n_teacher
    B, K = student.shape[0] // V, student.shape[1]
    n_rows = V * B
    programs = config.programs
    dummy = row_stats
    _rows_kernel[(programs,)](
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        center_vec if center_vec is not None else dummy,
        t_lse if t_lse is not None else dummy,
        pw, row_weight if row_weight is not None else dummy,
        dS if dS is not None else dummy, row_stats,
        grad_output if grad_output is not None else dummy,
        B, V, K, programs, triton.cdiv(n_rows, programs),
        1.0 / spec.student_temp,
        0.0 if spec.teacher_temp is None else 1.0 / spec.teacher_temp,
        spec.scale / spec.student_temp,
        G=G, PROBS=spec.teacher_temp is None, HAS_CENTER=center_vec is not None,
        HAS_RW=row_weight is not None, FORWARD=forward, WRITE_GRAD=dS is not None,
        BLOCK_K=config.block_k, num_warps=ROWS_NUM_WARPS)


class _RowsFunction(torch.autograd.Function):
    """The rows path as an autograd op: outputs (loss fp32 scalar, teacher column sum (K,) fp32
    or an empty tensor); only the loss is differentiable, w.r.t. the student. Saves S and T
    (alive anyway), a copy of the center (K floats), the pair table and per-row statistics."""

    @staticmethod
    def forward(ctx, student, teacher, center, row_weight, spec, config, grad_in_forward,
                teacher_sum):
        dev = student.device
        # a private copy: the loss modules update their center in place before the backward
        center_vec = (None if center is None else
                      center.detach().reshape(-1).to(torch.float32, copy=True))
        pw = _pair_table(spec.pair_weight, dev)
        rw = None if row_weight is None else row_weight.detach()
        probs = spec.teacher_temp is None
        t_lse, col = None, None
        if not probs or teacher_sum:
            t_lse, col = _teacher_pass(teacher, center_vec,
                                       0.0 if probs else 1.0 / spec.teacher_temp,
                                       want_lse=not probs, want_sum=teacher_sum,
                                       n_groups=config.teacher_groups)
        row_stats = _empty((3, student.shape[0]), torch.float32, dev)
        # fp16 cannot hold the unscaled gradient: it is formed in the backward instead
        write = grad_in_forward and student.dtype != torch.float16
        dS = _empty(student.shape, student.dtype, dev) if write else None
        with _device_guard(dev):
            _launch_rows(student, teacher, center_vec, t_lse, pw, rw, spec, config, dS,
                         row_stats, None, forward=True)
        loss = row_stats[0].sum() * spec.scale  # fixed-order fp32 sum: deterministic
        ctx.save_for_backward(student, teacher, center_vec, t_lse, pw, rw, row_stats)
        ctx.spec, ctx.config, ctx.dS = spec, config, dS
        col = col if col is not None else loss.new_empty(0)
        ctx.mark_non_differentiable(col)
        return loss, col

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_col):
        student, teacher, center_vec, t_lse, pw, rw, row_stats = ctx.saved_tensors
        grad_output = grad_loss.reshape(1).to(torch.float32)
        dev = student.device
        with _device_guard(dev):
            if ctx.dS is not None:  # the gradient from the forward, handed over once
                dS, ctx.dS = ctx.dS, None
                block = 4096
                _scale_kernel[(triton.cdiv(dS.numel(), block),)](
                    dS, grad_output, dS.numel(), BLOCK=block, num_warps=4)
            else:  # fp16, or a retained graph's second backward: recompute from S
                dS = _empty(student.shape, student.dtype, dev)
                _launch_rows(student, teacher, center_vec, t_lse, pw, rw, ctx.spec,
                             ctx.config, dS, row_stats, grad_output, forward=False)
        return dS, None, None, None, None, None, None, None


def _split_forward(student, teacher, center_vec, spec, config):
    V = spec.n_student
    B, K = student.shape[0] // V, student.shape[1]
    dev = student.device
    block_k, spp = config.block_k, config.samples_per_program
    n_blocks, n_groups = triton.cdiv(K, block_k), triton.cdiv(B, spp)
    f32 = torch.float32
    part_t = _empty((2, 2 * B, n_blocks), f32, dev)
    part_s = _empty((4, V * B, n_blocks), f32, dev)
    colsum = _empty((n_groups, K), f32, dev)
    lse_s = _empty((V * B,), f32, dev)
    t_lse = _empty((2 * B,), f32, dev)
    loss_per_sample = _empty((B,), f32, dev)
    inv_tau_s, inv_tau_t = 1.0 / spec.student_temp, 1.0 / spec.teacher_temp
    _split_fwd_kernel[(n_blocks, n_groups)](
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        center_vec, part_t[0], part_t[1], part_s[0], part_s[1], part_s[2], part_s[3], colsum,
        B, V, K, n_blocks, spp, inv_tau_s, inv_tau_t,
        BLOCK_K=block_k, num_warps=SPLIT_NUM_WARPS)
    # loss_norm 1: the pair sum per sample; spec.scale is applied below
    _combine_kernel[(B,)](
        part_t[0], part_t[1], part_s[0], part_s[1], part_s[2], part_s[3],
        lse_s, t_lse, loss_per_sample, B, V, n_blocks, inv_tau_s, 1.0,
        BLOCK_C=max(16, triton.next_power_of_2(n_blocks)), num_warps=SPLIT_NUM_WARPS)
    row_sum = _reduce_colsum(colsum, K)
    return loss_per_sample.sum() * spec.scale, row_sum, lse_s, t_lse


class _SplitFunction(torch.autograd.Function):
    """The split path (DINO pairs) as an autograd op: (loss, teacher column sum)."""

    @staticmethod
    def forward(ctx, student, teacher, center, spec, config):
        K = student.shape[1]
        center_vec = (torch.zeros(K, dtype=torch.float32, device=student.device)
                      if center is None else
                      center.detach().reshape(-1).to(torch.float32, copy=True))
        with _device_guard(student.device):
            loss, row_sum, lse_s, t_lse = _split_forward(student, teacher, center_vec, spec,
                                                         config)
        ctx.save_for_backward(student, teacher, center_vec, lse_s, t_lse)
        ctx.spec, ctx.config = spec, config
        ctx.mark_non_differentiable(row_sum)
        return loss, row_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_row_sum):
        student, teacher, center_vec, lse_s, t_lse = ctx.saved_tensors
        spec, config = ctx.spec, ctx.config
        V = spec.n_student
        B, K = student.shape[0] // V, student.shape[1]
        dS = _empty(student.shape, student.dtype, student.device)
        with _device_guard(student.device):
            _split_bwd_kernel[(triton.cdiv(K, config.block_k),
                               triton.cdiv(B, config.samples_per_program))](
                student, student.stride(0), student.stride(1),
                teacher, teacher.stride(0), teacher.stride(1), center_vec,
                lse_s, t_lse, grad_loss.reshape(1).to(torch.float32), dS,
                B, V, K, config.samples_per_program,
                1.0 / spec.student_temp, 1.0 / spec.teacher_temp,
                spec.scale / spec.student_temp,
                BLOCK_K=config.block_k, num_warps=SPLIT_NUM_WARPS)
        return dS, None, None, None, None


def run_soft_cross_entropy_triton(student, teacher, spec: CrossEntropySpec, center=None,
                                  row_weight=None, *, teacher_sum: bool = False,
                                  config: Optional[LaunchConfig] = None):
    """The fused op on validated inputs: (loss, teacher column sum or None)."""
    V = spec.n_student
    B, K = student.shape[0] // V, student.shape[1]
    if config is None:
        config = launch_config(spec, B, K, student.device, row_weight)
    teacher = teacher.detach()
    if config.path == "split":
        loss, col = _SplitFunction.apply(student, teacher, center, spec, config)
        return loss, (col if teacher_sum else None)
    grad_in_forward = torch.is_grad_enabled() and student.requires_grad
    loss, col = _RowsFunction.apply(student, teacher, center, row_weight, spec, config,
                                    grad_in_forward, teacher_sum)
    return loss, (col if teacher_sum else None)


def soft_cross_entropy_triton(student, teacher, pair_weight, *, student_temp,
                              teacher_temp=None, center=None, row_weight=None, scale=1.0,
                              teacher_sum=False, path: str = "auto",
                              block_k: Optional[int] = None,
                              samples_per_program: Optional[int] = None,
                              programs: Optional[int] = None,
                              teacher_groups: Optional[int] = None):
    """`dino_fast.cross_entropy.soft_cross_entropy` on the fused kernels, with the launch
    exposed: path "rows" (one pass, S read once) or "split" (DINO pairs, few rows); block_k,
    samples_per_program (split), programs and teacher_groups (rows) override the defaults of
    `launch_config` (for tests and tuning).
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1. Returns the loss, or (loss, column sum)
    with teacher_sum."""
    spec, B, K = check_cross_entropy_inputs(
        student, teacher, pair_weight, student_temp=student_temp, teacher_temp=teacher_temp,
        center=center, row_weight=row_weight, scale=scale)
    resolve_backend("triton", student.device, "soft_cross_entropy_triton")
    config = launch_config(spec, B, K, student.device, row_weight, path=path, block_k=block_k,
                           samples_per_program=samples_per_program, programs=programs,
                           teacher_groups=teacher_groups)
    loss, col = run_soft_cross_entropy_triton(student, teacher, spec, center, row_weight,
                                              teacher_sum=teacher_sum, config=config)
    return (loss, col) if teacher_sum else loss
