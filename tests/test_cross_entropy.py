"""soft_cross_entropy, the op under every DINO-family loss: eager and Triton (interpreter on CPU,
compiled on CUDA) against the literal per-pair formulation (tests/reference.py), for teacher
logits with a center, teacher probabilities as given (rows that do not sum to 1), per-sample
row weights (zeros included), arbitrary pair tables (DINOv3's all pairs, iBOT's one pair), over
dtypes and awkward shapes; gradients for grad_output != 1, a retained graph, no_grad; the
teacher's column sum; bad input refused before any work. Tolerances: tests/reference.py."""
import ctypes
import fractions
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_fast import cpu_kernels, cross_entropy
from dino_fast.backend import interpreter_enabled, triton_available
from dino_fast.cross_entropy import (
    CHUNK_ELEMENTS,
    empty_gradient,
    release_cached_gradients,
    soft_cross_entropy,
)

from reference import FUSED_GRAD_RTOL, GRAD_RTOL, LOSS_RTOL, literal_soft_cross_entropy, rel_rms

gpu = pytest.mark.gpu
needs_interpreter = pytest.mark.skipif(
    not (triton_available() and interpreter_enabled()),
    reason="Triton on CPU needs TRITON_INTERPRET=1 (conftest sets it when there is no CUDA)")
BACKENDS = [
    pytest.param(("eager", "cpu"), id="eager-cpu"),  # fp32: the C kernel (dino_fast.cpu_kernels)
    pytest.param(("eager", "cpu"), id="eager-ops-cpu"),  # the PyTorch ops, the kernel off
    pytest.param(("triton", "cpu"), marks=needs_interpreter, id="triton-interpreter"),
    pytest.param(("eager", "cuda"), marks=gpu, id="eager-cuda"),
    pytest.param(("triton", "cuda"), marks=gpu, id="triton-cuda"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DINO_2_2 = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
# (name, pair table, batch, K)
LAYOUTS = [
    ("dino 2+2", DINO_2_2, 3, 33),
    ("dinov3 all pairs 3x2", [[1.0, 1.0]] * 3, 2, 100),
    ("ibot one pair, M=1", [[1.0]], 1, 7),
    ("ibot one pair", [[1.0]], 5, 1025),
    ("weighted pairs", [[0.5, 0.0], [2.0, 1.0], [0.0, 0.0]], 2, 64),
    ("K=1", DINO_2_2, 2, 1),
]
MODES = ["logits+center", "logits", "probabilities"]


@pytest.fixture(autouse=True)
def _cpu_kernel_choice(request, monkeypatch):
    """eager-cpu runs the C kernel (skipped where it cannot be built), eager-ops-cpu the ops."""
    test_id = request.node.callspec.id if hasattr(request.node, "callspec") else ""
    if "eager-ops-cpu" in test_id:
        monkeypatch.setenv(cpu_kernels.ENV, "0")
    elif "eager-cpu" in test_id:
        if cpu_kernels.status() != "compiled":
            pytest.skip(f"the CPU loss kernel is {cpu_kernels.status()}")
        monkeypatch.setenv(cpu_kernels.ENV, "1")


def _inputs(table, B, K, dtype, mode, weighted, device, seed=0):
    V, G = len(table), len(table[0])
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(V * B, K, generator=g) * 2
    teacher = torch.randn(G * B, K, generator=g)
    center = torch.randn(1, K, generator=g) * 0.1 if mode == "logits+center" else None
    if mode == "probabilities":  # rows of a sharpened softmax, scaled not to sum to 1
        teacher = F.softmax(teacher * 3, dim=-1) * (0.5 + torch.rand(G * B, 1, generator=g))
    row_weight = None
    if weighted:
        row_weight = torch.rand(B, generator=g) + 0.1
        row_weight[0] = 0.0  # an image without masked patches
    to = dict(device=device)
    return (student.to(dtype=dtype, **to), teacher.to(dtype=dtype, **to),
            None if center is None else center.to(**to),
            None if row_weight is None else row_weight.to(**to))


def _check(backend, device, table, B, K, dtype, mode, weighted, grad_output=2.5, scale=0.3,
           **kw):
    student, teacher, center, row_weight = _inputs(table, B, K, dtype, mode, weighted, device)
    temp = None if mode == "probabilities" else 0.04
    s_ref = student.detach().double().requires_grad_()
    ref = literal_soft_cross_entropy(
        s_ref, teacher.double(), table, 0.1, temp,
        None if center is None else center.double(),
        None if row_weight is None else row_weight.double(), scale=scale)
    (ref * grad_output).backward()
    s = student.detach().clone().requires_grad_()
    loss, col = soft_cross_entropy(s, teacher, table, student_temp=0.1, teacher_temp=temp,
                                   center=center, row_weight=row_weight, scale=scale,
                                   teacher_sum=True, backend=backend, **kw)
    (loss * grad_output).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert s.grad.dtype == dtype
    assert rel_rms(loss.detach(), ref) <= LOSS_RTOL[dtype], (loss.item(), ref.item())
    tol = (FUSED_GRAD_RTOL if backend == "triton" else GRAD_RTOL)[dtype]
    assert rel_rms(s.grad, s_ref.grad) <= tol
    assert col.dtype == torch.float32 and col.shape == (K,)
    assert rel_rms(col, teacher.double().sum(0)) <= 1e-6
    return loss, s.grad


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("name,table,B,K", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "row-weights"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_literal_pair_loop(backend_device, name, table, B, K, mode, weighted, dtype):
    backend, device = backend_device
    _check(backend, device, table, B, K, dtype, mode, weighted)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("grad_output", [1.0, -3.0, 0.0, 65536.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradient_follows_grad_output(backend_device, grad_output, dtype):
    backend, device = backend_device
    # 65536: a loss scaler's factor on an fp16 student; the gradient must be formed scaled
    _, grad = _check(backend, device, DINO_2_2, 3, 50, dtype, "probabilities", True,
                     grad_output=grad_output, scale=1e-3)
    if grad_output == 0.0:
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_retained_graph_and_no_grad(backend_device):
    backend, device = backend_device
    student, teacher, _, row_weight = _inputs([[1.0]], 4, 40, torch.float32, "probabilities",
                                              True, device)
    args = dict(student_temp=0.1, row_weight=row_weight, backend=backend)
    x = student.clone().requires_grad_() * 1.0
    loss = soft_cross_entropy(x, teacher, [[1.0]], **args)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, g1, rtol=1e-6, atol=0)
    with torch.no_grad():
        plain = soft_cross_entropy(x, teacher, [[1.0]], **args)
    assert plain.grad_fn is None and rel_rms(plain, loss.detach()) <= 1e-6


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_large_logits_stay_finite_and_exact(backend_device):
    # S / tau_s and (T - c) / tau_t reach +-500: a bare exp overflows fp32 past 88
    backend, device = backend_device
    student, teacher, center, _ = _inputs(DINO_2_2, 2, 129, torch.float32, "logits+center",
                                          False, device)
    student, teacher = student * 25, teacher * 10
    s = student.clone().requires_grad_()
    loss = soft_cross_entropy(s, teacher, DINO_2_2, student_temp=0.1, teacher_temp=0.04,
                              center=center, backend=backend)
    loss.backward()
    ref = literal_soft_cross_entropy(student.double(), teacher.double(), DINO_2_2, 0.1, 0.04,
                                     center.double())
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert rel_rms(loss.detach(), ref) <= LOSS_RTOL[torch.float32]


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_no_buffer_of_the_students_size_but_the_gradient(backend_device, monkeypatch):
    # 6 crops x 16 samples at K = 65536: the eager path works in chunks of 5 samples, the
    # Triton path keeps per-row statistics only
    backend, device = backend_device
    table = [[1.0, 1.0]] * 6
    student, teacher, center, _ = _inputs(table, 16, 65536, torch.float32, "logits+center",
                                          False, device)
    student.requires_grad_()
    sizes, empty = [], torch.empty

    def spy(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        n = 1
        for d in shape:
            n *= d
        sizes.append(n)
        return empty(*size, **kwargs)

    release_cached_gradients()  # the gradient's memory is allocated, not a kept one reused
    monkeypatch.setattr(torch, "empty", spy)
    loss = soft_cross_entropy(student, teacher, table, student_temp=0.1, teacher_temp=0.04,
                              center=center, backend=backend)
    loss.backward()
    largest, second = sorted(sizes)[-1], sorted(sizes)[-2]
    assert largest == student.numel()  # the gradient
    assert second <= CHUNK_ELEMENTS and second <= student.numel() // 3


def _bad_cases():
    s, t = torch.randn(8, 16), torch.randn(4, 16)  # 4 student crops, 2 teacher crops, B = 2
    W = DINO_2_2
    base = dict(student_temp=0.1, teacher_temp=0.04)
    return [
        ("ragged pair table", (s, t, [[0.0, 1.0], [1.0]]), base, ValueError, "pair_weight"),
        ("empty pair table", (s, t, []), base, ValueError, "pair_weight"),
        ("non-numeric pair table", (s, t, "ab"), base, TypeError, "pair_weight"),
        ("nan pair weight", (s, t, [[float("nan"), 1.0]] * 4), base, ValueError, "pair_weight"),
        ("rows not a multiple of crops", (torch.randn(9, 16), t, W), base, ValueError, "student"),
        ("teacher rows", (s, torch.randn(6, 16), W), base, ValueError, "teacher"),
        ("teacher columns", (s, torch.randn(4, 15), W), base, ValueError, "teacher"),
        ("no columns", (torch.randn(8, 0), torch.randn(4, 0), W), base, ValueError, "student"),
        ("integer student", (s.long(), t, W), base, TypeError, "student"),
        ("integer teacher", (s, t.int(), W), base, TypeError, "teacher"),
        ("3-D student", (s.view(8, 4, 4), t, W), base, ValueError, "student"),
        ("teacher on meta", (s, t.to("meta"), W), base, ValueError, "teacher"),
        ("center with probabilities", (s, t, W), dict(student_temp=0.1,
                                                      center=torch.zeros(16)),
         ValueError, "center"),
        ("center size", (s, t, W), dict(base, center=torch.zeros(1, 15)), ValueError, "center"),
        ("center 2-D wide", (s, t, W), dict(base, center=torch.zeros(2, 16)), ValueError,
         "center"),
        ("row_weight shape", (s, t, W), dict(base, row_weight=torch.ones(3)), ValueError,
         "row_weight"),
        ("row_weight integer", (s, t, W), dict(base, row_weight=torch.ones(2, dtype=torch.long)),
         TypeError, "row_weight"),
        ("student_temp 0", (s, t, W), dict(student_temp=0.0, teacher_temp=0.04), ValueError,
         "student_temp"),
        ("teacher_temp nan", (s, t, W), dict(student_temp=0.1, teacher_temp=float("nan")),
         ValueError, "teacher_temp"),
        ("scale inf", (s, t, W), dict(base, scale=float("inf")), ValueError, "scale"),
        ("scale a string", (s, t, W), dict(base, scale="0.5"), TypeError, "scale"),
        ("scale a tensor", (s, t, W), dict(base, scale=torch.tensor(0.5)), TypeError, "scale"),
        ("backend name", (s, t, W), dict(base, backend="cuda"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("name,args,kwargs,exc,word", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_refused_naming_the_argument(name, args, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        soft_cross_entropy(*args, **kwargs)


def test_scale_may_be_any_real_number_type():
    s, t = torch.randn(8, 16), torch.randn(4, 16)
    W = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    kwargs = dict(student_temp=0.1, teacher_temp=0.04)
    loss = soft_cross_entropy(s, t, W, scale=0.5, **kwargs)
    for scale in (np.float32(0.5), np.float64(0.5), fractions.Fraction(1, 2)):
        torch.testing.assert_close(soft_cross_entropy(s, t, W, scale=scale, **kwargs), loss)


# ------------------------------------------------------------------ the C kernel of the CPU path

needs_cpu_kernel = pytest.mark.skipif(cpu_kernels.status() != "compiled",
                                      reason="the CPU loss kernel cannot be built here")


def _kernel_and_ops(monkeypatch, student, teacher, table, **kwargs):
    out = {}
    for choice in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV, choice)
        s = student.detach().clone().requires_grad_()
        loss = soft_cross_entropy(s, teacher, table, backend="eager", **kwargs)
        loss.backward()
        out[choice] = (loss.detach(), s.grad)
    return out["1"], out["0"]


@needs_cpu_kernel
def test_cpu_kernel_on_several_threads_equals_the_ops_and_the_literal_loop(monkeypatch):
    # 4 samples x 6 crops at K = 65536: two threads of two samples each
    table = [[0.0, 1.0], [1.0, 0.0]] + [[1.0, 1.0]] * 4
    student, teacher, center, row_weight = _inputs(table, 4, 65536, torch.float32,
                                                   "logits+center", True, "cpu")
    args = dict(student_temp=0.1, teacher_temp=0.04, center=center, row_weight=row_weight,
                scale=0.05)
    (k_loss, k_grad), (o_loss, o_grad) = _kernel_and_ops(monkeypatch, student, teacher, table,
                                                         **args)
    s_ref = student.double().requires_grad_()
    ref = literal_soft_cross_entropy(s_ref, teacher.double(), table, 0.1, 0.04, center.double(),
                                     row_weight.double(), scale=0.05)
    ref.backward()
    for loss, grad in ((k_loss, k_grad), (o_loss, o_grad)):
        assert rel_rms(loss, ref) <= LOSS_RTOL[torch.float32]
        assert rel_rms(grad, s_ref.grad) <= GRAD_RTOL[torch.float32]
    assert torch.count_nonzero(k_grad.view(6, 4, -1)[:, 0]) == 0  # sample 0 has weight 0


@needs_cpu_kernel
@pytest.mark.parametrize("threads", ["openmp", "python threads"])
@pytest.mark.parametrize("mode", ["logits+center", "probabilities"])
def test_cpu_kernel_threads_and_fused_column_sum_equal_the_literal_loop(monkeypatch, threads,
                                                                          mode):
    # 4 samples x 4 crops at K = 65536: two threads of two samples each, on the OpenMP runtime
    # and on Python threads; the teacher's column sum from the kernel's partial sums
    if threads == "python threads":
        monkeypatch.setitem(cpu_kernels._state, "batch", None)
    elif cpu_kernels.thread_mode() != "openmp":
        pytest.skip("the kernel runs on Python threads here (no single OpenMP runtime)")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    student, teacher, center, _ = _inputs(DINO_2_2, 4, 65536, torch.float32, mode, False, "cpu")
    temp = None if mode == "probabilities" else 0.04
    s = student.clone().requires_grad_()
    loss, col = soft_cross_entropy(s, teacher, DINO_2_2, student_temp=0.1, teacher_temp=temp,
                                   center=center, scale=0.1, teacher_sum=True, backend="eager")
    loss.backward()
    s_ref = student.double().requires_grad_()
    ref = literal_soft_cross_entropy(s_ref, teacher.double(), DINO_2_2, 0.1, temp,
                                     None if center is None else center.double(), scale=0.1)
    ref.backward()
    assert cpu_kernels.thread_mode() == threads
    assert rel_rms(loss.detach(), ref) <= LOSS_RTOL[torch.float32]
    assert rel_rms(s.grad, s_ref.grad) <= GRAD_RTOL[torch.float32]
    assert col.dtype == torch.float32 and col.shape == (65536,)
    assert rel_rms(col, teacher.double().sum(0)) <= 1e-6


_OPENMP_SCRIPT = """
import os, torch
def runtimes():
    with open("/proc/self/maps") as f:
        return {os.path.realpath(line.split()[-1]) for line in f if "libgomp" in line}
before = runtimes()
import ctypes
import fractions
from dino_fast import cpu_kernels
mode = cpu_kernels.thread_mode()
built = ctypes.CDLL(str(cpu_kernels._state["path"])).dino_fast_openmp()
print(len(before), mode.replace(" ", "_"), runtimes() == before, built)
"""


@needs_cpu_kernel
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux's /proc/self/maps")
def test_cpu_kernel_shares_pytorchs_openmp_runtime():
    # PyTorch's libgomp is loaded with torch; the kernel's build links libgomp.so.1 and must
    # bind to that one, not load a second runtime with threads of its own (a fresh process:
    # this one loaded the kernel at collection)
    out = subprocess.run([sys.executable, "-c", _OPENMP_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n_before, mode, unchanged, built = out.stdout.split()
    if n_before != "1":
        pytest.skip(f"this PyTorch maps {n_before} GNU OpenMP runtimes")
    if built != "1":
        pytest.skip("the kernels' build has no OpenMP here (-fopenmp did not compile or link)")
    assert (mode, unchanged) == ("openmp", "True")


_FORK_SCRIPT = """
import os, sys, torch
from dino_fast import cpu_kernels
from dino_fast.cross_entropy import soft_cross_entropy
W = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
groups = [(0, 1, [0.0, 1.0]), (1, 2, [1.0, 0.0]), (2, 3, [1.0, 1.0])]
g = torch.Generator().manual_seed(0)
S, T = torch.randn(3 * 8, 65536, generator=g), torch.randn(2 * 8, 65536, generator=g)
def loss():
    s = S.clone().requires_grad_()
    value = soft_cross_entropy(s, T, W, student_temp=0.1, teacher_temp=0.04)
    value.backward()
    return value.item(), s.grad
torch.set_num_threads(2)
ref, ref_grad = loss()  # the parent's threads (OpenMP: its pool) ran the kernel
grad, col = torch.empty_like(S), torch.empty(65536)
def kernel():  # the kernel alone: no PyTorch op that would run on threads
    ce = cpu_kernels.soft_cross_entropy(cpu_kernels.kernel(), S, T, None, grad, groups, 2, 0.1,
                                        0.04, None, 1.0, col)
    return ce
ref_ce = kernel().clone()
ref_kernel_grad, ref_col = grad.clone(), col.clone()
pid = os.fork()
if pid == 0:
    mode = cpu_kernels.thread_mode()
    ce = kernel()  # two threads: Python threads in the child
    torch.set_num_threads(1)  # then, as a data-loader worker, one thread for PyTorch's ops
    ok = torch.equal(ce, ref_ce) and torch.equal(grad, ref_kernel_grad)
    ok = ok and torch.equal(col, ref_col)
    value, grad1 = loss()
    ok = ok and value == ref and torch.equal(grad1, ref_grad) and mode == "python threads"
    os._exit(0 if ok else 3)
print(os.waitpid(pid, 0)[1])
"""


@needs_cpu_kernel
@pytest.mark.parametrize("before,after,openmp", [
    ({"/t/libgomp.so.1"}, {"/t/libgomp.so.1"}, True),
    ({"/t/libgomp.so.1"}, {"/t/libgomp.so.1", "/usr/lib/libomp.so"}, False),  # clang's build
    ({"/t/libgomp.so.1"}, {"/t/libgomp.so.1", "/usr/lib/libgomp.so.1"}, False),  # a 2nd GNU
    ({"/t/libiomp5.so"}, {"/t/libiomp5.so"}, False),  # PyTorch on Intel's runtime
    (None, None, False)])  # no /proc/self/maps
def test_cpu_kernel_takes_openmp_threads_only_from_the_one_gnu_runtime(monkeypatch, before,
                                                                        after, openmp):
    seen = iter([before, after])
    monkeypatch.setattr(cpu_kernels, "_openmp_runtimes", lambda: next(seen))
    path = cpu_kernels._state["path"]
    loaded = cpu_kernels._load(path)
    openmp = openmp and bool(ctypes.CDLL(str(path)).dino_fast_openmp())  # a build with OpenMP
    assert (loaded["batch"] is not None) == openmp
    assert (loaded["photometric_batch"] is not None) == openmp


@needs_cpu_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_cpu_kernel_runs_in_a_forked_child():
    # GNU OpenMP's pool does not survive a fork (a parallel region in the child would wait for
    # its threads forever, as PyTorch's own ops do in a child with several threads): a forked
    # child runs the kernel on Python threads, on two threads and on one, bit for bit as the
    # parent
    proc = subprocess.Popen([sys.executable, "-c", _FORK_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise AssertionError("the forked child hung") from None
    assert proc.returncode == 0 and out.split() == ["0"], (out, err[-2000:])


@needs_cpu_kernel
def test_cpu_kernel_column_sum_of_many_rows_is_compensated(monkeypatch):
    # 8192 teacher rows near 10 on one thread: a plain fp32 running sum drifts by ~1e-5
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    g = torch.Generator().manual_seed(3)
    teacher = 10 + torch.rand(2 * 4096, 64, generator=g)
    student = torch.randn(2 * 4096, 64, generator=g)
    _, col = soft_cross_entropy(student, teacher, [[0.0, 1.0], [1.0, 0.0]], student_temp=0.1,
                                teacher_temp=0.04, teacher_sum=True, backend="eager")
    assert rel_rms(col, teacher.double().sum(0)) <= 1e-7


def test_teacher_column_sum_is_not_differentiable_under_compile():
    # torch.compile does not keep an autograd Function's mark_non_differentiable
    def f(s, t):
        return soft_cross_entropy(s, t, [[0.0, 1.0], [1.0, 0.0]], student_temp=0.1,
                                  teacher_temp=0.04, teacher_sum=True, backend="eager")
    s, t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    loss, col = torch.compile(f, backend="aot_eager", fullgraph=False)(s, t)
    assert loss.requires_grad and not col.requires_grad
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@needs_cpu_kernel
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_cpu_kernel_treats_non_finite_inputs_as_the_ops_do(monkeypatch, where, value):
    student, teacher, center, _ = _inputs(DINO_2_2, 3, 40, torch.float32, "logits+center",
                                          False, "cpu")
    (student if where == "student" else teacher)[1, 7] = value
    (k_loss, k_grad), (o_loss, o_grad) = _kernel_and_ops(monkeypatch, student, teacher, DINO_2_2,
                                                         student_temp=0.1, teacher_temp=0.04,
                                                         center=center)
    if value == value and value < 0:
        # a -inf logit: probability 0. Student: CE +inf (its crop pairs put mass there), the
        # gradient finite; teacher: nothing changes but that entry's probability
        assert (k_loss.item() == float("inf")) == (where == "student")
        assert k_loss.item() == pytest.approx(o_loss.item(), rel=1e-5)
        assert torch.isfinite(k_grad).all()
        torch.testing.assert_close(k_grad, o_grad, rtol=1e-4, atol=1e-9)
    else:  # NaN or +inf: a NaN loss, which stops training
        assert not torch.isfinite(k_loss) and not torch.isfinite(o_loss)


KERNEL_BLOCK = 512  # kernels/cpu_rows.c's BLOCK: the online softmax's max per block of entries


def _ramp(K, lo, hi):
    return torch.linspace(lo, hi, K)


# student rows whose max rises from block to block (the kernel's running max rescales its sum,
# dot and the gradient's blocks), falls, or jumps by far more than exp's range
ROW_SHAPES = {
    "rising": lambda K: _ramp(K, -3.0, 3.0),
    "falling": lambda K: _ramp(K, 3.0, -3.0),
    "jump past exp's range": lambda K: torch.where(torch.arange(K) < 2 * KERNEL_BLOCK,
                                                   _ramp(K, -1000.0, -990.0), _ramp(K, 5.0, 6.0)),
    "max in the last partial block": lambda K: torch.where(torch.arange(K) == K - 3, 9.0, 0.5),
}


@needs_cpu_kernel
@pytest.mark.parametrize("shape", list(ROW_SHAPES))
def test_cpu_kernel_online_max_across_blocks_equals_the_literal_loop(monkeypatch, shape):
    K = 3 * KERNEL_BLOCK + 37
    student, teacher, center, row_weight = _inputs(DINO_2_2, 3, K, torch.float32,
                                                   "logits+center", True, "cpu")
    for r in (1, 7):  # a crop with one teacher crop, a crop with both
        student[r] = ROW_SHAPES[shape](K)
    args = dict(student_temp=0.1, teacher_temp=0.04, center=center, row_weight=row_weight,
                scale=0.2)
    (k_loss, k_grad), (o_loss, o_grad) = _kernel_and_ops(monkeypatch, student, teacher, DINO_2_2,
                                                         **args)
    s_ref = student.double().requires_grad_()
    ref = literal_soft_cross_entropy(s_ref, teacher.double(), DINO_2_2, 0.1, 0.04,
                                     center.double(), row_weight.double(), scale=0.2)
    ref.backward()
    for loss, grad in ((k_loss, k_grad), (o_loss, o_grad)):
        assert rel_rms(loss, ref) <= LOSS_RTOL[torch.float32]
        assert rel_rms(grad, s_ref.grad) <= GRAD_RTOL[torch.float32]
        for r in (1, 7):
            assert rel_rms(grad[r], s_ref.grad[r]) <= GRAD_RTOL[torch.float32]


@needs_cpu_kernel
@pytest.mark.parametrize("case", ["leading -inf blocks", "NaN in a later block",
                                  "+inf in a later block"])
def test_cpu_kernel_non_finite_entries_past_the_first_block(monkeypatch, case):
    K = 3 * KERNEL_BLOCK + 37
    student, teacher, center, _ = _inputs(DINO_2_2, 3, K, torch.float32, "logits+center",
                                          False, "cpu")
    if case == "leading -inf blocks":
        student[4, :2 * KERNEL_BLOCK + 5] = -float("inf")
    else:
        student[4, 2 * KERNEL_BLOCK + 9] = float("nan") if "NaN" in case else float("inf")
    # teacher_temp 1: no teacher probability underflows to 0 (0 * -inf would make CE NaN)
    (k_loss, k_grad), (o_loss, o_grad) = _kernel_and_ops(monkeypatch, student, teacher, DINO_2_2,
                                                         student_temp=0.1, teacher_temp=1.0,
                                                         center=center)
    if case == "leading -inf blocks":  # CE +inf (the teacher puts mass there), gradient finite
        assert k_loss.item() == o_loss.item() == float("inf")
        assert torch.isfinite(k_grad).all()
        torch.testing.assert_close(k_grad, o_grad, rtol=1e-4, atol=1e-9)
    else:
        assert torch.isnan(k_loss) and not torch.isfinite(o_loss)
        assert torch.isnan(k_grad[4]).all()
        others = torch.arange(k_grad.shape[0]) != 4
        torch.testing.assert_close(k_grad[others], o_grad[others], rtol=1e-4, atol=1e-9)


@needs_cpu_kernel
def test_cpu_kernel_restores_the_callers_denormal_handling(monkeypatch):
    # the kernel flushes denormals for its own call only: afterwards the calling thread still
    # computes with them (tiny * 0.5 is a denormal, not 0)
    tiny = torch.tensor([1.1754944e-38], dtype=torch.float32)
    student, teacher, center, _ = _inputs(DINO_2_2, 2, 4096, torch.float32, "logits+center",
                                          False, "cpu")
    _kernel_and_ops(monkeypatch, student, teacher, DINO_2_2, student_temp=0.1,
                    teacher_temp=0.04, center=center)
    assert (tiny * 0.5).item() > 0.0


def test_without_a_compiler_the_ops_run_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DINO_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    student, teacher, _, _ = _inputs(DINO_2_2, 2, 16, torch.float32, "logits", False, "cpu")
    with pytest.warns(RuntimeWarning, match="could not be built.*PyTorch ops"):
        loss = soft_cross_entropy(student, teacher, DINO_2_2, student_temp=0.1,
                                  teacher_temp=0.04)
    ref = literal_soft_cross_entropy(student.double(), teacher.double(), DINO_2_2, 0.1, 0.04)
    assert rel_rms(loss, ref) <= LOSS_RTOL[torch.float32]
    assert cpu_kernels.status().startswith("unavailable: the C kernel could not be built")
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    with pytest.raises(RuntimeError, match="DINO_FAST_CPU_KERNEL=1 but the CPU kernels are "
                                           "unavailable"):
        soft_cross_entropy(student, teacher, DINO_2_2, student_temp=0.1, teacher_temp=0.04)
    monkeypatch.setenv(cpu_kernels.ENV, "yes")
    with pytest.raises(ValueError, match="DINO_FAST_CPU_KERNEL must be auto, 0 or 1"):
        soft_cross_entropy(student, teacher, DINO_2_2, student_temp=0.1, teacher_temp=0.04)


# 16 MB of fp32: a gradient large enough for its memory to be kept for reuse (8 MB and up)
KEPT = (64, 65536)


def test_cpu_gradient_memory_is_reused_only_once_nothing_holds_it(monkeypatch):
    release_cached_gradients()
    a = empty_gradient(KEPT, torch.float32, torch.device("cpu"))
    b = empty_gradient(KEPT, torch.float32, torch.device("cpu"))
    pa, pb = a.data_ptr(), b.data_ptr()
    assert pa != pb  # a is alive
    del a
    c = empty_gradient(KEPT, torch.float32, "cpu")
    assert c.data_ptr() == pa and c.shape == KEPT
    smaller = (40, 65536)
    del c
    d = empty_gradient(smaller, torch.float32, "cpu")  # fits in a kept buffer: a view of it
    assert d.data_ptr() == pa and d.shape == smaller and d.is_contiguous()
    row = b[3]  # a view keeps b's memory
    del b
    e = empty_gradient(KEPT, torch.float32, "cpu")
    assert e.data_ptr() not in (pa, pb)
    del row, d
    pe = e.data_ptr()
    held = [e]  # another Python reference to the tensor
    del e
    f = empty_gradient(KEPT, torch.float32, "cpu")
    assert f.data_ptr() == pa  # the free one, not e's
    del held
    pf = f.data_ptr()
    del f
    assert empty_gradient(KEPT, torch.float64, "cpu").data_ptr() not in (pe, pf)  # dtype
    small = empty_gradient((4, 1000), torch.float32, "cpu")  # small: not kept
    assert all(buf.data_ptr() != small.data_ptr() for buf in cross_entropy._reuse)
    assert len(cross_entropy._reuse) == cross_entropy.REUSE_SLOTS
    from torch._subclasses.fake_tensor import FakeTensorMode
    kept = [b.data_ptr() for b in cross_entropy._reuse]
    with FakeTensorMode():  # tracing: fake tensors, never a kept buffer
        fake = empty_gradient(KEPT, torch.float32, "cpu")
    assert fake.shape == KEPT and type(fake) is not torch.Tensor
    assert [b.data_ptr() for b in cross_entropy._reuse] == kept
    release_cached_gradients()
    monkeypatch.setenv(cross_entropy.REUSE_ENV, "0")
    g = empty_gradient(KEPT, torch.float32, "cpu")
    del g
    empty_gradient(KEPT, torch.float32, "cpu")
    assert cross_entropy._reuse == []


@pytest.mark.parametrize("backend_device", BACKENDS[:2])
def test_training_steps_reuse_gradient_memory_and_leave_held_gradients_alone(backend_device):
    # 4 student x 2 teacher crops of 8 samples at K = 65536: an 8 MB gradient. Step 1's
    # gradient is held by a hook: step 2 must write elsewhere and leave it as it was; step 3
    # reuses step 2's memory (nothing holds it); every step matches the literal loop
    backend, device = backend_device
    table = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    release_cached_gradients()
    held, addresses = [], []
    for step in range(3):
        student, teacher, center, _ = _inputs(table, 8, 65536, torch.float32, "logits+center",
                                              False, device, seed=step)
        leaf = student.clone().requires_grad_()
        s = leaf * 1.0  # a non-leaf output, as a head's
        if step == 0:
            s.register_hook(lambda g: held.append(g))
        s.register_hook(lambda g: addresses.append(g.data_ptr()))
        loss = soft_cross_entropy(s, teacher, table, student_temp=0.1, teacher_temp=0.04,
                                  center=center, backend=backend)
        loss.backward()
        if step == 0:
            kept = held[0].clone()
        s_ref = student.double().requires_grad_()
        ref = literal_soft_cross_entropy(s_ref, teacher.double(), table, 0.1, 0.04,
                                         center.double())
        ref.backward()
        assert rel_rms(loss.detach(), ref) <= LOSS_RTOL[torch.float32]
        assert rel_rms(leaf.grad, s_ref.grad) <= GRAD_RTOL[torch.float32]
        del s, loss, leaf
    assert addresses[1] != addresses[0] and addresses[2] == addresses[1]
    assert torch.equal(held[0], kept)
    release_cached_gradients()


@pytest.mark.parametrize("backend_device", BACKENDS[:2])
def test_a_leaf_students_accumulated_gradient_is_never_overwritten(backend_device):
    # the engine may hand the loss's gradient buffer itself to leaf.grad; three steps accumulate
    # into it (no zeroing) while each forward asks for gradient memory again
    backend, device = backend_device
    table = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    release_cached_gradients()
    student, teacher, center, _ = _inputs(table, 8, 65536, torch.float32, "logits+center",
                                          False, device)
    leaf = student.clone().requires_grad_()
    expected = torch.zeros_like(student, dtype=torch.float64)
    for step in range(3):
        t = teacher * (1.0 + step)
        soft_cross_entropy(leaf, t, table, student_temp=0.1, teacher_temp=0.04, center=center,
                           backend=backend).backward()
        s_ref = student.double().requires_grad_()
        literal_soft_cross_entropy(s_ref, t.double(), table, 0.1, 0.04,
                                   center.double()).backward()
        expected += s_ref.grad
        assert rel_rms(leaf.grad, expected) <= GRAD_RTOL[torch.float32]
    release_cached_gradients()
