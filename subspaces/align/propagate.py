"""The walk that finds a network's permutation spec: every node of its traced graph labelled with
a channel space per tensor axis (:mod:`.spaces`), by the rule of its operation (:mod:`.rules`).

Anything whose equivariance is not established (an unknown leaf module with parameters, an unknown
function or method, an operation a rule cannot read) *fixes* the spaces it touches: they are left
unpermuted, which is always safe. The model's inputs and outputs are fixed.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..bn import BATCHNORM_TYPES
from ..errors import ConfigError
from . import rules
from .spaces import FIXED, AxisLabels
from .trace import node_shape

__all__ = ["Propagator"]

_UNARY_FUNCTIONS = {F.relu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
                    F.dropout, F.softplus, F.relu6, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt,
                    torch.abs, torch.neg, torch.square, torch.clone, torch.erf, operator.neg}
_UNARY_METHODS = {"relu", "gelu", "sigmoid", "tanh", "contiguous", "float", "to", "type_as", "clone", "exp", "sqrt", "rsqrt", "abs",
                  "neg", "square", "detach", "sigmoid_", "relu_", "clamp", "clamp_min", "clamp_max", "pow", "softmax",
                  "mul_", "add_", "div_", "erf"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, torch.add, torch.sub, torch.mul,
           torch.div, torch.maximum, torch.minimum, torch.where}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_", "maximum", "minimum", "expand_as"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "var", "std"}
_RESHAPE_METHODS = {"reshape", "view", "flatten", "unsqueeze", "squeeze", "reshape_as", "view_as", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze}
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _only_weight_and_bias(m: nn.Module) -> bool:
    """Whether ``m``'s own parameters are at most ``weight`` and ``bias`` (a subclass with more, as
    a scaled convolution's gain, is not read as the plain layer)."""
    return {n for n, _ in m.named_parameters(recurse=False)} <= {"weight", "bias"}


class Propagator(AxisLabels):
    """Walks the traced graph ``gm`` (:func:`.trace.trace_model`) and labels every tensor axis with a
    channel space: :meth:`run` fills ``info`` (per node), ``params`` (per parameter and buffer),
    the spaces' unions and ``blockers``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.param_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}

    def run(self) -> None:
        """Label every node of the graph in order; an operation that cannot be read is left in place."""
        for node in self.gm.graph.nodes:
            where = node.name if node.op != "call_module" else str(node.target)
            try:
                self.info[node] = self.visit(node, where)
            except ConfigError:
                raise
            except Exception:   # an operation this walker cannot read is left in place, never guessed
                self.fix_all(where, f"'{node.target}' could not be analysed", *node.args, *node.kwargs.values())
                self.info[node] = self.fresh(node)

    def visit(self, node: fx.Node, where: str) -> Any:
        """The labels of ``node``'s output (``where``: its layer or node name, for messages)."""
        if node.op == "placeholder":
            return self.fresh(node)
        if node.op == "get_attr":
            t = operator.attrgetter(node.target)(self.gm)
            if not isinstance(t, Tensor):
                return None
            if str(node.target) in self.param_names:
                return self.param(str(node.target), t)
            return [FIXED] * t.ndim      # a buffer read as data (coordinates, masks): constant, like an input
        if node.op == "output":
            self.fix_all("output", "the model's outputs stay in place", *node.args)
            return None
        if node.op == "call_module":
            return self.module(node, self.modules[str(node.target)], where)
        if node.op == "call_function":
            return self.function(node, node.target, where)
        if node.op == "call_method":
            return self.method(node, str(node.target), where)
        return self.fresh(node)

    def module(self, node: fx.Node, m: nn.Module, where: str) -> Any:
        """A call of leaf module ``m``."""
        x = node.args[0] if node.args else None
        ax = self.axes(x)
        name = str(node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and ax is not None and _only_weight_and_bias(m):
            return rules.conv(self, node, name, m.weight, m.bias, m.groups, ax, where)
        if isinstance(m, nn.Linear) and ax is not None and _only_weight_and_bias(m):
            return rules.linear(self, node, name, m.weight, m.bias, ax, where)
        if isinstance(m, BATCHNORM_TYPES) and ax is not None:
            return rules.batch_norm(self, m, name, ax, where)
        if type(m) is nn.LayerNorm and ax is not None:
            return rules.norm_last(self, node, ax, len(m.normalized_shape), [(f"{name}.{k}", getattr(m, k)) for k in ("weight", "bias")], where)
        if type(m) is nn.GroupNorm and ax is not None:
            return rules.group_norm(self, node, ax, m.num_groups, [(f"{name}.{k}", getattr(m, k)) for k in ("weight", "bias")], where)
        if isinstance(m, _POOLS) and ax is not None:
            return [ax[0], ax[1]] + [FIXED] * (len(node_shape(node) or ()) - 2)
        if isinstance(m, nn.Flatten) and ax is not None:
            return rules.reshape(self, node, x, where)
        if isinstance(m, nn.Softmax) and ax is not None:
            return list(ax)
        has_params = any(True for _ in m.parameters(recurse=True))
        if not has_params and ax is not None and node_shape(node) == node_shape(x):
            return list(ax)         # parameter-free, shape-preserving leaf: an activation (checked numerically)
        self.fix_all(where, f"{type(m).__name__} is not analysed", *node.args, *node.kwargs.values())
        return self.fresh(node)

    def function(self, node: fx.Node, f: Any, where: str) -> Any:
        """A call of function ``f``."""
        a = node.args
        name = getattr(f, "__name__", "")
        if f in _BINARY:
            return self.broadcast(node, [x for x in list(a) + list(node.kwargs.values()) if isinstance(x, fx.Node)], where)
        if f in _UNARY_FUNCTIONS or name in ("resample_abs_pos_embed",):
            return list(self.axes(a[0])) if self.axes(a[0]) is not None else self.fresh(node)
        if f is F.softmax or f is torch.softmax:
            return list(self.axes(a[0]))
        if f is F.layer_norm or name == "rms_norm":
            shp = a[1] if len(a) > 1 else node.kwargs.get("normalized_shape")
            n_norm = 1 if isinstance(shp, int) else len(shp)
            ws = [a[i] if len(a) > i else node.kwargs.get(k) for i, k in ((2, "weight"), (3, "bias"))]
            if name == "rms_norm":
                ws = [a[2] if len(a) > 2 else node.kwargs.get("weight")]
            return rules.norm_last(self, node, self.axes(a[0]), n_norm, [(None, w) for w in ws], where)
        if f is F.group_norm:
            ws = [a[i] if len(a) > i else node.kwargs.get(k) for i, k in ((2, "weight"), (3, "bias"))]
            return rules.group_norm(self, node, self.axes(a[0]), a[1], [(None, w) for w in ws], where)
        if f is F.linear:
            w, b = a[1], a[2] if len(a) > 2 else node.kwargs.get("bias")
            if self.axes(w) is None:
                raise ValueError("weight not traced")
            return rules.linear(self, node, None, w, b, self.axes(a[0]), where)
        if f in _RESHAPE_FUNCTIONS:
            return rules.reshape(self, node, a[0], where)
        if f in _REDUCE:
            dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
            return rules.reduce(self, node, a[0], dims, bool(node.kwargs.get("keepdim", a[2] if len(a) > 2 else False)))
        if f is torch.permute:
            return rules.permute(self, a[0], a[1])
        if f is torch.transpose:
            return rules.transpose(self, a[0], a[1], a[2])
        if f is operator.getitem:
            return rules.index(self, node, a[0], a[1], where)
        if f is torch.cat:
            return rules.cat(self, node, a[0], a[1] if len(a) > 1 else node.kwargs.get("dim", 0), where)
        if f is F.scaled_dot_product_attention:
            return rules.attention(self, node, a[0], a[1], a[2], where)
        if f is torch.matmul or f is operator.matmul:
            return rules.matmul(self, node, a[0], a[1], where)
        if f is torch.unbind:
            return rules.unbind(self, node, a[0], a[1] if len(a) > 1 else node.kwargs.get("dim", 0), where)
        if f in (getattr, operator.eq, operator.mod, operator.floordiv, operator.mul, len) and node_shape(node) is None:
            return None
        if node_shape(node) is None and node.meta.get("tensor_meta") is None:
            return None     # a Python value (sizes, flags): no tensor axes
        self.fix_all(where, f"function {name or f} is not analysed", *a, *node.kwargs.values())
        return self.fresh(node)

    def method(self, node: fx.Node, m: str, where: str) -> Any:
        """A call of tensor method ``m``."""
        a = node.args
        if m in _UNARY_METHODS:
            if m in ("mul_", "add_", "div_"):
                return self.broadcast(node, [x for x in a if isinstance(x, fx.Node)], where)
            return list(self.axes(a[0])) if self.axes(a[0]) is not None else self.fresh(node)
        if m in _BINARY_METHODS:
            if m == "expand_as":
                return rules.expand(self, node, a[0])
            return self.broadcast(node, [x for x in a if isinstance(x, fx.Node)], where)
        if m in _RESHAPE_METHODS:
            return rules.reshape(self, node, a[0], where)
        if m in _REDUCE_METHODS:
            dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
            return rules.reduce(self, node, a[0], dims, bool(node.kwargs.get("keepdim", a[2] if len(a) > 2 else False)))
        if m == "permute":
            dims = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
            return rules.permute(self, a[0], dims)
        if m == "transpose":
            return rules.transpose(self, a[0], a[1], a[2])
        if m == "expand":
            return rules.expand(self, node, a[0])
        if m == "unbind":
            return rules.unbind(self, node, a[0], a[1] if len(a) > 1 else node.kwargs.get("dim", 0), where)
        if m in ("size", "dim", "numel"):
            return None
        if m in ("chunk", "split"):
            dim = a[2] if len(a) > 2 else node.kwargs.get("dim", 0)
            ax = self.axes(a[0])
            n = len(ax)
            ax = list(ax)
            if ax[dim % n] != FIXED:
                self.sp.fix(ax[dim % n], where, f"{m} along a channel axis")
                ax[dim % n] = FIXED
            meta = node.meta.get("tensor_meta")
            return tuple(list(ax) for _ in meta)
        self.fix_all(where, f"method {m} is not analysed", *a, *node.kwargs.values())
        return self.fresh(node)
