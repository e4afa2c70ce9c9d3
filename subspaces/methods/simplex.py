"""A simplex from scratch [W]: ``--simplex-vertices`` vertices trained for kB epochs, cost kB.
Its rows at each subspace budget: the centre, the ensemble of its vertices, and the ensemble of
``--samples`` Dirichlet(1) points (drawn with the replicate's seed, so every run draws the same)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..ensembles import subspace_points
from ..io import load_subspace
from ..method_registry import CompareMethod, Member, RowName
from .common import draw_seed, member_seed
from .lines import budgets_text, subspace_member


class SimplexFromScratch(CompareMethod):
    """Members ``simplex{k}B``, one per subspace budget k."""

    # the table's order: the centre, the samples, the vertices
    rows = (RowName("simplex_centre", "Simplex centre"), RowName("simplex_samples", "Simplex {samples} samples (ens.)"),
            RowName("simplex_vertices", "Simplex vertices (ens.)"))

    def members(self, plan: Any) -> list[Member]:
        return [subspace_member("simplex", plan, f"simplex{k}B") for k in plan.subspace_budgets]  # type: ignore[misc]

    def member(self, plan: Any, name: str) -> Member | None:
        return subspace_member("simplex", plan, name)

    def train(self, runner: Any, member: Member) -> None:
        k, a = member.index, runner.args
        runner.standard(member.name, member_seed("simplex", runner.seed, k), k * runner.plan.B, "simplex",
                        beta=a.simplex_beta, vertices=a.simplex_vertices)

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        sim = load_subspace(ctx.folder)
        yield "centre", ctx.at(sim, None)
        for i, p in enumerate(subspace_points(sim, "ends")):
            yield f"vertex{i}", ctx.at(sim, p)
        gen = torch.Generator().manual_seed(draw_seed("simplex", ctx.seed, member.index))
        for i, p in enumerate(subspace_points(sim, "random", ctx.samples, gen)):
            yield f"sample{i}", ctx.at(sim, p)

    def build_rows(self, plan: Any, rows: Any) -> None:
        for k in plan.subspace_budgets:
            m = f"simplex{k}B"
            vertices = sorted({key.split("/", 1)[1] for key in rows.nets(m) if key.split("/", 1)[1].startswith("vertex")})
            rows.put("simplex_centre", k, rows.mean([(m, "centre")]), 1, self.cost(plan, k))
            rows.put("simplex_vertices", k, rows.mean([(m, v) for v in vertices]), len(vertices), self.cost(plan, k))
            rows.put("simplex_samples", k, rows.mean([(m, f"sample{i}") for i in range(rows.samples)]), rows.samples, self.cost(plan, k))

    def accounting(self, plan: Any, args: Any) -> list[str]:
        return [f"Simplex(kB): a {args.simplex_vertices}-vertex simplex from scratch (beta {args.simplex_beta:g}) trained k x B epochs: "
                f"cost k x B; trained at {budgets_text(plan)}. Centre; vertices; {args.samples} Dirichlet(1) samples."]
