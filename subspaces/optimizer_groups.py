"""timm's optimiser protocol for a subspace: weight-decay exemptions, layer ids, parameter groups.

timm's ``create_optimizer_v2(module, ...)`` reads ``module.no_weight_decay()`` (names exempt
from weight decay) and, for layer-wise lr decay, ``module.group_matcher(coarse)`` (a parameter
name -> its layer). For a subspace every Parameter name (an anchor tensor ``anchors.{k}.{group}``
or a shared ``model.{name}``) maps to the wrapped model's parameters it holds
(``origins``), and through them to the plain model's layers, so the lr of layer l is scaled by
d^(L - 1 - l) exactly as for the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from .anchor_store import AnchorGroup
from .errors import ConfigError


class NameList:
    """Parameter names in the one form timm's ``group_parameters`` reads: ``named_parameters()``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def named_parameters(self) -> Iterator[tuple[str, None]]:
        return ((n, None) for n in self.names)


def layer_ids(model: nn.Module, names: Sequence[str], coarse: bool) -> dict[str, int]:
    """The plain model's parameter ``names`` -> its layer index, as timm's layer decay numbers
    them: ``model.group_matcher`` when it has one, else timm's fallback (trunk parameters in
    order, 12 to a layer, then the ``pretrained_cfg['classifier']`` head)."""
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        return group_parameters(NameList(names), matcher(coarse=coarse), reverse=True)
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    in_head = [any(n.startswith(h) for h in heads) if heads else True for n in names]
    trunk = [n for n, h in zip(names, in_head) if not h]
    ids = {n: i // 12 for i, n in enumerate(trunk)}
    ids.update({n: -(len(trunk) // -12) for n, h in zip(names, in_head) if h})
    return ids


def group_matcher(origins: dict[str, list[str]], layer_of: dict[str, int]) -> Callable[[str], tuple[int]]:
    """timm's ``group_matcher``: a Parameter name -> ``(layer,)``, the layer of the model
    parameters it holds (``origins[name]``, numbered by ``layer_of``; unknown names go to the
    last layer). ConfigError for a Parameter holding parameters of several layers."""
    last = max(layer_of.values(), default=0)
    table: dict[str, int] = {}
    for name, originals in origins.items():
        layers = {layer_of.get(o, last) for o in originals}
        if len(layers) > 1:
            raise ConfigError(
                f"{name} holds parameters of {len(layers)} layers (flat layout): build the subspace "
                "with layout='per_parameter' for layer-wise lr decay"
            )
        table[name] = layers.pop()
    return lambda name: (table.get(name, last),)


def param_groups(module: nn.Module, weight_decay: float, no_weight_decay: set[str], layer_decay: float | None = None,
                 **timm_kwargs: Any) -> list[dict[str, Any]]:
    """timm's parameter groups of ``module``: weight decay ``weight_decay`` except for
    ``no_weight_decay`` names and 1-d tensors; with ``layer_decay`` d, timm's
    ``param_groups_layer_decay`` (``lr_scale`` = d^(L - 1 - l) for layer l of ``module.group_matcher``).
    ConfigError for a negative ``weight_decay`` or ``layer_decay`` outside (0, 1]."""
    if weight_decay is None or weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if layer_decay is None:
        return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=no_weight_decay, **timm_kwargs)
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    return param_groups_layer_decay(module, weight_decay, no_weight_decay_list=no_weight_decay,
                                    layer_decay=layer_decay, **timm_kwargs)


class TimmOptimizerProtocol:
    """The methods timm's ``create_optimizer_v2`` reads, for a module of anchors (a mixin of
    :class:`subspaces.subspace.Subspace`). The host provides ``model`` (the wrapped model),
    ``model_parameter_names`` (its parameter names as the plain model lists them),
    ``num_anchors`` and ``storage_groups`` (its :class:`~subspaces.anchor_store.AnchorGroup` list);
    anchor ``k``'s tensor of group ``g`` is the Parameter ``anchors.{k}.{g.name}``."""

    model: nn.Module
    model_parameter_names: list[str]
    num_anchors: int
    storage_groups: list[AnchorGroup]

    def parameter_origins(self) -> dict[str, list[str]]:
        """For every Parameter of this module (``named_parameters()`` names, frozen ones too), the
        wrapped model's parameter names it holds: one for shared parameters and, with
        ``layout="per_parameter"``, for anchors; every name of the chunk for flat anchors."""
        origins = {f"anchors.{k}.{g.name}": list(g.names) for k in range(self.num_anchors) for g in self.storage_groups}
        origins.update({f"model.{n}": [n] for n, _ in self.model.named_parameters()})
        return origins

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm's ``group_matcher`` for this module: a Parameter name -> ``(layer,)``, the layer
        of the wrapped model's parameters it holds (``model.group_matcher``'s numbering), so
        ``create_optimizer_v2(sub, ..., layer_decay=d)`` scales the lr of layer l by
        d^(L - 1 - l) exactly as for the plain model. Needs each anchor tensor to lie in one
        layer: with ``layout="flat"`` a chunk spanning layers raises ConfigError."""
        return group_matcher(self.parameter_origins(), layer_ids(self.model, self.model_parameter_names, coarse))

    def param_groups(self, weight_decay: float, layer_decay: float | None = None, **timm_kwargs: Any) -> list[dict[str, Any]]:
        """Optimiser parameter groups, timm's rules applied to this module: weight decay
        ``weight_decay`` except for ``no_weight_decay()`` names (the model's own exemptions,
        biases, norms) and 1-d tensors; with ``layer_decay`` d, timm's ``param_groups_layer_decay``
        (group ``lr_scale`` = d^(L - 1 - l) for layer l of the wrapped model, see
        :meth:`group_matcher`). ``timm_kwargs`` go to that timm function. Returns a list of
        ``{"params": [...], "weight_decay": float, ["lr_scale": float]}`` for any torch optimiser
        or ``create_optimizer_v2(sub, opt, param_group_fn=lambda m: m.param_groups(wd, d))``."""
        return param_groups(self, weight_decay, self.no_weight_decay(), layer_decay, **timm_kwargs)  # type: ignore[arg-type]

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay, for timm's create_optimizer_v2: undecayed anchor
        groups, and the wrapped model's own exemptions for its shared parameters."""
        names = {f"anchors.{k}.{g.name}" for k in range(self.num_anchors) for g in self.storage_groups if not g.decay}
        nwd = getattr(self.model, "no_weight_decay", None)
        if callable(nwd):
            names |= {f"model.{n}" for n in nwd()}
        return names
