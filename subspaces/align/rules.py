"""The channel rule of each kind of operation: how it joins the spaces of its inputs, its
parameters and its output (:mod:`.spaces`), or pins them in place.

- a convolution / linear layer starts a new channel space on its output axis and joins its
  weight's input axis to the space of its input; a depthwise convolution keeps its input's space;
  a grouped one leaves its channels in place;
- norms over the channel axis (BatchNorm, LayerNorm and RMSNorm over the last axis, GroupNorm with
  1 or C groups) join their scale and shift to the channels they normalise;
- ``permute`` / ``transpose`` / ``reshape`` that keep an axis whole carry its space along; an axis
  split or merged by ``reshape`` (the heads of ``qkv``), a concatenation, a split or a slice along
  channels leaves it in place;
- attention and ``matmul`` join the contracted axes and the batch axes of their operands.

Each rule takes the :class:`~.spaces.AxisLabels` of the walk and returns the labels of the
operation's output, one space per axis. A rule that raises (an operand it cannot read) makes the
walk leave the operation's inputs and outputs in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from .spaces import FIXED, AxisLabels
from .trace import node_shape

__all__ = ["attention", "batch_norm", "broadcast_lists", "cat", "check_leaf_params", "conv", "expand", "group_norm", "index", "linear",
           "matmul", "norm_last", "permute", "reduce", "reshape", "transpose", "unbind"]


def batch_norm(lab: AxisLabels, m: nn.Module, name: str, ax: list[int], where: str) -> list[int]:
    """BatchNorm over axis 1 of Tensor[B, C, ...]: its weight, bias and running statistics
    (Tensor[C] each) join the channel space of axis 1; the output keeps the input's spaces."""
    c = ax[1]
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, key, None)
        if isinstance(t, Tensor) and t.ndim == 1:
            c = lab.sp.union(c, lab.param(f"{name}.{key}", t)[0], where, "BatchNorm")
    check_leaf_params(lab, m, name, ("weight", "bias"), where)
    out = list(ax)
    out[1] = c
    return out


def check_leaf_params(lab: AxisLabels, m: nn.Module, name: str, handled: Sequence[str], where: str) -> None:
    """Leave in place every axis of the parameters of leaf module ``m`` other than ``handled``."""
    for pname, p in m.named_parameters():
        if pname not in handled:
            for s in lab.param(f"{name}.{pname}", p):
                lab.sp.fix(s, where, f"parameter {pname} of {type(m).__name__} is not analysed")


def conv(lab: AxisLabels, node: fx.Node, name: str | None, weight: Any, bias: Any, groups: int, ax: list[int], where: str) -> list[int]:
    """Convolution of x Tensor[B, C_in, ...] by weight Tensor[C_out, C_in / groups, k...]: the
    weight's axis 1 joins x's channels and its axis 0 (with the bias) is the output's channels; a
    depthwise one (groups = C_in = C_out) keeps x's channels; other groups leave both in place.
    ``name``: the module's (its parameters labelled by name), or None for a functional call whose
    weight and bias are traced nodes."""
    w = lab.param(f"{name}.weight", weight) if name is not None else lab.axes(weight)
    if w is None:
        raise ValueError("weight not traced")
    out_c = weight.shape[0] if isinstance(weight, Tensor) else node_shape(weight)[0]
    cin = node_shape(node.args[0])[1]
    b = None
    if bias is not None:
        b = lab.param(f"{name}.bias", bias)[0] if name is not None else (lab.axes(bias) or [FIXED])[0]
    if groups == 1:
        lab.sp.union(w[1], ax[1], where, "convolution input")
        out = w[0]
    elif groups == cin == out_c:   # depthwise: channel c reads and writes channel c only
        out = lab.sp.union(w[0], ax[1], where, "depthwise convolution")
        lab.sp.fix(w[1], where, "")
    else:
        lab.sp.fix(ax[1], where, f"grouped convolution ({groups} groups) couples channels in blocks")
        lab.sp.fix(w[0], where, f"grouped convolution ({groups} groups) couples channels in blocks")
        lab.sp.fix(w[1], where, "")
        out = FIXED
    for s in w[2:]:
        lab.sp.fix(s, where, "")
    if b is not None:
        out = lab.sp.union(out, b, where, "convolution bias")
    res = [ax[0], out] + [FIXED] * (len(node_shape(node)) - 2)
    return res


def linear(lab: AxisLabels, node: fx.Node, name: str | None, weight: Any, bias: Any, ax: list[int], where: str) -> list[int]:
    """Linear map of x Tensor[..., C_in] by weight Tensor[C_out, C_in]: the weight's axis 1 joins
    x's last axis, its axis 0 (with the bias) is the output's last axis. ``name`` as for :func:`conv`."""
    w = lab.param(f"{name}.weight", weight) if name is not None else lab.axes(weight)
    if w is None:
        raise ValueError("weight not traced")
    lab.sp.union(w[1], ax[-1], where, "linear input")
    out = w[0]
    if bias is not None:
        b = lab.param(f"{name}.bias", bias)[0] if name is not None else (lab.axes(bias) or [FIXED])[0]
        out = lab.sp.union(out, b, where, "linear bias")
    return list(ax[:-1]) + [out]


def _param_axes(lab: AxisLabels, params: list[tuple[str | None, Any]]) -> Iterator[list[int]]:
    """The axis labels of a norm's scale / shift: of a named parameter, or of the graph value it
    was passed as; absent ones (None, or values without labels) are skipped."""
    for pname, t in params:
        if t is None:
            continue
        p = lab.param(pname, t) if pname is not None and isinstance(t, Tensor) else lab.axes(t)
        if p is not None:
            yield p


def norm_last(lab: AxisLabels, node: fx.Node, ax: list[int], n_norm: int, params: list[tuple[str | None, Any]], where: str) -> list[int]:
    """A norm over the last ``n_norm`` axes of x (LayerNorm, RMSNorm): over one axis its scale and
    shift Tensor[C] join that axis; over several, those axes and the parameters stay in place."""
    out = list(ax)
    if n_norm != 1:
        for i in range(len(ax) - n_norm, len(ax)):
            lab.sp.fix(out[i], where, "a norm over several axes")
    for p in _param_axes(lab, params):
        if n_norm == 1:
            out[-1] = lab.sp.union(out[-1], p[-1], where, "norm scale / shift")
        else:
            for s in p:
                lab.sp.fix(s, where, "a norm over several axes")
    return out


def group_norm(lab: AxisLabels, node: fx.Node, ax: list[int], groups: int, params: list[tuple[str | None, Any]], where: str) -> list[int]:
    """GroupNorm of x Tensor[B, C, ...] in ``groups`` groups: with 1 or C groups the scale and
    shift Tensor[C] join axis 1; other groupings couple channels in blocks and stay in place."""
    out = list(ax)
    c = node_shape(node)[1]
    ok = groups in (1, c)
    if not ok:
        lab.sp.fix(out[1], where, f"GroupNorm with {groups} groups couples channels in blocks")
    for p in _param_axes(lab, params):
        out[1] = lab.sp.union(out[1], p[0], where, "GroupNorm") if ok else FIXED
        if not ok:
            lab.sp.fix(p[0], where, "")
    return out


def reshape(lab: AxisLabels, node: fx.Node, x: Any, where: str) -> list[int] | None:
    """Axes kept whole (one input axis of size n > 1 to one output axis of size n) keep their
    space; an axis split or merged with others is fixed."""
    ax, src, dst = lab.axes(x), node_shape(x), node_shape(node)
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
                lab.sp.fix(ax[k], where, "reshape splits or merges a channel axis (e.g. attention heads)")
        i, j = i + 1, j + 1
    return out


def reduce(lab: AxisLabels, node: fx.Node, x: Any, dims: Any, keepdim: bool) -> list[int] | None:
    """A reduction (mean, sum, amax, ...) over ``dims`` (None: all): the reduced axes drop out,
    or become FIXED with ``keepdim``; the others keep their spaces."""
    ax = lab.axes(x)
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


def index(lab: AxisLabels, node: fx.Node, x: Any, idx: Any, where: str) -> Any:
    """``x[idx]`` with basic indexing: a whole slice keeps the axis's space, an integer index or a
    partial slice of a channel axis pins it, None adds a FIXED axis; of a tuple of tensors, item
    ``idx``. Advanced indexing raises (the walk leaves it in place)."""
    v = lab.info.get(x) if isinstance(x, fx.Node) else None
    if isinstance(v, tuple):
        return v[idx] if isinstance(idx, int) else None
    ax, sh = lab.axes(x), node_shape(x)
    if ax is None or sh is None:
        return lab.fresh(node)
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
                lab.sp.fix(ax[k], where, "indexing a channel axis")
            k += 1
            continue
        whole = isinstance(i, slice) and i.step in (None, 1) and (i.start in (None, 0)) and (i.stop is None or i.stop >= sh[k])
        if not whole:
            lab.sp.fix(ax[k], where, "slicing a channel axis")
        out.append(ax[k] if whole else FIXED)
        k += 1
    out.extend(ax[k:])
    return out


def permute(lab: AxisLabels, x: Any, dims: Sequence[int]) -> list[int]:
    """``x.permute(dims)``: output axis i has the space of input axis dims[i]."""
    ax = lab.axes(x)
    n = len(ax)
    return [ax[d % n] for d in dims]


def transpose(lab: AxisLabels, x: Any, d0: int, d1: int) -> list[int]:
    """``x.transpose(d0, d1)``: the spaces of axes d0 and d1 swapped."""
    ax = list(lab.axes(x))
    n = len(ax)
    ax[d0 % n], ax[d1 % n] = ax[d1 % n], ax[d0 % n]
    return ax


def expand(lab: AxisLabels, node: fx.Node, x: Any) -> list[int]:
    """``x.expand(shape)`` / ``expand_as``: kept axes keep their space; new or expanded axes are FIXED."""
    ax, src, dst = lab.axes(x), node_shape(x), node_shape(node)
    off = len(dst) - len(src)
    out = [FIXED] * off + [s if src[i] == dst[i + off] else FIXED for i, s in enumerate(ax)]
    return out


def unbind(lab: AxisLabels, node: fx.Node, x: Any, dim: int, where: str) -> tuple[list[int], ...]:
    """``x.unbind(dim)``: a tuple of x's labels without axis ``dim``, which stays in place."""
    ax = list(lab.axes(x))
    d = dim % len(ax)
    lab.sp.fix(ax[d], where, "unbind along a channel axis")
    rest = ax[:d] + ax[d + 1:]
    return tuple(list(rest) for _ in range(node_shape(x)[d]))


def cat(lab: AxisLabels, node: fx.Node, xs: Sequence[Any], dim: int, where: str) -> list[int]:
    """``torch.cat(xs, dim)``: the other axes of every operand join; axis ``dim`` of each stays in place."""
    axs = [lab.axes(x) for x in xs]
    if any(a is None for a in axs):
        raise ValueError("cat of untraced values")
    n = len(axs[0])
    d = dim % n
    out = list(axs[0])
    for a in axs[1:]:
        for i in range(n):
            if i != d:
                out[i] = lab.sp.union(out[i], a[i], where, "concatenation")
    for a in axs:
        lab.sp.fix(a[d], where, "concatenation along a channel axis")
    out[d] = FIXED
    return out


def attention(lab: AxisLabels, node: fx.Node, q: Any, k: Any, v: Any, where: str) -> list[int]:
    """``scaled_dot_product_attention(q, k, v)`` with Tensor[..., L, E] operands: the batch axes of
    q, k, v join, q's and k's feature axes join, k's and v's sequence axes join; the output is
    Tensor[..., L_q, E_v]."""
    aq, ak, av = lab.axes(q), lab.axes(k), lab.axes(v)
    for i in range(len(aq) - 2):
        aq[i] = lab.sp.union(lab.sp.union(aq[i], ak[i], where, "attention"), av[i], where, "attention")
    lab.sp.union(aq[-1], ak[-1], where, "attention: query and key dimensions")
    lab.sp.union(ak[-2], av[-2], where, "attention: keys and values")
    return list(aq[:-1]) + [av[-1]]


def matmul(lab: AxisLabels, node: fx.Node, a: Any, b: Any, where: str) -> list[int]:
    """``a @ b`` of Tensor[..., n, k] and Tensor[..., k, m]: a's last axis joins b's second to
    last; the batch axes broadcast (:func:`broadcast_lists`); the output is Tensor[..., n, m]."""
    xa, xb = lab.axes(a), lab.axes(b)
    if xa is None or xb is None or len(xa) < 2 or len(xb) < 2:
        raise ValueError("matmul of untraced values")
    lab.sp.union(xa[-1], xb[-2], where, "matmul")
    batch = broadcast_lists(lab, xa[:-2], xb[:-2], node_shape(a)[:-2], node_shape(b)[:-2], where)
    return batch + [xa[-2], xb[-1]]


def broadcast_lists(lab: AxisLabels, xa: list[int], xb: list[int], sa: tuple, sb: tuple, where: str) -> list[int]:
    """Batch axes of two operands broadcast together: an axis of length 1 takes the other's
    space, two full ones join."""
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
            out.append(lab.sp.union(xa[i], xb[i], where, "matmul batch axes"))
    return out
