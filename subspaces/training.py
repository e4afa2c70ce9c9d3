"""The training loop shared by every recipe, on accelerate.

One loop (:class:`Trainer`) trains a plain timm model or a subspace: per step the subspace draws
its point (``samples_per_step`` points, one backward each, for [B]'s multi-sample estimate; under DDP
the points' gradients are summed locally and all-reduced once per update), the
loss adds the chosen regulariser (``beta * cos^2`` between anchors' layer weights [W], [B]'s
normalised ``- lambda / log(Vol0^2 + eps) * log(Vol^2 + eps)`` or ``- lambda * log Vol`` for
simplexes), then the optimiser (timm's
``create_optimizer_v2``) and the scheduler (timm's ``create_scheduler_v2`` stepped per update,
or a per-iteration torch scheduler such as FGE's) step. After every epoch it evaluates (a
subspace at its centre, BatchNorm recomputed there), appends a line to ``metrics.jsonl`` and
saves an accelerate checkpoint (:mod:`subspaces.checkpoint`); ``resume`` continues from the
newest complete one.

Run folder::

    config.yaml  metrics.jsonl  checkpoints/checkpoint_<i>/ (accelerate's save_state + manifest.json)
    model.safetensors|json                (standard training)
    subspace.safetensors|json  exports/{centre,anchor0,...}.safetensors|json   (subspaces)
    results.json                          (final evaluation)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from .augment import batch_mixer, mix_batch
from .checkpoint import TrainingProgress, latest_checkpoint, load_checkpoint, prepare_saves, save_checkpoint, use_run_folder
from .data import DataBundle, data_record, make_loader
from .errors import ConfigError, NonFiniteLossError, Preempted
from .evaluation import bn_loader, evaluate_trained
from .io import write_json
from .metrics_log import METRICS_FILE, append_metrics, flat_metrics, keep_epochs, print_epoch
from .models import build_data_and_model, build_data_for_spec, channels_last_input, compile_model, create_timm_model, use_channels_last, wrap_subspace
from .preemption import StopSignals
from .progress import EpochProgress, PendingLosses
from .regularizers import cosine_penalty, log_volume, reference_log_volume, volume_penalty
from .reporting import rank_report, results_table, resume_hint, save_exports, save_results, stopped_message
from .run_folder import make_accelerator, prepare_run
from .settings import TrainConfig, TrainRunConfig
from .subspace import Subspace

__all__ = [   # besides the loop, what recipes and the comparison import from here
    "Trainer", "finish_run", "run_training", "build_scheduler", "check_batch_size",
    "NonFiniteLossError", "bn_loader", "build_data_and_model", "build_data_for_spec", "create_timm_model", "results_table",
    "wrap_subspace",
]

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

#: a run folder's record of its data splits (:func:`subspaces.data.data_record`)
DATA_RECORD = "data.json"


def check_batch_size(batch_size: int, processes: int, train_examples: int) -> None:
    """ConfigError when one batch per process needs more training images than there are."""
    if batch_size * processes > train_examples:
        raise ConfigError(f"--batch-size {batch_size} x {processes} process(es) is more than the {train_examples} training images: "
                          f"use --batch-size <= {train_examples // processes} or a larger --train-subset")


def step_scheduler(scheduler: Any, updates: int) -> None:
    """Advance the lr schedule after update number ``updates``: timm's ``step_update(num_updates)``
    (stepped by hand per update), a torch scheduler's ``step()``, nothing for None."""
    if scheduler is None:
        return
    if hasattr(scheduler, "step_update"):
        scheduler.step_update(num_updates=updates)
    else:
        scheduler.step()


def regulariser(net: nn.Module, args: TrainConfig, volume_reference: float | None) -> torch.Tensor | None:
    """The penalty added to the loss of a subspace: ``beta * cos^2`` between anchors [W] minus the
    volume term [B] (``--volume-form``: ``lambda / volume_reference * volume_penalty`` with
    ``volume_reference`` = log(Vol0^2 + eps), or ``lambda * log Vol``); a 0-dim tensor, or None for
    a plain model or with neither term configured."""
    if not isinstance(net, Subspace):
        return None
    terms = []
    if args.beta:
        terms.append(args.beta * cosine_penalty(net, params=args.beta_params))
    if args.volume_lambda:
        if args.volume_form == "benton":
            terms.append(-args.volume_lambda / volume_reference * volume_penalty(net))
        else:
            terms.append(-args.volume_lambda * log_volume(net))
    return sum(terms[1:], terms[0]) if terms else None


def epoch_sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> torch.Tensor:
    """An epoch's sums on this rank as one float64 tensor [3] (loss x examples, correct, examples)
    for one all-reduce."""
    return torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=loss_sum.device, dtype=torch.float64)])


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainConfig, updates_per_epoch: int,
                    make_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None) -> Any:
    """The lr schedule, stepped after every update: ``make_scheduler(optimizer, updates_per_epoch)``
    when given, else timm's ``create_scheduler_v2`` for ``args.sched``, else None (``sched``
    "none": each group's constant lr set to ``lr * lr_scale``, as every scheduler applies layer
    decay's ``lr_scale`` at each step, timm's convention and :mod:`subspaces.schedules`')."""
    if make_scheduler is not None:
        return make_scheduler(optimizer, updates_per_epoch)
    if args.sched == "none":
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        return None
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                                       min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler


@dataclass
class Trainer:
    """Train ``model`` (plain or Subspace) for ``args.epochs`` epochs on ``data`` with accelerate.

    ``args`` is a :class:`~subspaces.settings.TrainConfig` (every recipe's settings class is
    one; from Python see :meth:`create`).

    ``make_scheduler(optimizer, updates_per_epoch)`` replaces timm's scheduler with a torch one
    stepped after every update; like timm's, it applies layer decay (group g trains at the
    schedule's lr times the group's ``lr_scale``, the optimizer's lrs are left unscaled), as every
    schedule of :mod:`subspaces.schedules` does; ``on_update(trainer, update)`` runs after every optimiser update
    (FGE/SSE collect snapshots there). ``final_evaluation=False``: the trained networks are not
    evaluated after the last epoch nor by :func:`finish_run`, for a caller that evaluates them
    itself (the compare's members). ``train_epochs`` limits the epochs of this process (a
    budget cut: the run stops as if killed after a finished epoch, resumable).

    Checkpoints are accelerate's (``output/checkpoints/checkpoint_<i>``, the newest
    ``args.checkpoint_hist`` kept); the scheduler and :attr:`progress` are saved beside them as
    JSON (not registered with accelerate, which would pickle them: a resume runs no code from the
    folder).
    """

    args: TrainConfig
    model: nn.Module
    data: DataBundle
    spec: dict[str, Any]
    accelerator: Accelerator
    output: Path
    make_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    on_update: Callable[[Trainer, int], None] | None = None
    final_evaluation: bool = True   # False: no evaluation after the last epoch nor in finish_run (the caller evaluates)
    optimizer: Any = None
    scheduler: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    updates: int = 0
    examples_seen: int = 0     # by this rank in this process
    volume_reference: float | None = None   # [B]'s log(Vol0^2 + eps), drawn once in setup from the seed
    mixer: Any = None   # timm's Mixup (--mixup / --cutmix), built in setup
    _soft_target_loss: nn.Module = field(default_factory=SoftTargetCrossEntropy, init=False, repr=False)
    progress: TrainingProgress = field(default_factory=TrainingProgress)   # saved as JSON in each checkpoint
    _net: nn.Module | None = field(default=None, init=False, repr=False)   # the prepared model unwrapped, once

    @classmethod
    def create(cls, config: TrainConfig, model: nn.Module, data: DataBundle, output: str | Path,
               spec: dict[str, Any] | None = None, **hooks: Any) -> Trainer:
        """A Trainer from Python, no command line: accelerate's Accelerator from ``config``
        (mixed precision, accumulation, CPU), the run folder ``output`` created. ``spec`` is the
        model spec saved beside exported networks (see :mod:`subspaces.io`); ``hooks`` are
        ``make_scheduler`` / ``on_update``."""
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        return cls(config, model, data, dict(spec or {}), make_accelerator(config, project_dir=out), out, **hooks)

    @property
    def unwrapped(self) -> nn.Module:
        """The model without accelerate's wrappers (DDP, compile). Unwrapped once after
        ``prepare``: accelerate's ``unwrap_model`` walks the modules on every call (~0.1 ms).
        Compiled models (``--torchcompile``, ``accelerate launch --dynamo_backend``) are unwrapped
        too: evaluation, exports and the subspace's own methods need the module itself."""
        if self._net is not None:
            return self._net
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def setup(self) -> None:
        """Build the optimiser, the batch mixer and the loaders and hand them to accelerate's
        ``prepare``; :meth:`fit` calls it first, and a benchmark that times :meth:`train_epoch`
        alone calls it once itself."""
        a, accelerator = self.args, self.accelerator
        if a.channels_last:
            use_channels_last(self.model)
        self.optimizer = create_optimizer_v2(self.model, opt=a.opt, lr=a.lr, weight_decay=a.weight_decay, momentum=a.momentum,
                                             layer_decay=a.layer_decay)
        self.mixer = batch_mixer(a, int(self.spec.get("num_classes") or self.data.num_classes))
        train_loader = make_loader(self.data.train, a.batch_size, shuffle=True, seed=a.seed, num_workers=a.workers)
        eval_loader = make_loader(self.data.eval, a.batch_size, shuffle=False, num_workers=a.workers)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(self.model, self.optimizer, train_loader, eval_loader)
        self._net = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.model = compile_model(self.model, a.torchcompile, a.torchcompile_mode)
        self.updates_per_epoch = math.ceil(len(self.train_loader) / a.grad_accum_steps)
        check_batch_size(a.batch_size, accelerator.num_processes, len(self.data.train))
        sub = self.unwrapped
        if isinstance(sub, Subspace) and a.volume_lambda and a.volume_form == "benton":
            self.volume_reference = reference_log_volume(sub, seed=a.seed)   # a host number, drawn once before the loop
        self.scheduler = build_scheduler(self.optimizer, a, self.updates_per_epoch, self.make_scheduler)
        use_run_folder(accelerator, self.output, a.checkpoint_hist)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy: against class indices ``[B]`` (label smoothing ``--smoothing``), or
        against mixup's soft targets ``[B, K]`` (smoothing already in them; timm's SoftTargetCrossEntropy)."""
        if target.dim() == 2:
            return self._soft_target_loss(logits.float(), target)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.args.smoothing)

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch and its loss target: mixup / CutMix of the batch with soft targets, or as it is."""
        return (x, y) if self.mixer is None else mix_batch(self.mixer, x, y)

    def _regulariser(self) -> torch.Tensor | None:
        return regulariser(self.unwrapped, self.args, self.volume_reference)

    def evaluate_now(self, final: bool) -> dict[str, dict[str, float]]:
        """Metrics per evaluated point (a plain model: its own BN; a subspace: BN recomputed per point)."""
        return evaluate_trained(self.unwrapped, self.data, self.args, self.accelerator, self.eval_loader, final)

    def fit(self, resume: bool = False, train_epochs: int | None = None) -> dict[str, Any]:
        """Train (or continue from the run folder's checkpoint) up to ``args.epochs`` epochs.

        SIGTERM / SIGINT during training finish the current update, write a checkpoint at that
        step and raise :class:`~subspaces.errors.Preempted`; ``fit(resume=True)`` continues it
        with the same weights as an uninterrupted run (the rest of the epoch's batches in the
        same order). Returns ``{"epochs_done", "finished"}``.
        """
        a, accelerator, out = self.args, self.accelerator, self.output
        self.setup()
        metrics_path = out / METRICS_FILE
        start, position = self._resume(latest_checkpoint(out) if resume else None, metrics_path)
        if accelerator.is_main_process:   # which examples this run trains on: runs that share data can be checked to
            write_json(data_record(self.data), out / DATA_RECORD)
        stop = a.epochs if train_epochs is None else min(a.epochs, start + train_epochs)
        if accelerator.log_with:
            accelerator.init_trackers(out.name or "run", config={k: v for k, v in a.to_dict().items() if isinstance(v, (bool, int, float, str))})
        try:
            with StopSignals(announce=accelerator.is_main_process) as signals:
                for epoch in range(start, stop):
                    self.train_epoch(epoch, signals, position if epoch == start else None)
                    last = epoch + 1 == a.epochs
                    record = self.history[-1]
                    if (last and self.final_evaluation) or (epoch + 1) % a.eval_every == 0:
                        record["eval"] = self.evaluate_now(final=False)
                    if accelerator.is_main_process:
                        append_metrics(metrics_path, record)
                        print_epoch(record)
                    if accelerator.log_with:
                        accelerator.log(flat_metrics(record), step=self.updates)
                    self._save({"epoch": epoch + 1, "updates": self.updates})
                    if self._stop_agreed(signals) and epoch + 1 < stop:
                        raise Preempted(f"{signals.requested or 'a stop on another rank'} after epoch {epoch + 1} of {a.epochs}: "
                                        f"checkpoint written; {resume_hint(out)}")
        finally:
            if accelerator.log_with:
                accelerator.end_training()   # flushes the trackers, also when the run stops early
        return {"epochs_done": stop, "finished": stop == a.epochs}

    def _resume(self, ckpt: Path | None, metrics_path: Path) -> tuple[int, dict[str, Any] | None]:
        """Load checkpoint ``ckpt`` and cut ``metrics.jsonl`` back to its epoch, or with None start
        afresh (``metrics.jsonl`` removed); returns the epoch to start from and the position within
        it (None: at its start). Either way accelerate's save counter is set past ``ckpt``."""
        accelerator = self.accelerator
        start, position = 0, None
        if ckpt is not None:
            net = self.unwrapped
            load_checkpoint(accelerator, ckpt, net if isinstance(net, Subspace) else None, self.progress, self.scheduler)
            start, self.updates, position = self.progress.epoch, self.progress.updates, self.progress.within_epoch
            where = f"epoch {start + 1}, step {position['step']}" if position else f"epoch {start}"
            logger.info(f"resumed from {ckpt} after {where}")
            if accelerator.is_main_process and metrics_path.exists():
                keep_epochs(metrics_path, start)
        elif accelerator.is_main_process and metrics_path.exists():
            metrics_path.unlink()
        prepare_saves(accelerator, self.output, ckpt)
        return start, position

    def _save(self, progress: dict[str, Any]) -> None:
        net = self.unwrapped
        rank_state = net.get_extra_state() if isinstance(net, Subspace) else None
        self.progress.load_state_dict(progress)
        save_checkpoint(self.accelerator, self.progress, self.model, rank_state, self.scheduler)

    def _stop_agreed(self, signals: StopSignals) -> bool:
        """Whether any rank was asked to stop (one all-reduce under DDP, none on one process)."""
        if self.accelerator.num_processes == 1:
            return signals.requested is not None
        flag = torch.full((), float(signals.requested is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    def train_epoch(self, epoch: int, signals: StopSignals, position: dict[str, Any] | None = None) -> None:
        """One epoch, from batch ``position["step"]`` on when resuming a stopped one.

        The step has no host synchronisation: each step's loss and predicted classes stay on the
        device (one argmax a step); every ``log_interval`` steps and at the epoch's end the losses
        are weighed by batch size and checked for non-finite values (naming the first bad step,
        update and value), the predictions compared with the labels, both added to the epoch's
        sums and read together with the stop requests of all ranks (one small all-reduce under DDP).
        """
        a, accelerator = self.args, self.accelerator
        self.model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        total = len(self.train_loader)
        first = int(position["step"]) if position else 0
        loader = accelerator.skip_first_batches(self.train_loader, first) if first else self.train_loader
        device = accelerator.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen, elapsed_before = 0, 0.0
        if position and accelerator.is_main_process:   # the sums over all ranks so far live on the main process
            loss_sum += position["loss_sum"]
            correct += int(position["correct"])
            seen, elapsed_before = int(position["seen"]), float(position["seconds"])
        samples = a.samples_per_step
        interval = max(1, a.log_interval)
        pending = PendingLosses(device, first + 1)
        accumulating, no_accumulation = a.grad_accum_steps > 1, contextlib.nullcontext()
        single = accelerator.num_processes == 1
        channels_last = a.channels_last
        # [B]'s first S-1 points add their gradients locally (DDP decides in the forward, so the
        # forward goes inside too); the last point's backward all-reduces the sum, once per update:
        # sum_s mean_r g_rs = mean_r sum_s g_rs. Accumulation's no_sync wraps micro-batches that don't sync.
        local_points = contextlib.nullcontext if single else (lambda: accelerator.no_sync(self.model))
        bar = EpochProgress(accelerator, total, epoch, a.epochs, interval, start=first)
        t0 = time.perf_counter()
        try:
            for step, (x, y) in enumerate(loader, start=first + 1):
                if channels_last:
                    x = channels_last_input(x)
                x, target = self._mix(x, y)   # train accuracy below stays against the original labels y
                with accelerator.accumulate(self.model) if accumulating else no_accumulation:
                    if samples > 1:
                        with local_points():
                            for _ in range(samples - 1):   # [B]: E_p L(w(p)) from several points per batch, one backward each
                                accelerator.backward(self._loss(self.model(x), target) / samples)
                    logits = self.model(x)
                    data_loss = self._loss(logits, target)
                    loss = data_loss / samples if samples > 1 else data_loss
                    reg = self._regulariser()
                    if reg is not None:
                        loss = loss + reg.to(loss.dtype)
                    logged = loss if samples == 1 else data_loss + (reg.to(data_loss.dtype) if reg is not None else 0)
                    # the last point's loss and the regulariser, and its predictions: compared with y at the check-in
                    pending.add(logged.detach().float(), logits.detach(), y, self.updates + 1)
                    accelerator.backward(loss)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    self.updates += 1
                    step_scheduler(self.scheduler, self.updates)
                    if self.on_update is not None:
                        self.on_update(self, self.updates)
                self.examples_seen += y.shape[0]
                seen += y.shape[0]
                if bar.moving:
                    bar.advance(step)
                at_interval = step % interval == 0 or step == total
                local_stop = single and signals.requested is not None
                if not (at_interval or local_stop):
                    continue
                stop, mean_loss, accuracy = self._check_in(epoch, step, signals, pending, loss_sum, correct, seen)
                if at_interval:
                    lr = self.optimizer.param_groups[0]["lr"]
                    rate = (seen - (position["seen"] if position and accelerator.is_main_process else 0)) * accelerator.num_processes
                    rate /= max(time.perf_counter() - t0, 1e-9)
                    bar.update(step, f"loss {mean_loss:.4f} acc {accuracy:.3f} lr {lr:.3g} {rate:.0f} samples/s")
                    if accelerator.log_with and accelerator.sync_gradients:
                        accelerator.log({"train_loss": mean_loss, "train_acc": accuracy, "lr": lr, "samples_per_s": rate}, step=self.updates)
                if stop and accelerator.sync_gradients:
                    self._stop_within_epoch(epoch, step, loss_sum, correct, seen, elapsed_before + time.perf_counter() - t0, signals)
        finally:
            bar.close()
        totals = accelerator.reduce(epoch_sums(loss_sum, correct, seen), reduction="sum").tolist()
        elapsed = elapsed_before + time.perf_counter() - t0
        self.history.append({
            "epoch": epoch + 1, "updates": self.updates, "train_loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2], "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": totals[2] / elapsed, "seconds": elapsed,
        })

    def _check_in(self, epoch: int, step: int, signals: StopSignals, pending: PendingLosses, loss_sum: torch.Tensor,
                  correct: torch.Tensor, seen: int) -> tuple[bool, float, float]:
        """The loop's one host synchronisation per log interval: raise NonFiniteLossError if a loss
        since the last check was NaN / infinite on any rank; else add the pending losses to
        ``loss_sum`` and the pending correct predictions to ``correct`` (in place) and return
        whether any rank was asked to stop, and this rank's mean loss and accuracy so far (for the
        progress line)."""
        accelerator = self.accelerator
        losses = pending.values()
        bad = ~torch.isfinite(losses)
        any_local = bad.any()
        first_bad = torch.where(any_local, bad.int().argmax(), -1)
        stop = torch.full((), float(signals.requested is not None), device=accelerator.device)
        flags = torch.stack([any_local.float(), stop])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        loss_sum += torch.where(any_local, 0.0, losses.sum())
        correct += pending.correct()
        any_bad, any_stop, index, loss_total, correct_total = torch.cat(
            [flags, first_bad.reshape(1).float(), loss_sum.reshape(1).float(), correct.reshape(1).float()]).tolist()
        if any_bad:
            done = latest_checkpoint(self.output, verify=False)
            kept = f"the last good checkpoint {done} is kept" if done else "no checkpoint was written yet"
            raise NonFiniteLossError(f"{pending.where_not_finite(losses, int(index), epoch, step)}, found at the check of step {step}: "
                                     f"the run stopped; {kept}. Lower --lr, or try --mixed-precision no / bf16")
        pending.clear(step + 1)
        return bool(any_stop), loss_total / max(seen, 1), correct_total / max(seen, 1)

    def _stop_within_epoch(self, epoch: int, step: int, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int,
                           seconds: float, signals: StopSignals) -> None:
        """Checkpoint at this step (the epoch's sums so far, over all ranks) and raise Preempted."""
        accelerator = self.accelerator
        sums = epoch_sums(loss_sum, correct, seen)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        loss_total, correct_total, seen_total = sums.tolist()
        position = {"step": step, "loss_sum": loss_total, "correct": int(correct_total), "seen": int(seen_total), "seconds": seconds}
        self._save({"epoch": epoch, "updates": self.updates, "within_epoch": position})
        raise Preempted(f"{signals.requested or 'a stop on another rank'} at epoch {epoch + 1}, step {step} of "
                        f"{len(self.train_loader)} (update {self.updates}): checkpoint written; {resume_hint(self.output)}")


def finish_run(trainer: Trainer, title: str) -> dict[str, dict[str, float]]:
    """Final evaluation (every anchor too), exports and results.json; prints the results table.
    A trainer without ``final_evaluation`` (its caller evaluates the networks itself) records no
    metrics in results.json."""
    accelerator, out = trainer.accelerator, trainer.output
    results = trainer.evaluate_now(final=True) if trainer.final_evaluation else {}
    if accelerator.is_main_process:
        save_exports(trainer.unwrapped, out, trainer.spec, trainer.data, trainer.args)
        save_results(title, results, out)
    write_json(rank_report(trainer.unwrapped, accelerator, trainer.examples_seen, results), out / "ranks" / f"rank{accelerator.process_index}.json")
    accelerator.wait_for_everyone()
    return results


def run_training(args: TrainRunConfig, title: str | None = None) -> dict[str, Any]:
    """The whole of ``recipes/train.py``: build, train (or resume), evaluate, export; ``title``
    heads the results table (default: the model, the dataset and what was trained)."""
    if title is None:
        what = "standard training" if args.subspace == "none" else f"{args.subspace} from scratch"
        title = f"{args.model} on {args.dataset}: {what}"
    with prepare_run(args) as run:
        data, model, spec = build_data_and_model(args)
        net = wrap_subspace(args, model, rank=run.accelerator.process_index)
        run.record(spec)
        trainer = Trainer(args, net, data, spec, run.accelerator, run.out)
        status = trainer.fit(resume=bool(args.resume), train_epochs=args.stop_after_epochs)
        if not status["finished"]:
            logger.info(stopped_message(run.out, status["epochs_done"], args.epochs))
            return {"finished": False}
        return {"finished": True, "results": finish_run(trainer, title)}
