"""The comparison protocol of [G]'s Table 1 at training budgets 1B, 2B, 3B (docs/science.md).

B is the number of epochs of one standard network. At a budget kB:

- **Ind**: the ensemble of the first k of independently trained networks (seeds differ), k x B.
- **SSE**: one network from scratch with cosine annealing restarted every cycle; the snapshots
  taken by iteration k·B·(updates per epoch).
- **FGE**: the checkpoint of Ind network 0 at 0.8B (with its optimiser state) followed by
  cycles; the snapshots taken by iteration k·B·upe counted from the start of that network, so
  FGE(kB) pays for its 0.8B of pre-training.
- **SWA**: the FGE(kB) snapshots averaged in weight space, BatchNorm recomputed: the cost of FGE(kB).
- **Line** / **Simplex** from scratch [W]: a shape trained for kB epochs costs kB (one
  forward/backward per batch, as a standard network); its midpoint / centre, the ensemble of its
  endpoints / vertices, and the ensemble of points on it.
- **ESPRO** [B]: a SPRO simplex grown from each of the first k Ind networks, points sampled from
  all k simplexes; its cost is kB plus the SPRO epochs (times the points per batch).

Every member trains on the same images (the compare's data seed draws the training subset, the
validation split held out of it, and the test subset once; members differ only in their own
seeds), and every row is evaluated on the validation split and the test split. Every evaluated
network has its BatchNorm statistics recomputed at its own weights first (on training images),
the Ind networks included, and every ensemble averages probabilities.

Members are independent runs, each a run folder under ``OUTPUT/seedR/`` with its own checkpoints,
trained by one process each: ``--jobs`` of them at a time in worker processes (``--threads``
torch threads each), or, under ``torchrun`` / ``accelerate launch --num_processes N``, shared out
between the ranks (each claims the next member whose inputs are ready). Every member trains
alone, so the plan (global batch, updates per epoch, snapshot counts) is the same under any
launcher. A stopped compare run started again skips finished members and resumes unfinished ones.
Each member predicts with its own networks where it trained (:mod:`subspaces.compare_eval`);
this process only averages the saved probabilities into rows. Results: a table with 95 %
bootstrap intervals and the papers' claims checked on the test predictions with paired intervals
and three-way verdicts (:mod:`subspaces.claims`, :mod:`subspaces.stats`), on the console and in
``results.md``, ``results.json``, ``results.csv``, ``results.png`` in OUTPUT, and each
replicate's probabilities in ``seedR/predictions.safetensors``. The plan is
:mod:`subspaces.compare_plan`, the members' training :mod:`subspaces.compare_run`, the tables
:mod:`subspaces.compare_report`; this module runs the job.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from accelerate.logging import get_logger

from .claims import cell_name, check_claims, render_claims
from .compare_eval import PREDICTIONS, Rows, per_example_losses, replicate_rows, row_metrics, save_replicate_predictions, split_labels
from .compare_figure import budget_figure
from .compare_plan import JOB_KEYS, OFFSETS, SEED_STRIDE, Plan, accounting, make_plan, protocol_of
from .compare_report import aggregate, render_csv, render_markdown, rich_table, row_rank
from .compare_run import Runner, Task, default_jobs, log, run_members, train_seconds
from .data import data_record
from .errors import ConfigError
from .io import write_json
from .run_folder import describe_input, prepare_run, write_run_config
from .settings import METHODS, CompareConfig
from .stats import Bootstrap, Interval
from .training import build_data_and_model

#: the job's figure: test error and NLL against the budget
FIGURE = "results.png"
#: resamples of the bootstrap intervals (cells and claims share them)
BOOTSTRAP_RESAMPLES = 2000

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

__all__ = [
    "JOB_KEYS", "METHODS", "OFFSETS", "SEED_STRIDE", "Plan", "Runner", "Task", "accounting",
    "aggregate", "check_protocol", "evaluate_replicate", "make_plan", "protocol_of", "row_rank", "run_compare",
]


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_replicate(plan: Plan, args: CompareConfig, root: Path, labels: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Rows]:
    """Metrics of every row at every budget of one replicate, from its members' saved predictions:
    ``{"rows": {row: {"kB": {test metrics, val_ metrics, members, cost}}}, "train_seconds": ...}``
    (rows by identifier: :func:`shown` names them for the files), and the rows' probabilities
    (:class:`~subspaces.compare_eval.Rows`)."""
    rows = replicate_rows(plan, args.samples, root)
    table: dict[str, dict[str, Any]] = {}
    for row, k in rows.keys():
        cell: dict[str, Any] = {}
        for split, prefix in (("test", ""), ("val", "val_")):
            if (row, k) in rows.probs.get(split, {}):
                cell.update({prefix + key: v for key, v in row_metrics(rows.probs[split][(row, k)], labels[split]).items()})
        table.setdefault(row, {})[f"{k}B"] = {**cell, "members": rows.members[(row, k)], "cost": rows.cost[(row, k)]}
    costs = {member.name: round(train_seconds(member), 1) for member in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "logs")}
    return {"rows": table, "train_seconds": costs}, rows


def shown(rows: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """``rows`` keyed by identifier, keyed by display name instead (as results.json, results.md
    and results.csv show them)."""
    return {names[row]: cells for row, cells in rows.items()}


def cell_intervals(replicates: list[Rows], labels: torch.Tensor, bootstrap: Bootstrap) -> dict[str, dict[str, Interval]]:
    """Each test cell's error (points) and NLL with its bootstrap interval over test examples (and
    replicates): ``{"ROW@kB": {"error": Interval, "nll": Interval}}``, ROW the row's identifier."""
    out: dict[str, dict[str, Interval]] = {}
    for key in replicates[0].probs["test"]:
        if not all(key in rep.probs["test"] for rep in replicates):
            continue
        losses = [per_example_losses(rep.probs["test"][key], labels) for rep in replicates]
        out[cell_name(*key)] = {m: bootstrap.interval(np.stack([x[m].numpy() for x in losses])) for m in ("error", "nll")}
    return out


# ---------------------------------------------------------------------------------------- the job
def check_protocol(out: Path, protocol: dict[str, Any]) -> None:
    """A compare folder keeps one protocol: refuse to mix members trained with other settings."""
    path = out / "protocol.json"
    if not path.exists():
        write_json(protocol, path)
        return
    saved = json.loads(path.read_text())
    diff = sorted(k for k in set(saved) | set(protocol) if saved.get(k) != json.loads(json.dumps(protocol.get(k), default=str)))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {protocol.get(k)!r} now" for k in diff[:4])
        raise ConfigError(f"{out} holds a compare run with other settings ({shown}); use another --output or the same settings")


def run_compare(args: CompareConfig) -> dict[str, Any]:
    """The whole of ``recipes/compare.py``: plan, train or reuse every member, evaluate, write results."""
    t_start = time.perf_counter()
    with prepare_run(args) as run:
        accelerator, out = run.accelerator, run.out
        world = accelerator.num_processes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        jobs = args.jobs or default_jobs(args.threads, local)
        torch.set_num_threads(args.threads)   # in one process the members train and predict here, at a member's threads
        data, _, spec = build_data_and_model(args)
        logger.info(describe_input(spec))
        plan = make_plan(args, len(data.train))
        if accelerator.is_main_process:
            check_protocol(out, protocol_of(args))
            write_run_config(args, out, spec)
            shutil.rmtree(out / ".claims", ignore_errors=True)   # claims of an earlier, stopped job
        accelerator.wait_for_everyone()
        lines = accounting(plan, args)
        if accelerator.is_main_process:
            for ln in lines:
                log(ln)
        in_process = world == 1 and jobs == 1
        log(f"rank {accelerator.process_index} of {world}: {'members one after the other in this process' if in_process else f'{jobs} member(s) at a time in worker processes'}, "
            f"{args.threads} thread(s) each")
        seeds = [args.seed + SEED_STRIDE * r for r in range(args.seeds)]
        runners = []
        for r, seed in enumerate(seeds):
            root = out / f"seed{r}"
            root.mkdir(parents=True, exist_ok=True)
            runners.append(Runner(args, plan, data, spec, root, seed))
        tasks = [t for r, runner in enumerate(runners) for t in runner.tasks(r)]
        finished, _ = run_members(runners, tasks, out, jobs, in_process, limit=args.stop_after_runs)
        if not finished:
            log(f"stopped after {args.stop_after_runs} member runs (--stop-after-runs); run the same command again to continue")
            return {"finished": False}
        if not accelerator.is_main_process:   # the main process evaluates; the others are done
            return {"finished": True}
        labels = split_labels(data)
        per_seed: list[dict[str, Any]] = []
        replicates: list[Rows] = []
        names: dict[str, str] = {}
        for runner in runners:
            rep, rows = evaluate_replicate(plan, args, runner.root, labels)
            save_replicate_predictions(rows, labels, runner.root / PREDICTIONS)
            names.update(rows.names)
            write_json({"evaluation": {**rep, "rows": shown(rep["rows"], names)}}, runner.root / "evaluation.json")
            per_seed.append(rep)
            replicates.append(rows)
        bootstrap = Bootstrap(len(runners), len(labels["test"]), resamples=BOOTSTRAP_RESAMPLES, seed=args.seed)
        table = shown(aggregate(per_seed, plan.budgets, cell_intervals(replicates, labels["test"], bootstrap)), names)
        per_seed = [{**rep, "rows": shown(rep["rows"], names)} for rep in per_seed]   # the files name rows by their display names
        claims = check_claims([rows.shown("test") for rows in replicates], labels["test"], plan.budgets, bootstrap, per_example_losses)
        val_claims = []
        if "val" in labels:   # the same claims on the validation split, where settings are chosen
            val_boot = Bootstrap(len(runners), len(labels["val"]), resamples=BOOTSTRAP_RESAMPLES, seed=args.seed)
            val_claims = check_claims([rows.shown("val") for rows in replicates], labels["val"], plan.budgets, val_boot, per_example_losses)
        claim_lines = render_claims(claims, len(runners))
        wall = time.perf_counter() - t_start
        title = f"{args.model} on {args.dataset}: equal-budget comparison, B = {plan.B} epochs"
        train_total = sum(sum(rep["train_seconds"].values()) for rep in per_seed)
        footer = [f"Wall time of this job: {wall:.0f} s ({world} process(es), {jobs} member(s) at a time each, {args.threads} thread(s) per member); "
                  f"training time of all members (summed epochs, incl. earlier jobs): {train_total:.0f} s.",
                  "Per-member training seconds: " + "; ".join(f"seed{r}: " + ", ".join(f"{k} {v:.0f}" for k, v in rep["train_seconds"].items())
                                                            for r, rep in enumerate(per_seed))]
        budget_figure(table, plan.budgets, out / FIGURE, title)
        md_claims = claim_lines + (["", "The same claims on the validation split:", ""] + render_claims(val_claims, len(runners), "validation")[:-1]
                                   if val_claims else [])
        (out / "results.md").write_text(render_markdown(title, table, plan.budgets, len(seeds), lines, footer, md_claims, FIGURE))
        (out / "results.csv").write_text(render_csv(per_seed, table, seeds, claims))
        write_json({"title": title, "protocol": protocol_of(args), "plan": asdict(plan), "seeds": seeds, "data": data_record(data), "accounting": lines,
                    "table": table, "per_seed": per_seed, "claims": [c.to_dict() for c in claims], "val_claims": [c.to_dict() for c in val_claims], "wall_seconds": wall,
                    "processes": world, "jobs": jobs, "threads": args.threads}, out / "results.json")
        console = Console()
        if not console.is_terminal:   # a log file: wide enough for the row names
            console = Console(width=160)
        console.print(rich_table(title, table, plan.budgets, len(seeds)))
        for ln in claim_lines:
            console.print(ln.replace("**", ""), markup=False)
        log(f"wrote {out / 'results.md'}, results.json, results.csv, {FIGURE}, seedR/{PREDICTIONS}; wall time {wall:.0f} s")
        return {"finished": True, "table": table, "claims": claims}
