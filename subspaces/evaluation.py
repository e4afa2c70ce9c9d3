"""Evaluation during and after training: a plain model as it is, a subspace at named points
(its centre; every anchor in the final evaluation), BatchNorm recomputed at each point on
unaugmented training images, the buffers of every rank made equal first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from .bn import update_bn
from .data import DataBundle, make_loader
from .ensembles import evaluate
from .settings import TrainConfig
from .subspace import Subspace


def bn_loader(data: DataBundle, batch_size: int) -> Any:
    """Unaugmented images for BatchNorm recomputation: the held-out split if there is one
    (``--holdout N``), else the training images without augmentation. Same on every rank."""
    return make_loader(data.holdout if data.holdout is not None else data.bn, batch_size, shuffle=False)


def eval_plain(model: nn.Module, data: DataBundle, args: TrainConfig, accelerator: Accelerator, eval_loader: Any, recompute_bn: bool = True) -> dict[str, float]:
    """Metrics of a plain model, its BatchNorm recomputed on the (unaugmented) training data first."""
    if recompute_bn:
        update_bn(model, bn_loader(data, args.batch_size), max_batches=args.bn_batches)
    return evaluate(model.to(accelerator.device), eval_loader, num_classes=data.num_classes, accelerator=accelerator)


def points_to_evaluate(sub: Subspace, final: bool) -> dict[str, Callable[[], nn.Module]]:
    """Named plain models to evaluate: the centre always; every anchor in the final evaluation."""
    points: dict[str, Callable[[], nn.Module]] = {"centre": sub.export}
    if final:
        for k in range(sub.num_anchors):
            points[f"anchor{k}"] = lambda k=k: sub.anchor(k)
    return points


@torch.no_grad()
def sync_buffers(model: nn.Module, accelerator: Accelerator) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, so every rank
    evaluates and saves the same network; DDP otherwise leaves each rank's last update local."""
    if accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))


def evaluate_trained(net: nn.Module, data: DataBundle, args: TrainConfig, accelerator: Accelerator, eval_loader: Any,
                     final: bool) -> dict[str, dict[str, float]]:
    """Metrics per evaluated point of a network in training (``net`` unwrapped): a plain model
    with its own BatchNorm statistics (averaged over ranks) as ``{"model": ...}``; a subspace at
    :func:`points_to_evaluate`, BatchNorm recomputed at each point."""
    sync_buffers(net, accelerator)
    if not isinstance(net, Subspace):
        return {"model": evaluate(net, eval_loader, num_classes=data.num_classes, accelerator=accelerator)}
    return {name: eval_plain(make(), data, args, accelerator, eval_loader) for name, make in points_to_evaluate(net, final).items()}
