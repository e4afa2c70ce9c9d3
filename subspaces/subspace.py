"""The subspace wrapper: K anchor weight sets of one network, mixed into the weights at a point.

    w(p) = sum_k c_k(p) * W_k          (the same coefficients c(p) for every parameter tensor)

:class:`Subspace` composes the pieces, each with its math and contract in its own module:

- :mod:`subspaces.anchor_store`: which parameters live in the subspace, their layouts (flat
  chunks or per parameter, :func:`layout_for`) and the anchors' initialisation;
- :mod:`subspaces.mixing` (with :mod:`subspaces.buffer_pool` on the CPU): w(p) from the anchors,
  and binding it into the wrapped model for a forward;
- :mod:`subspaces.sampling`: the training points (global, layerwise, arc length);
- :mod:`subspaces.geometry`: the anchors' Gram matrix, distances and volumes;
- :mod:`subspaces.export`: the network at a point as a plain model;
- :mod:`subspaces.optimizer_groups`: timm's optimiser protocol (weight decay, layer decay).

The shapes (line, curves, simplex) are subclasses in :mod:`subspaces.shapes`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from . import anchor_store, geometry, mixing
from . import sampling as sampling_mod
from .anchor_store import LAYOUTS, InitFn, layout_for
from .bn import update_bn
from .buffer_pool import pooling_available
from .errors import ConfigError, ConfigTypeError
from .export import materialize
from .optimizer_groups import TimmOptimizerProtocol
from .sampling import SAMPLING_MODES

__all__ = ["LAYOUTS", "POOLING", "SAMPLING_MODES", "InitFn", "Point", "Subspace", "layout_for"]

Point = Union[float, Sequence[float], Tensor]

#: whether the CPU buffer pool is used (see :class:`subspaces.buffer_pool.BufferPool`): a switch,
#: set False to turn it off (same results, slower on the CPU); ``analysis/bench.py --pool both``
#: times both, and ``tests/test_bench.py`` fails if it is off while torch has the call it needs
POOLING = pooling_available()


class Subspace(TimmOptimizerProtocol, nn.Module):
    """Base class: a ``torch.nn.Module`` holding K anchors of one network.

    Subclasses define the shape: ``num_anchors``, ``coefficients(point) -> Tensor[..., K]``,
    ``centre()`` and ``sample(generator)``. Forward: ``sub(*args, point=None, **kwargs)`` runs
    the wrapped model at ``w(point)``. An explicit ``point`` wins; else a point fixed with
    :meth:`set_point` / :meth:`at`; else training mode samples a fresh point per forward and eval
    mode uses the centre. Between forwards the wrapped model shows the last forward's weights
    (after construction and ``load_state_dict``: the centre's; after ``.to()`` / ``.half()``:
    the next forward's, in the new place).

    Args:
        model: the network to wrap (copied; the original is left untouched).
        include / exclude: fnmatch patterns over parameter names (``"head.*"``); only matching
            parameters live in the subspace, the others are shared by all points and trained
            normally. Default: every parameter.
        sampling: ``"global"`` (one point per forward), ``"layerwise"`` (a point per module, [W])
            or ``"arc_length"`` (curves: t with density ``||w'(t)||``, see :mod:`subspaces.sampling`).
        seed: seed of the subspace's own ``torch.Generator`` for point draws (saved in the
            state_dict, so draws continue identically after a resume). Under DDP give each rank
            a different seed for different points per rank (more samples of E_t[loss] per step)
            or the same seed for identical points on all ranks.
        init: from-scratch anchors: ``"reinit"`` (default: every module's ``reset_parameters()``
            then the model's ``init_weights()``; a non-constant parameter that none of them
            re-draws is shuffled, with a warning naming it) or a callable ``init(model_copy)``.
        layout: ``"flat"`` (default; fastest, for per-element optimisers) or ``"per_parameter"``
            (for per-tensor optimisers and timm's ``layer_decay``): see :mod:`subspaces.anchor_store`.

    Bad input raises :class:`~subspaces.errors.ConfigError` (a ``ConfigTypeError``, also a
    ``TypeError``, for an input of the wrong type).
    """

    num_anchors: int
    #: the memory format the 4-D weights of a point are bound in (:meth:`use_memory_format`);
    #: None: as mixed, contiguous
    weight_format: torch.memory_format | None = None

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
            raise ConfigTypeError(f"expected an nn.Module to wrap, got {type(model).__name__}")
        sampling_mod.check_sampling(sampling, self._is_curve(), arc_length_every)
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r} is not one of {LAYOUTS}")
        self.layout, self.num_anchors, self.sampling = layout, int(num_anchors), sampling
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.arc_length_every = int(arc_length_every)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))
        self._steps = 0
        self._fixed: Tensor | None = None   # coefficients of the point fixed by set_point / at
        self._arc_cdf: tuple[Tensor, Tensor] | None = None

        self.model = copy.deepcopy(model)
        self.model_parameter_names = [n for n, _ in self.model.named_parameters()]   # as the plain model lists them
        self._groups, self._num_modules = anchor_store.build_groups(self.model, include, exclude, layout)
        if _endpoints is not None:
            sources = self._connect_sources([anchor_store.flatten(m, self._groups) for m in _endpoints])
        else:
            sources = anchor_store.initial_anchors(model, self._groups, self.num_anchors, init)
        self.anchors = nn.ModuleList(anchor_store.anchor_dict(self._groups, tensors, layout) for tensors in sources)
        anchor_store.empty_slots(self._groups)
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

    def _connect_sources(self, ends: list[list[Tensor]]) -> list[list[Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} has no connect()")

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
            if self._arc_cdf is None or (self._steps - 1) % self.arc_length_every == 0:
                self._arc_cdf = sampling_mod.arc_length_density(self.speed)
            return self.coefficients(sampling_mod.draw_from_density(*self._arc_cdf, self.generator))
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
        with self.at_coefficients(self.coefficients(self.validate_point(point))):
            yield self

    @contextlib.contextmanager
    def at_coefficients(self, coeffs: Tensor) -> Iterator[Subspace]:
        """Context in which every forward runs at w = sum_k coeffs[k] W_k (coeffs: Tensor[K],
        already checked by the caller), then the point fixed before it again."""
        previous, self._fixed = self._fixed, coeffs
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

    def speed(self, t: Tensor) -> Tensor:
        """||w'(t)|| at curve points t: Tensor[N] -> Tensor[N] (:func:`subspaces.sampling.speed`)."""
        return sampling_mod.speed(self.coefficients, self.gram(centred=True).detach(), t)

    # ------------------------------------------------------------------ mixing and binding
    def _mix(self, coeffs: Tensor, pieces: bool = False, pooled: bool = True) -> list[Any]:
        """:func:`subspaces.mixing.mix` of this subspace's anchors at coefficients Tensor[K] or
        Tensor[K, num_modules]. With ``pieces=True`` and ``pooled=True`` on the CPU the buffer pool
        (switch :data:`POOLING`) is used; ``pooled=False``: fresh storage the caller may keep."""
        pools = None
        if pieces and pooled and POOLING and not torch.compiler.is_compiling():
            pools = self.__dict__.setdefault("_pools", {})   # a plain dict: copies start without it
        index = [self.get_buffer(f"_modidx_{g.name}") for g in self._groups] if coeffs.ndim == 2 else None
        try:
            return mixing.mix(self._groups, self.anchors, coeffs, index, pieces=pieces, pools=pools)
        except BaseException:
            if pools is not None:
                self._rebind_centre()   # the pool unbound the weights: never leave the model without any
            raise

    def _bind(self, mixed: list[Any], detach: bool = False) -> None:
        mixing.bind(self._groups, mixed, detach=detach, memory_format=None if detach else self.weight_format)

    def use_memory_format(self, memory_format: torch.memory_format | None) -> Subspace:
        """Bind the 4-D weights of each point in ``memory_format`` (``torch.channels_last``: the
        convolutions run in NHWC, as timm's ``--channels-last`` runs a plain model; one copy of
        those weights per forward, differentiable) and convert the wrapped model's own 4-D
        parameters and buffers (those outside the subspace). The anchors keep their storage, so
        checkpoints and values do not change; None: bind the mixed weights as they are. Returns self."""
        self.weight_format = memory_format
        if memory_format is not None:
            self.model.to(memory_format=memory_format)
        return self

    def _rebind_centre(self) -> None:
        """Show the centre's weights on the wrapped model between forwards."""
        with torch.no_grad():
            self._bind(self._mix(self.coefficients(self.centre())), detach=True)

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
    def check_anchor_index(self, k: int) -> int:
        """``k`` as an anchor index in 0..K-1 (negative counts from the end); TypeError / IndexError else."""
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"anchor index must be an int, got {type(k).__name__}")
        if not -self.num_anchors <= k < self.num_anchors:
            raise IndexError(f"anchor {k} out of range: this subspace has {self.num_anchors} anchors (0..{self.num_anchors - 1})")
        return k % self.num_anchors

    _check_k = check_anchor_index

    def anchor_parameters(self, k: int) -> list[nn.Parameter]:
        """The Parameters of anchor k (one per storage group)."""
        return list(self.anchors[self.check_anchor_index(k)].values())

    def anchor_trainable(self, k: int) -> bool:
        return all(p.requires_grad for p in self.anchor_parameters(k))

    def append_centroid_anchor(self) -> int:
        """Freeze every anchor and append a trainable one at their centroid (1/K) sum_k W_k, the
        start of an SPRO vertex or a complex's shared vertex [B]; returns its index, K - 1 after.
        Rebuild the optimiser afterwards: the new anchor's Parameters are new tensors."""
        for k in range(self.num_anchors):
            self.freeze_anchor(k)
        self.anchors.append(anchor_store.centroid_anchor(self._groups, list(self.anchors)))
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

    @property
    def storage_groups(self) -> list[anchor_store.AnchorGroup]:
        """The anchors' storage groups (each anchor holds one tensor per group, named by it)."""
        return self._groups

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

    # ------------------------------------------------------------------ export and geometry
    def anchor(self, k: int) -> nn.Module:
        """Anchor k as a plain model of the wrapped class (current BatchNorm buffers)."""
        coeffs = torch.zeros(self.num_anchors)
        coeffs[self.check_anchor_index(k)] = 1.0
        return self.network_at(coeffs)

    def export(self, point: Point | None = None, bn_loader: Iterable | None = None, bn_batches: int | None = None) -> nn.Module:
        """The network at ``point`` (default: the centre) as an instance of the wrapped model's class.

        Its ``state_dict()`` loads with ``strict=True`` into a fresh model of the same config. With
        ``bn_loader`` its BatchNorm statistics are recomputed there (``bn_batches`` batches at most).
        """
        model = self.network_at(self.coefficients(self.centre() if point is None else self.validate_point(point)))
        if bn_loader is not None:
            update_bn(model, bn_loader, max_batches=bn_batches)
        return model

    @torch.no_grad()
    def network_at(self, coeffs: Tensor) -> nn.Module:
        """The plain model at w = sum_k coeffs[k] W_k (coeffs: Tensor[K]), its BatchNorm buffers
        as the subspace holds them (see :meth:`export` to recompute them)."""
        return materialize(self.model, self._groups, [f.detach() for f in self._mix(coeffs)])

    def gram(self, names: Iterable[str] | None = None, centred: bool = False) -> Tensor:
        """Inner products of the anchors over the subspace parameters ``names`` (default: all):
        Tensor[K, K] in float64, differentiable; see :func:`subspaces.geometry.gram`."""
        return geometry.gram(self._groups, self.anchors, None if names is None else set(names), centred)

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

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._rebind_centre()
        return result

    def extra_repr(self) -> str:
        return (
            f"num_anchors={self.num_anchors}, sampling={self.sampling!r}, "
            f"subspace_parameters={self.num_subspace_parameters():,}, groups={[g.name for g in self._groups]}"
        )
