"""Aligning one network to another: B permuted by weight matching to match A, checked to compute
the same function, with the distances before and after."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..shapes import check_same_architecture
from .groups import PermutationSpec
from .matching import weight_matching
from .permute import apply_permutation
from .spec import permutation_spec

__all__ = ["align", "example_batch", "parameter_distance"]


def parameter_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """||theta_A - theta_B||_2 over every parameter (float64), the length of the straight segment."""
    pb = dict(model_b.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for name, p in model_a.named_parameters():
        total += (p.detach().double().cpu() - pb[name].detach().double().cpu()).pow(2).sum()
    return float(total.sqrt())


def example_batch(dataset: Any, n: int = 2) -> Tensor:
    """The inputs of the first ``n`` examples of ``dataset`` (items ``(x, y)`` or ``x``), stacked:
    Tensor[n, ...], the example :func:`permutation_spec` traces and checks on."""
    if len(dataset) < 1:
        raise ConfigError("the dataset is empty: alignment needs one example input to trace the model")
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


def align(model_a: nn.Module, model_b: nn.Module, example: Tensor, *, spec: PermutationSpec | None = None, seed: int = 0,
          max_iter: int = 100, atol: float = 1e-4) -> tuple[nn.Module, dict[str, Any]]:
    """``model_b`` permuted to match ``model_a`` by weight matching: (a copy of B with P applied,
    info). ``example``: an input batch Tensor[B, ...] of the models (for tracing and for the check).

    The permuted B computes the same function as B: its outputs on ``example`` (eval mode) are
    compared and ConfigError is raised above atol * (1 + max |B(x)|). ``info``: the spec summary,
    the sweeps, sum_p <W_A, P W_B> before / after, ||theta_A - theta_B|| before / after and the
    largest output change.
    """
    check_same_architecture([model_a, model_b])
    spec = spec if spec is not None else permutation_spec(model_a, example, atol=atol)
    perms, match = weight_matching(model_a, model_b, spec, max_iter=max_iter, seed=seed)
    aligned = apply_permutation(model_b, spec, perms)
    was = model_b.training, aligned.training
    model_b.eval()
    aligned.eval()
    with torch.no_grad():
        y, ya = model_b(example), aligned(example)
    model_b.train(was[0])
    aligned.train(was[1])
    change = float((y - ya).abs().max())
    if change > atol * (1 + float(y.abs().max())):
        raise ConfigError(f"aligning {type(model_b).__name__} changed its outputs (max diff {change:.3g}): the permutation spec is wrong "
                          "for this model; connect it without alignment")
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perms)
    info = {**spec.to_dict(), **match, "channels_moved": moved, "distance_before": parameter_distance(model_a, model_b),
            "distance_after": parameter_distance(model_a, aligned), "max_output_change": change, "seed": seed}
    return aligned, info
