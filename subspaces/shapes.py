"""The shapes: lines, Bezier curves, polygonal chains and simplexes of networks (docs/science.md §1).

| shape     | K      | point             | c_k(p)                                  |
|-----------|--------|-------------------|-----------------------------------------|
| Line      | 2      | t in [0, 1]       | (1 - t, t)                              |
| Bezier    | n + 1  | t in [0, 1]       | C(n, k) t^k (1 - t)^(n - k)             |
| PolyChain | b + 2  | t in [0, 1]       | max(0, 1 - abs(t (K - 1) - k))          |
| Simplex   | K      | p >= 0, sum p = 1 | p_k                                     |

Each is registered at the end of this module (:func:`subspaces.shape_registry.register_shape`)
under its ``--subspace`` name, which is how the settings, the command line and the files find it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, ConfigTypeError
from .shape_registry import ShapeParam, register_shape
from .subspace import Point, Subspace


def _check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name}={value} is invalid: it must be >= {minimum} ({hint})")
    return value


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ConfigError naming the first parameter or buffer whose name or shape differs."""
    ref = {n: t.shape for n, t in models[0].state_dict().items()}
    for i, m in enumerate(models[1:], start=1):
        other = {n: t.shape for n, t in m.state_dict().items()}
        for name, shape in ref.items():
            if name not in other:
                raise ConfigError(f"cannot connect these models: '{name}' is in model 0 but not in model {i} (different architectures?)")
            if other[name] != shape:
                raise ConfigError(
                    f"cannot connect these models: '{name}' has shape {tuple(shape)} in model 0 but "
                    f"{tuple(other[name])} in model {i} (same architecture and num_classes needed)"
                )
        for name in other:
            if name not in ref:
                raise ConfigError(f"cannot connect these models: '{name}' is in model {i} but not in model 0 (different architectures?)")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class Curve(Subspace):
    """A curve t in [0, 1] -> w(t). Sampling: t ~ U(0, 1); centre t = 0.5."""

    @classmethod
    def _is_curve(cls) -> bool:
        return True

    def centre(self) -> Tensor:
        return torch.tensor(0.5)

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """t ~ U(0, 1): Tensor[] (or Tensor[n])."""
        return torch.rand(() if n is None else (n,), generator=generator)

    def validate_point(self, point: Point) -> Tensor:
        t = point.detach().float() if isinstance(point, Tensor) else torch.as_tensor(point, dtype=torch.float32)
        if t.ndim != 0:
            raise ValueError(f"a point on a {type(self).__name__} is one number t in [0, 1], got a tensor of shape {tuple(t.shape)}")
        if not _is_compiling() and not bool((t >= 0) & (t <= 1)):
            raise ValueError(f"point t={float(t):g} is outside [0, 1]: curve points are t in [0, 1] (0 and 1 are the ends)")
        return t

    def _connect_sources(self, ends: list[list[Tensor]]) -> list[list[Tensor]]:
        a, b = ends
        K = self.num_anchors
        def point(k: int) -> list[Tensor]:   # the ends are exact copies; interior anchors on the segment
            if k in (0, K - 1):
                return [(x if k == 0 else y).clone() for x, y in zip(a, b)]
            return [x + (k / (K - 1)) * (y - x) for x, y in zip(a, b)]

        return [point(k) for k in range(K)]

    @classmethod
    def connect(cls, model_a: nn.Module, model_b: nn.Module, **kwargs: Any) -> Any:
        """A curve between two trained networks [G]: ends are copies of ``model_a`` / ``model_b``
        and frozen; interior anchors start evenly spaced on the straight segment between them.
        Shared parameters (``exclude=``) and BatchNorm buffers start from ``model_a``."""
        check_same_architecture([model_a, model_b])
        sub = cls(model_a, _endpoints=[model_a, model_b], **kwargs)
        sub.freeze_anchor(0)
        sub.freeze_anchor(sub.num_anchors - 1)
        return sub


class Bezier(Curve):
    """Bezier curve of degree n (K = n + 1 anchors): w(t) = sum_k C(n,k) t^k (1-t)^(n-k) W_k.

    Degree 2 is [G]'s quadratic curve (1 - t)^2 w1 + 2t(1 - t) theta + t^2 w2.
    """

    def __init__(self, model: nn.Module, degree: int = 2, **kwargs: Any) -> None:
        self.degree = _check_int("degree", degree, 1, "degree 1 is a line, 2 is [G]'s quadratic Bezier")
        super().__init__(model, self.degree + 1, **kwargs)

    def coefficients(self, point: Point) -> Tensor:
        """Bernstein basis at t: Tensor[...] -> Tensor[..., n + 1]."""
        t = torch.as_tensor(point)
        t = t if t.is_floating_point() else t.float()
        k = torch.arange(self.degree + 1, dtype=t.dtype, device=t.device)
        binom = torch.tensor([math.comb(self.degree, i) for i in range(self.degree + 1)], dtype=t.dtype, device=t.device)
        t = t.unsqueeze(-1)
        return binom * t**k * (1 - t) ** (self.degree - k)

    def extra_repr(self) -> str:
        return f"degree={self.degree}, " + super().extra_repr()


class Line(Bezier):
    """A line segment (K = 2): w(t) = (1 - t) W_0 + t W_1 ([W]'s lines, learned from scratch)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, degree=1, **kwargs)

    def extra_repr(self) -> str:
        return Subspace.extra_repr(self)


class PolyChain(Curve):
    """Polygonal chain with b bends (K = b + 2): c_k(t) = max(0, 1 - |t (K-1) - k|).

    One bend is [G]'s chain: 2(t theta + (0.5 - t) w1) for t <= 0.5, 2((t - 0.5) w2 + (1 - t) theta) after.
    """

    def __init__(self, model: nn.Module, bends: int = 1, **kwargs: Any) -> None:
        self.bends = _check_int("bends", bends, 0, "0 bends is a line, 1 is [G]'s polygonal chain")
        super().__init__(model, self.bends + 2, **kwargs)

    def coefficients(self, point: Point) -> Tensor:
        """Hat functions at t: Tensor[...] -> Tensor[..., b + 2]."""
        t = torch.as_tensor(point)
        t = t if t.is_floating_point() else t.float()
        k = torch.arange(self.num_anchors, dtype=t.dtype, device=t.device)
        return torch.clamp(1 - torch.abs(t.unsqueeze(-1) * (self.num_anchors - 1) - k), min=0)

    def extra_repr(self) -> str:
        return f"bends={self.bends}, " + super().extra_repr()


class Simplex(Subspace):
    """Simplex with K vertices: w(p) = sum_k p_k W_k, p >= 0, sum p = 1 (barycentric).

    Sampling: p ~ Dirichlet(1, ..., 1) (uniform on the simplex); centre: the centroid.
    """

    def __init__(self, model: nn.Module, vertices: int = 3, **kwargs: Any) -> None:
        _check_int("vertices", vertices, 2, "a simplex needs at least 2 vertices; 3 is a triangle")
        super().__init__(model, vertices, **kwargs)

    def coefficients(self, point: Point) -> Tensor:
        """Barycentric coordinates are the coefficients: Tensor[..., K] -> Tensor[..., K]."""
        p = torch.as_tensor(point)
        return p if p.is_floating_point() else p.float()

    def centre(self) -> Tensor:
        return torch.full((self.num_anchors,), 1.0 / self.num_anchors)

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """p ~ Dirichlet(1,..,1) as normalised Exp(1) draws: Tensor[K] (or Tensor[n, K])."""
        shape = (self.num_anchors,) if n is None else (n, self.num_anchors)
        e = torch.empty(shape).exponential_(generator=generator)
        return e / e.sum(-1, keepdim=True)

    def validate_point(self, point: Point) -> Tensor:
        p = point.detach().float() if isinstance(point, Tensor) else torch.as_tensor(point, dtype=torch.float32)
        K = self.num_anchors
        if p.ndim != 1 or p.shape[0] != K:
            raise ValueError(f"a Simplex point has {K} barycentric coordinates (one per vertex), got shape {tuple(p.shape)}")
        if not _is_compiling():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"simplex point {p.tolist()} is not finite: barycentric coordinates are numbers >= 0 summing to 1")
            if bool((p < -1e-6).any()):
                raise ValueError(f"simplex point {p.tolist()} has a negative coordinate: barycentric coordinates are >= 0")
            if abs(float(p.sum()) - 1) > 1e-4:
                raise ValueError(f"simplex point {p.tolist()} sums to {float(p.sum()):g}, not 1: barycentric coordinates sum to 1")
        return p

    def _connect_sources(self, ends: list[list[Tensor]]) -> list[list[Tensor]]:
        new = self.num_anchors - len(ends)
        centroid = [sum(ts[1:], ts[0].clone()) / len(ts) for ts in zip(*ends)]
        return [list(e) for e in ends] + [[c.clone() for c in centroid] for _ in range(new)]

    @classmethod
    def connect(cls, models: Sequence[nn.Module], new_vertices: int = 0, **kwargs: Any) -> Simplex:
        """A simplex whose first vertices are copies of ``models`` (frozen), plus ``new_vertices``
        trainable vertices at their centroid. ``Simplex.connect([net], new_vertices=1)`` starts SPRO [B]."""
        models = list(models)
        if not models:
            raise ValueError("Simplex.connect needs at least one model")
        _check_int("new_vertices", new_vertices, 0, "vertices added at the centroid")
        if len(models) + new_vertices < 2:
            raise ValueError("a simplex needs at least 2 vertices: pass more models or new_vertices >= 1")
        check_same_architecture(models)
        sub = cls(models[0], vertices=len(models) + new_vertices, _endpoints=models, **kwargs)
        for k in range(len(models)):
            sub.freeze_anchor(k)
        return sub

    @torch.no_grad()
    def add_vertex(self) -> int:
        """SPRO step [B]: freeze every vertex, add a trainable one at their centroid; returns its index.

        Rebuild the optimiser afterwards: the new vertex's Parameters are new tensors.
        """
        return self.append_centroid_anchor()


# The --subspace names, in the order that --help and the error messages list them.
register_shape("line", Line, curve=True)
register_shape("bezier", Bezier, curve=True,
               params=(ShapeParam("degree", default=2, minimum=1, why="degree 1 is a line", help="Bezier degree"),))
register_shape("polychain", PolyChain, curve=True,
               params=(ShapeParam("bends", default=1, minimum=0, why="0 bends is a line", help="polygonal chain bends"),))
# a simplex records its vertex count now, not its constructor's: SPRO's add_vertex grows it
register_shape("simplex", Simplex, curve=False,
               params=(ShapeParam("vertices", default=3, minimum=2, why="a simplex needs at least 2 vertices", help="simplex vertices"),),
               save=lambda sub: {"vertices": sub.num_anchors})
