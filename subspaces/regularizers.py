"""Regularisers on the anchors, from their K x K Gram matrix only (never a dense K x P copy).

- :func:`cosine_penalty`: [W]'s cos^2 between two anchors, over the layer weights by default.
- :func:`log_volume`: log Vol of the simplex of the anchors (Cayley-Menger), subtract
  ``lambda * log_volume`` from the loss.
- :func:`volume_penalty` with :func:`reference_log_volume`: [B]'s form,
  ``lambda / log(Vol0^2 + eps) * log(Vol^2 + eps)`` with Vol0 the volume of a simplex of freshly
  initialised networks, which puts ``lambda`` on the same scale for any network size.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor, nn

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
        i, j = (sub._check_k(k) for k in pair)
        if i == j:
            raise ValueError(f"cosine_penalty needs two different anchors, got pair {pair}")
    gram = sub.gram(selected_names(sub, params))
    return gram[i, j] ** 2 / (gram[i, i] * gram[j, j])


def squared_distances(gram: Tensor) -> Tensor:
    """D_ij = |W_i - W_j|^2 = G_ii + G_jj - 2 G_ij: Tensor[K, K] -> Tensor[K, K].

    Exact for any centre of the Gram; pass a centred one (``sub.gram(centred=True)``) for precision.
    """
    diag = torch.diagonal(gram)
    return (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)


def volume_squared_from_distances(dist2: Tensor) -> Tensor:
    """Vol^2 of the simplex with squared edge lengths D (Tensor[K, K]), by Cayley-Menger:

        Vol^2 = (-1)^(n+1) / (2^n (n!)^2) * det [[0, 1^T], [1, D]],   n = K - 1.
    """
    K = dist2.shape[0]
    n = K - 1
    cm = torch.ones(K + 1, K + 1, dtype=dist2.dtype, device=dist2.device)
    cm[0, 0] = 0
    cm[1:, 1:] = dist2
    return (-1) ** (n + 1) * torch.linalg.det(cm) / (2**n * math.factorial(n) ** 2)


def log_volume_from_distances(dist2: Tensor, eps: float = 1e-30) -> Tensor:
    """log Vol from squared edge lengths D (Tensor[K, K]); Vol^2 is clamped at ``eps`` so a
    degenerate simplex gives a finite value."""
    return 0.5 * torch.log(volume_squared_from_distances(dist2).clamp_min(eps))


def _check_vertices(sub: Subspace) -> None:
    if sub.num_anchors < 2:
        raise ValueError("a volume needs at least 2 anchors")


def log_volume(sub: Subspace) -> Tensor:
    """log of the volume of the simplex spanned by the anchors (differentiable, float64).

    Distances come from the centred Gram, exact also for a small simplex far from the origin.
    Subtract ``lambda * log_volume(sub)`` from the loss to grow the simplex.
    """
    _check_vertices(sub)
    return log_volume_from_distances(squared_distances(sub.gram(centred=True)))


def volume_penalty(sub: Subspace, eps: float = VOLUME_EPS) -> Tensor:
    """[B]'s volume term log(Vol^2 + eps) of the simplex of the anchors (differentiable, float64).

    [B] subtract ``lambda / reference_log_volume(...) * volume_penalty(sub)`` from the loss.
    """
    _check_vertices(sub)
    return torch.log(volume_squared_from_distances(squared_distances(sub.gram(centred=True))).clamp_min(0) + eps)


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
    random state is left as it was. Over the subspace parameters, K of them at a time."""
    _check_vertices(sub)
    K = sub.num_anchors
    names = set(sub.subspace_parameter_names())
    base = sub.export()
    copies = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(K):
            net = copy.deepcopy(base)
            init(net)
            copies.append(dict(net.named_parameters()))
    gram = torch.zeros(K, K, dtype=torch.float64)
    for name in names:
        x = torch.stack([c[name].detach().reshape(-1).double() for c in copies])
        x = x - x.mean(0, keepdim=True)
        gram += x @ x.T
    vol2 = float(volume_squared_from_distances(squared_distances(gram)))
    value = math.log(max(vol2, 0.0) + eps)
    if value <= 0:
        raise ValueError(
            f"the reference simplex of freshly initialised networks has Vol^2 = {vol2:.3g}, so log(Vol^2 + {eps:g}) <= 0 "
            "cannot scale lambda ([B]'s form); use the plain log-volume form (volume_form='log')"
        )
    return value
