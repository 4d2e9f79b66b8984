"""dino_fast.dinov3 against the literal official formulas: the [S, B, K] DINO loss with and
without ignore_diagonal, the functional loss from teacher logits + center, the NaN-initialised
centers, iBOT, KoLeo and Gram over dtypes and awkward shapes, and input validation."""
import doctest
import importlib
import math

import pytest
import torch

from dino_fast import dinov2
from dino_fast.backend import triton_available
from dino_fast.dinov3 import DINOLoss, GramLoss, KoLeoLoss, dino_crops_loss, iBOTPatchLoss
from dino_fast.sinkhorn import sinkhorn_knopp_center

from dinov_reference import (
    CENTER_RTOL,
    GRAD_RTOL,
    LOSS_RTOL,
    PROB_RTOL,
    OfficialCenter,
    logits,
    masks,
    official_dinov3_dino_forward,
    official_gram,
    official_ibot_forward_masked,
    official_masks_weight,
    official_sinkhorn_knopp,
    probs,
    rel_rms,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check(out, s, ref, s_ref, dtype):
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ()
    assert rel_rms(out, ref) <= LOSS_RTOL[dtype], (out.item(), ref.item())
    assert s.grad.dtype == dtype
    assert rel_rms(s.grad, s_ref.grad) <= GRAD_RTOL[dtype]


# ------------------------------------------------------------------------------- DINOLoss

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("S,T,B,K,ignore_diagonal", [
    (8, 2, 3, 7, False),     # local crops vs the 2 global teacher crops
    (2, 2, 4, 1025, True),   # global crops, diagonal left out
    (2, 2, 1, 64, False),
    (3, 2, 2, 33, True),     # more student than teacher crops: min(S, T) diagonal pairs
    (1, 3, 2, 9, True),
])
def test_dino_forward_matches_official(S, T, B, K, ignore_diagonal, dtype):
    student = logits(S, B, K, dtype=dtype, seed=S + K)
    teacher = probs(T, B, K, dtype=dtype, seed=B)
    s_ref = _leaf(student.double())
    ref = official_dinov3_dino_forward(s_ref, teacher.double(), ignore_diagonal)
    (ref * 1.5).backward()
    s = _leaf(student)
    loss_fn = DINOLoss(K, backend="eager")
    out = loss_fn(s, teacher, ignore_diagonal=ignore_diagonal)
    (out * 1.5).backward()
    _check(out, s, ref, s_ref, dtype)
    assert loss_fn.last_backend == "eager"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_loss_from_logits_and_sk_center_equals_forward_on_sk_probs(dtype, ignore_diagonal):
    S, T, B, K = 2, 2, 5, 129
    student = logits(S, B, K, dtype=dtype, seed=1)
    t_logits = logits(T, B, K, dtype=dtype, scale=5.0, seed=2)  # x / tau up to 125
    loss_fn = DINOLoss(K)
    q = loss_fn.sinkhorn_knopp_teacher(t_logits.flatten(0, 1), 0.04).unflatten(0, (T, B))
    assert torch.isfinite(q).all()
    s1 = _leaf(student)
    ref = loss_fn(s1, q, ignore_diagonal=ignore_diagonal)
    ref.backward()
    c = sinkhorn_knopp_center(t_logits.flatten(0, 1), 0.04)
    s2 = _leaf(student)
    out = dino_crops_loss(s2, t_logits, student_temp=0.1, teacher_temp=0.04, center=c,
                          ignore_diagonal=ignore_diagonal)
    out.backward()
    assert rel_rms(out, ref) <= 1e-5
    assert rel_rms(s2.grad, s1.grad) <= GRAD_RTOL[dtype]


def test_dino_sinkhorn_method_matches_official():
    x = logits(12, 50, scale=2.0, seed=3)
    q = DINOLoss(50).sinkhorn_knopp_teacher(x, 0.05, n_iterations=4)
    assert rel_rms(q, official_sinkhorn_knopp(x.double(), 0.05, 4)) <= PROB_RTOL


def test_centers_start_as_nan_until_init_weights_as_official():
    dino, ibot = DINOLoss(11), iBOTPatchLoss(11)
    assert dino.center.shape == (1, 11) and ibot.center.shape == (1, 1, 11)
    assert torch.isnan(dino.center).all() and torch.isnan(ibot.center).all()
    dino.init_weights()
    ibot.init_weights()
    assert torch.equal(dino.center, torch.zeros(1, 11))
    assert torch.equal(ibot.center, torch.zeros(1, 1, 11))
    assert {k: v.shape for k, v in dino.state_dict().items()} == {"center": (1, 11)}
    assert {k: v.shape for k, v in ibot.state_dict().items()} == {"center": (1, 1, 11)}
    assert GramLoss().state_dict() == {} and KoLeoLoss is dinov2.KoLeoLoss


@pytest.mark.parametrize("patch", [False, True])
def test_update_centers_false_leaves_the_pending_update(patch):
    K = 13
    loss_fn = iBOTPatchLoss(K) if patch else DINOLoss(K)
    loss_fn.init_weights()
    ref = OfficialCenter(K, patch=patch)
    t = logits(3, 4, K, scale=2.0) if patch else logits(6, K, scale=2.0)
    loss_fn.update_center(t)
    ref.update(t)
    q = loss_fn.softmax_center_teacher(t, 0.07, update_centers=False)
    assert torch.equal(loss_fn.center, torch.zeros_like(loss_fn.center))
    assert rel_rms(q, torch.softmax(t.double() / 0.07, -1)) <= PROB_RTOL
    q = loss_fn.softmax_center_teacher(t, 0.07)
    ref.apply()
    assert rel_rms(loss_fn.center, ref.center) <= CENTER_RTOL
    assert rel_rms(q, torch.softmax((t.double() - ref.center) / 0.07, -1)) <= PROB_RTOL


# ----------------------------------------------------------------------------------- iBOT

@pytest.mark.parametrize("dtype", DTYPES)
def test_ibot_forward_masked_matches_official(dtype):
    m = masks(4, 7, seed=4)  # image 0 has no masked patch
    n = int(m.sum())
    M, K = n + 3, 1025
    student = logits(M, K, dtype=dtype, seed=5)
    teacher = probs(M, K, dtype=dtype, seed=6)
    w = official_masks_weight(m)
    s_ref = _leaf(student.double())
    ref = official_ibot_forward_masked(s_ref, teacher.double(), m, n_masked_patches=n,
                                       masks_weight=w.double())
    ref.backward()
    s = _leaf(student)
    loss_fn = iBOTPatchLoss(K)
    loss_fn.init_weights()
    out = loss_fn.forward_masked(s, teacher, m, n_masked_patches=n, masks_weight=w)
    out.backward()
    _check(out, s, ref, s_ref, dtype)


def test_ibot_sinkhorn_matches_official():
    x = logits(9, 21, scale=1.5, seed=7)
    q = iBOTPatchLoss(21).sinkhorn_knopp_teacher(x, 0.04, torch.tensor([9]))
    assert rel_rms(q, official_sinkhorn_knopp(x.double(), 0.04, n_samples=9)) <= PROB_RTOL


# ----------------------------------------------------------------------------------- Gram

GRAM_VARIANTS = [dict(), dict(remove_neg=False), dict(remove_neg=False,
                                                      remove_only_teacher_neg=True),
                 dict(apply_norm=False, remove_neg=False)]


@pytest.mark.parametrize("kwargs", GRAM_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("img_level", [True, False])
def test_gram_matches_official(kwargs, dtype, img_level):
    B, N, D = 2, 9, 7
    s = torch.randn(B, N, D, generator=torch.Generator().manual_seed(8)).to(dtype)
    t = torch.randn(B, N, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    s_ref = _leaf(s.double())
    ref = official_gram(s_ref, t, img_level=img_level, **kwargs)
    ref.backward()
    ss = _leaf(s)
    gram = GramLoss(**kwargs)
    out = gram(ss, t, img_level=img_level)
    out.backward()
    assert out.dtype == torch.float32
    assert rel_rms(out, ref) <= 1e-5
    # the gradient, in the input dtype: an fp32 bound for fp32, the dtype's rounding otherwise
    assert rel_rms(ss.grad, s_ref.grad) <= (1e-5 if dtype == torch.float32 else
                                            GRAD_RTOL[dtype])
    assert gram.last_backend == "eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gram_flat_features_with_zero_and_duplicate_patches(dtype):
    s = torch.randn(12, 5, generator=torch.Generator().manual_seed(10))
    t = torch.randn(12, 5, generator=torch.Generator().manual_seed(11))
    s[4] = s[5]  # duplicate patches
    if dtype == torch.float32:
        # a zero feature normalises to 0 (no NaN); its gradient is that of x / 1e-12, as the
        # official one: finite in fp32, beyond fp16's range
        s[3] = 0.0
    ss, s_ref = _leaf(s.to(dtype)), _leaf(s.to(dtype).double())
    out = GramLoss(remove_neg=False)(ss, t, img_level=False)
    out.backward()
    ref = official_gram(s_ref, t, img_level=False, remove_neg=False)
    ref.backward()
    assert torch.isfinite(out) and torch.isfinite(ss.grad).all()
    assert rel_rms(out, ref) <= 1e-5
    assert rel_rms(ss.grad, s_ref.grad) <= (1e-5 if dtype == torch.float32 else
                                            GRAD_RTOL[dtype])


def test_gram_target_gets_a_gradient_only_if_it_asks_for_one():
    s = _leaf(torch.randn(2, 4, 3))
    t = torch.randn(2, 4, 3)
    GramLoss()(s, t).backward()
    assert s.grad is not None and t.grad is None


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call,name,exc", [
    (lambda f: f(logits(2, 3, 16), probs(2, 4, 16)), "teacher_probs", ValueError),
    (lambda f: f(logits(6, 16), probs(2, 3, 16)), "student_logits", ValueError),
    (lambda f: f(logits(2, 3, 17), probs(2, 3, 16)), "out_dim", ValueError),
    (lambda f: f(logits(2, 3, 16).int(), probs(2, 3, 16)), "student_logits", TypeError),
    (lambda f: f(logits(1, 3, 16), probs(1, 3, 16), ignore_diagonal=True), "ignore_diagonal",
     ValueError),
    (lambda f: f(logits(2, 3, 16), probs(2, 3, 16), ignore_diagonal=1), "ignore_diagonal",
     TypeError),
    (lambda f: f.softmax_center_teacher(logits(4, 15), 0.07), "out_dim", ValueError),
    (lambda f: f.sinkhorn_knopp_teacher(logits(4, 16), math.inf), "teacher_temp", ValueError),
    (lambda f: f.reduce_center_update(logits(3, 17)), "out_dim", ValueError),
])
def test_dino_bad_input_names_the_argument_and_changes_nothing(call, name, exc):
    loss_fn = DINOLoss(16)
    loss_fn.init_weights()
    loss_fn.update_center(logits(4, 16))
    before = loss_fn.center.clone()
    with pytest.raises(exc, match=name):
        call(loss_fn)
    assert torch.equal(loss_fn.center, before) and loss_fn.updated is False
    assert loss_fn.last_backend is None


def test_dino_crops_loss_bad_center():
    with pytest.raises(ValueError, match="center"):
        dino_crops_loss(logits(2, 3, 8), logits(2, 3, 8), student_temp=0.1, teacher_temp=0.04,
                        center=torch.zeros(9))
    with pytest.raises(ValueError, match="backend"):
        dino_crops_loss(logits(2, 3, 8), logits(2, 3, 8), student_temp=0.1, teacher_temp=0.04,
                        center=torch.zeros(8), backend="gpu")


@pytest.mark.parametrize("kwargs,call,name,exc", [
    (dict(remove_neg=True, remove_only_teacher_neg=True), None, "remove_only_teacher_neg",
     ValueError),
    (dict(backend="triton"), None, "backend", ValueError),
    (dict(), lambda g: g(torch.randn(6, 3), torch.randn(6, 3)), "output_feats", ValueError),
    (dict(), lambda g: g(torch.randn(2, 3, 4), torch.randn(2, 4, 4)), "same patches",
     ValueError),
    (dict(), lambda g: g(torch.randn(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.long)),
     "target_feats", TypeError),
])
def test_gram_bad_input_names_the_argument(kwargs, call, name, exc):
    with pytest.raises(exc, match=name):
        gram = GramLoss(**kwargs)
        call(gram)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dino_forward_low_precision_student_with_fp32_sk_teacher(dtype):
    # the official training call: student logits from an autocast head, SK teacher in fp32
    S, T, B, K = 4, 2, 3, 100
    student = logits(S, B, K, dtype=dtype, seed=12)
    teacher = DINOLoss(K).sinkhorn_knopp_teacher(logits(T * B, K, seed=13), 0.05)
    teacher = teacher.unflatten(0, (T, B))
    s_ref = _leaf(student.double())
    ref = official_dinov3_dino_forward(s_ref, teacher.double())
    ref.backward()
    s = _leaf(student)
    out = DINOLoss(K)(s, teacher)
    out.backward()
    _check(out, s, ref, s_ref, dtype)


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("dino_fast.dinov3"),
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------ Triton path (interpreter on CPU)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,T,ignore_diagonal", [(3, 2, True), (4, 2, False)])
def test_triton_dino_forward_matches_official(S, T, ignore_diagonal, dtype):
    B, K = 2, 23
    student = logits(S, B, K, dtype=dtype, seed=50)
    teacher = probs(T, B, K, dtype=dtype, seed=51)
    s_ref = _leaf(student.double())
    ref = official_dinov3_dino_forward(s_ref, teacher.double(), ignore_diagonal)
    ref.backward()
    s = _leaf(student)
    loss_fn = DINOLoss(K, backend="triton")
    out = loss_fn(s, teacher, ignore_diagonal=ignore_diagonal)
    out.backward()
    assert loss_fn.last_backend == "triton"
    _check(out, s, ref, s_ref, dtype)


@needs_triton
def test_triton_dino_loss_from_logits_and_sk_center():
    S, T, B, K = 2, 2, 3, 19
    student, t_logits = logits(S, B, K, seed=52), logits(T, B, K, scale=6.0, seed=53)
    flat = t_logits.flatten(0, 1)
    q = sinkhorn_knopp_center(flat, 0.04)
    ref = official_dinov3_dino_forward(
        student.double(), torch.softmax((flat.double() - q.double()) / 0.04, -1).unflatten(
            0, (T, B)), True)
    out = dino_crops_loss(student, t_logits, student_temp=0.1, teacher_temp=0.04, center=q,
                          ignore_diagonal=True, backend="triton")
    assert rel_rms(out, ref) <= 1e-5
