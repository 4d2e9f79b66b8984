"""Teacher EMA over the parameters of ViT-S/16 + the DINO head (out_dim 65536): 158 tensors,
44.0 M parameters, fp32.

Paths timed (`extra_info["path"]`):
- per-parameter loop (official): `param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)`,
  three kernels and one temporary per tensor;
- dino_fast eager: `torch._foreach_lerp_` (`ema_update_(..., backend="eager")`);
- dino_fast Triton: the one-launch multi-tensor kernel (CUDA only).

Every path reads the teacher and the student once and writes the teacher once at best, so
`bytes_moved` is that minimum, 3 * 4 B * 44.0 M = 0.53 GB, for every path: its GB/s is the
effective bandwidth (the loop really moves about 2.3 times as much, plus its temporaries).
Each benchmark first checks, on copies, that its path agrees with the official loop. The fused
paths also record `speedup_vs_loop_interleaved`, loop time / path time over alternating runs,
which stays meaningful when other jobs share the CPU between the separately timed benchmarks.

    .venv/bin/python -m pytest benchmarks/test_bench_ema.py --benchmark-only
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from benchmarks import load_test_reference
from benchmarks.roofline import peak_memory, record, synchronized
from dino_fast.ema import ema_update_

reference = load_test_reference()

MOMENTUM = 0.996
gpu = pytest.mark.gpu
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=gpu, id="cuda")]
ROUNDS = {"cpu": 10, "cuda": 50}


def dino_vit_small_shapes() -> list[torch.Size]:
    """Parameter shapes of ViT-S/16 (timm, no classifier) + the DINO head, in module order."""
    import timm
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    shapes = [p.shape for p in vit.parameters()]
    del vit
    # DINOHead(384, 65536): MLP 384 -> 2048 -> 2048 -> 256 (with biases), then the weight-normed
    # last layer 256 -> 65536 without bias: weight_g (65536, 1) and weight_v (65536, 256)
    for fan_in, fan_out in ((384, 2048), (2048, 2048), (2048, 256)):
        shapes += [torch.Size((fan_out, fan_in)), torch.Size((fan_out,))]
    shapes += [torch.Size((65536, 1)), torch.Size((65536, 256))]
    return shapes


@pytest.fixture(scope="module")
def shapes():
    return dino_vit_small_shapes()


@pytest.fixture(scope="module", params=DEVICES)
def params(request, shapes):
    """(teachers, students) of the ViT-S/16 + head shapes on the device, fp32."""
    device = torch.device(request.param)
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(s, generator=g).mul_(0.02).to(device) for s in shapes]
    teachers = [s + 0.001 * torch.randn(s.shape, generator=g).to(device) for s in students]
    yield device, teachers, students
    del teachers, students
    if device.type == "cuda":
        torch.cuda.empty_cache()


official_loop = reference.official_ema_loop


def _check_agrees_with_official(update, teachers, students):
    expected = [t.clone() for t in teachers]
    official_loop(expected, students, MOMENTUM)
    actual = [t.clone() for t in teachers]
    update(actual, students)
    for i, (a, e) in enumerate(zip(actual, expected)):
        # fp32, |t|, |s| < 0.2: a few roundings apart at most (tests/test_ema.py has the bound)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=f"tensor {i}")
    del expected, actual


def _interleaved_speedup(fn, baseline, pairs: int = 7) -> float:
    """Median over `pairs` back-to-back (baseline, fn) runs of baseline time / fn time.

    On a shared machine the load changes between pytest-benchmark's separate runs of two paths;
    timing them alternately compares them under the same load.
    """
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        baseline()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return round(statistics.median(ratios), 2)


def _bench(benchmark, path, update, device, teachers, students):
    _check_agrees_with_official(update, teachers, students)
    fn = synchronized(lambda: update(teachers, students), device)
    fn()  # warm-up: first-touch of allocator pools, Triton compilation
    peak = peak_memory(fn, device)
    benchmark.group = f"ema ViT-S/16 + DINO head, 44.0 M fp32 params, {device.type}"
    benchmark.pedantic(fn, rounds=ROUNDS[device.type], warmup_rounds=1, iterations=1)
    n = sum(t.numel() for t in teachers)
    extra = {}
    if not path.startswith("per-parameter loop"):
        loop = synchronized(lambda: official_loop(teachers, students, MOMENTUM), device)
        extra["speedup_vs_loop_interleaved"] = _interleaved_speedup(fn, loop)
    record(benchmark, path=path, device=device, bytes_moved=3 * 4 * n, peak_bytes=peak,
           tensors=len(teachers), parameters=n, **extra)


def test_ema_official_per_parameter_loop(benchmark, params):
    device, teachers, students = params
    _bench(benchmark, "per-parameter loop (official)",
           lambda ts, ss: official_loop(ts, ss, MOMENTUM), device, teachers, students)


def test_ema_dino_fast_eager_foreach(benchmark, params):
    device, teachers, students = params
    _bench(benchmark, "dino_fast eager (torch._foreach_lerp_)",
           lambda ts, ss: ema_update_(ts, ss, MOMENTUM, backend="eager"),
           device, teachers, students)


@gpu
def test_ema_dino_fast_triton(benchmark, params):
    device, teachers, students = params
    if device.type != "cuda":
        pytest.skip("the Triton EMA is timed on CUDA only (the interpreter would time numpy)")
    _bench(benchmark, "dino_fast Triton (one launch)",
           lambda ts, ss: ema_update_(ts, ss, MOMENTUM, backend="triton"),
           device, teachers, students)
