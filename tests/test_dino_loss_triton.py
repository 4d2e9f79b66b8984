"""Fused Triton DINO loss (kernels/dino_loss.py): equal to the eager path and to the literal
official double loop (loss, gradient, center statistics) over dtypes and awkward shapes, stable
at large logits, deterministic, the same training trajectory as the eager path, and the same
errors for bad input, raised before any kernel runs.

Without CUDA the kernels run under the Triton interpreter on CPU ("cpu" parameters; conftest.py
sets TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels ("cuda" parameters,
`gpu` marker) and the CPU ones skip, since the interpreter is then off.
"""
import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast import DINOLoss, dino_loss
from dino_fast.backend import triton_available
from dino_fast.loss import dino_loss_eager
from reference import GRAD_RTOL, LOSS_RTOL, make_logits, official_dino_loss, rel_rms

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot be imported")

if triton_available():
    import dino_fast.kernels.dino_loss as kernel_module
    from dino_fast.kernels.dino_loss import dino_loss_triton

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
    (1, 2, 262144, None, None),  # the largest K: 256 column blocks of 1024
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
    grad_tol = GRAD_RTOL[torch.float32 if dtype == torch.float64 else dtype]
    assert rel_rms(loss, ref_loss) <= loss_tol, (loss.item(), ref_loss.item())
    assert rel_rms(grad, ref_grad) <= grad_tol
    assert rel_rms(row_sum, ref_sum) <= ROW_SUM_RTOL
    # and the eager path, checked against the same oracle in test_loss.py, agrees
    assert rel_rms(loss, e_loss) <= loss_tol
    assert rel_rms(grad.double(), e_grad.double()) <= grad_tol
    assert rel_rms(row_sum, e_sum) <= ROW_SUM_RTOL
    return loss, grad, row_sum


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,ncrops,out_dim,block_k,spp", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_eager_and_official_double_loop(device, batch, ncrops, out_dim, block_k,
                                                       spp, dtype):
    student, teacher, center = make_logits(batch, ncrops, out_dim, dtype, device=device)
    _check_triton_eager_oracle(student, teacher, center, ncrops, block_k=block_k,
                               samples_per_program=spp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_is_stable_for_teacher_logits_near_50_after_centering(device, dtype):
    # teacher logits in [-2, 2] at tau_t = 0.04: (T - c) / tau_t reaches +-50
    student, teacher, center = make_logits(4, 6, 129, dtype, teacher_scale=2.0, device=device)
    _check_triton_eager_oracle(student, teacher, center, 6, block_k=32, samples_per_program=3)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_is_stable_where_a_bare_exp_overflows(device):
    # (T - c) / tau_t and S / tau_s reach +-200 (exp(89) already overflows fp32); the block
    # maxima differ widely, so the combine step's rescaling is exercised too
    student, teacher, center = make_logits(3, 4, 129, teacher_scale=8.0, device=device)
    student = student * 20
    loss, grad, _ = _check_triton_eager_oracle(student, teacher, center, 4, block_k=16,
                                               samples_per_program=2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_scale", [1.0, -3.0, 0.0])
def test_triton_gradient_scales_with_grad_output(device, grad_scale):
    student, teacher, center = make_logits(2, 5, 40, device=device)
    _, grad, _ = _check_triton_eager_oracle(student, teacher, center, 5, tau_s=0.2, tau_t=0.07,
                                            grad_scale=grad_scale, block_k=16)
    if grad_scale == 0.0:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_reads_non_contiguous_inputs(device, dtype):
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
    _check_triton_eager_oracle(s, t, c, V, block_k=16, samples_per_program=2)
    # rows padded to a longer pitch (row stride > K), column stride 1
    padded = torch.zeros(V * B, K + 7, dtype=dtype, device=device)
    padded[:, :K] = student
    _check_triton_eager_oracle(padded[:, :K], teacher, center, V, block_k=16)


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
def test_triton_center_statistics_loss_and_gradient_are_bit_identical_across_runs(device):
    student, teacher, center = make_logits(5, 4, 300, device=device)
    config = dict(block_k=64, samples_per_program=2)  # 5 column blocks x 3 sample groups
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


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    mp.spawn(_triton_center_worker, args=(world, _free_port(), student, teacher, result),
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
    monkeypatch.setattr(kernel_module, "_forward", fail)
    monkeypatch.setattr(kernel_module, "_backward", fail)


@pytest.mark.parametrize("name,make", _bad_module_cases(), ids=[c[0] for c in _bad_module_cases()])
def test_bad_module_input_raises_the_eager_error_before_any_kernel(name, make, no_kernel_may_run):
    errors, centers = {}, {}
    for backend in ("eager", "triton"):
        mod = DINOLoss(16, 4, 0.04, 0.07, 3, 10, backend=backend)
        mod.center.copy_(torch.arange(16.0).view(1, 16))
        errors[backend] = _raised(lambda: mod(*make()))
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
                                      (dict(samples_per_program=0), "samples_per_program")])
def test_bad_launch_override_is_refused(device, kw, match, no_kernel_may_run):
    student, teacher, center = make_logits(2, 4, 16, device=device)
    with pytest.raises(ValueError, match=match):
        dino_loss_triton(student, teacher, center, 4, 0.1, 0.04, **kw)


# ---------------------------------------------------------------- compiled kernels, without a GPU

_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import dino_fast.kernels.dino_loss as m

    def compile(fn, sig, consts):
        # 16-aligned pointers and row strides, and unit column strides (constexpr 1), as the
        # launcher specialises them at runtime for contiguous inputs
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
                 if ty.startswith("*") or n in ("s_row", "t_row", "K")}
        sig = dict(sig, **{n: "constexpr" for n in consts})
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert kernel.asm["cubin"], fn.__name__

    f32 = "*fp32"
    fwd = dict(s_row="i32", s_col="i32", t_row="i32", t_col="i32", C=f32, part_tmax=f32,
               part_tsum=f32, part_smax=f32, part_ssum=f32, part_dot0=f32, part_dot1=f32,
               colsum=f32, B="i32", V="i32", K="i32", NCH="i32", samples_per_program="i32",
               inv_tau_s="fp32", inv_tau_t="fp32")
    bwd = dict(s_row="i32", s_col="i32", t_row="i32", t_col="i32", C=f32, lse_s=f32, t_lse=f32,
               grad_loss=f32, B="i32", V="i32", K="i32", samples_per_program="i32",
               inv_tau_s="fp32", inv_tau_t="fp32", grad_norm="fp32")
    drop = lambda sig, consts: {n: t for n, t in sig.items() if n not in consts}  # noqa: E731
    # contiguous logits (unit column strides), and B = K = 1 with strided logits
    unit = dict(s_col=1, t_col=1, BLOCK_K=1024)
    ones = dict(B=1, K=1, samples_per_program=1, BLOCK_K=16)
    for x in ("*fp32", "*bf16", "*fp16", "*fp64"):
        compile(m._fwd_kernel, dict(drop(fwd, unit), S=x, T=x), unit)
        compile(m._bwd_kernel, dict(drop(bwd, unit), S=x, T=x, dS=x), unit)
    compile(m._fwd_kernel, dict(drop(fwd, dict(ones, NCH=1)), S=f32, T=f32), dict(ones, NCH=1))
    compile(m._bwd_kernel, dict(drop(bwd, ones), S=f32, T=f32, dS=f32), ones)
    comb = dict(part_tmax=f32, part_tsum=f32, part_smax=f32, part_ssum=f32, part_dot0=f32,
                part_dot1=f32, lse_s=f32, t_lse=f32, loss_per_sample=f32, B="i32", V="i32",
                NCH="i32", inv_tau_s="fp32", loss_norm="fp32")
    compile(m._combine_kernel, comb, dict(BLOCK_C=64))
    compile(m._combine_kernel, drop(comb, ("B", "NCH")), dict(B=1, NCH=1, BLOCK_C=16))
    compile(m._colsum_kernel, dict(colsum=f32, out=f32, n_groups="i32", K="i32"),
            dict(BLOCK=1024))
    print("compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the compiled kernels")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs kernels the compiler may reject: compile each one for sm_90 (Triton
    ships ptxas), in a process without TRITON_INTERPRET, with the launcher's specialisations."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


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
    loss, _ = dino_loss_triton(student, teacher, center, V, 0.1, 0.04)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = student.numel() * student.element_size()
    # beyond dS, fp32 buffers: 2 (teacher) + 4 (student) statistics per row and column block,
    # one column sum per sample group, the row sum, the center copy and the per-row statistics
    cfg = kernel_module.launch_config(B, K, student.device)
    n_blocks, n_groups = -(-K // cfg.block_k), -(-B // cfg.samples_per_program)
    buffers = 4 * ((2 * 2 * B + 4 * V * B) * n_blocks + (n_groups + 2) * K + (V + 3) * B)
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
