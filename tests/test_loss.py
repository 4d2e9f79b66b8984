"""DINOLoss, eager path: exactness against the literal official double loop, center update,
schedule, state dict, distributed center and input validation."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from dino_fast import DINOLoss, dino_loss_eager

from reference import GRAD_RTOL, LOSS_RTOL, make_logits, official_dino_loss, rel_rms

# (batch, ncrops, out_dim): awkward ones included (B = 1, 2 crops only, K = 1, K not a power of
# two, 2 + 10 crops)
SHAPES = [(1, 2, 7), (3, 4, 33), (2, 12, 100), (4, 10, 1), (5, 3, 257), (1, 12, 64)]


def _loss(out_dim, ncrops, **kw):
    args = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                nepochs=10)
    args.update(kw)
    return DINOLoss(out_dim, ncrops, backend="eager", **args)


def _check_against_official(batch, ncrops, out_dim, dtype, epoch=1, grad_scale=2.5,
                            teacher_scale=1.0):
    student, teacher, center = make_logits(batch, ncrops, out_dim, dtype, teacher_scale)
    loss_mod = _loss(out_dim, ncrops)
    loss_mod.center.copy_(center)
    temp = float(loss_mod.teacher_temp_schedule[epoch])

    ref_s = student.detach().double().requires_grad_()
    ref = official_dino_loss(ref_s, teacher.double(), center.double(), ncrops, 0.1, temp)
    (ref * grad_scale).backward()

    s = student.detach().clone().requires_grad_()
    out = loss_mod(s, teacher, epoch)
    (out * grad_scale).backward()

    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ()
    assert s.grad.dtype == dtype
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype], (out.item(), ref.item())
    assert rel_rms(s.grad, ref_s.grad) <= GRAD_RTOL[dtype]
    assert loss_mod.last_backend == "eager"


@pytest.mark.parametrize("batch,ncrops,out_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_eager_matches_official_double_loop(batch, ncrops, out_dim, dtype):
    _check_against_official(batch, ncrops, out_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_is_stable_for_teacher_logits_near_50_after_centering(dtype):
    # teacher logits in [-2, 2] at tau_t = 0.04: (T - c) / tau_t reaches +-50
    _check_against_official(4, 6, 129, dtype, epoch=0, teacher_scale=2.0)


def test_eager_matches_official_at_large_out_dim():
    _check_against_official(2, 4, 65536, torch.float32)


def test_gradcheck_fp64():
    student, teacher, center = make_logits(2, 4, 9, torch.float64)
    student.requires_grad_()
    fn = lambda s: dino_loss_eager(s, teacher, center, 4, 0.1, 0.05)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8)


def test_teacher_gets_no_gradient_and_teacher_sum_is_fp32():
    student, teacher, center = make_logits(3, 4, 17, torch.bfloat16)
    teacher.requires_grad_()
    loss, row_sum = dino_loss_eager(student.requires_grad_(), teacher, center, 4, 0.1, 0.04)
    loss.backward()
    assert teacher.grad is None
    assert row_sum.dtype == torch.float32 and row_sum.shape == (17,)
    torch.testing.assert_close(row_sum, teacher.detach().float().sum(0), rtol=1e-6, atol=1e-5)


def _official_grad(student, teacher, center, ncrops, temp, grad_output=1.0):
    s = student.detach().double().requires_grad_()
    ref = official_dino_loss(s, teacher.double(), center.double(), ncrops, 0.1, temp)
    (ref * grad_output).backward()
    return ref.detach(), s.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad_output", [1.0, -3.0, 0.0])
def test_gradient_from_the_forward_is_scaled_by_grad_output(dtype, grad_output):
    # fp32/fp64 students get their gradient computed in the forward and handed over as is when
    # grad_output is exactly 1 (the usual loss.backward()), scaled otherwise
    student, teacher, center = make_logits(3, 5, 130, dtype)
    ref, ref_grad = _official_grad(student, teacher, center, 5, 0.04, grad_output)
    s = student.detach().clone().requires_grad_()
    loss, _ = dino_loss_eager(s, teacher, center, 5, 0.1, 0.04)
    assert loss.grad_fn.grad is not None  # built in the forward ...
    loss.backward(torch.tensor(grad_output, dtype=loss.dtype))
    assert loss.grad_fn.grad is None  # ... and handed over
    assert rel_rms(loss.detach(), ref) <= LOSS_RTOL[dtype]
    if grad_output == 0.0:
        assert torch.count_nonzero(s.grad) == 0
    else:
        assert rel_rms(s.grad, ref_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_retained_graph_gives_the_same_gradient_twice(dtype):
    # the first backward hands over the gradient made in the forward; a second one through the
    # retained graph must recompute it, not find it consumed or scaled in place
    student, teacher, center = make_logits(2, 4, 65, dtype)
    s = student.detach().clone().requires_grad_()
    x = s * 1.0  # a non-leaf student output, as the head's in training
    loss, _ = dino_loss_eager(x, teacher, center, 4, 0.1, 0.04)
    (g1,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x)
    _, ref_grad = _official_grad(student, teacher, center, 4, 0.04, 2.0)
    assert rel_rms(g1, ref_grad) <= GRAD_RTOL[dtype]
    torch.testing.assert_close(g2, g1, rtol=GRAD_RTOL[dtype], atol=0)
    assert rel_rms(g3 * 2.0, ref_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_change_the_loss_or_its_gradient(dtype, amp_dtype):
    # the training loop calls the loss inside autocast; on the CPU autocast would round the
    # row dots to bf16/fp16 (CUDA's does not): the loss computes in its inputs' dtype either way
    student, teacher, center = make_logits(4, 6, 257, dtype, teacher_scale=20.0)
    results = []
    for enabled in (False, True):
        s = student.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=amp_dtype, enabled=enabled):
            loss, _ = dino_loss_eager(s * 1.0, teacher, center, 6, 0.1, 0.04)
            (grad,) = torch.autograd.grad(loss * 3.0, s)  # a backward inside autocast too
        results.append((loss, grad))
    (plain, plain_grad), (amp, amp_grad) = results
    assert amp.dtype == plain.dtype and torch.equal(amp, plain)
    assert torch.equal(amp_grad, plain_grad)


def test_forward_without_gradient_gives_the_same_loss_and_builds_no_gradient(monkeypatch):
    student, teacher, center = make_logits(4, 6, 257)
    student.requires_grad_()
    with_grad, _ = dino_loss_eager(student, teacher, center, 6, 0.1, 0.04)
    sizes, empty = [], torch.empty

    def spy(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        sizes.append(math.prod(shape))
        return empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            plain, _ = dino_loss_eager(student, teacher, center, 6, 0.1, 0.04)
        assert plain.grad_fn is None
        assert torch.equal(plain, with_grad.detach())
    detached, _ = dino_loss_eager(student.detach(), teacher, center, 6, 0.1, 0.04)
    assert detached.grad_fn is None and torch.equal(detached, with_grad.detach())
    assert sizes and max(sizes) < student.numel()  # work buffers only, no gradient
    sizes.clear()
    dino_loss_eager(student, teacher, center, 6, 0.1, 0.04)
    # the spy sees the gradient when one is wanted, and no other buffer of that size
    assert sorted(sizes)[-1] == student.numel() and sorted(sizes)[-2] < student.numel()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [5.0, 20.0])
def test_loss_keeps_its_precision_when_a_large_student_agrees_with_the_teacher(dtype, scale):
    # large logits (norm_last_layer=False lets them grow) and every crop agreeing with a peaked
    # teacher: the loss (0.15 and 0.003 here) is tiny next to each row's log-sum-exp, so lse and
    # <Q, y> computed apart cancel (that formulation was 1e-4 and 6e-2 off in fp32)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 300, generator=g, dtype=torch.float64).to(dtype) * scale
    student, teacher = base.repeat(10, 1), base.repeat(2, 1) * 0.4
    center = torch.zeros(1, 300)
    ref, _ = _official_grad(student, teacher, center, 10, 0.04)
    loss, _ = dino_loss_eager(student.requires_grad_(), teacher, center, 10, 0.1, 0.04)
    # (the gradient, m p - Q with p and Q equally peaked, cancels in every formulation, the
    # official one included: nothing to compare there)
    assert rel_rms(loss.detach(), ref) <= LOSS_RTOL[dtype]


def test_center_after_n_steps_equals_independent_ema():
    torch.manual_seed(1)
    K, ncrops, B, m = 31, 4, 3, 0.9
    loss_mod = _loss(K, ncrops, center_momentum=m)
    expected = torch.zeros(1, K, dtype=torch.float64)
    for step in range(5):
        student = torch.randn(ncrops * B, K)
        teacher = torch.randn(2 * B, K)
        loss_mod(student, teacher, epoch=step)
        expected = expected * m + teacher.double().mean(0, keepdim=True) * (1 - m)
    torch.testing.assert_close(loss_mod.center.double(), expected, rtol=1e-6, atol=1e-7)
    assert loss_mod.center.dtype == torch.float32


def test_update_center_is_the_official_method():
    """update_center(teacher_output), as the official class: c <- m c + (1 - m) mean_rows(T),
    the same update as the one forward makes."""
    torch.manual_seed(2)
    K, m = 13, 0.9
    loss_mod, by_forward = _loss(K, 4, center_momentum=m), _loss(K, 4, center_momentum=m)
    start = torch.randn(1, K)
    loss_mod.center.copy_(start)
    by_forward.center.copy_(start)
    teacher = torch.randn(6, K)
    loss_mod.update_center(teacher)
    expected = start.double() * m + teacher.double().mean(0, keepdim=True) * (1 - m)
    torch.testing.assert_close(loss_mod.center.double(), expected, rtol=1e-6, atol=1e-7)
    by_forward(torch.randn(12, K), teacher, 0)
    torch.testing.assert_close(loss_mod.center, by_forward.center, rtol=1e-6, atol=1e-7)
    loss_mod.update_center(teacher.to(torch.bfloat16).requires_grad_())  # any float, no graph
    assert loss_mod.center.dtype == torch.float32 and not loss_mod.center.requires_grad


@pytest.mark.parametrize("make,name,exc", [
    (lambda: torch.randn(6, 12), "out_dim", ValueError),
    (lambda: torch.randn(6, 1), "out_dim", ValueError),  # would broadcast
    (lambda: torch.randn(13), "teacher_output", ValueError),
    (lambda: torch.randn(0, 13), "teacher_output", ValueError),
    (lambda: torch.randn(2, 6, 13), "teacher_output", ValueError),
    (lambda: torch.ones(6, 13, dtype=torch.int64), "teacher_output", TypeError),
    (lambda: torch.randn(6, 13).numpy(), "teacher_output", TypeError),
    (lambda: torch.randn(6, 13, device="meta"), "teacher_output", ValueError),
])
def test_update_center_checks_its_input_before_touching_the_center(make, name, exc):
    loss_mod = _loss(13, 4)
    loss_mod.center.copy_(torch.randn(1, 13))
    before = loss_mod.center.clone()
    with pytest.raises(exc, match=name):
        loss_mod.update_center(make())
    assert torch.equal(loss_mod.center, before)


def test_loss_uses_the_center_from_before_its_update():
    student, teacher, center = make_logits(2, 4, 23)
    loss_mod = _loss(23, 4)
    loss_mod.center.copy_(center)
    out = loss_mod(student, teacher, 0)
    ref = official_dino_loss(student.double(), teacher.double(), center.double(), 4, 0.1, 0.04)
    assert rel_rms(out, ref) < 1e-5
    assert not torch.equal(loss_mod.center, center)


def test_teacher_temp_schedule_warmup_start_middle_end_and_after():
    loss_mod = DINOLoss(8, 4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                        warmup_teacher_temp_epochs=31, nepochs=100)
    sched = loss_mod.teacher_temp_schedule
    assert isinstance(sched, np.ndarray) and sched.shape == (100,)
    assert sched[0] == pytest.approx(0.04)
    assert sched[15] == pytest.approx(0.055)
    assert sched[30] == pytest.approx(0.07)
    assert np.all(sched[31:] == 0.07)
    # no warm-up at all
    flat = DINOLoss(8, 4, 0.04, 0.07, 0, 5).teacher_temp_schedule
    assert np.all(flat == 0.07)


def test_epoch_selects_the_schedule_temperature():
    student, teacher, center = make_logits(2, 3, 12)
    loss_mod = _loss(12, 3)
    for epoch in (0, 1, 5):
        loss_mod.center.copy_(center)
        out = loss_mod(student, teacher, epoch)
        temp = float(loss_mod.teacher_temp_schedule[epoch])
        ref = official_dino_loss(student.double(), teacher.double(), center.double(), 3, 0.1, temp)
        assert rel_rms(out, ref) < 1e-5


def test_state_dict_round_trip_and_official_format():
    a = _loss(16, 4)
    a(torch.randn(8, 16), torch.randn(4, 16), 0)
    sd = a.state_dict()
    assert list(sd.keys()) == ["center"] and sd["center"].shape == (1, 16)
    b = _loss(16, 4)
    b.load_state_dict(sd)
    assert torch.equal(b.center, a.center)
    official = {"center": torch.full((1, 16), 0.25)}
    b.load_state_dict(official)
    assert torch.equal(b.center, official["center"])


def test_a_bf16_loss_module_keeps_an_fp32_center_for_fp32_inputs():
    loss_mod = _loss(10, 2)
    loss_mod(torch.randn(4, 10, dtype=torch.float16), torch.randn(4, 10, dtype=torch.float16), 0)
    assert loss_mod.center.dtype == torch.float32


# ---------------------------------------------------------------- bad input

def _bad_forward_cases():
    ok_s, ok_t = torch.randn(8, 16), torch.randn(4, 16)  # ncrops = 4, B = 2
    return [
        ("student_output", ValueError, lambda: (torch.randn(9, 16), ok_t, 0)),
        ("teacher_output", ValueError, lambda: (ok_s, torch.randn(6, 16), 0)),
        ("out_dim", ValueError, lambda: (torch.randn(8, 15), torch.randn(4, 15), 0)),
        ("out_dim", ValueError, lambda: (ok_s, torch.randn(4, 15), 0)),
        ("epoch", ValueError, lambda: (ok_s, ok_t, 10)),
        ("epoch", ValueError, lambda: (ok_s, ok_t, -1)),
        ("epoch", TypeError, lambda: (ok_s, ok_t, 1.5)),
        ("student_output", TypeError, lambda: (ok_s.long(), ok_t, 0)),
        ("teacher_output", TypeError, lambda: (ok_s, ok_t.int(), 0)),
        ("student_output", ValueError, lambda: (ok_s.view(8, 4, 4), ok_t, 0)),
        ("teacher_output", ValueError, lambda: (ok_s, ok_t.view(4, 4, 4), 0)),
        ("student_output", TypeError, lambda: (ok_s.numpy(), ok_t, 0)),
        ("teacher_output", ValueError, lambda: (ok_s, ok_t.to("meta"), 0)),
        ("center", ValueError, lambda: (ok_s.to("meta"), ok_t.to("meta"), 0)),
    ]


@pytest.mark.parametrize("name,exc,make", _bad_forward_cases(),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_forward_cases())])
def test_bad_forward_input_raises_naming_the_argument_and_leaves_center(name, exc, make):
    loss_mod = _loss(16, 4)
    loss_mod.center.copy_(torch.randn(1, 16))
    before = loss_mod.center.clone()
    student, teacher, epoch = make()
    with pytest.raises(exc, match=name):
        loss_mod(student, teacher, epoch)
    assert torch.equal(loss_mod.center, before)
    assert loss_mod.last_backend is None


@pytest.mark.parametrize("kwargs,name,exc", [
    (dict(ncrops=1), "ncrops", ValueError),
    (dict(ncrops=2.0), "ncrops", TypeError),
    (dict(out_dim=0), "out_dim", ValueError),
    (dict(teacher_temp=0.0), "teacher_temp", ValueError),
    (dict(warmup_teacher_temp=-0.04), "warmup_teacher_temp", ValueError),
    (dict(student_temp=0), "student_temp", ValueError),
    (dict(student_temp=float("nan")), "student_temp", ValueError),
    (dict(center_momentum=1.5), "center_momentum", ValueError),
    (dict(center_momentum=-0.1), "center_momentum", ValueError),
    (dict(warmup_teacher_temp_epochs=11), "warmup_teacher_temp_epochs", ValueError),
    (dict(nepochs=0), "nepochs", ValueError),
    (dict(backend="cuda"), "backend", ValueError),
])
def test_bad_constructor_argument_raises_naming_it(kwargs, name, exc):
    args = dict(out_dim=16, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=3, nepochs=10)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        DINOLoss(**args)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    loss_mod = DINOLoss(16, 4, 0.04, 0.07, 3, 10, backend="triton")
    before = loss_mod.center.clone()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        loss_mod(torch.randn(8, 16), torch.randn(4, 16), 0)
    assert torch.equal(loss_mod.center, before)


def test_auto_backend_picks_eager_on_cpu():
    loss_mod = DINOLoss(16, 4, 0.04, 0.07, 3, 10)
    loss_mod(torch.randn(8, 16), torch.randn(4, 16), 0)
    assert loss_mod.last_backend == "eager"


# ---------------------------------------------------------------- distributed center

def _center_worker(rank, world, port, student, teacher, async_center, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ncrops, B = 4, teacher.shape[0] // 2 // world
        K = teacher.shape[1]
        # each rank holds its own slice of every crop (crop-major within the rank)
        s_local = student.view(ncrops, world, B, K)[:, rank].reshape(ncrops * B, K)
        t_local = teacher.view(2, world, B, K)[:, rank].reshape(2 * B, K)
        loss_mod = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, backend="eager",
                            async_center=async_center)
        loss_mod(s_local, t_local, 0)
        loss_mod(s_local, t_local, 1)
        loss_mod.synchronize_center()
        torch.save(loss_mod.center, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("async_center", [False, True])
def test_two_process_gloo_center_equals_single_process_center(tmp_path, async_center):
    world, ncrops, B, K = 2, 4, 3, 20
    student = torch.randn(ncrops * world * B, K)
    teacher = torch.randn(2 * world * B, K)
    result = str(tmp_path / "center")
    mp.spawn(_center_worker, args=(world, free_port(), student, teacher, async_center, result),
             nprocs=world, join=True)
    single = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, backend="eager")
    single(student, teacher, 0)
    single(student, teacher, 1)
    for rank in range(world):
        torch.testing.assert_close(torch.load(f"{result}.{rank}"), single.center,
                                   rtol=1e-6, atol=1e-7)
