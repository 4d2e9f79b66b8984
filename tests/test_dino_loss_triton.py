"""Fused Triton DINO loss (kernels/cross_entropy.py with DINO's pairs): both launch paths (rows:
one pass with the gradient written in the forward; split: K cut across programs) equal to the
eager path and to the literal official double loop (loss, gradient, center statistics) over
dtypes and awkward shapes, stable at large logits, deterministic, the same training trajectory
as the eager path, and the same errors for bad input, raised before any kernel runs.

Without CUDA the kernels run under the Triton interpreter on CPU ("cpu" parameters; conftest.py
sets TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels ("cuda" parameters,
`gpu` marker) and the CPU ones skip, since the interpreter is then off.
"""
import copy
import os
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compile_for_hopper, free_port

from dino_fast import DINOLoss, dino_loss
from dino_fast.backend import triton_available
from dino_fast.loss import check_loss_inputs, dino_loss_eager, dino_pair_weight, num_pairs

from reference import (
    FUSED_GRAD_RTOL,
    GRAD_RTOL,
    LOSS_RTOL,
    make_logits,
    official_dino_loss,
    rel_rms,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot be imported")

if triton_available():
    import dino_fast.kernels.cross_entropy as kernel_module
    from dino_fast.kernels.cross_entropy import soft_cross_entropy_triton

PATHS = ["rows", "split"]


def dino_loss_triton(student, teacher, center, ncrops, tau_s, tau_t, *, path="auto",
                     block_k=None, samples_per_program=None, **rows_launch):
    """The DINO loss on the fused kernels, a launch path forced: (loss, teacher row sum)."""
    B, _ = check_loss_inputs(student, teacher, center, ncrops, student_temp=tau_s,
                             teacher_temp=tau_t)
    if path == "rows":
        samples_per_program = None  # the rows path has no sample groups
    return soft_cross_entropy_triton(
        student, teacher, dino_pair_weight(ncrops), student_temp=tau_s, teacher_temp=tau_t,
        center=center, scale=1.0 / (num_pairs(ncrops) * B), teacher_sum=True, path=path,
        block_k=block_k, samples_per_program=samples_per_program, **rows_launch)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="with CUDA present the interpreter is off; the cuda "
        "parameters run these tests on the compiled kernels")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The teacher row sum is an fp32 sum of at most 2B inputs (exact for the bf16/fp16 inputs here,
# whose sums fit in fp32's 24 bits): only summation order separates it from an fp64 sum.
ROW_SUM_RTOL = 1e-6

# (batch, ncrops, out_dim, block_k, samples_per_program); None: the launcher's choice (on CPU one
# column block up to K = 1024 and one sample group; on CUDA one program per sample for small K).
SHAPES = [
    (1, 2, 7, None, None),     # B = 1, 2 crops only, K smaller than one block
    (3, 4, 33, 16, 2),         # K not a power of two: 3 column blocks, the last one 1 wide;
                               # 2 sample groups, the last one short
    (2, 12, 100, 32, 1),       # 2 + 10 crops, 4 blocks, one sample per program
    (4, 10, 1, None, None),    # K = 1 (the loss and its gradient are exactly 0)
    (5, 3, 257, 64, 3),        # K = 4 * 64 + 1
    (1, 12, 64, 16, None),     # B = 1, 2 + 10 crops, K a multiple of the block
    (2, 3, 1025, 256, 1),      # K = 4 * 256 + 1
    (1, 2, 262144, None, None),  # the largest K: 128 (rows) or 256 (split) column blocks
]


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """Every buffer the kernels fill starts as NaN, so that a missed write fails loudly."""
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(kernel_module, "_empty", empty)


def _oracle(student, teacher, center, ncrops, tau_s, tau_t, grad_scale):
    """Loss and gradient of the literal double loop, in fp64 on the same (rounded) inputs."""
    s = student.detach().double().requires_grad_()
    loss = official_dino_loss(s, teacher.double(), center.double(), ncrops, tau_s, tau_t)
    (loss * grad_scale).backward()
    return loss.detach(), s.grad


def _run(fn, student, teacher, center, ncrops, tau_s, tau_t, grad_scale, **kw):
    s = student.detach().clone().requires_grad_()
    loss, row_sum = fn(s, teacher, center, ncrops, tau_s, tau_t, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), s.grad, row_sum


def _check_triton_eager_oracle(student, teacher, center, ncrops, tau_s=0.1, tau_t=0.04,
                               grad_scale=2.5, **config):
    dtype = student.dtype
    ref_loss, ref_grad = _oracle(student, teacher, center, ncrops, tau_s, tau_t, grad_scale)
    ref_sum = teacher.detach().double().sum(0)
    loss, grad, row_sum = _run(dino_loss_triton, student, teacher, center, ncrops, tau_s, tau_t,
                               grad_scale, **config)
    e_loss, e_grad, e_sum = _run(dino_loss_eager, student, teacher, center, ncrops, tau_s, tau_t,
                                 grad_scale)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == student.shape
    assert row_sum.dtype == torch.float32 and row_sum.shape == (student.shape[1],)
    loss_tol = LOSS_RTOL[torch.float32 if dtype == torch.float64 else dtype]
    grad_tol = FUSED_GRAD_RTOL[torch.float32 if dtype == torch.float64 else dtype]
    assert rel_rms(loss, ref_loss) <= loss_tol, (loss.item(), ref_loss.item())
    assert rel_rms(grad, ref_grad) <= grad_tol
    assert rel_rms(row_sum, ref_sum) <= ROW_SUM_RTOL
    # and the eager path, checked against the same oracle in test_loss.py, agrees
    assert rel_rms(loss, e_loss) <= loss_tol
    assert rel_rms(grad.double(), e_grad.double()) <= grad_tol
    assert rel_rms(row_sum, e_sum) <= ROW_SUM_RTOL
    return loss, grad, row_sum


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch,ncrops,out_dim,block_k,spp", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_eager_and_official_double_loop(device, path, batch, ncrops, out_dim,
                                                       block_k, spp, dtype):
    student, teacher, center = make_logits(batch, ncrops, out_dim, dtype, device=device)
    _check_triton_eager_oracle(student, teacher, center, ncrops, path=path, block_k=block_k,
                               samples_per_program=spp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_is_stable_for_teacher_logits_near_50_after_centering(device, path, dtype):
    # teacher logits in [-2, 2] at tau_t = 0.04: (T - c) / tau_t reaches +-50
    student, teacher, center = make_logits(4, 6, 129, dtype, teacher_scale=2.0, device=device)
    _check_triton_eager_oracle(student, teacher, center, 6, path=path, block_k=32,
                               samples_per_program=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_triton_is_stable_where_a_bare_exp_overflows(device, path):
    # (T - c) / tau_t and S / tau_s reach +-200 (exp(89) already overflows fp32); the block
    # maxima differ widely, so the combine step's rescaling is exercised too
    student, teacher, center = make_logits(3, 4, 129, teacher_scale=8.0, device=device)
    student = student * 20
    loss, grad, _ = _check_triton_eager_oracle(student, teacher, center, 4, path=path,
                                               block_k=16, samples_per_program=2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_scale", [1.0, -3.0, 0.0])
def test_triton_gradient_scales_with_grad_output(device, path, dtype, grad_scale):
    student, teacher, center = make_logits(2, 5, 40, dtype, device=device)
    _, grad, _ = _check_triton_eager_oracle(student, teacher, center, 5, tau_s=0.2, tau_t=0.07,
                                            grad_scale=grad_scale, path=path, block_k=16)
    if grad_scale == 0.0:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_fp16_student_under_a_loss_scale_keeps_its_small_gradient(device, path):
    # a loss scaler's 65536: the unscaled gradient (~1e-7) is below fp16's normal range, so it
    # must be formed already scaled
    student, teacher, center = make_logits(2, 6, 300, torch.float16, device=device)
    _, grad, _ = _check_triton_eager_oracle(student, teacher, center, 6, grad_scale=65536.0,
                                            path=path, block_k=64)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("programs,teacher_groups", [(7, 3), (4, 1), (15, 6), (40, 2)])
def test_rows_path_with_persistent_programs_and_teacher_row_groups(device, programs,
                                                                   teacher_groups):
    # 15 student rows over 7 programs (3 rows each, the last program idle on its last turn),
    # 4 (a remainder of 3), 15 (one each) and 40 (most programs idle); the 6 teacher rows in
    # 3 groups of 2, one group, 6 groups of 1, 2 groups of 3
    student, teacher, center = make_logits(3, 5, 70, device=device)
    _check_triton_eager_oracle(student, teacher, center, 5, path="rows", block_k=32,
                               programs=programs, teacher_groups=teacher_groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_path_writes_the_gradient_in_the_forward(device, dtype):
    # S's storage is changed after the forward without bumping its version: a gradient
    # recomputed in the backward would see the change, one written in the forward does not
    student, teacher, center = make_logits(3, 4, 70, dtype, device=device)
    _, ref_grad = _oracle(student, teacher, center, 4, 0.1, 0.04, 1.0)
    s = student.detach().clone().requires_grad_()
    loss, _ = dino_loss_triton(s, teacher, center, 4, 0.1, 0.04, path="rows", block_k=16)
    s.data.mul_(3.0)
    loss.backward()
    assert rel_rms(s.grad, ref_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_retained_graph_gives_the_same_gradient_twice(device, path, dtype):
    student, teacher, center = make_logits(2, 4, 65, dtype, device=device)
    s = student.detach().clone().requires_grad_()
    x = s * 1.0  # a non-leaf student output, as the head's in training
    loss, _ = dino_loss_triton(x, teacher, center, 4, 0.1, 0.04, path=path, block_k=16)
    (g1,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x)
    _, ref_grad = _oracle(student, teacher, center, 4, 0.1, 0.04, 2.0)
    assert rel_rms(g1, ref_grad) <= GRAD_RTOL[dtype]
    assert rel_rms(g2, ref_grad) <= GRAD_RTOL[dtype]
    assert rel_rms(g3 * 2.0, ref_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_without_gradient_gives_the_same_loss_and_builds_no_gradient(device,
                                                                           monkeypatch):
    student, teacher, center = make_logits(3, 4, 50, device=device)
    s = student.clone().requires_grad_()
    with_grad, _ = dino_loss_triton(s, teacher, center, 4, 0.1, 0.04, path="rows")
    shapes, empty = [], kernel_module._empty

    def spy(shape, dtype, device):
        shapes.append(tuple(shape))
        return empty(shape, dtype, device)

    monkeypatch.setattr(kernel_module, "_empty", spy)
    with torch.no_grad():
        plain, _ = dino_loss_triton(s, teacher, center, 4, 0.1, 0.04, path="rows")
    assert plain.grad_fn is None and torch.equal(plain, with_grad.detach())
    assert tuple(s.shape) not in shapes
    dino_loss_triton(s, teacher, center, 4, 0.1, 0.04, path="rows")
    assert tuple(s.shape) in shapes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_reads_non_contiguous_inputs(device, path, dtype):
    B, V, K = 3, 4, 50
    student, teacher, center = make_logits(B, V, K, dtype, device=device)
    # student: every other column of a wider tensor (column stride 2); teacher: a transpose
    # (row stride 1, column stride 2B); center: a strided row
    wide = torch.zeros(V * B, 2 * K, dtype=dtype, device=device)
    wide[:, ::2] = student
    teacher_t = teacher.t().contiguous().t()
    center_wide = torch.zeros(1, 3 * K, device=device)
    center_wide[:, ::3] = center
    s, t, c = wide[:, ::2], teacher_t, center_wide[:, ::3]
    assert not (s.is_contiguous() or t.is_contiguous() or c.is_contiguous())
    _check_triton_eager_oracle(s, t, c, V, path=path, block_k=16, samples_per_program=2)
    # rows padded to a longer pitch (row stride > K), column stride 1
    padded = torch.zeros(V * B, K + 7, dtype=dtype, device=device)
    padded[:, :K] = student
    _check_triton_eager_oracle(padded[:, :K], teacher, center, V, path=path, block_k=16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                         (torch.float32, torch.float16)])
def test_triton_takes_student_and_teacher_of_different_dtypes(device, student_dtype,
                                                               teacher_dtype):
    student, teacher, center = make_logits(3, 4, 40, student_dtype, device=device)
    teacher = make_logits(3, 4, 40, teacher_dtype, device=device)[1]
    _check_triton_eager_oracle(student, teacher, center, 4, block_k=16)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_fp64_inputs_are_computed_in_fp32(device):
    student, teacher, center = make_logits(2, 4, 30, torch.float64, device=device)
    loss, grad, _ = _check_triton_eager_oracle(student, teacher, center, 4, block_k=16)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_triton_center_statistics_loss_and_gradient_are_bit_identical_across_runs(device, path):
    student, teacher, center = make_logits(5, 4, 300, device=device)
    # split: 5 column blocks x 3 sample groups
    config = dict(path=path, block_k=64, samples_per_program=2)
    first = _run(dino_loss_triton, student, teacher, center, 4, 0.1, 0.04, 1.0, **config)
    second = _run(dino_loss_triton, student, teacher, center, 4, 0.1, 0.04, 1.0, **config)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_eager_loss_stays_fp32_accurate_over_millions_of_terms():
    # the reference of the tests above, at the benchmark's B * K = 2M terms per crop: summed
    # through torch.dot (MKL's fp32 dot on this machine) the eager loss was 4.5e-5 off
    student, teacher, center = make_logits(32, 2, 65536)
    loss, _ = dino_loss_eager(student, teacher, center, 2, 0.1, 0.04)
    ref = official_dino_loss(student.double(), teacher.double(), center.double(), 2, 0.1, 0.04)
    assert rel_rms(loss, ref) <= LOSS_RTOL[torch.float32]


# ---------------------------------------------------------------- the module on the fused path

@pytest.mark.parametrize("device", DEVICES)
def test_dino_loss_module_runs_triton_with_the_center_from_before_its_update(device):
    B, V, K = 3, 4, 37
    student, teacher, center = make_logits(B, V, K, device=device)
    mods = {}
    for backend in ("triton", "eager"):
        mod = DINOLoss(K, V, 0.04, 0.07, 3, 10, backend=backend).to(device)
        mod.center.copy_(center)
        s = student.clone().requires_grad_()
        loss = mod(s, teacher, 1)
        (loss * 2.5).backward()  # after the center's in-place update
        mods[backend] = (mod, loss.detach(), s.grad)
    ref_loss, ref_grad = _oracle(student, teacher, center, V, 0.1,
                                 float(mods["triton"][0].teacher_temp_schedule[1]), 2.5)
    mod, loss, grad = mods["triton"]
    assert mod.last_backend == "triton" and mods["eager"][0].last_backend == "eager"
    assert rel_rms(loss, ref_loss) <= LOSS_RTOL[torch.float32]
    assert rel_rms(grad, ref_grad) <= GRAD_RTOL[torch.float32]
    assert not torch.equal(mod.center, center)
    torch.testing.assert_close(mod.center, mods["eager"][0].center, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_dino_loss_dispatches_to_the_named_backend(device):
    student, teacher, center = make_logits(2, 3, 20, device=device)
    fused = dino_loss(student, teacher, center, 3, 0.1, 0.04, backend="triton")
    plain = dino_loss(student, teacher, center, 3, 0.1, 0.04, backend="eager")
    assert rel_rms(fused[0], plain[0]) <= LOSS_RTOL[torch.float32]
    assert rel_rms(fused[1], plain[1]) <= ROW_SUM_RTOL


class _TinyDINO(torch.nn.Module):
    """A linear 'backbone + head' whose crops are noisy copies of the inputs."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.head = torch.nn.Linear(in_dim, out_dim)

    def forward(self, crops):
        return self.head(torch.cat(crops))


@pytest.mark.parametrize("device", DEVICES)
def test_eager_and_triton_give_the_same_training_trajectory(device):
    B, V, D, K, steps = 4, 4, 8, 48, 4
    torch.manual_seed(0)
    init = _TinyDINO(D, K).to(device)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(B, D, generator=g) for _ in range(steps)]
    noise = [[torch.randn(B, D, generator=g) * 0.1 for _ in range(V)] for _ in range(steps)]
    runs = {}
    for backend in ("eager", "triton"):
        student, teacher = copy.deepcopy(init), copy.deepcopy(init).requires_grad_(False)
        loss_mod = DINOLoss(K, V, 0.04, 0.07, 2, steps, center_momentum=0.5,
                            backend=backend).to(device)
        opt = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
        history = []
        for step in range(steps):
            crops = [(batches[step] + n).to(device) for n in noise[step]]
            loss = loss_mod(student(crops), teacher(crops[:2]), step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # teacher EMA
                for pt, ps in zip(teacher.parameters(), student.parameters()):
                    pt.lerp_(ps, 0.1)
            history.append((loss.detach().clone(), loss_mod.center.clone(),
                            [p.detach().clone() for p in student.parameters()]))
        assert loss_mod.last_backend == backend
        runs[backend] = history
    for (le, ce, pe), (lt, ct, pt) in zip(runs["eager"], runs["triton"]):
        assert rel_rms(lt, le) <= 1e-5
        assert rel_rms(ct, ce) <= 1e-5
        for a, b in zip(pt, pe):
            assert rel_rms(a, b) <= 1e-5
    # the parameters did move: the comparison is not between two untouched models
    assert rel_rms(runs["eager"][-1][2][0], init.head.weight.detach()) > 1e-3


def _triton_center_worker(rank, world, port, student, teacher, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ncrops, B, K = 4, teacher.shape[0] // 2 // world, teacher.shape[1]
        # each rank holds its own slice of every crop (crop-major within the rank)
        s_local = student.view(ncrops, world, B, K)[:, rank].reshape(ncrops * B, K)
        t_local = teacher.view(2, world, B, K)[:, rank].reshape(2 * B, K)
        loss_mod = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, backend="triton", async_center=True)
        losses = [loss_mod(s_local, t_local, epoch).item() for epoch in (0, 1)]
        assert loss_mod.last_backend == "triton"
        loss_mod.synchronize_center()
        torch.save((loss_mod.center, losses), f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="gloo on CPU tensors: the Triton path needs the interpreter there")
def test_two_process_async_center_on_the_triton_path_equals_one_process(tmp_path):
    world, ncrops, B, K = 2, 4, 2, 20
    student, teacher = torch.randn(ncrops * world * B, K), torch.randn(2 * world * B, K)
    result = str(tmp_path / "center")
    # the workers inherit TRITON_INTERPRET=1 from this process (conftest.py)
    mp.spawn(_triton_center_worker, args=(world, free_port(), student, teacher, result),
             nprocs=world, join=True)
    single = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, backend="eager")
    single(student, teacher, 0)
    single(student, teacher, 1)
    for rank in range(world):
        center, losses = torch.load(f"{result}.{rank}")
        torch.testing.assert_close(center, single.center, rtol=1e-6, atol=1e-7)
        assert all(torch.isfinite(torch.tensor(losses)))


# ---------------------------------------------------------------- bad input

def _bad_module_cases():
    ok_s, ok_t = torch.randn(8, 16), torch.randn(4, 16)  # ncrops = 4, B = 2
    return [
        ("rows", lambda: (torch.randn(9, 16), ok_t, 0)),
        ("teacher rows", lambda: (ok_s, torch.randn(6, 16), 0)),
        ("out_dim", lambda: (torch.randn(8, 15), torch.randn(4, 15), 0)),
        ("teacher out_dim", lambda: (ok_s, torch.randn(4, 15), 0)),
        ("epoch range", lambda: (ok_s, ok_t, 10)),
        ("epoch type", lambda: (ok_s, ok_t, 1.5)),
        ("integer student", lambda: (ok_s.long(), ok_t, 0)),
        ("integer teacher", lambda: (ok_s, ok_t.int(), 0)),
        ("3-D student", lambda: (ok_s.view(8, 4, 4), ok_t, 0)),
        ("numpy student", lambda: (ok_s.numpy(), ok_t, 0)),
        ("teacher on meta", lambda: (ok_s, ok_t.to("meta"), 0)),
        ("center elsewhere", lambda: (ok_s.to("meta"), ok_t.to("meta"), 0)),
    ]


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.fixture
def no_kernel_may_run(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")
    for name in ("_launch_rows", "_teacher_pass", "_split_forward"):
        monkeypatch.setattr(kernel_module, name, fail)


@pytest.mark.parametrize("name,make", _bad_module_cases(), ids=[c[0] for c in _bad_module_cases()])
def test_bad_module_input_raises_the_eager_error_before_any_kernel(name, make, no_kernel_may_run):
    errors = {}
    for backend in ("eager", "triton"):
        mod = DINOLoss(16, 4, 0.04, 0.07, 3, 10, backend=backend)
        mod.center.copy_(torch.arange(16.0).view(1, 16))
        errors[backend] = _raised(lambda mod=mod: mod(*make()))
        assert torch.equal(mod.center, torch.arange(16.0).view(1, 16))
        assert mod.last_backend is None
    assert errors["triton"] == errors["eager"]


def _bad_functional_cases():
    s, t, c = torch.randn(8, 16), torch.randn(4, 16), torch.zeros(1, 16)
    return [
        ("ncrops 1", lambda: (torch.randn(4, 16), t, c, 1, 0.1, 0.04)),
        ("ncrops 0", lambda: (s, t, c, 0, 0.1, 0.04)),
        ("ncrops float", lambda: (s, t, c, 4.0, 0.1, 0.04)),
        ("student_temp 0", lambda: (s, t, c, 4, 0.0, 0.04)),
        ("teacher_temp nan", lambda: (s, t, c, 4, 0.1, float("nan"))),
        ("teacher_temp negative", lambda: (s, t, c, 4, 0.1, -0.04)),
        ("center shape", lambda: (s, t, torch.zeros(16), 4, 0.1, 0.04)),
        ("center out_dim", lambda: (s, t, torch.zeros(1, 15), 4, 0.1, 0.04)),
        ("rows", lambda: (torch.randn(9, 16), t, c, 4, 0.1, 0.04)),
        ("teacher rows", lambda: (s, torch.randn(2, 16), c, 4, 0.1, 0.04)),
        ("integer student", lambda: (s.int(), t, c, 4, 0.1, 0.04)),
        ("empty student", lambda: (torch.randn(0, 16), torch.randn(0, 16), c, 4, 0.1, 0.04)),
    ]


@pytest.mark.parametrize("name,make", _bad_functional_cases(),
                         ids=[c[0] for c in _bad_functional_cases()])
def test_bad_functional_input_raises_the_eager_error_before_any_kernel(name, make,
                                                                      no_kernel_may_run):
    eager = _raised(lambda: dino_loss_eager(*make()))
    assert _raised(lambda: dino_loss_triton(*make())) == eager
    assert _raised(lambda: dino_loss(*make(), backend="triton")) == eager


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch, no_kernel_may_run):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    student, teacher, center = make_logits(2, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dino_loss_triton(student, teacher, center, 4, 0.1, 0.04)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw,match", [(dict(block_k=24), "block_k"), (dict(block_k=8), "block_k"),
                                      (dict(samples_per_program=0, path="split"),
                                       "samples_per_program"),
                                      (dict(path="columns"), "path"),
                                      (dict(path="rows", programs=0), "programs"),
                                      (dict(path="rows", teacher_groups=1.5), "teacher_groups")])
def test_bad_launch_override_is_refused(device, kw, match, no_kernel_may_run):
    student, teacher, center = make_logits(2, 4, 16, device=device)
    with pytest.raises(ValueError, match=match):
        dino_loss_triton(student, teacher, center, 4, 0.1, 0.04, **kw)


# ---------------------------------------------------------------- compiled kernels, without a GPU

_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import dino_fast.kernels.cross_entropy as m

    def compile(fn, sig, consts, num_warps=4):
        # 16-aligned pointers and row strides, and unit column strides (constexpr 1), as the
        # launcher specialises them at runtime for contiguous inputs
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
                 if ty.startswith("*") or n in ("s_row", "t_row", "K")}
        sig = dict(sig, **{n: "constexpr" for n in consts})
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps})
        assert kernel.asm["cubin"], fn.__name__

    f32 = "*fp32"
    drop = lambda sig, consts: {n: t for n, t in sig.items() if n not in consts}  # noqa: E731
    unit = dict(s_col=1, t_col=1)
    rows = dict(s_row="i32", s_col="i32", t_row="i32", t_col="i32", C=f32, t_lse=f32, PW=f32,
                RW=f32, row_stats=f32, grad_output=f32, B="i32", V="i32", K="i32",
                n_programs="i32", rows_per_program="i32", inv_tau_s="fp32", inv_tau_t="fp32",
                grad_norm="fp32")
    for x in ("*fp32", "*bf16", "*fp16", "*fp64"):
        for flags in (dict(G=2, PROBS=False, HAS_CENTER=True, HAS_RW=False, FORWARD=True,
                           WRITE_GRAD=True),
                      dict(G=1, PROBS=True, HAS_CENTER=False, HAS_RW=True, FORWARD=True,
                           WRITE_GRAD=False),
                      dict(G=2, PROBS=False, HAS_CENTER=True, HAS_RW=True, FORWARD=False,
                           WRITE_GRAD=True)):
            consts = dict(unit, BLOCK_K=2048, **flags)
            compile(m._rows_kernel, dict(drop(rows, consts), S=x, T=x, dS=x), consts, 8)
        teacher = dict(t_row="i32", t_col="i32", C=f32, part_max=f32, part_sum=f32, colsum=f32,
                       n_rows="i32", K="i32", NCH="i32", rows_per_program="i32",
                       inv_tau_t="fp32")
        consts = dict(t_col=1, HAS_CENTER=True, WANT_LSE=True, WANT_SUM=True, BLOCK_K=1024)
        compile(m._teacher_kernel, dict(drop(teacher, consts), T=x), consts)
        compile(m._scale_kernel, dict(X=x, grad_output=f32, n="i32"), dict(BLOCK=4096))
        fwd = dict(s_row="i32", s_col="i32", t_row="i32", t_col="i32", C=f32, part_tmax=f32,
                   part_tsum=f32, part_smax=f32, part_ssum=f32, part_dot0=f32, part_dot1=f32,
                   colsum=f32, B="i32", V="i32", K="i32", NCH="i32",
                   samples_per_program="i32", inv_tau_s="fp32", inv_tau_t="fp32")
        bwd = dict(s_row="i32", s_col="i32", t_row="i32", t_col="i32", C=f32, lse_s=f32,
                   t_lse=f32, grad_output=f32, B="i32", V="i32", K="i32",
                   samples_per_program="i32", inv_tau_s="fp32", inv_tau_t="fp32",
                   grad_norm="fp32")
        consts = dict(unit, BLOCK_K=1024)
        compile(m._split_fwd_kernel, dict(drop(fwd, consts), S=x, T=x), consts)
        compile(m._split_bwd_kernel, dict(drop(bwd, consts), S=x, T=x, dS=x), consts)
    ones = dict(B=1, K=1, samples_per_program=1, BLOCK_K=16)
    compile(m._split_fwd_kernel, dict(drop(fwd, dict(ones, NCH=1)), S=f32, T=f32),
            dict(ones, NCH=1))
    compile(m._split_bwd_kernel, dict(drop(bwd, ones), S=f32, T=f32, dS=f32), ones)
    comb = dict(part_tmax=f32, part_tsum=f32, part_smax=f32, part_ssum=f32, part_dot0=f32,
                part_dot1=f32, lse_s=f32, t_lse=f32, loss_per_sample=f32, B="i32", V="i32",
                NCH="i32", inv_tau_s="fp32", loss_norm="fp32")
    compile(m._combine_kernel, comb, dict(BLOCK_C=64))
    compile(m._combine_kernel, drop(comb, ("B", "NCH")), dict(B=1, NCH=1, BLOCK_C=16))
    compile(m._colsum_kernel, dict(colsum=f32, out=f32, n_groups="i32", K="i32"),
            dict(BLOCK=1024))
    compile(m._lse_kernel, dict(part_max=f32, part_sum=f32, lse=f32, NCH="i32"),
            dict(BLOCK_C=64))
    print("compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the compiled kernels")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs kernels the compiler may reject: compile each one for sm_90 (Triton
    ships ptxas), in a process without TRITON_INTERPRET, with the launcher's specialisations."""
    compile_for_hopper(_COMPILE_SCRIPT)


# ---------------------------------------------------------------- CUDA only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,ncrops,out_dim", [(2, 4, 262144), (64, 12, 65536), (8, 10, 3001)])
def test_triton_matches_official_at_full_size_on_cuda(batch, ncrops, out_dim, dtype):
    student, teacher, center = make_logits(batch, ncrops, out_dim, dtype, device="cuda")
    _check_triton_eager_oracle(student, teacher, center, ncrops)


@pytest.mark.gpu
def test_triton_peak_memory_is_one_gradient_plus_small_buffers_on_cuda():
    B, V, K = 64, 12, 65536
    student, teacher, center = make_logits(B, V, K, device="cuda")
    student.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = dino_loss_triton(student, teacher, center, V, 0.1, 0.04, path="rows")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = student.numel() * student.element_size()
    # beyond dS, fp32 buffers: the teacher's 2 statistics per row and column block and its
    # column sums per row group, the row sum, the center copy and 3 statistics per student row
    nch = -(-K // kernel_module.TEACHER_BLOCK_K)
    buffers = 4 * (2 * 2 * B * nch + (2 * B + 2) * K + 3 * V * B + 2 * B)
    assert buffers <= 0.03 * grad_bytes
    assert extra <= grad_bytes + buffers + 2**20, (extra, grad_bytes, buffers)


@pytest.mark.gpu
def test_auto_backend_sends_fp64_to_the_eager_path_on_cuda():
    student, teacher, _ = make_logits(2, 4, 16, torch.float64, device="cuda")
    mod = DINOLoss(16, 4, 0.04, 0.07, 3, 10).cuda()
    assert mod(student, teacher, 0).dtype == torch.float64
    assert mod.last_backend == "eager"
    mod(student.float(), teacher.float(), 0)
    assert mod.last_backend == "triton"
