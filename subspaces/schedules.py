"""Per-iteration cyclical learning-rate schedules and their snapshot rules.

Conventions (shared by FGE and SSE):
- ``i`` is the 1-based iteration (optimizer step) counter; ``cycle`` is in iterations.
- The schedulers are torch LR schedulers stepped once per iteration, *after*
  ``optimizer.step()``. Right after construction the optimizer holds the LR of iteration 1;
  after k calls to ``step()`` it holds the LR of iteration k + 1 (``scheduler.iteration``).
- Take the snapshot after the optimizer step of iteration i when ``*_is_snapshot(i, cycle)``,
  i.e. read ``i = scheduler.iteration`` *before* calling ``scheduler.step()``.
- Layer decay (timm's convention, ``timm.scheduler.Scheduler.update_groups``): a group with an
  ``lr_scale`` (``create_optimizer_v2(..., layer_decay=d)`` gives layer l the scale
  d^(L - 1 - l)) trains at the schedule's value times its scale, lr_g(i) = lr(i) * lr_scale_g,
  at every iteration; a group without one at lr(i). The optimizer's own lr is not pre-scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LRScheduler


def _check_iteration(i: int) -> None:
    if i < 1:
        raise ValueError(f"iteration i is 1-based and must be >= 1, got {i}")


def _check_fge(cycle: int, lr_max: float, lr_min: float) -> None:
    if not isinstance(cycle, int) or cycle < 2 or cycle % 2:
        raise ValueError(
            f"FGE cycle must be an even integer >= 2 (iterations), got {cycle!r}; "
            "round it to an even number of iterations, e.g. 2 * round(cycle / 2)"
        )
    if not lr_min >= 0:
        raise ValueError(f"FGE lr_min must be >= 0, got {lr_min}; use 0 or a small positive LR")
    if not lr_max > lr_min:
        raise ValueError(
            f"FGE needs lr_max > lr_min, got lr_max={lr_max}, lr_min={lr_min}; "
            "swap them or raise lr_max (alpha1 is the large LR, alpha2 the small one)"
        )


def _check_sse(cycle: int, lr_max: float) -> None:
    if not isinstance(cycle, int) or cycle < 1:
        raise ValueError(f"SSE cycle must be a positive integer (iterations), got {cycle!r}")
    if not lr_max > 0:
        raise ValueError(f"SSE lr_max must be > 0, got {lr_max}")


def fge_lr(i: int, cycle: int, lr_max: float, lr_min: float) -> float:
    """FGE learning rate of 1-based iteration i ([G], docs/science.md §3):
    t = (mod(i-1, c) + 1) / c; lr = (1-2t) a1 + 2t a2 if t <= 1/2 else (2-2t) a2 + (2t-1) a1,
    with a1 = lr_max > a2 = lr_min. Minimum a2 at mod(i, c) = c/2; back to a1 at mod(i, c) = 0."""
    _check_fge(cycle, lr_max, lr_min)
    _check_iteration(i)
    t = ((i - 1) % cycle + 1) / cycle
    if t <= 0.5:
        return (1 - 2 * t) * lr_max + 2 * t * lr_min
    return (2 - 2 * t) * lr_min + (2 * t - 1) * lr_max


def fge_is_snapshot(i: int, cycle: int) -> bool:
    """True when FGE collects a snapshot after 1-based iteration i: mod(i, c) == c/2."""
    _check_fge(cycle, 1.0, 0.0)
    _check_iteration(i)
    return i % cycle == cycle // 2


def sse_lr(i: int, cycle: int, lr_max: float) -> float:
    """Snapshot-ensemble (Huang et al. 2017) LR of 1-based iteration i: cosine annealing
    restarted every c iterations, lr = lr_max * (1 + cos(pi * mod(i-1, c) / c)) / 2."""
    _check_sse(cycle, lr_max)
    _check_iteration(i)
    return lr_max * (1 + math.cos(math.pi * ((i - 1) % cycle) / cycle)) / 2


def sse_is_snapshot(i: int, cycle: int) -> bool:
    """True when SSE collects a snapshot after 1-based iteration i (end of a cycle):
    mod(i, c) == 0."""
    _check_sse(cycle, 1.0)
    _check_iteration(i)
    return i % cycle == 0


def group_lr_scale(group: dict) -> float:
    """Layer decay's multiplier of a parameter group: its ``lr_scale``, 1 when it has none (timm's convention)."""
    return float(group.get("lr_scale", 1.0))


def _set_initial_lr(optimizer: Optimizer, lr: float) -> None:
    """Make ``lr * lr_scale_g`` the base LR of group g (LRScheduler reads 'initial_lr' from groups)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr * group_lr_scale(group)
        group["lr"] = group["initial_lr"]


class _IterationMixin:
    last_epoch: int

    @property
    def iteration(self) -> int:
        """1-based iteration whose LR the optimizer currently holds (= last_epoch + 1)."""
        return self.last_epoch + 1


class FGESchedule(_IterationMixin, LRScheduler):
    """Torch LR scheduler for FGE, stepped every iteration: group g's lr at iteration i is
    fge_lr(i, cycle, lr_max, lr_min) * lr_scale_g (layer decay's scale, 1 without one).

    State (``state_dict``) is the iteration counter plus the settings, so a resumed run
    continues mid-cycle exactly; after ``load_state_dict`` the optimizer's groups are set to
    the LR of the restored iteration.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        cycle: int,
        lr_max: float,
        lr_min: float,
        last_epoch: int = -1,
    ) -> None:
        _check_fge(cycle, lr_max, lr_min)
        self.cycle = cycle
        self.lr_max = float(lr_max)
        self.lr_min = float(lr_min)
        if last_epoch == -1:
            _set_initial_lr(optimizer, self.lr_max)
        super().__init__(optimizer, last_epoch)

    def _lr(self) -> list[float]:
        lr = fge_lr(self.last_epoch + 1, self.cycle, self.lr_max, self.lr_min)
        return [lr * group_lr_scale(group) for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        """LR of every group at the current iteration (closed form)."""
        return self._lr()

    def _get_closed_form_lr(self) -> list[float]:
        return self._lr()

    def is_snapshot(self) -> bool:
        """fge_is_snapshot(self.iteration, cycle): call after optimizer.step(), before step()."""
        return fge_is_snapshot(self.iteration, self.cycle)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the counter and settings, and put the restored LR into the optimizer."""
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self._lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class SSESchedule(_IterationMixin, CosineAnnealingWarmRestarts):
    """Torch LR scheduler for snapshot ensembles, stepped every iteration: group g's lr at
    iteration i is sse_lr(i, cycle, lr_max) * lr_scale_g. Reuses torch's
    CosineAnnealingWarmRestarts (T_0 = cycle, T_mult = 1, eta_min = 0), whose per-step value
    base_g * (1 + cos(pi * mod(i-1, c) / c)) / 2 equals that exactly with base_g = lr_max * lr_scale_g
    (see tests); this subclass only pins each group's base LR to ``lr_max * lr_scale_g``.
    """

    def __init__(self, optimizer: Optimizer, cycle: int, lr_max: float, last_epoch: int = -1) -> None:
        _check_sse(cycle, lr_max)
        self.cycle = cycle
        self.lr_max = float(lr_max)
        if last_epoch == -1:
            _set_initial_lr(optimizer, self.lr_max)
        super().__init__(optimizer, T_0=cycle, T_mult=1, eta_min=0.0, last_epoch=last_epoch)

    def is_snapshot(self) -> bool:
        """sse_is_snapshot(self.iteration, cycle): call after optimizer.step(), before step()."""
        return sse_is_snapshot(self.iteration, self.cycle)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the counter and settings, and put the restored LR into the optimizer."""
        super().load_state_dict(state_dict)
        # the bases follow from the settings and this optimizer's groups, not the saved list
        self.base_lrs = [self.lr_max * group_lr_scale(group) for group in self.optimizer.param_groups]
        lr = sse_lr(self.iteration, self.cycle, self.lr_max)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group_lr_scale(group)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def garipov_lr_factor(progress: float) -> float:
    """[G]'s curve-fitting schedule as a multiple of the base lr, at ``progress`` = update / total:
    1 for the first half, then linear decay to 0.01 by 90% of training, 0.01 after."""
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - 0.99 * (progress - 0.5) / 0.4
    return 0.01


def garipov_schedule(optimizer: torch.optim.Optimizer, total_updates: int, updates_per_epoch: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per update with :func:`garipov_lr_factor` (docs/science.md §2).

    Group g's lr at update u is base_g * f_u * lr_scale_g: base_g its lr when the schedule is
    built (unscaled, as ``create_optimizer_v2`` leaves it), lr_scale_g layer decay's scale read
    at every step (1 without one). The factor is f_u = f(u / total_updates); with
    ``updates_per_epoch`` it is f(floor(u / updates_per_epoch) / epochs), constant within an
    epoch as in [G]'s code.
    """
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    if updates_per_epoch is not None and updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch}")

    def factor(u: int) -> float:
        if updates_per_epoch is None:
            return garipov_lr_factor(u / total_updates)
        return garipov_lr_factor((u // updates_per_epoch) / (total_updates / updates_per_epoch))

    def scaled(index: int) -> Callable[[int], float]:
        # by index, not the group dict: optimizer.load_state_dict (a resume) replaces the dicts
        return lambda u: factor(u) * group_lr_scale(optimizer.param_groups[index])

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [scaled(i) for i in range(len(optimizer.param_groups))])
