"""ESPRO [B]: a SPRO simplex grown from each of the first k Ind networks (each added vertex
trained ``--spro-epochs`` epochs), ``--samples`` points sampled from each of the k simplexes;
its cost is kB plus the SPRO epochs, times the points per batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import set_seed

from ..ensembles import subspace_points
from ..errors import ConfigError
from ..io import load_subspace
from ..method_registry import Member, RowName
from ..run_folder import make_accelerator
from ..settings import SPROConfig
from ..spro import grow_simplex
from .common import IndexedMembers, draw_seed, log, member_seed


class ESPRO(IndexedMembers):
    """Members ``spro{j}``: the SPRO simplex of Ind network j, for j < the largest budget."""

    rows = (RowName("espro", "ESPRO"),)

    prefix = "spro"

    def indexed_member(self, plan: Any, j: int) -> Member:
        # each update takes spro_samples_per_step points per batch: that much more time per update
        return Member(f"spro{j}", deps=(f"ind{j}",), index=j, updates=max(0, plan.espro_vertices - 1) * plan.spro_epochs * plan.upe,
                      update_cost=float(max(1, plan.spro_samples_per_step)), rank=(5,))

    def train(self, runner: Any, member: Member) -> None:
        """SPRO [B] from Ind network j: the library's :func:`subspaces.spro.grow_simplex`, one stage per added vertex."""
        j, p = member.index, runner.plan
        folder = runner.root / member.name
        base = runner.root / f"ind{j}" / "model.safetensors"
        seed = member_seed("espro", runner.seed)
        margs = runner.args.member(str(folder), SPROConfig, seed=seed, epochs=p.spro_epochs, checkpoints=[str(base)],
                                   vertices=p.espro_vertices, lr=runner.args.spro_lr, warmup_epochs=0,
                                   volume_lambda=runner.args.spro_volume_lambda, samples_per_step=p.spro_samples_per_step)
        folder.mkdir(parents=True, exist_ok=True)
        log(f"{folder}: SPRO from ind{j}, {p.espro_vertices} vertices, {p.spro_epochs} epochs per vertex")
        set_seed(seed + j)
        # the replicate's images, as every other member: SPRO's own data would be drawn with its seed
        grow_simplex(margs, str(base), folder, make_accelerator(margs, project_dir=folder), j, data=runner.data, evaluate=False)

    def is_trained(self, runner: Any, member: Member) -> bool:
        return (runner.root / member.name / f"vertex{runner.plan.espro_vertices - 1}" / "subspace.safetensors").exists()

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        sim = load_subspace(ctx.folder / f"vertex{ctx.plan.espro_vertices - 1}")
        gen = torch.Generator().manual_seed(draw_seed("espro", ctx.seed, member.index))
        for i, p in enumerate(subspace_points(sim, "random", ctx.samples, gen)):
            yield f"sample{i}", ctx.at(sim, p)

    def build_rows(self, plan: Any, rows: Any) -> None:
        n = rows.samples
        for k in plan.budgets:
            rows.put("espro", k, rows.mean([(f"spro{j}", f"sample{i}") for j in range(k) for i in range(n)]), k * n, self.cost(plan, k))

    def cost(self, plan: Any, k: int) -> float:
        """k x (1 + the SPRO epochs of one simplex in B)."""
        return k * (1 + plan.spro_cost)

    def derive(self, args: Any, B: int, upe: int, budgets: list[int], pretrain_iter: int) -> tuple[dict[str, Any], list[str]]:
        top = max(budgets)
        if args.espro_vertices < 2:
            raise ConfigError(f"--espro-vertices {args.espro_vertices}: a SPRO simplex needs at least 2 vertices (the Ind network and one more)")
        if args.spro_epochs < 1 or args.spro_samples_per_step < 1:
            raise ConfigError(f"--spro-epochs and --spro-samples-per-step must be >= 1, got {args.spro_epochs} and {args.spro_samples_per_step}")
        if args.spro_lr <= 0 or args.spro_volume_lambda < 0:
            raise ConfigError(f"--spro-lr must be > 0 and --spro-volume-lambda >= 0, got {args.spro_lr} and {args.spro_volume_lambda}")
        per_vertex = args.spro_epochs * args.spro_samples_per_step / B   # in B: one added vertex of one SPRO simplex
        if 1 + (args.espro_vertices - 1) * per_vertex > top:   # ESPRO(1): one Ind network and its simplex
            fit = 1 + int((top - 1) / per_vertex + 1e-9)
            hint = f"use --espro-vertices <= {fit}" if fit >= 2 else "lower --spro-epochs / --spro-samples-per-step"
            raise ConfigError(f"--espro-vertices {args.espro_vertices} x --spro-epochs {args.spro_epochs} x --spro-samples-per-step "
                              f"{args.spro_samples_per_step} cost {1 + (args.espro_vertices - 1) * per_vertex:g}B for one network's simplex, "
                              f"above the largest budget {top}B: {hint}, or raise --budgets")
        return {"espro_vertices": args.espro_vertices, "spro_epochs": args.spro_epochs, "spro_samples_per_step": args.spro_samples_per_step}, []

    def accounting(self, plan: Any, args: Any) -> list[str]:
        return [f"ESPRO(k) [B]: from each of the first k Ind networks a SPRO simplex of {plan.espro_vertices} vertices, each added vertex "
                f"trained {plan.spro_epochs} epochs (lr {args.spro_lr:g}, {plan.spro_samples_per_step} point(s) per batch, volume lambda "
                f"{args.spro_volume_lambda:g} on [B]'s scale); {args.samples} points sampled from each simplex: cost k x (1 + "
                f"{plan.spro_cost:.3f}) x B."]
