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
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import is_compiled_module
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from accelerate.logging import get_logger

from .augment import augmentation_from, batch_mixer, mix_batch
from .bn import update_bn
from .checkpoint import TrainingProgress, latest_checkpoint, load_checkpoint, prepare_saves, save_checkpoint, use_run_folder
from .data import DataBundle, build_datasets, data_record, infer_input_spec, make_loader
from .ensembles import evaluate
from .errors import ConfigError, NonFiniteLossError, Preempted
from .preemption import StopSignals
from .run_folder import make_accelerator, prepare_run
from .io import save_export, save_subspace, write_json
from .regularizers import cosine_penalty, log_volume, reference_log_volume, volume_penalty
from .shape_registry import get_shape
from .subspace import Subspace, layout_for
from .settings import POINT_SEED_STRIDE, DataConfig, DataRun, ModelConfig, ModelRun, TrainConfig, TrainRunConfig

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

#: a run folder's record of its data splits (:func:`subspaces.data.data_record`)
DATA_RECORD = "data.json"


# ---------------------------------------------------------------------------------------- setup
def create_timm_model(args: ModelConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` from the settings; ``img_size`` goes to models that take one (ViTs)."""
    kwargs = dict(args.model_kwargs or {})
    if args.img_size is not None and "img_size" not in kwargs:
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, in_chans=in_chans, img_size=args.img_size, **kwargs)
            kwargs["img_size"] = args.img_size
            return model, kwargs
        except TypeError:
            pass
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return model, kwargs


def data_seed(args: DataConfig) -> int:
    """The seed of the subset / held-out draws: ``data_seed``, else the run's ``seed``."""
    return int(args.data_seed if args.data_seed is not None else args.seed)  # type: ignore[attr-defined]


def build_data_and_model(args: ModelRun) -> tuple[DataBundle, nn.Module, dict[str, Any]]:
    """Dataset (sized for the model) and a fresh timm model, plus the spec that recreates it.

    Normalisation: the dataset's mean / std, or with ``pretrained`` the model's pretrained_cfg
    ones (timm's ``resolve_data_config``), which its weights were trained with."""
    common = dict(root=args.data_dir, img_size=args.img_size, train_subset=args.train_subset,
                  eval_subset=args.eval_subset, holdout=args.holdout, seed=data_seed(args), augment=augmentation_from(args))
    data = build_datasets(args.dataset, in_chans=args.in_chans, **common)
    num_classes = args.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {data.num_classes} classes of {args.dataset}")
    model, kwargs = create_timm_model(args, num_classes, args.in_chans or data.in_chans)
    if args.pretrained:   # pretrained weights expect the inputs they were trained on: their own mean / std
        stats = timm.data.resolve_data_config({}, model=model)
        common.update(mean=stats["mean"], std=stats["std"])
    data = build_datasets(args.dataset, in_chans=args.in_chans or data.in_chans, model=model, **common)
    if args.img_size is None and not _accepts(model, data.in_chans, data.img_size):
        size = infer_input_spec(model)[1]
        if size is None or not _accepts(model, data.in_chans, size):
            raise ConfigError(f"{args.model} does not run on {data.img_size}px inputs; pass --img-size with a size it accepts")
        print(f"{args.model} needs larger inputs than {data.img_size}px: images are resized to {size}px", file=sys.stderr)
        common["img_size"] = size
        data = build_datasets(args.dataset, in_chans=data.in_chans, model=model, **common)
    check_input_size(model, data.img_size, args.model)
    spec = {"model": args.model, "num_classes": num_classes, "in_chans": data.in_chans, "model_kwargs": kwargs,
            "img_size": data.img_size, "mean": list(data.mean), "std": list(data.std), "dataset": args.dataset}
    return data, model, spec


def check_input_size(model: nn.Module, img_size: int | None, name: str) -> None:
    """ConfigError when ``img_size`` leaves less than 2x2 pixels after the model's stem (the
    first reduction of timm's ``feature_info``): such a network trains to chance and says nothing."""
    info = getattr(model, "feature_info", None)
    if not img_size or not isinstance(info, list) or not info or not isinstance(info[0], dict) or "reduction" not in info[0]:
        return
    stem = int(info[0]["reduction"])
    if img_size < 2 * stem:
        raise ConfigError(f"--img-size {img_size} is too small for {name}: its stem reduces by {stem}, leaving less than 2x2 pixels; "
                          f"use --img-size >= {2 * stem} (or leave it out for the dataset's own size)")


def _accepts(model: nn.Module, in_chans: int, size: int) -> bool:
    """Whether ``model`` runs on a [2, in_chans, size, size] input (a probe forward, eval mode)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, in_chans, size, size))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        model.train(was_training)


def build_data_for_spec(args: DataRun, spec: dict[str, Any], model: nn.Module) -> DataBundle:
    """The dataset a trained model was made for (``spec``: its size, channels and normalisation),
    unless ``args.dataset`` says otherwise; training images augmented as the settings say."""
    args.dataset = args.dataset or spec.get("dataset", "fashion-mnist")
    same = args.dataset == spec.get("dataset", args.dataset)
    return build_datasets(args.dataset, root=args.data_dir, img_size=spec.get("img_size"), in_chans=spec["in_chans"],
                          train_subset=args.train_subset, eval_subset=args.eval_subset, holdout=args.holdout,
                          seed=data_seed(args), model=model, augment=augmentation_from(args),
                          mean=spec.get("mean") if same else None, std=spec.get("std") if same else None)


def wrap_subspace(args: TrainRunConfig, model: nn.Module, rank: int = 0) -> nn.Module:
    """The model itself (``subspace`` "none") or a subspace of it learned from scratch; each rank
    draws its own points (seed + POINT_SEED_STRIDE x rank) unless ``same_point``."""
    if args.subspace == "none":
        return model
    seed = args.seed if args.same_point else args.seed + POINT_SEED_STRIDE * rank
    sampling = "layerwise" if args.layerwise else args.sampling
    layout = layout_for(args.opt, args.layer_decay)
    return get_shape(args.subspace).cls(model, sampling=sampling, seed=seed, include=args.include, exclude=args.exclude,
                                        layout=layout, **args.shape_kwargs())


def compile_model(model: nn.Module, backend: str | None, mode: str | None = None) -> nn.Module:
    """``torch.compile(model)`` for training with ``backend`` / ``mode`` (timm's ``--torchcompile``),
    or ``model`` itself when ``backend`` is None or it is compiled already (an Accelerator with
    its own dynamo plugin). Compiled after ``accelerator.prepare``, so that accelerate's
    registered model, and so the checkpoints' keys, stay the eager module's: a compiled run
    resumes eagerly and the other way round.

    ``dynamic=False``: a batch of another size (an epoch's last) compiles a second graph
    once, instead of turning every graph's batch dimension symbolic. A subspace's moving point
    does not recompile: the point and its coefficients are tensors drawn outside the graph
    (``Subspace._coeffs_for`` is not traced), the same graph serves every point."""
    if backend is None or is_compiled_module(model):
        return model
    return torch.compile(model, backend=backend, mode=mode, dynamic=False)


# ---------------------------------------------------------------------------------------- evaluation
def bn_loader(data: DataBundle, batch_size: int) -> Any:
    """Unaugmented images for BatchNorm recomputation: the held-out split if there is one
    (``--holdout N``), else the training images without augmentation. Same on every rank."""
    return make_loader(data.holdout if data.holdout is not None else data.bn, batch_size, shuffle=False)


def eval_plain(model: nn.Module, data: DataBundle, args: TrainConfig, accelerator: Accelerator, eval_loader: Any, recompute_bn: bool = True) -> dict[str, float]:
    """Metrics of a plain model, its BatchNorm recomputed on the (unaugmented) training data first."""
    if recompute_bn:
        update_bn(model, bn_loader(data, args.batch_size), max_batches=args.bn_batches)
    return evaluate(model.to(accelerator.device), eval_loader, num_classes=data.num_classes, accelerator=accelerator)


def points_to_evaluate(sub: Subspace, final: bool) -> dict[str, Callable[[], nn.Module]]:
    """Named plain models to evaluate: the centre always; every anchor in the final evaluation."""
    points: dict[str, Callable[[], nn.Module]] = {"centre": sub.export}
    if final:
        for k in range(sub.num_anchors):
            points[f"anchor{k}"] = lambda k=k: sub.anchor(k)
    return points


# ---------------------------------------------------------------------------------------- progress
@dataclass
class _PendingLosses:
    """The steps since the last check-in, left on the device with no host read: each step's mean
    loss (float32, detached), predicted classes and labels, and on the host its update number and
    batch size (for the message naming a non-finite loss). A step adds one kernel (the argmax);
    the check-in weighs the losses by batch size and compares predictions with labels, once per
    interval. ``first_step``: the epoch's step number of the first pending step."""

    device: torch.device
    first_step: int
    losses: list[torch.Tensor] = field(default_factory=list)
    predictions: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, update: int) -> None:
        """One step: ``loss`` a 0-dim tensor, ``logits`` [N, C] (both detached), labels ``y`` [N]."""
        self.losses.append(loss)
        self.predictions.append(logits.argmax(-1))
        self.labels.append(y)
        self.updates.append(update)
        self.sizes.append(y.shape[0])

    def values(self) -> torch.Tensor:
        """Each pending step's loss times its batch size, [steps] float32."""
        if not self.losses:
            return torch.zeros(0, device=self.device)
        if self.sizes.count(self.sizes[0]) == len(self.sizes):
            return torch.stack(self.losses) * self.sizes[0]
        return torch.stack([loss * size for loss, size in zip(self.losses, self.sizes)])

    def correct(self) -> torch.Tensor:
        """Correct predictions of the pending steps (a long device scalar)."""
        if not self.labels:
            return torch.zeros((), dtype=torch.long, device=self.device)
        return (torch.cat(self.predictions) == torch.cat(self.labels)).sum()

    def clear(self, next_step: int) -> None:
        self.first_step = next_step
        for kept in (self.losses, self.predictions, self.labels, self.updates, self.sizes):
            kept.clear()


class _Progress:
    """Rich progress bar on a terminal (main process only); plain lines every N steps otherwise.

    :meth:`advance` moves the bar (host numbers only, called every step); :meth:`update` sets
    the text (loss, accuracy), which the loop reads from the device at its log intervals only.
    """

    def __init__(self, accelerator: Accelerator, total: int, epoch: int, epochs: int, log_interval: int, start: int = 0) -> None:
        self.enabled = accelerator.is_main_process
        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        self.total, self.log_interval, self.label = total, max(1, log_interval), f"epoch {epoch + 1}/{epochs}"
        self.first = start
        self.bar: Progress | None = None
        self.start = time.perf_counter()
        self.moving = self.enabled and self.tty   # whether advance draws anything: the loop skips the call otherwise
        if self.moving:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task(self.label, total=total, completed=start, info="")
            self.bar.start()

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.log_interval == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.first, 1) * (self.total - step)
            print(f"{self.label} step {step}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------- loop
@dataclass
class Trainer:
    """Train ``model`` (plain or Subspace) for ``args.epochs`` epochs on ``data`` with accelerate.

    ``args`` is a :class:`~subspaces.settings.TrainConfig` (every recipe's settings class is
    one; from Python see :meth:`create`).

    ``make_scheduler(optimizer, updates_per_epoch)`` replaces timm's scheduler with a torch one
    stepped after every update; like timm's, it applies layer decay (group g trains at the
    schedule's lr times the group's ``lr_scale``, the optimizer's lrs are left unscaled), as every
    schedule of :mod:`subspaces.schedules` does; ``on_update(trainer, update)`` runs after every optimiser update
    (FGE/SSE collect snapshots there). ``train_epochs`` limits the epochs of this process (a
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
        self.optimizer = create_optimizer_v2(self.model, opt=a.opt, lr=a.lr, weight_decay=a.weight_decay, momentum=a.momentum,
                                             layer_decay=a.layer_decay)
        self.mixer = batch_mixer(a, int(self.spec.get("num_classes") or self.data.num_classes))
        train_loader = make_loader(self.data.train, a.batch_size, shuffle=True, seed=a.seed, num_workers=a.workers)
        eval_loader = make_loader(self.data.eval, a.batch_size, shuffle=False, num_workers=a.workers)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(self.model, self.optimizer, train_loader, eval_loader)
        self._net = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.model = compile_model(self.model, a.torchcompile, a.torchcompile_mode)
        self.updates_per_epoch = math.ceil(len(self.train_loader) / a.grad_accum_steps)
        if a.batch_size * accelerator.num_processes > len(self.data.train):
            largest = len(self.data.train) // accelerator.num_processes
            raise ConfigError(f"--batch-size {a.batch_size} x {accelerator.num_processes} process(es) is more than the {len(self.data.train)} training images: "
                              f"use --batch-size <= {largest} or a larger --train-subset")
        sub = self.unwrapped
        if isinstance(sub, Subspace) and a.volume_lambda and a.volume_form == "benton":
            self.volume_reference = reference_log_volume(sub, seed=a.seed)   # a host number, drawn once before the loop
        if self.make_scheduler is None and a.sched == "none":
            # every scheduler applies layer decay's lr_scale at each step (timm's convention, and
            # subspaces.schedules'); with none, the constant lr of group g is lr * lr_scale_g
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if self.make_scheduler is not None:
            self.scheduler = self.make_scheduler(self.optimizer, self.updates_per_epoch)
        elif a.sched != "none":
            self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=a.sched, num_epochs=a.epochs, warmup_epochs=a.warmup_epochs,
                                                   min_lr=a.min_lr, step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)
        use_run_folder(accelerator, self.output, a.checkpoint_hist)

    def _step_scheduler(self) -> None:
        if self.scheduler is None:
            return
        if hasattr(self.scheduler, "step_update"):   # timm: stepped by hand per update
            self.scheduler.step_update(num_updates=self.updates)
        else:
            self.scheduler.step()

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
        """beta cos^2 [W] minus the volume term [B] (``--volume-form``), or None for a plain model."""
        a, sub = self.args, self.unwrapped
        if not isinstance(sub, Subspace):
            return None
        terms = []
        if a.beta:
            terms.append(a.beta * cosine_penalty(sub, params=a.beta_params))
        if a.volume_lambda:
            if a.volume_form == "benton":
                terms.append(-a.volume_lambda / self.volume_reference * volume_penalty(sub))
            else:
                terms.append(-a.volume_lambda * log_volume(sub))
        return sum(terms[1:], terms[0]) if terms else None

    def evaluate_now(self, final: bool) -> dict[str, dict[str, float]]:
        """Metrics per evaluated point (a plain model: its own BN; a subspace: BN recomputed per point)."""
        net = self.unwrapped
        sync_buffers(net, self.accelerator)
        if not isinstance(net, Subspace):
            return {"model": evaluate(net, self.eval_loader, num_classes=self.data.num_classes, accelerator=self.accelerator)}
        return {name: eval_plain(make(), self.data, self.args, self.accelerator, self.eval_loader) for name, make in points_to_evaluate(net, final).items()}

    def fit(self, resume: bool = False, train_epochs: int | None = None) -> dict[str, Any]:
        """Train (or continue from the run folder's checkpoint) up to ``args.epochs`` epochs.

        SIGTERM / SIGINT during training finish the current update, write a checkpoint at that
        step and raise :class:`~subspaces.errors.Preempted`; ``fit(resume=True)`` continues it
        with the same weights as an uninterrupted run (the rest of the epoch's batches in the
        same order). Returns ``{"epochs_done", "finished"}``.
        """
        a, accelerator, out = self.args, self.accelerator, self.output
        self.setup()
        start, position = 0, None
        metrics_path = out / "metrics.jsonl"
        ckpt = latest_checkpoint(out) if resume else None
        if ckpt is not None:
            net = self.unwrapped
            load_checkpoint(accelerator, ckpt, net if isinstance(net, Subspace) else None, self.progress, self.scheduler)
            start, self.updates, position = self.progress.epoch, self.progress.updates, self.progress.within_epoch
            where = f"epoch {start + 1}, step {position['step']}" if position else f"epoch {start}"
            logger.info(f"resumed from {ckpt} after {where}")
            if accelerator.is_main_process and metrics_path.exists():
                lines = [ln for ln in metrics_path.read_text().splitlines() if _epoch_of(ln) <= start]
                metrics_path.write_text("".join(ln + "\n" for ln in lines))
        elif accelerator.is_main_process and metrics_path.exists():
            metrics_path.unlink()
        prepare_saves(accelerator, out, ckpt)
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
                    if last or (epoch + 1) % a.eval_every == 0:
                        record["eval"] = self.evaluate_now(final=False)
                    if accelerator.is_main_process:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        _print_epoch(record)
                    if accelerator.log_with:
                        accelerator.log(flat_metrics(record), step=self.updates)
                    self._save({"epoch": epoch + 1, "updates": self.updates})
                    if self._stop_agreed(signals) and epoch + 1 < stop:
                        raise Preempted(f"{signals.requested or 'a stop on another rank'} after epoch {epoch + 1} of {a.epochs}: "
                                        f"checkpoint written; continue with --resume {out}")
        finally:
            if accelerator.log_with:
                accelerator.end_training()   # flushes the trackers, also when the run stops early
        return {"epochs_done": stop, "finished": stop == a.epochs}

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
        pending = _PendingLosses(device, first + 1)
        accumulating, no_accumulation = a.grad_accum_steps > 1, contextlib.nullcontext()
        single = accelerator.num_processes == 1
        # [B]'s first S-1 points add their gradients locally (DDP decides in the forward, so the
        # forward goes inside too); the last point's backward all-reduces the sum, once per update:
        # sum_s mean_r g_rs = mean_r sum_s g_rs. Accumulation's no_sync wraps micro-batches that don't sync.
        local_points = contextlib.nullcontext if single else (lambda: accelerator.no_sync(self.model))
        bar = _Progress(accelerator, total, epoch, a.epochs, interval, start=first)
        t0 = time.perf_counter()
        try:
            for step, (x, y) in enumerate(loader, start=first + 1):
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
                    self._step_scheduler()
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
        totals = accelerator.reduce(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)]),
                            reduction="sum").tolist()
        elapsed = elapsed_before + time.perf_counter() - t0
        self.history.append({
            "epoch": epoch + 1, "updates": self.updates, "train_loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2], "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": totals[2] / elapsed, "seconds": elapsed,
        })

    def _check_in(self, epoch: int, step: int, signals: StopSignals, pending: _PendingLosses, loss_sum: torch.Tensor,
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
            if index >= 0:
                local_step, local_update = pending.first_step + int(index), pending.updates[int(index)]
                value = float(losses[int(index)]) / max(1, pending.sizes[int(index)])
                where = f"loss is {value} at epoch {epoch + 1}, step {local_step} (update {local_update})"
            else:
                where = f"loss is NaN or infinite on another rank in epoch {epoch + 1}, by step {step}"
            raise NonFiniteLossError(f"{where}, found at the check of step {step}: the run stopped; {kept}. "
                                     "Lower --lr, or try --mixed-precision no / bf16")
        pending.clear(step + 1)
        return bool(any_stop), loss_total / max(seen, 1), correct_total / max(seen, 1)

    def _stop_within_epoch(self, epoch: int, step: int, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int,
                           seconds: float, signals: StopSignals) -> None:
        """Checkpoint at this step (the epoch's sums so far, over all ranks) and raise Preempted."""
        accelerator = self.accelerator
        sums = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=accelerator.device, dtype=torch.float64)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        loss_total, correct_total, seen_total = sums.tolist()
        position = {"step": step, "loss_sum": loss_total, "correct": int(correct_total), "seen": int(seen_total), "seconds": seconds}
        self._save({"epoch": epoch, "updates": self.updates, "within_epoch": position})
        raise Preempted(f"{signals.requested or 'a stop on another rank'} at epoch {epoch + 1}, step {step} of "
                        f"{len(self.train_loader)} (update {self.updates}): checkpoint written; continue with --resume {self.output}")


def flat_metrics(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: nested keys joined with "/" ("eval/centre/acc"),
    numbers only."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, prefix=name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; a torn line (a job killed mid-write) counts as never written."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _print_epoch(record: dict[str, Any]) -> None:
    ev = record.get("eval", {})
    parts = [f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"]
    for name, m in ev.items():
        parts.append(f"{name} acc {m['acc']:.4f} nll {m['nll']:.4f}")
    print(" | ".join(parts), file=sys.stderr, flush=True)


def results_table(title: str, results: dict[str, dict[str, float]]) -> Table:
    """A rich table: one row per evaluated model or point, columns acc / NLL / ECE / Brier."""
    table = Table(title=title)
    for col in ("point", "accuracy", "error %", "NLL", "ECE", "Brier"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for name, m in results.items():
        table.add_row(name, f"{m['acc']:.4f}", f"{100 * (1 - m['acc']):.2f}", f"{m['nll']:.4f}", f"{m['ece']:.4f}", f"{m['brier']:.4f}")
    return table


def finish_run(trainer: Trainer, title: str) -> dict[str, dict[str, float]]:
    """Final evaluation (every anchor too), exports and results.json; prints the results table."""
    accelerator, out, spec = trainer.accelerator, trainer.output, trainer.spec
    net = trainer.unwrapped
    results = trainer.evaluate_now(final=True)
    if accelerator.is_main_process:
        export_format = getattr(trainer.args, "export_format", "both")
        if isinstance(net, Subspace):
            save_subspace(net, out / "subspace", spec)
            bn = bn_loader(trainer.data, trainer.args.batch_size)
            centre = net.export(bn_loader=bn, bn_batches=trainer.args.bn_batches)
            save_export(centre, out / "exports" / "centre", {**spec, "point": "centre"}, export_format)
            for k in range(net.num_anchors):
                anchor = net.anchor(k)
                update_bn(anchor, bn, max_batches=trainer.args.bn_batches)
                save_export(anchor, out / "exports" / f"anchor{k}", {**spec, "point": f"anchor{k}"}, export_format)
        else:
            save_export(net, out / "model", spec, export_format)
        write_json({"title": title, "results": results}, out / "results.json")
        Console().print(results_table(title, results))
    write_json(rank_report(trainer, results), out / "ranks" / f"rank{accelerator.process_index}.json")
    accelerator.wait_for_everyone()
    return results


@torch.no_grad()
def sync_buffers(model: nn.Module, accelerator: Accelerator) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, so every rank
    evaluates and saves the same network; DDP otherwise leaves each rank's last update local."""
    if accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer.detach().clone(), reduction="mean"))


def rank_report(trainer: Trainer, results: dict[str, Any]) -> dict[str, Any]:
    """What this rank did: the examples it trained on in this process, a digest of its final
    weights and the metrics it computed; written per rank to check distributed runs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.unwrapped.state_dict().items()):
        if name.endswith("_extra_state"):   # the point generator differs per rank on purpose
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    accelerator = trainer.accelerator
    return {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "examples_seen": trainer.examples_seen,
            "weights_sha256": digest.hexdigest(), "results": results}


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
            logger.info(f"stopped after epoch {status['epochs_done']} of {args.epochs}; continue with --resume {run.out}")
            return {"finished": False}
        return {"finished": True, "results": finish_run(trainer, title)}
