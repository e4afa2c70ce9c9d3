"""Geometry of the anchors from their K x K Gram matrix: inner products, distances, volumes.

    G_ij = <W_i - m, W_j - m>                          (m = 0, or the centroid (1/K) sum_k W_k)
    D_ij = |W_i - W_j|^2 = G_ii + G_jj - 2 G_ij        (for any m)
    Vol^2 by Cayley-Menger from D

The Gram is taken one storage group at a time, never as a K x P copy of the anchors; the
centred one (float64) in cache-sized blocks of columns on a CPU (:class:`CentredGram`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
        pieces = [[anchors[k][g.name].reshape(-1) for k in range(K)]]
    else:
        keep = [i for i, n in enumerate(g.names) if n in names]
        if not keep:
            return None
        split = [anchors[k][g.name].reshape(-1).split(g.numels) for k in range(K)]
        pieces = [[split[k][i] for k in range(K)] for i in keep]
    total: Tensor | None = None
    for piece in pieces:   # K tensors [n]
        if centred:
            part = CentredGram.apply(centred_block(K, piece[0].device), *piece)
        else:
            stacked = torch.stack(piece)
            x = stacked.float() if stacked.dtype in (torch.float16, torch.bfloat16) else stacked
            part = (x @ x.T).double()
        total = part if total is None else total + part
    return total


def centred_block(K: int, device: torch.device) -> int | None:
    """Columns of the K rows :class:`CentredGram` takes at a time: on a CPU about 1 MiB of float64
    rows, so that each block's passes run in cache; elsewhere (None) all columns at once."""
    return max(1 << 12, (1 << 17) // K) if device.type == "cpu" else None


class CentredGram(torch.autograd.Function):
    """G = X_c X_c^T in float64, X_c = X - (1/K) 1 1^T X, from the rows x_1..x_K (K tensors [n], any
    float dtype) of X: Tensor[K, K]. Backward: dX = P (dG + dG^T) X_c with P the same centring,
    in each row's own dtype. ``block`` columns at a time (None: all), recomputing X_c in the
    backward instead of keeping K x n float64 values between the passes."""

    @staticmethod
    def forward(ctx: Any, block: int | None, *rows: Tensor) -> Tensor:
        ctx.block = block
        ctx.save_for_backward(*rows)
        K, n = len(rows), rows[0].numel()
        gram = torch.zeros(K, K, dtype=torch.float64, device=rows[0].device)
        for lo, hi in _blocks(n, block):
            x = _centred(rows, lo, hi)
            gram.addmm_(x, x.T)
        return gram

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows = ctx.saved_tensors
        wanted = ctx.needs_input_grad[1:]
        grads = [torch.empty_like(r) if w else None for r, w in zip(rows, wanted)]
        if not any(wanted):
            return (None, *grads)
        sym = (grad + grad.T).to(torch.float64)
        for lo, hi in _blocks(rows[0].numel(), ctx.block):
            dx = sym @ _centred(rows, lo, hi)
            dx -= dx.mean(0, keepdim=True)
            for g, d in zip(grads, dx):
                if g is not None:
                    g[lo:hi].copy_(d)
        return (None, *grads)


def _blocks(n: int, block: int | None) -> list[tuple[int, int]]:
    step = n if not block else block
    return [(lo, min(lo + step, n)) for lo in range(0, n, max(step, 1))]


def _centred(rows: Sequence[Tensor], lo: int, hi: int) -> Tensor:
    x = torch.stack([r[lo:hi] for r in rows]).double()
    return x.sub_(x.mean(0, keepdim=True))


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
