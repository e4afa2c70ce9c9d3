"""Many points of a subspace evaluated together: one pass over the data for all of them.

Evaluating N points one at a time (``sub.export(p, bn_loader)`` then ``evaluate``) reads the BN
data and the evaluation data N times. Here every batch is loaded once and run at every point
before the next batch is read:

1. BatchNorm pass (:func:`bn_statistics`): each point gets its own BatchNorm buffers (fresh, as
   after ``reset_running_stats``); for every batch and every point, that point's buffers are
   copied into the BatchNorm modules' (:class:`subspaces.bn_states.BufferBank`), the network runs
   in train mode, and the updated buffers are copied back; the momentum is
   n_b / (n_1 + ... + n_b) for batch b of n_b samples, so each point ends with the
   sample-weighted average of its batch statistics, sum_b n_b s_b / sum_b n_b: exactly what
   :func:`subspaces.bn.update_bn` computes (``torch.optim.swa_utils.update_bn`` if the batches
   are of equal size).
2. Evaluation pass (:func:`evaluate_coefficients`): eval mode; for every batch and every point,
   the point's buffers are copied in and per-point sums of NLL and of correct predictions are
   accumulated (and, optionally, those of probability-averaging ensembles of points).

Points are given either as points of the shape (``t`` values, barycentric vectors) or directly
as coefficient vectors over the anchors, ``w = sum_k c_k W_k``: any linear combination, also
outside the shape (the plane through three anchors, [G]'s Figure 1). :func:`at_coefficients`
runs a subspace at explicit coefficients and :func:`export_coefficients` turns them into a plain
model, the one-point-at-a-time reference.

The numbers equal those of evaluating the points one at a time (same batches, same order):
the weights are mixed by the subspace's own kernel and the BatchNorm updates are PyTorch's own.

Each point's weights are mixed once per pass, not once per batch: up to ``mix_cache_bytes``
(default :data:`MIX_CACHE_BYTES`, 1 GiB) of mixed weights are kept for the pass, and points
beyond that budget are mixed per batch as a forward at that point would. Mixing K anchors costs
about as much as a forward of a small batch (resnet18: 2 lerps over 45 MB), so without the cache
N points per batch cost N mixes on top of N forwards.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .bn import batch_inputs, batch_weight, sample_momentum, update_bn
from .bn_states import BNStates, BufferBank, tracked_batchnorms
from .ensembles import split_batch
from .metrics import nll_per_example
from .subspace import Subspace

__all__ = [
    "BNStates",
    "PointMetrics",
    "at_coefficients",
    "bn_statistics",
    "check_coefficients",
    "distance",
    "evaluate_coefficients",
    "evaluate_points",
    "export_coefficients",
    "integrate_speed",
    "point_coefficients",
]

#: default budget of mixed weights kept for one pass of :func:`bn_statistics` / :func:`evaluate_coefficients`
MIX_CACHE_BYTES = 1 << 30


# ------------------------------------------------------------------------------------ coefficients
def point_coefficients(sub: Subspace, points: Iterable[Any]) -> Tensor:
    """Coefficients of N points of the shape: Tensor[N, K] (float32).

    ``points``: curves take N numbers ``t`` in [0, 1] (a list or a Tensor[N]); a simplex takes N
    barycentric vectors (Tensor[N, K] or a list of lists). Each point is checked by the shape's
    ``validate_point`` (ValueError naming the bad one).
    """
    rows = [sub.coefficients(sub.validate_point(p)).reshape(-1).float() for p in points]
    if not rows:
        raise ValueError("no points given: pass at least one point")
    return torch.stack(rows)


def check_coefficients(sub: Subspace, coeffs: Any) -> Tensor:
    """``coeffs`` as a float32 Tensor[N, K] (one vector Tensor[K] becomes [1, K]); ValueError if not."""
    c = coeffs.detach() if isinstance(coeffs, Tensor) else torch.as_tensor(coeffs)
    c = c.float()
    if c.ndim == 1:
        c = c.unsqueeze(0)
    K = sub.num_anchors
    if c.ndim != 2 or c.shape[1] != K:
        raise ValueError(f"coefficients must have shape [N, {K}] (one weight per anchor of this {type(sub).__name__}), got {tuple(c.shape)}")
    if c.shape[0] == 0:
        raise ValueError("no coefficient vectors given: pass at least one")
    if not torch.isfinite(c).all():
        raise ValueError("coefficients contain NaN or infinite values")
    return c.cpu()


@contextlib.contextmanager
def at_coefficients(sub: Subspace, coeffs: Any) -> Iterator[Subspace]:
    """Context in which every forward of ``sub`` runs at ``w = sum_k coeffs[k] W_k``.

    Like :meth:`Subspace.at` but with explicit coefficients Tensor[K] instead of a point of the
    shape, so any linear combination of the anchors can be run (the plane through three
    anchors, the straight segment between a curve's ends). The coefficients need not sum to 1.
    Gradients flow to the anchors as for any point.
    """
    c = check_coefficients(sub, coeffs)
    if c.shape[0] != 1:
        raise ValueError(f"at_coefficients takes one coefficient vector, got {c.shape[0]}")
    with sub.at_coefficients(c[0]):
        yield sub


def export_coefficients(sub: Subspace, coeffs: Any, bn_loader: Iterable | None = None, bn_batches: int | None = None) -> nn.Module:
    """The network at coefficients ``coeffs`` (Tensor[K]) as a plain model of the wrapped class,
    like :meth:`Subspace.export` for a point; with ``bn_loader`` its BatchNorm is recomputed."""
    c = check_coefficients(sub, coeffs)
    if c.shape[0] != 1:
        raise ValueError(f"export_coefficients takes one coefficient vector, got {c.shape[0]}")
    model = sub.network_at(c[0])
    if bn_loader is not None:
        update_bn(model, bn_loader, max_batches=bn_batches)
    return model


# ------------------------------------------------------------------------------------ passes
def _device_of(sub: Subspace) -> torch.device:
    for p in sub.parameters():
        return p.device
    return torch.device("cpu")


def _limited(loader: Iterable, max_batches: int | None) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _num_batches(loader: Iterable, max_batches: int | None) -> int | None:
    n = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if n is None:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


@contextlib.contextmanager
def _progress_task(progress: Any, description: str, total: int | None) -> Iterator[Any]:
    """``advance(n)`` on a rich progress bar: ``progress`` is False (none), True (a transient bar
    of its own) or a running ``rich.progress.Progress`` (a task added to it)."""
    if not progress:
        yield lambda n=1: None
        return
    if progress is True:
        from rich.progress import Progress

        with Progress(transient=True) as own:
            task = own.add_task(description, total=total)
            yield lambda n=1: own.advance(task, n)
        return
    task = progress.add_task(description, total=total)
    yield lambda n=1: progress.advance(task, n)


def _forward(sub: Subspace, x: Any) -> Tensor:
    return sub(x) if isinstance(x, Tensor) else sub(**x)


class _PointRunner:
    """Runs the subspace at coefficient vector ``i`` of ``c``: the first points whose mixed
    weights fit in ``budget`` bytes are mixed once (:meth:`Subspace.mixed_weights`) and bound
    for every batch; the others are mixed per call, as ``sub(x)`` at that point. Use inside
    ``sub.weights_bound()``; both give the same bits."""

    def __init__(self, sub: Subspace, c: Tensor, bind: Any, budget: int | None) -> None:
        self.sub, self.c, self.bind = sub, c, bind
        budget = MIX_CACHE_BYTES if budget is None else int(budget)
        per_point = sum(a.numel() * a.element_size() for a in sub.anchor_parameters(0))
        self.cached = max(0, min(c.shape[0], budget // per_point if per_point else c.shape[0]))
        self.weights: dict[int, list[Any]] = {}

    def __call__(self, i: int, x: Any) -> Tensor:
        if i >= self.cached:
            with at_coefficients(self.sub, self.c[i]):
                return _forward(self.sub, x)
        if i not in self.weights:
            self.weights[i] = self.sub.mixed_weights(self.c[i])
        self.bind(self.weights[i])
        model = self.sub.model
        return model(x) if isinstance(x, Tensor) else model(**x)


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else {k: v.to(device) for k, v in x.items()}


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None for the whole loader), got {max_batches}")


@torch.no_grad()
def bn_statistics(
    sub: Subspace,
    coeffs: Any,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: Any = False,
    mix_cache_bytes: int | None = None,
) -> BNStates:
    """BatchNorm statistics at every one of N coefficient vectors, in one pass over ``loader``.

    For each batch b of n_b samples (at most ``max_batches``) and each point i: point i's buffers
    are copied in and the network runs in train mode at w_i with momentum n_b / (n_1 + ... + n_b)
    (the same for every point), so after the pass each point holds the sample-weighted averages
    mean = sum_b n_b mean(x_b) / sum_b n_b and var = sum_b n_b var_unbiased(x_b) / sum_b n_b, as
    :func:`subspaces.bn.update_bn` gives for that point alone. The subspace's own buffers,
    momenta, mode and point are restored. Weights are mixed once per point for the whole pass
    (up to ``mix_cache_bytes``, default :data:`MIX_CACHE_BYTES`; see the module docstring).
    Batches: tensors, ``(x, y)`` tuples or dicts (see :func:`subspaces.bn.batch_inputs`).
    """
    _check_max_batches(max_batches)
    c = check_coefficients(sub, coeffs)
    modules = tracked_batchnorms(sub.model)
    bank = BufferBank(modules)
    states, flat = map(list, zip(*(bank.fresh() for _ in range(c.shape[0]))))
    if not modules:
        return BNStates(states, 0, flat)
    momenta = {n: m.momentum for n, m in modules}
    was_training = sub.training
    device = _device_of(sub)
    seen = 0
    samples = 0
    total = _num_batches(loader, max_batches)
    try:
        sub.train()
        with bank.bound(), sub.weights_bound() as bind, \
                _progress_task(progress, "BatchNorm at every point", None if total is None else total * c.shape[0]) as advance:
            run = _PointRunner(sub, c, bind, mix_cache_bytes)
            for batch in _limited(loader, max_batches):
                x = _to(batch_inputs(batch), device)
                b = batch_weight(x, samples, seen)
                m_b = sample_momentum(samples, b)  # every point sees the same batches: the same momentum
                for _, m in modules:
                    m.momentum = m_b
                for i in range(c.shape[0]):
                    bank.load(flat[i])
                    run(i, x)
                    bank.store(flat[i])
                    advance()
                seen += 1
                samples += b
    finally:
        for n, m in modules:
            m.momentum = momenta[n]
        sub.train(was_training)
    if seen == 0:
        raise ValueError("bn_statistics got an empty loader: BatchNorm statistics need at least one batch")
    return BNStates(states, seen, flat)


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class PointMetrics:
    """Per-point metrics from one evaluation pass.

    ``loss[i]``: mean NLL (cross-entropy) at point i; ``acc[i]``: accuracy; ``error = 1 - acc``;
    ``count``: examples seen. With ensembles, ``ensemble_loss[j]`` / ``ensemble_acc[j]`` are those
    of the probability average of the points in ``ensembles[j]``.
    """

    loss: Tensor
    acc: Tensor
    count: int
    ensembles: list[list[int]] = field(default_factory=list)
    ensemble_loss: Tensor | None = None
    ensemble_acc: Tensor | None = None

    @property
    def error(self) -> Tensor:
        return 1 - self.acc

    def select(self, index: Tensor) -> PointMetrics:
        """The metrics of points ``index`` (a LongTensor) in that order (ensembles kept as they are)."""
        return PointMetrics(self.loss[index], self.acc[index], self.count, self.ensembles, self.ensemble_loss, self.ensemble_acc)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.loss.tolist(), "acc": self.acc.tolist(), "error": self.error.tolist(), "count": self.count}
        if self.ensembles:
            out["ensembles"] = self.ensembles
            out["ensemble_loss"] = self.ensemble_loss.tolist() if self.ensemble_loss is not None else None
            out["ensemble_acc"] = self.ensemble_acc.tolist() if self.ensemble_acc is not None else None
        return out


def _check_ensembles(ensembles: Sequence[Sequence[int]] | None, n: int) -> list[list[int]]:
    out = []
    for j, members in enumerate(ensembles or []):
        members = [int(i) for i in members]
        if not members:
            raise ValueError(f"ensemble {j} has no members")
        bad = [i for i in members if not 0 <= i < n]
        if bad:
            raise ValueError(f"ensemble {j} names points {bad}, but there are {n} points (0..{n - 1})")
        out.append(members)
    return out


@torch.no_grad()
def evaluate_coefficients(
    sub: Subspace,
    coeffs: Any,
    loader: Iterable[Any],
    *,
    bn_states: BNStates | None = None,
    ensembles: Sequence[Sequence[int]] | None = None,
    max_batches: int | None = None,
    progress: Any = False,
    mix_cache_bytes: int | None = None,
) -> PointMetrics:
    """Loss and accuracy at every one of N coefficient vectors, in one pass over ``loader``.

    Eval mode. With ``bn_states`` (from :func:`bn_statistics`, same coefficients), point i runs
    with its own BatchNorm buffers; without, every point uses the subspace's current buffers.
    Probabilities are ``softmax(logits)`` in float32; NLL is ``-log max(p_y, tiny)`` as in
    :func:`subspaces.ensembles.evaluate`. ``ensembles``: lists of point indices whose averaged
    probabilities are scored too (e.g. ``[[i, N - 1 - i]]``: the pair (alpha, 1 - alpha)).
    Weights are mixed once per point for the whole pass (up to ``mix_cache_bytes``, default
    :data:`MIX_CACHE_BYTES`; see the module docstring).
    """
    _check_max_batches(max_batches)
    c = check_coefficients(sub, coeffs)
    n = c.shape[0]
    if bn_states is not None and len(bn_states) != n:
        raise ValueError(f"bn_states holds {len(bn_states)} points but {n} coefficient vectors were given")
    groups = _check_ensembles(ensembles, n)
    needed = sorted({i for g in groups for i in g})
    device = _device_of(sub)
    nll = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.float64)
    ens_nll = torch.zeros(len(groups), dtype=torch.float64)
    ens_correct = torch.zeros(len(groups), dtype=torch.float64)
    count = 0
    was_training = sub.training
    total = _num_batches(loader, max_batches)
    bank = BufferBank(tracked_batchnorms(sub.model))
    sources = None if bn_states is None else [bank.source(s, bn_states.flat[i] if bn_states.flat else None)
                                              for i, s in enumerate(bn_states.states)]
    sub.eval()
    try:
        with bank.bound(), sub.weights_bound() as bind, \
                _progress_task(progress, "evaluate every point", None if total is None else total * n) as advance:
            run = _PointRunner(sub, c, bind, mix_cache_bytes)
            for batch in _limited(loader, max_batches):
                x, y = split_batch(batch)
                x, y = _to(x, device), y.to(device)
                kept: dict[int, Tensor] = {}
                for i in range(n):
                    if sources is not None:
                        bank.load(sources[i])
                    logits = run(i, x)
                    probs = torch.softmax(logits.float(), dim=-1)
                    nll[i] += nll_per_example(probs, y).double().sum().cpu()
                    correct[i] += (probs.argmax(-1) == y).double().sum().cpu()
                    if i in needed:
                        kept[i] = probs
                    advance()
                for j, members in enumerate(groups):
                    probs = sum(kept[i] for i in members[1:]) if len(members) > 1 else None
                    probs = (kept[members[0]] + probs if probs is not None else kept[members[0]]) / len(members)
                    ens_nll[j] += nll_per_example(probs, y).double().sum().cpu()
                    ens_correct[j] += (probs.argmax(-1) == y).double().sum().cpu()
                count += int(y.shape[0])
    finally:
        sub.train(was_training)
    if count == 0:
        raise ValueError("evaluate_coefficients got an empty loader")
    return PointMetrics(
        loss=nll / count, acc=correct / count, count=count, ensembles=groups,
        ensemble_loss=ens_nll / count if groups else None, ensemble_acc=ens_correct / count if groups else None,
    )


def evaluate_points(
    sub: Subspace,
    points: Iterable[Any] | None = None,
    *,
    coefficients: Any = None,
    loaders: dict[str, Iterable[Any]] | Iterable[Any],
    bn_loader: Iterable[Any] | None = None,
    bn_batches: int | None = None,
    ensembles: Sequence[Sequence[int]] | None = None,
    max_batches: int | None = None,
    progress: Any = False,
    mix_cache_bytes: int | None = None,
) -> dict[str, PointMetrics] | PointMetrics:
    """Evaluate N points (``points`` of the shape, or ``coefficients`` Tensor[N, K]) with BatchNorm
    recomputed at every point: one pass over ``bn_loader`` (at most ``bn_batches`` batches) for
    every point's statistics, then one pass over each evaluation loader for every point's metrics.

    ``loaders``: one loader (returns one :class:`PointMetrics`) or ``{name: loader}`` (returns
    ``{name: PointMetrics}``, e.g. ``{"train": ..., "test": ...}``). Without ``bn_loader`` the
    subspace's current BatchNorm buffers are used at every point. Identical coefficient vectors
    are evaluated once (the curve and the segment share their ends). ``mix_cache_bytes``: see
    :func:`evaluate_coefficients`.
    """
    if (points is None) == (coefficients is None):
        raise ValueError("pass either points= (of the shape) or coefficients= (Tensor[N, K]), not both / neither")
    coeffs = point_coefficients(sub, points) if points is not None else check_coefficients(sub, coefficients)
    unique, inverse = torch.unique(coeffs, dim=0, return_inverse=True)
    if ensembles:
        _check_ensembles(ensembles, coeffs.shape[0])
        unique_ens = [[int(inverse[i]) for i in g] for g in ensembles]
    else:
        unique_ens = None
    states = (bn_statistics(sub, unique, bn_loader, max_batches=bn_batches, progress=progress, mix_cache_bytes=mix_cache_bytes)
              if bn_loader is not None else None)
    named = loaders if isinstance(loaders, dict) else {"": loaders}
    out = {}
    for name, loader in named.items():
        metrics = evaluate_coefficients(sub, unique, loader, bn_states=states, ensembles=unique_ens, max_batches=max_batches,
                                        progress=progress, mix_cache_bytes=mix_cache_bytes)
        metrics = metrics.select(inverse)
        metrics.ensembles = [list(map(int, g)) for g in ensembles] if ensembles else []
        out[name] = metrics
    return out if isinstance(loaders, dict) else out[""]


def integrate_speed(sub: Subspace, steps: int = 2000) -> float:
    """Length of a curve: the integral over [0, 1] of ``||w'(t)||`` (``sub.speed``), trapezoid rule on ``steps`` cells."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    with warnings.catch_warnings():   # torch's forward-AD decompositions still call torch.jit.script
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        speed = sub.speed(t).double()
    return float(torch.trapezoid(speed, t))


def distance(sub: Subspace, a: Any, b: Any) -> float:
    """``||w(a) - w(b)||`` for two coefficient vectors Tensor[K], from the anchors' Gram matrix."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return math.sqrt(max(float(d @ sub.gram().detach().double().cpu() @ d), 0.0))
