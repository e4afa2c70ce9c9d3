"""Weight matching (Ainsworth et al. 2022, "Git Re-Basin"): the permutations of a spec's groups
that bring one network's weights closest to another's.

It maximises sum_p <W_A^p, P W_B^p> over permutations, one group at a time with the others held (a
linear assignment, ``scipy.optimize.linear_sum_assignment``), until no group changes, from a start
that needs no guess of the other groups (each channel's weights sorted over the axes other groups
permute) and from the identity, keeping the better; reaching the Cauchy-Schwarz bound
sum_p ||W_A^p|| ||W_B^p|| proves an exact undo.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..errors import ConfigError
from .groups import PermutationSpec

__all__ = ["weight_matching"]

#: the package's logger, as every part of the alignment logs under one name
logger = logging.getLogger(__package__)


def _unfold(t: Tensor, axis: int, n: int) -> Tensor:
    """``t`` with ``axis`` moved first and the rest flattened: Tensor[n, numel / n]."""
    return t.movedim(axis, 0).reshape(n, -1)


def _assign(similarity: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """The permutation p (LongTensor[n]) maximising sum_i similarity[i, p[i]], a linear assignment.

    Solved as min sum_i ||a_i - b_p(i)||^2 = sq_a[i] + sq_b[p(i)] - 2 similarity[i, p(i)], the same
    optimum (the squared norms sum to a constant over any p), because scipy's solver is one to two
    orders of magnitude faster when the best assignment costs about 0 than on the near-uniform
    inner products of matching channels."""
    cost = sq_a[:, None] + sq_b[None, :] - 2 * similarity
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]


def _invariant_slices(t: Tensor, axis: int, groups: Sequence[int | None]) -> Tensor:
    """Tensor[n, ...] of ``t``'s slices along ``axis``, each made invariant to the permutation of
    every other permuted axis: for each position of the unpermuted axes, the entries over the
    permuted ones (``groups[d]`` not None, d != axis) sorted. Unpermuted axes are kept as they are,
    they carry the most information."""
    others = [d for d in range(t.ndim) if d != axis]
    fixed = [d for d in others if groups[d] is None]
    moving = [d for d in others if groups[d] is not None]
    out = t.permute(axis, *fixed, *moving)
    if not moving:
        return out.reshape(t.shape[axis], -1)
    out = out.reshape(t.shape[axis], -1, math.prod(t.shape[d] for d in moving))
    out = out.to(torch.promote_types(out.dtype, torch.float32)).contiguous()
    # numpy's sort (SIMD) is 30-60x faster than torch's on CPU for rows of a few hundred entries
    return torch.from_numpy(np.sort(out.numpy(), axis=-1)).reshape(t.shape[axis], -1)


def _log_matching(info: dict[str, Any]) -> None:
    """One line on the matching, from the main process only (every rank aligns the same pair)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    alt = info["similarity_alternative"]
    logger.info(f"weight matching: similarity {info['similarity_before']:.6g} -> {info['similarity_after']:.6g} "
                f"(start '{info['start']}', {info['iterations']} sweeps; upper bound {info['similarity_bound']:.6g}"
                f"{', reached' if info['bound_reached'] else ''}; best other start "
                f"{'none' if alt is None else format(alt, '.6g')})")


def weight_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, *, max_iter: int = 100,
                    seed: int = 0, restarts: int = 0, stop_at_bound: bool = True) -> tuple[list[Tensor], dict[str, Any]]:
    """Weight matching [Ainsworth et al. 2022, Alg. 1]: permutations P_g (LongTensor[n_g] each)
    maximising the similarity S(P) = sum over parameters p of <W_A^p, P W_B^p>.

    Coordinate descent: one group at a time in a random order (seeded), each a linear assignment
    on C_g = sum_{(p, d) in g} A_p(d) B'_p(d)^T (Tensor[n_g, n_g], A_p(d) the parameter unfolded
    along axis d, B'_p with the other groups' permutations applied), until a full sweep changes
    nothing. It runs from several starts, in this order, and keeps the permutations of the highest
    S (the earlier start on a tie):

    - ``"sorted"``: each group on its own, the assignment on
      D_g[i, j] = sum_{(p, d) in g} <s(A_p(d)_i), s(B_p(d)_j)>, where s sorts a channel's slice over
      the axes other groups permute (per position of the unpermuted axes). s(x) does not depend on
      those permutations, so no guess of the other groups enters. As the squared norms of the slices
      sum to a constant over any assignment, this minimises
      sum_i sum_p ||s(A_p(d)_i) - s(B_p(d)_pi(i))||^2, a sum of squared 1-D Wasserstein distances
      between the channels' weight distributions: 0 at the exact undo when B is a permutation of A;
    - ``"identity"``: Ainsworth et al.'s start (its group orders drawn from ``seed``);
    - ``restarts`` more from uniformly random permutations (seeded).

    From the identity alone the descent stalls where groups are coupled through a residual stream
    whose own tensors say little (norm and layer scales are constant at init; a pooling token mixer
    has no weights): the stream is scored through the wrongly ordered hidden units of every block
    and the hidden units through the wrongly ordered stream, and no single group's change raises S.
    The sorted start does not depend on that coupling.

    By Cauchy-Schwarz S <= sum_p ||W_A^p|| ||W_B^p|| (a permutation keeps norms), with equality iff
    P W_B = W_A for every matched parameter when B is a permutation of A: reaching the bound proves
    the exact undo, and with ``stop_at_bound`` the remaining starts are skipped (none can do better).
    Returns (perms, info): ``iterations`` (sweeps of the kept run), ``similarity_before`` (at the
    identity), ``similarity_after``, ``similarity_bound``, ``bound_reached`` (within 1e-9 relative),
    ``start`` (the kept one), ``starts`` (each run start's similarity and sweeps) and
    ``similarity_alternative`` (the best S of the other starts run; None if none was)."""
    if restarts < 0:
        raise ConfigError(f"restarts must be >= 0, got {restarts}")
    sa = {n: t.detach().cpu() for n, t in model_a.state_dict().items()}
    sb = {n: t.detach().cpu() for n, t in model_b.state_dict().items()}
    params = {n for n, _ in model_a.named_parameters()}
    names = [n for n in spec.axes if n in params]
    members = [[(n, d) for n, d in group if n in params] for group in spec.groups]
    sa64 = {n: t.double() for n, t in sa.items()}
    sb64 = {n: t.double() for n, t in sb.items()}

    def squared_norms(state: dict[str, Tensor], g: int) -> Tensor:
        """Per channel of group g, the squared norm of its slices (no permutation changes it)."""
        total = torch.zeros(spec.sizes[g], dtype=torch.float64)
        for name, d in members[g]:
            total += _unfold(state[name], d, spec.sizes[g]).pow(2).sum(1)
        return total

    sq_a = [squared_norms(sa64, g) for g in range(len(spec.groups))]
    sq_b = [squared_norms(sb64, g) for g in range(len(spec.groups))]

    def permuted_b(perms: list[Tensor], name: str, skip_axis: int | None = None) -> Tensor:
        t = sb64[name]
        for d, g in enumerate(spec.axes[name]):
            if g is not None and d != skip_axis:
                t = t.index_select(d, perms[g])
        return t

    def similarity(perms: list[Tensor]) -> float:
        return float(sum((sa64[n] * permuted_b(perms, n)).sum() for n in names))

    def descend(perms: list[Tensor], gen: torch.Generator) -> tuple[list[Tensor], int]:
        perms = list(perms)
        iterations = 0
        for iterations in range(1, max_iter + 1):
            changed = False
            for g in torch.randperm(len(spec.groups), generator=gen).tolist():
                n_g = spec.sizes[g]
                cost = torch.zeros(n_g, n_g, dtype=torch.float64)
                for name, d in members[g]:
                    cost += _unfold(sa64[name], d, n_g) @ _unfold(permuted_b(perms, name, skip_axis=d), d, n_g).T
                new = _assign(cost, sq_a[g], sq_b[g])
                old_score = float(cost[torch.arange(n_g), perms[g]].sum())
                new_score = float(cost[torch.arange(n_g), new].sum())
                if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):   # ties keep the current one: no cycling
                    perms[g] = new
                    changed = True
            if not changed:
                break
        return perms, iterations

    def sorted_start() -> list[Tensor]:
        perms = []
        for g, n_g in enumerate(spec.sizes):
            cost = torch.zeros(n_g, n_g, dtype=torch.float64)
            for name, d in members[g]:   # sorted in the models' own precision: an exact copy sorts to the same values
                cost += (_invariant_slices(sa[name], d, spec.axes[name]).double()
                         @ _invariant_slices(sb[name], d, spec.axes[name]).double().T)
            perms.append(_assign(cost, sq_a[g], sq_b[g]))
        return perms

    bound = sum(float(sa64[n].norm() * sb64[n].norm()) for n in names)

    def reached(value: float) -> bool:
        return value >= bound - 1e-9 * max(1.0, abs(bound))

    identity = [torch.arange(n) for n in spec.sizes]
    gen = torch.Generator().manual_seed(seed)
    starts: list[tuple[str, Any]] = [("sorted", sorted_start), ("identity", lambda: identity)]
    starts += [(f"random {k + 1}", lambda: [torch.randperm(n, generator=gen) for n in spec.sizes]) for k in range(restarts)]
    runs: list[dict[str, Any]] = []
    for label, make_start in starts:
        # the identity run draws its group orders from ``seed`` itself (Ainsworth et al.'s run); the others from streams of their own
        stream = seed if label == "identity" else seed + 1_000_003 * (len(runs) + 1)
        perms, iterations = descend(make_start(), torch.Generator().manual_seed(stream))
        runs.append({"start": label, "perms": perms, "similarity": similarity(perms), "iterations": iterations})
        if stop_at_bound and reached(runs[-1]["similarity"]):
            break       # no start can exceed the bound
    best = max(range(len(runs)), key=lambda i: (runs[i]["similarity"], -i))     # ties: the earlier start
    others = [r["similarity"] for i, r in enumerate(runs) if i != best]
    after = runs[best]["similarity"]
    info = {"iterations": runs[best]["iterations"], "similarity_before": similarity(identity), "similarity_after": after,
            "similarity_bound": bound, "bound_reached": reached(after),
            "start": runs[best]["start"], "starts": [{k: r[k] for k in ("start", "similarity", "iterations")} for r in runs],
            "similarity_alternative": max(others) if others else None}
    _log_matching(info)
    return runs[best]["perms"], info

