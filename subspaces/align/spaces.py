"""Channel spaces: the label of every tensor axis, and the union-find that joins labels which must
be permuted together.

Every axis of a traced tensor or parameter carries a space (an int); two axes in the same space
are reordered by the same permutation. Space :data:`FIXED` is never permuted: joining a space to
it leaves every axis of that space in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor

from .trace import node_shape

__all__ = ["FIXED", "AxisLabels", "ChannelSpaces"]

#: the space of axes that stay in place
FIXED = 0


class ChannelSpaces:
    """Union-find over channel spaces; space 0 is :data:`FIXED` (never permuted).

    ``size[s]``: the length of the axes in space s; ``fixed``: (layer, reason) of each union that
    pinned a permutable space to FIXED."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.size = [0]
        self.fixed: list[tuple[str, str]] = []

    def new(self, size: int) -> int:
        """A new space of axes of length ``size`` (FIXED for length 0 or 1: nothing to permute)."""
        if size <= 1:
            return FIXED
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        """The root of space ``a`` (path halving)."""
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int, where: str = "", why: str = "") -> int:
        """Join spaces ``a`` and ``b`` (the join of anything with FIXED, or of axes of different
        lengths, is FIXED; ``where`` / ``why`` name the place when that pins a space); returns the root."""
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
        """Leave space ``a`` in place."""
        self.union(a, FIXED, where, why)


class AxisLabels:
    """The labels of a traced graph: a list of spaces per node (one per axis of its tensor, or a
    tuple of such lists for several tensors) and per parameter, over one :class:`ChannelSpaces`.

    ``params[name]``: the spaces of the axes of parameter or buffer ``name`` of the model;
    ``blockers``: (layer, reason) of each operation that could not be analysed."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.sp = ChannelSpaces()
        self.info: dict[fx.Node, Any] = {}
        self.params: dict[str, list[int]] = {}
        self.blockers: list[tuple[str, str]] = []

    def param(self, name: str, tensor: Tensor) -> list[int]:
        """The spaces of tensor ``name``'s axes, new ones on its first use."""
        if name not in self.params:
            self.params[name] = [self.sp.new(s) for s in tensor.shape]
        return self.params[name]

    def axes(self, x: Any) -> list[int] | None:
        """The spaces of node ``x``'s tensor; None for anything else (constants, several tensors)."""
        return self.info.get(x) if isinstance(x, fx.Node) and isinstance(self.info.get(x), list) else None

    def fix_all(self, where: str, why: str, *args: Any) -> None:
        """Leave every axis of the nodes in ``args`` (nested in lists, tuples, dicts) in place and,
        with ``why``, record the place as a blocker."""
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
        """FIXED labels for every axis of ``node``'s output (a list, or a tuple of lists)."""
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return [FIXED] * len(meta.shape)
        if isinstance(meta, (list, tuple)):
            return tuple([FIXED] * len(m.shape) if hasattr(m, "shape") else None for m in meta)
        return None

    def broadcast(self, node: fx.Node, operands: Sequence[Any], where: str) -> list[int] | None:
        """An elementwise operation: output axis j joins the operands' axes that broadcast to it
        with their full length (an axis of length 1 broadcast along j couples nothing)."""
        out_shape = node_shape(node)
        if out_shape is None:
            return None
        out = [FIXED] * len(out_shape)
        seen = [False] * len(out_shape)
        for a in operands:
            ax, sh = self.axes(a), node_shape(a)
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
