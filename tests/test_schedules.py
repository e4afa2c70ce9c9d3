import math

import pytest
import torch

from subspaces.schedules import (
    FGESchedule,
    SSESchedule,
    fge_is_snapshot,
    fge_lr,
    sse_is_snapshot,
    sse_lr,
)


def _optimizer(groups: int = 1, lr: float = 123.0) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _run(optimizer, scheduler, iterations: int) -> tuple[list[float], list[bool]]:
    """LR used by, and snapshot flag after, each of the next `iterations` iterations."""
    lrs, snaps = [], []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        snaps.append(scheduler.is_snapshot())
        scheduler.step()
    return lrs, snaps


def test_fge_lr_formula_landmarks():
    c, a1, a2 = 8, 0.05, 0.0005
    # t(i) = i/c within the first cycle; linear down to a2 at i = c/2, back up to a1 at i = c
    assert fge_lr(4, c, a1, a2) == pytest.approx(a2)
    assert fge_lr(8, c, a1, a2) == pytest.approx(a1)
    assert fge_lr(2, c, a1, a2) == pytest.approx(0.5 * a1 + 0.5 * a2)
    assert fge_lr(1, c, a1, a2) == pytest.approx(0.75 * a1 + 0.25 * a2)
    assert fge_lr(5, c, a1, a2) == pytest.approx(0.75 * a2 + 0.25 * a1)
    assert fge_lr(9, c, a1, a2) == fge_lr(1, c, a1, a2)
    assert [i for i in range(1, 25) if fge_is_snapshot(i, c)] == [4, 12, 20]
    assert all(fge_lr(i, c, a1, a2) == pytest.approx(a2) for i in (4, 12, 20))


@pytest.mark.parametrize(
    "cycle, lr_max, lr_min, match",
    [
        (3, 0.1, 0.01, "even"),
        (0, 0.1, 0.01, "even"),
        (4, 0.01, 0.1, "lr_max > lr_min"),
        (4, 0.1, -0.1, "lr_min"),
    ],
)
def test_fge_validation(cycle, lr_max, lr_min, match):
    with pytest.raises(ValueError, match=match):
        fge_lr(1, cycle, lr_max, lr_min)
    with pytest.raises(ValueError, match=match):
        FGESchedule(_optimizer(), cycle, lr_max, lr_min)


def test_fge_scheduler_matches_formula_over_two_cycles():
    c, a1, a2 = 6, 0.05, 0.0005
    opt = _optimizer(groups=2)
    sched = FGESchedule(opt, cycle=c, lr_max=a1, lr_min=a2)
    assert sched.iteration == 1
    lrs, snaps = _run(opt, sched, 2 * c)
    expected = [fge_lr(i, c, a1, a2) for i in range(1, 2 * c + 1)]
    assert max(abs(a - b) for a, b in zip(lrs, expected)) < 1e-12
    assert [i + 1 for i, s in enumerate(snaps) if s] == [3, 9]
    next_lr = fge_lr(2 * c + 1, c, a1, a2)
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(next_lr)


def test_sse_matches_formula_and_torch_cosine_warm_restarts():
    c, lr_max = 5, 0.2
    assert sse_lr(1, c, lr_max) == lr_max
    assert sse_lr(c + 1, c, lr_max) == lr_max
    assert sse_lr(3, c, lr_max) == pytest.approx(lr_max / 2 * (math.cos(math.pi * 2 / c) + 1))
    assert [i for i in range(1, 16) if sse_is_snapshot(i, c)] == [5, 10, 15]

    opt = _optimizer(lr=999.0)  # the optimizer's own lr must be overridden by lr_max
    sched = SSESchedule(opt, cycle=c, lr_max=lr_max)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)
    lrs, snaps = _run(opt, sched, 2 * c)
    expected = [sse_lr(i, c, lr_max) for i in range(1, 2 * c + 1)]
    assert max(abs(a - b) for a, b in zip(lrs, expected)) < 1e-12
    assert [i + 1 for i, s in enumerate(snaps) if s] == [5, 10]
    # the LR just before each snapshot is the smallest of its cycle
    assert lrs[c - 1] == min(lrs[:c])


@pytest.mark.parametrize("kind", ["fge", "sse"])
def test_state_dict_round_trip_mid_cycle(kind):
    def make(opt):
        if kind == "fge":
            return FGESchedule(opt, cycle=8, lr_max=0.1, lr_min=0.001)
        return SSESchedule(opt, cycle=7, lr_max=0.1)

    opt_a = _optimizer()
    sched_a = make(opt_a)
    _run(opt_a, sched_a, 11)  # mid-way through the second cycle
    state = sched_a.state_dict()
    reference = _run(opt_a, sched_a, 12)

    opt_b = _optimizer(lr=0.5)
    sched_b = make(opt_b)
    sched_b.load_state_dict(state)  # scheduler state only: the optimizer lr is restored too
    assert sched_b.iteration == 12
    resumed = _run(opt_b, sched_b, 12)
    assert resumed[1] == reference[1]
    assert max(abs(a - b) for a, b in zip(resumed[0], reference[0])) < 1e-15
    assert len(set(reference[0])) > 3
