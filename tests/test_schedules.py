import numpy as np
import pytest

from dino_fast.schedules import cosine_scheduler, scaled_lr, teacher_temp_schedule


def test_warmup_rises_linearly_then_cosine_starts_at_base_and_ends_near_final():
    s = cosine_scheduler(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2,
                         start_warmup_value=0.0)
    assert len(s) == 50
    np.testing.assert_allclose(s[:10], np.linspace(0.0, 1.0, 10))
    assert s[10] == 1.0  # the cosine part starts exactly at the base value
    assert np.all(np.diff(s[10:]) < 0)  # then decreases monotonically
    assert 0.1 < s[-1] < 0.1 + 1e-2
    n = 40  # the cosine part is half-way down in its middle
    assert s[10 + n // 2] == pytest.approx(0.55)


def test_teacher_momentum_schedule_rises_from_base_towards_one():
    m = cosine_scheduler(0.996, 1.0, epochs=3, niter_per_ep=7)
    assert m[0] == 0.996 and np.all(np.diff(m) > 0) and m[-1] < 1.0
    assert 1.0 - m[-1] < 1e-4


def test_schedule_is_a_function_of_the_global_step_only():
    a = cosine_scheduler(5e-4, 1e-6, epochs=4, niter_per_ep=3, warmup_epochs=1)
    b = cosine_scheduler(5e-4, 1e-6, epochs=4, niter_per_ep=3, warmup_epochs=1)
    assert np.array_equal(a, b)


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=3)
    with pytest.raises(ValueError, match="niter_per_ep"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=0)


def test_linear_scaling_rule():
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


# ----------------------------------------------------------------------------------------------
# validation: each error names the argument

def official_teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs):
    """The official DINOLoss schedule, written out."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * teacher_temp))


@pytest.mark.parametrize("warmup,nepochs", [(0, 1), (0, 5), (3, 10), (5, 5), (30, 100)])
def test_teacher_temp_schedule_is_the_official_one_up_to_warmup_equal_to_nepochs(warmup, nepochs):
    got = teacher_temp_schedule(0.04, 0.07, warmup, nepochs)
    assert np.array_equal(got, official_teacher_temp_schedule(0.04, 0.07, warmup, nepochs))
    assert len(got) == nepochs
    with pytest.raises(ValueError, match=f"must be in \\[0, nepochs={nepochs}\\], got "
                                         f"{nepochs + 1}"):
        teacher_temp_schedule(0.04, 0.07, nepochs + 1, nepochs)


def test_cosine_scheduler_takes_numpy_integers_but_not_float_counts():
    a = cosine_scheduler(1, 0, np.int64(4), np.int32(3), warmup_epochs=np.int64(1))
    b = cosine_scheduler(1.0, 0.0, 4, 3, warmup_epochs=1)
    assert np.array_equal(a, b) and len(a) == 12
    with pytest.raises(TypeError, match="epochs must be an integer, got 4.0"):
        cosine_scheduler(1.0, 0.0, 4.0, 3)  # whole, but a float: refused as any other float


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0.1, 0, 2.5, 3), {}, TypeError, "epochs must be an integer, got 2.5"),
    ((0.1, 0, 2.5, 2), {}, TypeError, "epochs must be an integer, got 2.5"),
    ((0.1, 0, 0, 3), {}, ValueError, "epochs must be >= 1, got 0"),
    ((0.1, 0, 3, 2.0), {}, TypeError, "niter_per_ep must be an integer"),
    ((0.1, 0, 3, -1), {}, ValueError, "niter_per_ep must be >= 1, got -1"),
    ((0.1, 0, 3, True), {}, TypeError, "niter_per_ep must be an integer"),
    ((0.1, 0, 3, 2, 1.5), {}, TypeError, "warmup_epochs must be an integer, got 1.5"),
    ((0.1, 0, 3, 2, -1), {}, ValueError, "warmup_epochs must be >= 0, got -1"),
    (("0.1", 0, 3, 2), {}, TypeError, "base_value must be a real number"),
    ((float("nan"), 0, 3, 2), {}, ValueError, "base_value must be a finite number"),
    ((0.1, float("inf"), 3, 2), {}, ValueError, "final_value must be a finite number"),
    ((0.1, None, 3, 2), {}, TypeError, "final_value must be a real number"),
    ((0.1, 0, 3, 2, 1), dict(start_warmup_value=float("nan")), ValueError,
     "start_warmup_value must be a finite number"),
    ((0.1, 0, 3, 2, 1), dict(start_warmup_value="0"), TypeError,
     "start_warmup_value must be a real number"),
])
def test_cosine_scheduler_rejects_bad_arguments_naming_them(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cosine_scheduler(*args, **kwargs)


@pytest.mark.parametrize("args,exc,match", [
    ((.04, .07, 6, 5), ValueError, r"warmup_teacher_temp_epochs must be in \[0, nepochs=5\], "
                                   "got 6"),
    ((.04, .07, -1, 5), ValueError, "warmup_teacher_temp_epochs must be >= 0, got -1"),
    ((.04, .07, 0, 0), ValueError, "nepochs must be >= 1, got 0"),
    ((.04, .07, 1.5, 5), TypeError, "warmup_teacher_temp_epochs must be an integer"),
    ((.04, .07, 2, 5.0), TypeError, "nepochs must be an integer"),
    ((0.0, .07, 2, 5), ValueError, "warmup_teacher_temp must be a positive finite number"),
    ((.04, -.07, 2, 5), ValueError, "teacher_temp must be a positive finite number"),
    ((.04, float("inf"), 2, 5), ValueError, "teacher_temp must be a positive finite number"),
    ((.04, "0.07", 2, 5), TypeError, "teacher_temp must be a real number"),
])
def test_teacher_temp_schedule_rejects_bad_arguments_naming_them(args, exc, match):
    with pytest.raises(exc, match=match):
        teacher_temp_schedule(*args)
