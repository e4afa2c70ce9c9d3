"""Bootstrap intervals and three-way verdicts (subspaces.stats): known differences are classified
right and the intervals cover the true difference at close to their nominal rate."""

from __future__ import annotations

import numpy as np
import pytest

from subspaces.stats import CONTRADICTED, HELD, NOT_RESOLVED, Bootstrap, Interval, combine, paired_difference, verdict


def test_verdicts_from_intervals():
    assert verdict(Interval(-1.0, -1.5, -0.2)) == HELD
    assert verdict(Interval(1.0, 0.2, 1.5)) == CONTRADICTED
    assert verdict(Interval(0.1, -0.3, 0.4)) == NOT_RESOLVED
    assert verdict(Interval(-0.5, -1.0, 0.0)) == NOT_RESOLVED   # touching 0 does not decide
    assert combine([HELD, HELD]) == HELD
    assert combine([HELD, NOT_RESOLVED]) == NOT_RESOLVED
    assert combine([HELD, CONTRADICTED]) == CONTRADICTED
    with pytest.raises(ValueError):
        combine([])


def _paired(n: int, p_method: float, p_reference: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-example errors (points) of two methods that are wrong independently with the given rates."""
    return 100.0 * (rng.random(n) < p_method), 100.0 * (rng.random(n) < p_reference)


@pytest.mark.parametrize("p_method, p_reference, expected", [(0.10, 0.20, HELD), (0.20, 0.10, CONTRADICTED), (0.15, 0.15, NOT_RESOLVED)])
def test_known_differences_are_classified(p_method, p_reference, expected):
    rng = np.random.default_rng(0)
    method, reference = _paired(2000, p_method, p_reference, rng)
    d = paired_difference(method, reference, Bootstrap(1, 2000, resamples=1000, seed=1))
    assert verdict(d) == expected
    assert d.lo <= d.value <= d.hi
    assert d.value == pytest.approx(method.mean() - reference.mean())


def test_pairing_narrows_the_interval_of_correlated_methods():
    """Two methods wrong on nearly the same examples: the paired interval is far narrower than
    the spread of either method's error alone."""
    rng = np.random.default_rng(3)
    reference = 100.0 * (rng.random(3000) < 0.2)
    method = reference.copy()
    flip = rng.choice(3000, 60, replace=False)
    method[flip] = 100.0 - method[flip]
    boot = Bootstrap(1, 3000, resamples=1000, seed=0)
    d, alone = paired_difference(method, reference, boot), boot.interval(method)
    assert (d.hi - d.lo) < 0.5 * (alone.hi - alone.lo)


def test_the_interval_covers_the_true_difference_at_its_nominal_rate():
    """300 synthetic comparisons with a true paired difference of -2 points: the 95 % interval
    covers it in 91-99 % of them (the binomial range of 300 draws at 95 %)."""
    rng = np.random.default_rng(7)
    n, draws, covered = 400, 300, 0
    for i in range(draws):
        # per-example differences in {-100, 0, +100} with mean -2: P(-100) = 0.06, P(+100) = 0.04
        u = rng.random(n)
        d = np.where(u < 0.06, -100.0, np.where(u < 0.10, 100.0, 0.0))
        iv = Bootstrap(1, n, resamples=500, seed=i).interval(d)
        covered += iv.lo <= -2.0 <= iv.hi
    assert 0.91 <= covered / draws <= 0.99


def test_several_replicates_resample_seeds_and_share_example_draws():
    rng = np.random.default_rng(5)
    base = 100.0 * (rng.random(500) < 0.2)
    agree = np.stack([base, base, base])
    disagree = np.stack([base, base + 5.0, base - 5.0])   # replicates whose means differ by 5 points
    boot = Bootstrap(3, 500, resamples=800, seed=2)
    a, b = boot.interval(agree), boot.interval(disagree)
    assert a.value == pytest.approx(b.value)
    assert (b.hi - b.lo) > (a.hi - a.lo)   # the spread between replicates widens the interval
    again = Bootstrap(3, 500, resamples=800, seed=2).interval(disagree)
    assert (again.lo, again.hi) == (b.lo, b.hi)   # seeded: the same numbers, the same interval
    with pytest.raises(ValueError, match="shape"):
        boot.interval(np.zeros((2, 500)))
