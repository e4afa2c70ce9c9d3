"""Finding a network's permutation spec: which tensor axes must be permuted together.

Hidden channels can be reordered without changing a network's function, as long as every tensor
that reads or writes a channel is reordered the same way. :func:`permutation_spec` finds these
*groups* of coupled tensor axes automatically by tracing the model with ``torch.fx``
(:mod:`.trace`) and propagating a channel label per tensor axis through the graph
(:mod:`.propagate`, by the rules of :mod:`.rules`). So attention keeps its ``qkv`` output and
``proj`` input in place, while its residual stream and MLP hidden units are permuted. Every spec is
checked numerically (:func:`.check.check_spec`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from .check import check_spec
from .groups import PermutationSpec
from .propagate import Propagator
from .spaces import FIXED
from .trace import trace_model

__all__ = ["permutation_spec"]


def permutation_spec(model: nn.Module, example: Tensor, *, check: bool = True, atol: float = 1e-4) -> PermutationSpec:
    """The permutation groups of ``model``, found by tracing it on ``example`` (a Tensor[B, ...]
    input batch, e.g. Tensor[2, C, H, W]).

    With ``check`` a random permutation of every group is applied to a copy and its outputs must
    equal the model's (max |diff| <= atol * (1 + max |output|)); ConfigError otherwise. ConfigError
    as well when no channel can be permuted, naming the first layer that stopped it.
    """
    was_training = model.training
    model.eval()
    try:
        gm = trace_model(model, example)
        prop = Propagator(gm)
        prop.run()
    finally:
        model.train(was_training)
    sp = prop.sp
    state = model.state_dict()
    roots: dict[int, int] = {}
    groups: list[list[tuple[str, int]]] = []
    sizes: list[int] = []
    axes: dict[str, list[int | None]] = {}
    for name, spaces in prop.params.items():
        if name not in state:
            continue
        row: list[int | None] = []
        for d, s in enumerate(spaces):
            r = sp.find(s)
            if r == FIXED:
                row.append(None)
                continue
            if r not in roots:
                roots[r] = len(groups)
                groups.append([])
                sizes.append(sp.size[r])
            groups[roots[r]].append((name, d))
            row.append(roots[r])
        axes[name] = row
    fixed = [(w, why) for w, why in sp.fixed if why]
    blockers = [(w, why) for w, why in prop.blockers if w != "output"]
    spec = PermutationSpec(groups, sizes, axes, fixed, blockers)
    if not groups:
        where, why = (blockers or fixed or [("the model", "no layer with channels was found")])[0]
        raise ConfigError(f"{type(model).__name__} cannot be aligned: no channel can be permuted (stopped first at {where}: {why})")
    if check:
        check_spec(model, spec, example, atol=atol)
    return spec

