"""Loss and error barriers along a path between two networks.

For values v(t) along a path from w0 (t = 0) to w1 (t = 1), the barrier is the largest rise above
the straight line between the ends' values:

    B = max_t [ v(t) - ((1 - t) v(0) + t v(1)) ]

For v = the loss this is Entezari et al. 2022's loss barrier; for v = the test error it is the
error barrier of Frankle et al. 2020 (who subtract the ends' mean, max_t v(t) - (v(0) + v(1)) / 2;
the two agree when the ends' errors are equal). Both ends give 0, so B >= 0 on a grid that holds
them; the max is over the evaluated t only, so a finer grid can only raise it.

:func:`barrier` is the pure function of the values; :func:`path_barriers` applies it to the
metrics of :func:`subspaces.pointwise.evaluate_points`; :func:`segment_barriers` evaluates the
straight segment between two models and :func:`curve_barriers` a trained curve together with the
straight segment between its ends, BatchNorm recomputed at every point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .pointwise import PointMetrics, evaluate_points
from .shapes import Curve, Line

__all__ = ["Barrier", "barrier", "curve_barriers", "path_barriers", "segment_barriers"]


@dataclass(frozen=True)
class Barrier:
    """``height``: max_t [v(t) - ((1 - t) v(0) + t v(1))]; ``t``: the first t where it peaks;
    ``value``: v there; ``ends``: (v(0), v(1))."""

    height: float
    t: float
    value: float
    ends: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"height": self.height, "t": self.t, "value": self.value, "ends": list(self.ends)}


def barrier(values: Any, t: Any = None) -> Barrier:
    """Barrier of ``values`` (N numbers, Tensor[N] or a list) at ``t`` (N numbers; default N
    evenly spaced in [0, 1]): max_i [v_i - ((1 - t_i) v_0 + t_i v_{N-1})], in float64, with the
    first t_i where it peaks.

    ``t`` must start at 0, end at 1 and increase strictly; N >= 2; the values must be finite.
    """
    # a list of Python floats becomes float64 directly: torch's default float32 would round the values
    v = (values if isinstance(values, Tensor) else torch.as_tensor(values, dtype=torch.float64)).detach().double().reshape(-1).cpu()
    if v.numel() < 2:
        raise ConfigError(f"a barrier needs the values at both ends: got {v.numel()} value(s); pass N >= 2 points")
    if not torch.isfinite(v).all():
        raise ConfigError("the values along the path contain NaN or infinity: a barrier needs finite losses / errors")
    if t is None:
        ts = torch.linspace(0, 1, v.numel(), dtype=torch.float64)
    else:
        ts = (t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)).detach().double().reshape(-1).cpu()
    if ts.shape != v.shape:
        raise ConfigError(f"t has {ts.numel()} entries but there are {v.numel()} values: pass one t per value")
    if abs(float(ts[0])) > 1e-6 or abs(float(ts[-1]) - 1) > 1e-6 or bool((ts[1:] <= ts[:-1]).any()):
        raise ConfigError("t must increase strictly from 0 to 1 (both ends included): the barrier is measured against the ends' values")
    rise = v - ((1 - ts) * v[0] + ts * v[-1])
    i = int(rise.argmax())      # the first maximum
    return Barrier(height=float(rise[i]), t=float(ts[i]), value=float(v[i]), ends=(float(v[0]), float(v[-1])))


def path_barriers(metrics: dict[str, PointMetrics], t: Tensor) -> dict[str, dict[str, Barrier]]:
    """Loss and error barriers of one path per dataset: ``{name: {"loss": Barrier, "error": Barrier}}``
    from ``{name: PointMetrics}`` of N points at ``t`` Tensor[N] (0 = one end, 1 = the other)."""
    return {name: {"loss": barrier(m.loss, t), "error": barrier(m.error, t)} for name, m in metrics.items()}


def _check_points(points: int) -> Tensor:
    if points < 2:
        raise ConfigError(f"points={points}: a path needs at least its two ends (points >= 2)")
    return torch.linspace(0, 1, points)


def segment_barriers(
    model_a: nn.Module,
    model_b: nn.Module,
    loaders: dict[str, Iterable[Any]],
    *,
    bn_loader: Iterable[Any] | None,
    bn_batches: int | None = None,
    points: int = 25,
    progress: Any = False,
) -> tuple[Tensor, dict[str, PointMetrics], dict[str, dict[str, Barrier]]]:
    """The straight segment w(t) = (1 - t) w_a + t w_b at ``points`` evenly spaced t, BatchNorm
    recomputed at each (the first ``bn_batches`` batches of ``bn_loader``; None keeps ``model_a``'s
    buffers everywhere), every loader of ``loaders`` evaluated in one pass for all points:
    (t Tensor[points], {name: PointMetrics}, {name: {"loss": Barrier, "error": Barrier}}).

    The segment lives on ``model_a``'s device. Deterministic for deterministic loaders: the
    same models and batches give the same numbers.
    """
    t = _check_points(points)
    line = Line.connect(model_a, model_b)
    device = next((p.device for p in model_a.parameters()), torch.device("cpu"))
    line = line.to(device)
    res = evaluate_points(line, t, loaders=dict(loaders), bn_loader=bn_loader, bn_batches=bn_batches, progress=progress)
    return t, res, path_barriers(res, t)


def curve_barriers(
    curve: Curve,
    loaders: dict[str, Iterable[Any]],
    *,
    bn_loader: Iterable[Any] | None,
    bn_batches: int | None = None,
    points: int = 25,
    progress: Any = False,
) -> tuple[Tensor, dict[str, dict[str, PointMetrics]], dict[str, dict[str, dict[str, Barrier]]]]:
    """A trained curve w(t) = sum_k c_k(t) W_k and the straight segment (1 - t) W_0 + t W_{K-1}
    between its ends, both at ``points`` evenly spaced t, evaluated in one pass (the shared ends
    once), BatchNorm recomputed at each point: (t Tensor[points], {"curve" | "segment": {name:
    PointMetrics}}, {"curve" | "segment": {name: {"loss": Barrier, "error": Barrier}}})."""
    if not isinstance(curve, Curve):
        raise ConfigError(f"a {type(curve).__name__} is not a curve: curve barriers need a Bezier curve or polygonal chain")
    t = _check_points(points)
    on_curve = curve.coefficients(t).float()
    segment = torch.zeros_like(on_curve)
    segment[:, 0], segment[:, -1] = 1 - t, t
    res = evaluate_points(curve, coefficients=torch.cat([on_curve, segment]), loaders=dict(loaders), bn_loader=bn_loader,
                          bn_batches=bn_batches, progress=progress)
    first, second = torch.arange(points), torch.arange(points, 2 * points)
    metrics = {"curve": {k: m.select(first) for k, m in res.items()}, "segment": {k: m.select(second) for k, m in res.items()}}
    return t, metrics, {path: path_barriers(m, t) for path, m in metrics.items()}
