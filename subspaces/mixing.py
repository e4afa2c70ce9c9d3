"""Mixing the anchors into the weights at a point, and binding those weights into the wrapped model.

    w = sum_k c_k W_k          (per storage group; the same c for every group at one point)

:func:`mix` computes w per group of :mod:`subspaces.anchor_store` with :class:`MixFunction`, an
autograd function whose backward gives each trainable anchor dL/dW_k = c_k * dL/dw in one pass.
A convex combination on the CPU is computed as K - 1 lerps (:func:`lerp_steps`) instead of K
multiply-adds. Layerwise coefficients (Tensor[K, num_modules]) give each parameter its owning
module's coefficients.

Binding (:func:`bind`): the wrapped model's subspace parameters are empty slots (``None``, see
:func:`subspaces.anchor_store.empty_slots`), and the mixed weights are set as plain instance
attributes of the owning modules. Python's attribute lookup finds an instance attribute before
``nn.Module.__getattr__`` looks in the parameter slots, so every access ``module.weight`` -- by
the module itself, by its parent (ViT's ``pos_embed``), by ``F.linear(x, self.qkv.weight)`` --
sees the weights at the current point, whatever layer class owns them. They are written to the
instance ``__dict__`` because ``nn.Module.__setattr__`` refuses a plain tensor in a parameter's
name, and once per parameter per forward this is the cheapest binding there is (no
reparametrisation hook, no module swap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .anchor_store import AnchorGroup
from .buffer_pool import MIXED, BufferPool

#: mean elements per parameter tensor above which the CPU backward writes tensor by tensor
PIECE_NUMEL = 1 << 16


def eager_cpu(device: torch.device) -> bool:
    """Whether work on ``device`` runs eagerly on the CPU (where the buffer pool applies)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def lerp_steps(coeffs: Tensor) -> Tensor | None:
    """For a convex combination (c_k >= 0, sum 1) on the CPU: the weights s_j of the lerp chain
    o_0 = W_0, o_j = lerp(o_{j-1}, W_j, s_j) = (S_{j-1} o_{j-1} + c_j W_j) / S_j with S_j = c_0 + .. + c_j,
    so o_{K-1} = sum_k c_k W_k. Tensor[K] -> Tensor[K-1], or None (not convex, layerwise,
    coefficients on an accelerator, where checking them would synchronise, or compiling: then
    the K multiply-adds are used). The anchors may be anywhere: the steps move to them.

    One lerp reads two tensors and writes one, so the chain costs K - 1 passes over the
    weights instead of K; the weights s_j are in [0, 1], where lerp is exact at both ends.
    """
    if coeffs.ndim != 1 or coeffs.device.type != "cpu" or coeffs.numel() < 2 or torch.compiler.is_compiling():
        return None
    c = coeffs.double()
    if bool((c < 0).any()) or abs(float(c.sum()) - 1.0) > 1e-6:
        return None
    partial = c.cumsum(0)[1:]
    steps = torch.where(partial > 0, c[1:] / partial.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(partial))
    return steps.clamp(0, 1)


class MixFunction(torch.autograd.Function):
    """Mixed weights of one storage group, one tensor per parameter: w_i = sum_k c_k W_k[i].

    Inputs: ``numels`` / ``shapes`` of the group's parameters (constants); ``per_piece``: write
    gradients tensor by tensor (one pass) instead of through a concatenated dL/dw (two passes,
    but a few calls instead of a few per tensor); a :class:`BufferPool` or None; ``steps``: None
    or the :func:`lerp_steps` of ``coeffs`` (then w is computed by K - 1 lerps); ``coeffs``:
    Tensor[K] (one point) or Tensor[K, n_params] (layerwise: a coefficient per parameter
    tensor); the K anchors (shape (n,) or (1, n), or the parameter's own shape). Returns one
    tensor per parameter, shaped, in the anchors' dtype (also under autocast: only elementwise
    ops are used). Backward gives dL/dW_k = c_k * dL/dw to the anchors that need it only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        numels: tuple[int, ...],
        shapes: tuple[torch.Size, ...],
        per_piece: bool,
        pool: BufferPool | None,
        steps: Tensor | None,
        coeffs: Tensor,
        *anchors: Tensor,
    ) -> tuple[Tensor, ...]:
        ctx.save_for_backward(coeffs)
        ctx.numels, ctx.pool, ctx.per_piece = numels, pool, per_piece or coeffs.ndim == 2
        ctx.anchor_shape, ctx.anchor_dtype = anchors[0].shape, anchors[0].dtype
        ctx.set_materialize_grads(False)
        if coeffs.ndim == 2:   # layerwise: a coefficient per tensor
            cs = [c.unbind() for c in coeffs]
            pieces = torch._foreach_mul(anchors[0].reshape(-1).split(numels), cs[0])
            for anchor, c in zip(anchors[1:], cs[1:]):
                torch._foreach_addcmul_(pieces, anchor.reshape(-1).split(numels), c)
        else:
            out = pool.take(MIXED, anchors[0].shape, anchors[0].dtype, anchors[0].device) if pool is not None else None
            if steps is not None:   # a convex combination: K - 1 lerps instead of K multiply-adds
                flat = torch.lerp(anchors[0], anchors[1], steps[0], out=out) if out is not None else torch.lerp(anchors[0], anchors[1], steps[0])
                for anchor, s in zip(anchors[2:], steps[1:]):
                    flat.lerp_(anchor, s)
            else:
                flat = torch.mul(anchors[0], coeffs[0], out=out) if out is not None else torch.mul(anchors[0], coeffs[0])
                for anchor, c in zip(anchors[1:], coeffs[1:]):
                    flat.addcmul_(anchor, c)
            pieces = flat.reshape(-1).split(numels)
        return tuple(piece.view(shape) for piece, shape in zip(pieces, shapes))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (coeffs,) = ctx.saved_tensors
        first = 6   # inputs before the anchors
        needed = [k for k, need in enumerate(ctx.needs_input_grad[first:]) if need]
        out: list[Tensor | None] = [None] * len(ctx.needs_input_grad)
        ref = next((g for g in grads if g is not None), None)
        if not needed or ref is None:
            for k in needed:   # no output reached the loss
                out[first + k] = coeffs.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype)
            return tuple(out)
        shape, dtype, pool, numels = ctx.anchor_shape, ctx.anchor_dtype, ctx.pool, ctx.numels
        if pool is not None:
            pool.incoming = grads   # freed at the next mix, as a plain model frees .grad at zero_grad (see BufferPool)

        def buffer(k: int) -> Tensor:
            return pool.take(k, shape, dtype, ref.device) if pool is not None else torch.empty(shape, dtype=dtype, device=ref.device)

        if ctx.per_piece:   # one pass per anchor, tensor by tensor into its flat gradient
            layerwise = coeffs.ndim == 2
            for k in needed:
                flat = buffer(k)
                cs = coeffs[k].unbind() if layerwise else [coeffs[k]] * len(numels)
                for dst, g, c in zip(flat.view(-1).split(numels), grads, cs):
                    if g is None:
                        dst.zero_()
                    else:   # g in the layout the weight was used in (channels-last): functionalised out= needs it contiguous
                        torch.mul(g.contiguous(), c, out=dst.view(g.shape))
                out[first + k] = flat
            return tuple(out)
        filled = [g if g is not None else ref.new_zeros(n) for g, n in zip(grads, numels)]
        # public torch.cat, not torch._C._nn.flatten_dense_tensors: the same tensor, and the private
        # call buys no measurable speed (docs/performance.md §3)
        dw = torch.cat([g.reshape(-1) for g in filled]).to(dtype).view(shape)
        if pool is not None:
            for k in needed:
                out[first + k] = torch.mul(dw, coeffs[k], out=buffer(k))
            return tuple(out)
        for k in needed[:-1]:
            out[first + k] = dw * coeffs[k]
        out[first + needed[-1]] = dw.mul_(coeffs[needed[-1]])   # the concatenation is ours: reuse it
        return tuple(out)


def unbind(group: AnchorGroup) -> None:
    """Drop the weights bound to ``group``'s slots (their storage may then be reused)."""
    for owners in group.owners:
        for module, attr in owners:
            module.__dict__.pop(attr, None)


def mix(
    groups: Sequence[AnchorGroup],
    anchors: Sequence[nn.ParameterDict],
    coeffs: Tensor,
    module_index: Sequence[Tensor] | None = None,
    pieces: bool = False,
    pools: dict[str, BufferPool] | None = None,
) -> list[Any]:
    """The weights at coefficients ``coeffs``, per group: w = sum_k coeffs[k] * anchors[k][group].

    ``coeffs``: Tensor[K], or Tensor[K, num_modules] (layerwise) with ``module_index[i]`` the
    owning module of each parameter of group i. Returns per group one flat tensor in the
    anchors' storage shape, or with ``pieces=True`` (the forward path) a tuple of the group's
    parameter tensors, shaped, ready to :func:`bind`. ``pools``: per group name a
    :class:`BufferPool` for the CPU (created on first use; dropped for a group that moved off
    the CPU); a pooled group's bound weights are unbound first, since their storage is reused
    when nothing else holds it, so bind the result.
    """
    out: list[Any] = []
    steps = lerp_steps(coeffs)
    K = len(anchors)
    for i, g in enumerate(groups):
        group_anchors = [anchors[k][g.name] for k in range(K)]
        device = group_anchors[0].device
        c = coeffs.to(device=device, dtype=g.dtype, non_blocking=True)
        s = steps.to(device=device, dtype=g.dtype, non_blocking=True) if steps is not None else None
        if c.ndim == 2:   # layerwise: the coefficients of the module owning each parameter
            c = c[:, module_index[i]]
        pool = None
        if pools is not None and not eager_cpu(device):
            pools.pop(g.name, None)   # moved off the CPU: let the CPU buffers go
        elif pools is not None:
            pool = pools.setdefault(g.name, BufferPool())
            pool.incoming = None   # the last backward's dL/dw: free it now, before this forward allocates
            if not torch.is_grad_enabled():
                pool.release_gradients()   # evaluation: hand the gradients' memory back
            if c.ndim == 2:
                pool.storages.pop(MIXED, None)   # layerwise mixing is tensor by tensor: no flat weights
            unbind(g)   # drop the last weights' views: their storage may be reused
        per_piece = eager_cpu(device) and g.numel >= PIECE_NUMEL * len(g.numels)
        mixed = MixFunction.apply(tuple(g.numels), tuple(g.shapes), per_piece, pool, s, c, *group_anchors)
        if not pieces:
            mixed = torch.cat([m.reshape(-1) for m in mixed]).reshape(g.storage_shape())
        out.append(mixed)
    return out


def bind(groups: Sequence[AnchorGroup], mixed: Sequence[Any], detach: bool = False,
         memory_format: torch.memory_format | None = None) -> None:
    """Bind mixed weights (per group: a flat tensor or a tuple of parameter tensors, as :func:`mix`
    returns) to the owning modules' attributes; ``detach=True`` binds them without autograd history.
    ``memory_format``: 4-D weights are bound as a copy in that format (``torch.channels_last``;
    the copy's gradient flows back to the mixed weight), others as they are."""
    for g, group in zip(groups, mixed):
        if isinstance(group, Tensor):
            group = [p.view(shape) for p, shape in zip(torch.split(group.reshape(-1), g.numels), g.shapes)]
        for tensor, owners in zip(group, g.owners):
            if detach:
                tensor = tensor.detach()
            elif memory_format is not None and tensor.ndim == 4:
                tensor = tensor.contiguous(memory_format=memory_format)
            for module, attr in owners:
                module.__dict__[attr] = tensor
