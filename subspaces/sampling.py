"""How a subspace draws its training points: the sampling modes, and arc-length sampling of curves.

- ``"global"``: one point p ~ the shape's distribution per forward, the same coefficients c(p)
  for every parameter.
- ``"layerwise"``: an independent point per module ([W]): coefficients Tensor[K, num_modules].
- ``"arc_length"`` (curves only): t drawn with density proportional to the speed
  ||w'(t)|| = sqrt(c'(t)^T G c'(t)) (G the anchors' Gram), so points are uniform along the
  curve's length rather than in t; the density is tabulated on a grid of t and refreshed every
  ``arc_length_every`` training forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import ConfigError

#: the training-point sampling modes, in the order --help lists them
SAMPLING_MODES = ("global", "layerwise", "arc_length")

#: cells of the grid of t on which the arc-length density is tabulated
ARC_LENGTH_GRID = 201


def check_sampling(sampling: str, curve: bool, arc_length_every: int) -> None:
    """ConfigError unless ``sampling`` is one of :data:`SAMPLING_MODES` that the shape supports
    (``"arc_length"`` for curves only) and ``arc_length_every >= 1``."""
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"sampling={sampling!r} is not one of {SAMPLING_MODES}")
    if sampling == "arc_length" and not curve:
        raise ConfigError("sampling='arc_length' is defined for curves (Line, Bezier, PolyChain) only")
    if isinstance(arc_length_every, bool) or not isinstance(arc_length_every, (int, float)) or arc_length_every < 1:
        raise ConfigError(f"arc_length_every must be >= 1, got {arc_length_every}")


def speed(coefficients: Callable[[Tensor], Tensor], gram: Tensor, t: Tensor) -> Tensor:
    """||w'(t)|| = sqrt(c'(t)^T G c'(t)) at curve points t: Tensor[N] -> Tensor[N] (float64).

    ``coefficients``: the curve's c(t): Tensor[] -> Tensor[K]; ``gram``: the anchors' Gram
    Tensor[K, K] (centred or not: sum_k c_k'(t) = 0 makes both give the same value, exactly).
    """
    deriv = torch.func.vmap(torch.func.jacfwd(coefficients))(t.double())   # [N, K]
    return torch.einsum("nk,kl,nl->n", deriv, gram, deriv).clamp_min(0).sqrt()


def arc_length_density(speed_at: Callable[[Tensor], Tensor], grid: int = ARC_LENGTH_GRID) -> tuple[Tensor, Tensor]:
    """The piecewise-constant arc-length density on [0, 1]: (edges Tensor[grid], weights
    Tensor[grid - 1]), the speed at each cell's midpoint; uniform if that is not finite or is 0."""
    edges = torch.linspace(0, 1, grid, dtype=torch.float64)
    mids = (edges[1:] + edges[:-1]) / 2
    dens = speed_at(mids).cpu()
    if not torch.isfinite(dens).all() or dens.sum() <= 0:
        dens = torch.ones_like(dens)
    return edges, dens


def draw_from_density(edges: Tensor, dens: Tensor, generator: torch.Generator) -> Tensor:
    """One t from a piecewise-constant density: a cell with probability proportional to its
    weight, then uniform in the cell. Tensor[] (float32)."""
    cell = torch.multinomial(dens, 1, generator=generator)[0]
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return (edges[cell] + u * (edges[cell + 1] - edges[cell])).float()
