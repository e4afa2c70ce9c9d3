"""The graph the spec is read from: the model traced by ``torch.fx``, every node's output shape recorded."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..bn import BATCHNORM_TYPES
from ..errors import ConfigError

__all__ = ["LeafTracer", "node_shape", "trace_model"]


class LeafTracer(fx.Tracer):
    """torch.fx tracer with timm's non-traceable modules and functions as leaves, and the layers
    whose channel rules are known (BatchNorm, convolution, linear, plain LayerNorm / GroupNorm)
    kept whole."""

    def __init__(self) -> None:
        import timm.layers

        self.leaves = tuple(timm.layers.get_notrace_modules())
        super().__init__(autowrap_functions=tuple(timm.layers.get_notrace_functions()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaves) or isinstance(m, (*BATCHNORM_TYPES, nn.Conv1d, nn.Conv2d, nn.Linear)):
            return True
        if type(m) in (nn.LayerNorm, nn.GroupNorm):   # subclasses (timm's LayerNorm2d: over channels) are traced inside
            return True
        return super().is_leaf_module(m, qualname)


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a traced node's tensor output (recorded by :func:`trace_model`); None for a
    constant, a non-tensor or several tensors."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def trace_model(model: nn.Module, example: Tensor) -> fx.GraphModule:
    """``model`` traced by :class:`LeafTracer`, each node's output shape on ``example``
    (Tensor[B, ...]) recorded in ``node.meta``; ConfigError if it cannot be traced."""
    try:
        gm = fx.GraphModule(model, LeafTracer().trace(model))
    except Exception as err:
        raise ConfigError(f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                          "it cannot be aligned automatically") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm
