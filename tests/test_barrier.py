"""Loss and error barriers: the math on synthetic values, and the segment / curve evaluation on a
tiny timm model (BatchNorm recomputed at each point, reproducible)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from subspaces.barrier import Barrier, barrier, curve_barriers, segment_barriers
from subspaces.bn import update_bn
from subspaces.errors import ConfigError
from subspaces.metrics import nll_per_example
from subspaces.shapes import Bezier


# ------------------------------------------------------------------------------------ the math
def test_barrier_of_a_bump():
    b = barrier(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.0, 0.5, 1.0]))
    assert isinstance(b, Barrier)
    assert b.height == pytest.approx(1.5)       # 3 - (0.5 * 1 + 0.5 * 2)
    assert b.t == 0.5 and b.value == 3.0 and b.ends == (1.0, 2.0)


def test_barrier_against_the_formula_on_random_values():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 30, (1,), generator=gen))
        t = torch.cat([torch.zeros(1), torch.sort(torch.rand(max(n - 2, 0), generator=gen)).values, torch.ones(1)]) if n > 2 \
            else torch.tensor([0.0, 1.0])
        t = torch.unique(t)
        v = torch.randn(t.numel(), generator=gen).double()
        td = t.double()
        rise = [float(v[i] - ((1 - td[i]) * v[0] + td[i] * v[-1])) for i in range(t.numel())]
        best = max(range(len(rise)), key=lambda i: (rise[i], -i))
        b = barrier(v, t)
        assert b.height == pytest.approx(rise[best], abs=1e-12)
        assert b.t == pytest.approx(float(t[best]))
        assert b.height >= 0


def test_barrier_is_zero_on_lines_and_convex_paths_and_peaks_at_the_first_maximum():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert barrier(2 + 3 * t, t).height == pytest.approx(0, abs=1e-12)
    assert barrier((t - 0.3) ** 2, t).height == pytest.approx(0, abs=1e-12)   # below the chord: the ends are the max
    b = barrier(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))                          # default t: evenly spaced
    assert b.t == 0.25 and b.height == 1.0
    assert barrier([0.5, 0.9, 0.1]).height == pytest.approx(0.9 - 0.3)          # a list; rise against the tilted chord


@pytest.mark.parametrize("values,t,match", [
    ([1.0], None, "both ends"),
    ([1.0, float("nan"), 2.0], None, "finite"),
    ([1.0, 2.0, 3.0], [0.0, 1.0], "one t per value"),
    ([1.0, 2.0, 3.0], [0.1, 0.5, 1.0], "from 0 to 1"),
    ([1.0, 2.0, 3.0], [0.0, 0.0, 1.0], "increase"),
])
def test_barrier_refuses_bad_input(values, t, match):
    with pytest.raises(ConfigError, match=match):
        barrier(values, t)


# ------------------------------------------------------------------------------------ networks
def _data(n: int = 48, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


@pytest.fixture
def pair(make_timm):
    return make_timm("test_resnet", seed=0, num_classes=3, in_chans=1), make_timm("test_resnet", seed=1, num_classes=3, in_chans=1)


def _loss_with_bn(model, bn_loader, loader, bn_batches):
    """(mean NLL, error) of ``model`` on ``loader`` after BatchNorm is recomputed on ``bn_loader``."""
    m = copy.deepcopy(model)
    update_bn(m, bn_loader, max_batches=bn_batches)
    m.eval()
    nll, correct, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            p = torch.softmax(m(x).float(), -1)
            nll += float(nll_per_example(p, y).double().sum())
            correct += float((p.argmax(-1) == y).sum())
            n += len(y)
    return nll / n, 1 - correct / n


def test_segment_barriers_ends_equal_the_networks_with_bn_recomputed_and_repeat_exactly(pair):
    a, b = pair
    loaders = {"train": _data(seed=0), "test": _data(seed=1)}
    t, metrics, bars = segment_barriers(a, b, loaders, bn_loader=loaders["train"], bn_batches=2, points=5)
    assert t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(bars) == {"train", "test"} and set(bars["test"]) == {"loss", "error"}
    for name, loader in loaders.items():
        for end, model in ((0, a), (-1, b)):
            loss, err = _loss_with_bn(model, loaders["train"], loader, bn_batches=2)
            assert float(metrics[name].loss[end]) == pytest.approx(loss, rel=1e-5)
            assert float(metrics[name].error[end]) == pytest.approx(err, abs=1e-9)
        m = metrics[name]
        assert bars[name]["loss"].height == pytest.approx(barrier(m.loss, t).height)
        assert bars[name]["loss"].height >= 0 and bars[name]["error"].height >= 0
    _, metrics2, bars2 = segment_barriers(a, b, loaders, bn_loader=loaders["train"], bn_batches=2, points=5)
    for name in loaders:
        for kind in ("loss", "error"):
            assert abs(bars2[name][kind].height - bars[name][kind].height) <= 1e-4
            assert bars2[name][kind].t == bars[name][kind].t
        torch.testing.assert_close(metrics2[name].loss, metrics[name].loss, atol=1e-6, rtol=0)


def test_curve_barriers_of_an_untrained_curve_equal_the_segment(pair):
    a, b = pair
    curve = Bezier.connect(a, b, degree=2)    # middle anchor on the segment: the curve is the segment
    loaders = {"test": _data(seed=1)}
    t, metrics, bars = curve_barriers(curve, loaders, bn_loader=_data(seed=0), bn_batches=2, points=5)
    torch.testing.assert_close(metrics["curve"]["test"].loss, metrics["segment"]["test"].loss, atol=1e-4, rtol=1e-4)
    assert bars["curve"]["test"]["loss"].height == pytest.approx(bars["segment"]["test"]["loss"].height, abs=1e-4)
    _, _, seg = segment_barriers(a, b, loaders, bn_loader=_data(seed=0), bn_batches=2, points=5)
    assert bars["segment"]["test"]["loss"].height == pytest.approx(seg["test"]["loss"].height, abs=1e-5)


def test_paths_need_two_points(pair):
    a, b = pair
    with pytest.raises(ConfigError, match="points >= 2"):
        segment_barriers(a, b, {"test": _data()}, bn_loader=None, points=1)


def test_python_floats_keep_float64_precision():
    # 0.1 + 1e-9 is not a float32 number: a barrier of Python floats must not round it
    values = [0.1, 0.1 + 1e-9 + 0.2, 0.3]
    assert barrier(values).height == pytest.approx(1e-9 + 0.2 - 0.1, abs=1e-15)
