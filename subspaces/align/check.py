"""The numerical check of a permutation spec: a random permutation of every group must leave the
network's outputs unchanged, on the model and on a copy whose constant parameters are perturbed."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..bn import BATCHNORM_TYPES
from ..errors import ConfigError
from .groups import PermutationSpec
from .permute import apply_permutation, random_permutation

__all__ = ["check_spec", "perturbed_copy"]


def perturbed_copy(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """A copy of ``model`` with every parameter moved by ``scale`` * N(0, 1) noise and BatchNorm
    statistics drawn away from (0, 1) (mean ~ N(0, scale^2), var ~ U(0.5, 1.5)): at initialisation norm
    scales, biases and layer scales are constant, so a spec that misplaces them would still pass a
    check on the untouched model."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p))
        for m in out.modules():
            if isinstance(m, BATCHNORM_TYPES) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.add_(scale * torch.randn(m.running_mean.shape, generator=gen).to(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen).to(m.running_var))
    return out


def _output_change(model: nn.Module, spec: PermutationSpec, example: Tensor, gen: torch.Generator) -> tuple[float, float]:
    """(max |f_P(x) - f(x)|, max |f(x)|) for a random permutation P of every group, eval mode."""
    permuted = apply_permutation(model, spec, random_permutation(spec, gen))
    was_training = model.training
    model.eval()
    permuted.eval()
    try:
        with torch.no_grad():
            y, yp = model(example), permuted(example)
    finally:
        model.train(was_training)
    return float((y - yp).abs().max()), float(y.abs().max())


def check_spec(model: nn.Module, spec: PermutationSpec, example: Tensor, *, atol: float = 1e-4, seed: int = 0) -> float:
    """Apply a random permutation of every group to ``model`` and to :func:`perturbed_copy` of it
    (eval mode) and compare the outputs on ``example``: returns the largest max |f_P(x) - f(x)|;
    ConfigError if one is above atol * (1 + max |f(x)|)."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for net in (model, perturbed_copy(model, seed)):
        diff, scale = _output_change(net, spec, example, gen)
        worst = max(worst, diff)
        if not diff <= atol * (1 + scale):
            raise ConfigError(f"the permutation spec of {type(model).__name__} changes its outputs (max diff {diff:.3g}): "
                              "an operation was misread; this model cannot be aligned automatically")
    return worst

