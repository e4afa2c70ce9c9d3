"""BatchNorm statistics recomputed at a point of a subspace (SCIENCE.md §2).

One set of running statistics is shared by every point during training, so it is right for none
of them. Before evaluating a point, reset the statistics of every BatchNorm-type module and
recompute them as an equal-weight average over batches (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .subspace import Point, Subspace

_INPUT_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm-type module (BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: a tensor, the first item of an (x, y) tuple, or a dict's image."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise KeyError(f"cannot find the input in a batch with keys {sorted(batch)}: expected one of {_INPUT_KEYS}, or pass forward_fn=")
    raise TypeError(f"unsupported batch type {type(batch).__name__}: use tensors, (x, y) tuples or dicts, or pass forward_fn=")


def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def update_bn(
    model: nn.Module,
    loader: Iterable[Any],
    point: Point | None = None,
    max_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Recompute BatchNorm running statistics of ``model`` (a plain model or a Subspace) at ``point``.

    mean_bn = (1/B) sum_b mean(x_b), var_bn likewise (momentum=None: the equal-weight cumulative
    average of ``torch.optim.swa_utils.update_bn``). A Subspace runs at ``point``; with
    ``point=None`` it runs at its fixed point (``set_point``/``at``) if any, else at its centre.
    Batches are tensors, (x, y) tuples or dicts; ``forward_fn(model, batch)`` overrides the call.
    Uses at most ``max_batches`` batches. Returns ``model``.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None for the whole loader), got {max_batches}")
    if point is not None:
        if not isinstance(model, Subspace):
            raise TypeError(f"point= needs a Subspace, got a plain {type(model).__name__}")
        model.validate_point(point)
    bns = batchnorm_modules(model)
    if not bns:
        return model
    momenta = {m: m.momentum for m in bns}
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    if isinstance(model, Subspace):
        fixed = model._fixed is not None
        context: Any = model.at(point) if point is not None else (contextlib.nullcontext() if fixed else model.at(model.centre()))
    else:
        context = contextlib.nullcontext()
    device = _device_of(model)
    seen = 0
    model.train()
    try:
        with context:
            for batch in loader:
                if max_batches is not None and seen >= max_batches:
                    break
                if forward_fn is not None:
                    forward_fn(model, batch)
                else:
                    x = batch_inputs(batch)
                    model(x.to(device)) if isinstance(x, Tensor) else model(**{k: v.to(device) for k, v in x.items()})
                seen += 1
    finally:
        for m in bns:
            m.momentum = momenta[m]
        model.train(was_training)
    if seen == 0:
        raise ValueError("update_bn got an empty loader: BatchNorm statistics need at least one batch")
    return model
