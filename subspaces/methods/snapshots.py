"""The snapshot methods [G]: SSE, FGE and SWA of the FGE snapshots.

- **SSE**: one network from scratch with cosine annealing restarted every cycle; SSE(kB) is the
  ensemble of the snapshots taken by iteration k·B·(updates per epoch), cost k x B.
- **FGE**: Ind network 0's weights and optimiser state at 0.8B, then short cycles; FGE(kB) is
  the ensemble of the snapshots taken by iteration k·B·upe counted from the start of that
  network, so it pays for its 0.8B of pre-training.
- **SWA**: the FGE(kB) snapshots averaged in weight space, BatchNorm recomputed: the cost of
  FGE(kB). It trains nothing: the FGE member saves the averages beside its snapshots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from accelerate.utils import set_seed

from ..checkpoint import has_checkpoint
from ..errors import ConfigError
from ..io import load_model
from ..method_registry import CompareMethod, Member, RowName
from ..run_folder import make_accelerator
from ..snapshots import cycle_iterations, is_finished, list_snapshots, swa_average, train_snapshots, validate_cycle
from ..training import create_timm_model
from .common import log, member_seed
from .ind import PRETRAIN, PRETRAIN_OPTIMIZER


def snapshot_count(plan: Any, method: str, k: int, iterations: list[int]) -> int:
    """How many of the snapshots taken at ``iterations`` belong to ``method``'s ensemble at kB."""
    return plan.fge_count(k, iterations) if method == "fge" else plan.sse_count(k, iterations)


class Snapshots(CompareMethod):
    """SSE or FGE: one member, named as the method, whose snapshots make the row at each budget."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.rows = (RowName(method, method.upper()),)

    def members(self, plan: Any) -> list[Member]:
        return [self._member(plan)]

    def member(self, plan: Any, name: str) -> Member | None:
        return self._member(plan) if name == self.method else None

    def _member(self, plan: Any) -> Member:
        if self.method == "fge":   # its own run starts from the pre-trained network at update 0
            return Member("fge", deps=("ind0",), updates=plan.fge_epochs * plan.upe, rank=(2,))
        return Member("sse", updates=plan.sse_epochs * plan.upe, rank=(1,))

    def train(self, runner: Any, member: Member) -> None:
        folder = runner.root / self.method
        p, a = runner.plan, runner.args
        seed = member_seed(self.method, runner.seed)
        epochs = p.fge_epochs if self.method == "fge" else p.sse_epochs
        margs = a.member(str(folder), seed=seed, epochs=epochs)
        accelerator = make_accelerator(margs, project_dir=folder)
        set_seed(seed)
        resume = has_checkpoint(folder)
        if self.method == "fge":
            pre = runner.root / "ind0" / PRETRAIN
            model = load_model(pre / "model.safetensors")
            log(f"{folder}: FGE from {pre}, {epochs} epochs, cycle {p.fge_cycle} iterations" + (" (resuming)" if resume else ""))
            res = train_snapshots("fge", margs, model, runner.data, runner.spec, folder, cycle=p.fge_cycle, lr_max=a.fge_lr_max,
                                  lr_min=a.fge_lr_min, optimizer_state=pre / PRETRAIN_OPTIMIZER, accelerator=accelerator,
                                  info={"start": str(pre), "start_iteration": p.pretrain_iter}, final_evaluation=False)
        else:
            model, _ = create_timm_model(margs, runner.spec["num_classes"], runner.spec["in_chans"])
            lr_max = a.sse_lr_max if a.sse_lr_max is not None else a.lr
            log(f"{folder}: SSE from scratch, {epochs} epochs, cycle {p.sse_cycle} iterations, seed {seed}" + (" (resuming)" if resume else ""))
            res = train_snapshots("sse", margs, model, runner.data, runner.spec, folder, cycle=p.sse_cycle, lr_max=lr_max, accelerator=accelerator,
                                  final_evaluation=False)
        log(f"{folder}: {len(res['snapshots'])} snapshots")

    def is_trained(self, runner: Any, member: Member) -> bool:
        return is_finished(runner.root / member.name)

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        plan = ctx.plan
        snaps = list_snapshots(ctx.folder)
        its = [s.iteration for s in snaps]
        count = lambda k: snapshot_count(plan, self.method, k, its)  # noqa: E731
        for s in snaps[:count(max(plan.budgets))]:   # saved with BatchNorm recomputed at their weights
            yield f"snapshot{s.iteration}", (lambda path=s.path: load_model(path))
        if self.method == "fge" and "swa" in plan.methods:   # SWA's networks, from these snapshots
            for k in plan.budgets:
                if count(k):
                    paths = [s.path for s in snaps[:count(k)]]
                    yield f"swa{k}B", (lambda paths=paths: swa_average(paths, ctx.bn, ctx.bn_batches))

    def build_rows(self, plan: Any, rows: Any) -> None:
        its = [s.iteration for s in list_snapshots(rows.root / self.method)]
        for k in plan.budgets:
            n = snapshot_count(plan, self.method, k, its)
            if n:
                rows.put(self.method, k, rows.mean([(self.method, f"snapshot{i}") for i in its[:n]]), n, self.cost(plan, k))

    def derive(self, args: Any, B: int, upe: int, budgets: list[int], pretrain_iter: int) -> tuple[dict[str, Any], list[str]]:
        Bi, top = B * upe, max(budgets)
        if self.method == "sse":
            if args.sse_cycle is None and args.sse_cycle_iters is None:
                sse_cycle = max(1, Bi // 2)   # two snapshots per B
            else:
                sse_cycle = cycle_iterations("sse", upe, args.sse_cycle, args.sse_cycle_iters)
            validate_cycle("sse", sse_cycle, top * Bi, budget_iters=Bi)
            return {"sse_cycle": sse_cycle, "sse_epochs": top * B}, []
        left = Bi - pretrain_iter
        if args.fge_cycle is None and args.fge_cycle_iters is None:
            # four cycles in the FGE part of 1B (fewer when they do not fit): on the default compare a
            # cycle of 156 iterations gave FGE(1B) 11.07 % against 11.33 % with 314 (docs/compare.md)
            fge_cycle = max(2, 2 * (left // 8))
        else:
            fge_cycle = cycle_iterations("fge", upe, args.fge_cycle, args.fge_cycle_iters)
        validate_cycle("fge", fge_cycle, top * Bi - pretrain_iter, budget_iters=left)
        if not args.fge_lr_max > args.fge_lr_min >= 0:
            raise ConfigError(f"FGE needs --fge-lr-max > --fge-lr-min >= 0, got {args.fge_lr_max} and {args.fge_lr_min}")
        fge_epochs = math.ceil((top * Bi - pretrain_iter) / upe)
        notes = []
        if fge_epochs * upe + pretrain_iter > top * Bi:
            notes.append(f"the FGE run trains {fge_epochs * upe + pretrain_iter - top * Bi} iterations past {top}B (whole epochs); "
                         "snapshots there are not used")
        return {"fge_cycle": fge_cycle, "fge_epochs": fge_epochs}, notes

    def accounting(self, plan: Any, args: Any) -> list[str]:
        Bi, u = plan.budget_iters, plan.upe
        if self.method == "sse":
            return [f"SSE(kB): one run from scratch, cosine from lr {args.sse_lr_max or args.lr:g} restarted every {plan.sse_cycle} iterations "
                    f"({plan.sse_cycle / u:.2f} epochs); the snapshots taken by iteration k x {Bi}: cost k x B."]
        return [f"FGE(kB): Ind network 0 at iteration {plan.pretrain_iter} ({args.fge_pretrain:g}B, its checkpoint and momentum), then "
                f"lr {args.fge_lr_max:g} -> {args.fge_lr_min:g} cycles of {plan.fge_cycle} iterations ({plan.fge_cycle / u:.2f} epochs), "
                f"snapshot at mod(i, {plan.fge_cycle}) = {plan.fge_cycle // 2}; the snapshots taken by iteration k x {Bi} counted from the "
                f"network's start: cost k x B, the {args.fge_pretrain:g}B pre-training included."]


class SWA(CompareMethod):
    """The FGE(kB) snapshots averaged in weight space; its networks are saved by the FGE member."""

    rows = (RowName("swa", "SWA"),)
    needs = ("fge", "averages the FGE snapshots")

    def build_rows(self, plan: Any, rows: Any) -> None:
        its = [s.iteration for s in list_snapshots(rows.root / "fge")]
        for k in plan.budgets:
            n = plan.fge_count(k, its)
            if n:
                rows.put("swa", k, rows.mean([("fge", f"swa{k}B")]), n, self.cost(plan, k))

    def accounting(self, plan: Any, args: Any) -> list[str]:
        return ["SWA(kB): the FGE(kB) snapshots averaged in weight space, BatchNorm recomputed: cost k x B."]
