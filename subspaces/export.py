"""Export: the network at one point of a subspace as a plain model of the wrapped class.

    plain = copy of the wrapped model with Parameter(w_i) in each subspace parameter's slot

The copy is the wrapped model itself (its shared parameters, its BatchNorm buffers as they are
now), so its ``state_dict()`` has the plain model's keys in the plain model's order and loads with
``strict=True`` into a fresh model of the same config.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from .anchor_store import AnchorGroup


def materialize(model: nn.Module, groups: Sequence[AnchorGroup], flats: Sequence[Tensor]) -> nn.Module:
    """A deep copy of ``model`` (the wrapped model, subspace slots empty) with each group's weights
    ``flats[i]`` (detached, in the group's storage shape) cut into new Parameters in their slots;
    tied parameters stay tied (one Parameter in every slot that held it)."""
    bound = []
    for g in groups:   # leave the slots empty while copying: no weights copied twice
        for owners in g.owners:
            for module, attr in owners:
                bound.append((module, attr, module.__dict__.pop(attr, None)))
    try:
        plain = copy.deepcopy(model)
    finally:
        for module, attr, tensor in bound:
            if tensor is not None:
                module.__dict__[attr] = tensor
    modules = dict(plain.named_modules())
    original_modules = {id(m): n for n, m in model.named_modules()}
    for g, flat in zip(groups, flats):
        for piece, shape, owners in zip(flat.reshape(-1).split(g.numels), g.shapes, g.owners):
            param = nn.Parameter(piece.view(shape).clone())
            for module, attr in owners:
                modules[original_modules[id(module)]].register_parameter(attr, param)
    return plain
