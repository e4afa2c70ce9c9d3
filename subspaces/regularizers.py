"""Regularisers on the anchors, from their K x K Gram matrix only (never a dense K x P copy).

- :func:`cosine_penalty`: [W]'s cos^2 between two anchors, over the layer weights by default.
- :func:`log_volume`: log Vol of the simplex of the anchors (Cayley-Menger), subtract
  ``lambda * log_volume`` from the loss.
- :func:`volume_penalty` with :func:`reference_log_volume`: [B]'s form,
  ``lambda / log(Vol0^2 + eps) * log(Vol^2 + eps)`` with Vol0 the volume of a simplex of freshly
  initialised networks, which puts ``lambda`` on the same scale for any network size.

A subspace that lists its simplices (an attribute ``simplices``: tuples of anchor indices, as
:class:`subspaces.complex.SimplicialComplex` has) gets each volume term summed over its
simplices, ``sum_s log Vol_s`` and ``sum_s log(Vol_s^2 + eps)``, and the reference likewise
``sum_s log(Vol0_s^2 + eps)``; every other subspace is one simplex of all its anchors.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from .geometry import CentredGram, centred_block, log_volume_from_distances, squared_distances, volume_squared_from_distances
from .init import reinitialize
from .subspace import Subspace

#: [B]'s constant inside the logarithm: log(Vol^2 + 1e-4) stays finite at a degenerate simplex
VOLUME_EPS = 1e-4

Selection = Union[str, Sequence[str]]


def selected_names(sub: Subspace, params: Selection = "weights") -> list[str]:
    """The subspace parameter names a regulariser covers.

    ``"weights"``: :meth:`Subspace.weight_names` (convolution, linear and attention weights, as
    [W]'s code, which sums over its convolution layers); ``"all"``: every subspace parameter;
    a list of fnmatch patterns (``["*.conv*.weight"]``): the names that match one.
    """
    if params == "weights":
        names = sub.weight_names()
        what = "layer weights (ndim >= 2, decayed)"
    elif params == "all":
        names = sub.subspace_parameter_names()
        what = "parameters"
    elif isinstance(params, str):
        raise ValueError(f"params={params!r}: use 'weights', 'all' or a list of fnmatch patterns")
    else:
        names = [n for n in sub.subspace_parameter_names() if any(fnmatch.fnmatchcase(n, p) for p in params)]
        what = f"parameters matching {list(params)}"
    if not names:
        raise ValueError(f"the regulariser covers no parameter: this subspace has no {what}; pass params='all' or other patterns")
    return names


def cosine_penalty(
    sub: Subspace,
    pair: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    params: Selection = "weights",
) -> Tensor:
    """cos^2(W_i, W_j) = <W_i, W_j>^2 / (|W_i|^2 |W_j|^2) over the parameters ``params`` selects [W].

    Default ``params="weights"``: the layer weights (see :func:`selected_names`), as [W]'s code;
    ``"all"`` adds norms and biases, whose scales start at 1 in every anchor and then dominate.
    ``pair`` picks the anchors; by default a random pair is drawn (always (0, 1) for a line).
    Returns a differentiable scalar (float64); add ``beta * cosine_penalty(sub)`` to the loss.
    """
    K = sub.num_anchors
    if pair is None:
        i, j = (0, 1) if K == 2 else torch.randperm(K, generator=generator)[:2].tolist()
    else:
        i, j = (sub.check_anchor_index(k) for k in pair)
        if i == j:
            raise ValueError(f"cosine_penalty needs two different anchors, got pair {pair}")
    gram = sub.gram(selected_names(sub, params))
    return gram[i, j] ** 2 / (gram[i, i] * gram[j, j])


def _check_vertices(sub: Subspace) -> None:
    if sub.num_anchors < 2:
        raise ValueError("a volume needs at least 2 anchors")


def simplices_of(sub: Subspace) -> list[tuple[int, ...]] | None:
    """The simplices a subspace lists (``sub.simplices``: tuples of anchor indices), or None for a
    subspace that is one simplex of all its anchors. ValueError for a simplex of fewer than 2
    vertices or an index outside 0..K-1."""
    listed = getattr(sub, "simplices", None)
    if listed is None:
        return None
    out = [tuple(int(k) for k in simplex) for simplex in listed]
    for simplex in out:
        if len(simplex) < 2:
            raise ValueError(f"simplex {simplex} has fewer than 2 vertices: a volume needs at least 2")
        if not all(0 <= k < sub.num_anchors for k in simplex):
            raise ValueError(f"simplex {simplex} names an anchor outside 0..{sub.num_anchors - 1}")
    if not out:
        raise ValueError("the subspace lists no simplex: a volume needs at least one")
    return out


def _per_simplex(dist2: Tensor, simplices: list[tuple[int, ...]]) -> list[Tensor]:
    """Squared edge lengths of each simplex: D[idx][:, idx] for each vertex tuple idx."""
    out = []
    for simplex in simplices:
        idx = torch.tensor(simplex, device=dist2.device)
        out.append(dist2.index_select(0, idx).index_select(1, idx))
    return out


def log_volume(sub: Subspace) -> Tensor:
    """log of the volume of the simplex spanned by the anchors (differentiable, float64).

    Distances come from the centred Gram, exact also for a small simplex far from the origin.
    Subtract ``lambda * log_volume(sub)`` from the loss to grow the simplex. A subspace listing
    its simplices (``sub.simplices``) gets sum_s log Vol_s over them.
    """
    _check_vertices(sub)
    dist2 = squared_distances(sub.gram(centred=True))
    simplices = simplices_of(sub)
    if simplices is None:
        return log_volume_from_distances(dist2)
    terms = [log_volume_from_distances(d) for d in _per_simplex(dist2, simplices)]
    return sum(terms[1:], terms[0])


def volume_penalty(sub: Subspace, eps: float = VOLUME_EPS) -> Tensor:
    """[B]'s volume term log(Vol^2 + eps) of the simplex of the anchors (differentiable, float64).

    [B] subtract ``lambda / reference_log_volume(...) * volume_penalty(sub)`` from the loss. A
    subspace listing its simplices (``sub.simplices``) gets sum_s log(Vol_s^2 + eps) over them.
    """
    _check_vertices(sub)
    dist2 = squared_distances(sub.gram(centred=True))
    simplices = simplices_of(sub)
    if simplices is None:
        return torch.log(volume_squared_from_distances(dist2).clamp_min(0) + eps)
    terms = [torch.log(volume_squared_from_distances(d).clamp_min(0) + eps) for d in _per_simplex(dist2, simplices)]
    return sum(terms[1:], terms[0])


@torch.no_grad()
def reference_log_volume(
    sub: Subspace,
    seed: int = 0,
    init: Callable[[nn.Module], None] = reinitialize,
    eps: float = VOLUME_EPS,
) -> float:
    """log(Vol0^2 + eps) of a simplex of K freshly initialised copies of the network: [B]'s
    normaliser of lambda. The copies are drawn with ``init`` (the model's own initialisation)
    from a generator seeded with ``seed``, so a resumed run gets the same value; the global
    random state is left as it was. Over the subspace parameters, K of them at a time. A subspace
    listing its simplices gets sum_s log(Vol0_s^2 + eps), the normaliser of the summed penalty."""
    _check_vertices(sub)
    K = sub.num_anchors
    names = sub.subspace_parameter_names()
    base = sub.export()
    copies = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(K):
            net = copy.deepcopy(base)
            init(net)
            copies.append(dict(net.named_parameters()))
    gram = torch.zeros(K, K, dtype=torch.float64)
    for name in names:   # in the subspace's order, so that every process sums the same way
        rows = [c[name].detach().reshape(-1) for c in copies]
        gram += CentredGram.apply(centred_block(K, rows[0].device), *rows).to(gram.device)
    simplices = simplices_of(sub)
    if simplices is None:
        vol2 = float(volume_squared_from_distances(squared_distances(gram)))
        value = math.log(max(vol2, 0.0) + eps)
    else:
        vols2 = [float(volume_squared_from_distances(d)) for d in _per_simplex(squared_distances(gram), simplices)]
        vol2 = min(vols2)
        value = sum(math.log(max(v, 0.0) + eps) for v in vols2)
    if value <= 0:
        raise ValueError(
            f"the reference simplex of freshly initialised networks has Vol^2 = {vol2:.3g}, so log(Vol^2 + {eps:g}) <= 0 "
            "cannot scale lambda ([B]'s form); use the plain log-volume form (volume_form='log')"
        )
    return value
