"""DINO loss, forward + backward, 2 + 10 crops, K = 65536: B = 32 fp32 on CPU; B = 64 per GPU,
fp32 and bf16 logits, on CUDA; then a sweep over K and over the number of local crops.

Paths timed (`extra_info["path"]`):
- official double loop: the official script's formulation (tests/reference.py), one
  log_softmax and one (B, K) product per crop pair, autograd backward;
- dino_fast eager: `dino_loss_eager`, its gradient written in the forward; for fp32 on a CPU
  the C kernel (dino_fast.cpu_kernels: two sweeps per student row);
- dino_fast eager, PyTorch ops (CPU): the same with `DINO_FAST_CPU_KERNEL=0`, the ops swept in
  cache-sized chunks (the fallback where no C compiler is found);
- dino_fast Triton: the fused kernels (CUDA only; on CPU the interpreter would time numpy);
- floor (CPU): `torch.softmax(S, -1)` into a fresh tensor, reading S once and writing one
  gradient-sized tensor, what any loss path must at least do.

`bytes_moved` is what the loss must move, |S| + |T| + |dS| (0.44 GB at B = 64 fp32): the
roofline on CUDA is that at the copy bandwidth measured in the same run (benchmarks/roofline.py).
On CPU the eager benchmark also times the floor and the official loop in the same process,
interleaved, and records `x_floor` (eager / floor) and `x_official` (official / eager). Each
benchmark first checks that its path agrees with the official formulation computed in fp32 on
the same inputs.

    .venv/bin/python -m pytest benchmarks/test_bench_loss.py --benchmark-only
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks import load_test_reference
from benchmarks.roofline import peak_memory, record, synchronized
from dino_fast import cpu_kernels
from dino_fast.loss import dino_loss, dino_loss_eager

reference = load_test_reference()

gpu = pytest.mark.gpu
NCROPS, OUT_DIM, STUDENT_TEMP, TEACHER_TEMP = 12, 65536, 0.1, 0.04
# (device, dtype, batch, ncrops, out_dim): the standard configuration first, then a sweep over K
# (2 + 10 crops) and over the number of local crops (K = 16384), smaller on CPU.
PROBLEMS = [
    pytest.param(("cpu", torch.float32, 32, NCROPS, OUT_DIM), id="cpu-fp32-B32"),
    pytest.param(("cuda", torch.float32, 64, NCROPS, OUT_DIM), marks=gpu, id="cuda-fp32-B64"),
    pytest.param(("cuda", torch.bfloat16, 64, NCROPS, OUT_DIM), marks=gpu, id="cuda-bf16-B64"),
]
SWEEP_K = {"cpu": (1024, 8192), "cuda": (1024, 8192, 131072, 262144)}
SWEEP_LOCAL = {"cpu": (0, 4), "cuda": (0, 4, 8)}
for _dev, _batch, _marks in (("cpu", 16, ()), ("cuda", 64, (gpu,))):
    PROBLEMS += [pytest.param((_dev, torch.float32, _batch, NCROPS, k), marks=_marks,
                              id=f"{_dev}-sweepK-{k}") for k in SWEEP_K[_dev]]
    PROBLEMS += [pytest.param((_dev, torch.float32, _batch, 2 + n, 16384), marks=_marks,
                              id=f"{_dev}-sweep-local-{n}") for n in SWEEP_LOCAL[_dev]]
ROUNDS = {"cpu": 7, "cuda": 30}
# The official formulation on bf16 logits rounds S / tau_s and its log_softmax to bf16 (the loss
# stays fp32 through the fp32 center): 4e-3 relative RMS on the gradient, 1e-5 on the loss at
# this size, measured on CPU; checked with margin.
OFFICIAL_LOW_PRECISION_RTOL = {"loss": 1e-4, "grad": 2e-2}


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    """Inputs on the device and the official loss and gradient computed in fp32 from them."""
    device_type, dtype, batch, ncrops, out_dim = request.param
    device = torch.device(device_type)
    student, teacher, center = reference.make_logits(batch, ncrops, out_dim, dtype,
                                                     device=device)
    s32 = student.float().requires_grad_()
    loss = reference.official_dino_loss(s32, teacher.float(), center, ncrops, STUDENT_TEMP,
                                        TEACHER_TEMP)
    loss.backward()
    expected = (loss.detach(), s32.grad)
    del s32, loss
    yield dict(device=device, dtype=dtype, batch=batch, ncrops=ncrops, out_dim=out_dim,
               student=student.requires_grad_(),
               teacher=teacher, center=center, expected=expected)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _official(student, teacher, center, ncrops):
    loss = reference.official_dino_loss(student, teacher, center, ncrops, STUDENT_TEMP,
                                        TEACHER_TEMP)
    return loss, None


def _eager(student, teacher, center, ncrops):
    return dino_loss_eager(student, teacher, center, ncrops, STUDENT_TEMP, TEACHER_TEMP)


def _triton(student, teacher, center, ncrops):
    return dino_loss(student, teacher, center, ncrops, STUDENT_TEMP, TEACHER_TEMP,
                     backend="triton")


def _check_agrees_with_official(loss_fn, p, tolerances):
    student = p["student"]
    student.grad = None
    loss, _ = loss_fn(student, p["teacher"], p["center"], p["ncrops"])
    loss.backward()
    exp_loss, exp_grad = p["expected"]
    loss_err = reference.rel_rms(loss.detach(), exp_loss)
    grad_err = reference.rel_rms(student.grad, exp_grad)
    student.grad = None
    assert loss_err <= tolerances["loss"], f"loss off by {loss_err:.2e} (relative RMS)"
    assert grad_err <= tolerances["grad"], f"gradient off by {grad_err:.2e} (relative RMS)"
    return loss_err, grad_err


def _bench(benchmark, path, loss_fn, p, tolerances):
    device, student, teacher, center = p["device"], p["student"], p["teacher"], p["center"]
    errors = _check_agrees_with_official(loss_fn, p, tolerances)

    def step():
        student.grad = None
        loss, _ = loss_fn(student, teacher, center, p["ncrops"])
        loss.backward()

    fn = synchronized(step, device)
    fn()  # warm-up: Triton compilation, allocator pools
    peak = peak_memory(fn, device)
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    s_bytes, t_bytes = size(student), size(teacher)
    benchmark.group = (f"dino loss fwd+bwd B={p['batch']} 2+{p['ncrops'] - 2} crops "
                       f"K={p['out_dim']} "
                       f"{str(p['dtype']).removeprefix('torch.')}, {device.type}")
    benchmark.pedantic(fn, rounds=ROUNDS[device.type], warmup_rounds=1, iterations=1)
    record(benchmark, path=path, device=device, bytes_moved=s_bytes + t_bytes + s_bytes,
           peak_bytes=peak, student_bytes=s_bytes, loss_rel_err=float(f"{errors[0]:.2e}"),
           grad_rel_err=float(f"{errors[1]:.2e}"))
    return fn


def _median_seconds(fns, rounds):
    """Median seconds of each callable, the callables interleaved round by round so that a
    machine's drift affects them alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def _tolerances(p):
    dtype = p["dtype"]
    return {"loss": reference.LOSS_RTOL[dtype], "grad": reference.GRAD_RTOL[dtype]}


def test_loss_official_double_loop(benchmark, problem):
    # in fp32 the official path is the reference itself; in bf16 it computes in bf16 in part
    tolerances = (_tolerances(problem) if problem["dtype"] == torch.float32
                  else OFFICIAL_LOW_PRECISION_RTOL)
    _bench(benchmark, "official double loop", _official, problem, tolerances)


def _floor_step(p):
    student = p["student"].detach()
    return lambda: torch.softmax(student, dim=-1)


def test_loss_dino_fast_eager(benchmark, problem):
    fn = _bench(benchmark, "dino_fast eager", _eager, problem, _tolerances(problem))
    if problem["device"].type == "cpu":
        benchmark.extra_info["cpu_kernel"] = cpu_kernels.status()
        benchmark.extra_info["cpu_threads"] = cpu_kernels.thread_mode()
        # the ratios of the CPU targets, measured in this process, interleaved
        p = problem
        official = synchronized(lambda: _official_step(p), p["device"])
        eager_s, floor_s = _median_seconds([fn, _floor_step(p)], rounds=9)
        (official_s,) = _median_seconds([official], rounds=3)
        benchmark.extra_info.update(
            floor_ms=round(floor_s * 1e3, 2), eager_interleaved_ms=round(eager_s * 1e3, 2),
            official_ms=round(official_s * 1e3, 2), x_floor=round(eager_s / floor_s, 2),
            x_official=round(official_s / eager_s, 2))


def test_loss_dino_fast_eager_pytorch_ops(benchmark, problem, monkeypatch):
    if problem["device"].type != "cpu":
        pytest.skip("the C kernel and its fallback are the CPU path")
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    _bench(benchmark, "dino_fast eager, PyTorch ops", _eager, problem, _tolerances(problem))


def _official_step(p):
    student = p["student"]
    student.grad = None
    loss, _ = _official(student, p["teacher"], p["center"], p["ncrops"])
    loss.backward()


def test_loss_floor_softmax_into_a_fresh_tensor(benchmark, problem):
    if problem["device"].type != "cpu":
        pytest.skip("the floor is the CPU target's reference")
    p = problem
    fn = _floor_step(p)
    fn()
    benchmark.group = (f"dino loss fwd+bwd B={p['batch']} 2+{p['ncrops'] - 2} crops "
                       f"K={p['out_dim']} {str(p['dtype']).removeprefix('torch.')}, cpu")
    benchmark.pedantic(fn, rounds=ROUNDS["cpu"], warmup_rounds=1, iterations=1)
    size = p["student"].numel() * p["student"].element_size()
    record(benchmark, path="floor: softmax into a fresh tensor", device=p["device"],
           bytes_moved=2 * size)


@gpu
def test_loss_dino_fast_triton(benchmark, problem):
    if problem["device"].type != "cuda":
        pytest.skip("the Triton loss is timed on CUDA only (on CPU the interpreter would time "
                    "numpy)")
    _bench(benchmark, "dino_fast Triton (fused)", _triton, problem, _tolerances(problem))
