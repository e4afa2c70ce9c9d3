"""Benchmark: what does the training loop itself cost? ``Trainer`` epochs against a minimal loop.

For every model (``--models``) this builds, in ONE process, four runners on the same synthetic
data (``--train-size`` examples of ``--img-size`` px, ``--batch-size``) and the same model init:

    trainer:plain   ``subspaces.Trainer`` (``Trainer.create(TrainConfig(...))``) on the plain model
    minimal:plain   a plain accelerate loop written out below: ``create_optimizer_v2`` (SGD with
                    momentum, as the Trainer), timm's cosine scheduler stepped per update,
                    ``model(x)``, cross-entropy, ``accelerator.backward``, ``optimizer.step``,
                    ``zero_grad(set_to_none=True)``
    trainer:line    the Trainer on ``ss.Line(model)``
    minimal:line    the minimal loop on ``ss.Line(model)``: its forward draws a fresh point per
                    step; with ``--beta`` the same cos^2 regulariser is added in both loops

and times one epoch each (the Trainer's ``train_epoch``: the loop, its device-side loss /
accuracy / non-finite bookkeeping, its log-interval check-in and epoch-end reduction; neither
loop evaluates or checkpoints). After ``--warmup`` epochs of every runner they are interleaved
(``for rep: for runner in shuffled(runners): one epoch``), so slow phases of a shared machine hit
all alike. Reported: median / quartiles of wall and process CPU time per epoch; per model and
variant the ratio of medians trainer / minimal and the median of the paired per-round ratios,
each with a 95 % bootstrap interval (rounds resampled whole, keeping the pairs) and a verdict
against ``--target`` (1.02): "met" if the interval lies at or below it, "missed" if above,
"unresolved" if it straddles it; the Trainer's extra time per step in microseconds; the load
average at each round. ``--models linear`` (one linear layer) shows the loop's fixed cost per step.

    OMP_NUM_THREADS=1 python analysis/loop_bench.py --models test_resnet --reps 400 --warmup 3 \
        --train-size 256 --batch-size 16 --output loop_test_resnet.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from scipy import stats
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import TensorDataset

import subspaces as ss
from subspaces.data import DataBundle, make_loader
from subspaces.preemption import StopSignals
from subspaces.regularizers import cosine_penalty

VARIANTS = ("plain", "line")


def synthetic_data(n: int, img_size: int, num_classes: int, in_chans: int = 3, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_chans, img_size, img_size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataBundle(train=ds, eval=ds, holdout=None, bn=ds, num_classes=num_classes, in_chans=in_chans,
                      img_size=img_size, mean=(0.0,) * in_chans, std=(1.0,) * in_chans)


#: not a timm name: one linear layer on the flattened image, a step of well under a millisecond,
#: so (trainer - minimal) / steps shows the loop's fixed cost per step with little else in it
LINEAR = "linear"


def build_model(name: str, num_classes: int, seed: int = 0, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    if name == LINEAR:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, num_classes))
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def wrap(model: nn.Module, variant: str) -> nn.Module:
    return copy.deepcopy(model) if variant == "plain" else ss.Line(model, seed=2)


class MinimalLoop:
    """The plain accelerate loop the Trainer is measured against (same settings as its config)."""

    def __init__(self, model: nn.Module, data: DataBundle, config: ss.TrainConfig) -> None:
        self.accelerator = Accelerator(cpu=config.cpu or not torch.accelerator.is_available(), mixed_precision=config.mixed_precision,
                                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                                       step_scheduler_with_optimizer=False)
        optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)
        loader = make_loader(data.train, config.batch_size, shuffle=True, seed=config.seed)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=config.sched, num_epochs=config.epochs,
                                                step_on_epochs=False, updates_per_epoch=len(self.loader))
        self.beta = config.beta
        self.sub = model if isinstance(model, ss.Subspace) else None
        self.updates = 0

    def epoch(self, epoch: int) -> None:
        self.model.train()
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        for x, y in self.loader:
            loss = F.cross_entropy(self.model(x), y)
            if self.beta and self.sub is not None:
                loss = loss + self.beta * cosine_penalty(self.sub)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            self.scheduler.step_update(num_updates=self.updates)


class _CachedUnwrap(ss.Trainer):
    """Diagnosis (``--diagnose``): the Trainer with ``unwrapped`` cached by this benchmark, a
    check that the Trainer's own cache (unwrapped once after ``prepare``) leaves nothing to gain:
    accelerate's ``unwrap_model`` looks for DeepSpeed and compiled regions on every call
    (``importlib`` lookups, a walk over the modules, ~0.1 ms), so the two rows should agree."""

    @property
    def unwrapped(self) -> nn.Module:
        cached = self.__dict__.get("_unwrapped_cache")
        if cached is None or cached[0] is not self.model:
            cached = (self.model, self.accelerator.unwrap_model(self.model))
            self.__dict__["_unwrapped_cache"] = cached
        return cached[1]


class TrainerLoop:
    """``subspaces.Trainer`` set up as ``fit`` does; one unit is one ``train_epoch``."""

    def __init__(self, model: nn.Module, data: DataBundle, config: ss.TrainConfig, output: Path, cls: type = ss.Trainer) -> None:
        self.trainer = cls.create(config, model, data, output=output)
        self.trainer.setup()
        self.signals = StopSignals(announce=False)   # not entered: never requested

    def epoch(self, epoch: int) -> None:
        self.trainer.train_epoch(epoch, self.signals)


def ratio_of_medians(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """median(a) / median(b) along ``axis`` (vectorised for scipy's bootstrap)."""
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def median_paired_ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """median over rounds of a_i / b_i along ``axis`` (rounds paired: same index, same round)."""
    return np.median(np.asarray(a) / np.asarray(b), axis=axis)


def bootstrap_interval(a: Sequence[float], b: Sequence[float], statistic: Callable[..., np.ndarray] = ratio_of_medians,
                       level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(a, b)`` at ``level``, resampling whole rounds
    (a_i and b_i drawn together, keeping the pairing of the interleaving); a, b: [rounds]."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        value = float(statistic(np.asarray(a, dtype=float), np.asarray(b, dtype=float)))
        return value, value
    res = stats.bootstrap((np.asarray(a, dtype=float), np.asarray(b, dtype=float)), statistic, paired=True, vectorized=True,
                          n_resamples=resamples, confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def verdict(interval: tuple[float, float], target: float) -> str:
    """"met" if the whole interval is <= target, "missed" if all of it is above, else "unresolved"."""
    low, high = interval
    return "met" if high <= target else "missed" if low > target else "unresolved"


def summarize(times: dict[str, dict[str, list[float]]], steps: int = 1, target: float = 1.02, resamples: int = 10_000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, t in times.items():
        q = statistics.quantiles(t["wall"], n=4) if len(t["wall"]) >= 2 else [t["wall"][0]] * 3
        out[k] = {"median_s": statistics.median(t["wall"]), "p25_s": q[0], "p75_s": q[2], "min_s": min(t["wall"]),
                  "cpu_median_s": statistics.median(t["cpu"]), "reps": len(t["wall"])}
    ratios = {}
    for v in VARIANTS:
        for prefix in ("trainer", "trainer_cached_unwrap"):
            _ratio(ratios, f"{v}" if prefix == "trainer" else f"{v} (cached unwrap)", times.get(f"{prefix}:{v}"), times.get(f"minimal:{v}"),
                   steps, target, resamples)
    out["trainer_over_minimal"] = ratios
    return out


def _ratio(ratios: dict[str, Any], key: str, a: dict[str, list[float]] | None, b: dict[str, list[float]] | None,
           steps: int, target: float, resamples: int) -> None:
    if a is None or b is None:
        return
    r: dict[str, Any] = {}
    for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
        ci = bootstrap_interval(a[clock], b[clock], ratio_of_medians, resamples=resamples)
        paired_ci = bootstrap_interval(a[clock], b[clock], median_paired_ratio, resamples=resamples)
        r.update({f"{prefix}ratio": float(ratio_of_medians(np.asarray(a[clock]), np.asarray(b[clock]))), f"{prefix}ratio_ci95": ci,
                  f"{prefix}paired_ratio": float(median_paired_ratio(a[clock], b[clock])), f"{prefix}paired_ratio_ci95": paired_ci,
                  f"{prefix}verdict": verdict(ci, target), f"{prefix}paired_verdict": verdict(paired_ci, target),
                  # the fixed cost of the Trainer's step: (median trainer epoch - median minimal epoch) / steps
                  f"{prefix}extra_us_per_step": (statistics.median(a[clock]) - statistics.median(b[clock])) / steps * 1e6})
    r["target"] = target
    ratios[key] = r


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def count_ops(runners: dict[str, Callable[[int], None]], epoch: int, steps: int) -> dict[str, Any]:
    """aten operators per step of each runner (one epoch under ``torch.profiler``, untimed), and
    per variant the operators the Trainer calls beyond the minimal loop, per epoch."""
    counts: dict[str, dict[str, int]] = {}
    for k, fn in runners.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(epoch)
        counts[k] = {e.key: e.count for e in prof.key_averages()}
    out: dict[str, Any] = {"per_step": {k: sum(c.values()) / steps for k, c in counts.items()}}
    for k in counts:
        runner, v = k.split(":")
        if runner != "minimal" and f"minimal:{v}" in counts:
            mine, base = counts[k], counts[f"minimal:{v}"]
            extra = {op: mine.get(op, 0) - base.get(op, 0) for op in set(mine) | set(base)}
            out[f"{k} extra per epoch"] = dict(sorted(((op, n) for op, n in extra.items() if n), key=lambda kv: -abs(kv[1])))
    return out


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    data = synthetic_data(args.train_size, args.img_size, args.num_classes)
    config = ss.TrainConfig(epochs=args.warmup + args.reps + (1 if args.count_ops else 0), batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            momentum=0.9, sched="cosine", beta=args.beta, cpu=args.device == "cpu", log_interval=args.log_interval,
                            mixed_precision=args.mixed_precision, seed=0)
    steps = -(-args.train_size // args.batch_size)
    base = build_model(name, args.num_classes, img_size=args.img_size)
    runners: dict[str, Callable[[int], None]] = {}
    for v in args.variants:
        runners[f"trainer:{v}"] = TrainerLoop(wrap(base, v), data, config, workdir / f"{name}-{v}").epoch
        runners[f"minimal:{v}"] = MinimalLoop(wrap(base, v), data, config).epoch
        if args.diagnose:
            runners[f"trainer_cached_unwrap:{v}"] = TrainerLoop(wrap(base, v), data, config, workdir / f"{name}-{v}-c", _CachedUnwrap).epoch
    for epoch in range(args.warmup):
        for fn in runners.values():
            fn(epoch)
    ops = count_ops(runners, args.warmup, steps) if args.count_ops else None
    start = args.warmup + (1 if args.count_ops else 0)
    times = {k: {"wall": [], "cpu": []} for k in runners}
    order, rng = list(runners), random.Random(args.seed)
    loads = []
    for rep in range(args.reps):
        rng.shuffle(order)
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            runners[k](start + rep)
            t1, c1 = time.perf_counter(), time.process_time()
            times[k]["wall"].append(t1 - t0)
            times[k]["cpu"].append(c1 - c0)
    out = summarize(times, steps, args.target, args.resamples)
    if ops is not None:
        out["aten_ops"] = ops
    out["steps_per_epoch"] = steps
    out["loadavg_1min"] = _spread(loads)
    return out


def print_table(results: dict[str, Any], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one epoch (batch {meta['batch_size']}, {meta['img_size']}px, {meta['threads']} threads), "
                        f"{meta['reps']} interleaved rounds after {meta['warmup']} warm-up; [95% bootstrap interval]; "
                        f"verdict (ratio / paired): its interval against {meta['target']}")
    for col in ("model", "variant", "trainer s", "minimal s", "wall ratio", "wall paired", "cpu ratio", "cpu paired",
                "us/step (cpu)", "verdict wall", "verdict cpu", "load 1 min"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for model, res in results.items():
        load = res.get("loadavg_1min") or {}
        for key, r in res["trainer_over_minimal"].items():
            v = key.split(" ")[0]
            runner = "trainer_cached_unwrap" if "cached" in key else "trainer"
            table.add_row(model, key, f"{res[f'{runner}:{v}']['median_s']:.3f}", f"{res[f'minimal:{v}']['median_s']:.3f}",
                          *(f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]"
                            for k in ("ratio", "paired_ratio", "cpu_ratio", "cpu_paired_ratio")),
                          f"{r['cpu_extra_us_per_step']:.0f}", f"{r['verdict']} / {r['paired_verdict']}",
                          f"{r['cpu_verdict']} / {r['cpu_paired_verdict']}",
                          f"{load['min']:.1f}-{load['max']:.1f}" if load else "")
    console = Console(width=220)
    console.print(table)
    for model, res in results.items():
        for k, n in res.get("aten_ops", {}).get("per_step", {}).items():
            console.print(f"{model} {k}: {n:.1f} aten operators per step")


def add_timing_args(p: argparse.ArgumentParser, *, models: str, batch_size: int, img_size: int, train_size: int, warmup: int,
                    variants: Sequence[str], models_help: str = "comma-separated timm names") -> None:
    """The flags every interleaved timing script of analysis/ shares: what to time, on what
    synthetic data, how many interleaved rounds, and the bootstrap of the ratios."""
    p.add_argument("--models", default=models, help=f"{models_help} (default: %(default)s)")
    p.add_argument("--variants", default=",".join(variants), help="comma-separated subset of %(default)s")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--img-size", type=int, default=img_size)
    p.add_argument("--train-size", type=int, default=train_size, help="examples per epoch (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=20, help="timed epochs per runner, interleaved (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-interval", type=int, default=50, help="the Trainer's check-in interval (default: TrainConfig's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default: %(default)s; on a shared CPU more threads make spinning OpenMP waits the measurement)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the rounds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    p.add_argument("--output", default=None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(p, models="test_resnet,resnet18", batch_size=32, img_size=32, train_size=256, warmup=2, variants=VARIANTS,
                    models_help=f"comma-separated timm names, or {LINEAR!r} for the fixed cost per step")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.0, help="cos^2 regulariser of the line in both loops (default: none)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--target", type=float, default=1.02, help="the ratio the verdict is against (default: %(default)s)")
    p.add_argument("--diagnose", action="store_true",
                   help="also time the Trainer with accelerate's unwrap_model read once instead of every step")
    p.add_argument("--no-trim", action="store_true",
                   help="re-run with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=1 GiB): "
                        "no page faults from the heap shrinking and growing again every step")
    p.add_argument("--count-ops", action="store_true",
                   help="before timing, profile one epoch of each runner: aten operators per step, and what the Trainer adds")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1, --warmup >= 0")
    if args.threads < 1 or args.resamples < 1:
        p.error("--threads and --resamples must be >= 1")
    return args


#: glibc settings of ``--no-trim``: keep freed heap memory instead of handing it back to the kernel
NO_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.no_trim and argv is None and any(os.environ.get(k) != v for k, v in NO_TRIM_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **NO_TRIM_ENV})   # glibc reads them at start
    torch.set_num_threads(args.threads)
    meta = {k: getattr(args, k) for k in ("models", "variants", "batch_size", "img_size", "train_size", "reps", "warmup", "lr",
                                          "weight_decay", "beta", "log_interval", "mixed_precision", "device", "diagnose",
                                          "target", "resamples", "seed", "count_ops")}
    meta.update(threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__,
                malloc_env={k: os.environ.get(k) for k in NO_TRIM_ENV},
                python=platform.python_version(), cpu_count=os.cpu_count(), steps_per_epoch=-(-args.train_size // args.batch_size),
                loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
                command=" ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else None)
    results = {}
    with tempfile.TemporaryDirectory(prefix="loop_bench_") as tmp:
        for name in args.models:
            results[name] = bench_model(name, args, Path(tmp))
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(results, meta)
    out = {"meta": meta, "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
