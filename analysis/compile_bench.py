"""Benchmark: eager against compiled training (``--torchcompile``) in the Trainer, per model and shape;
with ``--against channels-last``, eager against eager ``--channels-last`` (the same columns: the
"compiled" runner is then the channels-last one and its first epoch compiles nothing).

For every model (``--models``) and variant (``--variants``: plain, line, simplex) this builds, in
ONE process, two ``subspaces.Trainer`` runners on the same synthetic data and init (the loop of
``analysis/loop_bench.py``: one unit is one ``train_epoch``, no evaluation or checkpoint):

    eager:<variant>      TrainConfig(torchcompile=None)
    compiled:<variant>   TrainConfig(torchcompile=--backend, torchcompile_mode=--mode)

The first epoch of each is timed on its own (for the compiled runner: dynamo + the backend's
compile, into a fresh inductor cache unless ``--warm-cache``), then after ``--warmup`` epochs the
runners are interleaved (``for rep: for runner in shuffled(runners): one epoch``) as in
loop_bench. Reported per model and variant: median epoch times, the speed-up eager / compiled as
a ratio of medians and as the median of paired per-round ratios, each with a 95 % bootstrap
interval (loop_bench's ``bootstrap_interval``, rounds resampled whole), milliseconds per step,
the first-compile seconds, and the epochs of training the compile costs back
(``first_compile / (eager epoch - compiled epoch)``).

    OMP_NUM_THREADS=1 python analysis/compile_bench.py --models test_resnet --reps 30 --output compile_test_resnet.json
"""

from __future__ import annotations

import argparse
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
from torch import nn

import subspaces as ss

import loop_bench  # noqa: E402  (the sibling analysis/loop_bench.py: synthetic data, the Trainer runner, bootstrap)

VARIANTS = ("plain", "line", "simplex")


def wrap(model: nn.Module, variant: str) -> nn.Module:
    """The variant of ``model`` (a fresh copy each call, the same init)."""
    if variant == "line":
        return ss.Line(model, seed=2)
    if variant == "simplex":
        return ss.Simplex(model, vertices=3, seed=2)
    return loop_bench.wrap(model, "plain")


def speedup(eager: dict[str, list[float]], compiled: dict[str, list[float]], resamples: int) -> dict[str, Any]:
    """eager / compiled epoch time: ratio of medians and median paired ratio, with 95 % bootstrap intervals."""
    a, b = eager["wall"], compiled["wall"]
    return {"ratio": float(loop_bench.ratio_of_medians(np.asarray(a), np.asarray(b))),
            "ratio_ci95": loop_bench.bootstrap_interval(a, b, loop_bench.ratio_of_medians, resamples=resamples),
            "paired_ratio": float(loop_bench.median_paired_ratio(a, b)),
            "paired_ratio_ci95": loop_bench.bootstrap_interval(a, b, loop_bench.median_paired_ratio, resamples=resamples)}


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    data = loop_bench.synthetic_data(args.train_size, args.img_size, args.num_classes, in_chans=args.in_chans)
    steps = -(-args.train_size // args.batch_size)
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=args.num_classes, in_chans=args.in_chans)
    runners: dict[str, Callable[[int], None]] = {}
    first: dict[str, float] = {}
    for v in args.variants:
        for kind, backend in (("eager", None), ("compiled", args.backend)):
            treated = backend is not None
            if args.against == "channels-last":
                backend = None
            config = ss.TrainConfig(epochs=1 + args.warmup + args.reps, batch_size=args.batch_size, lr=args.lr, momentum=0.9,
                                    sched="cosine", cpu=args.device == "cpu", log_interval=args.log_interval, mixed_precision="no",
                                    seed=0, torchcompile=backend, torchcompile_mode=args.mode if backend else None,
                                    channels_last=treated and args.against == "channels-last")
            key = f"{kind}:{v}"
            runner = loop_bench.TrainerLoop(wrap(base, v), data, config, workdir / f"{name}-{key.replace(':', '-')}")
            t0 = time.perf_counter()
            runner.epoch(0)   # the compiled runner compiles here
            first[key] = time.perf_counter() - t0
            print(f"{name} {key}: first epoch {first[key]:.1f} s", file=sys.stderr, flush=True)
            runners[key] = runner.epoch
    for epoch in range(1, 1 + args.warmup):
        for fn in runners.values():
            fn(epoch)
    times = {k: {"wall": [], "cpu": []} for k in runners}
    order, rng, loads = list(runners), random.Random(args.seed), []
    for rep in range(args.reps):
        rng.shuffle(order)
        loads.append(os.getloadavg()[0])
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            runners[k](1 + args.warmup + rep)
            t1, c1 = time.perf_counter(), time.process_time()
            times[k]["wall"].append(t1 - t0)
            times[k]["cpu"].append(c1 - c0)
    out: dict[str, Any] = {"steps_per_epoch": steps, "loadavg_1min": {"min": min(loads), "max": max(loads)}, "times": times}
    for v in args.variants:
        e, c = times[f"eager:{v}"], times[f"compiled:{v}"]
        me, mc = statistics.median(e["wall"]), statistics.median(c["wall"])
        compile_s = first[f"compiled:{v}"] - mc   # the first epoch's extra over a steady one
        out[v] = {"eager_ms_per_step": me / steps * 1e3, "compiled_ms_per_step": mc / steps * 1e3,
                  **speedup(e, c, args.resamples), "first_epoch_s": {"eager": first[f"eager:{v}"], "compiled": first[f"compiled:{v}"]},
                  "first_compile_s": compile_s,
                  "break_even_epochs": compile_s / (me - mc) if me > mc else None}
    return out


def print_table(results: dict[str, Any], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    against = "--channels-last" if meta.get("against") == "channels-last" else f"--torchcompile {meta['backend']}"
    table = Table(title=f"Trainer epoch, eager vs {against} (batch {meta['batch_size']}, {meta['img_size']}px, "
                        f"{meta['threads']} thread(s)), {meta['reps']} interleaved rounds; speed-up eager/{against} [95% bootstrap interval]")
    treated = "channels-last" if meta.get("against") == "channels-last" else "compiled"
    for col in ("model", "variant", "eager ms/step", f"{treated} ms/step", "speed-up", "paired", "first compile s", "break-even epochs", "load"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for model, res in results.items():
        load = res["loadavg_1min"]
        for v in meta["variants"]:
            r = res[v]
            table.add_row(model, v, f"{r['eager_ms_per_step']:.1f}", f"{r['compiled_ms_per_step']:.1f}",
                          f"{r['ratio']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]",
                          f"{r['paired_ratio']:.3f} [{r['paired_ratio_ci95'][0]:.3f}, {r['paired_ratio_ci95'][1]:.3f}]",
                          f"{r['first_compile_s']:.1f}", "never" if r["break_even_epochs"] is None else f"{r['break_even_epochs']:.1f}",
                          f"{load['min']:.1f}-{load['max']:.1f}")
    Console(width=200).print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    loop_bench.add_timing_args(p, models="test_resnet", batch_size=64, img_size=28, train_size=512, warmup=1, variants=VARIANTS)
    p.add_argument("--against", choices=("compile", "channels-last"), default="compile",
                   help="what eager training is compared with: --torchcompile, or eager --channels-last (default: %(default)s)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--warm-cache", action="store_true", help="use the inductor cache as it is (default: a fresh one, a cold first compile)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {k: getattr(args, k) for k in ("models", "variants", "against", "backend", "mode", "batch_size", "img_size", "in_chans", "train_size",
                                          "reps", "warmup", "lr", "device", "seed", "warm_cache")}
    meta.update(threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__,
                python=platform.python_version(), cpu_count=os.cpu_count(), platform=platform.platform(),
                command=" ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else None)
    results = {}
    with tempfile.TemporaryDirectory(prefix="compile_bench_") as tmp:
        if not args.warm_cache and args.against == "compile":   # a cold compile, as a fresh clone's first member pays it
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
            os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        for name in args.models:
            results[name] = bench_model(name, args, Path(tmp))
            torch.compiler.reset()
    print_table(results, meta)
    out = {"meta": meta, "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
