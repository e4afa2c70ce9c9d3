"""Permutation alignment of two networks: weight matching (Ainsworth et al. 2022, "Git Re-Basin").

Hidden channels can be reordered without changing a network's function, as long as every tensor
that reads or writes a channel is reordered the same way. :func:`permutation_spec` finds these
*groups* of coupled tensor axes automatically by tracing the model with ``torch.fx`` (timm's
non-traceable modules and functions kept as leaves) and propagating a channel label per tensor
axis through the graph:

- a convolution / linear layer starts a new channel space on its output axis and joins its
  weight's input axis to the space of its input; a depthwise convolution keeps its input's space;
- norms (BatchNorm, LayerNorm and RMSNorm over the channel axis, GroupNorm with 1 or C groups),
  elementwise operations (activations, residual additions, layer scales, gating) join the spaces
  of their operands, so a residual stream, its norms, ``cls_token`` and ``pos_embed`` are one group;
- ``permute`` / ``transpose`` / ``reshape`` that keep an axis whole carry its space along.

Anything whose equivariance is not established (an axis split or merged by ``reshape`` as for the
heads of ``qkv``, a concatenation or split along channels, a grouped convolution, an unknown leaf
module with parameters) *fixes* the spaces it touches: they are left unpermuted, which is always
safe. The model's inputs and outputs are fixed. So attention keeps its ``qkv`` output and ``proj``
input in place, while its residual stream and MLP hidden units are permuted. Every spec is checked
numerically: a random permutation of every group must leave the outputs unchanged.

Weight matching maximises sum_p <W_A^p, P W_B^p> over permutations, one group at a time with the
others held (a linear assignment, ``scipy.optimize.linear_sum_assignment``), until no group changes,
from a start that needs no guess of the other groups (each channel's weights sorted over the axes
other groups permute) and from the identity, keeping the better; reaching the Cauchy-Schwarz bound
sum_p ||W_A^p|| ||W_B^p|| proves an exact undo.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError
from .shapes import check_same_architecture

__all__ = ["PermutationSpec", "align", "apply_permutation", "check_spec", "parameter_distance", "permutation_spec", "perturbed_copy",
           "random_permutation", "weight_matching", "example_batch"]

FIXED = 0
logger = logging.getLogger(__name__)

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
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.LeakyReLU,
                nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Softplus, nn.PReLU)


@dataclass
class PermutationSpec:
    """Groups of tensor axes permuted together.

    ``groups[g]``: the (state_dict name, axis) pairs of group g, all of length ``sizes[g]``;
    ``axes[name]``: per axis of that tensor, its group index or None (not permuted);
    ``fixed``: (layer, reason) for each place that stopped channels from being permuted;
    ``unanalysed``: (layer, reason) for each operation the walker does not know (its inputs and
    outputs were left in place; the first one is what stops a model that cannot be aligned).
    """

    groups: list[list[tuple[str, int]]]
    sizes: list[int]
    axes: dict[str, list[int | None]]
    fixed: list[tuple[str, str]] = field(default_factory=list)
    unanalysed: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)

    def summary(self) -> str:
        """One line: groups, permuted channels, places left in place, unanalysed operations."""
        permuted = sum(self.sizes)
        line = f"{len(self.groups)} permutation groups ({permuted} channels); {len(self.fixed)} places left in place"
        if self.unanalysed:
            where, why = self.unanalysed[0]
            line += f"; {len(self.unanalysed)} operations not analysed (first: {where}: {why})"
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: group sizes, each group's first member, the fixed and unanalysed places."""
        return {"groups": len(self.groups), "channels": sum(self.sizes), "sizes": list(self.sizes),
                "fixed": [list(f) for f in self.fixed], "unanalysed": [list(u) for u in self.unanalysed]}


class _Tracer(fx.Tracer):
    """torch.fx tracer with timm's non-traceable modules and functions as leaves."""

    def __init__(self) -> None:
        import timm.layers

        self._leaves = tuple(timm.layers.get_notrace_modules())
        super().__init__(autowrap_functions=tuple(timm.layers.get_notrace_functions()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaves) or isinstance(m, (_BatchNorm, nn.Conv1d, nn.Conv2d, nn.Linear)):
            return True
        if type(m) in (nn.LayerNorm, nn.GroupNorm):   # subclasses (timm's LayerNorm2d: over channels) are traced inside
            return True
        return super().is_leaf_module(m, qualname)


class _Spaces:
    """Union-find over channel spaces; space 0 is FIXED (never permuted)."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.size = [0]
        self.fixed: list[tuple[str, str]] = []

    def new(self, size: int) -> int:
        if size <= 1:
            return FIXED
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int, where: str = "", why: str = "") -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED in (ra, rb):
            other = rb if ra == FIXED else ra
            if where and other != FIXED:
                self.fixed.append((where, why))
            self.parent[other] = FIXED
            return FIXED
        if self.size[ra] != self.size[rb]:   # should not happen on a model that runs: be safe
            self.fix(ra, where, "axes of different sizes meet")
            self.fix(rb, where, "axes of different sizes meet")
            return FIXED
        self.parent[rb] = ra
        return ra

    def fix(self, a: int, where: str, why: str) -> None:
        self.union(a, FIXED, where, why)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Propagator:
    """Walks the traced graph and labels every tensor axis with a channel space."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.sp = _Spaces()
        self.info: dict[fx.Node, Any] = {}     # node -> list of spaces per axis (or a tuple of such lists)
        self.params: dict[str, list[int]] = {}
        self.modules = dict(gm.named_modules())
        self.param_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
        self.blockers: list[tuple[str, str]] = []     # (layer, reason) of each operation that could not be analysed

    # ---------------------------------------------------------------- helpers
    def param(self, name: str, tensor: Tensor) -> list[int]:
        if name not in self.params:
            self.params[name] = [self.sp.new(s) for s in tensor.shape]
        return self.params[name]

    def axes(self, x: Any) -> list[int] | None:
        return self.info.get(x) if isinstance(x, fx.Node) and isinstance(self.info.get(x), list) else None

    def fix_all(self, where: str, why: str, *args: Any) -> None:
        if why and (where, why) not in self.blockers:
            self.blockers.append((where, why))
        for a in args:
            if isinstance(a, fx.Node):
                v = self.info.get(a)
                for lst in (v if isinstance(v, tuple) else (v,)):
                    for s in lst or []:
                        self.sp.fix(s, where, why)
            elif isinstance(a, (list, tuple)):
                self.fix_all(where, why, *a)
            elif isinstance(a, dict):
                self.fix_all(where, why, *a.values())

    def fresh(self, node: fx.Node) -> Any:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return [FIXED] * len(meta.shape)
        if isinstance(meta, (list, tuple)):
            return tuple([FIXED] * len(m.shape) if hasattr(m, "shape") else None for m in meta)
        return None

    def broadcast(self, node: fx.Node, operands: Sequence[Any], where: str) -> list[int] | None:
        out_shape = _shape(node)
        if out_shape is None:
            return None
        out = [FIXED] * len(out_shape)
        seen = [False] * len(out_shape)
        for a in operands:
            ax, sh = self.axes(a), _shape(a)
            if ax is None or sh is None:
                continue
            off = len(out_shape) - len(sh)
            for i, (s, n) in enumerate(zip(ax, sh)):
                j = i + off
                if n == 1 and out_shape[j] != 1:
                    continue            # broadcast along this axis: a per-channel factor of 1 couples nothing
                if not seen[j]:
                    out[j], seen[j] = s, True
                else:
                    out[j] = self.sp.union(out[j], s, where, "an elementwise operation joins different axes")
        return out

    # ---------------------------------------------------------------- rules
    def run(self) -> None:
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
        x = node.args[0] if node.args else None
        ax = self.axes(x)
        name = str(node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and ax is not None and len(set(m._parameters) - {"weight", "bias"}) == 0:
            return self.conv(node, name, m.weight, m.bias, m.groups, ax, where)
        if isinstance(m, nn.Linear) and ax is not None and len(set(m._parameters) - {"weight", "bias"}) == 0:
            return self.linear(node, name, m.weight, m.bias, ax, where)
        if isinstance(m, _BatchNorm) and ax is not None:
            c = ax[1]
            for key in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, key, None)
                if isinstance(t, Tensor) and t.ndim == 1:
                    c = self.sp.union(c, self.param(f"{name}.{key}", t)[0], where, "BatchNorm")
            self.check_leaf_params(m, name, ("weight", "bias"), where)
            out = list(ax)
            out[1] = c
            return out
        if type(m) is nn.LayerNorm and ax is not None:
            return self.norm_last(node, ax, len(m.normalized_shape), [(f"{name}.{k}", getattr(m, k)) for k in ("weight", "bias")], where)
        if type(m) is nn.GroupNorm and ax is not None:
            return self.group_norm(node, ax, m.num_groups, [(f"{name}.{k}", getattr(m, k)) for k in ("weight", "bias")], where)
        if isinstance(m, _POOLS) and ax is not None:
            return [ax[0], ax[1]] + [FIXED] * (len(_shape(node) or ()) - 2)
        if isinstance(m, nn.Flatten) and ax is not None:
            return self.reshape(node, x, where)
        if isinstance(m, nn.Softmax) and ax is not None:
            return list(ax)
        has_params = any(True for _ in m.parameters(recurse=True))
        if not has_params and ax is not None and _shape(node) == _shape(x):
            return list(ax)         # parameter-free, shape-preserving leaf: an activation (checked numerically)
        self.fix_all(where, f"{type(m).__name__} is not analysed", *node.args, *node.kwargs.values())
        return self.fresh(node)

    def check_leaf_params(self, m: nn.Module, name: str, handled: Sequence[str], where: str) -> None:
        for pname, p in m.named_parameters():
            if pname not in handled:
                for s in self.param(f"{name}.{pname}", p):
                    self.sp.fix(s, where, f"parameter {pname} of {type(m).__name__} is not analysed")

    def conv(self, node: fx.Node, name: str | None, weight: Any, bias: Any, groups: int, ax: list[int], where: str) -> list[int]:
        w = self.param(f"{name}.weight", weight) if name is not None else self.axes(weight)
        if w is None:
            raise ValueError("weight not traced")
        out_c = weight.shape[0] if isinstance(weight, Tensor) else _shape(weight)[0]
        cin = _shape(node.args[0])[1]
        b = None
        if bias is not None:
            b = self.param(f"{name}.bias", bias)[0] if name is not None else (self.axes(bias) or [FIXED])[0]
        if groups == 1:
            self.sp.union(w[1], ax[1], where, "convolution input")
            out = w[0]
        elif groups == cin == out_c:   # depthwise: channel c reads and writes channel c only
            out = self.sp.union(w[0], ax[1], where, "depthwise convolution")
            self.sp.fix(w[1], where, "")
        else:
            self.sp.fix(ax[1], where, f"grouped convolution ({groups} groups) couples channels in blocks")
            self.sp.fix(w[0], where, f"grouped convolution ({groups} groups) couples channels in blocks")
            self.sp.fix(w[1], where, "")
            out = FIXED
        for s in w[2:]:
            self.sp.fix(s, where, "")
        if b is not None:
            out = self.sp.union(out, b, where, "convolution bias")
        res = [ax[0], out] + [FIXED] * (len(_shape(node)) - 2)
        return res

    def linear(self, node: fx.Node, name: str | None, weight: Any, bias: Any, ax: list[int], where: str) -> list[int]:
        w = self.param(f"{name}.weight", weight) if name is not None else self.axes(weight)
        if w is None:
            raise ValueError("weight not traced")
        self.sp.union(w[1], ax[-1], where, "linear input")
        out = w[0]
        if bias is not None:
            b = self.param(f"{name}.bias", bias)[0] if name is not None else (self.axes(bias) or [FIXED])[0]
            out = self.sp.union(out, b, where, "linear bias")
        return list(ax[:-1]) + [out]

    def norm_last(self, node: fx.Node, ax: list[int], n_norm: int, params: list[tuple[str | None, Any]], where: str) -> list[int]:
        out = list(ax)
        if n_norm != 1:
            for i in range(len(ax) - n_norm, len(ax)):
                self.sp.fix(out[i], where, "a norm over several axes")
        for pname, t in params:
            if t is None:
                continue
            p = self.param(pname, t) if pname is not None and isinstance(t, Tensor) else self.axes(t)
            if p is None:
                continue
            if n_norm == 1:
                out[-1] = self.sp.union(out[-1], p[-1], where, "norm scale / shift")
            else:
                for s in p:
                    self.sp.fix(s, where, "a norm over several axes")
        return out

    def group_norm(self, node: fx.Node, ax: list[int], groups: int, params: list[tuple[str | None, Any]], where: str) -> list[int]:
        out = list(ax)
        c = _shape(node)[1]
        ok = groups in (1, c)
        if not ok:
            self.sp.fix(out[1], where, f"GroupNorm with {groups} groups couples channels in blocks")
        for pname, t in params:
            if t is None:
                continue
            p = self.param(pname, t) if pname is not None and isinstance(t, Tensor) else self.axes(t)
            if p is None:
                continue
            out[1] = self.sp.union(out[1], p[0], where, "GroupNorm") if ok else FIXED
            if not ok:
                self.sp.fix(p[0], where, "")
        return out

    def reshape(self, node: fx.Node, x: Any, where: str) -> list[int] | None:
        """Axes kept whole (one input axis of size n > 1 to one output axis of size n) keep their
        space; an axis split or merged with others is fixed."""
        ax, src, dst = self.axes(x), _shape(x), _shape(node)
        if ax is None or src is None or dst is None:
            return None
        out = [FIXED] * len(dst)
        si = [k for k, n in enumerate(src) if n != 1]
        dj = [k for k, n in enumerate(dst) if n != 1]
        i = j = 0
        while i < len(si) and j < len(dj):
            bi, bj = [si[i]], [dj[j]]          # a block of input / output axes with equal products
            pi, pj = src[si[i]], dst[dj[j]]
            while pi != pj:
                if pi < pj:
                    i += 1
                    bi.append(si[i])
                    pi *= src[si[i]]
                else:
                    j += 1
                    bj.append(dj[j])
                    pj *= dst[dj[j]]
            if len(bi) == 1 and len(bj) == 1:
                out[bj[0]] = ax[bi[0]]
            else:
                for k in bi:
                    self.sp.fix(ax[k], where, "reshape splits or merges a channel axis (e.g. attention heads)")
            i, j = i + 1, j + 1
        return out

    def reduce(self, node: fx.Node, x: Any, dims: Any, keepdim: bool) -> list[int] | None:
        ax = self.axes(x)
        if ax is None:
            return None
        n = len(ax)
        if dims is None:
            return [] if not keepdim else [FIXED] * n
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = {d % n for d in dims}
        if keepdim:
            return [FIXED if i in dims else s for i, s in enumerate(ax)]
        return [s for i, s in enumerate(ax) if i not in dims]

    def index(self, node: fx.Node, x: Any, idx: Any, where: str) -> Any:
        v = self.info.get(x) if isinstance(x, fx.Node) else None
        if isinstance(v, tuple):
            return v[idx] if isinstance(idx, int) else None
        ax, sh = self.axes(x), _shape(x)
        if ax is None or sh is None:
            return self.fresh(node)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, (fx.Node, Tensor, list)) for i in idx):
            raise ValueError("advanced indexing")
        if Ellipsis in idx:
            e = idx.index(Ellipsis)
            fill = len(ax) - (len(idx) - 1 - sum(i is None for i in idx))
            idx = idx[:e] + (slice(None),) * fill + idx[e + 1:]
        out, k = [], 0
        for i in idx:
            if i is None:
                out.append(FIXED)
                continue
            if isinstance(i, int):
                if ax[k] != FIXED:
                    self.sp.fix(ax[k], where, "indexing a channel axis")
                k += 1
                continue
            whole = isinstance(i, slice) and i.step in (None, 1) and (i.start in (None, 0)) and (i.stop is None or i.stop >= sh[k])
            if not whole:
                self.sp.fix(ax[k], where, "slicing a channel axis")
            out.append(ax[k] if whole else FIXED)
            k += 1
        out.extend(ax[k:])
        return out

    def function(self, node: fx.Node, f: Any, where: str) -> Any:
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
            return self.norm_last(node, self.axes(a[0]), n_norm, [(None, w) for w in ws], where)
        if f is F.group_norm:
            ws = [a[i] if len(a) > i else node.kwargs.get(k) for i, k in ((2, "weight"), (3, "bias"))]
            return self.group_norm(node, self.axes(a[0]), a[1], [(None, w) for w in ws], where)
        if f is F.linear:
            w, b = a[1], a[2] if len(a) > 2 else node.kwargs.get("bias")
            if self.axes(w) is None:
                raise ValueError("weight not traced")
            return self.linear(node, None, w, b, self.axes(a[0]), where)
        if f in _RESHAPE_FUNCTIONS:
            return self.reshape(node, a[0], where)
        if f in _REDUCE:
            dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
            return self.reduce(node, a[0], dims, bool(node.kwargs.get("keepdim", a[2] if len(a) > 2 else False)))
        if f is torch.permute:
            return self.permute(a[0], a[1])
        if f is torch.transpose:
            return self.transpose(a[0], a[1], a[2])
        if f is operator.getitem:
            return self.index(node, a[0], a[1], where)
        if f is torch.cat:
            return self.cat(node, a[0], a[1] if len(a) > 1 else node.kwargs.get("dim", 0), where)
        if f is F.scaled_dot_product_attention:
            return self.attention(node, a[0], a[1], a[2], where)
        if f is torch.matmul or f is operator.matmul:
            return self.matmul(node, a[0], a[1], where)
        if f is torch.unbind:
            return self.unbind(node, a[0], a[1] if len(a) > 1 else node.kwargs.get("dim", 0), where)
        if f in (getattr, operator.eq, operator.mod, operator.floordiv, operator.mul, torch._assert, len) and _shape(node) is None:
            return None
        if _shape(node) is None and node.meta.get("tensor_meta") is None:
            return None     # a Python value (sizes, flags): no tensor axes
        self.fix_all(where, f"function {name or f} is not analysed", *a, *node.kwargs.values())
        return self.fresh(node)

    def method(self, node: fx.Node, m: str, where: str) -> Any:
        a = node.args
        if m in _UNARY_METHODS:
            if m == "softmax" or m in ("clamp", "pow", "to", "type_as", "float", "contiguous", "clone", "detach") or m in _UNARY_METHODS:
                if m in ("mul_", "add_", "div_"):
                    return self.broadcast(node, [x for x in a if isinstance(x, fx.Node)], where)
                return list(self.axes(a[0])) if self.axes(a[0]) is not None else self.fresh(node)
        if m in _BINARY_METHODS:
            if m == "expand_as":
                return self.expand(node, a[0])
            return self.broadcast(node, [x for x in a if isinstance(x, fx.Node)], where)
        if m in _RESHAPE_METHODS:
            return self.reshape(node, a[0], where)
        if m in _REDUCE_METHODS:
            dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
            return self.reduce(node, a[0], dims, bool(node.kwargs.get("keepdim", a[2] if len(a) > 2 else False)))
        if m == "permute":
            dims = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
            return self.permute(a[0], dims)
        if m == "transpose":
            return self.transpose(a[0], a[1], a[2])
        if m == "expand":
            return self.expand(node, a[0])
        if m == "unbind":
            return self.unbind(node, a[0], a[1] if len(a) > 1 else node.kwargs.get("dim", 0), where)
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

    def permute(self, x: Any, dims: Sequence[int]) -> list[int]:
        ax = self.axes(x)
        n = len(ax)
        return [ax[d % n] for d in dims]

    def transpose(self, x: Any, d0: int, d1: int) -> list[int]:
        ax = list(self.axes(x))
        n = len(ax)
        ax[d0 % n], ax[d1 % n] = ax[d1 % n], ax[d0 % n]
        return ax

    def expand(self, node: fx.Node, x: Any) -> list[int]:
        ax, src, dst = self.axes(x), _shape(x), _shape(node)
        off = len(dst) - len(src)
        out = [FIXED] * off + [s if src[i] == dst[i + off] else FIXED for i, s in enumerate(ax)]
        return out

    def unbind(self, node: fx.Node, x: Any, dim: int, where: str) -> tuple[list[int], ...]:
        ax = list(self.axes(x))
        d = dim % len(ax)
        self.sp.fix(ax[d], where, "unbind along a channel axis")
        rest = ax[:d] + ax[d + 1:]
        return tuple(list(rest) for _ in range(_shape(x)[d]))

    def cat(self, node: fx.Node, xs: Sequence[Any], dim: int, where: str) -> list[int]:
        axs = [self.axes(x) for x in xs]
        if any(a is None for a in axs):
            raise ValueError("cat of untraced values")
        n = len(axs[0])
        d = dim % n
        out = list(axs[0])
        for a in axs[1:]:
            for i in range(n):
                if i != d:
                    out[i] = self.sp.union(out[i], a[i], where, "concatenation")
        for a in axs:
            self.sp.fix(a[d], where, "concatenation along a channel axis")
        out[d] = FIXED
        return out

    def attention(self, node: fx.Node, q: Any, k: Any, v: Any, where: str) -> list[int]:
        aq, ak, av = self.axes(q), self.axes(k), self.axes(v)
        for i in range(len(aq) - 2):
            aq[i] = self.sp.union(self.sp.union(aq[i], ak[i], where, "attention"), av[i], where, "attention")
        self.sp.union(aq[-1], ak[-1], where, "attention: query and key dimensions")
        self.sp.union(ak[-2], av[-2], where, "attention: keys and values")
        return list(aq[:-1]) + [av[-1]]

    def matmul(self, node: fx.Node, a: Any, b: Any, where: str) -> list[int]:
        xa, xb = self.axes(a), self.axes(b)
        if xa is None or xb is None or len(xa) < 2 or len(xb) < 2:
            raise ValueError("matmul of untraced values")
        self.sp.union(xa[-1], xb[-2], where, "matmul")
        batch = self.broadcast_lists(xa[:-2], xb[:-2], _shape(a)[:-2], _shape(b)[:-2], where)
        return batch + [xa[-2], xb[-1]]

    def broadcast_lists(self, xa: list[int], xb: list[int], sa: tuple, sb: tuple, where: str) -> list[int]:
        n = max(len(xa), len(xb))
        xa, xb = [FIXED] * (n - len(xa)) + list(xa), [FIXED] * (n - len(xb)) + list(xb)
        sa, sb = (1,) * (n - len(sa)) + tuple(sa), (1,) * (n - len(sb)) + tuple(sb)
        out = []
        for i in range(n):
            if sa[i] == 1:
                out.append(xb[i])
            elif sb[i] == 1:
                out.append(xa[i])
            else:
                out.append(self.sp.union(xa[i], xb[i], where, "matmul batch axes"))
        return out


def _trace(model: nn.Module, example: Tensor) -> fx.GraphModule:
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:
        raise ConfigError(f"{type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                          "it cannot be aligned automatically") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


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
        gm = _trace(model, example)
        prop = _Propagator(gm)
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
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None:
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


def _unfold(t: Tensor, axis: int, n: int) -> Tensor:
    """``t`` with ``axis`` moved first and the rest flattened: Tensor[n, numel / n]."""
    return t.movedim(axis, 0).reshape(n, -1)


def _assign(similarity: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """The permutation p (LongTensor[n]) maximising sum_i similarity[i, p[i]], a linear assignment.

    Solved as min sum_i ||a_i - b_p(i)||^2 = sq_a[i] + sq_b[p(i)] - 2 similarity[i, p(i)], the same
    optimum (the squared norms sum to a constant over any p), because scipy's solver is one to two
    orders of magnitude faster when the best assignment costs about 0 than on the near-uniform
    inner products of matching channels."""
    cost = sq_a[:, None] + sq_b[None, :] - 2 * similarity
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]


def _invariant_slices(t: Tensor, axis: int, groups: Sequence[int | None]) -> Tensor:
    """Tensor[n, ...] of ``t``'s slices along ``axis``, each made invariant to the permutation of
    every other permuted axis: for each position of the unpermuted axes, the entries over the
    permuted ones (``groups[d]`` not None, d != axis) sorted. Unpermuted axes are kept as they are,
    they carry the most information."""
    others = [d for d in range(t.ndim) if d != axis]
    fixed = [d for d in others if groups[d] is None]
    moving = [d for d in others if groups[d] is not None]
    out = t.permute(axis, *fixed, *moving)
    if not moving:
        return out.reshape(t.shape[axis], -1)
    out = out.reshape(t.shape[axis], -1, math.prod(t.shape[d] for d in moving))
    out = out.to(torch.promote_types(out.dtype, torch.float32)).contiguous()
    # numpy's sort (SIMD) is 30-60x faster than torch's on CPU for rows of a few hundred entries
    return torch.from_numpy(np.sort(out.numpy(), axis=-1)).reshape(t.shape[axis], -1)


def _log_matching(info: dict[str, Any]) -> None:
    """One line on the matching, from the main process only (every rank aligns the same pair)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    alt = info["similarity_alternative"]
    logger.info(f"weight matching: similarity {info['similarity_before']:.6g} -> {info['similarity_after']:.6g} "
                f"(start '{info['start']}', {info['iterations']} sweeps; upper bound {info['similarity_bound']:.6g}"
                f"{', reached' if info['bound_reached'] else ''}; best other start "
                f"{'none' if alt is None else format(alt, '.6g')})")


def weight_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, *, max_iter: int = 100,
                    seed: int = 0, restarts: int = 0, stop_at_bound: bool = True) -> tuple[list[Tensor], dict[str, Any]]:
    """Weight matching [Ainsworth et al. 2022, Alg. 1]: permutations P_g (LongTensor[n_g] each)
    maximising the similarity S(P) = sum over parameters p of <W_A^p, P W_B^p>.

    Coordinate descent: one group at a time in a random order (seeded), each a linear assignment
    on C_g = sum_{(p, d) in g} A_p(d) B'_p(d)^T (Tensor[n_g, n_g], A_p(d) the parameter unfolded
    along axis d, B'_p with the other groups' permutations applied), until a full sweep changes
    nothing. It runs from several starts, in this order, and keeps the permutations of the highest
    S (the earlier start on a tie):

    - ``"sorted"``: each group on its own, the assignment on
      D_g[i, j] = sum_{(p, d) in g} <s(A_p(d)_i), s(B_p(d)_j)>, where s sorts a channel's slice over
      the axes other groups permute (per position of the unpermuted axes). s(x) does not depend on
      those permutations, so no guess of the other groups enters. As the squared norms of the slices
      sum to a constant over any assignment, this minimises
      sum_i sum_p ||s(A_p(d)_i) - s(B_p(d)_pi(i))||^2, a sum of squared 1-D Wasserstein distances
      between the channels' weight distributions: 0 at the exact undo when B is a permutation of A;
    - ``"identity"``: Ainsworth et al.'s start (its group orders drawn from ``seed`` as before);
    - ``restarts`` more from uniformly random permutations (seeded).

    From the identity alone the descent stalls where groups are coupled through a residual stream
    whose own tensors say little (norm and layer scales are constant at init; a pooling token mixer
    has no weights): the stream is scored through the wrongly ordered hidden units of every block
    and the hidden units through the wrongly ordered stream, and no single group's change raises S.
    The sorted start does not depend on that coupling.

    By Cauchy-Schwarz S <= sum_p ||W_A^p|| ||W_B^p|| (a permutation keeps norms), with equality iff
    P W_B = W_A for every matched parameter when B is a permutation of A: reaching the bound proves
    the exact undo, and with ``stop_at_bound`` the remaining starts are skipped (none can do better).
    Returns (perms, info): ``iterations`` (sweeps of the kept run), ``similarity_before`` (at the
    identity), ``similarity_after``, ``similarity_bound``, ``bound_reached`` (within 1e-9 relative),
    ``start`` (the kept one), ``starts`` (each run start's similarity and sweeps) and
    ``similarity_alternative`` (the best S of the other starts run; None if none was)."""
    if restarts < 0:
        raise ConfigError(f"restarts must be >= 0, got {restarts}")
    sa = {n: t.detach().cpu() for n, t in model_a.state_dict().items()}
    sb = {n: t.detach().cpu() for n, t in model_b.state_dict().items()}
    params = {n for n, _ in model_a.named_parameters()}
    names = [n for n in spec.axes if n in params]
    members = [[(n, d) for n, d in group if n in params] for group in spec.groups]
    sa64 = {n: t.double() for n, t in sa.items()}
    sb64 = {n: t.double() for n, t in sb.items()}

    def squared_norms(state: dict[str, Tensor], g: int) -> Tensor:
        """Per channel of group g, the squared norm of its slices (no permutation changes it)."""
        total = torch.zeros(spec.sizes[g], dtype=torch.float64)
        for name, d in members[g]:
            total += _unfold(state[name], d, spec.sizes[g]).pow(2).sum(1)
        return total

    sq_a = [squared_norms(sa64, g) for g in range(len(spec.groups))]
    sq_b = [squared_norms(sb64, g) for g in range(len(spec.groups))]

    def permuted_b(perms: list[Tensor], name: str, skip_axis: int | None = None) -> Tensor:
        t = sb64[name]
        for d, g in enumerate(spec.axes[name]):
            if g is not None and d != skip_axis:
                t = t.index_select(d, perms[g])
        return t

    def similarity(perms: list[Tensor]) -> float:
        return float(sum((sa64[n] * permuted_b(perms, n)).sum() for n in names))

    def descend(perms: list[Tensor], gen: torch.Generator) -> tuple[list[Tensor], int]:
        perms = list(perms)
        iterations = 0
        for iterations in range(1, max_iter + 1):
            changed = False
            for g in torch.randperm(len(spec.groups), generator=gen).tolist():
                n_g = spec.sizes[g]
                cost = torch.zeros(n_g, n_g, dtype=torch.float64)
                for name, d in members[g]:
                    cost += _unfold(sa64[name], d, n_g) @ _unfold(permuted_b(perms, name, skip_axis=d), d, n_g).T
                new = _assign(cost, sq_a[g], sq_b[g])
                old_score = float(cost[torch.arange(n_g), perms[g]].sum())
                new_score = float(cost[torch.arange(n_g), new].sum())
                if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):   # ties keep the current one: no cycling
                    perms[g] = new
                    changed = True
            if not changed:
                break
        return perms, iterations

    def sorted_start() -> list[Tensor]:
        perms = []
        for g, n_g in enumerate(spec.sizes):
            cost = torch.zeros(n_g, n_g, dtype=torch.float64)
            for name, d in members[g]:   # sorted in the models' own precision: an exact copy sorts to the same values
                cost += (_invariant_slices(sa[name], d, spec.axes[name]).double()
                         @ _invariant_slices(sb[name], d, spec.axes[name]).double().T)
            perms.append(_assign(cost, sq_a[g], sq_b[g]))
        return perms

    bound = sum(float(sa64[n].norm() * sb64[n].norm()) for n in names)

    def reached(value: float) -> bool:
        return value >= bound - 1e-9 * max(1.0, abs(bound))

    identity = [torch.arange(n) for n in spec.sizes]
    gen = torch.Generator().manual_seed(seed)
    starts: list[tuple[str, Any]] = [("sorted", sorted_start), ("identity", lambda: identity)]
    starts += [(f"random {k + 1}", lambda: [torch.randperm(n, generator=gen) for n in spec.sizes]) for k in range(restarts)]
    runs: list[dict[str, Any]] = []
    for label, make_start in starts:
        # the identity run draws its group orders from ``seed`` (Ainsworth et al.'s run, as before); the others from streams of their own
        stream = seed if label == "identity" else seed + 1_000_003 * (len(runs) + 1)
        perms, iterations = descend(make_start(), torch.Generator().manual_seed(stream))
        runs.append({"start": label, "perms": perms, "similarity": similarity(perms), "iterations": iterations})
        if stop_at_bound and reached(runs[-1]["similarity"]):
            break       # no start can exceed the bound
    best = max(range(len(runs)), key=lambda i: (runs[i]["similarity"], -i))     # ties: the earlier start
    others = [r["similarity"] for i, r in enumerate(runs) if i != best]
    after = runs[best]["similarity"]
    info = {"iterations": runs[best]["iterations"], "similarity_before": similarity(identity), "similarity_after": after,
            "similarity_bound": bound, "bound_reached": reached(after),
            "start": runs[best]["start"], "starts": [{k: r[k] for k in ("start", "similarity", "iterations")} for r in runs],
            "similarity_alternative": max(others) if others else None}
    _log_matching(info)
    return runs[best]["perms"], info


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
    try:
        check_same_architecture([model_a, model_b])
    except ValueError as err:
        raise ConfigError(str(err)) from None
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
