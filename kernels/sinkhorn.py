"""Sinkhorn-Knopp teacher (DINOv2 / DINOv3) in Triton: the scale vector log u from passes over the
teacher logits X, no (rows, K) temporary.

Math (see dino_fast/sinkhorn.py): the SK teacher after n iterations is Q = softmax_k(a + log u),
a = X / tau, for one vector log u (K floats). Over the n valid rows b (the first n; the rest is
padding and is never read):

    iteration 1:     log u_k  = -lse_b a_bk                      column log-sum-exp
    iteration 2..n:  r_b      = lse_k (a_bk + log u_k)           row step (row normaliser)
                     log u_k -= log sum_b exp(a_bk + log u_k - r_b)      column step

Every exp is shifted: by the running column max in iteration 1 (per program, then merged; so a
column far below every other one keeps its share, where one global shift would underflow it to
0 and give log 0), by the running row max in the row step; the column step's terms lie in
[0, 1] (a row-normalised matrix).

Passes, each a read of X (DRAM traffic |X| per pass), and what they write:
- `_column_lse_kernel` (iteration 1): programs over (column block, row group), an online column
  max / sum-exp over the group's rows: 2 * groups * K partials, merged in a fixed order by
  `_merge_column_lse_kernel` (deterministic, no atomics).
- `_row_lse_kernel` (row step): programs owning `row_block_rows` whole rows, an online row
  log-sum-exp: n floats. With WRITE_PROBS it sweeps the rows again and writes
  Q = exp(a + log u - r) (the probabilities: the only (rows, K) tensor, and only when asked).
- `_column_sum_kernel` (column step): programs over (column block, row group): groups * K
  partials, merged in order (`_colsum_kernel` of kernels/cross_entropy.py).
So n iterations read X 2n - 1 times and write O(K + rows) floats per iteration: the row step
needs whole rows and the column step all rows of a column, and a row-normalised matrix of
(rows, K) does not fit on chip, so each iteration reads X twice (the second from L2 when X fits
there). The number of row groups is capped by the number of programs, so the partials stay
O(programs * block) whatever K is.

The iterations themselves, and the all-reduces of a process group, are the driver's in
dino_fast/sinkhorn.py (`sinkhorn_log_scale`), shared with the eager path: this module provides
the steps (`TritonSinkhornSteps`, its launch from `launch_config`, whose fields tests and tuning
may set). Every load is cast to fp32 at once (the Triton interpreter
has no bf16 arithmetic); inputs may be non-contiguous (row and column strides).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from dino_fast.kernels.cross_entropy import _device_guard, _reduce_colsum

# Launch sizes come from the tile arithmetic below; they are not yet tuned on a GPU.
# Column passes: tiles of COLUMN_BLOCK_ROWS rows x COLUMN_BLOCK_K columns (4096 elements, 32 per
# thread at 4 warps; each row segment is 512 contiguous bytes in bf16), and about
# COLUMN_PROGRAMS_PER_SM programs per multiprocessor: enough loads in flight, and a bound on the
# partials (row groups x K <= programs x block).
COLUMN_BLOCK_K = 256
COLUMN_BLOCK_ROWS = 16
COLUMN_PROGRAMS_PER_SM = 4
# Row pass: tiles of ROW_TILE elements (row_block_rows rows x ROW_TILE / row_block_rows columns);
# programs own up to 8 rows while that still leaves ROW_PROGRAMS_PER_SM programs per
# multiprocessor, one row each below.
ROW_TILE = 4096
ROW_MAX_BLOCK_ROWS = 8
ROW_PROGRAMS_PER_SM = 2
MIN_BLOCK_K = 16
NUM_WARPS = 4
# The interpreter runs one program at a time in numpy: few, large programs.
INTERPRETER_TILE = 16384


# --------------------------------------------------------------------------- kernels

@triton.jit
def _column_lse_kernel(
    X, x_row, x_col,            # teacher logits (>= n_rows, K), any float dtype
    part_max, part_sum,         # out (n_groups, K) fp32
    n_rows, K, rows_per_group, inv_tau,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (k, g): part_max[g, k] = max_b a_bk and part_sum[g, k] = sum_b exp(a_bk -
    part_max[g, k]) over the rows b of group g, column block k (a = X / tau)."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    col_off = cols.to(tl.int64) * x_col
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_K], dtype=tl.float32)
    row0 = pid_g * rows_per_group  # < n_rows: the host makes no empty group
    for j in range(0, rows_per_group, BLOCK_R):
        rows = row0 + j + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        x = tl.load(X + rows.to(tl.int64)[:, None] * x_row + col_off[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        a = tl.where(rmask[:, None], x * inv_tau, float("-inf"))
        # the first tile holds a valid row, so m is finite from then on (columns beyond K too:
        # they load 0) and m - m_new is never -inf - -inf
        m_new = tl.maximum(m, tl.max(a, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(a - m_new[None, :]), axis=0)
        m = m_new
    out = pid_g.to(tl.int64) * K + cols
    tl.store(part_max + out, m, mask=cmask)
    tl.store(part_sum + out, s, mask=cmask)


@triton.jit
def _merge_column_lse_kernel(part_max, part_sum, col_max, col_sum, n_groups, K,
                             BLOCK: tl.constexpr):
    """(col_max, col_sum)[k] from the groups' partials, merged in the order g = 0, 1, ..."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(n_groups):
        at = tl.cast(g, tl.int64) * K + offs
        mg = tl.load(part_max + at, mask=mask, other=0.0)
        sg = tl.load(part_sum + at, mask=mask, other=0.0)
        m_new = tl.maximum(m, mg)
        s = s * tl.exp(m - m_new) + sg * tl.exp(mg - m_new)
        m = m_new
    tl.store(col_max + offs, m, mask=mask)
    tl.store(col_sum + offs, s, mask=mask)


@triton.jit
def _row_lse_kernel(
    X, x_row, x_col,            # teacher logits (>= n_rows, K)
    LU,                         # log u (K,) fp32
    row_lse,                    # out (n_rows,) fp32: r_b = lse_k(a_bk + log u_k)
    Q,                          # out (n_rows, K) fp32 contiguous, softmax(a + log u) (WRITE_PROBS)
    n_rows, K, inv_tau,
    WRITE_PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program i: rows i * BLOCK_R .. + BLOCK_R, whole rows, column block by column block."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    row_off = rows.to(tl.int64) * x_row
    # 1. online row max m and sum-exp s of z = a + log u (rows beyond n_rows load 0: finite)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        x = tl.load(X + row_off[:, None] + cols.to(tl.int64)[None, :] * x_col,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        lu = tl.load(LU + cols, mask=cmask, other=0.0)
        z = tl.where(cmask[None, :], x * inv_tau + lu[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # every block holds a column: finite
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(row_lse + rows, lse, mask=rmask)
    if WRITE_PROBS:
        # 2. second sweep over the same rows: Q = exp(z - r)
        q_off = rows.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(X + row_off[:, None] + cols.to(tl.int64)[None, :] * x_col,
                        mask=mask, other=0.0).to(tl.float32)
            lu = tl.load(LU + cols, mask=cmask, other=0.0)
            # masked lanes: exp(-inf) (a bare exp(-lse) could overflow)
            q = tl.exp(tl.where(mask, x * inv_tau + lu[None, :] - lse[:, None], float("-inf")))
            tl.store(Q + q_off[:, None] + cols[None, :], q, mask=mask)


@triton.jit
def _column_sum_kernel(
    X, x_row, x_col, LU, row_lse,
    part_sum,                   # out (n_groups, K) fp32
    n_rows, K, rows_per_group, inv_tau,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (k, g): part_sum[g, k] = sum_b exp(a_bk + log u_k - r_b) over the rows of group g,
    column block k: the column sums of the row-normalised P = softmax(a + log u)."""
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    col_off = cols.to(tl.int64) * x_col
    lu = tl.load(LU + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    row0 = pid_g * rows_per_group
    for j in range(0, rows_per_group, BLOCK_R):
        rows = row0 + j + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        x = tl.load(X + rows.to(tl.int64)[:, None] * x_row + col_off[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        r = tl.load(row_lse + rows, mask=rmask, other=0.0)
        # in [0, 1]; masked lanes exp(-inf) = 0 (a bare exp(-r) could overflow)
        e = tl.where(rmask[:, None] & cmask[None, :], x * inv_tau + lu[None, :] - r[:, None],
                     float("-inf"))
        acc += tl.sum(tl.exp(e), axis=0)
    tl.store(part_sum + pid_g.to(tl.int64) * K + cols, acc, mask=cmask)


# --------------------------------------------------------------------------- host side

@dataclass(frozen=True)
class SinkhornLaunch:
    """Column passes: grid (cdiv(K, column_block_k), row_groups), tiles of column_block_rows x
    column_block_k. Row pass: grid cdiv(n, row_block_rows), tiles of row_block_rows x
    row_block_k. Block sizes are powers of two."""
    column_block_k: int
    column_block_rows: int
    row_groups: int
    row_block_k: int
    row_block_rows: int


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


def _check_launch(name: str, value, power_of_two: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or \
            (power_of_two and value & (value - 1)):
        what = "a power of two >= 1" if power_of_two else "a positive integer"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def launch_config(n: int, K: int, device: torch.device, *,
                  column_block_k: Optional[int] = None, column_block_rows: Optional[int] = None,
                  row_groups: Optional[int] = None, row_block_k: Optional[int] = None,
                  row_block_rows: Optional[int] = None) -> SinkhornLaunch:
    """The launch for n valid rows of K columns; any field may be given (tests, tuning)."""
    given = dict(column_block_k=column_block_k, column_block_rows=column_block_rows,
                 row_groups=row_groups, row_block_k=row_block_k, row_block_rows=row_block_rows)
    for name, value in given.items():
        if value is not None:
            _check_launch(name, value, power_of_two=name != "row_groups")
    on_cuda = device.type == "cuda"
    sms = _multiprocessors(device)
    if column_block_k is None:
        column_block_k = max(MIN_BLOCK_K, _pow2_at_most(K, COLUMN_BLOCK_K if on_cuda else 1024))
    if column_block_rows is None:
        cap = COLUMN_BLOCK_ROWS if on_cuda else max(1, INTERPRETER_TILE // column_block_k)
        column_block_rows = _pow2_at_most(n, cap)
    if row_groups is None:
        target = COLUMN_PROGRAMS_PER_SM * sms if on_cuda else 1
        row_groups = max(1, min(triton.cdiv(n, column_block_rows),
                                triton.cdiv(target, triton.cdiv(K, column_block_k))))
    if row_block_rows is None:
        row_block_rows = 1 if on_cuda else _pow2_at_most(n, 16)
        while on_cuda and row_block_rows < ROW_MAX_BLOCK_ROWS and \
                triton.cdiv(n, 2 * row_block_rows) >= ROW_PROGRAMS_PER_SM * sms:
            row_block_rows *= 2
    if row_block_k is None:
        tile = ROW_TILE if on_cuda else INTERPRETER_TILE
        row_block_k = max(MIN_BLOCK_K, _pow2_at_most(K, tile // row_block_rows))
    return SinkhornLaunch(column_block_k, column_block_rows, row_groups, row_block_k,
                          row_block_rows)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels fill; the tests swap this for a NaN fill to catch missed writes
    and spy on it for the sizes allocated."""
    return torch.empty(shape, dtype=dtype, device=device)


class TritonSinkhornSteps:
    """The SK steps on the first n rows of the teacher logits X, for the shared driver
    (dino_fast.sinkhorn.sinkhorn_log_scale). X is only read; the buffers are O(K + rows):
    per-group partials (2, groups, K) and the row normalisers (n,).

    - first_column_step() -> (col_max, col_sum), (K,) fp32 each: col_sum_k = sum_b exp(a_bk -
      col_max_k), a = X / tau over the n rows (valid until the next step);
    - column_step(log_u) -> (K,) fp32: the column sums of softmax(a + log u), the rows
      normalised (valid until the next step);
    - probs(log_u) -> Q (rows of X, K) fp32 = softmax(a + log u), every row of X.
    """

    def __init__(self, teacher_output: torch.Tensor, teacher_temp: float, n_valid_rows: int,
                 config: Optional[SinkhornLaunch] = None):
        self.x = teacher_output.detach()
        self.n, self.K = n_valid_rows, self.x.shape[1]
        self.inv_tau = 1.0 / teacher_temp
        self.device = self.x.device
        self.config = c = config or launch_config(self.n, self.K, self.device)
        # groups of whole tiles, none empty: every group starts at a valid row
        tiles = triton.cdiv(triton.cdiv(self.n, c.row_groups), c.column_block_rows)
        self.rows_per_group = tiles * c.column_block_rows
        self.groups = triton.cdiv(self.n, self.rows_per_group)
        self.column_grid = (triton.cdiv(self.K, c.column_block_k), self.groups)
        self.parts = _empty((2, self.groups, self.K), torch.float32, self.device)
        self.row_lse = _empty((self.n,), torch.float32, self.device)

    def first_column_step(self):
        x, c = self.x, self.config
        with _device_guard(self.device):
            _column_lse_kernel[self.column_grid](
                x, x.stride(0), x.stride(1), self.parts[0], self.parts[1],
                self.n, self.K, self.rows_per_group, self.inv_tau,
                BLOCK_R=c.column_block_rows, BLOCK_K=c.column_block_k, num_warps=NUM_WARPS)
            if self.groups == 1:
                return self.parts[0, 0], self.parts[1, 0]
            col_max = _empty((self.K,), torch.float32, self.device)
            col_sum = _empty((self.K,), torch.float32, self.device)
            block = 1024
            _merge_column_lse_kernel[(triton.cdiv(self.K, block),)](
                self.parts[0], self.parts[1], col_max, col_sum, self.groups, self.K,
                BLOCK=block, num_warps=NUM_WARPS)
        return col_max, col_sum

    def _row_pass(self, log_u, n_rows: int, row_lse, probs=None) -> None:
        x, c = self.x, self.config
        _row_lse_kernel[(triton.cdiv(n_rows, c.row_block_rows),)](
            x, x.stride(0), x.stride(1), log_u, row_lse,
            probs if probs is not None else row_lse, n_rows, self.K, self.inv_tau,
            WRITE_PROBS=probs is not None, BLOCK_R=c.row_block_rows, BLOCK_K=c.row_block_k,
            num_warps=NUM_WARPS)

    def column_step(self, log_u: torch.Tensor) -> torch.Tensor:
        x, c = self.x, self.config
        with _device_guard(self.device):
            self._row_pass(log_u, self.n, self.row_lse)
            _column_sum_kernel[self.column_grid](
                x, x.stride(0), x.stride(1), log_u, self.row_lse, self.parts[0],
                self.n, self.K, self.rows_per_group, self.inv_tau,
                BLOCK_R=c.column_block_rows, BLOCK_K=c.column_block_k, num_warps=NUM_WARPS)
            return _reduce_colsum(self.parts[0], self.K)

    def probs(self, log_u: torch.Tensor) -> torch.Tensor:
        n_rows = self.x.shape[0]
        q = _empty((n_rows, self.K), torch.float32, self.device)
        row_lse = self.row_lse if n_rows == self.n else _empty((n_rows,), torch.float32,
                                                                 self.device)
        with _device_guard(self.device):
            self._row_pass(log_u, n_rows, row_lse, q)
        return q
