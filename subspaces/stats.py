"""Uncertainty of a comparison's numbers: bootstrap intervals over test examples (and seeds) and
three-way verdicts.

A row of the comparison gives, per replicate s and test example i, a loss ``x[s, i]`` (error in
points: 100 * 1[wrong]; or the NLL). The row's value is the mean over s and i. A claim compares
two rows evaluated on the same examples, so its statistic is the mean of the *paired*
difference d[s, i] = x_method[s, i] - x_reference[s, i].

The interval is a percentile bootstrap: each resample draws the examples with replacement
(the same draw for every replicate, as the replicates share their test examples) and, with more
than one replicate, the replicates with replacement too; the statistic of a resample is
sum_s w_s mean_{i in draw} d[s, i] with w_s the replicate's share of the draw. Resamples come
from a seeded generator, so the same numbers give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the three verdicts of a claim that a difference is negative (the method is better)
HELD, CONTRADICTED, NOT_RESOLVED = "held", "contradicted", "not resolved at this scale"


@dataclass(frozen=True)
class Interval:
    """A statistic's value (the mean over replicates and examples) and its bootstrap interval."""

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "level": self.level}


class Bootstrap:
    """Resamples of ``replicates`` x ``examples`` drawn once and shared by every statistic
    (common random numbers: intervals of different rows use the same draws).

    ``index``: [resamples, examples] example draws; ``weight``: [resamples, replicates], each row
    the share of each replicate in a draw of ``replicates`` replicates with replacement (all
    ``1 / replicates`` when there is one replicate only).
    """

    def __init__(self, replicates: int, examples: int, resamples: int = 2000, seed: int = 0) -> None:
        if replicates < 1 or examples < 1 or resamples < 10:
            raise ValueError(f"need >= 1 replicate, >= 1 example and >= 10 resamples, got {replicates}, {examples}, {resamples}")
        rng = np.random.default_rng(seed)
        self.replicates, self.examples, self.resamples = replicates, examples, resamples
        self.index = rng.integers(0, examples, size=(resamples, examples), dtype=np.int32)
        if replicates == 1:
            self.weight = np.ones((resamples, 1))
        else:
            self.weight = rng.multinomial(replicates, np.full(replicates, 1.0 / replicates), size=resamples) / replicates

    def interval(self, values: np.ndarray, level: float = 0.95) -> Interval:
        """Mean of ``values`` [replicates, examples] (or [examples] for one replicate) with its
        percentile interval at ``level``."""
        x = np.asarray(values, dtype=np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.shape != (self.replicates, self.examples):
            raise ValueError(f"values have shape {x.shape}, the bootstrap was drawn for {(self.replicates, self.examples)}")
        means = np.empty((self.replicates, self.resamples))
        chunk = max(1, 2_000_000 // self.examples)   # bounds the gathered block to ~16 MB
        for s in range(self.replicates):
            for start in range(0, self.resamples, chunk):
                means[s, start:start + chunk] = x[s][self.index[start:start + chunk]].mean(axis=1)
        stats = (self.weight * means.T).sum(axis=1)
        alpha = (1.0 - level) / 2
        lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
        return Interval(float(x.mean()), float(lo), float(hi), level)


def paired_difference(method: np.ndarray, reference: np.ndarray, bootstrap: Bootstrap, level: float = 0.95) -> Interval:
    """Mean of method - reference over replicates and examples with its paired interval; both
    [replicates, examples] losses on the same examples."""
    return bootstrap.interval(np.asarray(method, dtype=np.float64) - np.asarray(reference, dtype=np.float64), level)


def verdict(difference: Interval) -> str:
    """For a claim that the difference (method - reference) is negative: :data:`HELD` when the
    whole interval lies below 0, :data:`CONTRADICTED` when it lies above 0, else
    :data:`NOT_RESOLVED` (an interval touching 0 does not decide)."""
    if difference.hi < 0:
        return HELD
    if difference.lo > 0:
        return CONTRADICTED
    return NOT_RESOLVED


def combine(verdicts: list[str]) -> str:
    """A claim made of several parts (error and NLL, every budget): held when every part is held,
    contradicted when any part is contradicted, otherwise not resolved."""
    if not verdicts:
        raise ValueError("no verdicts to combine")
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == HELD for v in verdicts):
        return HELD
    return NOT_RESOLVED
