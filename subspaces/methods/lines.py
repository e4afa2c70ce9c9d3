"""A line from scratch [W], and its layerwise variant (an independent point per layer): a line
trained for kB epochs costs kB (one forward/backward per batch, as a standard network). Its rows
at each subspace budget: the midpoint, the ensemble of its endpoints, and (the plain line) the
ensemble of ``--samples`` evenly spaced points, ends included."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from ..io import load_subspace
from ..ensembles import subspace_points
from ..method_registry import CompareMethod, Member, RowName
from .common import member_seed, point_key


def subspace_member(method: str, plan: Any, name: str) -> Member | None:
    """Member ``{method}{k}B`` of a shape trained from scratch for kB epochs, or None."""
    found = re.fullmatch(rf"{method}(\d+)B", name)
    if not found:
        return None
    k = int(found[1])
    return Member(name, index=k, updates=k * plan.B * plan.upe, rank=(4, k))


def budgets_text(plan: Any) -> str:
    """The subspace budgets, as "1B, 2B"."""
    return ", ".join(f"{k}B" for k in plan.subspace_budgets)


class LineFromScratch(CompareMethod):
    """Members ``line{k}B`` (or ``layerwise{k}B``), one per subspace budget k."""

    def __init__(self, layerwise: bool = False) -> None:
        self.layerwise = layerwise
        self.prefix = "layerwise" if layerwise else "line"
        if layerwise:   # the table's order: endpoints before the midpoint
            self.rows = (RowName("layerwise_endpoints", "Line (layerwise) endpoints (ens.)"),
                         RowName("layerwise_midpoint", "Line (layerwise) midpoint"))
        else:
            self.rows = (RowName("line_midpoint", "Line midpoint"), RowName("line_endpoints", "Line endpoints (ens.)"),
                         RowName("line_points", "Line {samples} points (ens.)"))

    def members(self, plan: Any) -> list[Member]:
        return [subspace_member(self.prefix, plan, f"{self.prefix}{k}B") for k in plan.subspace_budgets]  # type: ignore[misc]

    def member(self, plan: Any, name: str) -> Member | None:
        return subspace_member(self.prefix, plan, name)

    def train(self, runner: Any, member: Member) -> None:
        k, a = member.index, runner.args
        extra: dict[str, Any] = {"beta": a.line_beta}
        if self.layerwise:
            extra["layerwise"] = True
        runner.standard(member.name, member_seed(self.prefix, runner.seed, k), k * runner.plan.B, "line", **extra)

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        line = load_subspace(ctx.folder)
        if self.layerwise:
            ts = [0.0, 0.5, 1.0]
        else:
            ts = sorted({*(float(t) for t in subspace_points(line, "even", ctx.samples)), 0.5})
        for t in ts:
            yield point_key(torch.tensor(t)), ctx.at(line, t)

    def build_rows(self, plan: Any, rows: Any) -> None:
        p = self.prefix
        for k in plan.subspace_budgets:
            m = f"{p}{k}B"
            rows.put(f"{p}_midpoint", k, rows.mean([(m, "t=0.5000")]), 1, self.cost(plan, k))
            rows.put(f"{p}_endpoints", k, rows.mean([(m, "t=0.0000"), (m, "t=1.0000")]), 2, self.cost(plan, k))
            if not self.layerwise:
                n = rows.samples
                even = [point_key(t) for t in torch.linspace(0.0, 1.0, n)] if n > 1 else [point_key(torch.tensor(0.5))]
                rows.put("line_points", k, rows.mean([(m, key) for key in even]), n, self.cost(plan, k))

    def accounting(self, plan: Any, args: Any) -> list[str]:
        sb = budgets_text(plan)
        if self.layerwise:
            return [f"Line, layerwise(kB): a line from scratch with an independent point per layer ([W]'s layerwise variant, beta "
                    f"{args.line_beta:g}) trained k x B epochs: cost k x B; trained at {sb}. Midpoint; endpoints."]
        return [f"Line(kB): a line from scratch ([W], beta {args.line_beta:g}) trained k x B epochs (one forward/backward per batch): "
                f"cost k x B; trained at {sb}. Midpoint t=0.5; ends t=0,1; {args.samples} evenly spaced t (ends included)."]
