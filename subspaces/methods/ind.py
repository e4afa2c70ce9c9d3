"""Ind: independently trained networks (seeds differ), each B epochs; Ind(kB) is the ensemble of
the first k, cost k x B. Its rows: "Ind" at each budget and "Single network" (the Ind networks
each alone: their metrics' mean). When FGE runs, Ind network 0 also saves FGE's start: its
weights and optimiser state at the pre-training iteration (``ind0/pretrain``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..checkpoint import has_checkpoint, latest_checkpoint, read_progress, remove_checkpoints, save_optimizer_state
from ..errors import ConfigError
from ..io import save_model
from ..method_registry import Member, RowName
from .common import IndexedMembers, log, member_seed

#: FGE's start: the optimiser state (momentum buffers) of Ind network 0 at the pre-training iteration
PRETRAIN_OPTIMIZER = "optimizer.bin"
#: the folder of FGE's start inside Ind network 0's run folder
PRETRAIN = "pretrain"


class Ind(IndexedMembers):
    """Independently trained networks: members ``ind0`` ... ``ind{top-1}``."""

    rows = (RowName("single", "Single network"), RowName("ind", "Ind"))

    prefix = "ind"

    def indexed_member(self, plan: Any, j: int) -> Member:
        # ind0 first: FGE starts from it; the others after the snapshot runs (they are shorter)
        return Member(f"ind{j}", index=j, updates=plan.B * plan.upe, rank=(0,) if j == 0 else (3,))

    def train(self, runner: Any, member: Member) -> None:
        j, plan = member.index, runner.plan
        seed = member_seed("ind", runner.seed, j)
        if j != 0 or "fge" not in plan.methods:
            return runner.standard(member.name, seed, plan.B)
        folder = runner.root / member.name
        pre = folder / PRETRAIN
        P = plan.pretrain_iter
        pre_done = (pre / "model.safetensors").exists() and (pre / PRETRAIN_OPTIMIZER).exists()
        if not (folder / "results.json").exists() and not pre_done and has_checkpoint(folder):
            if read_progress(latest_checkpoint(folder, verify=False))["updates"] >= P:   # type: ignore[arg-type]
                log(f"{folder}: its checkpoint is past iteration {P} but the FGE pre-training checkpoint is missing: training it again")
                remove_checkpoints(folder)

        def save_pretrain(trainer: Any, update: int) -> None:
            if update != P:
                return
            if trainer.accelerator.is_main_process:   # FGE starts from these weights and momentum buffers
                save_model(trainer.unwrapped, pre / "model", {**runner.spec, "pretrain_of": str(folder), "iteration": update})
                save_optimizer_state(trainer.optimizer, pre / PRETRAIN_OPTIMIZER)
            trainer.accelerator.wait_for_everyone()
            log(f"{pre}: weights and optimiser state after iteration {update} ({update / plan.budget_iters:.2f}B) saved for FGE")

        return runner.standard(member.name, seed, plan.B, on_update=save_pretrain)

    def is_trained(self, runner: Any, member: Member) -> bool:
        folder = runner.root / member.name
        done = (folder / "results.json").exists()
        if done and member.index == 0 and "fge" in runner.plan.methods and not (folder / PRETRAIN / "model.safetensors").exists():
            raise ConfigError(f"{folder} is finished but its FGE pre-training checkpoint {folder / PRETRAIN} is missing: "
                              f"delete {folder} to train it again")
        return done

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        yield "net", ctx.recomputed(ctx.folder / "model.safetensors")

    def build_rows(self, plan: Any, rows: Any) -> None:
        for k in plan.budgets:
            rows.put("ind", k, rows.mean([(f"ind{j}", "net") for j in range(k)]), k, self.cost(plan, k))
        first = rows.nets("ind0")
        single = {split: torch.stack([rows.nets(f"ind{j}")[f"{split}/net"] for j in range(max(plan.budgets))])
                  for split in rows.splits if f"{split}/net" in first}
        rows.put("single", 1, single, 1, 1.0)

    def accounting(self, plan: Any, args: Any) -> list[str]:
        return ["Ind(kB): the first k of independently trained networks (different seeds), each B epochs: cost k x B."]
