"""Regularisers on the anchors, from their K x K Gram matrix only (never a dense K x P copy)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .subspace import Subspace


def cosine_penalty(sub: Subspace, pair: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """cos^2(W_i, W_j) = <W_i, W_j>^2 / (|W_i|^2 |W_j|^2) over the concatenation of all subspace weights [W].

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
    gram = sub.gram()
    return gram[i, j] ** 2 / (gram[i, i] * gram[j, j])


def squared_distances(gram: Tensor) -> Tensor:
    """D_ij = |W_i - W_j|^2 = G_ii + G_jj - 2 G_ij: Tensor[K, K] -> Tensor[K, K]."""
    diag = torch.diagonal(gram)
    return (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)


def log_volume_from_distances(dist2: Tensor, eps: float = 1e-30) -> Tensor:
    """log Vol of the simplex with squared edge lengths D (Tensor[K, K]), by Cayley-Menger:

        Vol^2 = (-1)^(n+1) / (2^n (n!)^2) * det [[0, 1^T], [1, D]],   n = K - 1.

    Vol^2 is clamped at ``eps`` so a degenerate simplex gives a finite value.
    """
    K = dist2.shape[0]
    n = K - 1
    cm = torch.ones(K + 1, K + 1, dtype=dist2.dtype, device=dist2.device)
    cm[0, 0] = 0
    cm[1:, 1:] = dist2
    det = torch.linalg.det(cm)
    vol2 = (-1) ** (n + 1) * det / (2**n * math.factorial(n) ** 2)
    return 0.5 * torch.log(vol2.clamp_min(eps))


def log_volume(sub: Subspace) -> Tensor:
    """log of the volume of the simplex spanned by the anchors [B] (differentiable, float64).

    Subtract ``lambda * log_volume(sub)`` from the loss to grow the simplex (SPRO).
    """
    if sub.num_anchors < 2:
        raise ValueError("log_volume needs at least 2 anchors")
    return log_volume_from_distances(squared_distances(sub.gram()))
