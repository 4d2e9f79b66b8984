import numpy as np
import pytest

from dino_fast.schedules import cosine_scheduler, scaled_lr


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
