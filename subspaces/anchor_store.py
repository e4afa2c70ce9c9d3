"""The anchors' storage: which parameters live in the subspace, how each anchor holds them, and
how the anchors start.

Layout ``"flat"``: the subspace parameters of each (dtype, weight-decay) class are laid end to
end and cut into chunks of at most :data:`CHUNK_BYTES` (a larger tensor is a chunk of its own);
anchor ``k`` of chunk ``j`` is one contiguous Parameter ``anchors.{k}.{decay|no_decay}_{dtype}_{j}``.
Mixing is then a few kernels per chunk, the optimiser updates a few large tensors instead of
many small ones, and each anchor's gradient ``c_k * dL/dw`` is written in one pass. Decayed
chunks are stored as ``(1, n)`` and undecayed ones as ``(n,)``, so timm's ``create_optimizer_v2``
(which exempts tensors with ``ndim <= 1``) splits them exactly as it splits the plain model.

Layout ``"per_parameter"``: every parameter is a chunk of its own, in its own shape (same
names): per-tensor optimisers (LAMB, LARS, Adafactor) then see one tensor per layer, and timm's
layer-wise lr decay can map each anchor tensor to its layer. It costs one mixing call per
parameter instead of per chunk; :func:`layout_for` picks the layout an optimiser needs.

The wrapped model keeps an empty slot (``None``) for every subspace parameter, so the order of
its parameter names survives; :mod:`subspaces.mixing` binds the weights of a point there.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import ConfigError, ConfigTypeError
from .init import reinitialize

InitFn = Callable[[nn.Module], None]

LAYOUTS = ("flat", "per_parameter")

# timm optimisers whose update of a tensor depends on that tensor as a whole (trust ratios, norms,
# factored moments, orthogonalised matrices): matched as prefixes of timm's names (``lambc``,
# ``fusedlamb``, ``cadafactorbv``, ...). Flat chunks would mix layers in what they compute.
PER_TENSOR_OPTIMIZERS = (
    "lamb", "clamb", "fusedlamb", "lars", "larc", "nlars", "nlarc", "adafactor", "cadafactor",
    "novograd", "fusednovograd", "adamp", "cadamp", "sgdp", "csgdp", "muon", "nmuon", "adamuon",
    "nadamuon", "kron", "adahessian",
)

#: the largest flat chunk, in bytes. Larger tensors are slow on CPU: glibc serves allocations
#: above 32 MiB with fresh mmapped pages each time, so every temporary of that size (the
#: optimiser's weight-decay sum, a gradient) is new memory to fault in on every step, while
#: chunks below it are reused from the heap (docs/performance.md).
CHUNK_BYTES = 8 << 20


def layout_for(opt: str, layer_decay: float | None = None) -> str:
    """The anchor layout an optimiser needs: ``"per_parameter"`` when timm's ``opt`` computes per
    tensor (LAMB, LARS, Adafactor, NovoGrad, AdamP/SGDP, Muon, Kron, AdaHessian) or a
    ``layer_decay`` is set (a chunk must not span layers), else ``"flat"`` (per-element
    optimisers such as SGD, AdamW, Lion: grouping changes nothing and flat chunks mix faster)."""
    if not isinstance(opt, str) or not opt:
        raise ConfigError(f"optimizer name must be a non-empty string such as 'sgd', got {opt!r}")
    base = opt.lower().rpartition("_")[2]   # timm's 'lookahead_lamb' is LAMB inside Lookahead
    if layer_decay is not None or base.startswith(PER_TENSOR_OPTIMIZERS):
        return "per_parameter"
    return "flat"


@dataclass
class AnchorGroup:
    """One storage group (a chunk): parameters of one dtype and one weight-decay class, held by
    each anchor as one tensor of :meth:`storage_shape` (their values end to end)."""

    name: str
    decay: bool
    dtype: torch.dtype
    names: list[str] = field(default_factory=list)          # canonical parameter names
    shapes: list[torch.Size] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    owners: list[list[tuple[nn.Module, str]]] = field(default_factory=list)   # (module, attribute) slots
    module_index: list[int] = field(default_factory=list)   # layerwise: which module owns it
    shape: tuple[int, ...] | None = None   # per-parameter layout: the parameter's own shape

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def storage_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        return (1, self.numel) if self.decay else (self.numel,)


def split_group(group: AnchorGroup, max_bytes: int | None = None) -> list[AnchorGroup]:
    """Split a group into consecutive chunks of at most ``max_bytes`` (default :data:`CHUNK_BYTES`;
    a larger tensor gets a chunk of its own), named ``{group}_{j}``, order kept."""
    limit = max(1, (CHUNK_BYTES if max_bytes is None else max_bytes) // group.dtype.itemsize)
    chunks: list[AnchorGroup] = []
    for i, numel in enumerate(group.numels):
        if not chunks or chunks[-1].numel + numel > limit:
            chunks.append(AnchorGroup(f"{group.name}_{len(chunks)}", group.decay, group.dtype))
        c = chunks[-1]
        c.names.append(group.names[i])
        c.shapes.append(group.shapes[i])
        c.numels.append(numel)
        c.owners.append(group.owners[i])
        c.module_index.append(group.module_index[i])
    return chunks


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns`` (or equals one)."""
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def build_groups(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None, layout: str,
) -> tuple[list[AnchorGroup], int]:
    """The storage groups of ``model``'s subspace parameters and the number of modules owning one.

    A parameter lives in the subspace when it is floating point, trainable, matches ``include``
    (if given) and not ``exclude``; it is decayed unless ``ndim <= 1``, a ``.bias`` or in the
    model's ``no_weight_decay()``. ConfigError when no parameter is left.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise ConfigTypeError("include= / exclude= take a list of patterns, e.g. exclude=['head.*']")
    nwd = getattr(model, "no_weight_decay", None)
    no_decay = set(nwd()) if callable(nwd) else set()
    modules = dict(model.named_modules())
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        mod_name, _, attr = full.rpartition(".")
        owners.setdefault(id(p), []).append((modules[mod_name], attr))
    groups: dict[tuple[torch.dtype, bool], AnchorGroup] = {}
    module_ids: dict[str, int] = {}
    for name, p in model.named_parameters():
        if include is not None and not matches(name, include):
            continue
        if exclude is not None and matches(name, exclude):
            continue
        if not p.is_floating_point() or not p.requires_grad:   # frozen parameters stay shared and frozen
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or matches(name, no_decay))
        key = (p.dtype, decay)
        if key not in groups:
            dtype_name = str(p.dtype).removeprefix("torch.")
            groups[key] = AnchorGroup(f"{'decay' if decay else 'no_decay'}_{dtype_name}", decay, p.dtype)
        g = groups[key]
        g.names.append(name)
        g.shapes.append(p.shape)
        g.numels.append(p.numel())
        g.owners.append(owners[id(p)])
        g.module_index.append(module_ids.setdefault(name.rpartition(".")[0], len(module_ids)))
    if not groups:
        first = [n for n, _ in model.named_parameters()][:3]
        raise ConfigError(
            "no parameter matched include=/exclude=: the subspace would be empty; check the "
            f"patterns against the model's parameter names (e.g. {first})"
        )
    if layout == "flat":
        return [chunk for g in groups.values() for chunk in split_group(g)], len(module_ids)
    chunks = [chunk for g in groups.values() for chunk in split_group(g, max_bytes=1)]   # one tensor each
    for chunk in chunks:
        chunk.shape = tuple(chunk.shapes[0])
    return chunks, len(module_ids)


def flatten(model: nn.Module, groups: Sequence[AnchorGroup]) -> list[Tensor]:
    """``model``'s values of the subspace parameters, one new tensor per group in its storage shape."""
    params = dict(model.named_parameters())
    out = []
    for g in groups:
        try:
            flat = torch.cat([params[n].detach().reshape(-1) for n in g.names])
        except KeyError as err:
            raise ConfigError(f"model has no parameter {err.args[0]!r} that the subspace needs") from err
        out.append(flat.reshape(g.storage_shape()).clone())
    return out


def initial_anchors(model: nn.Module, groups: Sequence[AnchorGroup], num_anchors: int, init: str | InitFn) -> list[list[Tensor]]:
    """From-scratch anchors: for each of ``num_anchors`` copies of ``model``, ``init(copy)`` (or
    with ``"reinit"``: :func:`subspaces.init.reinitialize`), then :func:`flatten`. With ``"reinit"``
    a non-constant parameter that no init re-draws gets a random permutation of its values per
    anchor, with a warning naming it."""
    if not (init == "reinit" or callable(init)):
        raise ConfigError(f"init={init!r}: use 'reinit' or a callable init(model)")
    original = dict(model.named_parameters())
    wanted = {n for g in groups for n in g.names}
    sources, shuffled = [], set()
    for _ in range(num_anchors):
        copy_k = copy.deepcopy(model)
        with torch.no_grad():
            (init if callable(init) else reinitialize)(copy_k)
            if init == "reinit":
                for name, p in copy_k.named_parameters():
                    if name in wanted and p.numel() > 1 and torch.equal(p, original[name]):
                        flat = p.reshape(-1)
                        if not torch.all(flat == flat[0]):   # constant inits (ones, ls gamma) are legitimately equal
                            p.copy_(flat[torch.randperm(flat.numel())].view_as(p))
                            shuffled.add(name)
        sources.append(flatten(copy_k, groups))
    if shuffled:
        warnings.warn(
            "no init function of the model re-draws "
            + ", ".join(sorted(shuffled))
            + "; each anchor got a random permutation of its values instead. Pass init=<callable> "
            "to control this, or exclude= these parameters from the subspace.",
            stacklevel=3,
        )
    return sources


def anchor_dict(groups: Sequence[AnchorGroup], tensors: Sequence[Tensor], layout: str) -> nn.ParameterDict:
    """One anchor: a Parameter per group, named by the group."""
    pairs = [(g.name, nn.Parameter(t)) for g, t in zip(groups, tensors)]
    # ParameterDict sorts a dict's keys ("decay_float32_10" before "_2"); the per-parameter
    # layout keeps the model's order, as Simplex.add_vertex appends in; flat keeps the
    # sorted order that existing checkpoints' optimiser states are indexed by
    return nn.ParameterDict(pairs if layout == "per_parameter" else dict(pairs))


@torch.no_grad()
def centroid_anchor(groups: Sequence[AnchorGroup], anchors: Sequence[nn.ParameterDict]) -> nn.ParameterDict:
    """A new anchor at the centroid (1/K) sum_k W_k of ``anchors``, summed in anchor order."""
    new = nn.ParameterDict()
    for g in groups:
        total = anchors[0][g.name].detach().clone()
        for anchor in anchors[1:]:
            total.add_(anchor[g.name])
        new[g.name] = nn.Parameter(total.div_(len(anchors)))
    return new


def empty_slots(groups: Sequence[AnchorGroup]) -> None:
    """Remove the subspace parameters from the wrapped model, keeping each name's slot (``None``)
    so the order of its parameter names survives."""
    for g in groups:
        for owners in g.owners:
            for module, attr in owners:
                module.register_parameter(attr, None)
