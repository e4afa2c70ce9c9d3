"""Geometry of the anchors from their K x K Gram matrix: inner products, distances, volumes.

    G_ij = <W_i - m, W_j - m>                          (m = 0, or the centroid (1/K) sum_k W_k)
    D_ij = |W_i - W_j|^2 = G_ii + G_jj - 2 G_ij        (for any m)
    Vol^2 by Cayley-Menger from D

The Gram is taken K storage groups at a time, never as a K x P copy of the anchors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .anchor_store import AnchorGroup


def gram(groups: Sequence[AnchorGroup], anchors: Sequence[nn.ParameterDict], names: set[str] | None = None,
         centred: bool = False) -> Tensor:
    """Inner products of the anchors: Tensor[K, K] in float64, differentiable.

    G_ij = <W_i - m, W_j - m> over the subspace parameters in ``names`` (default: all), with
    m = 0, or with ``centred=True`` m = (1/K) sum_k W_k. Centred products are taken in float64,
    uncentred ones (cosines) in the anchors' dtype (float32 for float16 / bfloat16 anchors,
    autocast off) and summed in float64. Centring keeps distances exact for a simplex that is
    small next to |W| (an SPRO vertex starting at the centroid): float32 products of uncentred
    weights lose every digit of G_ii + G_jj - 2 G_ij there. ValueError for a name that is not a
    subspace parameter, or when ``names`` selects none.
    """
    if names is not None:
        unknown = names - {n for g in groups for n in g.names}
        if unknown:
            raise ValueError(f"gram(names=...): {sorted(unknown)[:3]} are not subspace parameters; see subspace_parameter_names()")
    total: Tensor | None = None
    # Sums of squares of a network's weights exceed float16's 65504; autocast would run the
    # products below in float16 (GPU) or bfloat16, so it is off here and half anchors go float32.
    with torch.autocast(device_type=anchors[0][groups[0].name].device.type, enabled=False):
        for g in groups:
            part = gram_of_group(g, anchors, names, centred)
            if part is not None:
                total = part if total is None else total + part
    if total is None:
        raise ValueError("gram(names=...) selected no parameter of this subspace")
    return total


def gram_of_group(g: AnchorGroup, anchors: Sequence[nn.ParameterDict], names: set[str] | None, centred: bool) -> Tensor | None:
    """One storage group's share of :func:`gram` (float64 [K, K]), None if none of it is selected."""
    K = len(anchors)
    if names is None or names.issuperset(g.names):
        pieces = [torch.stack([anchors[k][g.name].reshape(-1) for k in range(K)])]
    else:
        keep = [i for i, n in enumerate(g.names) if n in names]
        if not keep:
            return None
        split = [anchors[k][g.name].reshape(-1).split(g.numels) for k in range(K)]
        pieces = [torch.stack([split[k][i] for k in range(K)]) for i in keep]
    total: Tensor | None = None
    for stacked in pieces:   # [K, n]
        if centred:
            x = stacked.double()
            x = x - x.mean(0, keepdim=True)
            part = x @ x.T
        else:
            x = stacked.float() if stacked.dtype in (torch.float16, torch.bfloat16) else stacked
            part = (x @ x.T).double()
        total = part if total is None else total + part
    return total


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
