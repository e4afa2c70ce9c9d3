"""Probability-averaging ensembles and a one-pass evaluation loop.

An :class:`Ensemble` predicts p(y|x) = (1/M) sum_m softmax(f_m(x)): the average of the
members' *probabilities*, never of their logits. Members may be modules held in memory,
zero-argument factories, or checkpoint paths loaded by a user-supplied ``load_fn``; with
``offload=True`` only one member sits on the compute device at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from .io import load_model
from .metrics import ClassificationMetrics
from .shapes import Simplex

Member = Union[nn.Module, Callable[[], nn.Module], str, os.PathLike]


class Ensemble(nn.Module):
    """Average of M members' softmax probabilities.

    Args:
        members: each is (a) an ``nn.Module`` kept in memory (registered as a submodule),
            (b) a zero-argument callable returning an ``nn.Module`` (built on first use), or
            (c) a ``str``/``os.PathLike`` checkpoint path, built on first use by
            ``load_fn(path)``.
        device: where members run. ``None``: on the device of the input batch.
        offload: if True, each member is moved to ``device`` only for its own forward; an
            in-memory member goes back to CPU afterwards (and is kept on CPU between calls),
            a lazy member is dropped and rebuilt on the next call. If False, lazy members
            are built once and cached on the device.
        load_fn: ``path -> nn.Module``; required when any member is a path.

    Members always run in eval mode (``.eval()`` is applied before each member forward), so
    BatchNorm uses each member's own running statistics.
    """

    def __init__(
        self,
        members: Sequence[Member],
        *,
        device: torch.device | str | None = None,
        offload: bool = False,
        load_fn: Callable[[str | os.PathLike], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("Ensemble needs at least one member")
        self.device = torch.device(device) if device is not None else None
        self.offload = offload
        self.resident = nn.ModuleList()
        # Per member: ("resident", index into self.resident) or ("lazy", factory).
        self._slots: list[tuple[str, Any]] = []
        self._cache: dict[int, nn.Module] = {}
        for k, member in enumerate(members):
            if isinstance(member, nn.Module):
                self._slots.append(("resident", len(self.resident)))
                self.resident.append(member)
            elif isinstance(member, (str, os.PathLike)):
                if load_fn is None:
                    raise ValueError(
                        f"member {k} is a path ({os.fspath(member)!r}) but no load_fn was given; "
                        "pass load_fn=<callable(path) -> nn.Module>"
                    )
                self._slots.append(("lazy", _path_factory(load_fn, member)))
            elif callable(member):
                self._slots.append(("lazy", member))
            else:
                raise TypeError(
                    f"member {k} has type {type(member).__name__}; expected nn.Module, "
                    "a zero-argument callable returning one, or a checkpoint path"
                )
        if offload:
            self.resident.to("cpu")
        elif self.device is not None:
            self.resident.to(self.device)

    def __len__(self) -> int:
        return len(self._slots)

    def _acquire(self, k: int, device: torch.device) -> nn.Module:
        kind, ref = self._slots[k]
        if kind == "resident":
            module = self.resident[ref]
        elif not self.offload and k in self._cache:
            module = self._cache[k]
        else:
            module = ref()
            if not isinstance(module, nn.Module):
                raise TypeError(f"member {k}'s factory returned {type(module).__name__}, not nn.Module")
            if not self.offload:
                self._cache[k] = module
        return module.to(device).eval()

    def _release(self, k: int, module: nn.Module) -> None:
        if not self.offload:
            return
        if self._slots[k][0] == "resident":
            module.to("cpu")
        # lazy members: the only reference is dropped by the caller.

    def iter_member_probs(self, x: Tensor) -> Iterator[Tensor]:
        """Yield softmax(f_m(x)) for m = 1..M in order; x [B, ...] -> M tensors [B, C]
        (float32 or wider, on the compute device)."""
        device = self.device if self.device is not None else x.device
        x = x.to(device)
        for k in range(len(self._slots)):
            module = self._acquire(k, device)
            try:
                probs = _softmax(module(x))
            finally:
                self._release(k, module)
                del module
            yield probs

    def forward_members(self, x: Tensor) -> Tensor:
        """Per-member probabilities: p_m = softmax(f_m(x)); x [B, ...] -> [M, B, C]."""
        return torch.stack(list(self.iter_member_probs(x)), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        """Ensemble probabilities p = (1/M) sum_m softmax(f_m(x)); x [B, ...] -> [B, C]."""
        total: Tensor | None = None
        for probs in self.iter_member_probs(x):
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(self._slots)


def _softmax(logits: Tensor) -> Tensor:
    """softmax over the last dim, computed in at least float32; [..., C] -> [..., C]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.softmax(logits, dim=-1)


def _path_factory(
    load_fn: Callable[[str | os.PathLike], nn.Module], path: str | os.PathLike
) -> Callable[[], nn.Module]:
    """Zero-argument factory that builds the member stored at ``path`` with ``load_fn``."""
    return lambda: load_fn(path)


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(x, y) from a tuple/list batch or a dict with 'image'/'label' or 'x'/'y' keys."""
    if isinstance(batch, dict):
        for xk, yk in (("image", "label"), ("x", "y")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise KeyError(f"dict batch needs keys 'image'/'label' or 'x'/'y', got {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into (x, y)")


def _progress_iter(loader: Iterable, enabled: bool) -> Iterator:
    """Iterate the loader, with a transient rich progress bar if enabled."""
    if not enabled:
        yield from loader
        return
    from rich.progress import Progress

    total = len(loader) if hasattr(loader, "__len__") else None
    with Progress(transient=True) as progress:
        task = progress.add_task("evaluate", total=total)
        for batch in loader:
            yield batch
            progress.advance(task)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    progress: bool = False,
    per_member: bool = False,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``loader`` in eval mode under no_grad, in one pass over the data.

    Probabilities are softmax(model(x)) for a plain model and ``Ensemble.forward`` (already a
    probability average) for an :class:`Ensemble`. With ``accelerator``, probabilities and
    labels are gathered with ``accelerator.gather_for_metrics`` (the loader should be
    prepared by it) and the device defaults to ``accelerator.device``.
    Returns {'acc', 'nll', 'ece', 'brier', 'count'}; with ``per_member=True`` and an Ensemble
    also 'by_size': [metrics of the prefix ensemble (1/k) sum_{m<=k} p_m for k = 1..M] and
    'members': [metrics of member m alone, m = 1..M], from the same pass.
    A plain model is moved to ``device`` when one is given; an Ensemble is not moved (it
    places its members itself), only the batch is. The model's train/eval mode is restored.
    """
    if device is None and accelerator is not None:
        device = accelerator.device
    device = torch.device(device) if device is not None else None
    is_ensemble = isinstance(model, Ensemble)
    members = len(model) if isinstance(model, Ensemble) else 1
    if not is_ensemble and device is not None:
        model.to(device)
    per_member = per_member and is_ensemble
    show = progress and (accelerator is None or accelerator.is_main_process)

    was_training = model.training
    model.eval()
    overall: ClassificationMetrics | None = None
    by_size: list[ClassificationMetrics] = []
    try:
        for batch in _progress_iter(loader, show):
            x, y = split_batch(batch)
            if device is not None:
                x, y = x.to(device), y.to(device)
            if per_member:
                # [M, B, C] -> [B, M, C] so that gathering concatenates along the batch.
                probs = model.forward_members(x).transpose(0, 1).contiguous()
            elif is_ensemble:
                probs = model(x)
            else:
                probs = _softmax(model(x))
            y = y.to(probs.device)
            if accelerator is not None:
                probs, y = accelerator.gather_for_metrics((probs, y))
            if overall is None:
                classes = num_classes if num_classes is not None else probs.shape[-1]
                overall = ClassificationMetrics(classes)
                by_size = [ClassificationMetrics(classes) for _ in range(members)] if per_member else []
                alone = [ClassificationMetrics(classes) for _ in range(members)] if per_member else []
            if per_member:
                sizes = torch.arange(1, members + 1, device=probs.device, dtype=probs.dtype)
                prefix = probs.cumsum(dim=1) / sizes[None, :, None]  # [B, M, C]
                for k, metric in enumerate(by_size):
                    metric.update(prefix[:, k], y)
                for k, metric in enumerate(alone):
                    metric.update(probs[:, k], y)
                overall.update(prefix[:, -1], y)
            else:
                overall.update(probs, y)
    finally:
        model.train(was_training)

    if overall is None:
        raise ValueError("evaluate() got an empty loader")
    result: dict[str, Any] = overall.compute()
    if per_member:
        result["by_size"] = [metric.compute() for metric in by_size]
        result["members"] = [metric.compute() for metric in alone]
    return result


# ---------------------------------------------------------------------------------------- subspace points
POINT_MODES = ("ends", "even", "random", "centre")


def subspace_points(sub: nn.Module, how: str = "even", k: int = 5, generator: torch.Generator | None = None) -> list[Tensor]:
    """Points of a subspace to ensemble over.

    ``how``: ``"ends"`` (curves: t = 0 and 1; a simplex: its vertices), ``"even"`` (curves: k
    evenly spaced t from 0 to 1, the ends included), ``"random"`` (k draws of the shape's own
    sampling distribution: t ~ U(0, 1), Dirichlet(1) on a simplex; from ``generator``, by default
    the subspace's own), ``"centre"`` (t = 0.5 or the centroid). Returns a list of point tensors.
    """
    if how not in POINT_MODES:
        raise ValueError(f"how={how!r} is not one of {POINT_MODES}")
    if how in ("even", "random") and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int (number of points), got {k!r}")
    simplex = isinstance(sub, Simplex)
    if how == "centre":
        return [sub.centre()]
    if how == "ends":
        if simplex:
            return [torch.eye(sub.num_anchors)[i] for i in range(sub.num_anchors)]
        return [torch.tensor(0.0), torch.tensor(1.0)]
    if how == "even":
        if simplex:
            raise ValueError("evenly spaced points are defined for curves; use how='random' (Dirichlet draws) or 'ends' for a simplex")
        if k == 1:
            return [torch.tensor(0.5)]
        return list(torch.linspace(0.0, 1.0, k))
    draws = sub.sample(generator if generator is not None else sub.generator, n=k)
    return list(draws)


def subspace_ensemble(
    sub: nn.Module,
    points: Sequence[Any],
    *,
    bn_loader: Iterable | None = None,
    bn_batches: int | None = None,
    lazy: bool = False,
) -> Ensemble:
    """An :class:`Ensemble` of the plain networks at ``points`` of ``sub`` (probability averaging).

    Each member is ``sub.export(point, bn_loader, bn_batches)``: its BatchNorm statistics are
    recomputed at its own point when ``bn_loader`` is given (docs/science.md §6). With ``lazy=True``
    members are built on first use (one at a time under ``offload``) instead of now.
    """
    if len(points) == 0:
        raise ValueError("subspace_ensemble needs at least one point")
    factories = [lambda p=p: sub.export(p, bn_loader=bn_loader, bn_batches=bn_batches) for p in points]
    if lazy:
        return Ensemble(factories)
    return Ensemble([make() for make in factories])


def load_ensemble(paths: Sequence[str | os.PathLike], *, offload: bool = False) -> Ensemble:
    """An :class:`Ensemble` of saved plain models (``.safetensors`` files or run folders),
    each loaded with :func:`subspaces.io.load_model` on first use."""
    if len(paths) == 0:
        raise ValueError("load_ensemble needs at least one path")
    return Ensemble(list(paths), load_fn=load_model, offload=offload)
