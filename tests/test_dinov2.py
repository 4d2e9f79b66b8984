"""dino_fast.dinov2 and dino_fast.sinkhorn against the literal official formulas: values,
gradients, centers and state dicts over dtypes and awkward shapes, the Sinkhorn-Knopp teacher
where the official formula overflows, input validation, and a 2-process gloo run."""
import doctest
import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from dino_fast import cpu_kernels, dinov3
from dino_fast.backend import triton_available
from dino_fast.dinov2 import DINOLoss, KoLeoLoss, ibot_masked_loss, iBOTPatchLoss
from dino_fast.sinkhorn import sinkhorn_knopp_center, sinkhorn_knopp_log_scale, sinkhorn_knopp_probs

from dinov_reference import (
    CENTER_RTOL,
    GRAD_RTOL,
    LOSS_RTOL,
    PROB_RTOL,
    OfficialCenter,
    log_domain_sinkhorn_knopp,
    logits,
    masks,
    official_dinov2_dino_forward,
    official_ibot_forward,
    official_ibot_forward_masked,
    official_koleo,
    official_masks_weight,
    official_sinkhorn_knopp,
    probs,
    rel_rms,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _grad_close(ours, ref, dtype):
    assert ours.dtype == dtype
    assert rel_rms(ours, ref) <= GRAD_RTOL[dtype]


# ------------------------------------------------------------------------- Sinkhorn-Knopp

@pytest.mark.parametrize("n_iterations", [1, 3, 5])
@pytest.mark.parametrize("rows,K", [(1, 7), (13, 7), (32, 1025)])
def test_sinkhorn_matches_the_official_formula(rows, K, n_iterations):
    x = logits(rows, K, seed=rows + K)
    ours = sinkhorn_knopp_probs(x, 0.04, n_iterations)
    ref = official_sinkhorn_knopp(x.double(), 0.04, n_iterations)
    assert ours.dtype == torch.float32 and ours.shape == (rows, K)
    assert rel_rms(ours, ref) <= PROB_RTOL
    # and the official formula in fp32 agrees too, where it is finite
    assert rel_rms(official_sinkhorn_knopp(x, 0.04, n_iterations), ref) <= PROB_RTOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_is_a_centred_softmax(dtype):
    x = logits(16, 33, dtype=dtype, scale=3.0, seed=1)
    c = sinkhorn_knopp_center(x, 0.05)
    log_u = sinkhorn_knopp_log_scale(x, 0.05)
    assert c.shape == (33,) and c.dtype == torch.float32
    q = torch.softmax((x.float() - c) / 0.05, dim=-1)
    ref = official_sinkhorn_knopp(x.double(), 0.05)
    assert rel_rms(q, ref) <= PROB_RTOL
    assert rel_rms(torch.softmax(x.float() / 0.05 + log_u, -1), ref) <= PROB_RTOL


@pytest.mark.parametrize("scale", [4.0, 8.0])
def test_sinkhorn_is_finite_and_exact_where_the_official_fp32_formula_is_nan(scale):
    # x / tau reaches 100-200 (DINOv3 heads are unbounded): the official fp32 exp overflows
    x = logits(24, 50, scale=scale, seed=2)
    official_fp32 = official_sinkhorn_knopp(x, 0.04)
    assert not torch.isfinite(official_fp32).all()
    ours = sinkhorn_knopp_probs(x, 0.04)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.sum(-1), torch.ones(24), rtol=0, atol=1e-5)
    assert rel_rms(ours, official_sinkhorn_knopp(x.double(), 0.04)) <= PROB_RTOL
    assert rel_rms(ours, log_domain_sinkhorn_knopp(x, 0.04)) <= PROB_RTOL


def test_sinkhorn_keeps_a_prototype_whose_exp_underflows_in_every_row():
    # column 0 has x / tau < -110 everywhere: the official column sum is 0 and 0 / 0 = NaN;
    # the log-domain step still gives it its 1/K share
    x = logits(20, 9, seed=3)
    x[:, 0] = -5.0 + 0.1 * x[:, 0]
    assert torch.isnan(official_sinkhorn_knopp(x, 0.04)).any()
    ours = sinkhorn_knopp_probs(x, 0.04)
    ref = log_domain_sinkhorn_knopp(x, 0.04)
    assert torch.isfinite(ours).all()
    assert rel_rms(ours, ref) <= PROB_RTOL
    assert ours[:, 0].sum() > 0.5  # about 20 / 9 after 3 iterations


def test_sinkhorn_padding_rows_take_no_part():
    x = logits(12, 17, scale=2.0, seed=4)
    padded = torch.cat([x, 100.0 * torch.ones(5, 17)])
    c = sinkhorn_knopp_center(padded, 0.04, n_valid_rows=12)
    torch.testing.assert_close(c, sinkhorn_knopp_center(x, 0.04), rtol=1e-6, atol=1e-6)


needs_cpu_kernel = pytest.mark.skipif(cpu_kernels.status() != "compiled",
                                      reason="the CPU kernels cannot be built here")


def _sk_kernel_and_ops(monkeypatch, fn, *args, **kwargs):
    out = []
    for choice in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV, choice)
        out.append(fn(*args, **kwargs))
    return out


@needs_cpu_kernel
@pytest.mark.parametrize("threads", ["openmp", "calling thread"])
@pytest.mark.parametrize("rows,K,n_valid", [(1, 7, None), (13, 1, None), (37, 1025, None),
                                            (40, 600, 29)])
def test_sinkhorn_cpu_kernel_equals_the_ops(monkeypatch, threads, rows, K, n_valid):
    # the C kernel's steps (fp32, read in place, rows split over 3 threads) against the PyTorch
    # ops of the eager path, on a strided view (row stride > K) with padding rows
    if threads == "calling thread":
        monkeypatch.setitem(cpu_kernels._state, "batch", None)
    elif cpu_kernels.thread_mode() != "openmp":
        pytest.skip("no single OpenMP runtime here")
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    x = logits(rows, K + 3, scale=4.0, seed=rows + K)[:, 1:K + 1]
    if n_valid is not None:
        x[n_valid:] = 100.0  # padding rows, far above every valid logit
    for n_iterations in (1, 3):
        kw = dict(n_valid_rows=n_valid, backend="eager")
        k_u, o_u = _sk_kernel_and_ops(monkeypatch, sinkhorn_knopp_log_scale, x, 0.04,
                                      n_iterations, **kw)
        assert k_u.dtype == torch.float32 and k_u.shape == (K,)
        assert rel_rms(k_u, o_u) <= 1e-5
        k_q, o_q = _sk_kernel_and_ops(monkeypatch, sinkhorn_knopp_probs, x, 0.04, n_iterations,
                                      **kw)
        assert k_q.shape == x.shape and rel_rms(k_q, o_q) <= PROB_RTOL
        n = rows if n_valid is None else n_valid
        ref = official_sinkhorn_knopp(x[:n].double(), 0.04, n_iterations)
        assert rel_rms(k_q[:n], ref) <= PROB_RTOL


@needs_cpu_kernel
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_sinkhorn_cpu_kernel_treats_non_finite_logits_as_the_ops_do(monkeypatch, value):
    x = logits(9, 40, scale=2.0, seed=1)
    x[3, 5] = value
    for fn in (sinkhorn_knopp_log_scale, sinkhorn_knopp_probs):
        k, o = _sk_kernel_and_ops(monkeypatch, fn, x, 0.04, 3, backend="eager")
        assert torch.equal(torch.isnan(k), torch.isnan(o))
        assert torch.equal(torch.isinf(k), torch.isinf(o))
        finite = torch.isfinite(o)
        torch.testing.assert_close(k[finite], o[finite], rtol=1e-4, atol=1e-6)
    x[:, 11] = -float("inf")  # a prototype no sample can take
    k, o = _sk_kernel_and_ops(monkeypatch, sinkhorn_knopp_log_scale, x, 0.04, 3,
                              backend="eager")
    assert torch.equal(torch.isnan(k), torch.isnan(o))


@needs_cpu_kernel
def test_sinkhorn_cpu_kernel_is_used_for_fp32_on_the_cpu_only(monkeypatch):
    calls = []
    real = cpu_kernels.sinkhorn_step
    monkeypatch.setattr(cpu_kernels, "sinkhorn_step", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    x = logits(8, 16, seed=2)
    sinkhorn_knopp_center(x, 0.04, backend="eager")
    assert calls
    calls.clear()
    sinkhorn_knopp_center(x.bfloat16(), 0.04, backend="eager")
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    sinkhorn_knopp_center(x, 0.04, backend="eager")
    assert not calls


# ----------------------------------------------------------------------- DINOLoss (CLS)

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("B,K", [(1, 7), (4, 1025), (3, 64)])
def test_dino_forward_local_layout_matches_official(B, K, dtype):
    # DINOv2's local-crop call: 8 student (B, K) chunks against a (2, B, K) teacher
    student = logits(8 * B, K, dtype=dtype, seed=B)
    teacher = probs(2, B, K, dtype=dtype, seed=K)
    s_ref = _leaf(student.double())
    ref = official_dinov2_dino_forward(s_ref.chunk(8), teacher.double())
    (2.5 * ref).backward()
    s = _leaf(student)
    loss_fn = DINOLoss(K, backend="eager")
    out = loss_fn(s.chunk(8), teacher)
    (2.5 * out).backward()
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype]
    _grad_close(s.grad, s_ref.grad, dtype)
    assert loss_fn.last_backend == "eager"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dino_forward_global_layout_matches_official(dtype):
    # DINOv2's global call: [student (2B, K)] against [teacher flattened (2B, K)]
    B, K = 5, 257
    student = logits(2 * B, K, dtype=dtype, seed=5)
    teacher = probs(2 * B, K, dtype=dtype, seed=6)
    s_ref = _leaf(student.double())
    ref = official_dinov2_dino_forward([s_ref], [teacher.double()])
    ref.backward()
    s = _leaf(student)
    out = DINOLoss(K)([s], [teacher])
    out.backward()
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype]
    _grad_close(s.grad, s_ref.grad, dtype)


@pytest.mark.parametrize("layout", ["chunks", "reversed", "detached", "strided"])
def test_dino_forward_reads_chunks_of_one_tensor_in_place_and_other_lists_by_copy(layout):
    # chunks of a non-leaf head output are read as the whole tensor (no copy); any other list
    # (out of order, detached, not contiguous) is concatenated: the same loss and gradient
    B, K, V = 3, 21, 4
    w = _leaf(logits(V * B, K, seed=60))
    x = w * 1.0  # a non-leaf output, as the head's
    pieces = {"chunks": lambda: list(x.chunk(V)), "reversed": lambda: list(x.chunk(V))[::-1],
              "detached": lambda: list(x.detach().chunk(V)),
              "strided": lambda: list(x.t().contiguous().t().chunk(V))}[layout]()
    teacher = probs(2, B, K, seed=61)
    loss_fn = DINOLoss(K)
    out = loss_fn(pieces, teacher)
    ref = official_dinov2_dino_forward([p.double() for p in pieces], teacher.double())
    assert rel_rms(out, ref) <= LOSS_RTOL[torch.float32]
    if layout == "detached":
        assert not out.requires_grad
        return
    out.backward()
    w_ref = _leaf(w.double())
    x_ref = w_ref * 1.0
    ref_pieces = list(x_ref.chunk(V))
    if layout == "reversed":
        ref_pieces = ref_pieces[::-1]
    official_dinov2_dino_forward(ref_pieces, teacher.double()).backward()
    _grad_close(w.grad, w_ref.grad, torch.float32)


def test_dino_center_update_is_applied_at_the_next_softmax_center_teacher():
    K = 31
    loss_fn, ref = DINOLoss(K, center_momentum=0.8), OfficialCenter(K, 0.8)
    for step in range(3):
        t = logits(6, K, scale=2.0, seed=10 + step)
        q = loss_fn.softmax_center_teacher(t, 0.07)
        ref.apply()
        assert q.dtype == torch.float32
        assert rel_rms(q, torch.softmax((t.double() - ref.center) / 0.07, -1)) <= PROB_RTOL
        loss_fn.update_center(t)
        ref.update(t)
        # pending until the next softmax_center_teacher, as the official
        assert loss_fn.updated is False
        assert rel_rms(loss_fn.center, ref.center) <= CENTER_RTOL or step == 0
    before = loss_fn.center.clone()
    assert torch.equal(loss_fn.state_dict()["center"], before)  # the pending update is not in it
    loss_fn.apply_center_update()
    ref.apply()
    assert not torch.equal(loss_fn.center, before)
    assert rel_rms(loss_fn.center, ref.center) <= CENTER_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dino_center_of_a_low_precision_teacher_is_fp32(dtype):
    t = logits(10, 100, dtype=dtype, scale=3.0)
    loss_fn, ref = DINOLoss(100), OfficialCenter(100)
    loss_fn.update_center(t)
    loss_fn.apply_center_update()
    ref.update(t)
    ref.apply()
    assert loss_fn.center.dtype == torch.float32
    assert rel_rms(loss_fn.center, ref.center) <= CENTER_RTOL


def test_state_dicts_have_the_official_layout():
    assert {k: v.shape for k, v in DINOLoss(70).state_dict().items()} == {
        "center": torch.Size([1, 70])}
    assert {k: v.shape for k, v in iBOTPatchLoss(70).state_dict().items()} == {
        "center": torch.Size([1, 1, 70])}
    assert KoLeoLoss().state_dict() == {}
    assert torch.equal(DINOLoss(70).center, torch.zeros(1, 70))
    # an official checkpoint loads, and the buffer keeps its identity through updates
    loss_fn = iBOTPatchLoss(70)
    buf = loss_fn.center
    loss_fn.load_state_dict({"center": torch.randn(1, 1, 70)})
    loss_fn.update_center(logits(2, 3, 70))
    loss_fn.apply_center_update()
    assert loss_fn.center is buf


def test_dino_sinkhorn_method_matches_official():
    x = logits(12, 40, scale=1.0, seed=7)
    loss_fn = DINOLoss(40)
    assert rel_rms(loss_fn.sinkhorn_knopp_teacher(x, 0.05),
                   official_sinkhorn_knopp(x.double(), 0.05)) <= PROB_RTOL
    assert loss_fn.updated is True  # the SK teacher does not touch the center


# ----------------------------------------------------------------------------- iBOT loss

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K", [(3, 5, 7), (2, 4, 1025), (1, 1, 16)])
def test_ibot_forward_matches_official(B, N, K, dtype):
    student = logits(B, N, K, dtype=dtype, seed=N)
    teacher = probs(B, N, K, dtype=dtype, seed=K)
    m = masks(B, N, seed=B, empty_image=B > 1)  # image 0 without a masked patch
    s_ref = _leaf(student.double())
    ref = official_ibot_forward(s_ref, teacher.double(), m)
    ref.backward()
    s = _leaf(student)
    out = iBOTPatchLoss(K, backend="eager")(s, teacher, m)
    out.backward()
    assert out.dtype == torch.float32
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype]
    _grad_close(s.grad, s_ref.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [7, 1025])
def test_ibot_forward_masked_default_weights_match_official(K, dtype):
    m = masks(4, 9, seed=K)  # image 0 has no masked patch
    M = int(m.sum())
    student = logits(M, K, dtype=dtype, seed=1)
    teacher = probs(M, K, dtype=dtype, seed=2)
    s_ref = _leaf(student.double())
    ref = official_ibot_forward_masked(s_ref, teacher.double(), m)
    ref.backward()
    s = _leaf(student)
    out = iBOTPatchLoss(K).forward_masked(s, teacher, m)
    out.backward()
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype]
    _grad_close(s.grad, s_ref.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ibot_forward_masked_with_n_masked_patches_below_the_rows_given(dtype):
    # DINOv3's call: a buffer of M rows of which the first n count, weights from the collate
    m = masks(3, 8, seed=3)
    n = int(m.sum())
    M, K = n + 4, 65
    student = logits(M, K, dtype=dtype, seed=4)
    teacher = probs(M, K, dtype=dtype, seed=5)
    w = official_masks_weight(m)
    s_ref = _leaf(student.double())
    ref = official_ibot_forward_masked(s_ref, teacher.double(), m, n_masked_patches=n,
                                       masks_weight=w.double())
    ref.backward()
    s = _leaf(student)
    out = iBOTPatchLoss(K).forward_masked(s, teacher, m, n_masked_patches=n, masks_weight=w)
    out.backward()
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype]
    _grad_close(s.grad, s_ref.grad, dtype)
    assert torch.count_nonzero(s.grad[n:]) == 0


def test_ibot_forward_masked_one_row():
    m = torch.zeros(2, 3, dtype=torch.bool)
    m[1, 2] = True
    student, teacher = logits(1, 9), probs(1, 9)
    ref = official_ibot_forward_masked(student.double(), teacher.double(), m)
    out = iBOTPatchLoss(9).forward_masked(student, teacher, m)
    assert rel_rms(out, ref) <= LOSS_RTOL[torch.float32]


def test_ibot_center_update_and_state():
    K = 20
    loss_fn, ref = iBOTPatchLoss(K, center_momentum=0.7), OfficialCenter(K, 0.7, patch=True)
    for step in range(2):
        t = logits(3, 6, K, scale=2.0, seed=20 + step)
        q = loss_fn.softmax_center_teacher(t, 0.05)
        ref.apply()
        assert q.shape == (3, 6, K)
        assert rel_rms(q, torch.softmax((t.double() - ref.center) / 0.05, -1)) <= PROB_RTOL
        loss_fn.update_center(t)
        ref.update(t)
    loss_fn.apply_center_update()
    ref.apply()
    assert loss_fn.center.shape == (1, 1, K)
    assert rel_rms(loss_fn.center, ref.center) <= CENTER_RTOL
    # a 2-D teacher broadcasts against the (1, 1, K) center as in the official method
    assert loss_fn.softmax_center_teacher(logits(5, K), 0.05).shape == (1, 5, K)


def test_ibot_sinkhorn_without_a_process_group_leaves_n_masked_patches_alone():
    x = logits(11, 30, scale=2.0, seed=8)
    n_tensor = torch.full((1,), 11, dtype=torch.long)
    q = iBOTPatchLoss(30).sinkhorn_knopp_teacher(x, 0.04, n_tensor)
    assert torch.equal(n_tensor, torch.tensor([11]))
    ref = official_sinkhorn_knopp(x.double(), 0.04, n_samples=11)
    assert rel_rms(q, ref) <= PROB_RTOL
    # the official B only scales intermediate values: any B gives the same teacher
    assert rel_rms(official_sinkhorn_knopp(x.double(), 0.04, n_samples=3), ref) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_ibot_loss_from_logits_and_sk_center_equals_forward_masked_on_sk_probs(dtype):
    m = masks(3, 10, seed=9)
    n = int(m.sum())
    student = logits(n + 2, 33, dtype=dtype, seed=10)
    teacher_logits = logits(n + 2, 33, dtype=dtype, scale=4.0, seed=11)  # official SK: NaN
    w = official_masks_weight(m)
    loss_fn = iBOTPatchLoss(33)
    q = loss_fn.sinkhorn_knopp_teacher(teacher_logits, 0.04, torch.tensor([n + 2]))
    s1 = _leaf(student)
    ref = loss_fn.forward_masked(s1, q, m, n_masked_patches=n, masks_weight=w)
    ref.backward()
    c = sinkhorn_knopp_center(teacher_logits, 0.04)
    s2 = _leaf(student)
    out = ibot_masked_loss(s2, teacher_logits, w, m.shape[0], student_temp=0.1,
                           teacher_temp=0.04, center=c, n_masked_patches=n)
    out.backward()
    assert rel_rms(out, ref) <= 1e-5
    assert rel_rms(s2.grad, s1.grad) <= GRAD_RTOL[dtype]


# ---------------------------------------------------------------------------------- KoLeo

@pytest.mark.parametrize("B,D", [(2, 3), (16, 64), (33, 7)])
def test_koleo_matches_official_fp32(B, D):
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(B))
    x_ref = _leaf(x.double())
    ref = official_koleo(x_ref)
    ref.backward()
    xs = _leaf(x)
    out = KoLeoLoss()(xs)
    out.backward()
    assert out.dtype == torch.float32
    assert rel_rms(out, ref) <= 1e-5
    assert rel_rms(xs.grad, x_ref.grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_koleo_low_precision_computes_in_fp32(dtype):
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    xs = _leaf(x)
    out = KoLeoLoss()(xs)
    out.backward()
    assert out.dtype == torch.float32 and xs.grad.dtype == dtype
    assert rel_rms(out, official_koleo(x.double())) <= 1e-5


def test_koleo_duplicates_are_finite_where_official_fp16_is_not():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    x[3] = x[1]  # exact neighbours: distance 0 up to the 1e-8 of PairwiseDistance
    x16 = x.half()
    assert torch.isinf(official_koleo(x16))  # fp16 rounds eps = 1e-8 to 0: -log(0)
    xs = _leaf(x16)
    out = KoLeoLoss()(xs)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(xs.grad).all()
    # the official formula, evaluated in fp32, is finite here and ours equals it
    assert rel_rms(out, official_koleo(x16.float())) <= 1e-6


def test_koleo_zero_row_has_a_finite_gradient_in_fp32():
    # official fp16 normalises a zero row to 0 / 0 = NaN; in fp32 the row maps to 0 and its
    # gradient is that of x / eps: large (~1/eps) but finite, as the official fp32 gradient
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    x[2] = 0.0
    assert torch.isnan(official_koleo(x.half()))
    xs, x_ref = _leaf(x), _leaf(x.double())
    out = KoLeoLoss()(xs)
    out.backward()
    official_koleo(x_ref).backward()
    assert torch.isfinite(xs.grad).all()
    assert rel_rms(out, official_koleo(x.double())) <= 1e-6
    assert rel_rms(xs.grad, x_ref.grad) <= 1e-5


# ------------------------------------------------------------------------ bad input

def _dino_calls():
    K = 16
    t = logits(4, K)
    return [
        (lambda f: f.softmax_center_teacher(logits(4, K + 1), 0.07), "out_dim", ValueError),
        (lambda f: f.softmax_center_teacher(t.long(), 0.07), "teacher_output", TypeError),
        (lambda f: f.softmax_center_teacher(t, 0.0), "teacher_temp", ValueError),
        (lambda f: f.update_center(logits(2, 2, K)), "teacher_output", ValueError),
        (lambda f: f.update_center(logits(4, 3)), "out_dim", ValueError),
        (lambda f: f.reduce_center_update(logits(3, K + 1)), "out_dim", ValueError),
        (lambda f: f.reduce_center_update(logits(2, 2, K)), "teacher_output", ValueError),
        (lambda f: f.reduce_center_update(t.long()), "teacher_output", TypeError),
        (lambda f: f.sinkhorn_knopp_teacher(t, 0.07, n_iterations=0), "n_iterations",
         ValueError),
        (lambda f: f.sinkhorn_knopp_teacher(t, -1.0), "teacher_temp", ValueError),
        (lambda f: f([logits(4, K)], [logits(3, K)]), "rows", ValueError),
        (lambda f: f([logits(4, K), logits(5, K)], [t]), r"student_output_list\[0\]",
         ValueError),
        (lambda f: f([], [t]), "student_output_list", TypeError),
        (lambda f: f([t.int()], [t]), r"student_output_list\[0\]", TypeError),
        (lambda f: f([logits(4, K + 2)], [t]), "out_dim", ValueError),
    ]


@pytest.mark.parametrize("call,name,exc", _dino_calls())
def test_dino_bad_input_names_the_argument_and_changes_nothing(call, name, exc):
    loss_fn = DINOLoss(16)
    loss_fn.update_center(logits(4, 16))  # a pending update must survive the bad call
    before = loss_fn.center.clone()
    pending = loss_fn.async_batch_center.clone()
    with pytest.raises(exc, match=name):
        call(loss_fn)
    assert torch.equal(loss_fn.center, before) and loss_fn.updated is False
    assert torch.equal(loss_fn.async_batch_center, pending)
    assert loss_fn.last_backend is None


def _ibot_calls():
    K = 12
    m = masks(2, 5, seed=1)
    n = int(m.sum())
    s, t = logits(n, K), probs(n, K)
    w = official_masks_weight(m)
    return [
        (lambda f: f.forward_masked(s, t, m, n_masked_patches=n + 1), "n_masked_patches",
         ValueError),
        (lambda f: f.forward_masked(s, t, m, n_masked_patches=-1), "n_masked_patches",
         ValueError),
        (lambda f: f.forward_masked(s, t, m, n_masked_patches=n - 1), "masked patches",
         ValueError),
        (lambda f: f.forward_masked(s, t, m.float()), "student_masks_flat", TypeError),
        (lambda f: f.forward_masked(s, t, m[0]), "student_masks_flat", ValueError),
        (lambda f: f.forward_masked(s, t[:-1], m, masks_weight=w), "teacher_patch_tokens_masked",
         ValueError),
        (lambda f: f.forward_masked(s, t, m, masks_weight=w[:-1]), "masks_weight", ValueError),
        (lambda f: f.forward_masked(s, t, m, masks_weight=w.long()), "masks_weight", TypeError),
        (lambda f: f.forward_masked(logits(n, K + 1), t, m), "patch_out_dim", ValueError),
        (lambda f: f(logits(2, 5, K), probs(2, 5, K), m[:, :4]), "student_masks_flat",
         ValueError),
        (lambda f: f(logits(2, 5, K), probs(2, 4, K), m), "teacher_patch_tokens", ValueError),
        (lambda f: f.update_center(logits(5, K)), "teacher_patch_tokens", ValueError),
        (lambda f: f.reduce_center_update(logits(6, K)), "teacher_patch_tokens", ValueError),
        (lambda f: f.reduce_center_update(logits(2, 5, K + 1)), "patch_out_dim", ValueError),
        (lambda f: f.softmax_center_teacher(logits(2, 5, K).long(), 0.05), "teacher_patch_tokens",
         TypeError),
        (lambda f: f.softmax_center_teacher(logits(2, 5, K + 1), 0.05), "patch_out_dim",
         ValueError),
        (lambda f: f.sinkhorn_knopp_teacher(t, 0.04, n), "n_masked_patches_tensor", TypeError),
        (lambda f: f.sinkhorn_knopp_teacher(logits(n, K + 1), 0.04, torch.tensor([n])),
         "patch_out_dim", ValueError),
    ]


@pytest.mark.parametrize("call,name,exc", _ibot_calls())
def test_ibot_bad_input_names_the_argument_and_changes_nothing(call, name, exc):
    loss_fn = iBOTPatchLoss(12)
    loss_fn.update_center(logits(2, 5, 12))
    before = loss_fn.center.clone()
    pending = loss_fn.async_batch_center.clone()
    with pytest.raises(exc, match=name):
        call(loss_fn)
    assert torch.equal(loss_fn.center, before) and loss_fn.updated is False
    assert torch.equal(loss_fn.async_batch_center, pending)
    assert loss_fn.last_backend is None


@pytest.mark.parametrize("cls,kwargs,name,exc", [
    (DINOLoss, dict(out_dim=0), "out_dim", ValueError),
    (DINOLoss, dict(out_dim=8, student_temp=0), "student_temp", ValueError),
    (DINOLoss, dict(out_dim=8, center_momentum=1.5), "center_momentum", ValueError),
    (DINOLoss, dict(out_dim=8, backend="cuda"), "backend", ValueError),
    (iBOTPatchLoss, dict(patch_out_dim=2.0), "patch_out_dim", TypeError),
    (KoLeoLoss, dict(backend="triton"), "backend", ValueError),
])
def test_bad_constructor_argument_raises_naming_it(cls, kwargs, name, exc):
    with pytest.raises(exc, match=name):
        cls(**kwargs)


def test_koleo_bad_input():
    with pytest.raises(ValueError, match="student_output"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(TypeError, match="student_output"):
        KoLeoLoss()(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        KoLeoLoss()(torch.randn(3, 4), eps=0.0)


def test_mixed_devices_are_refused(monkeypatch):
    loss_fn = DINOLoss(8)
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="teacher_output is on meta"):
        loss_fn.softmax_center_teacher(meta, 0.07)
    with pytest.raises(ValueError, match="center is on cpu"):
        ibot_masked_loss(torch.empty(3, 8, device="meta"), torch.empty(3, 8, device="meta"),
                         torch.empty(3, device="meta"), 1, student_temp=0.1, teacher_temp=0.04,
                         center=torch.zeros(8))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    loss_fn = DINOLoss(8, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        loss_fn([logits(2, 8)], [probs(2, 8)])
    assert loss_fn.last_backend is None


# ------------------------------------------------------------------------ 2 processes

def _run_all(cls_x, patch_x, n_patch_rows, world):
    """The SK teachers and both centers (two asynchronous updates), on this process's rows."""
    out = {}
    v2_dino, v2_ibot = DINOLoss(cls_x.shape[1]), iBOTPatchLoss(patch_x.shape[-1])
    v3_dino = dinov3.DINOLoss(cls_x.shape[1])
    v3_dino.init_weights()
    out["sk_cls"] = v2_dino.sinkhorn_knopp_teacher(cls_x, 0.04)
    out["sk_cls_v3"] = v3_dino.sinkhorn_knopp_teacher(cls_x, 0.04)
    flat = patch_x.flatten(0, 1)
    n_tensor = torch.tensor([n_patch_rows])
    out["sk_patch"] = v2_ibot.sinkhorn_knopp_teacher(flat, 0.04, n_tensor)
    out["n_masked"] = n_tensor
    out["sk_center"] = sinkhorn_knopp_center(flat, 0.04)
    if world > 1:  # the collectives of one SK call: a MAX, then one SUM per iteration, K floats
        calls, all_reduce = [], dist.all_reduce
        dist.all_reduce = lambda t, *a, **kw: calls.append((t.numel(), str(kw.get("op")))) or \
            all_reduce(t, *a, **kw)
        try:
            sinkhorn_knopp_center(flat, 0.04, n_iterations=3)
        finally:
            dist.all_reduce = all_reduce
        out["collectives"] = calls
    for step in range(2):
        v2_dino.softmax_center_teacher(cls_x, 0.07)
        v2_ibot.softmax_center_teacher(patch_x, 0.07)
        v2_dino.update_center(cls_x * (step + 1))
        v2_ibot.update_center(patch_x * (step + 1))
    v2_dino.apply_center_update()
    v2_ibot.apply_center_update()
    out["center"], out["patch_center"] = v2_dino.center, v2_ibot.center
    return out


def _gloo_worker(rank, world, port, cls_x, patch_x, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = cls_x.shape[0] // world
        b = patch_x.shape[0] // world
        local_patch = patch_x[rank * b:(rank + 1) * b]
        torch.save(_run_all(cls_x[rank * n:(rank + 1) * n], local_patch,
                            local_patch.shape[0] * local_patch.shape[1], world),
                   f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_the_concatenated_batch(tmp_path):
    world = 2
    cls_x = logits(2 * 6, 37, scale=6.0, seed=30)  # x / tau up to 150: official SK is NaN
    patch_x = logits(2 * 2, 5, 37, scale=2.0, seed=31)
    result = str(tmp_path / "out")
    mp.spawn(_gloo_worker, args=(world, free_port(), cls_x, patch_x, result), nprocs=world,
             join=True)
    single = _run_all(cls_x, patch_x, 20, 1)
    for rank in range(world):
        got = torch.load(f"{result}.{rank}")
        n, m = 6, 10
        for key, rows in (("sk_cls", slice(rank * n, (rank + 1) * n)),
                          ("sk_cls_v3", slice(rank * n, (rank + 1) * n)),
                          ("sk_patch", slice(rank * m, (rank + 1) * m))):
            assert rel_rms(got[key], single[key][rows]) <= PROB_RTOL, key
        torch.testing.assert_close(got["sk_center"] - got["sk_center"].mean(),
                                   single["sk_center"] - single["sk_center"].mean(),
                                   rtol=1e-5, atol=1e-5)
        assert got["n_masked"].item() == 20  # all-reduced in place, as the official
        K = cls_x.shape[1]
        max_op, sum_op = str(dist.ReduceOp.MAX), str(dist.ReduceOp.SUM)
        assert got["collectives"] == [(K, max_op)] + [(K, sum_op)] * 3
        torch.testing.assert_close(got["center"], single["center"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["patch_center"], single["patch_center"], rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("name", ["dino_fast.dinov2", "dino_fast.sinkhorn"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------ Triton path (interpreter on CPU)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dino_forward_matches_official(dtype):
    B, K = 2, 33
    student = logits(4 * B, K, dtype=dtype, seed=40)
    teacher = probs(2, B, K, dtype=dtype, seed=41)
    s_ref = _leaf(student.double())
    ref = official_dinov2_dino_forward(s_ref.chunk(4), teacher.double())
    ref.backward()
    s = _leaf(student)
    loss_fn = DINOLoss(K, backend="triton")
    out = loss_fn(s.chunk(4), teacher)
    out.backward()
    assert loss_fn.last_backend == "triton"
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype]
    _grad_close(s.grad, s_ref.grad, dtype)


@needs_triton
def test_triton_ibot_forward_and_forward_masked_match_official():
    m = masks(3, 4, seed=42)  # image 0 has no masked patch
    n, K = int(m.sum()), 17
    loss_fn = iBOTPatchLoss(K, backend="triton")
    student, teacher = logits(n + 2, K, seed=43), probs(n + 2, K, seed=44)
    w = official_masks_weight(m)
    s, s_ref = _leaf(student), _leaf(student.double())
    out = loss_fn.forward_masked(s, teacher, m, n_masked_patches=n, masks_weight=w)
    ref = official_ibot_forward_masked(s_ref, teacher.double(), m, n, w.double())
    out.backward()
    ref.backward()
    assert loss_fn.last_backend == "triton"
    assert rel_rms(out, ref) <= LOSS_RTOL[torch.float32]
    _grad_close(s.grad, s_ref.grad, torch.float32)
    student, teacher = logits(3, 4, K, seed=45), probs(3, 4, K, seed=46)
    s, s_ref = _leaf(student), _leaf(student.double())
    out = loss_fn(s, teacher, m)
    ref = official_ibot_forward(s_ref, teacher.double(), m)
    out.backward()
    ref.backward()
    assert rel_rms(out, ref) <= LOSS_RTOL[torch.float32]
    _grad_close(s.grad, s_ref.grad, torch.float32)


@needs_triton
def test_triton_ibot_loss_from_logits_and_sk_center():
    m = masks(2, 5, seed=47)
    n, K = int(m.sum()), 20
    student, t_logits = logits(n, K, seed=48), logits(n, K, scale=5.0, seed=49)
    w = official_masks_weight(m)
    q = sinkhorn_knopp_probs(t_logits, 0.04)
    ref = official_ibot_forward_masked(student.double(), q.double(), m, masks_weight=w.double())
    out = ibot_masked_loss(student, t_logits, w, 2, student_temp=0.1, teacher_temp=0.04,
                           center=sinkhorn_knopp_center(t_logits, 0.04), backend="triton")
    assert rel_rms(out, ref) <= 1e-5
