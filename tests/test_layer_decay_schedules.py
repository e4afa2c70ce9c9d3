"""Layer decay under every schedule: group g trains at the schedule's lr times its ``lr_scale``.

timm's ``create_optimizer_v2(..., layer_decay=d)`` gives the groups of layer l the scale
d^(L - 1 - l) and leaves their lr unscaled; timm's schedulers multiply by the scale at every
step (``Scheduler.update_groups``). The torch schedulers of :mod:`subspaces.schedules` (FGE, SSE,
[G]'s connect schedule) follow the same convention, so lr_g / lr_scale_g is the same for every
group and equals the schedule's value, at every iteration, from Python and inside the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import subspaces as ss
from subspaces.data import build_datasets
from subspaces.schedules import FGESchedule, SSESchedule, fge_lr, garipov_lr_factor, garipov_schedule, sse_lr

DECAY, LR = 0.7, 0.1
CYCLE = 4            # FGE / SSE cycle (iterations)
TOTAL = 20           # updates of the Python-level runs
TRAIN, BATCH = 96, 16   # 6 updates per epoch in the Trainer runs


def _optimizer() -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    return create_optimizer_v2(model, "momentum", lr=LR, weight_decay=0.0, layer_decay=DECAY)


def _unscaled(optimizer: torch.optim.Optimizer) -> list[float]:
    """lr_g / lr_scale_g of every group: one value when layer decay's ratios are kept."""
    return [g["lr"] / g["lr_scale"] for g in optimizer.param_groups]


def _assert_ratios(optimizer: torch.optim.Optimizer, expected: float, where: str) -> None:
    scales = sorted({round(g["lr_scale"], 9) for g in optimizer.param_groups})
    assert len(scales) >= 4 and scales[0] == pytest.approx(DECAY ** (len(scales) - 1)), scales   # layer decay is really on
    values = _unscaled(optimizer)
    assert max(values) - min(values) <= 1e-12 * max(abs(expected), 1e-30), f"{where}: lr / lr_scale differs between groups: {values}"
    assert values[0] == pytest.approx(expected, rel=1e-12, abs=1e-15), where


# Python level: each schedule built on create_optimizer_v2's groups, stepped once per update
def _fge(opt):
    return FGESchedule(opt, cycle=CYCLE, lr_max=LR, lr_min=LR / 100), lambda i: fge_lr(i, CYCLE, LR, LR / 100)


def _sse(opt):
    return SSESchedule(opt, cycle=CYCLE, lr_max=LR), lambda i: sse_lr(i, CYCLE, LR)


def _connect(opt):
    return garipov_schedule(opt, TOTAL), lambda i: LR * garipov_lr_factor((i - 1) / TOTAL)


def _connect_per_epoch(opt):
    return garipov_schedule(opt, TOTAL, updates_per_epoch=2), lambda i: LR * garipov_lr_factor(((i - 1) // 2) / (TOTAL / 2))


def _timm(name: str) -> Callable[[torch.optim.Optimizer], tuple[Any, Callable[[int], float]]]:
    def make(opt):
        sched, _ = create_scheduler_v2(opt, sched=name, num_epochs=4, decay_epochs=1, warmup_epochs=1, warmup_lr=LR / 10,
                                       min_lr=LR / 50, step_on_epochs=False, updates_per_epoch=TOTAL // 4)
        return sched, None
    return make


SCHEDULES = {"fge": _fge, "sse": _sse, "connect": _connect, "connect_per_epoch": _connect_per_epoch,
             "timm_cosine": _timm("cosine"), "timm_step": _timm("step")}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_keeps_layer_decay_ratios(name):
    opt = _optimizer()
    sched, formula = SCHEDULES[name](opt)
    seen = set()
    for i in range(1, TOTAL + 1):   # the lr that update i trains at
        if formula is not None:
            _assert_ratios(opt, formula(i), f"{name}, iteration {i}")
        else:   # timm's own value: the same for every group before the scale
            _assert_ratios(opt, _unscaled(opt)[0], f"{name}, iteration {i}")
        seen.add(round(_unscaled(opt)[0], 12))
        opt.step()
        if hasattr(sched, "step_update"):
            sched.step_update(num_updates=i)
        else:
            sched.step()
    assert len(seen) >= 3, f"{name}: the schedule never moved the lr ({seen})"


@pytest.mark.parametrize("kind", ["fge", "sse", "connect"])
def test_ratios_survive_a_resume(kind):
    """A resumed run rebuilds the schedule on a fresh optimiser and loads both states (accelerate)."""
    make = {"fge": _fge, "sse": _sse, "connect": _connect}[kind]
    opt_a = _optimizer()
    sched_a, formula = make(opt_a)
    for _ in range(7):
        opt_a.step()
        sched_a.step()
    opt_b = _optimizer()
    sched_b, _ = make(opt_b)
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    _assert_ratios(opt_b, formula(8), f"{kind} resumed at iteration 8")
    for i in range(8, 12):
        opt_a.step(), opt_b.step()
        sched_a.step(), sched_b.step()
        assert [g["lr"] for g in opt_b.param_groups] == pytest.approx([g["lr"] for g in opt_a.param_groups], rel=1e-12)
        _assert_ratios(opt_b, formula(i + 1), f"{kind} resumed, iteration {i + 1}")


# Trainer level: TrainConfig(layer_decay=0.7), the schedule built by the Trainer as the recipes do
@pytest.fixture(scope="module")
def data():
    import os
    os.environ.setdefault("SUBSPACES_OFFLINE", "1")
    return build_datasets("fashion-mnist", train_subset=TRAIN, eval_subset=32, in_chans=1)


def _train(tmp_path, data, make_scheduler=None, **config: Any) -> list[tuple[int, list[tuple[float, float]]]]:
    """Train a plain test_resnet one epoch with layer decay; (update, [(lr, lr_scale) per group]) after each update."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    settings = dict(epochs=1, batch_size=BATCH, lr=LR, opt="momentum", weight_decay=0.0, layer_decay=DECAY, bn_batches=1, log_interval=3)
    settings.update(config)
    seen: list[tuple[int, list[tuple[float, float]]]] = []
    trainer = ss.Trainer.create(ss.TrainConfig(**settings), model, data, output=tmp_path,
                                make_scheduler=make_scheduler,
                                on_update=lambda t, u: seen.append((u, [(g["lr"], g["lr_scale"]) for g in t.optimizer.param_groups])))
    trainer.fit()
    return seen


UPDATES = TRAIN // BATCH
TRAINER_RUNS: dict[str, tuple[dict[str, Any], Callable[[int], float] | None]] = {
    # expected lr / lr_scale after update u (the lr of update u + 1)
    "fge": ({"make_scheduler": lambda opt, upe: FGESchedule(opt, cycle=CYCLE, lr_max=LR, lr_min=LR / 100)},
            lambda u: fge_lr(u + 1, CYCLE, LR, LR / 100)),
    "sse": ({"make_scheduler": lambda opt, upe: SSESchedule(opt, cycle=CYCLE, lr_max=LR)}, lambda u: sse_lr(u + 1, CYCLE, LR)),
    "connect": ({"make_scheduler": lambda opt, upe: garipov_schedule(opt, upe)}, lambda u: LR * garipov_lr_factor(u / UPDATES)),
    "timm_cosine": ({"sched": "cosine", "min_lr": LR / 50}, None),
    "timm_step": ({"sched": "step", "epochs": 2, "warmup_epochs": 1}, None),   # the warm-up epoch moves the lr
    "none": ({"sched": "none"}, lambda u: LR),
}


@pytest.mark.parametrize("name", list(TRAINER_RUNS))
def test_trainer_keeps_layer_decay_ratios_under_every_schedule(tmp_path, data, name):
    config, formula = TRAINER_RUNS[name]
    seen = _train(tmp_path, data, **config)
    assert [u for u, _ in seen] == list(range(1, config.get("epochs", 1) * UPDATES + 1))
    values = set()
    for update, groups in seen:
        scales = [s for _, s in groups]
        assert len({round(s, 9) for s in scales}) >= 4, scales
        unscaled = [lr / s for lr, s in groups]
        assert max(unscaled) - min(unscaled) <= 1e-12 * max(unscaled), f"{name}, update {update}: {groups}"
        if formula is not None:
            assert unscaled[0] == pytest.approx(formula(update), rel=1e-12), f"{name}, update {update}"
        values.add(round(unscaled[0], 12))
    if name != "none":
        assert len(values) >= 2, f"{name}: the lr never moved: {values}"
