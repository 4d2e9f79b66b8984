"""DINOv2 losses: iBOT `forward_masked` + backward and the Sinkhorn-Knopp teacher, the official
formulation (tests/dinov_reference.py) against dino_fast (eager, and Triton on CUDA).

Sizes: on CPU 4,096 masked patches at K = 8192; on CUDA the DINOv2 ViT-L/14 default, 64 images
x 256 patches with about 0.3 of them masked (~4,900 rows) at K = 65536, fp32 and bf16.

- iBOT: the official code computes log_softmax(S / tau) and the (M, K) product with the teacher
  probabilities in the inputs' dtype, then the autograd backward; dino_fast makes one pass with
  the gradient written in the forward. `bytes_moved` = |S| + |T| + |dS|.
- SK (3 iterations): the official code's exp and 17 normalisations of (M, K) tensors against
  dino_fast's log-domain scale vector and one softmax (eager: one (M, K) fp32 workspace;
  Triton, CUDA only: passes over X, no (M, K) temporary); `bytes_moved` = |X| + |Q| (read the
  logits, write the probabilities), the roofline's bytes.
- SK center (3 iterations), what the losses that take a center consume: `bytes_moved` = |X|
  (read the logits once).
  The Triton path reads X 2n - 1 = 5 times for the scale vector, and twice more for Q: that
  traffic is recorded as `kernel_bytes` (against the roofline's single read).
Each benchmark first checks its result against the official one in fp32/fp64.

    .venv/bin/python -m pytest benchmarks/test_bench_dinov2.py --benchmark-only
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.roofline import peak_memory, record, synchronized
from dino_fast.dinov2 import iBOTPatchLoss
from dino_fast.sinkhorn import sinkhorn_knopp_center, sinkhorn_knopp_probs

_path = Path(__file__).resolve().parents[1] / "tests" / "dinov_reference.py"
_spec = importlib.util.spec_from_file_location("dino_fast_dinov_reference", _path)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

gpu = pytest.mark.gpu
PROBLEMS = [
    pytest.param(("cpu", torch.float32, 4096, 8192), id="cpu-fp32-M4096-K8192"),
    pytest.param(("cuda", torch.float32, 4900, 65536), marks=gpu, id="cuda-fp32-M4900-K65536"),
    pytest.param(("cuda", torch.bfloat16, 4900, 65536), marks=gpu, id="cuda-bf16-M4900-K65536"),
]
ROUNDS = {"cpu": 5, "cuda": 20}
N_IMAGES = 64


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    device, dtype, M, K = request.param
    g = torch.Generator().manual_seed(0)
    # cosine logits in [-1, 1], as the weight-normalised iBOT head gives (wider random logits
    # push exp() into denormal floats, which slows every CPU path alike)
    student = (torch.rand(M, K, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    teacher_logits = (torch.rand(M, K, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    teacher = F.softmax(teacher_logits.float() / 0.07, dim=-1).to(dtype)
    masks = torch.zeros(N_IMAGES, -(-M // N_IMAGES) * 2, dtype=torch.bool)
    masks.view(-1)[torch.randperm(masks.numel(), generator=g)[:M]] = True
    yield dict(device=torch.device(device), dtype=dtype, M=M, K=K,
               student=student.requires_grad_(), teacher=teacher,
               teacher_logits=teacher_logits, masks=masks.to(device))
    if device == "cuda":
        torch.cuda.empty_cache()


def _ibot_official(p):
    s = p["student"]
    s.grad = None
    loss = ref.official_ibot_forward_masked(s, p["teacher"], p["masks"])
    loss.backward()
    return loss


def _ibot_dino_fast(backend):
    def run(p):
        mod = p.setdefault(f"ibot_{backend}", iBOTPatchLoss(p["K"], backend=backend).to(
            p["device"]))
        s = p["student"]
        s.grad = None
        loss = mod.forward_masked(s, p["teacher"], p["masks"])
        loss.backward()
        return loss
    return run


def _bench_ibot(benchmark, p, path, fn):
    loss = fn(p)
    grad = p["student"].grad.clone()
    s64 = p["student"].detach().double().requires_grad_()
    expected = ref.official_ibot_forward_masked(s64, p["teacher"].double(), p["masks"])
    expected.backward()
    tol = 1e-5 if p["dtype"] == torch.float32 else 2e-2
    assert ref.rel_rms(loss.detach(), expected) <= tol
    assert ref.rel_rms(grad, s64.grad) <= (1e-4 if p["dtype"] == torch.float32 else 2e-2)
    step = synchronized(lambda: fn(p), p["device"])
    peak = peak_memory(step, p["device"])
    benchmark.group = (f"iBOT forward_masked+bwd M={p['M']} K={p['K']} "
                       f"{str(p['dtype']).removeprefix('torch.')}, {p['device'].type}")
    benchmark.pedantic(step, rounds=ROUNDS[p["device"].type], warmup_rounds=1, iterations=1)
    size = p["student"].numel() * p["student"].element_size()
    record(benchmark, path=path, device=p["device"], bytes_moved=3 * size, peak_bytes=peak)


def test_ibot_official(benchmark, problem):
    _bench_ibot(benchmark, problem, "official formulation", _ibot_official)


def test_ibot_dino_fast_eager(benchmark, problem):
    _bench_ibot(benchmark, problem, "dino_fast eager", _ibot_dino_fast("eager"))


@gpu
def test_ibot_dino_fast_triton(benchmark, problem):
    if problem["device"].type != "cuda":
        pytest.skip("the Triton loss is timed on CUDA only")
    _bench_ibot(benchmark, problem, "dino_fast Triton (fused)", _ibot_dino_fast("triton"))


SK_ITERATIONS, SK_TEMP = 3, 0.07


def _bench_sk(benchmark, p, path, fn, *, center=False, kernel_passes=None):
    """fn(x) returns the probabilities Q, or the center c when `center`; kernel_passes: the
    reads of X the path makes (recorded as kernel_bytes with Q's write)."""
    x = p["teacher_logits"]
    out = fn(x)
    q = torch.softmax((x.float() - out) / SK_TEMP, dim=-1) if center else out
    expected = ref.official_sinkhorn_knopp(x.double(), SK_TEMP, SK_ITERATIONS)
    assert ref.rel_rms(q.double(), expected) <= (1e-4 if p["dtype"] == torch.float32 else 2e-2)
    del q, out, expected
    step = synchronized(lambda: fn(x), p["device"])
    peak = peak_memory(step, p["device"])
    what = "Sinkhorn-Knopp center" if center else "Sinkhorn-Knopp"
    benchmark.group = (f"{what} {SK_ITERATIONS} iterations M={p['M']} K={p['K']} "
                       f"{str(p['dtype']).removeprefix('torch.')}, {p['device'].type}")
    benchmark.pedantic(step, rounds=ROUNDS[p["device"].type], warmup_rounds=1, iterations=1)
    size = x.numel() * x.element_size()
    written = 0 if center else x.numel() * 4
    extra = {} if kernel_passes is None else {"kernel_bytes": kernel_passes * size + written}
    record(benchmark, path=path, device=p["device"], bytes_moved=size + written,
           peak_bytes=peak, **extra)


def _needs_cuda(p, what):
    if p["device"].type != "cuda":
        pytest.skip(f"the Triton {what} is timed on CUDA only")


def test_sinkhorn_official(benchmark, problem):
    _bench_sk(benchmark, problem, "official formulation",
              lambda x: ref.official_sinkhorn_knopp(x.float(), SK_TEMP, SK_ITERATIONS))


def test_sinkhorn_dino_fast(benchmark, problem):
    _bench_sk(benchmark, problem, "dino_fast (log domain)",
              lambda x: sinkhorn_knopp_probs(x, SK_TEMP, SK_ITERATIONS, backend="eager"))


@gpu
def test_sinkhorn_dino_fast_triton(benchmark, problem):
    _needs_cuda(problem, "Sinkhorn-Knopp")
    # 2n - 1 passes for the scale vector, then Q's row pass sweeps its rows twice
    _bench_sk(benchmark, problem, "dino_fast Triton (fused)",
              lambda x: sinkhorn_knopp_probs(x, SK_TEMP, SK_ITERATIONS, backend="triton"),
              kernel_passes=2 * SK_ITERATIONS + 1)


def test_sinkhorn_center_dino_fast(benchmark, problem):
    _bench_sk(benchmark, problem, "dino_fast (log domain)",
              lambda x: sinkhorn_knopp_center(x, SK_TEMP, SK_ITERATIONS, backend="eager"),
              center=True)


@gpu
def test_sinkhorn_center_dino_fast_triton(benchmark, problem):
    _needs_cuda(problem, "Sinkhorn-Knopp")
    _bench_sk(benchmark, problem, "dino_fast Triton (fused)",
              lambda x: sinkhorn_knopp_center(x, SK_TEMP, SK_ITERATIONS, backend="triton"),
              center=True, kernel_passes=2 * SK_ITERATIONS - 1)
