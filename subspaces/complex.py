"""Mode-connecting simplicial complexes [B] (docs/complex.md): k trained modes joined by m shared vertices.

Anchors 0..k-1 are the modes (trained networks, frozen) and anchors k..k+m-1 the shared vertices.
The complex is the union of the k simplices

    S_i = conv(mode_i, shared_0, ..., shared_{m-1}),        i = 0..k-1,

each with d = m + 1 vertices; any two of them meet in the face spanned by the shared vertices.
A point is a coefficient vector c in R^K (K = k + m), c >= 0, sum c = 1, supported on the
vertices of one simplex: w(c) = sum_j c_j W_j. Training minimises

    E_i E_{p ~ Dirichlet(1_d)} L(w(p on S_i))  -  lambda / sum_i log(Vol0_i^2 + eps) * sum_i log(Vol_i^2 + eps)

over the shared vertices only (the modes stay bit-identical): a shared vertex belongs to every
simplex, so its gradient collects the terms of all of them. The simplex i is drawn uniformly,
as [B]'s training code does (``SimplexNet.vertex_weights``: ``np.random.randint(n_simplex)``;
their volume-weighted ``SimplicialComplex`` module is not used to train): every simplex has the
same dimension, and a uniform draw gives every mode's simplex the same share of the steps
whatever their current volumes.

[B]'s code regularises ``total_volume()`` = the volume of simplex 0 only (its sum over simplices
is commented out); here the volume term is summed over every simplex
(:func:`subspaces.regularizers.volume_penalty` reads ``simplices``), so that no mode's simplex is
favoured. :func:`subspaces.complex_run.run_complex` trains the shared vertices one at a time as [B]'s
``complex_iterative.py`` does: each new one starts at the centroid of all current vertices,
joins every simplex, and the earlier ones are frozen; the first is trained without the volume
term (its simplices are edges mode_i - shared_0, whose length the term would only push apart).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .io import create_model, load_weights_into, write_weights
from .shapes import check_same_architecture
from .subspace import Point, Subspace

#: coordinates below this count as zero when deciding which simplex holds a point
SUPPORT_TOL = 1e-6


def _count(name: str, value: Any, minimum: int, hint: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid: it must be an int >= {minimum} ({hint})")
    return value


class SimplicialComplex(Subspace):
    """k modes and m shared vertices; k simplices (mode_i, shared_0, .., shared_{m-1}).

    Args:
        model: the network (its class and parameter layout; anchors come from ``connect``).
        modes: k >= 2, the anchors 0..k-1.
        shared: m >= 1, the anchors k..k+m-1, in every simplex.
        **kwargs: as :class:`~subspaces.subspace.Subspace` (``include``, ``exclude``, ``seed``,
            ``init``); only ``sampling="global"`` (one point of the complex per forward).

    Points: Tensor[K] coefficient vectors (K = k + m), >= 0, summing to 1, nonzero only on the
    vertices of one simplex. Sampling: simplex i ~ U{0..k-1}, then Dirichlet(1) barycentric
    coordinates over its d = m + 1 vertices. Centre: the centroid of the shared vertices, the
    face every simplex contains.
    """

    def __init__(self, model: nn.Module, modes: int = 2, shared: int = 1, **kwargs: Any) -> None:
        self.modes = _count("modes", modes, 2, "a complex joins at least 2 modes; one mode with shared vertices is a Simplex")
        self.shared = _count("shared", shared, 1, "at least 1 shared vertex joins the modes")
        if kwargs.get("sampling", "global") != "global":
            raise ConfigError(f"sampling={kwargs['sampling']!r}: a SimplicialComplex draws one point per forward; use sampling='global'")
        super().__init__(model, self.modes + self.shared, **kwargs)

    # ------------------------------------------------------------------ structure
    @property
    def simplices(self) -> tuple[tuple[int, ...], ...]:
        """Vertex indices of each simplex: ((0, k, .., k+m-1), (1, k, ..), .., (k-1, k, ..))."""
        face = tuple(range(self.modes, self.num_anchors))
        return tuple((i, *face) for i in range(self.modes))

    def shared_indices(self) -> list[int]:
        """Anchor indices of the shared vertices: [k, .., k+m-1]."""
        return list(range(self.modes, self.num_anchors))

    def simplex_of(self, point: Point) -> int:
        """Index i of the simplex holding ``point`` (Tensor[K]); the lowest one for a point of the shared face."""
        p = self.validate_point(point)
        return self._holder(p)

    def _holder(self, p: Tensor) -> int:
        support = {int(j) for j in torch.nonzero(p.abs() > SUPPORT_TOL).flatten()}
        for i, simplex in enumerate(self.simplices):
            if support <= set(simplex):
                return i
        on_modes = sorted(j for j in support if j < self.modes)
        raise ValueError(
            f"point has weight on modes {on_modes}: a point of the complex lies in one simplex "
            f"(one mode plus the shared vertices {self.shared_indices()}), so at most one mode coordinate is nonzero"
        )

    # ------------------------------------------------------------------ shape interface
    def coefficients(self, point: Point) -> Tensor:
        """The coefficient vector is the point: Tensor[..., K] -> Tensor[..., K]."""
        p = torch.as_tensor(point)
        return p if p.is_floating_point() else p.float()

    def centre(self) -> Tensor:
        """Centroid of the shared vertices: Tensor[K], 1/m on each shared vertex."""
        c = torch.zeros(self.num_anchors)
        c[self.modes:] = 1.0 / self.shared
        return c

    def sample_simplex(self, index: int, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """Uniform points of simplex ``index``: Dirichlet(1) over its d vertices, zero elsewhere.

        Returns Tensor[K] (or Tensor[n, K]).
        """
        if not isinstance(index, int) or not 0 <= index < self.modes:
            raise ConfigError(f"simplex index {index!r} is out of range: this complex has simplices 0..{self.modes - 1}")
        idx = torch.full((1 if n is None else n,), index, dtype=torch.long)
        out = self._draw(idx, generator)
        return out[0] if n is None else out

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """A simplex i ~ U{0..k-1}, then Dirichlet(1) over its vertices: Tensor[K] (or Tensor[n, K])."""
        idx = torch.randint(self.modes, (1 if n is None else n,), generator=generator)
        out = self._draw(idx, generator)
        return out[0] if n is None else out

    def _draw(self, simplex_index: Tensor, generator: torch.Generator | None) -> Tensor:
        """Dirichlet(1) coordinates as normalised Exp(1) draws, scattered onto each row's simplex: Tensor[n, K]."""
        vertices = torch.tensor(self.simplices, dtype=torch.long)[simplex_index]   # [n, d]
        e = torch.empty(vertices.shape).exponential_(generator=generator)
        return torch.zeros(vertices.shape[0], self.num_anchors).scatter_(1, vertices, e / e.sum(-1, keepdim=True))

    def validate_point(self, point: Point) -> Tensor:
        p = point.detach().float() if isinstance(point, Tensor) else torch.as_tensor(point, dtype=torch.float32)
        K = self.num_anchors
        if p.ndim != 1 or p.shape[0] != K:
            raise ValueError(f"a point of this complex has {K} coordinates (one per vertex: {self.modes} modes, "
                             f"{self.shared} shared), got shape {tuple(p.shape)}")
        if not torch.compiler.is_compiling():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"point {p.tolist()} is not finite: coordinates are numbers >= 0 summing to 1")
            if bool((p < -SUPPORT_TOL).any()):
                raise ValueError(f"point {p.tolist()} has a negative coordinate: barycentric coordinates are >= 0")
            if abs(float(p.sum()) - 1) > 1e-4:
                raise ValueError(f"point {p.tolist()} sums to {float(p.sum()):g}, not 1: barycentric coordinates sum to 1")
            self._holder(p)
        return p

    # ------------------------------------------------------------------ construction
    def _connect_sources(self, ends: list[list[Tensor]]) -> list[list[Tensor]]:
        centroid = [sum(ts[1:], ts[0].clone()) / len(ts) for ts in zip(*ends)]
        return [list(e) for e in ends] + [[c.clone() for c in centroid] for _ in range(self.shared)]

    @classmethod
    def connect(cls, models: Sequence[nn.Module], shared: int = 1, **kwargs: Any) -> SimplicialComplex:
        """A complex whose modes are copies of ``models`` (frozen) and whose ``shared`` vertices
        start at the modes' centroid, all trainable (train them jointly, or use
        :meth:`add_shared_vertex` to grow them one at a time as [B]).
        BatchNorm buffers and parameters outside the subspace start from ``models[0]``."""
        models = list(models)
        if len(models) < 2:
            raise ConfigError(f"SimplicialComplex.connect got {len(models)} model(s): pass at least 2 trained networks (the modes)")
        check_same_architecture(models)
        sub = cls(models[0], modes=len(models), shared=shared, _endpoints=models, **kwargs)
        for k in range(sub.modes):
            sub.freeze_anchor(k)
        return sub

    @torch.no_grad()
    def add_shared_vertex(self) -> int:
        """[B]'s next connector: freeze every vertex, add a shared vertex at the centroid of all of
        them (modes and shared), in every simplex; returns its anchor index (K - 1 afterwards).

        Rebuild the optimiser afterwards: the new vertex's Parameters are new tensors.
        """
        self.shared += 1
        return self.append_centroid_anchor()

    def extra_repr(self) -> str:
        return f"modes={self.modes}, shared={self.shared}, " + super().extra_repr()


# ---------------------------------------------------------------------------------------- files
def save_complex(sub: SimplicialComplex, path: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``path``.safetensors (the state_dict) and ``path``.json (model spec, modes, shared, frozen)."""
    info = {"modes": sub.modes, "shared": sub.shared, "frozen": [k for k in range(sub.num_anchors) if not sub.anchor_trainable(k)],
            "include": sub.include, "exclude": sub.exclude}
    return write_weights(sub, path, {**spec, "kind": "complex", "complex": info})


def load_complex(path: str | Path) -> SimplicialComplex:
    """Recreate a complex written by :func:`save_complex` (``path``: the .safetensors or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "complex.safetensors"
    spec_path = path.with_suffix(".json")
    try:
        spec = json.loads(spec_path.read_text())
        info = spec["complex"]
        modes, shared = int(info["modes"]), int(info["shared"])
    except FileNotFoundError:
        raise CheckpointError(f"{spec_path} does not exist: pass a stage folder of recipes/complex.py or its complex.safetensors") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{spec_path} is not a complex's spec ({type(err).__name__}: {err}): truncated or of another kind?") from None
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: the stage was not finished; run it again with --resume")
    sub = SimplicialComplex(create_model(spec), modes=modes, shared=shared, include=info.get("include"),
                            exclude=info.get("exclude"), init=lambda m: None)
    load_weights_into(sub, path, spec, spec_path, f"a complex of {spec['model']}")
    for k in info.get("frozen", []):
        sub.freeze_anchor(k)
    sub.spec = spec  # type: ignore[assignment]
    return sub
