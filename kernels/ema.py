"""Teacher EMA over every parameter in one Triton launch: teacher <- m*teacher + (1 - m)*student.

Why a multi-tensor kernel. The official script loops over the parameters in Python:
`param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)` is three kernels and one temporary
per tensor, about 470 launches for ViT-S/16 + the DINO head (158 tensors), and it reads and
writes the teacher twice and a temporary once, whose fresh pages the OS must also fault in and
zero. The update needs one read of the teacher, one read of the
student and one write of the teacher: for the 44 M parameters of ViT-S/16 + head in fp32 that is
3 * 4 * 44e6 = 0.53 GB, about 160 us at 3.35 TB/s (H100 SXM). This kernel does exactly that
traffic in one launch per (teacher dtype, student dtype) group, usually one launch in all
(pairs at pointers not 16-byte aligned get a launch of their own, see `EMAPlan`).

How. Every tensor is cut into chunks of BLOCK elements; program `pid` owns one chunk. Device
tables, built once on the host and cached (`EMAPlan`, `PLAN_CACHE`):

    teacher_ptrs[i], student_ptrs[i]   data pointers (int64) of tensor pair i
    numels[i]                          its number of elements (int64)
    block_tensor[pid]                  the tensor pair program pid works on (int32)
    block_chunk[pid]                   which chunk: elements chunk*BLOCK .. (chunk+1)*BLOCK - 1

A program loads its row of the tables, turns the int64 addresses into typed pointers
(`.to(tl.pointer_type(...))`, which also runs under the Triton interpreter on CPU tensors), loads
both chunks, computes in fp32 whatever the storage dtype, and stores the teacher back in its own
dtype. The tables hold raw addresses, so they are only valid while no tensor moves: the cache key
is every data pointer (plus sizes and dtypes), and a moved tensor (`.to()`, `.cuda()`,
`load_state_dict(assign=True)`, `p.data = ...`) gives a new key, hence new tables.

The momentum is a runtime fp32 argument (it changes every step; a constexpr would recompile the
kernel each step); `w = 1 - m` is computed in fp64 on the host and passed beside it. The update is
computed in the form of `torch.lerp` (t + w*(s - t), or s - m*(s - t) when w >= 0.5), which is
what the eager path runs, is exact at both ends (momentum 1 leaves the teacher bit-identical,
momentum 0 copies the student) and has no bias as m -> 1 (see `_lerp_chunk`).

Tensors need not be contiguous: any non-overlapping, dense layout works (the kernel walks the
underlying storage span) as long as teacher and student have the same strides, so element k of
the span is the same logical element in both. Anything else (slices with gaps, broadcast views,
different strides) is refused by `check_triton_inputs` with a message naming the tensor; the
eager path (`torch._foreach_lerp_`) handles those.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Elements per program. 4096 fp32 elements = 16 KiB read from each of teacher and student: with
# 8 warps that is 16 elements (four 128-bit vectors) per thread per tensor, enough bytes in flight
# per SM to saturate HBM, while the grid (10834 programs for ViT-S + head) still spreads evenly
# over 132 SMs. Only the last chunk of a tensor is partial (masked): 104 of those programs.
BLOCK = 4096
NUM_WARPS = 8
# The fast (unmasked) path tells the compiler that both pointers are 16-byte aligned, so loads
# and stores become 128-bit vector accesses; the host checks that it holds for the whole group.
ALIGN_BYTES = 16
# Plans are small (about 12 bytes per program), but each pins raw addresses: keep a few, for
# several EMA pairs (teacher/student, plus e.g. a second EMA model) used in turn.
PLAN_CACHE_SIZE = 8

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _load_fp32(ptrs, mask, DTYPE: tl.constexpr):
    x = tl.load(ptrs, mask=mask)
    if DTYPE == tl.bfloat16:
        # a bf16 is the upper half of the fp32 of the same value: exact, subnormals included
        # (the Triton interpreter's own bf16 -> fp32 conversion flushes bf16 subnormals)
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _store_from_fp32(ptrs, x, mask, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        # Round to nearest, ties to even, with integer ops: the same bits as torch's
        # `.to(torch.bfloat16)` and the GPU's cvt.rn, on every backend (the Triton interpreter
        # truncates instead). A few integer ops per element are free in this memory-bound kernel.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a quiet NaN, never rounds to inf
        tl.store(ptrs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(DTYPE), mask=mask)


@triton.jit
def _lerp_chunk(t_ptrs, s_ptrs, mask, momentum, weight,
                TEACHER_DTYPE: tl.constexpr, STUDENT_DTYPE: tl.constexpr):
    # fp32 math whatever the storage: the interpreter has no bf16 arithmetic, and bf16 products
    # would lose the (1 - m) * student increment (1 - m = 0.004 is below half a bf16 ulp).
    t = _load_fp32(t_ptrs, mask, TEACHER_DTYPE)
    s = _load_fp32(s_ptrs, mask, STUDENT_DTYPE)
    # m*t + (1-m)*s in the form of torch.lerp: t + w*(s - t) for w = 1 - m < 0.5, else
    # s - m*(s - t). Exact at both ends (m = 1 keeps t, m = 0 gives s), and unbiased as m -> 1:
    # with m and 1 - m each rounded to fp32, m*t + (1-m)*s would scale t by m32 + w32 != 1, a
    # bias of up to 6e-8 * t per step against a wanted step w*(s - t) that ends near 1e-7.
    d = s - t
    if weight < 0.5:
        new = t + weight * d
    else:
        new = s - momentum * d
    _store_from_fp32(t_ptrs, new, mask, TEACHER_DTYPE)


@triton.jit
def _ema_multi_tensor_kernel(teacher_ptrs, student_ptrs, numels, block_tensor, block_chunk,
                             momentum, weight,
                             TEACHER_DTYPE: tl.constexpr, STUDENT_DTYPE: tl.constexpr,
                             BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # 1. which tensor pair and which chunk of it this program owns
    pid = tl.program_id(0)
    i = tl.load(block_tensor + pid)
    # chunk * BLOCK (rather than a stored element offset) lets the compiler see that the start is
    # a multiple of BLOCK, which the vectorised path needs
    start = tl.load(block_chunk + pid).to(tl.int64) * BLOCK
    n = tl.load(numels + i)
    # 2. raw addresses -> typed pointers
    t_base = tl.load(teacher_ptrs + i).to(tl.pointer_type(TEACHER_DTYPE))
    s_base = tl.load(student_ptrs + i).to(tl.pointer_type(STUDENT_DTYPE))
    if ALIGNED:
        t_base = tl.multiple_of(t_base, 16)
        s_base = tl.multiple_of(s_base, 16)
    offs = start + tl.arange(0, BLOCK)
    # 3. teacher <- m * teacher + (1 - m) * student, in fp32, stored in the teacher's dtype.
    # Full chunks skip the mask: a mask against a runtime size would stop vectorisation.
    if start + BLOCK <= n:
        _lerp_chunk(t_base + offs, s_base + offs, None, momentum, weight, TEACHER_DTYPE,
                    STUDENT_DTYPE)
    else:
        _lerp_chunk(t_base + offs, s_base + offs, offs < n, momentum, weight, TEACHER_DTYPE,
                    STUDENT_DTYPE)


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its storage span exactly once (contiguous, or a permutation of
    a contiguous tensor such as a transpose or channels_last): the span is then numel elements
    from data_ptr(), since strides are never negative."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor) -> tuple:
    # strides of the dimensions that matter (a size-1 dimension's stride is arbitrary)
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)


def check_triton_inputs(teachers: Sequence[torch.Tensor], students: Sequence[torch.Tensor],
                        names: Sequence[str] | None = None) -> None:
    """Raise if the kernel cannot run these (already validated: same count, shapes, device).

    Needs dtypes in SUPPORTED_DTYPES (fp64 goes to the eager path: the momentum argument is fp32)
    and, per pair, a non-overlapping dense layout with the same strides in teacher and student.
    """
    for i, (t, s) in enumerate(zip(teachers, students)):
        if t.dtype in _TL_DTYPES and s.dtype in _TL_DTYPES and t.is_contiguous() \
                and s.is_contiguous():
            continue  # the common case, checked in well under a microsecond
        label = f"[{i}]" if names is None else f"[{i}] ({names[i]})"
        for tensor, arg in ((t, "teacher_params"), (s, "student_params")):
            if tensor.dtype not in _TL_DTYPES:
                raise TypeError(f"{arg}{label} has dtype {tensor.dtype}; the Triton EMA supports "
                                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}: use "
                                "backend='eager' for other dtypes")
            if not is_dense(tensor):
                raise ValueError(f"{arg}{label} (shape {tuple(tensor.shape)}, strides "
                                 f"{tensor.stride()}) is not a dense, non-overlapping tensor; the "
                                 "Triton EMA walks each tensor's storage span: pass a contiguous "
                                 "tensor or use backend='eager'")
        if _layout(t) != _layout(s):
            raise ValueError(f"teacher_params{label} has strides {t.stride()} but "
                             f"student_params{label} has {s.stride()}; the Triton EMA needs the "
                             "same memory layout in both (e.g. make both contiguous) or "
                             "backend='eager'")


class EMAPlan:
    """The device tables of one list of (teacher, student) pairs, grouped for launching.

    Valid as long as no tensor of the lists moves (see `plan_key`). `launches` holds one entry
    per group of pairs sharing (teacher dtype, student dtype, both pointers 16-byte aligned or
    not): its tables and grid size. Separate groups keep a stray unaligned view (a parameter
    packed at an odd offset of a flat buffer) from taking the vectorised path away from the rest.
    """

    def __init__(self, teachers: Sequence[torch.Tensor], students: Sequence[torch.Tensor],
                 block: int = BLOCK):
        self.block = block
        self.device = teachers[0].device
        groups: dict[tuple[torch.dtype, torch.dtype, bool], list[int]] = {}
        for i, (t, s) in enumerate(zip(teachers, students)):
            if t.numel() > 0:
                aligned = t.data_ptr() % ALIGN_BYTES == 0 and s.data_ptr() % ALIGN_BYTES == 0
                groups.setdefault((t.dtype, s.dtype, aligned), []).append(i)
        self.launches = []
        for (t_dtype, s_dtype, aligned), idx in groups.items():
            t_ptrs = [teachers[i].data_ptr() for i in idx]
            s_ptrs = [students[i].data_ptr() for i in idx]
            numels = [teachers[i].numel() for i in idx]
            block_tensor, block_chunk = [], []
            for j, n in enumerate(numels):
                chunks = triton.cdiv(n, block)
                block_tensor.extend([j] * chunks)
                block_chunk.extend(range(chunks))
            # one host -> device copy per table, only when the plan is built
            tables = {
                "teacher_ptrs": torch.tensor(t_ptrs, dtype=torch.int64),
                "student_ptrs": torch.tensor(s_ptrs, dtype=torch.int64),
                "numels": torch.tensor(numels, dtype=torch.int64),
                "block_tensor": torch.tensor(block_tensor, dtype=torch.int32),
                "block_chunk": torch.tensor(block_chunk, dtype=torch.int32),
            }
            tables = {k: v.to(self.device) for k, v in tables.items()}
            self.launches.append(dict(tables, grid=len(block_tensor), aligned=aligned,
                                      teacher_dtype=_TL_DTYPES[t_dtype],
                                      student_dtype=_TL_DTYPES[s_dtype]))

    def launch(self, momentum: float) -> None:
        """Run the update with this momentum (a Python float in [0, 1]), one launch per group."""
        momentum = float(momentum)  # an int 1 would be specialised by Triton into a constexpr
        weight = 1.0 - momentum  # in fp64, then rounded once to fp32 at the launch
        on_cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_cuda else contextlib.nullcontext():
            for g in self.launches:
                _ema_multi_tensor_kernel[(g["grid"],)](
                    g["teacher_ptrs"], g["student_ptrs"], g["numels"], g["block_tensor"],
                    g["block_chunk"], momentum, weight,
                    TEACHER_DTYPE=g["teacher_dtype"], STUDENT_DTYPE=g["student_dtype"],
                    BLOCK=self.block, ALIGNED=g["aligned"], num_warps=NUM_WARPS)


def plan_key(teachers: Sequence[torch.Tensor], students: Sequence[torch.Tensor],
             block: int) -> tuple:
    """Everything the tables depend on: addresses, sizes and dtypes of every pair, device, block."""
    return (block, teachers[0].device,
            tuple((t.data_ptr(), s.data_ptr(), t.numel(), t.dtype, s.dtype)
                  for t, s in zip(teachers, students)))


class PlanCache:
    """A small LRU of EMAPlans keyed by `plan_key`; counts builds and hits (for tests and logs)."""

    def __init__(self, size: int = PLAN_CACHE_SIZE):
        self.size = size
        self._plans: OrderedDict[tuple, EMAPlan] = OrderedDict()
        self.builds = 0
        self.hits = 0

    def get(self, teachers, students, block: int = BLOCK) -> EMAPlan:
        key = plan_key(teachers, students, block)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            self.hits += 1
            return plan
        plan = EMAPlan(teachers, students, block)
        self._plans[key] = plan
        self.builds += 1
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        self._plans.clear()


PLAN_CACHE = PlanCache()


def ema_update_triton_(teachers: Sequence[torch.Tensor], students: Sequence[torch.Tensor],
                       momentum: float, block: int = BLOCK) -> EMAPlan:
    """teacher <- momentum * teacher + (1 - momentum) * student for every pair, in place.

    Host launcher: the inputs must already be validated (`dino_fast.ema.ema_update_` does it, and
    `check_triton_inputs`). Returns the plan it ran (cached; rebuilt when any tensor moved).
    The writes bypass autograd, so the teachers' version counters are bumped here, as an in-place
    PyTorch op would: a graph that saved a teacher tensor then refuses to backward through it.
    """
    plan = PLAN_CACHE.get(teachers, students, block)
    plan.launch(momentum)
    torch.autograd.graph.increment_version(list(teachers))
    return plan
