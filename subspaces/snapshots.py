"""Fast Geometric Ensembling, snapshot ensembles and SWA on the shared Trainer (docs/science.md §3).

- **FGE** [G]: start from a trained network *and its optimiser state* (the momentum buffers of a
  run folder's newest checkpoint, ``checkpoints/checkpoint_<i>/optimizer.bin``), then SGD with the per-iteration cyclical learning rate
  :class:`~subspaces.schedules.FGESchedule`; a snapshot is taken after every iteration i with
  mod(i, c) = c/2 (the learning-rate minimum alpha2).
- **SSE** [S]: from scratch, cosine annealing restarted every c iterations
  (:class:`~subspaces.schedules.SSESchedule`); a snapshot at the end of every cycle, mod(i, c) = 0.
- **SWA** [SWA]: the average in weight space of (FGE) snapshots, BatchNorm recomputed.

Every snapshot is saved as a plain model (``snapshots/NNNNNNN.safetensors`` + ``.json``, NNNNNNN
the iteration) with its BatchNorm statistics recomputed at its own weights on the unaugmented
training data (``data.bn``), so an ensemble of snapshots is ``load_ensemble(paths)``.

Run folder of :func:`train_snapshots`::

    config.yaml  metrics.jsonl  checkpoints/  snapshots/0000009.safetensors|json ...
    snapshots.json     (written when the run is finished: method, cycle, learning rates, snapshot list)
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from accelerate.logging import get_logger

from .bn import update_bn
from .checkpoint import has_checkpoint, optimizer_state_file
from .errors import ConfigError
from .data import DataBundle, make_loader
from .io import CheckpointError, load_model, load_model_with_spec, resolve_model_path, save_model, write_json
from .ensembles import evaluate, load_ensemble
from .schedules import FGESchedule, SSESchedule, fge_is_snapshot, sse_is_snapshot
from .run_folder import describe_input, make_accelerator, prepare_run, write_run_config
from .settings import FGEConfig, SSEConfig, TrainConfig
from .models import build_data_and_model, build_data_for_spec
from .reporting import results_table, stopped_message
from .training import Trainer

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

METHODS = ("fge", "sse")
SNAPSHOT_DIR = "snapshots"
INDEX = "snapshots.json"


# ---------------------------------------------------------------------------------------- cycles
def updates_per_epoch(num_examples: int, batch_size: int, num_processes: int = 1, grad_accum_steps: int = 1) -> int:
    """Optimiser updates per epoch of the Trainer: ceil(ceil(ceil(N / batch) / processes) / accumulation)."""
    batches = math.ceil(num_examples / batch_size)
    per_process = math.ceil(batches / max(1, num_processes))
    return math.ceil(per_process / max(1, grad_accum_steps))


def cycle_iterations(method: str, upe: int, cycle_epochs: float | None = None, cycle_iters: int | None = None) -> int:
    """The cycle in iterations from ``--cycle`` (epochs, e.g. 2 as in [G]) or ``--cycle-iters``.

    FGE needs an even number of iterations (the snapshot is at c/2): an odd one is refused with
    the two nearest even values rather than silently rounded.
    """
    if (cycle_epochs is None) == (cycle_iters is None):
        raise ConfigError("give the cycle length either in epochs (--cycle) or in iterations (--cycle-iters), not both")
    if cycle_iters is not None:
        c, what = int(cycle_iters), f"--cycle-iters {cycle_iters}"
    else:
        if cycle_epochs <= 0:
            raise ConfigError(f"--cycle {cycle_epochs}: the cycle length in epochs must be > 0")
        exact = cycle_epochs * upe
        c = round(exact)
        if abs(exact - c) > 1e-6:
            raise ConfigError(f"--cycle {cycle_epochs} epochs is {exact:g} iterations ({upe} per epoch), not a whole number; use --cycle-iters")
        what = f"--cycle {cycle_epochs:g} epochs = {c} iterations ({upe} per epoch)"
    if c < 1:
        raise ConfigError(f"{what}: a cycle needs at least 1 iteration")
    if method == "fge" and (c < 2 or c % 2):
        lo, hi = max(2, c - 1 - (c - 1) % 2), c + 1 + (c + 1) % 2
        raise ConfigError(f"{what}: FGE needs an even cycle in iterations (snapshot at c/2); use --cycle-iters {lo} or {hi}")
    return c


def validate_cycle(method: str, cycle: int, run_iters: int, budget_iters: int | None = None) -> None:
    """The run (and, when given, the budget it is counted against) must hold at least one cycle."""
    if cycle > run_iters:
        raise ConfigError(
            f"{method.upper()} cycle of {cycle} iterations is longer than the run ({run_iters} iterations): "
            "shorten --cycle/--cycle-iters or raise --epochs"
        )
    if budget_iters is not None and budget_iters < cycle:
        raise ConfigError(
            f"the budget leaves {method.upper()} {max(budget_iters, 0)} iterations, less than one cycle of {cycle}: "
            "shorten the cycle or raise the budget"
        )


def snapshot_rule(method: str, cycle: int) -> Callable[[int], bool]:
    """``rule(i)``: whether a snapshot is taken after 1-based iteration i (FGE: mod(i,c)=c/2; SSE: mod(i,c)=0)."""
    if method == "fge":
        return lambda i: fge_is_snapshot(i, cycle)
    if method == "sse":
        return lambda i: sse_is_snapshot(i, cycle)
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def make_schedule(method: str, cycle: int, lr_max: float, lr_min: float = 0.0) -> Callable[[torch.optim.Optimizer], Any]:
    if method == "fge":
        return lambda opt: FGESchedule(opt, cycle=cycle, lr_max=lr_max, lr_min=lr_min)
    if method == "sse":
        return lambda opt: SSESchedule(opt, cycle=cycle, lr_max=lr_max)
    raise ValueError(f"method {method!r} is not one of {METHODS}")


# ---------------------------------------------------------------------------------------- snapshots
@dataclass(frozen=True)
class Snapshot:
    iteration: int
    path: Path


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots saved in a run folder (or its ``snapshots/``), sorted by iteration."""
    folder = Path(folder)
    if (folder / SNAPSHOT_DIR).is_dir():
        folder = folder / SNAPSHOT_DIR
    found = []
    for p in folder.glob("*.safetensors"):
        if p.stem.isdigit() and p.with_suffix(".json").exists():
            found.append(Snapshot(int(p.stem), p))
    return sorted(found, key=lambda s: s.iteration)


class SnapshotSaver:
    """The Trainer's ``on_update`` hook: after iteration i with ``rule(i)``, save a copy of the
    model with BatchNorm recomputed on ``bn_loader`` (the training model is left untouched)."""

    def __init__(self, rule: Callable[[int], bool], folder: Path, spec: dict[str, Any], bn_loader: Iterable | None,
                 bn_batches: int | None, info: dict[str, Any] | None = None) -> None:
        self.rule, self.folder, self.spec = rule, Path(folder), spec
        self.bn_loader, self.bn_batches, self.info = bn_loader, bn_batches, dict(info or {})
        self.taken: list[int] = []

    def __call__(self, trainer: Any, update: int) -> None:
        if not self.rule(update):
            return
        self.taken.append(update)
        if not trainer.accelerator.is_main_process:
            return
        net = copy.deepcopy(trainer.unwrapped)
        if self.bn_loader is not None:
            update_bn(net, self.bn_loader, max_batches=self.bn_batches)
        epoch = update / trainer.updates_per_epoch
        save_model(net.eval(), self.folder / f"{update:07d}", {**self.spec, **self.info, "iteration": update, "epoch": epoch})
        print(f"snapshot after iteration {update} (epoch {epoch:.2f}) -> {self.folder / f'{update:07d}.safetensors'}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- pretrained start
def find_pretrained(path: str | Path) -> tuple[Path, Path | None]:
    """(model file, optimiser state or None) of a trained network: a run folder (its
    ``model.safetensors`` and the ``optimizer.bin`` of its newest complete checkpoint) or a
    ``.safetensors`` file (the checkpoints beside it, if any)."""
    model_path = resolve_model_path(path)
    folder = Path(path) if Path(path).is_dir() else model_path.parent
    return model_path, optimizer_state_file(folder)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | Path | None) -> str:
    """Load the per-parameter state (SGD's momentum buffers) of a saved optimiser into ``optimizer``,
    keeping ``optimizer``'s own hyper-parameters (lr, weight decay, momentum). Returns a sentence
    saying what was done; a missing file or a different parameter layout loads nothing."""
    if path is None:
        return "no optimiser state found beside the checkpoint: momentum buffers start at zero"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported, not fatal
        raise CheckpointError(f"cannot read the optimiser state {path}: {str(err).splitlines()[0]}") from None
    current = optimizer.state_dict()
    groups_now, groups_saved = current["param_groups"], saved.get("param_groups", [])
    shapes_now = [p.shape for g in optimizer.param_groups for p in g["params"]]
    layout_now = [len(g["params"]) for g in groups_now]
    layout_saved = [len(g["params"]) for g in groups_saved]
    if layout_now != layout_saved:
        return f"optimiser state {path} has parameter groups of sizes {layout_saved}, this model {layout_now}: not loaded, momentum starts at zero"
    index_to_shape = {}
    for g_saved, g_now in zip(groups_saved, groups_now):
        for i_saved, i_now in zip(g_saved["params"], g_now["params"]):
            index_to_shape[i_saved] = shapes_now[i_now]
    for i, st in saved.get("state", {}).items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != index_to_shape.get(i):
                return f"optimiser state {path}: '{key}' of parameter {i} has shape {tuple(value.shape)}, not {tuple(index_to_shape.get(i, ()))}: not loaded"
    merged = {"state": saved.get("state", {}),
              "param_groups": [{**g_now, "params": g_saved["params"]} for g_saved, g_now in zip(groups_saved, groups_now)]}
    optimizer.load_state_dict(merged)
    kinds = sorted({k for st in saved.get("state", {}).values() for k in st})
    return (f"loaded the optimiser state of {len(saved.get('state', {}))} parameters ({', '.join(kinds) or 'empty'}) "
            f"from {path}; learning rate, weight decay and momentum are this run's")


# ---------------------------------------------------------------------------------------- SWA
@torch.no_grad()
def swa_average(models: Sequence[nn.Module | str | Path], bn_loader: Iterable | None = None, bn_batches: int | None = None) -> nn.Module:
    """SWA: the equal-weight average of the members' parameters (``torch.optim.swa_utils.AveragedModel``),
    then BatchNorm recomputed on ``bn_loader`` at the averaged weights. Members are models or paths."""
    if len(models) == 0:
        raise ValueError("swa_average needs at least one model")
    averaged = None
    for m in models:
        net = load_model(m) if isinstance(m, (str, Path)) else m
        if averaged is None:   # a copy of the first member; nothing averaged yet (n_averaged = 0)
            averaged = torch.optim.swa_utils.AveragedModel(net, use_buffers=False)
        averaged.update_parameters(net)
    assert averaged is not None
    out = averaged.module   # a deep copy of the first member (its spec attribute too), parameters averaged
    if bn_loader is not None:
        update_bn(out, bn_loader, max_batches=bn_batches)
    return out.eval()


# ---------------------------------------------------------------------------------------- runner
def is_finished(folder: str | Path) -> bool:
    """Whether a snapshot run folder is complete (its ``snapshots.json`` says so)."""
    index = Path(folder) / INDEX
    if not index.exists():
        return False
    try:
        return bool(json.loads(index.read_text()).get("finished"))
    except json.JSONDecodeError:
        return False


def train_snapshots(
    method: str,
    args: TrainConfig,
    model: nn.Module,
    data: DataBundle,
    spec: dict[str, Any],
    output: str | Path,
    *,
    cycle: int,
    lr_max: float,
    lr_min: float = 0.0,
    optimizer_state: str | Path | None = None,
    accelerator: Any = None,
    info: dict[str, Any] | None = None,
    train_epochs: int | None = None,
    final_evaluation: bool = True,
) -> dict[str, Any]:
    """Train ``model`` for ``args.epochs`` epochs with the FGE or SSE schedule, saving snapshots.

    ``cycle`` is in iterations (optimiser updates). ``optimizer_state`` (FGE): a saved optimiser
    whose momentum buffers are loaded before the first step. The run resumes from
    ``output/checkpoints`` when there is a complete one. Returns ``{"finished", "snapshots": [Snapshot],
    "optimizer": sentence}``; a finished run writes ``output/snapshots.json``. ``final_evaluation``:
    as the :class:`~subspaces.training.Trainer`'s (False: no evaluation after the last epoch).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(args, project_dir=out)
    schedule = make_schedule(method, cycle, lr_max, lr_min)
    loaded = {"optimizer": "SSE starts from scratch: fresh optimiser"} if method == "sse" else {}

    resume = has_checkpoint(out)
    if resume:
        loaded["optimizer"] = "resumed: optimiser and schedule state from this run's own checkpoint"

    def make_scheduler(optimizer: torch.optim.Optimizer, upe: int) -> Any:
        if method == "fge" and not resume:   # a resumed run loads its own optimiser state afterwards
            loaded["optimizer"] = load_optimizer_state(optimizer, optimizer_state)
            logger.info(loaded["optimizer"])
        return schedule(optimizer)

    bn_loader = make_loader(data.bn, args.batch_size, shuffle=False)
    meta = {"method": method, "cycle": cycle, "lr_max": lr_max, "lr_min": lr_min, **(info or {})}
    saver = SnapshotSaver(snapshot_rule(method, cycle), out / SNAPSHOT_DIR, spec, bn_loader, args.bn_batches, {"snapshot_of": meta})
    if accelerator.is_main_process:
        write_run_config(args, out, spec)
    trainer = Trainer(args, model, data, spec, accelerator, out, make_scheduler=make_scheduler, on_update=saver,
                      final_evaluation=final_evaluation)
    status = trainer.fit(resume=resume, train_epochs=train_epochs)
    snaps = list_snapshots(out)
    if status["finished"] and accelerator.is_main_process:
        write_json({**meta, "finished": True, "epochs": args.epochs, "updates": trainer.updates,
                    "updates_per_epoch": trainer.updates_per_epoch, "optimizer": loaded.get("optimizer", "resumed from this run's checkpoint"),
                    "snapshots": [{"iteration": s.iteration, "path": str(s.path.relative_to(out))} for s in snaps]}, out / INDEX)
    accelerator.wait_for_everyone()
    return {"finished": status["finished"], "snapshots": snaps, "optimizer": loaded.get("optimizer"), "trainer": trainer}


# ---------------------------------------------------------------------------------------- recipes
def _evaluate_snapshots(method: str, args: TrainConfig, out: Path, data: DataBundle, spec: dict[str, Any], start: nn.Module | None,
                        title: str) -> dict[str, Any]:
    """Final evaluation of a snapshot run: the ensemble after 1..M snapshots, (FGE) SWA and the start."""
    from rich.console import Console


    snaps = list_snapshots(out)
    if not snaps:
        raise ConfigError(f"{out} holds no snapshots: the run ended before the first snapshot")
    eval_loader = make_loader(data.eval, args.batch_size, shuffle=False)
    bn_loader = make_loader(data.bn, args.batch_size, shuffle=False)
    ens = evaluate(load_ensemble([s.path for s in snaps]), eval_loader, num_classes=data.num_classes, per_member=True)
    by_size = ens.pop("by_size")
    results: dict[str, dict[str, float]] = {}
    if start is not None:
        results["start (pretrained)"] = evaluate(start, eval_loader, num_classes=data.num_classes)
    results["snapshot 1"] = by_size[0]
    results[f"last snapshot (iteration {snaps[-1].iteration})"] = evaluate(load_model(snaps[-1].path), eval_loader, num_classes=data.num_classes)
    results[f"{method.upper()} ensemble ({len(snaps)} snapshots)"] = ens
    if method == "fge":
        swa = swa_average([s.path for s in snaps], bn_loader, args.bn_batches)
        save_model(swa, out / "swa", {**spec, "swa_of": [s.iteration for s in snaps]})
        results[f"SWA ({len(snaps)} snapshots)"] = evaluate(swa, eval_loader, num_classes=data.num_classes)
    write_json({"title": title, "results": results, "by_size": by_size, "snapshots": [s.iteration for s in snaps]}, out / "results.json")
    Console().print(results_table(title, results))
    return results


def run_fge(args: FGEConfig) -> dict[str, Any]:
    """The whole of ``recipes/fge.py``: load the trained network and its optimiser state, run the
    cyclical schedule, save snapshots, evaluate the ensemble and SWA."""
    model_path, opt_path = find_pretrained(args.checkpoint)
    start, start_spec = load_model_with_spec(model_path)
    spec = {k: v for k, v in start_spec.items() if k not in ("kind", "point", "weights", "iteration", "epoch", "snapshot_of", "pretrain_of")}
    with prepare_run(args) as run:
        accelerator, out = run.accelerator, run.out
        data = build_data_for_spec(args, spec, start)
        upe = updates_per_epoch(len(data.train), args.batch_size, accelerator.num_processes, args.grad_accum_steps)
        cycle = cycle_iterations("fge", upe, args.cycle, args.cycle_iters)
        validate_cycle("fge", cycle, args.epochs * upe)
        logger.info(describe_input(spec))
        model = copy.deepcopy(start)
        logger.info(f"FGE from {model_path}: {args.epochs} epochs x {upe} iterations, cycle {cycle} iterations "
                          f"(lr {args.lr_max:g} -> {args.lr_min:g} -> {args.lr_max:g}), snapshots at mod(i, {cycle}) = {cycle // 2}")
        res = train_snapshots("fge", args, model, data, spec, out, cycle=cycle, lr_max=args.lr_max, lr_min=args.lr_min,
                              optimizer_state=opt_path, accelerator=accelerator, info={"start": str(model_path)},
                              train_epochs=args.stop_after_epochs)
        if not res["finished"]:
            logger.info(stopped_message(out, res["trainer"].history[-1]["epoch"] if res["trainer"].history else 0))
            return {"finished": False}
        if not accelerator.is_main_process:
            return {"finished": True}
        return {"finished": True, "results": _evaluate_snapshots("fge", args, out, data, spec, start, f"FGE from {args.checkpoint}")}


def run_sse(args: SSEConfig) -> dict[str, Any]:
    """The whole of ``recipes/sse.py``: a network from scratch with cosine restarts, a snapshot per cycle."""
    lr_max = args.lr_max if args.lr_max is not None else args.lr
    with prepare_run(args) as run:
        accelerator, out = run.accelerator, run.out
        data, model, spec = build_data_and_model(args)
        upe = updates_per_epoch(len(data.train), args.batch_size, accelerator.num_processes, args.grad_accum_steps)
        cycle = cycle_iterations("sse", upe, args.cycle, args.cycle_iters)
        validate_cycle("sse", cycle, args.epochs * upe)
        logger.info(describe_input(spec))
        logger.info(f"SSE: {args.epochs} epochs x {upe} iterations, cosine from {lr_max:g} restarted every {cycle} iterations, "
                          f"{args.epochs * upe // cycle} snapshots")
        res = train_snapshots("sse", args, model, data, spec, out, cycle=cycle, lr_max=lr_max, accelerator=accelerator,
                              train_epochs=args.stop_after_epochs)
        if not res["finished"]:
            logger.info(stopped_message(out))
            return {"finished": False}
        if not accelerator.is_main_process:
            return {"finished": True}
        return {"finished": True, "results": _evaluate_snapshots("sse", args, out, data, spec, None, f"SSE: {args.model} on {args.dataset}")}
