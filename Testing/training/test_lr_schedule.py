"""The staged learning-rate schedule, epoch by epoch, and how it drives an optimizer's two groups."""

from __future__ import annotations

import pytest
import torch
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.training.schedule import StagedLRScheduler, StagedSchedule


@pytest.mark.parametrize("epochs", [1000, 2000])
def test_learning_rate_at_the_stage_boundaries_and_the_end(epochs):
    s = StagedSchedule(num_epochs=epochs)
    expected = {
        0: ("heads", 1e-4),  # first heads-only epoch: 1/10 of 1e-3
        9: ("heads", 1e-3),  # last heads-only epoch reaches 1e-3
        10: ("warmup", 2e-4),  # first whole-network epoch: 1/50 of 1e-2
        59: ("warmup", 1e-2),  # last warm-up epoch reaches 1e-2
        60: ("poly", 1e-2),  # poly decay starts at the peak
        epochs - 1: ("poly", 1e-2 * (1 / (epochs - 60)) ** 0.9),  # nnU-Net's poly at its last step
    }
    for epoch, (stage, lr) in expected.items():
        assert s.stage(epoch) == stage, epoch
        assert s.lr(epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_rises_are_linear_and_decay_is_nnunets_poly():
    s = StagedSchedule(num_epochs=1000)
    heads = [s.lr(e) for e in range(10)]
    warm = [s.lr(e) for e in range(10, 60)]
    assert heads == pytest.approx([1e-3 * (k + 1) / 10 for k in range(10)])
    assert warm == pytest.approx([1e-2 * (k + 1) / 50 for k in range(50)])
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    poly = PolyLRScheduler(opt, 1e-2, 940)
    for e in (60, 61, 500, 999):
        poly.step(e - 60)
        assert s.lr(e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


def test_epochs_outside_the_schedule_and_too_short_schedules_are_refused():
    s = StagedSchedule(num_epochs=100)
    with pytest.raises(InputError):
        s.lr(100)
    with pytest.raises(InputError):
        s.lr(-1)
    with pytest.raises(InputError, match="leave none for the poly stage"):
        StagedSchedule(num_epochs=60)
    assert StagedSchedule(num_epochs=3, heads_epochs=1, warmup_epochs=1).stage(2) == "poly"


def test_scheduler_keeps_the_network_body_at_zero_during_the_heads_stage():
    heads, body = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [heads]}, {"params": [body]}], lr=1.0)
    sched = StagedLRScheduler(opt, lambda: StagedSchedule(num_epochs=1000))
    seen = {}
    for epoch in (0, 9, 10, 59, 60, 999):
        sched.step(epoch)
        seen[epoch] = [g["lr"] for g in opt.param_groups]
    assert seen[0] == pytest.approx([1e-4, 0.0]) and seen[9] == pytest.approx([1e-3, 0.0])
    assert seen[10] == pytest.approx([2e-4, 2e-4]) and seen[59] == pytest.approx([1e-2, 1e-2])
    assert seen[60] == pytest.approx([1e-2, 1e-2])
    assert seen[999][0] == seen[999][1] == pytest.approx(1e-2 * (1 / 940) ** 0.9)
