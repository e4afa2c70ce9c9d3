"""Permutations of a network's channel groups, drawn and applied."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .groups import PermutationSpec

__all__ = ["apply_permutation", "random_permutation"]


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> list[Tensor]:
    """One random permutation per group: a list of LongTensor[sizes[g]]."""
    return [torch.randperm(n, generator=generator) for n in spec.sizes]


def apply_permutation(model: nn.Module, spec: PermutationSpec, perms: Sequence[Tensor]) -> nn.Module:
    """A copy of ``model`` with every axis of group g reindexed by ``perms[g]`` (LongTensor[n_g]):
    W'[..., i, ...] = W[..., perms[g][i], ...]. The function of the network is unchanged."""
    if len(perms) != len(spec.groups):
        raise ConfigError(f"{len(perms)} permutations given for {len(spec.groups)} groups: pass one per group of the spec")
    out = copy.deepcopy(model)
    state = out.state_dict()
    new = {}
    for name, row in spec.axes.items():
        t = state[name]
        for d, g in enumerate(row):
            if g is not None:
                t = t.index_select(d, perms[g].to(t.device))
        new[name] = t
    missing = out.load_state_dict(new, strict=False)
    if missing.unexpected_keys:
        raise ConfigError(f"permutation spec names tensors the model does not have: {missing.unexpected_keys[:3]}")
    return out

