"""The subspace wrapper: K anchor weight sets of one network, mixed into the weights at a point.

    w(p) = sum_k c_k(p) * W_k          (the same coefficients c(p) for every parameter tensor)

Storage. The anchors of every parameter that lives in the subspace are kept flat: the
parameters of each (dtype, weight-decay) class are laid end to end and cut into chunks of at
most 8 MiB (a larger tensor is a chunk of its own), and anchor ``k`` of chunk ``j`` is one
contiguous Parameter ``anchors.{k}.{decay|no_decay}_{dtype}_{j}``. Mixing is then a few kernels
per chunk (K reads and K - 1 writes of the parameters for a convex combination), the optimiser
updates a few large tensors instead of many small ones, and the anchors' gradients are
``c_k * dL/dw`` written in one pass per trainable anchor. Decayed chunks are stored as
``(1, n)`` and undecayed ones as ``(n,)``, so timm's ``create_optimizer_v2`` (which exempts
tensors with ``ndim <= 1``) splits them exactly as it splits the plain model.
With ``layout="per_parameter"`` every parameter is a chunk of its own, in its own shape
(``anchors.{k}.{decay|no_decay}_{dtype}_{j}`` still): per-tensor optimisers (LAMB, LARS,
Adafactor) then see one tensor per layer, and :meth:`Subspace.group_matcher` maps each anchor
tensor to its layer for timm's layer-wise lr decay. It costs one mixing call per parameter
instead of per chunk (resnet18 / ViT figures in the bench report; choose with :func:`layout_for`).

Binding. The wrapped model's subspace parameters are removed from its ``_parameters`` (the slot
is kept as ``None`` so the order of names survives) and, for each forward, the mixed weights are
bound as plain tensors in the owning modules' ``__dict__``. Every access ``module.weight`` — by
the module itself, by its parent (ViT's ``pos_embed``), by ``F.linear(x, self.qkv.weight)`` —
therefore sees the weights at the current point, whatever layer class owns them.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from .bn import update_bn
from .errors import ConfigError
from .init import reinitialize

Point = Union[float, Sequence[float], Tensor]
InitFn = Callable[[nn.Module], None]

SAMPLING_MODES = ("global", "layerwise", "arc_length")
LAYOUTS = ("flat", "per_parameter")

# timm optimisers whose update of a tensor depends on that tensor as a whole (trust ratios, norms,
# factored moments, orthogonalised matrices): matched as prefixes of timm's names (``lambc``,
# ``fusedlamb``, ``cadafactorbv``, ...). Flat chunks would mix layers in what they compute.
_PER_TENSOR_OPTIMIZERS = (
    "lamb", "clamb", "fusedlamb", "lars", "larc", "nlars", "nlarc", "adafactor", "cadafactor",
    "novograd", "fusednovograd", "adamp", "cadamp", "sgdp", "csgdp", "muon", "nmuon", "adamuon",
    "nadamuon", "kron", "adahessian",
)


def layout_for(opt: str, layer_decay: float | None = None) -> str:
    """The anchor layout an optimiser needs: ``"per_parameter"`` when timm's ``opt`` computes per
    tensor (LAMB, LARS, Adafactor, NovoGrad, AdamP/SGDP, Muon, Kron, AdaHessian) or a
    ``layer_decay`` is set (a chunk must not span layers), else ``"flat"`` (per-element
    optimisers such as SGD, AdamW, Lion: grouping changes nothing and flat chunks mix faster)."""
    if not isinstance(opt, str) or not opt:
        raise ConfigError(f"optimizer name must be a non-empty string such as 'sgd', got {opt!r}")
    base = opt.lower().rpartition("_")[2]   # timm's 'lookahead_lamb' is LAMB inside Lookahead
    if layer_decay is not None or base.startswith(_PER_TENSOR_OPTIMIZERS):
        return "per_parameter"
    return "flat"


_PIECE_NUMEL = 1 << 16   # mean elements per parameter tensor above which backward goes tensor by tensor
# Anchors are stored in flat chunks of at most this size. Larger tensors are slow on CPU: glibc
# serves allocations above 32 MiB with fresh mmapped pages each time, so every temporary of
# that size (the optimiser's weight-decay sum, a gradient) is new memory to fault in on every
# step, while chunks below the threshold are reused from the heap (docs/performance.md, History).
_CHUNK_BYTES = 8 << 20


def _eager_cpu(device: torch.device) -> bool:
    return device.type == "cpu" and not torch.compiler.is_compiling()


class _Pool:
    """Flat storages of one group reused across steps on CPU: the mixed weights (key -1) and
    each trainable anchor's gradient (key k).

    On CPU a fresh tensor of tens of MB is new zeroed pages every step (glibc maps tensors
    above 32 MiB afresh and trims the heap when large blocks are freed), and faulting them in
    can cost more than the arithmetic that writes them (docs/performance.md §3). The pool keeps the storage it handed out last and hands it out again
    only when nothing else references it (the gradient was dropped by ``zero_grad`` and no one
    kept it; no autograd graph or user variable holds the last mixed weights), else a fresh one.
    So reuse is never observable. Copies and pickles of a subspace start with an empty pool.

    It also keeps the per-parameter gradients dL/dw that autograd hands to the backward
    (``incoming``) until the next mix. Freed at the end of the backward, they would leave tens
    of MB free at the top of the heap, which glibc gives back to the kernel, and the next
    backward would fault them in again. Kept, the subspace's allocations follow the plain
    model's pattern (a plain model keeps its gradients until ``zero_grad``); the peak is
    unchanged.
    """

    def __init__(self) -> None:
        self.storages: dict[int, Any] = {}
        self.incoming: tuple[Tensor | None, ...] | None = None

    def __deepcopy__(self, memo: dict) -> _Pool:
        return _Pool()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.storages = {}
        self.incoming = None

    def take(self, key: int, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor on a storage that only this pool holds (reused or fresh)."""
        storage = self.storages.pop(key, None)
        if (
            storage is not None
            and storage.device == device
            and storage.nbytes() == math.prod(shape) * dtype.itemsize
            and torch._C._storage_Use_Count(storage._cdata) == 1   # nothing else holds it
        ):
            out = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)
        else:
            out = torch.empty(shape, dtype=dtype, device=device)
        self.storages[key] = out.untyped_storage()
        return out

    def release_gradients(self) -> None:
        for key in [k for k in self.storages if k >= 0]:
            del self.storages[key]
        self.incoming = None


def _pooling_available() -> bool:
    """Whether this torch has the one private call the CPU buffer pool needs
    (``torch._C._storage_Use_Count``: how many tensors hold a storage, so that a buffer is
    reused only when nothing else holds it). Without it the pool is off, visibly: a
    RuntimeWarning says so. Results are the same either way; CPU steps are slower without it
    (docs/performance.md). ``tests/test_bench.py`` fails if the pool is off with the call present."""
    if callable(getattr(torch._C, "_storage_Use_Count", None)):
        return True
    warnings.warn(
        "torch._C._storage_Use_Count is missing in torch " + torch.__version__ + ": subspaces' CPU buffer pool is off "
        "(same results; CPU training steps re-allocate the mixed weights and anchor gradients every step, slower)",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


#: whether the CPU buffer pool is used (see :class:`_Pool`): a switch, set False to turn it off
#: (same results, slower on the CPU); ``analysis/bench.py --pool both`` times both
POOLING = _pooling_available()


def _lerp_steps(coeffs: Tensor) -> Tensor | None:
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


class _Mix(torch.autograd.Function):
    """Mixed weights of one flat group, one tensor per parameter: w_i = sum_k c_k W_k[i].

    Inputs: ``numels`` / ``shapes`` of the group's parameters (constants); ``per_piece``: write
    gradients tensor by tensor (one pass) instead of through a concatenated dL/dw (two passes,
    but a few calls instead of a few per tensor); a :class:`_Pool` or None; ``steps``: None or
    the :func:`_lerp_steps` of ``coeffs`` (then w is computed by K - 1 lerps); ``coeffs``:
    Tensor[K] (one point) or Tensor[K, n_params] (layerwise: a coefficient per parameter
    tensor); the K flat anchors (shape (n,) or (1, n)). Returns one tensor per parameter,
    shaped, in the anchors' dtype (also under autocast: only elementwise ops are used).
    Backward gives dL/dW_k = c_k * dL/dw to the anchors that need it only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        numels: tuple[int, ...],
        shapes: tuple[torch.Size, ...],
        per_piece: bool,
        pool: _Pool | None,
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
            out = pool.take(-1, anchors[0].shape, anchors[0].dtype, anchors[0].device) if pool is not None else None
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
            pool.incoming = grads   # freed at the next mix, as a plain model frees .grad at zero_grad (see _Pool)

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
                    else:
                        torch.mul(g, c, out=dst.view(g.shape))
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


@dataclass
class _Group:
    """One flat storage group: the parameters of one dtype and one weight-decay class."""

    name: str
    decay: bool
    dtype: torch.dtype
    names: list[str] = field(default_factory=list)          # canonical parameter names
    shapes: list[torch.Size] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    owners: list[list[tuple[nn.Module, str]]] = field(default_factory=list)
    module_index: list[int] = field(default_factory=list)   # layerwise: which module owns it
    shape: tuple[int, ...] | None = None   # per-parameter layout: the parameter's own shape

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def storage_shape(self) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        return (1, self.numel) if self.decay else (self.numel,)


def _split_group(group: _Group, max_bytes: int | None = None) -> list[_Group]:
    """Split a group into consecutive chunks of at most ``max_bytes`` (default ``_CHUNK_BYTES``;
    a larger tensor gets a chunk of its own), named ``{group}_{j}``. Each chunk is one flat
    Parameter per anchor."""
    limit = max(1, (_CHUNK_BYTES if max_bytes is None else max_bytes) // group.dtype.itemsize)
    chunks: list[_Group] = []
    for i, numel in enumerate(group.numels):
        if not chunks or chunks[-1].numel + numel > limit:
            chunks.append(_Group(f"{group.name}_{len(chunks)}", group.decay, group.dtype))
        c = chunks[-1]
        c.names.append(group.names[i])
        c.shapes.append(group.shapes[i])
        c.numels.append(numel)
        c.owners.append(group.owners[i])
        c.module_index.append(group.module_index[i])
    return chunks


class _NameList:
    """Parameter names in the one form timm's ``group_parameters`` reads: ``named_parameters()``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def named_parameters(self) -> Iterator[tuple[str, None]]:
        return ((n, None) for n in self.names)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


class Subspace(nn.Module):
    """Base class: a ``torch.nn.Module`` holding K anchors of one network.

    Subclasses define the shape: ``num_anchors``, ``coefficients(point) -> Tensor[..., K]``,
    ``centre()`` and ``sample(generator)``. Forward: ``sub(*args, point=None, **kwargs)`` runs
    the wrapped model at ``w(point)``. An explicit ``point`` wins; else a point fixed with
    :meth:`set_point` / :meth:`at`; else training mode samples a fresh point per forward and eval
    mode uses the centre.

    Args:
        model: the network to wrap (copied; the original is left untouched).
        include / exclude: fnmatch patterns over parameter names (``"head.*"``); only matching
            parameters live in the subspace, the others are shared by all points and trained
            normally. Default: every parameter.
        sampling: ``"global"`` (one point per forward), ``"layerwise"`` (an independent point per
            module, [W]) or ``"arc_length"`` (curves only: t drawn with density proportional to
            ``||w'(t)||``, refreshed every ``arc_length_every`` training forwards).
        seed: seed of the subspace's own ``torch.Generator`` for point draws (saved in the
            state_dict, so draws continue identically after a resume). Under DDP give each rank
            a different seed for different points per rank (more samples of E_t[loss] per step)
            or the same seed for identical points on all ranks.
        init: from-scratch anchors: ``"reinit"`` (default: every module's ``reset_parameters()``
            then the model's ``init_weights()``; a non-constant parameter that none of them
            re-draws is shuffled, with a warning naming it) or a callable ``init(model_copy)``.
        layout: ``"flat"`` (default: per anchor, the parameters of a (dtype, decay) class end to
            end in chunks of at most 8 MiB; fastest, right for per-element optimisers) or
            ``"per_parameter"`` (one anchor tensor per parameter, in the parameter's own shape,
            for per-tensor optimisers such as LAMB and LARS and for timm's ``layer_decay``;
            :func:`layout_for` picks it from the optimiser).
    """

    num_anchors: int

    def __init__(
        self,
        model: nn.Module,
        num_anchors: int,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        sampling: str = "global",
        seed: int | None = None,
        init: str | InitFn = "reinit",
        arc_length_every: int = 100,
        layout: str = "flat",
        _endpoints: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module to wrap, got {type(model).__name__}")
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling={sampling!r} is not one of {SAMPLING_MODES}")
        if sampling == "arc_length" and not self._is_curve():
            raise ConfigError("sampling='arc_length' is defined for curves (Line, Bezier, PolyChain) only")
        if arc_length_every < 1:
            raise ConfigError(f"arc_length_every must be >= 1, got {arc_length_every}")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r} is not one of {LAYOUTS}")
        self.layout = layout
        self.num_anchors = int(num_anchors)
        self.sampling = sampling
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.arc_length_every = int(arc_length_every)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))
        self._steps = 0
        self._fixed: Tensor | None = None
        self._arc_cdf: tuple[Tensor, Tensor] | None = None

        self.model = copy.deepcopy(model)
        self._groups = self._layout(self.model, include, exclude)
        if not self._groups:
            raise ConfigError(
                "no parameter matched include=/exclude=: the subspace would be empty; check the "
                f"patterns against the model's parameter names (e.g. {self._first_names(model)})"
            )
        sources = self._anchor_sources(model, init, _endpoints)
        self.anchors = nn.ModuleList()
        for tensors in sources:
            pairs = [(g.name, nn.Parameter(t)) for g, t in zip(self._groups, tensors)]
            # ParameterDict sorts a dict's keys ("decay_float32_10" before "_2"); the per-parameter
            # layout keeps the model's order, as Simplex.add_vertex appends in; flat keeps the
            # sorted order that existing checkpoints' optimiser states are indexed by
            self.anchors.append(nn.ParameterDict(pairs if layout == "per_parameter" else dict(pairs)))
        self._detach_from_model()
        for g in self._groups:
            self.register_buffer(f"_modidx_{g.name}", torch.tensor(g.module_index), persistent=False)
        self._rebind_centre()

    # ------------------------------------------------------------------ shape interface
    def coefficients(self, point: Point) -> Tensor:
        """Coefficients c(p) of the anchors at a point: Tensor[..., K], summing to 1."""
        raise NotImplementedError

    def centre(self) -> Tensor:
        """The point used in eval mode when none is fixed (t = 0.5 / the centroid)."""
        raise NotImplementedError

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> Tensor:
        """Draw a point (or ``n`` points) from the shape's sampling distribution."""
        raise NotImplementedError

    def validate_point(self, point: Point) -> Tensor:
        """Return the point as a float tensor, or raise ValueError naming what is wrong."""
        raise NotImplementedError

    @classmethod
    def _is_curve(cls) -> bool:
        return False

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _first_names(model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()][:3]

    def _layout(self, model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[_Group]:
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError("include= / exclude= take a list of patterns, e.g. exclude=['head.*']")
        nwd = getattr(model, "no_weight_decay", None)
        no_decay = set(nwd()) if callable(nwd) else set()
        modules = dict(model.named_modules())
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for full, p in model.named_parameters(remove_duplicate=False):
            mod_name, _, attr = full.rpartition(".")
            owners.setdefault(id(p), []).append((modules[mod_name], attr))
        groups: dict[tuple[torch.dtype, bool], _Group] = {}
        module_ids: dict[str, int] = {}
        for name, p in model.named_parameters():
            if include is not None and not _matches(name, include):
                continue
            if exclude is not None and _matches(name, exclude):
                continue
            if not p.is_floating_point() or not p.requires_grad:   # frozen parameters stay shared and frozen
                continue
            decay = not (p.ndim <= 1 or name.endswith(".bias") or _matches(name, no_decay))
            key = (p.dtype, decay)
            if key not in groups:
                dtype_name = str(p.dtype).removeprefix("torch.")
                groups[key] = _Group(f"{'decay' if decay else 'no_decay'}_{dtype_name}", decay, p.dtype)
            g = groups[key]
            g.names.append(name)
            g.shapes.append(p.shape)
            g.numels.append(p.numel())
            g.owners.append(owners[id(p)])
            g.module_index.append(module_ids.setdefault(name.rpartition(".")[0], len(module_ids)))
        self._num_modules = len(module_ids)
        if self.layout == "flat":
            return [chunk for g in groups.values() for chunk in _split_group(g)]
        chunks = [chunk for g in groups.values() for chunk in _split_group(g, max_bytes=1)]   # one tensor each
        for chunk in chunks:
            chunk.shape = tuple(chunk.shapes[0])
        return chunks

    def _flatten(self, model: nn.Module) -> list[Tensor]:
        params = dict(model.named_parameters())
        out = []
        for g in self._groups:
            try:
                flat = torch.cat([params[n].detach().reshape(-1) for n in g.names])
            except KeyError as err:
                raise ConfigError(f"model has no parameter {err.args[0]!r} that the subspace needs") from err
            out.append(flat.reshape(g.storage_shape()).clone())
        return out

    def _anchor_sources(self, model: nn.Module, init: str | InitFn, endpoints: Sequence[nn.Module] | None) -> list[list[Tensor]]:
        if endpoints is not None:
            return self._connect_sources([self._flatten(m) for m in endpoints])
        if not (init == "reinit" or callable(init)):
            raise ConfigError(f"init={init!r}: use 'reinit' or a callable init(model)")
        original = dict(model.named_parameters())
        wanted = {n for g in self._groups for n in g.names}
        sources, shuffled = [], set()
        for _ in range(self.num_anchors):
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
            sources.append(self._flatten(copy_k))
        if shuffled:
            warnings.warn(
                "no init function of the model re-draws "
                + ", ".join(sorted(shuffled))
                + "; each anchor got a random permutation of its values instead. Pass init=<callable> "
                "to control this, or exclude= these parameters from the subspace.",
                stacklevel=3,
            )
        return sources

    def _connect_sources(self, ends: list[list[Tensor]]) -> list[list[Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} has no connect()")

    def _detach_from_model(self) -> None:
        for g in self._groups:
            for owners in g.owners:
                for module, attr in owners:
                    module._parameters[attr] = None

    # ------------------------------------------------------------------ points
    @torch.compiler.disable
    def _coeffs_for(self, point: Point | None) -> Tensor:
        """Coefficients to use now: Tensor[K] or, for layerwise draws, Tensor[K, num_modules]."""
        if point is not None:
            return self.coefficients(self.validate_point(point))
        if self._fixed is not None:
            return self._fixed
        if not self.training:
            return self.coefficients(self.centre())
        self._check_trainable()
        self._steps += 1
        if self.sampling == "layerwise":
            return self.coefficients(self.sample(self.generator, n=self._num_modules)).T
        if self.sampling == "arc_length":
            return self.coefficients(self._sample_arc_length())
        return self.coefficients(self.sample(self.generator))

    @property
    def points_drawn(self) -> int:
        """Points drawn by training forwards so far (one per forward, or one set per forward for
        layerwise sampling); saved in the state_dict, so it continues after a resume."""
        return self._steps

    def set_point(self, point: Point | None) -> None:
        """Fix the point used by every forward (train or eval) until ``set_point(None)``."""
        self._fixed = None if point is None else self.coefficients(self.validate_point(point))

    @contextlib.contextmanager
    def at(self, point: Point) -> Iterator[Subspace]:
        """Context in which every forward runs at ``point``: ``with sub.at(0.5): sub(x)``."""
        previous = self._fixed
        self.set_point(point)
        try:
            yield self
        finally:
            self._fixed = previous

    def evaluation_point(self, point: Point | None = None) -> contextlib.AbstractContextManager:
        """Context running every forward at ``point``; with None at the fixed point (``set_point``)
        if one is set, else at the centre: where :func:`subspaces.bn.update_bn` recomputes BatchNorm."""
        if point is not None:
            return self.at(point)
        return contextlib.nullcontext(self) if self._fixed is not None else self.at(self.centre())

    def _check_trainable(self) -> None:
        if (
            torch.is_grad_enabled()
            and not any(self.anchor_trainable(k) for k in range(self.num_anchors))
            and not any(p.requires_grad for p in self.model.parameters())   # shared parameters may still train
        ):
            raise RuntimeError(
                "every anchor of this subspace is frozen, so training it changes nothing in the "
                "subspace: call unfreeze_anchor(k), or evaluate under torch.no_grad() / eval()"
            )

    # ------------------------------------------------------------------ arc length
    def speed(self, t: Tensor) -> Tensor:
        """||w'(t)|| at curve points t: Tensor[N] -> Tensor[N], from the K x K Gram of the anchors."""
        gram = self.gram(centred=True).detach()   # sum_k c_k'(t) = 0: the centred Gram gives the same value, exactly
        deriv = torch.func.vmap(torch.func.jacfwd(self.coefficients))(t.double())   # [N, K]
        return torch.einsum("nk,kl,nl->n", deriv, gram, deriv).clamp_min(0).sqrt()

    def _sample_arc_length(self, grid: int = 201) -> Tensor:
        if self._arc_cdf is None or (self._steps - 1) % self.arc_length_every == 0:
            edges = torch.linspace(0, 1, grid, dtype=torch.float64)
            mids = (edges[1:] + edges[:-1]) / 2
            dens = self.speed(mids).cpu()
            if not torch.isfinite(dens).all() or dens.sum() <= 0:
                dens = torch.ones_like(dens)
            self._arc_cdf = (edges, dens)
        edges, dens = self._arc_cdf
        cell = torch.multinomial(dens, 1, generator=self.generator)[0]
        u = torch.rand((), generator=self.generator, dtype=torch.float64)
        return (edges[cell] + u * (edges[cell + 1] - edges[cell])).float()

    # ------------------------------------------------------------------ mixing and binding
    def _mix(self, coeffs: Tensor, pieces: bool = False, pooled: bool = True) -> list[Any]:
        """Mixed weights per group at coefficients Tensor[K] or Tensor[K, num_modules]: one flat
        tensor per group (shaped like the anchors), or with ``pieces=True`` (the forward path) a
        tuple of the group's parameter tensors, shaped, ready to bind. With ``pieces=True`` on
        CPU the weights bound now are unbound and their storage is reused when nothing else
        holds it (see :class:`_Pool`); bind the result. ``pooled=False``: fresh storage that the
        caller may keep (the weights of a point cached for many batches, :meth:`mixed_weights`)."""
        out: list[Any] = []
        steps = _lerp_steps(coeffs)
        pools: dict[str, _Pool] | None = None
        if pieces and pooled and POOLING and not torch.compiler.is_compiling():
            pools = self.__dict__.setdefault("_pools", {})
        try:
            for g in self._groups:
                anchors = [self.anchors[k][g.name] for k in range(self.num_anchors)]
                device = anchors[0].device
                c = coeffs.to(device=device, dtype=g.dtype, non_blocking=True)
                s = steps.to(device=device, dtype=g.dtype, non_blocking=True) if steps is not None else None
                if c.ndim == 2:   # layerwise: the coefficients of the module owning each parameter
                    c = c[:, getattr(self, f"_modidx_{g.name}")]
                pool = None
                if pools is not None and not _eager_cpu(device):
                    pools.pop(g.name, None)   # moved off the CPU: let the CPU buffers go
                elif pools is not None:
                    pool = pools.setdefault(g.name, _Pool())
                    pool.incoming = None   # the last backward's dL/dw: free it now, before this forward allocates
                    if not torch.is_grad_enabled():
                        pool.release_gradients()   # evaluation: hand the gradients' memory back
                    if c.ndim == 2:
                        pool.storages.pop(-1, None)   # layerwise mixing is tensor by tensor: no flat weights
                    for owners in g.owners:   # drop the last weights' views: their storage may be reused
                        for module, attr in owners:
                            module.__dict__.pop(attr, None)
                per_piece = _eager_cpu(device) and g.numel >= _PIECE_NUMEL * len(g.numels)
                mixed = _Mix.apply(tuple(g.numels), tuple(g.shapes), per_piece, pool, s, c, *anchors)
                if not pieces:
                    mixed = torch.cat([m.reshape(-1) for m in mixed]).reshape(g.storage_shape())
                out.append(mixed)
        except BaseException:
            if pools is not None:
                self._rebind_centre()   # never leave the model without weights
            raise
        return out

    def _bind(self, mixed: list[Any], detach: bool = False) -> None:
        """Bind mixed weights (per group: a flat tensor or a tuple of parameter tensors) into
        the owning modules' ``__dict__``."""
        for g, group in zip(self._groups, mixed):
            if isinstance(group, Tensor):
                group = [p.view(shape) for p, shape in zip(torch.split(group.reshape(-1), g.numels), g.shapes)]
            for tensor, owners in zip(group, g.owners):
                if detach:
                    tensor = tensor.detach()
                for module, attr in owners:
                    module.__dict__[attr] = tensor

    @torch.no_grad()
    def mixed_weights(self, coeffs: Tensor) -> list[Any]:
        """The weights at coefficients ``coeffs`` (Tensor[K]), detached, in fresh storage: mixed
        once, to be run on many batches with :meth:`weights_bound` (no mixing per batch). The
        same kernels as a forward at that point, so the same bits."""
        return [tuple(t.detach() for t in group) for group in self._mix(coeffs, pieces=True, pooled=False)]

    @contextlib.contextmanager
    def weights_bound(self) -> Iterator[Callable[[list[Any]], None]]:
        """Context yielding ``bind(weights)``, which binds :meth:`mixed_weights` into the wrapped
        model: ``sub.model(x)`` then runs at that point without mixing. The weights bound last
        stay bound after the context, as a forward's do, until the next forward replaces them
        (nothing else of the pass is kept; a forward inside the context still mixes, as always)."""
        yield lambda weights: self._bind(weights)

    def forward(self, *args: Any, point: Point | None = None, **kwargs: Any) -> Any:
        mixed = self._mix(self._coeffs_for(point), pieces=True)
        self._bind(mixed)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._bind(mixed, detach=True)   # keep no autograd history on the model between calls

    # ------------------------------------------------------------------ anchors
    def _check_k(self, k: int) -> int:
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"anchor index must be an int, got {type(k).__name__}")
        if not -self.num_anchors <= k < self.num_anchors:
            raise IndexError(f"anchor {k} out of range: this subspace has {self.num_anchors} anchors (0..{self.num_anchors - 1})")
        return k % self.num_anchors

    def anchor_parameters(self, k: int) -> list[nn.Parameter]:
        """The flat Parameters of anchor k (one per dtype/decay group)."""
        return list(self.anchors[self._check_k(k)].values())

    def anchor_trainable(self, k: int) -> bool:
        return all(p.requires_grad for p in self.anchor_parameters(k))

    @torch.no_grad()
    def append_centroid_anchor(self) -> int:
        """Freeze every anchor and append a trainable one at their centroid (1/K) sum_k W_k, the
        start of an SPRO vertex or a complex's shared vertex [B]; returns its index, K - 1 after.
        Rebuild the optimiser afterwards: the new anchor's Parameters are new tensors."""
        for k in range(self.num_anchors):
            self.freeze_anchor(k)
        new = nn.ParameterDict()
        for g in self._groups:
            total = self.anchors[0][g.name].detach().clone()
            for k in range(1, self.num_anchors):
                total.add_(self.anchors[k][g.name])
            new[g.name] = nn.Parameter(total.div_(self.num_anchors))
        self.anchors.append(new)
        self.num_anchors += 1
        self._fixed = None
        return self.num_anchors - 1

    def freeze_anchor(self, k: int) -> None:
        """Stop training anchor k (its Parameters get requires_grad=False)."""
        for p in self.anchor_parameters(k):
            p.requires_grad_(False)

    def unfreeze_anchor(self, k: int) -> None:
        for p in self.anchor_parameters(k):
            p.requires_grad_(True)

    def anchor(self, k: int) -> nn.Module:
        """Anchor k as a plain model of the wrapped class (current BatchNorm buffers)."""
        coeffs = torch.zeros(self.num_anchors)
        coeffs[self._check_k(k)] = 1.0
        return self._materialize(coeffs)

    def export(self, point: Point | None = None, bn_loader: Iterable | None = None, bn_batches: int | None = None) -> nn.Module:
        """The network at ``point`` (default: the centre) as an instance of the wrapped model's class.

        Its ``state_dict()`` loads with ``strict=True`` into a fresh model of the same config. With
        ``bn_loader`` its BatchNorm statistics are recomputed there (``bn_batches`` batches at most).
        """
        coeffs = self.coefficients(self.centre() if point is None else self.validate_point(point))
        model = self._materialize(coeffs)
        if bn_loader is not None:
            update_bn(model, bn_loader, max_batches=bn_batches)
        return model

    @torch.no_grad()
    def _materialize(self, coeffs: Tensor) -> nn.Module:
        flats = [f.detach() for f in self._mix(coeffs)]
        bound = []
        for g in self._groups:   # leave the slots empty while copying: no weights copied twice
            for owners in g.owners:
                for module, attr in owners:
                    bound.append((module, attr, module.__dict__.pop(attr, None)))
        try:
            plain = copy.deepcopy(self.model)
        finally:
            for module, attr, tensor in bound:
                if tensor is not None:
                    module.__dict__[attr] = tensor
        modules = dict(plain.named_modules())
        original_modules = {id(m): n for n, m in self.model.named_modules()}
        for g, flat in zip(self._groups, flats):
            for piece, shape, owners in zip(torch.split(flat.reshape(-1), g.numels), g.shapes, g.owners):
                param = nn.Parameter(piece.view(shape).clone())
                for module, attr in owners:
                    modules[original_modules[id(module)]]._parameters[attr] = param
        return plain

    # ------------------------------------------------------------------ geometry
    def gram(self, names: Iterable[str] | None = None, centred: bool = False) -> Tensor:
        """Inner products of the anchors: Tensor[K, K] in float64, differentiable.

        G_ij = <W_i - m, W_j - m> over the subspace parameters in ``names`` (default: all), with
        m = 0, or with ``centred=True`` m = (1/K) sum_k W_k, K chunks at a time (never a K x P
        copy). Centred products are taken in float64, uncentred ones (cosines) in the anchors'
        dtype (float32 for float16 / bfloat16 anchors, autocast off) and summed in float64. Centring keeps distances
        exact for a simplex that is small next to |W| (an SPRO vertex starting at the centroid):
        |W_i - W_j|^2 = G_ii + G_jj - 2 G_ij holds for any m, but float32 products of uncentred
        weights lose every digit of it there.
        """
        selected = None if names is None else set(names)
        if selected is not None:
            unknown = selected - set(self.subspace_parameter_names())
            if unknown:
                raise ValueError(f"gram(names=...): {sorted(unknown)[:3]} are not subspace parameters; see subspace_parameter_names()")
        total: Tensor | None = None
        # Sums of squares of a network's weights exceed float16's 65504; autocast would run the
        # products below in float16 (GPU) or bfloat16, so it is off here and half anchors go float32.
        with torch.autocast(device_type=self.anchors[0][self._groups[0].name].device.type, enabled=False):
            for g in self._groups:
                part = self._gram_of_group(g, selected, centred)
                if part is not None:
                    total = part if total is None else total + part
        if total is None:
            raise ValueError("gram(names=...) selected no parameter of this subspace")
        return total

    def _gram_of_group(self, g: _Group, selected: set[str] | None, centred: bool) -> Tensor | None:
        """One storage group's share of :meth:`gram` (float64 [K, K]), None if none of it is selected."""
        K = self.num_anchors
        if selected is None or selected.issuperset(g.names):
            pieces = [torch.stack([self.anchors[k][g.name].reshape(-1) for k in range(K)])]
        else:
            keep = [i for i, n in enumerate(g.names) if n in selected]
            if not keep:
                return None
            split = [self.anchors[k][g.name].reshape(-1).split(g.numels) for k in range(K)]
            pieces = [torch.stack([split[k][i] for k in range(K)]) for i in keep]
        total: Tensor | None = None
        for stacked in pieces:   # [K, n]
            if centred:
                x = stacked.double()
                x = x - x.mean(0, keepdim=True)
                part = x @ x.T
            else:
                x = stacked.float() if stacked.dtype in (torch.float16, torch.bfloat16) else stacked
                part = (x @ x.T).double()
            total = part if total is None else total + part
        return total

    def weight_names(self) -> list[str]:
        """Subspace parameters that are layer weights: ndim >= 2 and not exempted from weight
        decay by the model's ``no_weight_decay()`` (convolution, linear and attention weights;
        not norms, biases, position embeddings or class tokens). [W]'s cos^2 covers these."""
        return [n for g in self._groups if g.decay for n in g.names]

    def num_subspace_parameters(self) -> int:
        """Number of network parameters that live in the subspace (per anchor)."""
        return sum(g.numel for g in self._groups)

    def subspace_parameter_names(self) -> list[str]:
        return [n for g in self._groups for n in g.names]

    def parameter_origins(self) -> dict[str, list[str]]:
        """For every Parameter of this module (``named_parameters()`` names, frozen ones too), the
        wrapped model's parameter names it holds: one for shared parameters and, with
        ``layout="per_parameter"``, for anchors; every name of the chunk for flat anchors."""
        origins = {f"anchors.{k}.{g.name}": list(g.names) for k in range(self.num_anchors) for g in self._groups}
        origins.update({f"model.{n}": [n] for n, _ in self.model.named_parameters()})
        return origins

    def _layer_ids(self, coarse: bool) -> dict[str, int]:
        """The wrapped model's parameter names -> its layer index, as timm's layer decay numbers
        them: the model's ``group_matcher`` when it has one, else timm's fallback (trunk
        parameters in order, 12 to a layer, then the ``pretrained_cfg['classifier']`` head)."""
        names = [f"{m}.{a}" if m else a for m, mod in self.model.named_modules() for a in mod._parameters]
        matcher = getattr(self.model, "group_matcher", None)
        if callable(matcher):
            return group_parameters(_NameList(names), matcher(coarse=coarse), reverse=True)
        head = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier")
        heads = (head,) if isinstance(head, str) else tuple(head or ())
        in_head = [any(n.startswith(h) for h in heads) if heads else True for n in names]
        trunk = [n for n, h in zip(names, in_head) if not h]
        ids = {n: i // 12 for i, n in enumerate(trunk)}
        ids.update({n: -(len(trunk) // -12) for n, h in zip(names, in_head) if h})
        return ids

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm's ``group_matcher`` for this module: a Parameter name -> ``(layer,)``, the layer
        of the wrapped model's parameters it holds (``model.group_matcher``'s numbering), so
        ``create_optimizer_v2(sub, ..., layer_decay=d)`` scales the lr of layer l by
        d^(L - 1 - l) exactly as for the plain model. Needs each anchor tensor to lie in one
        layer: with ``layout="flat"`` a chunk spanning layers raises ConfigError."""
        layer_of = self._layer_ids(coarse)
        last = max(layer_of.values(), default=0)
        table: dict[str, int] = {}
        for name, originals in self.parameter_origins().items():
            layers = {layer_of.get(o, last) for o in originals}
            if len(layers) > 1:
                raise ConfigError(
                    f"{name} holds parameters of {len(layers)} layers (flat layout): build the subspace "
                    "with layout='per_parameter' for layer-wise lr decay"
                )
            table[name] = layers.pop()
        return lambda name: (table.get(name, last),)

    def param_groups(self, weight_decay: float, layer_decay: float | None = None, **timm_kwargs: Any) -> list[dict[str, Any]]:
        """Optimiser parameter groups, timm's rules applied to this module: weight decay
        ``weight_decay`` except for ``no_weight_decay()`` names (the model's own exemptions,
        biases, norms) and 1-d tensors; with ``layer_decay`` d, timm's ``param_groups_layer_decay``
        (group ``lr_scale`` = d^(L - 1 - l) for layer l of the wrapped model, see
        :meth:`group_matcher`). ``timm_kwargs`` go to that timm function. Returns a list of
        ``{"params": [...], "weight_decay": float, ["lr_scale": float]}`` for any torch optimiser
        or ``create_optimizer_v2(sub, opt, param_group_fn=lambda m: m.param_groups(wd, d))``."""
        if weight_decay is None or weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
        if layer_decay is None:
            return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=self.no_weight_decay(), **timm_kwargs)
        if not 0 < layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
        return param_groups_layer_decay(self, weight_decay, no_weight_decay_list=self.no_weight_decay(),
                                        layer_decay=layer_decay, **timm_kwargs)

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay, for timm's create_optimizer_v2: undecayed anchor
        groups, and the wrapped model's own exemptions for its shared parameters."""
        names = {f"anchors.{k}.{g.name}" for k in range(self.num_anchors) for g in self._groups if not g.decay}
        nwd = getattr(self.model, "no_weight_decay", None)
        if callable(nwd):
            names |= {f"model.{n}" for n in nwd()}
        return names

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Tensor:
        """[num_anchors, steps, *generator state] as one int64 tensor (so safetensors can hold it)."""
        return torch.cat([torch.tensor([self.num_anchors, self._steps]), self.generator.get_state().long()])

    def set_extra_state(self, state: Tensor) -> None:
        if not isinstance(state, Tensor) or state.ndim != 1 or state.numel() < 3:
            raise ValueError("this state_dict's '_extra_state' is not a subspace's (point generator state expected)")
        if int(state[0]) != self.num_anchors:
            raise ValueError(
                f"checkpoint has {int(state[0])} anchors but this {type(self).__name__} has "
                f"{self.num_anchors}; build the subspace with the same shape before loading"
            )
        self._steps = int(state[1])
        self.generator.set_state(state[2:].to(torch.uint8))
        self._arc_cdf = None

    def _rebind_centre(self) -> None:
        """Show the centre's weights on the wrapped model between forwards (after loads and moves)."""
        with torch.no_grad():
            self._bind(self._mix(self.coefficients(self.centre())), detach=True)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._rebind_centre()
        return result

    def _apply(self, fn: Any, recurse: bool = True) -> Subspace:
        super()._apply(fn, recurse)
        if hasattr(self, "anchors"):
            self._rebind_centre()
        return self

    def extra_repr(self) -> str:
        return (
            f"num_anchors={self.num_anchors}, sampling={self.sampling!r}, "
            f"subspace_parameters={self.num_subspace_parameters():,}, groups={[g.name for g in self._groups]}"
        )
