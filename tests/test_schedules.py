import math

import pytest

from dino_recog.schedules import cosine_schedule, linear_warmup, scaled_lr, step_schedule


def test_cosine_with_warmup_hand_computed():
    # 10 iterations: 3 of warmup (linspace 0 -> 1 inclusive), then cosine over 7 from 1 towards 0.1.
    assert [cosine_schedule(i, 10, 1.0, 0.1, 3) for i in range(3)] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine_schedule(3, 10, 1.0, 0.1, 3) == pytest.approx(1.0)
    assert cosine_schedule(4, 10, 1.0, 0.1, 3) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 7)))
    assert cosine_schedule(9, 10, 1.0, 0.1, 3) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 6 / 7)))
    assert cosine_schedule(50, 10, 1.0, 0.1, 3) == cosine_schedule(9, 10, 1.0, 0.1, 3)  # clamped past the end


def test_dino_momentum_and_weight_decay():
    # momentum 0.996 -> 1 over 100 iterations, no warmup: halfway it is the mean of both ends
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(25, 100, 0.04, 0.4) == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2)


def test_teacher_temperature_warmup():
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(99, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(0, 0, 0.04, 0.07) == pytest.approx(0.07)  # no warmup: the final value at once


def test_step_schedule_and_scaling():
    assert step_schedule(0, 10, 1.0, [4, 7], 0.1, warmup_steps=20) == pytest.approx(0.01)
    assert step_schedule(10, 10, 1.0, [4, 7], 0.1, warmup_steps=20) == pytest.approx(0.01 + 0.99 * 0.5)
    assert step_schedule(39, 10, 1.0, [4, 7], 0.1) == pytest.approx(1.0)
    assert step_schedule(40, 10, 1.0, [4, 7], 0.1) == pytest.approx(0.1)
    assert step_schedule(75, 10, 1.0, [4, 7], 0.1) == pytest.approx(0.01)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
