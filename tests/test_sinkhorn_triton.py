"""Fused Sinkhorn-Knopp (kernels/sinkhorn.py) against the eager log-domain path and the literal
official formula (tests/dinov_reference.py): log u, the center and the probabilities over dtypes,
K = 1 / 7 / 1025, one row and rows that are no multiple of a block, 1 and 3 iterations, padding
rows (n_valid_rows), logits where the official formula overflows or a column underflows, launch
overrides (several column blocks and row groups, a short last group), strided inputs; no
(rows, K) temporary; the DINOv2 / DINOv3 classes' sinkhorn_knopp_teacher on the fused path;
backend dispatch and bad input; two processes over gloo.

Without CUDA the kernels run under the Triton interpreter on CPU ("cpu" parameters; conftest.py
sets TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels ("cuda", `gpu`).
Tolerances (dinov_reference.py): the oracle is the official formula in fp64 on the same rounded
inputs, so every input dtype is held to the fp32 bound PROB_RTOL; Triton and eager agree on
log u to fp32 rounding of |a| = |x / tau| (LOG_U_RTOL).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compile_for_hopper, free_port
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dino_fast import cpu_kernels, dinov3
from dino_fast.backend import triton_available
from dino_fast.dinov2 import DINOLoss, iBOTPatchLoss
from dino_fast.sinkhorn import (
    check_sinkhorn_inputs,
    select_sinkhorn_backend,
    sinkhorn_knopp_center,
    sinkhorn_knopp_log_scale,
    sinkhorn_knopp_probs,
    sinkhorn_log_scale,
)

from dinov_reference import (
    PROB_RTOL,
    log_domain_sinkhorn_knopp,
    logits,
    official_sinkhorn_knopp,
    rel_rms,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot be imported")

if triton_available():
    import dino_fast.kernels.sinkhorn as kernel_module

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="with CUDA present the interpreter is off; the cuda "
        "parameters run these tests on the compiled kernels")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 rounding of a = x / tau (|a| up to ~200 here) carried through 2n - 1 log-sum-exps in a
# different summation order
LOG_U_RTOL = 1e-5
# (rows, K): one row; K = 1; rows no multiple of the interpreter's 16-row tiles, K = 1025 = one
# 1024-column block + 1
SHAPES = [(1, 7), (13, 1), (37, 1025), (20, 7)]


def sinkhorn_knopp_log_scale_triton(x, tau, n_iterations=3, *, n_valid_rows=None, **launch):
    """`sinkhorn_knopp_log_scale` on the Triton steps with the launch overridden (block sizes,
    row groups: see kernel_module.launch_config)."""
    _, K, n = check_sinkhorn_inputs(x, tau, n_iterations, n_valid_rows)
    config = kernel_module.launch_config(n, K, x.device, **launch)
    steps = kernel_module.TritonSinkhornSteps(x, tau, n, config)
    return sinkhorn_log_scale(steps, n_iterations, None)


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """Every buffer the kernels fill starts as NaN, so that a missed write fails loudly."""
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(kernel_module, "_empty", empty)


def _check_against_eager_and_official(x, tau, n_iterations, n_valid_rows=None, **launch):
    """log u, center and Q of the Triton path against the eager path and the official formula
    (fp64, on the valid rows)."""
    n = x.shape[0] if n_valid_rows is None else n_valid_rows
    kw = dict(n_valid_rows=n_valid_rows)
    if launch:
        log_u = sinkhorn_knopp_log_scale_triton(x, tau, n_iterations, **kw, **launch)
    else:
        log_u = sinkhorn_knopp_log_scale(x, tau, n_iterations, **kw, backend="triton")
    eager = sinkhorn_knopp_log_scale(x, tau, n_iterations, **kw, backend="eager")
    assert log_u.dtype == torch.float32 and log_u.shape == (x.shape[1],)
    assert log_u.device == x.device
    assert rel_rms(log_u, eager) <= LOG_U_RTOL
    center = sinkhorn_knopp_center(x, tau, n_iterations, **kw, backend="triton")
    assert rel_rms(center, -tau * eager) <= LOG_U_RTOL
    q = sinkhorn_knopp_probs(x, tau, n_iterations, **kw, backend="triton")
    assert q.dtype == torch.float32 and q.shape == x.shape
    assert rel_rms(q, sinkhorn_knopp_probs(x, tau, n_iterations, **kw, backend="eager")) \
        <= PROB_RTOL
    ref = official_sinkhorn_knopp(x[:n].double().cpu(), tau, n_iterations)
    if torch.isfinite(ref).all():
        assert rel_rms(q[:n].cpu(), ref) <= PROB_RTOL
        # the center reproduces the teacher through the loss's softmax((x - c) / tau)
        assert rel_rms(torch.softmax((x[:n].float() - center) / tau, -1).cpu(), ref) <= PROB_RTOL
    return log_u, q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,K", SHAPES)
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_triton_equals_eager_and_the_official_formula(device, dtype, rows, K, n_iterations):
    x = logits(rows, K, dtype=dtype, scale=2.0, seed=rows * K).to(device)
    _, q = _check_against_eager_and_official(x, 0.04, n_iterations)
    torch.testing.assert_close(q.sum(-1), torch.ones(rows, device=device), rtol=0, atol=1e-5)


# launch overrides on (rows, K) = (45, 100): 7 column blocks of 16 (the last 4 wide), row groups
# of whole tiles with a short last group, row programs of 2 / 8 rows over 4 / 7 column blocks
LAUNCHES = [
    dict(column_block_k=16, column_block_rows=4, row_groups=3, row_block_k=32,
         row_block_rows=2),
    dict(column_block_k=64, column_block_rows=8, row_groups=4, row_block_k=16,
         row_block_rows=8),
    dict(column_block_k=128, column_block_rows=1, row_groups=45, row_block_k=128,
         row_block_rows=1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("launch", LAUNCHES, ids=["blocks16-groups3", "blocks64-groups4",
                                                  "one-row-tiles"])
def test_launch_overrides_give_the_same_scale(device, launch):
    x = logits(45, 100, scale=3.0, seed=5).to(device)
    _check_against_eager_and_official(x, 0.05, 3, **launch)
    _check_against_eager_and_official(x, 0.05, 2, n_valid_rows=30, **launch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_rows_take_no_part(device, dtype):
    # the iBOT buffer of masked patches: only the first n rows count; the rest (here huge
    # logits that would dominate every column) must not be read into the sums
    x = logits(19, 33, dtype=dtype, scale=2.0, seed=6).to(device)
    padded = torch.cat([x, torch.full((6, 33), 100.0, dtype=dtype, device=device)])
    log_u, q = _check_against_eager_and_official(padded, 0.04, 3, n_valid_rows=19)
    assert rel_rms(log_u, sinkhorn_knopp_log_scale(x, 0.04, backend="triton")) <= LOG_U_RTOL
    # the padding rows get the same softmax(a + log u), as on the eager path
    assert torch.isfinite(q).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [4.0, 8.0])
def test_finite_and_exact_where_the_official_fp32_formula_overflows(device, scale):
    x = logits(24, 50, scale=scale, seed=2).to(device)  # x / tau up to 100 / 200
    assert not torch.isfinite(official_sinkhorn_knopp(x.cpu(), 0.04)).all()
    _, q = _check_against_eager_and_official(x, 0.04, 3)
    assert torch.isfinite(q).all()
    assert rel_rms(q.cpu(), log_domain_sinkhorn_knopp(x.cpu(), 0.04)) <= PROB_RTOL


@pytest.mark.parametrize("device", DEVICES)
def test_a_prototype_far_below_every_other_keeps_its_share(device):
    # column 0 sits 110-130 below the others in every row: one global max shift would underflow
    # its exp to 0 (log u = inf); the per-column shift keeps its 1/K share
    x = logits(20, 9, seed=3)
    x[:, 0] = -5.0 + 0.1 * x[:, 0]
    x = x.to(device)
    assert torch.isnan(official_sinkhorn_knopp(x.cpu(), 0.04)).any()
    q = sinkhorn_knopp_probs(x, 0.04, backend="triton")
    assert torch.isfinite(q).all()
    assert rel_rms(q.cpu(), log_domain_sinkhorn_knopp(x.cpu(), 0.04)) <= PROB_RTOL
    assert q[:, 0].sum() > 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs_are_read_in_place(device, dtype):
    x = logits(21, 40, dtype=dtype, scale=2.0, seed=7).to(device)
    transposed = x.t().contiguous().t()                      # row stride 1, column stride 21
    wide = torch.zeros(21, 80, dtype=dtype, device=device)
    wide[:, ::2] = x                                         # column stride 2
    expected = sinkhorn_knopp_log_scale(x, 0.04, backend="eager")
    for view in (transposed, wide[:, ::2]):
        assert rel_rms(sinkhorn_knopp_log_scale(view, 0.04, backend="triton"), expected) \
            <= LOG_U_RTOL
        assert rel_rms(sinkhorn_knopp_probs(view, 0.04, backend="triton"),
                       sinkhorn_knopp_probs(x, 0.04, backend="eager")) <= PROB_RTOL


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x = logits(45, 100, scale=3.0, seed=8).to(device)
    launch = LAUNCHES[0]
    first = sinkhorn_knopp_log_scale_triton(x, 0.04, 3, **launch)
    assert torch.equal(sinkhorn_knopp_log_scale_triton(x, 0.04, 3, **launch), first)


class _NewTensors(TorchDispatchMode):
    """The element counts of every tensor an op creates (outputs sharing no input's storage:
    views and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.sizes += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                       and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts CPU ops under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_temporary_of_the_logits_size(dtype, monkeypatch):
    # on CPU every op is seen (the interpreter's too); the largest tensors the Triton path may
    # create are the per-group partials (2, groups, K) and the row normalisers
    rows, K = 96, 256
    x = logits(rows, K, dtype=dtype, seed=9)
    launch = dict(row_groups=3, column_block_rows=16)
    with monkeypatch.context() as m:
        m.setenv(cpu_kernels.ENV, "0")
        with _NewTensors() as eager:
            sinkhorn_knopp_log_scale(x, 0.04, backend="eager")
    assert max(eager.sizes) >= rows * K  # the check sees the eager ops' workspace
    if dtype == torch.float32 and cpu_kernels.status() == "compiled":
        with _NewTensors() as kernel:  # the CPU kernel reads x in place: K-sized partials
            sinkhorn_knopp_log_scale(x, 0.04, backend="eager")
        assert max(kernel.sizes) <= 2 * 2 * K
    with _NewTensors() as fused:
        sinkhorn_knopp_log_scale_triton(x, 0.04, 3, **launch)
    assert max(fused.sizes) <= 2 * 3 * K
    with _NewTensors() as fused_center:
        sinkhorn_knopp_center(x, 0.04, backend="triton")
    assert max(fused_center.sizes) < rows * K // 8
    with _NewTensors() as fused_probs:
        q = sinkhorn_knopp_probs(x, 0.04, backend="triton")
    # the probabilities are the one (rows, K) tensor
    assert sorted(fused_probs.sizes)[-1] == q.numel() and sorted(fused_probs.sizes)[-2] < \
        rows * K // 8


@pytest.mark.parametrize("n,K", [(1, 7), (128, 65536), (4900, 65536), (4900, 1025),
                                 (100_000, 262_144)])
def test_default_cuda_launch_keeps_partials_small_and_the_device_busy(monkeypatch, n, K):
    # the heuristics alone, for a 132-multiprocessor device (an H100 / H200)
    sms = 132
    monkeypatch.setattr(kernel_module, "_multiprocessors", lambda device: sms)
    c = kernel_module.launch_config(n, K, torch.device("cuda"))
    column_blocks = -(-K // c.column_block_k)
    # the column passes' partials are bounded by the programs, not by the rows
    assert c.row_groups * K <= kernel_module.COLUMN_PROGRAMS_PER_SM * sms * 256 + K
    assert column_blocks * c.row_groups >= min(kernel_module.COLUMN_PROGRAMS_PER_SM * sms,
                                               column_blocks * -(-n // c.column_block_rows))
    # the row pass: at least one program per multiprocessor when there are the rows for it
    assert -(-n // c.row_block_rows) >= min(n, kernel_module.ROW_PROGRAMS_PER_SM * sms)
    assert c.row_block_rows * c.row_block_k <= max(kernel_module.ROW_TILE, 16 * c.row_block_rows)
    assert c.column_block_rows * c.column_block_k <= 4096


# ------------------------------------------------------------------ the loss classes

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [DINOLoss, dinov3.DINOLoss], ids=["dinov2", "dinov3"])
def test_dino_classes_sinkhorn_teacher_on_the_fused_path(device, cls):
    x = logits(12, 40, scale=6.0, seed=10).to(device)  # x / tau up to 150: official fp32 NaN
    loss_fn = cls(40, backend="triton").to(device)
    q = loss_fn.sinkhorn_knopp_teacher(x, 0.04)
    assert loss_fn.last_sinkhorn_backend == "triton" and loss_fn.last_backend is None
    assert rel_rms(q.cpu(), official_sinkhorn_knopp(x.double().cpu(), 0.04)) <= PROB_RTOL
    assert rel_rms(loss_fn.sinkhorn_knopp_teacher(x, 0.04, n_iterations=1).cpu(),
                   official_sinkhorn_knopp(x.double().cpu(), 0.04, 1)) <= PROB_RTOL
    eager = cls(40, backend="eager").to(device)
    assert rel_rms(q, eager.sinkhorn_knopp_teacher(x, 0.04)) <= PROB_RTOL
    assert eager.last_sinkhorn_backend == "eager"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [iBOTPatchLoss, dinov3.iBOTPatchLoss], ids=["dinov2", "dinov3"])
def test_ibot_classes_sinkhorn_teacher_on_the_fused_path(device, cls):
    x = logits(23, 30, scale=2.0, seed=11).to(device)
    n_tensor = torch.tensor([23], device=device)
    loss_fn = cls(30, backend="triton").to(device)
    q = loss_fn.sinkhorn_knopp_teacher(x, 0.04, n_tensor)
    assert loss_fn.last_sinkhorn_backend == "triton"
    assert n_tensor.item() == 23  # no process group: left alone
    ref = official_sinkhorn_knopp(x.double().cpu(), 0.04, n_samples=23)
    assert rel_rms(q.cpu(), ref) <= PROB_RTOL


@pytest.mark.gpu
def test_auto_runs_the_fused_path_on_cuda_at_a_training_size():
    # the default launch (several row groups, 8-row row programs) on a DINOv2 iBOT-like size
    x = (torch.rand(4900, 8192, device="cuda") * 2 - 1).to(torch.bfloat16)
    assert select_sinkhorn_backend("auto", x) == "triton"
    loss_fn = iBOTPatchLoss(8192).cuda()
    loss_fn.sinkhorn_knopp_teacher(x[:64], 0.07, torch.tensor([64], device="cuda"))
    assert loss_fn.last_sinkhorn_backend == "triton"
    fused = sinkhorn_knopp_log_scale(x, 0.07)
    assert rel_rms(fused, sinkhorn_knopp_log_scale(x, 0.07, backend="eager")) <= LOG_U_RTOL
    q = sinkhorn_knopp_probs(x, 0.07)
    assert rel_rms(q[:64].double(), official_sinkhorn_knopp(x.double(), 0.07)[:64]) <= PROB_RTOL


# ------------------------------------------------------------- dispatch and bad input

def test_auto_is_eager_on_cpu_and_triton_needs_the_interpreter(monkeypatch):
    x = logits(4, 8)
    assert select_sinkhorn_backend("auto", x) == "eager"
    assert select_sinkhorn_backend("eager", x) == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sinkhorn_knopp_center(x, 0.04, backend="triton")
    loss_fn = iBOTPatchLoss(8, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        loss_fn.sinkhorn_knopp_teacher(x, 0.04, torch.tensor([4]))
    assert loss_fn.last_sinkhorn_backend is None


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("call,word,exc", [
    (lambda b: sinkhorn_knopp_log_scale(logits(4, 8), 0.04, 0, backend=b), "n_iterations",
     ValueError),
    (lambda b: sinkhorn_knopp_probs(logits(4, 8).long(), 0.04, backend=b), "teacher_output",
     TypeError),
    (lambda b: sinkhorn_knopp_center(logits(4, 8), 0.0, backend=b), "teacher_temp", ValueError),
    (lambda b: sinkhorn_knopp_center(logits(4, 8), 0.04, n_valid_rows=5, backend=b),
     "n_valid_rows", ValueError),
    (lambda b: sinkhorn_knopp_center(logits(4, 8)[None], 0.04, backend=b), "teacher_output",
     ValueError),
    (lambda b: sinkhorn_knopp_center(logits(4, 8), 0.04, backend=b + "x"), "backend",
     ValueError),
], ids=["n_iterations=0", "integer logits", "teacher_temp", "n_valid_rows", "3-D", "name"])
def test_bad_input_is_refused_naming_the_argument(backend, call, word, exc):
    with pytest.raises(exc, match=word):
        call(backend)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_ibot_zero_iterations_is_refused_before_anything_changes(backend):
    # the official loop runs 0 iterations and returns a global softmax (rows not normalised),
    # which no center expresses: refused, n_masked_patches_tensor untouched
    loss_fn = iBOTPatchLoss(8, backend=backend)
    n_tensor = torch.tensor([4])
    with pytest.raises(ValueError, match="n_iterations"):
        loss_fn.sinkhorn_knopp_teacher(logits(4, 8), 0.04, n_tensor, n_iterations=0)
    assert n_tensor.item() == 4 and loss_fn.last_sinkhorn_backend is None


@pytest.mark.parametrize("launch,word", [
    (dict(column_block_k=24), "column_block_k"),
    (dict(row_block_rows=0), "row_block_rows"),
    (dict(row_groups=0), "row_groups"),
    (dict(row_block_k=True), "row_block_k"),
])
def test_bad_launch_overrides_are_refused(launch, word):
    with pytest.raises(ValueError, match=word):
        sinkhorn_knopp_log_scale_triton(logits(4, 8), 0.04, **launch)


# ------------------------------------------------------------------------ 2 processes

def _gloo_worker(rank, world, port, x, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = x.shape[0] // world
        local = x[rank * n:(rank + 1) * n]
        calls, all_reduce = [], dist.all_reduce
        dist.all_reduce = lambda t, *a, **kw: calls.append((t.numel(), str(kw.get("op")))) or \
            all_reduce(t, *a, **kw)
        try:
            center = sinkhorn_knopp_center(local, 0.04, backend="triton")
        finally:
            dist.all_reduce = all_reduce
        q = DINOLoss(x.shape[1], backend="triton").sinkhorn_knopp_teacher(local, 0.04)
        torch.save((center, q, calls), f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="gloo on CPU tensors: the Triton path needs the interpreter there")
def test_two_processes_over_gloo_equal_one_on_the_concatenated_batch(tmp_path):
    world, K = 2, 37
    x = logits(2 * 7, K, scale=6.0, seed=12)  # x / tau up to 150; ranks with different maxima
    x[:7] += 1.0
    result = str(tmp_path / "out")
    # the workers inherit TRITON_INTERPRET=1 from this process (conftest.py)
    mp.spawn(_gloo_worker, args=(world, free_port(), x, result), nprocs=world, join=True)
    single_center = sinkhorn_knopp_center(x, 0.04, backend="eager")
    single_q = sinkhorn_knopp_probs(x, 0.04, backend="eager")
    max_op, sum_op = str(dist.ReduceOp.MAX), str(dist.ReduceOp.SUM)
    for rank in range(world):
        center, q, calls = torch.load(f"{result}.{rank}")
        assert calls == [(K, max_op)] + [(K, sum_op)] * 3  # as the eager path's
        torch.testing.assert_close(center, single_center, rtol=1e-5, atol=1e-5)
        assert rel_rms(q, single_q[rank * 7:(rank + 1) * 7]) <= PROB_RTOL


# ---------------------------------------------------------------- compiled kernels, without a GPU

_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dino_fast.kernels.sinkhorn as m

def compile(fn, sig, consts):
    # 16-aligned pointers and row strides, unit column strides (constexpr 1), as the launcher
    # specialises them at runtime for contiguous inputs
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
             if ty.startswith("*") or n in ("x_row", "K")}
    sig = dict(sig, **{n: "constexpr" for n in consts})
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": m.NUM_WARPS})
    assert kernel.asm["cubin"], fn.__name__

f32 = "*fp32"
for x in ("*fp32", "*bf16", "*fp16"):
    col = dict(X=x, x_row="i32", part_max=f32, part_sum=f32, n_rows="i32", K="i32",
               rows_per_group="i32", inv_tau="fp32")
    compile(m._column_lse_kernel, col, dict(x_col=1, BLOCK_R=m.COLUMN_BLOCK_ROWS,
                                            BLOCK_K=m.COLUMN_BLOCK_K))
    csum = dict(X=x, x_row="i32", LU=f32, row_lse=f32, part_sum=f32, n_rows="i32", K="i32",
                rows_per_group="i32", inv_tau="fp32")
    compile(m._column_sum_kernel, csum, dict(x_col=1, BLOCK_R=m.COLUMN_BLOCK_ROWS,
                                             BLOCK_K=m.COLUMN_BLOCK_K))
    row = dict(X=x, x_row="i32", LU=f32, row_lse=f32, Q=f32, n_rows="i32", K="i32",
               inv_tau="fp32")
    for rows in (1, m.ROW_MAX_BLOCK_ROWS):
        for probs in (False, True):
            compile(m._row_lse_kernel, row, dict(x_col=1, WRITE_PROBS=probs, BLOCK_R=rows,
                                                 BLOCK_K=m.ROW_TILE // rows))
compile(m._merge_column_lse_kernel, dict(part_max=f32, part_sum=f32, col_max=f32, col_sum=f32,
                                         n_groups="i32", K="i32"), dict(BLOCK=1024))
print("compiled")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the compiled kernels")
def test_sinkhorn_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs kernels the compiler may reject: compile each SK kernel for sm_90
    (Triton ships ptxas), without TRITON_INTERPRET, with the launcher's CUDA block sizes."""
    compile_for_hopper(_COMPILE_SCRIPT)
