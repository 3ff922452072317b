"""LR scaling, warmup + cosine and the EMA decay warmup against their closed forms (NFNET_SPEC §4)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from nfnet.optim.schedule import (
    WarmupCosineMultiplier,
    ema_decay,
    scale_lr,
    schedule_lengths,
    warmup_cosine,
    warmup_cosine_scheduler,
)


def test_scale_lr_by_global_batch():
    assert scale_lr(0.1, 4096) == pytest.approx(1.6)  # the paper's max lr
    assert scale_lr(0.1, 256) == pytest.approx(0.1)
    assert scale_lr(0.1, 512, reference_batch=512) == pytest.approx(0.1)
    # 16 per device x 2 devices x 4 accumulation = 128 -> half the base lr.
    assert scale_lr(0.1, 16 * 2 * 4) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="positive"):
        scale_lr(0.1, 0)


def test_official_schedule_lengths():
    # 5 * 1281167 / 4096 = 1563.92 warmup steps (fractional); (1281167 * 360) // 4096 = 112602.
    warmup, total = schedule_lengths(1281167, 4096, epochs=360, warmup_epochs=5)
    assert warmup == pytest.approx(1563.9245605, abs=1e-6)
    assert total == 112602


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # lr 0 on the first optimizer step
        (25, 0.4),  # a quarter into warmup: 1.6 * 25 / 100
        (100, 1.6),  # end of warmup = start of the cosine = peak
        (350, 1.6 * 0.5 * (1 + math.cos(math.pi / 4))),  # p = 1/4
        (600, 0.8),  # p = 1/2: halfway between peak and 0
        (1100 - 1, 0.8 * (1 + math.cos(math.pi * 999 / 1000))),  # the last step
        (1100, 0.0),
        (5000, 0.0),  # held at the end value, not swinging back up
    ],
)
def test_warmup_cosine_closed_form(step, expected):
    assert warmup_cosine(step, peak_lr=1.6, warmup_steps=100, total_steps=1100) == pytest.approx(
        expected, abs=1e-12
    )


def test_fractional_warmup_and_end_value():
    # warmup 2.5 steps: step 2 is still warming up (2/2.5 of peak); step 3 is in the cosine
    # with p = 0.5 / 7.5. With end_lr 0.1 and peak 1.1 the midpoint p = 1/2 is 0.6.
    assert warmup_cosine(2, 1.0, 2.5, 10) == pytest.approx(0.8)
    assert warmup_cosine(3, 1.0, 2.5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 15)))
    assert warmup_cosine(6.25, 1.1, 2.5, 10, end_lr=0.1) == pytest.approx(0.6)
    assert warmup_cosine(10, 1.1, 2.5, 10, end_lr=0.1) == pytest.approx(0.1)


def test_no_warmup_starts_at_peak():
    assert warmup_cosine(0, 2.0, 0, 10) == pytest.approx(2.0)
    assert warmup_cosine(5, 2.0, 0, 10) == pytest.approx(1.0)


@pytest.mark.parametrize("warmup, total", [(10, 10), (-1, 10), (20, 10)])
def test_invalid_lengths_are_refused(warmup, total):
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        warmup_cosine(0, 1.0, warmup, total)


def test_lambda_lr_steps_per_optimizer_step_for_every_group():
    w = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 1.6}, {"params": [b], "lr": 0.8}], lr=1.0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=4, total_steps=12)
    # lr used by optimizer step k (0-based): peak * k / 4 for k < 4, then cosine over 8 steps.
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5 * (1 + math.cos(math.pi / 8))]
    for factor in expected:
        assert opt.param_groups[0]["lr"] == pytest.approx(1.6 * factor)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.8 * factor)
        opt.step()
        sched.step()


def test_scheduler_state_round_trips_with_weights_only_loading():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=2.5, total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine_scheduler(opt2, warmup_steps=1, total_steps=2)  # overwritten below
    sched2.load_state_dict(state)
    multiplier = sched2.lr_lambdas[0]
    assert isinstance(multiplier, WarmupCosineMultiplier)
    assert (multiplier.warmup_steps, multiplier.total_steps) == (2.5, 10.0)
    assert sched2.last_epoch == 3


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.1), (1, 2 / 11), (8, 0.5), (90, 0.91), (10**6, 0.99999)],
)
def test_ema_decay_tf1_warmup(step, expected):
    assert ema_decay(step, 0.99999) == pytest.approx(expected)
    as_tensor = ema_decay(torch.tensor(step), 0.99999)
    assert isinstance(as_tensor, torch.Tensor)
    assert as_tensor.item() == pytest.approx(expected, rel=1e-6)


def test_ema_decay_is_capped_by_the_decay():
    # (1 + t) / (10 + t) passes 0.9 at t = 80.
    assert ema_decay(79, 0.9) == pytest.approx(80 / 89)
    assert ema_decay(81, 0.9) == 0.9


def test_a_runs_schedule_is_the_official_count_unless_the_trainer_cuts_the_run_shorter():
    from nfnet.optim.schedule import run_schedule_lengths

    # ImageNet, 360 epochs at 4096: Lightning's bound is the longest epoch's 313 steps x 360.
    warmup, total = run_schedule_lengths(1_281_167, 4096, 360, 5, 313 * 360)
    assert total == 112_602 and warmup == pytest.approx(5 * 1_281_167 / 4096)
    # A run Lightning cuts shorter (max_steps=1000, or a tenth of each epoch) follows its count,
    # with the warmup the same share of the epochs.
    assert run_schedule_lengths(1_281_167, 4096, 360, 5, 1000) == (5 * 1000 / 360, 1000)
    # fast_dev_run: one step, and still a valid schedule (warmup < total).
    assert run_schedule_lengths(100, 10, 1, 5, 1) == (0, 1)
    # No epoch count: the step limit alone; without one there is no schedule to draw.
    assert run_schedule_lengths(100, 10, -1, 0.5, 40)[1] == 40
    with pytest.raises(ValueError, match="max_steps"):
        run_schedule_lengths(100, 10, -1, 0.5, float("inf"))
