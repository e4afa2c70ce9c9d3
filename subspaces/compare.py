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

Every evaluated network has its BatchNorm statistics recomputed at its own weights first, the
Ind networks included, and every ensemble averages probabilities.

Members are independent runs, each a run folder under ``OUTPUT/seedR/`` with its own checkpoints,
trained by one process each: ``--jobs`` of them at a time in worker processes (``--threads``
torch threads each), or, under ``torchrun`` / ``accelerate launch --num_processes N``, shared out
between the ranks (each claims the next member whose inputs are ready). Every member trains
alone, so the plan (global batch, updates per epoch, snapshot counts) is the same under any
launcher. A stopped compare run started again skips finished members and resumes unfinished ones.
Results: a table and the papers' claims checked on it (:mod:`subspaces.claims`), on the console
and in ``results.md``, ``results.json``, ``results.csv`` in OUTPUT. The plan is
:mod:`subspaces.compare_plan`, the members' training :mod:`subspaces.compare_run`, the tables
:mod:`subspaces.compare_report`; this module evaluates the members and runs the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from accelerate.logging import get_logger

from .bn import update_bn
from .claims import check_claims, render_claims
from .compare_plan import JOB_KEYS, METHODS, OFFSETS, SEED_STRIDE, Plan, accounting, make_plan, protocol_of
from .compare_report import ROW_ORDER, aggregate, render_csv, render_markdown, rich_table, row_rank
from .compare_run import Runner, Task, default_jobs, log, run_members, train_seconds
from .data import DataBundle, make_loader
from .ensembles import Ensemble, evaluate, subspace_points
from .errors import ConfigError
from .io import load_model, load_subspace, write_json
from .snapshots import list_snapshots, swa_average
from .run_folder import describe_input, prepare_run, write_run_config
from .settings import CompareConfig
from .training import build_data_and_model

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

__all__ = [
    "JOB_KEYS", "METHODS", "OFFSETS", "ROW_ORDER", "SEED_STRIDE", "Plan", "Runner", "Task", "accounting",
    "aggregate", "check_protocol", "evaluate_replicate", "make_plan", "protocol_of", "row_rank", "run_compare",
]


# ---------------------------------------------------------------------------------------- evaluation
def _fingerprint(root: Path, protocol: dict[str, Any]) -> str:
    """Identifies the finished members (their final files' sizes and times) and the protocol."""
    h = hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode())
    for marker in sorted([*root.glob("*/results.json"), *root.glob("*/snapshots.json"), *root.glob("spro*/vertex*/results.json")]):
        st = marker.stat()
        h.update(f"{marker.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("acc", "nll", "ece", "brier")}


def evaluate_replicate(args: CompareConfig, plan: Plan, data: DataBundle, root: Path) -> dict[str, Any]:
    """Metrics of every method at every budget for one replicate: {row: {"kB": {metrics, members, cost}}}.

    Every network is evaluated with BatchNorm recomputed at its own weights (snapshots were saved so).
    """
    eval_loader = make_loader(data.eval, args.eval_batch_size, shuffle=False)
    bn_loader = make_loader(data.bn, args.batch_size, shuffle=False)
    C, bn_batches = data.num_classes, args.bn_batches
    rows: dict[str, dict[str, Any]] = {}

    def put(row: str, k: int, metrics: dict[str, Any], members: int) -> None:
        rows.setdefault(row, {})[f"{k}B"] = {**_metrics(metrics), "members": members, "cost": plan.cost(row, k)}

    def recomputed(path: Path) -> torch.nn.Module:
        return update_bn(load_model(path), bn_loader, max_batches=bn_batches)

    top = max(plan.budgets)
    # Ind, and "Single network": the mean of the Ind networks' own metrics (each alone)
    res = evaluate(Ensemble([recomputed(root / f"ind{j}" / "model.safetensors") for j in range(top)]), eval_loader,
                   num_classes=C, per_member=True)
    for k in plan.budgets:
        put("Ind", k, res["by_size"][k - 1], k)
    put("Single network", 1, {key: statistics.fmean(m[key] for m in res["members"]) for key in ("acc", "nll", "ece", "brier")}, 1)
    log(f"{root}: Ind evaluated")
    for method in ("sse", "fge"):
        if method not in plan.methods:
            continue
        snaps = list_snapshots(root / method)
        its = [s.iteration for s in snaps]
        count = (lambda k, its=its: plan.fge_count(k, its)) if method == "fge" else (lambda k, its=its: plan.sse_count(k, its))
        n_top = count(top)
        if n_top == 0:
            continue
        res = evaluate(Ensemble([load_model(s.path) for s in snaps[:n_top]]), eval_loader, num_classes=C, per_member=True)
        for k in plan.budgets:
            n = count(k)
            if n:
                put(method.upper(), k, res["by_size"][n - 1], n)
        if method == "fge" and "swa" in plan.methods:
            for k in plan.budgets:
                n = count(k)
                if n:
                    swa = swa_average([s.path for s in snaps[:n]], bn_loader, bn_batches)
                    put("SWA", k, evaluate(swa, eval_loader, num_classes=C), n)
        log(f"{root}: {method.upper()} evaluated ({n_top} snapshots)")
    for k in plan.subspace_budgets:
        if "line" in plan.methods:
            line = load_subspace(root / f"line{k}B")
            ts = subspace_points(line, "even", args.samples)
            exported = {float(t): line.export(t, bn_loader=bn_loader, bn_batches=bn_batches) for t in ts}
            mid = exported.get(0.5) or line.export(0.5, bn_loader=bn_loader, bn_batches=bn_batches)
            put("Line midpoint", k, evaluate(mid, eval_loader, num_classes=C), 1)
            put("Line endpoints (ens.)", k, evaluate(Ensemble([exported[0.0], exported[1.0]]), eval_loader, num_classes=C), 2)
            put(f"Line {args.samples} points (ens.)", k, evaluate(Ensemble(list(exported.values())), eval_loader, num_classes=C), args.samples)
            log(f"{root}: line trained {k}B evaluated")
        if "layerwise" in plan.methods:
            line = load_subspace(root / f"layerwise{k}B")
            ends = [line.export(t, bn_loader=bn_loader, bn_batches=bn_batches) for t in (0.0, 1.0)]
            put("Line (layerwise) midpoint", k, evaluate(line.export(0.5, bn_loader=bn_loader, bn_batches=bn_batches), eval_loader, num_classes=C), 1)
            put("Line (layerwise) endpoints (ens.)", k, evaluate(Ensemble(ends), eval_loader, num_classes=C), 2)
            log(f"{root}: layerwise line trained {k}B evaluated")
        if "simplex" in plan.methods:
            sim = load_subspace(root / f"simplex{k}B")
            gen = torch.Generator().manual_seed(args.seed + k)
            centre = sim.export(None, bn_loader=bn_loader, bn_batches=bn_batches)
            put("Simplex centre", k, evaluate(centre, eval_loader, num_classes=C), 1)
            vertices = [sim.export(p, bn_loader=bn_loader, bn_batches=bn_batches) for p in subspace_points(sim, "ends")]
            put("Simplex vertices (ens.)", k, evaluate(Ensemble(vertices), eval_loader, num_classes=C), sim.num_anchors)
            samples = [sim.export(p, bn_loader=bn_loader, bn_batches=bn_batches) for p in subspace_points(sim, "random", args.samples, gen)]
            put(f"Simplex {args.samples} samples (ens.)", k, evaluate(Ensemble(samples), eval_loader, num_classes=C), args.samples)
            log(f"{root}: simplex trained {k}B evaluated")
    if "espro" in plan.methods:   # ESPRO(k): the samples of the first k simplexes, one pass for every k
        members = []
        for j in range(top):
            sim = load_subspace(root / f"spro{j}" / f"vertex{plan.espro_vertices - 1}")
            gen = torch.Generator().manual_seed(args.seed + OFFSETS["espro"] + j)
            members += [sim.export(p, bn_loader=bn_loader, bn_batches=bn_batches) for p in subspace_points(sim, "random", args.samples, gen)]
        res = evaluate(Ensemble(members), eval_loader, num_classes=C, per_member=True)
        for k in plan.budgets:
            put("ESPRO", k, res["by_size"][k * args.samples - 1], k * args.samples)
        log(f"{root}: ESPRO evaluated ({top} simplexes x {args.samples} samples)")
    costs = {}
    for member in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "logs"):
        costs[member.name] = round(train_seconds(member), 1)
    return {"rows": rows, "train_seconds": costs}


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
        torch.set_num_threads(args.threads * jobs)   # this process evaluates on the cores its members trained on
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
        per_seed: list[dict[str, Any]] = []
        for runner in runners:
            cache = runner.root / "evaluation.json"
            key = _fingerprint(runner.root, protocol_of(args))
            cached = json.loads(cache.read_text()) if cache.exists() else None
            if cached and cached.get("fingerprint") == key:
                log(f"{runner.root}: evaluation reused from {cache}")
                rep = cached["evaluation"]
            else:
                rep = evaluate_replicate(args, plan, data, runner.root)
                write_json({"fingerprint": key, "evaluation": rep}, cache)
            per_seed.append(rep)
        table = aggregate(per_seed, plan.budgets)
        claims = check_claims([rep["rows"] for rep in per_seed], plan.budgets)
        claim_lines = render_claims(claims)
        wall = time.perf_counter() - t_start
        title = f"{args.model} on {args.dataset}: equal-budget comparison, B = {plan.B} epochs"
        train_total = sum(sum(rep["train_seconds"].values()) for rep in per_seed)
        footer = [f"Wall time of this job: {wall:.0f} s ({world} process(es), {jobs} member(s) at a time each, {args.threads} thread(s) per member); "
                  f"training time of all members (summed epochs, incl. earlier jobs): {train_total:.0f} s.",
                  "Per-member training seconds: " + "; ".join(f"seed{r}: " + ", ".join(f"{k} {v:.0f}" for k, v in rep["train_seconds"].items())
                                                            for r, rep in enumerate(per_seed))]
        (out / "results.md").write_text(render_markdown(title, table, plan.budgets, len(seeds), lines, footer, claim_lines))
        (out / "results.csv").write_text(render_csv(per_seed, table, seeds, claims))
        write_json({"title": title, "protocol": protocol_of(args), "plan": asdict(plan), "seeds": seeds, "accounting": lines,
                    "table": table, "per_seed": per_seed, "claims": [c.to_dict() for c in claims], "wall_seconds": wall,
                    "processes": world, "jobs": jobs, "threads": args.threads}, out / "results.json")
        console = Console()
        if not console.is_terminal:   # a log file: wide enough for the row names
            console = Console(width=160)
        console.print(rich_table(title, table, plan.budgets, len(seeds)))
        for ln in claim_lines:
            console.print(ln.replace("**", ""), markup=False)
        log(f"wrote {out / 'results.md'}, results.json, results.csv; wall time {wall:.0f} s")
        return {"finished": True, "table": table, "claims": claims}
