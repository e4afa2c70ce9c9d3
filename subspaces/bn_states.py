"""Per-point BatchNorm buffers (:class:`BNStates`) and the bank that binds one point's buffers into
a network's BatchNorm modules for a forward (:class:`BufferBank`).

For a pass over N points, the modules' ``running_mean`` / ``running_var`` /
``num_batches_tracked`` are bound once to views of one flat tensor per (dtype, device), the
*bank*. Running at point i copies point i's buffers into the bank (one copy per flat tensor when
they are views of flat tensors of the bank's layout, as :meth:`BufferBank.fresh` makes them; one
copy per buffer otherwise) and, after a train-mode forward, the updated statistics back. The
modules' own buffers are bound again when the pass ends. A copy moves the same bits, so the
statistics and outputs are those of running each point's own tensors, at the cost of one or two
copies per point and batch instead of rebinding every buffer of every module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .bn import BATCHNORM_TYPES

__all__ = ["BNStates", "BUFFERS", "BufferBank", "FlatBuffers", "tracked_batchnorms"]

#: the buffers of a BatchNorm module that hold its running statistics
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def tracked_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the BatchNorm modules that keep running statistics (those without use
    batch statistics anyway)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats and m.running_mean is not None]


@dataclass(frozen=True)
class FlatBuffers:
    """One point's buffers as views of flat tensors: ``flats[(dtype, device)]`` Tensor[total] and
    ``views``, the buffers in the bank's slot order (each a view of its flat tensor)."""

    flats: dict[tuple[torch.dtype, torch.device], Tensor]
    views: list[Tensor]


@dataclass
class BNStates:
    """Per-point BatchNorm buffers: ``states[i][module_name][buffer_name]`` (running_mean,
    running_var, num_batches_tracked) for point ``i``; ``batches``: how many batches were averaged;
    ``flat``: for each point, its buffers as :class:`FlatBuffers` when ``states`` holds views of
    them (None: only ``states``)."""

    states: list[dict[str, dict[str, Tensor]]]
    batches: int = 0
    flat: list[FlatBuffers] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.states)


class BufferBank:
    """The running statistics of ``modules`` ((name, BatchNorm module) pairs) as slots of flat
    tensors, one per (dtype, device): :meth:`fresh` makes a point's buffers in that layout,
    :meth:`load` / :meth:`store` copy a point's buffers into / out of the bound modules. Use inside
    :meth:`bound`."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self.slots: list[tuple[str, nn.Module, str, tuple[torch.dtype, torch.device], int, torch.Size]] = []
        self.sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for name, m in modules:
            for buf in BUFFERS:
                t = getattr(m, buf, None)
                if t is None:
                    continue
                key = (t.dtype, t.device)
                offset = self.sizes.get(key, 0)
                self.slots.append((name, m, buf, key, offset, t.shape))
                self.sizes[key] = offset + t.numel()
        self.bank: FlatBuffers | None = None
        self.saved: list[Tensor] = []

    def _allocate(self) -> FlatBuffers:
        flats = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in self.sizes.items()}
        views = [flats[key][offset:offset + math.prod(shape)].view(shape) for _, _, _, key, offset, shape in self.slots]
        return FlatBuffers(flats, views)

    def fresh(self) -> tuple[dict[str, dict[str, Tensor]], FlatBuffers]:
        """A point's buffers as after ``reset_running_stats`` (mean 0, var 1, no batch counted):
        ``({module_name: {buffer_name: Tensor}}, the same as FlatBuffers)``."""
        point = self._allocate()
        state: dict[str, dict[str, Tensor]] = {name: {} for name, _ in self.modules}
        for (name, _, buf, _, _, _), view in zip(self.slots, point.views):
            view.fill_(1 if buf == "running_var" else 0)
            state[name][buf] = view
        return state, point

    def source(self, state: dict[str, dict[str, Tensor]], point: FlatBuffers | None) -> FlatBuffers | dict[str, dict[str, Tensor]]:
        """What :meth:`load` reads for a point: ``point`` if ``state`` still holds exactly its
        views (none rebound since) in this bank's layout, else ``state`` itself. Check once per
        pass, not per batch."""
        if point is None or point.flats.keys() != self.sizes.keys() or len(point.views) != len(self.slots):
            return state
        if any(point.flats[key].numel() != n for key, n in self.sizes.items()):
            return state
        same = all(state[name].get(buf) is view for (name, _, buf, _, _, _), view in zip(self.slots, point.views))
        return point if same else state

    @contextlib.contextmanager
    def bound(self) -> Iterator[BufferBank]:
        """Within: the modules' buffers are the bank's views, from the first :meth:`load` on;
        their own tensors are bound again on exit."""
        try:
            yield self
        finally:
            if self.bank is not None:
                for (_, m, buf, _, _, _), original in zip(self.slots, self.saved):
                    setattr(m, buf, original)
                self.bank = None

    def _bind(self) -> FlatBuffers:
        self.bank = self._allocate()
        self.saved = [getattr(m, buf) for _, m, buf, _, _, _ in self.slots]
        for (_, m, buf, _, _, _), view, original in zip(self.slots, self.bank.views, self.saved):
            view.copy_(original)   # buffers a point's state leaves out keep the module's own values
            setattr(m, buf, view)
        return self.bank

    def load(self, point: FlatBuffers | dict[str, dict[str, Tensor]]) -> None:
        """Make the modules run with a point's buffers: :class:`FlatBuffers` of this bank's layout
        (one copy per flat tensor) or ``{module_name: {buffer_name: Tensor}}`` (one per buffer)."""
        bank = self.bank if self.bank is not None else self._bind()
        if isinstance(point, FlatBuffers):
            for key, flat in bank.flats.items():
                flat.copy_(point.flats[key])
            return
        for (name, _, buf, _, _, _), view in zip(self.slots, bank.views):
            t = point[name].get(buf)
            if t is not None:
                view.copy_(t)

    def store(self, point: FlatBuffers) -> None:
        """Copy the modules' buffers (updated by a train-mode forward) back into ``point``, which
        has this bank's layout."""
        bank = self.bank if self.bank is not None else self._bind()
        for key, flat in bank.flats.items():
            point.flats[key].copy_(flat)
