"""A test-only plugin, outside the package: one toy shape and one toy compared method, registered
on import. ``SUBSPACES_PLUGINS=toy_plugin recipes/compare.py --methods ind,toy`` trains it (the
module must be importable: tests/ on the Python path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

import subspaces as ss
from subspaces.io import load_subspace
from subspaces.method_registry import CompareMethod, Member, RowName, register_method
from subspaces.methods.common import member_seed
from subspaces.shape_registry import register_shape


class ToyCubic(ss.Bezier):
    """The toy shape: a Bezier curve of degree 3 with no flag of its own (K = 4 anchors)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, degree=3, **kwargs)


class ToyMethod(CompareMethod):
    """The toy method: one toy cubic trained from scratch for B epochs; one row, its midpoint at 1B."""

    rows = (RowName("toy_midpoint", "Toy cubic midpoint"),)

    def members(self, plan: Any) -> list[Member]:
        return [Member("toy1B", index=1, updates=plan.B * plan.upe, rank=(4, 1))]

    def member(self, plan: Any, name: str) -> Member | None:
        return self.members(plan)[0] if name == "toy1B" else None

    def train(self, runner: Any, member: Member) -> None:
        runner.standard(member.name, member_seed("toy", runner.seed, member.index), runner.plan.B, "toy_cubic")

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        yield "t=0.5000", ctx.at(load_subspace(ctx.folder), 0.5)

    def build_rows(self, plan: Any, rows: Any) -> None:
        rows.put("toy_midpoint", 1, rows.mean([("toy1B", "t=0.5000")]), 1, self.cost(plan, 1))

    def accounting(self, plan: Any, args: Any) -> list[str]:
        return ["Toy(1B): a cubic Bezier curve from scratch trained B epochs; its midpoint: cost 1 x B."]


register_shape("toy_cubic", ToyCubic, curve=True)
register_method("toy", ToyMethod(), seed_offset=70)
