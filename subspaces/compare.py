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
and in ``results.md``, ``results.json``, ``results.csv`` in OUTPUT.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from rich.console import Console

from .bn import update_bn
from .claims import check_claims, render_claims
from .config import save_config
from .errors import ConfigError, MemberFailed, NonFiniteLossError
from .data import DataBundle, make_loader
from .ensembles import Ensemble, evaluate, subspace_points
from .io import load_model, load_subspace, save_model, write_json
from .spro import grow_simplex
from .training import (
    Trainer,
    build_data_and_model,
    create_timm_model,
    finish_run,
    make_accelerator,
    prepare_output,
    save_checkpoint,
    wrap_subspace,
)
from .snapshots import (
    cycle_iterations,
    is_finished,
    list_snapshots,
    swa_average,
    train_snapshots,
    updates_per_epoch,
    validate_cycle,
)

METHODS = ("ind", "sse", "fge", "swa", "line", "simplex", "espro")
#: flags that describe the job, not the protocol: a restarted compare may change them
JOB_KEYS = ("seeds", "output", "resume", "stop_after_runs", "log_interval", "workers", "eval_batch_size", "cpu", "config",
            "threads", "jobs")

#: replicate r uses seeds seed + SEED_STRIDE * r; within it each method's members start at OFFSETS[method]
SEED_STRIDE = 1000
OFFSETS = {"ind": 0, "sse": 10, "fge": 20, "line": 30, "simplex": 40, "espro": 50}
#: environment variables of a distributed launch: a member's worker process must not see them,
#: or accelerate would join it to the launcher's process group
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
    espro_vertices: int = 0        # vertices of each SPRO simplex, the Ind network included
    spro_epochs: int = 0           # epochs per added vertex
    spro_samples_per_step: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def budget_iters(self) -> int:
        return self.B * self.upe

    def fge_count(self, k: int, snaps: list[int]) -> int:
        return sum(1 for i in snaps if self.pretrain_iter + i <= k * self.budget_iters)

    def sse_count(self, k: int, snaps: list[int]) -> int:
        return sum(1 for i in snaps if i <= k * self.budget_iters)

    @property
    def spro_cost(self) -> float:
        """Cost of one SPRO simplex in B: (vertices - 1) x epochs per vertex x points per batch / B."""
        return (self.espro_vertices - 1) * self.spro_epochs * self.spro_samples_per_step / self.B

    def cost(self, row: str, k: int) -> float:
        """Training cost of a table cell in B: k for every method but ESPRO, which adds its SPRO epochs."""
        return k * (1 + self.spro_cost) if row == "ESPRO" else float(k)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated whole numbers, e.g. 1,2,3; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{what} {text!r}: give positive whole multiples of the budget B, e.g. 1,2,3")
    return sorted(set(values))


def make_plan(args: argparse.Namespace, num_train: int) -> Plan:
    """Validate the protocol's flags and derive its numbers; ConfigError names what is wrong.

    Every member trains in a process of its own, so the updates per epoch are those of one
    process with ``--batch-size`` and ``--grad-accum-steps`` whatever the launcher.
    """
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
    upe = updates_per_epoch(num_train, args.batch_size, 1, args.grad_accum_steps)
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
    espro = {}
    if "espro" in methods:
        if args.espro_vertices < 2:
            raise ConfigError(f"--espro-vertices {args.espro_vertices}: a SPRO simplex needs at least 2 vertices (the Ind network and one more)")
        if args.spro_epochs < 1 or args.spro_samples_per_step < 1:
            raise ConfigError(f"--spro-epochs and --spro-samples-per-step must be >= 1, got {args.spro_epochs} and {args.spro_samples_per_step}")
        if args.spro_lr <= 0 or args.spro_volume_lambda < 0:
            raise ConfigError(f"--spro-lr must be > 0 and --spro-volume-lambda >= 0, got {args.spro_lr} and {args.spro_volume_lambda}")
        espro = {"espro_vertices": args.espro_vertices, "spro_epochs": args.spro_epochs, "spro_samples_per_step": args.spro_samples_per_step}
    return Plan(B=B, upe=upe, budgets=budgets, subspace_budgets=sub_budgets, methods=methods, pretrain_iter=pre,
                fge_cycle=fge_cycle, fge_epochs=fge_epochs, sse_cycle=sse_cycle, sse_epochs=sse_epochs, notes=notes, **espro)


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
    if "espro" in plan.methods:
        lines.append(f"ESPRO(k) [B]: from each of the first k Ind networks a SPRO simplex of {plan.espro_vertices} vertices, each added vertex "
                     f"trained {plan.spro_epochs} epochs (lr {args.spro_lr:g}, {plan.spro_samples_per_step} point(s) per batch, volume lambda "
                     f"{args.spro_volume_lambda:g} on [B]'s scale); {args.samples} points sampled from each simplex: cost k x (1 + "
                     f"{plan.spro_cost:.3f}) x B.")
    lines.append(f"BatchNorm recomputed at every evaluated network (the Ind networks, snapshots, averages and subspace points) on "
                 f"{args.bn_batches} batches of unaugmented training images, weighted by samples; ensembles average probabilities.")
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
    m.beta_params, m.volume_form, m.samples_per_step = "weights", "benton", 1
    m.eval_every = 10**9          # evaluate once, after the last epoch
    m.resume = None
    m.stop_after_epochs = None
    for k, v in extra.items():
        setattr(m, k, v)
    return m


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / n / "progress.json").exists() for n in ("checkpoint", "checkpoint.old"))


def _train_seconds(folder: Path) -> float:
    total = 0.0
    for path in [folder / "metrics.jsonl", *sorted(folder.glob("vertex*/metrics.jsonl"))]:
        if path.exists():
            total += sum(json.loads(ln).get("seconds", 0.0) for ln in path.read_text().splitlines() if ln.strip())
    return total


@dataclass(frozen=True)
class Task:
    """One member run of replicate ``replicate``: ``name`` is its folder, ``deps`` the members it starts from."""

    replicate: int
    name: str
    deps: tuple[str, ...] = ()


class Runner:
    """Trains (or reuses) the members of one replicate (seed) of the protocol."""

    def __init__(self, args: argparse.Namespace, plan: Plan, data: DataBundle, spec: dict[str, Any], root: Path, seed: int) -> None:
        self.args, self.plan, self.data, self.spec, self.root, self.seed = args, plan, data, spec, root, seed

    def standard(self, name: str, seed: int, epochs: int, subspace: str = "none", on_update: Any = None, **extra: Any) -> None:
        """Train a plain network or a shape from scratch into ``root/name`` (resuming its checkpoint)."""
        folder = self.root / name
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
        trainer = Trainer(margs, net, self.data, self.spec, acc, folder, on_update=on_update)
        trainer.fit(resume=resume)
        finish_run(trainer, f"{name} (seed {seed})")

    def ind(self, j: int) -> None:
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

        def save_pretrain(trainer: Any, update: int) -> None:
            if update != P:
                return
            if trainer.accelerator.is_main_process:
                save_model(trainer.unwrapped, pre / "model", {**self.spec, "pretrain_of": str(folder), "iteration": update})
            save_checkpoint(trainer.accelerator, pre, {"epoch": update / trainer.updates_per_epoch, "updates": update}, trainer.scheduler)
            log(f"{pre}: checkpoint after iteration {update} ({update / self.plan.budget_iters:.2f}B) saved for FGE")

        return self.standard("ind0", seed, self.plan.B, on_update=save_pretrain)

    def snapshots(self, method: str) -> None:
        folder = self.root / method
        p, a = self.plan, self.args
        seed = self.seed + OFFSETS[method]
        epochs = p.fge_epochs if method == "fge" else p.sse_epochs
        margs = _member_args(a, folder, seed, epochs)
        acc = make_accelerator(margs)
        set_seed(seed)
        resume = _has_checkpoint(folder)
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
        log(f"{folder}: {len(res['snapshots'])} snapshots")

    def spro(self, j: int) -> None:
        """SPRO [B] from Ind network j: the library's :func:`subspaces.spro.grow_simplex`, one stage per added vertex."""
        p, folder = self.plan, self.root / f"spro{j}"
        margs = _member_args(self.args, folder, self.seed + OFFSETS["espro"], p.spro_epochs, "simplex",
                             vertices=p.espro_vertices, lr=self.args.spro_lr, warmup_epochs=0, volume_lambda=self.args.spro_volume_lambda,
                             samples_per_step=p.spro_samples_per_step)
        folder.mkdir(parents=True, exist_ok=True)
        log(f"{folder}: SPRO from ind{j}, {p.espro_vertices} vertices, {p.spro_epochs} epochs per vertex")
        grow_simplex(margs, str(self.root / f"ind{j}" / "model.safetensors"), folder, make_accelerator(margs), j)

    def tasks(self, replicate: int) -> list[Task]:
        """The members of this replicate in the order they start, each after the members it starts from."""
        p = self.plan
        # the longest runs first, so that worker processes finish together: ind0 (FGE starts
        # from it), SSE (top x B), FGE (top x B - 0.8B), then the rest
        inds = [Task(replicate, f"ind{j}") for j in range(max(p.budgets))]
        out = inds[:1]
        if "sse" in p.methods:
            out.append(Task(replicate, "sse"))
        if "fge" in p.methods:
            out.append(Task(replicate, "fge", ("ind0",)))
        out += inds[1:]
        for k in p.subspace_budgets:
            for shape in ("line", "simplex"):
                if shape in p.methods:
                    out.append(Task(replicate, f"{shape}{k}B"))
        if "espro" in p.methods:
            out += [Task(replicate, f"spro{j}", (f"ind{j}",)) for j in range(max(p.budgets))]
        return out

    def is_done(self, name: str) -> bool:
        folder = self.root / name
        if name in ("fge", "sse"):
            return is_finished(folder)
        if name.startswith("spro"):
            return (folder / f"vertex{self.plan.espro_vertices - 1}" / "subspace.safetensors").exists()
        done = (folder / "results.json").exists()
        if done and name == "ind0" and "fge" in self.plan.methods and not (folder / "pretrain" / "model.safetensors").exists():
            raise ConfigError(f"{folder} is finished but its FGE pre-training checkpoint {folder / 'pretrain'} is missing: "
                              f"delete {folder} to train it again")
        return done

    def run_task(self, name: str) -> None:
        """Train member ``name`` of this replicate (resuming its own checkpoint if it has one)."""
        p, a = self.plan, self.args
        if name.startswith("ind"):
            self.ind(int(name[3:]))
        elif name in ("fge", "sse"):
            self.snapshots(name)
        elif name.startswith("spro"):
            self.spro(int(name[4:]))
        elif name.startswith(("line", "simplex")) and name.endswith("B"):
            shape = "line" if name.startswith("line") else "simplex"
            k = int(name[len(shape):-1])
            extra = {"beta": a.line_beta} if shape == "line" else {"beta": a.simplex_beta, "vertices": a.simplex_vertices}
            self.standard(name, self.seed + OFFSETS[shape] + k, k * p.B, shape, **extra)
        else:
            raise ValueError(f"unknown compare member {name!r}")


# ---------------------------------------------------------------------------------------- running members
def worker_environment(threads: int) -> dict[str, str]:
    """The environment of a member's worker process: this one's, without a distributed launch
    (the member trains alone) and with ``threads`` OpenMP threads."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and not k.startswith(("TORCHELASTIC_", "ACCELERATE_", "TORCH_NCCL", "NCCL_"))}
    env["OMP_NUM_THREADS"] = str(max(1, threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def default_jobs(threads: int, local_processes: int) -> int:
    """Members trained at once by one process: the cores left to it at ``threads`` threads per member."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads) // max(1, local_processes))


def _failure(name: str, rc: int, log_path: Path) -> Exception:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.exists() else []
    last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
    msg = f"compare member {name} failed with exit status {rc}: {last.removeprefix('error: ')} (its log: {log_path})"
    if rc == 3:
        return NonFiniteLossError(msg)
    return OSError(msg) if rc == 1 else MemberFailed(msg)


def run_members(runners: list[Runner], tasks: list[Task], out: Path, jobs: int, in_process: bool,
                limit: int | None = None, poll: float = 0.2) -> tuple[bool, int]:
    """Train every unfinished member of ``tasks``; returns (all finished, members trained here).

    In process (one process, ``jobs == 1``): one after the other, in order. Otherwise each member
    runs in a worker process (``python -m subspaces.compare_worker``), ``jobs`` at a time, a
    member starting once the members it starts from are finished; under several ranks each
    claims the next ready member through a file created exclusively in ``OUTPUT/.claims``, so
    every member is trained once, by whichever rank is free. ``limit`` stops after that many
    members (``--stop-after-runs``).
    """
    trained = 0
    done = lambda t: runners[t.replicate].is_done(t.name)  # noqa: E731
    if in_process:
        for t in tasks:
            if done(t):
                log(f"{runners[t.replicate].root / t.name}: finished earlier, reused")
                continue
            if limit is not None and trained >= limit:
                return False, trained
            t0 = time.perf_counter()
            runners[t.replicate].run_task(t.name)
            trained += 1
            log(f"{runners[t.replicate].root / t.name}: done in {time.perf_counter() - t0:.0f} s")
        return True, trained
    claims = out / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    running: dict[Task, tuple[subprocess.Popen, Any, float, Path]] = {}
    try:
        while True:
            for t, (proc, fh, t0, log_path) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                del running[t]
                if rc != 0:
                    (claims / f"{t.replicate}.{t.name}.failed").write_text(str(rc))
                    raise _failure(f"seed{t.replicate}/{t.name}", rc, log_path)
                log(f"{runners[t.replicate].root / t.name}: done in {time.perf_counter() - t0:.0f} s")
            pending = [t for t in tasks if t not in running and not done(t)]
            failed = [t for t in pending if (claims / f"{t.replicate}.{t.name}.failed").exists()]
            if failed:
                t = failed[0]
                raise MemberFailed(f"compare member seed{t.replicate}/{t.name} failed in another process; its log: "
                                   f"{out / f'seed{t.replicate}' / 'logs' / (t.name + '.log')}")
            if not pending and not running:
                return True, trained
            if limit is not None and trained >= limit:
                if not running:
                    return False, trained
            else:
                for t in pending:
                    if len(running) >= jobs or (limit is not None and trained >= limit):
                        break
                    if not all(runners[t.replicate].is_done(d) for d in t.deps):
                        continue
                    try:   # the claim: exactly one process creates this file
                        os.close(os.open(claims / f"{t.replicate}.{t.name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    except FileExistsError:
                        continue
                    running[t] = _start_worker(runners[t.replicate], t, claims)
                    trained += 1
            time.sleep(poll)
    finally:
        for proc, fh, _, _ in running.values():   # an error or a signal here: stop the workers (they resume next time)
            proc.terminate()
            proc.wait()
            fh.close()


def _start_worker(runner: Runner, task: Task, claims: Path) -> tuple[subprocess.Popen, Any, float, Path]:
    spec = claims / f"{task.replicate}.{task.name}.json"
    write_json({"args": vars(runner.args), "replicate": task.replicate, "seed": runner.seed, "root": str(runner.root),
                "task": task.name}, spec)
    log_path = runner.root / "logs" / f"{task.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "a")
    log(f"{runner.root / task.name}: started in a worker process (log {log_path})")
    proc = subprocess.Popen([sys.executable, "-m", "subspaces.compare_worker", str(spec)], stdout=fh, stderr=subprocess.STDOUT,
                            env=worker_environment(runner.args.threads), start_new_session=False)
    return proc, fh, time.perf_counter(), log_path


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


def evaluate_replicate(args: argparse.Namespace, plan: Plan, data: DataBundle, root: Path) -> dict[str, Any]:
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
        costs[member.name] = round(_train_seconds(member), 1)
    return {"rows": rows, "train_seconds": costs}


# ---------------------------------------------------------------------------------------- aggregation and output
ROW_ORDER = ("Single network", "Ind", "SSE", "FGE", "SWA", "Line midpoint", "Line endpoints", "Line ", "Simplex centre", "Simplex ", "ESPRO")


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
            agg: dict[str, Any] = {"n": len(cells), "members": cells[0]["members"], "cost": cells[0].get("cost", float(k))}
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


def _error_cell(cells: dict[str, Any], k: int, seeds: int) -> str:
    """Error with its members, and its cost where it is not k x B (ESPRO's SPRO epochs)."""
    agg = cells.get(f"{k}B")
    if agg is None:
        return "-"
    cost = agg.get("cost", float(k))
    extra = f", cost {cost:.2f}B" if abs(cost - k) > 1e-9 else ""
    return f"{_cell(agg, 'error', 2, seeds)} ({agg['members']}{extra})"


def render_markdown(title: str, table: dict[str, dict[str, Any]], budgets: list[int], seeds: int, lines: list[str], footer: list[str],
                    claims: list[str] | None = None) -> str:
    head = ["method"] + [f"{k}B error %" for k in budgets] + [f"{k}B NLL" for k in budgets]
    md = [f"# {title}", "", f"Mean{' ± std over ' + str(seeds) + ' seeds' if seeds > 1 else ' (1 seed)'}; "
          "(n) = ensemble members at that budget (and the training cost where it is not k x B); \"Single network\" is the "
          "mean of the Ind networks' own metrics; (ens.) = probability-averaged ensemble of points of one trained subspace.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in table.items():
        errs = [_error_cell(cells, k, seeds) for k in budgets]
        nlls = [_cell(cells.get(f"{k}B"), "nll", 4, seeds) for k in budgets]
        md.append("| " + " | ".join([row] + errs + nlls) + " |")
    head2 = ["method"] + [f"{k}B ECE" for k in budgets] + [f"{k}B Brier" for k in budgets]
    md += ["", "Calibration:", "", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for row, cells in table.items():
        md.append("| " + " | ".join([row] + [_cell(cells.get(f"{k}B"), "ece", 4, seeds) for k in budgets]
                                    + [_cell(cells.get(f"{k}B"), "brier", 4, seeds) for k in budgets]) + " |")
    if claims is not None:
        md += ["", "## Claims", "", "Checked by the run on its own numbers (error in %; a claim is held when it holds on at "
               "least two thirds of the seeds):", ""] + claims
    md += ["", "Budget accounting:", ""] + [f"- {ln}" for ln in lines] + [""] + footer
    return "\n".join(md) + "\n"


def render_csv(per_seed: list[dict[str, Any]], table: dict[str, dict[str, Any]], seeds: list[int], claims: list[Any] | None = None) -> str:
    """One row per (method, budget, seed), then the mean and std rows, then one row per claim and
    seed (method ``claim (b)``, ``held`` 1 or 0; the budget column names what it compares)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "budget", "members", "cost_B", "seed", "error_pct", "acc", "nll", "ece", "brier", "held"])
    for s, rep in zip(seeds, per_seed):
        for row, cells in rep["rows"].items():
            for b, c in cells.items():
                w.writerow([row, b, c["members"], f"{c.get('cost', int(b[:-1])):.4f}", s, f"{100 * (1 - c['acc']):.4f}", f"{c['acc']:.6f}",
                            f"{c['nll']:.6f}", f"{c['ece']:.6f}", f"{c['brier']:.6f}", ""])
    for stat in ("mean", "std"):
        for row, cells in table.items():
            for b, c in cells.items():
                suffix = "" if stat == "mean" else "_std"
                w.writerow([row, b, c["members"], f"{c['cost']:.4f}", stat, f"{c['error' + suffix]:.4f}", f"{c['acc' + suffix]:.6f}",
                            f"{c['nll' + suffix]:.6f}", f"{c['ece' + suffix]:.6f}", f"{c['brier' + suffix]:.6f}", ""])
    for claim in claims or []:
        for s, held in zip(seeds, claim.held_per_seed):
            w.writerow([f"claim ({claim.key})", claim.statement, "", "", s, "", "", "", "", "", int(held)])
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
        errs = [_error_cell(cells, k, seeds) for k in budgets]
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
    t_start = time.perf_counter()
    if args.resume:
        args.output = args.resume
    if args.stop_after_runs is not None and args.stop_after_runs < 0:
        raise ConfigError(f"--stop-after-runs must be >= 0, got {args.stop_after_runs}")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.threads < 1:
        raise ConfigError(f"--threads (torch threads per member) must be >= 1, got {args.threads}")
    if args.jobs < 0:
        raise ConfigError(f"--jobs must be >= 0 (0: as many as the cores allow at --threads each), got {args.jobs}")
    acc = make_accelerator(args)
    world = acc.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    jobs = args.jobs or default_jobs(args.threads, local)
    torch.set_num_threads(args.threads * jobs)   # this process evaluates on the cores its members trained on
    data, _, spec = build_data_and_model(args)
    plan = make_plan(args, len(data.train))
    out = prepare_output(args)
    if acc.is_main_process:
        check_protocol(out, protocol_of(args))
        save_config(args, str(out / "config.yaml"))
        shutil.rmtree(out / ".claims", ignore_errors=True)   # claims of an earlier, stopped job
    acc.wait_for_everyone()
    lines = accounting(plan, args)
    if acc.is_main_process:
        for ln in lines:
            log(ln)
    in_process = world == 1 and jobs == 1
    log(f"rank {acc.process_index} of {world}: {'members one after the other in this process' if in_process else f'{jobs} member(s) at a time in worker processes'}, "
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
    if not acc.is_main_process:   # the main process evaluates; the others are done
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
    g.add_argument("--espro-vertices", type=int, default=3, help="vertices of each ESPRO simplex, its Ind network included (default: %(default)s)")
    g.add_argument("--spro-epochs", type=int, default=1, help="SPRO epochs per added vertex (default: %(default)s)")
    g.add_argument("--spro-lr", type=float, default=0.01, help="SPRO learning rate, cosine per vertex ([B]: 0.01; default: %(default)s)")
    g.add_argument("--spro-samples-per-step", type=int, default=1, help="SPRO points per batch ([B]: 5; each counts in the cost; default: %(default)s)")
    g.add_argument("--spro-volume-lambda", type=float, default=1e-6, help="SPRO volume regulariser on [B]'s scale ([B]: 1e-6; default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=500, help="batch size of the evaluation passes (default: %(default)s)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per member (default: %(default)s)")
    g.add_argument("--jobs", type=int, default=0, help="members trained at once by each process, in worker processes (default: 0 = the "
                                                      "cores divided by --threads and by the processes of this machine; 1 in one process: in-process)")
    g.add_argument("--stop-after-runs", type=int, default=None, help="stop (resumably) after training this many member runs in this job")
