"""The comparison protocol of [G]'s Table 1 at training budgets 1B, 2B, 3B (SCIENCE.md §3-§5).

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
  ends / vertices, and the ensemble of k points on it, BatchNorm recomputed at every point.

Every member is a run folder under ``OUTPUT/seedR/`` with its own checkpoints: a stopped compare
run started again skips finished members and resumes unfinished ones. Results: a table on the
console and ``results.md``, ``results.json``, ``results.csv`` in OUTPUT.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, save_config
from .data import DataBundle, make_loader
from .ensembles import Ensemble, evaluate, load_ensemble, subspace_points
from .io import load_model, load_subspace, save_model, write_json
from .snapshots import (
    cycle_iterations,
    is_finished,
    list_snapshots,
    swa_average,
    train_snapshots,
    updates_per_epoch,
    validate_cycle,
)

METHODS = ("ind", "sse", "fge", "swa", "line", "simplex")
#: flags that describe the job, not the protocol: a restarted compare may change them
JOB_KEYS = ("seeds", "output", "resume", "stop_after_runs", "log_interval", "workers", "eval_batch_size", "cpu", "config", "threads")

SEED_STRIDE = 1000
OFFSETS = {"ind": 0, "sse": 10, "fge": 20, "line": 30, "simplex": 40}


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Every derived number of the protocol, in iterations (optimiser updates) where it matters."""

    B: int                         # epochs of one standard network
    upe: int                       # updates per epoch
    budgets: list[int]             # multiples of B reported (e.g. 1, 2, 3)
    subspace_budgets: list[int]    # budgets at which a line / simplex is trained from scratch
    methods: list[str]
    pretrain_iter: int             # FGE starts from Ind network 0 after this many iterations
    fge_cycle: int
    fge_epochs: int                # epochs of the FGE run (the last may go past the budget; unused)
    sse_cycle: int
    sse_epochs: int
    notes: list[str] = field(default_factory=list)

    @property
    def budget_iters(self) -> int:
        return self.B * self.upe

    def fge_count(self, k: int, snaps: list[int]) -> int:
        return sum(1 for i in snaps if self.pretrain_iter + i <= k * self.budget_iters)

    def sse_count(self, k: int, snaps: list[int]) -> int:
        return sum(1 for i in snaps if i <= k * self.budget_iters)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated whole numbers, e.g. 1,2,3; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{what} {text!r}: give positive whole multiples of the budget B, e.g. 1,2,3")
    return sorted(set(values))


def make_plan(args: argparse.Namespace, num_train: int, num_processes: int = 1) -> Plan:
    """Validate the protocol's flags and derive its numbers; ConfigError names what is wrong."""
    if args.epochs < 1:
        raise ConfigError(f"--epochs (the budget B of one standard network) must be >= 1, got {args.epochs}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.samples < 2:
        raise ConfigError(f"--samples (points per subspace ensemble) must be >= 2, got {args.samples}")
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {','.join(METHODS)}")
    if "ind" not in methods:
        methods.insert(0, "ind")
    if "swa" in methods and "fge" not in methods:
        raise ConfigError("--methods: swa averages the FGE snapshots; add fge")
    budgets = _int_list(args.budgets, "budgets")
    sub_budgets = _int_list(args.subspace_budgets, "subspace-budgets")
    if not 0 < args.fge_pretrain < 1:
        raise ConfigError(f"--fge-pretrain {args.fge_pretrain}: the fraction of B before FGE starts must be in (0, 1) ([G]: 0.8)")
    B = args.epochs
    upe = updates_per_epoch(num_train, args.batch_size, num_processes, args.grad_accum_steps)
    Bi = B * upe
    top = max(budgets)
    pre = round(args.fge_pretrain * Bi)
    if pre < 1:
        raise ConfigError(f"--fge-pretrain {args.fge_pretrain} of {Bi} iterations leaves FGE no pre-training")
    notes = []
    fge_cycle, fge_epochs = 0, 0
    if "fge" in methods:
        left = Bi - pre
        if args.fge_cycle is None and args.fge_cycle_iters is None:
            fge_cycle = max(2, 2 * (left // 4))   # two cycles in the FGE part of 1B (one when only one fits)
        else:
            fge_cycle = cycle_iterations("fge", upe, args.fge_cycle, args.fge_cycle_iters)
        validate_cycle("fge", fge_cycle, top * Bi - pre, budget_iters=left)
        if not args.fge_lr_max > args.fge_lr_min >= 0:
            raise ConfigError(f"FGE needs --fge-lr-max > --fge-lr-min >= 0, got {args.fge_lr_max} and {args.fge_lr_min}")
        fge_epochs = math.ceil((top * Bi - pre) / upe)
        if fge_epochs * upe + pre > top * Bi:
            notes.append(f"the FGE run trains {fge_epochs * upe + pre - top * Bi} iterations past {top}B (whole epochs); snapshots there are not used")
    sse_cycle, sse_epochs = 0, 0
    if "sse" in methods:
        if args.sse_cycle is None and args.sse_cycle_iters is None:
            sse_cycle = max(1, Bi // 2)   # two snapshots per B
        else:
            sse_cycle = cycle_iterations("sse", upe, args.sse_cycle, args.sse_cycle_iters)
        validate_cycle("sse", sse_cycle, top * Bi, budget_iters=Bi)
        sse_epochs = top * B
    return Plan(B=B, upe=upe, budgets=budgets, subspace_budgets=sub_budgets, methods=methods, pretrain_iter=pre,
                fge_cycle=fge_cycle, fge_epochs=fge_epochs, sse_cycle=sse_cycle, sse_epochs=sse_epochs, notes=notes)


def accounting(plan: Plan, args: argparse.Namespace) -> list[str]:
    """The budget accounting, one line per method (printed and written to results.md)."""
    Bi, u = plan.budget_iters, plan.upe
    ks = ", ".join(f"{k}B" for k in plan.budgets)
    lines = [f"B = {plan.B} epochs of {args.train_subset or 'all'} training examples = {Bi} iterations "
             f"({u} per epoch, batch {args.batch_size}); budgets {ks}."]
    lines.append("Ind(kB): the first k of independently trained networks (different seeds), each B epochs: cost k x B.")
    if "sse" in plan.methods:
        lines.append(f"SSE(kB): one run from scratch, cosine from lr {args.sse_lr_max or args.lr:g} restarted every {plan.sse_cycle} iterations "
                     f"({plan.sse_cycle / u:.2f} epochs); the snapshots taken by iteration k x {Bi}: cost k x B.")
    if "fge" in plan.methods:
        lines.append(f"FGE(kB): Ind network 0 at iteration {plan.pretrain_iter} ({args.fge_pretrain:g}B, its checkpoint and momentum), then "
                     f"lr {args.fge_lr_max:g} -> {args.fge_lr_min:g} cycles of {plan.fge_cycle} iterations ({plan.fge_cycle / u:.2f} epochs), "
                     f"snapshot at mod(i, {plan.fge_cycle}) = {plan.fge_cycle // 2}; the snapshots taken by iteration k x {Bi} counted from the "
                     f"network's start: cost k x B, the {args.fge_pretrain:g}B pre-training included.")
    if "swa" in plan.methods:
        lines.append("SWA(kB): the FGE(kB) snapshots averaged in weight space, BatchNorm recomputed: cost k x B.")
    sb = ", ".join(f"{k}B" for k in plan.subspace_budgets)
    if "line" in plan.methods:
        lines.append(f"Line(kB): a line from scratch ([W], beta {args.line_beta:g}) trained k x B epochs (one forward/backward per batch): "
                     f"cost k x B; trained at {sb}. Midpoint t=0.5; ends t=0,1; {args.samples} evenly spaced t (ends included).")
    if "simplex" in plan.methods:
        lines.append(f"Simplex(kB): a {args.simplex_vertices}-vertex simplex from scratch (beta {args.simplex_beta:g}) trained k x B epochs: "
                     f"cost k x B; trained at {sb}. Centre; vertices; {args.samples} Dirichlet(1) samples.")
    lines.append(f"BatchNorm recomputed at every snapshot, average and subspace point on {args.bn_batches} batches of unaugmented "
                 "training images; Ind networks keep their trained statistics.")
    return lines + plan.notes


# ---------------------------------------------------------------------------------------- members
def _member_args(args: argparse.Namespace, folder: Path, seed: int, epochs: int, subspace: str = "none", **extra: Any) -> argparse.Namespace:
    m = copy.copy(args)
    m.output, m.seed, m.epochs, m.subspace = str(folder), seed, epochs, subspace
    m.degree = m.bends = None
    m.vertices = extra.pop("vertices", None)
    m.layerwise = m.same_point = False
    m.sampling, m.include, m.exclude = "global", None, None
    m.beta, m.volume_lambda = extra.pop("beta", 0.0), 0.0
    m.eval_every = 10**9          # evaluate once, after the last epoch
    m.resume = None
    m.stop_after_epochs = None
    for k, v in extra.items():
        setattr(m, k, v)
    return m


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / n / "progress.json").exists() for n in ("checkpoint", "checkpoint.old"))


def _train_seconds(folder: Path) -> float:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0.0
    return sum(json.loads(ln).get("seconds", 0.0) for ln in path.read_text().splitlines() if ln.strip())


class Runner:
    """Trains (or reuses) the members of one replicate (seed) of the protocol."""

    def __init__(self, args: argparse.Namespace, plan: Plan, data: DataBundle, spec: dict[str, Any], root: Path, seed: int) -> None:
        self.args, self.plan, self.data, self.spec, self.root, self.seed = args, plan, data, spec, root, seed
        self.trained = 0   # member runs trained (not reused) by this job

    # -- budget for the job (tests and partial runs)
    def _may_train(self) -> bool:
        limit = self.args.stop_after_runs
        return limit is None or self.trained < limit

    def standard(self, name: str, seed: int, epochs: int, subspace: str = "none", on_update: Any = None, **extra: Any) -> bool:
        """Train a plain network or a shape from scratch into ``root/name`` (or reuse it). True when finished."""
        from accelerate.utils import set_seed

        from .training import Trainer, create_timm_model, finish_run, make_accelerator, wrap_subspace

        folder = self.root / name
        if (folder / "results.json").exists():
            log(f"{folder}: finished earlier, reused")
            return True
        if not self._may_train():
            return False
        margs = _member_args(self.args, folder, seed, epochs, subspace, **extra)
        folder.mkdir(parents=True, exist_ok=True)
        acc = make_accelerator(margs)
        set_seed(seed)
        model, _ = create_timm_model(margs, self.spec["num_classes"], self.spec["in_chans"])
        net = wrap_subspace(margs, model, rank=acc.process_index)
        if acc.is_main_process:
            save_config(margs, str(folder / "config.yaml"))
        resume = _has_checkpoint(folder)
        what = "standard network" if subspace == "none" else f"{subspace} from scratch"
        log(f"{folder}: {what}, {epochs} epochs, seed {seed}" + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        trainer = Trainer(margs, net, self.data, self.spec, acc, folder, on_update=on_update)
        trainer.fit(resume=resume)
        finish_run(trainer, f"{name} (seed {seed})")
        self.trained += 1
        log(f"{folder}: done in {time.perf_counter() - t0:.0f} s")
        return True

    def ind(self, j: int) -> bool:
        seed = self.seed + OFFSETS["ind"] + j
        if j != 0 or "fge" not in self.plan.methods:
            return self.standard(f"ind{j}", seed, self.plan.B)
        folder, pre = self.root / "ind0", self.root / "ind0" / "pretrain"
        P = self.plan.pretrain_iter
        pre_done = (pre / "model.safetensors").exists() and (pre / "checkpoint" / "progress.json").exists()
        if not (folder / "results.json").exists() and not pre_done and _has_checkpoint(folder):
            ckpt = folder / "checkpoint" if (folder / "checkpoint" / "progress.json").exists() else folder / "checkpoint.old"
            if json.loads((ckpt / "progress.json").read_text())["updates"] >= P:
                log(f"{folder}: its checkpoint is past iteration {P} but the FGE pre-training checkpoint is missing: training it again")
                for n in ("checkpoint", "checkpoint.old"):
                    shutil.rmtree(folder / n, ignore_errors=True)
        if (folder / "results.json").exists() and not pre_done:
            raise ConfigError(f"{folder} is finished but its FGE pre-training checkpoint {pre} is missing: delete {folder} to train it again")

        def save_pretrain(trainer: Any, update: int) -> None:
            if update != P:
                return
            from .training import save_checkpoint

            if trainer.accelerator.is_main_process:
                save_model(trainer.unwrapped, pre / "model", {**self.spec, "pretrain_of": str(folder), "iteration": update})
            save_checkpoint(trainer.accelerator, pre, {"epoch": update / trainer.updates_per_epoch, "updates": update}, trainer.scheduler)
            log(f"{pre}: checkpoint after iteration {update} ({update / self.plan.budget_iters:.2f}B) saved for FGE")

        return self.standard("ind0", seed, self.plan.B, on_update=save_pretrain)

    def snapshots(self, method: str) -> bool:
        from accelerate.utils import set_seed

        from .training import create_timm_model, make_accelerator

        folder = self.root / method
        if is_finished(folder):
            log(f"{folder}: finished earlier, reused")
            return True
        if not self._may_train():
            return False
        p, a = self.plan, self.args
        seed = self.seed + OFFSETS[method]
        epochs = p.fge_epochs if method == "fge" else p.sse_epochs
        margs = _member_args(a, folder, seed, epochs)
        acc = make_accelerator(margs)
        set_seed(seed)
        resume = _has_checkpoint(folder)
        t0 = time.perf_counter()
        if method == "fge":
            pre = self.root / "ind0" / "pretrain"
            model = load_model(pre / "model.safetensors")
            log(f"{folder}: FGE from {pre}, {epochs} epochs, cycle {p.fge_cycle} iterations" + (" (resuming)" if resume else ""))
            res = train_snapshots("fge", margs, model, self.data, self.spec, folder, cycle=p.fge_cycle, lr_max=a.fge_lr_max,
                                  lr_min=a.fge_lr_min, optimizer_state=pre / "checkpoint" / "optimizer.bin", accelerator=acc,
                                  info={"start": str(pre), "start_iteration": p.pretrain_iter})
        else:
            model, _ = create_timm_model(margs, self.spec["num_classes"], self.spec["in_chans"])
            lr_max = a.sse_lr_max if a.sse_lr_max is not None else a.lr
            log(f"{folder}: SSE from scratch, {epochs} epochs, cycle {p.sse_cycle} iterations, seed {seed}" + (" (resuming)" if resume else ""))
            res = train_snapshots("sse", margs, model, self.data, self.spec, folder, cycle=p.sse_cycle, lr_max=lr_max, accelerator=acc)
        self.trained += 1
        log(f"{folder}: done in {time.perf_counter() - t0:.0f} s, {len(res['snapshots'])} snapshots")
        return bool(res["finished"])

    def run_all(self) -> bool:
        """Train every member this replicate needs; False when the job's --stop-after-runs cut it short."""
        p = self.plan
        steps: list[Any] = [lambda j=j: self.ind(j) for j in range(max(p.budgets))]
        if "fge" in p.methods:
            steps.append(lambda: self.snapshots("fge"))
        if "sse" in p.methods:
            steps.append(lambda: self.snapshots("sse"))
        for k in p.subspace_budgets:
            if "line" in p.methods:
                steps.append(lambda k=k: self.standard(f"line{k}B", self.seed + OFFSETS["line"] + k, k * p.B, "line", beta=self.args.line_beta))
            if "simplex" in p.methods:
                steps.append(lambda k=k: self.standard(f"simplex{k}B", self.seed + OFFSETS["simplex"] + k, k * p.B, "simplex",
                                                       beta=self.args.simplex_beta, vertices=self.args.simplex_vertices))
        for step in steps:
            if not step():
                return False
        return True


# ---------------------------------------------------------------------------------------- evaluation
def _fingerprint(root: Path, protocol: dict[str, Any]) -> str:
    """Identifies the finished members (their final files' sizes and times) and the protocol."""
    h = hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode())
    for marker in sorted(list(root.glob("*/results.json")) + list(root.glob("*/snapshots.json"))):
        st = marker.stat()
        h.update(f"{marker.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _metrics(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("acc", "nll", "ece", "brier")}


def evaluate_replicate(args: argparse.Namespace, plan: Plan, data: DataBundle, root: Path) -> dict[str, Any]:
    """Metrics of every method at every budget for one replicate: {row: {"kB": {metrics, members}}}."""
    eval_loader = make_loader(data.eval, args.eval_batch_size, shuffle=False)
    bn_loader = make_loader(data.bn, args.batch_size, shuffle=False)
    C = data.num_classes
    rows: dict[str, dict[str, Any]] = {}

    def put(row: str, k: int, metrics: dict[str, Any], members: int) -> None:
        rows.setdefault(row, {})[f"{k}B"] = {**_metrics(metrics), "members": members}

    top = max(plan.budgets)
    # Ind, and the single networks' mean (a "standard network")
    ind_paths = [root / f"ind{j}" / "model.safetensors" for j in range(top)]
    res = evaluate(load_ensemble(ind_paths), eval_loader, num_classes=C, per_member=True)
    for k in plan.budgets:
        put("Ind", k, res["by_size"][k - 1], k)
    singles = [json.loads((root / f"ind{j}" / "results.json").read_text())["results"]["model"] for j in range(top)]
    put("Single network", 1, {key: statistics.fmean(s[key] for s in singles) for key in ("acc", "nll", "ece", "brier")}, 1)
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
        res = evaluate(load_ensemble([s.path for s in snaps[:n_top]]), eval_loader, num_classes=C, per_member=True)
        for k in plan.budgets:
            n = count(k)
            if n:
                put(method.upper(), k, res["by_size"][n - 1], n)
        if method == "fge" and "swa" in plan.methods:
            for k in plan.budgets:
                n = count(k)
                if n:
                    swa = swa_average([s.path for s in snaps[:n]], bn_loader, args.bn_batches)
                    put("SWA", k, evaluate(swa, eval_loader, num_classes=C), n)
        log(f"{root}: {method.upper()} evaluated ({n_top} snapshots)")
    for k in plan.subspace_budgets:
        if "line" in plan.methods:
            line = load_subspace(root / f"line{k}B")
            ts = subspace_points(line, "even", args.samples)
            exported = {float(t): line.export(t, bn_loader=bn_loader, bn_batches=args.bn_batches) for t in ts}
            mid = line.export(0.5, bn_loader=bn_loader, bn_batches=args.bn_batches)
            put("Line midpoint", k, evaluate(mid, eval_loader, num_classes=C), 1)
            put("Line ends (ens.)", k, evaluate(Ensemble([exported[0.0], exported[1.0]]), eval_loader, num_classes=C), 2)
            put(f"Line {args.samples} points (ens.)", k, evaluate(Ensemble(list(exported.values())), eval_loader, num_classes=C), args.samples)
            log(f"{root}: line trained {k}B evaluated")
        if "simplex" in plan.methods:
            sim = load_subspace(root / f"simplex{k}B")
            gen = torch.Generator().manual_seed(args.seed + k)
            centre = sim.export(None, bn_loader=bn_loader, bn_batches=args.bn_batches)
            put("Simplex centre", k, evaluate(centre, eval_loader, num_classes=C), 1)
            vertices = [sim.export(p, bn_loader=bn_loader, bn_batches=args.bn_batches) for p in subspace_points(sim, "ends")]
            put(f"Simplex {sim.num_anchors} vertices (ens.)", k, evaluate(Ensemble(vertices), eval_loader, num_classes=C), sim.num_anchors)
            samples = [sim.export(p, bn_loader=bn_loader, bn_batches=args.bn_batches) for p in subspace_points(sim, "random", args.samples, gen)]
            put(f"Simplex {args.samples} samples (ens.)", k, evaluate(Ensemble(samples), eval_loader, num_classes=C), args.samples)
            log(f"{root}: simplex trained {k}B evaluated")
    costs = {}
    for member in sorted(p for p in root.iterdir() if p.is_dir()):
        costs[member.name] = round(_train_seconds(member), 1)
    return {"rows": rows, "train_seconds": costs}


# ---------------------------------------------------------------------------------------- aggregation and output
ROW_ORDER = ("Single network", "Ind", "SSE", "FGE", "SWA", "Line midpoint", "Line ends", "Line ", "Simplex centre", "Simplex ")


def row_rank(row: str) -> tuple[int, str]:
    """Rows in the table's order (baselines, snapshot methods, then subspaces), whatever order they were stored in."""
    for i, prefix in enumerate(ROW_ORDER):
        if row == prefix or row.startswith(prefix):
            return (i, row)
    return (len(ROW_ORDER), row)


def aggregate(per_seed: list[dict[str, Any]], budgets: list[int]) -> dict[str, dict[str, Any]]:
    """mean and std (over replicates) of every metric, per row and budget; rows keep their first order."""
    order: list[str] = []
    for rep in per_seed:
        order += [r for r in rep["rows"] if r not in order]
    order.sort(key=row_rank)
    out: dict[str, dict[str, Any]] = {}
    for row in order:
        for k in budgets:
            cells = [rep["rows"][row][f"{k}B"] for rep in per_seed if f"{k}B" in rep["rows"].get(row, {})]
            if not cells:
                continue
            agg: dict[str, Any] = {"n": len(cells), "members": cells[0]["members"]}
            for key in ("acc", "nll", "ece", "brier"):
                vals = [c[key] for c in cells]
                agg[key] = statistics.fmean(vals)
                agg[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            errs = [100 * (1 - c["acc"]) for c in cells]
            agg["error"] = statistics.fmean(errs)
            agg["error_std"] = statistics.stdev(errs) if len(errs) > 1 else 0.0
            out.setdefault(row, {})[f"{k}B"] = agg
    return out


def _cell(agg: dict[str, Any] | None, key: str, digits: int, seeds: int) -> str:
    if agg is None:
        return "-"
    value = f"{agg[key]:.{digits}f}"
    return value + (f" ± {agg[key + '_std']:.{digits}f}" if seeds > 1 else "")


def render_markdown(title: str, table: dict[str, dict[str, Any]], budgets: list[int], seeds: int, lines: list[str], footer: list[str]) -> str:
    head = ["method"] + [f"{k}B error %" for k in budgets] + [f"{k}B NLL" for k in budgets]
    md = [f"# {title}", "", f"Mean{' ± std over ' + str(seeds) + ' seeds' if seeds > 1 else ' (1 seed)'}; "
          "(n) = ensemble members at that budget; \"Single network\" is the mean of the Ind networks' own metrics; "
          "(ens.) = probability-averaged ensemble of points of one trained subspace.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in table.items():
        errs = [(_cell(cells.get(f"{k}B"), "error", 2, seeds) + (f" ({cells[f'{k}B']['members']})" if f"{k}B" in cells else "")) for k in budgets]
        nlls = [_cell(cells.get(f"{k}B"), "nll", 4, seeds) for k in budgets]
        md.append("| " + " | ".join([row] + errs + nlls) + " |")
    head2 = ["method"] + [f"{k}B ECE" for k in budgets] + [f"{k}B Brier" for k in budgets]
    md += ["", "Calibration:", "", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for row, cells in table.items():
        md.append("| " + " | ".join([row] + [_cell(cells.get(f"{k}B"), "ece", 4, seeds) for k in budgets]
                                    + [_cell(cells.get(f"{k}B"), "brier", 4, seeds) for k in budgets]) + " |")
    md += ["", "Budget accounting:", ""] + [f"- {ln}" for ln in lines] + [""] + footer
    return "\n".join(md) + "\n"


def render_csv(per_seed: list[dict[str, Any]], table: dict[str, dict[str, Any]], seeds: list[int]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "budget", "members", "seed", "error_pct", "acc", "nll", "ece", "brier"])
    for s, rep in zip(seeds, per_seed):
        for row, cells in rep["rows"].items():
            for b, c in cells.items():
                w.writerow([row, b, c["members"], s, f"{100 * (1 - c['acc']):.4f}", f"{c['acc']:.6f}", f"{c['nll']:.6f}", f"{c['ece']:.6f}", f"{c['brier']:.6f}"])
    for stat in ("mean", "std"):
        for row, cells in table.items():
            for b, c in cells.items():
                suffix = "" if stat == "mean" else "_std"
                w.writerow([row, b, c["members"], stat, f"{c['error' + suffix]:.4f}", f"{c['acc' + suffix]:.6f}", f"{c['nll' + suffix]:.6f}",
                            f"{c['ece' + suffix]:.6f}", f"{c['brier' + suffix]:.6f}"])
    return buf.getvalue()


def rich_table(title: str, table: dict[str, dict[str, Any]], budgets: list[int], seeds: int) -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("method")
    for k in budgets:
        t.add_column(f"{k}B error %", justify="right")
    for k in budgets:
        t.add_column(f"{k}B NLL", justify="right")
    for row, cells in table.items():
        errs = [(_cell(cells.get(f"{k}B"), "error", 2, seeds) + (f" ({cells[f'{k}B']['members']})" if f"{k}B" in cells else "")) for k in budgets]
        t.add_row(row, *errs, *[_cell(cells.get(f"{k}B"), "nll", 4, seeds) for k in budgets])
    return t


# ---------------------------------------------------------------------------------------- the job
def protocol_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in JOB_KEYS}


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


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """The whole of ``recipes/compare.py``: plan, train or reuse every member, evaluate, write results."""
    from rich.console import Console

    from .training import build_data_and_model, make_accelerator, prepare_output

    t_start = time.perf_counter()
    if args.resume:
        args.output = args.resume
    if args.stop_after_runs is not None and args.stop_after_runs < 0:
        raise ConfigError(f"--stop-after-runs must be >= 0, got {args.stop_after_runs}")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    acc = make_accelerator(args)
    data, _, spec = build_data_and_model(args)
    plan = make_plan(args, len(data.train), acc.num_processes)
    out = prepare_output(args)
    if acc.is_main_process:
        check_protocol(out, protocol_of(args))
        save_config(args, str(out / "config.yaml"))
    lines = accounting(plan, args)
    for ln in lines:
        log(ln)
    seeds = [args.seed + SEED_STRIDE * r for r in range(args.seeds)]
    per_seed: list[dict[str, Any]] = []
    for r, seed in enumerate(seeds):
        root = out / f"seed{r}"
        root.mkdir(parents=True, exist_ok=True)
        log(f"replicate {r + 1}/{len(seeds)} (seed {seed}) in {root}; {time.perf_counter() - t_start:.0f} s so far")
        runner = Runner(args, plan, data, spec, root, seed)
        if not runner.run_all():
            log(f"stopped after {args.stop_after_runs} member runs (--stop-after-runs); run the same command again to continue")
            return {"finished": False}
        args.stop_after_runs = None if args.stop_after_runs is None else args.stop_after_runs - runner.trained
        if acc.is_main_process:
            cache = root / "evaluation.json"
            key = _fingerprint(root, protocol_of(args))
            cached = json.loads(cache.read_text()) if cache.exists() else None
            if cached and cached.get("fingerprint") == key:
                log(f"{root}: evaluation reused from {cache}")
                rep = cached["evaluation"]
            else:
                rep = evaluate_replicate(args, plan, data, root)
                write_json({"fingerprint": key, "evaluation": rep}, cache)
            per_seed.append(rep)
        acc.wait_for_everyone()
    if not acc.is_main_process:
        return {"finished": True}
    table = aggregate(per_seed, plan.budgets)
    wall = time.perf_counter() - t_start
    title = f"{args.model} on {args.dataset}: equal-budget comparison, B = {plan.B} epochs"
    train_total = sum(sum(rep["train_seconds"].values()) for rep in per_seed)
    footer = [f"Wall time of this job: {wall:.0f} s; training time of all members (summed epochs, incl. earlier jobs): {train_total:.0f} s.",
              "Per-member training seconds: " + "; ".join(f"seed{r}: " + ", ".join(f"{k} {v:.0f}" for k, v in rep["train_seconds"].items())
                                                        for r, rep in enumerate(per_seed))]
    (out / "results.md").write_text(render_markdown(title, table, plan.budgets, len(seeds), lines, footer))
    (out / "results.csv").write_text(render_csv(per_seed, table, seeds))
    write_json({"title": title, "protocol": protocol_of(args), "plan": asdict(plan), "seeds": seeds, "accounting": lines,
                "table": table, "per_seed": per_seed, "wall_seconds": wall}, out / "results.json")
    console = Console()
    if not console.is_terminal:   # a log file: wide enough for the row names
        console = Console(width=140)
    console.print(rich_table(title, table, plan.budgets, len(seeds)))
    log(f"wrote {out / 'results.md'}, results.json, results.csv; wall time {wall:.0f} s")
    return {"finished": True, "table": table}


def add_compare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol")
    g.add_argument("--seeds", type=int, default=1, help="replicates of the whole protocol; the table reports mean ± std (default: %(default)s)")
    g.add_argument("--budgets", default="1,2,3", help="budgets as multiples of B = --epochs (default: %(default)s)")
    g.add_argument("--methods", default=",".join(METHODS), help="methods to run (default: %(default)s; ind always runs)")
    g.add_argument("--fge-pretrain", type=float, default=0.8, help="FGE starts from Ind network 0 at this fraction of B ([G]: 0.8)")
    g.add_argument("--fge-cycle", type=float, default=None, help="FGE cycle in epochs (default: two cycles in the FGE part of 1B)")
    g.add_argument("--fge-cycle-iters", type=int, default=None, help="FGE cycle in iterations, instead of --fge-cycle")
    g.add_argument("--fge-lr-max", type=float, default=0.025, help="FGE alpha1 (default: %(default)s)")
    g.add_argument("--fge-lr-min", type=float, default=0.0005, help="FGE alpha2, at the snapshots (default: %(default)s)")
    g.add_argument("--sse-cycle", type=float, default=None, help="SSE cycle in epochs (default: B/2, two snapshots per B)")
    g.add_argument("--sse-cycle-iters", type=int, default=None, help="SSE cycle in iterations, instead of --sse-cycle")
    g.add_argument("--sse-lr-max", type=float, default=None, help="SSE learning rate at each restart (default: --lr)")
    g.add_argument("--subspace-budgets", default="1", help="budgets (multiples of B) at which a line / simplex is trained (default: %(default)s)")
    g.add_argument("--line-beta", type=float, default=1.0, help="cos^2 regulariser of the line [W] (default: %(default)s)")
    g.add_argument("--simplex-vertices", type=int, default=3, help="vertices of the simplex from scratch (default: %(default)s)")
    g.add_argument("--simplex-beta", type=float, default=1.0, help="cos^2 regulariser of the simplex (default: %(default)s)")
    g.add_argument("--samples", type=int, default=5, help="points per subspace ensemble (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=500, help="batch size of the evaluation passes (default: %(default)s)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads per process for torch (default: %(default)s, robust on a shared CPU; 0: torch's default)")
    g.add_argument("--stop-after-runs", type=int, default=None, help="stop (resumably) after training this many member runs in this job")
