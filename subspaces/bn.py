"""BatchNorm statistics recomputed at a point of a subspace (docs/science.md §6).

One set of running statistics is shared by every point during training, so it is right for none
of them. Before evaluating a point, reset the statistics of every BatchNorm-type module and
recompute them as an average over batches weighted by their number of samples, as the official
code of [G] (``utils.bn_update``): a partial last batch counts for its size, not as a full batch.
With equal batch sizes this is exactly ``torch.optim.swa_utils.update_bn`` (equal batch weights).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


_INPUT_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")


#: every BatchNorm-type module class of PyTorch; timm's (BatchNormAct2d, SyncBatchNormAct, SplitBatchNorm2d) subclass them
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                                nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm-type module (BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d)."""
    return [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES)]


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


def batch_size(x: Any) -> int | None:
    """Samples in a model input: dim 0 of a tensor, or of the first tensor value of a dict input;
    None when there is no such tensor (a 0-d tensor, no tensor at all)."""
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, dict):
        for v in x.values():
            if isinstance(v, Tensor):
                return batch_size(v)
    return None


def batch_weight(x: Any, samples_seen: int, batches_seen: int) -> int:
    """The weight n_b of a batch with model input ``x``: its :func:`batch_size`; if unknown, the
    mean batch size so far (1 for the first batch), so a loader of unknown sizes gets equal weights."""
    b = batch_size(x)
    if b is not None:
        return b
    return max(1, round(samples_seen / batches_seen)) if batches_seen else 1


def sample_momentum(samples_seen: int, batch: int) -> float:
    """BatchNorm momentum b / (n + b) for a batch of b samples after n: PyTorch's update
    r <- (1 - m) r + m s then keeps r the sample-weighted mean of the batch statistics s.
    An empty batch (b = 0) gets 0: it leaves the statistics as they are."""
    return batch / (samples_seen + batch) if batch > 0 else 0.0


def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _inputs_or_none(batch: Any) -> Any:
    """``batch_inputs(batch)``, or None for a batch it cannot read (only its size is wanted)."""
    try:
        return batch_inputs(batch)
    except (KeyError, TypeError, IndexError):
        return None


@torch.no_grad()
def update_bn(
    model: nn.Module,
    loader: Iterable[Any],
    point: Any = None,
    max_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Recompute BatchNorm running statistics of ``model`` (a plain model or a Subspace) at ``point``.

    Batches are weighted by their number of samples n_b (as [G]'s ``utils.bn_update``): before
    batch b every BN module gets momentum n_b / (n_1 + ... + n_b), so PyTorch's BN updates give
    mean_bn = sum_b n_b mean(x_b) / sum_b n_b and var_bn = sum_b n_b var_unbiased(x_b) / sum_b n_b
    (per channel, x_b: the layer's input on batch b). With equal batch sizes this is exactly
    ``torch.optim.swa_utils.update_bn``. n_b is dim 0 of the input tensor (of the first tensor of
    a dict input). A Subspace runs at ``point``; with ``point=None`` it runs at its fixed point
    (``set_point``/``at``) if any, else at its centre. Batches are tensors, (x, y) tuples or
    dicts; ``forward_fn(model, batch)`` overrides the call: n_b is then read from
    ``batch_inputs(batch)`` where possible, and a batch whose size cannot be found counts as the
    mean batch size so far (as 1 if first), so a loader of such batches gets equal batch weights.
    Uses at most ``max_batches`` batches. Returns ``model``.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None for the whole loader), got {max_batches}")
    evaluation_point = getattr(model, "evaluation_point", None)   # a Subspace: the point it evaluates at
    if point is not None:
        if evaluation_point is None:
            raise TypeError(f"point= needs a Subspace, got a plain {type(model).__name__}")
        model.validate_point(point)
    bns = batchnorm_modules(model)
    if not bns:
        return model
    momenta = {m: m.momentum for m in bns}
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
    context: Any = evaluation_point(point) if evaluation_point is not None else contextlib.nullcontext()
    device = _device_of(model)
    seen = 0
    samples = 0
    model.train()
    try:
        with context:
            for batch in loader:
                if max_batches is not None and seen >= max_batches:
                    break
                x = batch_inputs(batch) if forward_fn is None else _inputs_or_none(batch)
                b = batch_weight(x, samples, seen)
                m_b = sample_momentum(samples, b)  # keeps the running stats the sample-weighted mean
                for m in bns:
                    m.momentum = m_b
                if forward_fn is not None:
                    forward_fn(model, batch)
                else:
                    model(x.to(device)) if isinstance(x, Tensor) else model(**{k: v.to(device) for k, v in x.items()})
                seen += 1
                samples += b
    finally:
        for m in bns:
            m.momentum = momenta[m]
        model.train(was_training)
    if seen == 0:
        raise ValueError("update_bn got an empty loader: BatchNorm statistics need at least one batch")
    return model
