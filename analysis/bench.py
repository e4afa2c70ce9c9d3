"""Benchmark: what does wrapping a network into a subspace cost, per training step and in memory?

For every model (``--models``) this builds, in ONE process, the plain network and three
wrapped variants of it:

    plain    the timm/torch model itself
    connect  ``ss.Bezier.connect(a, b)``: quadratic Bezier curve, 3 anchors, the middle one trainable
    line     ``ss.Line(model)`` from scratch: 2 anchors, both trainable
    simplex  ``ss.Simplex(model, vertices=3)`` from scratch: 3 anchors, all trainable
    line_pp, simplex_pp   (opt-in via ``--variants``) the same with ``layout="per_parameter"``:
             one anchor tensor per parameter, as per-tensor optimisers and layer decay need

and times one training step (``zero_grad(set_to_none=True)`` + forward + cross-entropy +
backward + ``torch.optim.SGD(momentum=0.9)`` step, torch's default foreach implementation) on
one fixed batch. After ``--warmup`` steps of every variant, the variants are interleaved
(``for rep in range(R): for variant in shuffled(variants): time one step``), so slow phases of
a shared machine hit all variants alike. Reported per variant: median / quartiles / min of the
wall time, the ratio of medians to the plain model, the median of the per-repetition paired
ratios (``t_variant[r] / t_plain[r]``), and the same for the process's CPU time (all threads,
user + system: page faults count; other processes on the machine do not).

The floor. What the arithmetic itself must add, timed in the same interleaved rounds with
primitives over buffers of the model's parameter count: mixing K anchors is at least (K - 1)
reads + one copy of the parameters, the backward one copy per trainable anchor (c_k * dL/dw),
the optimiser (T - 1) more plain optimiser steps for T trainable anchors. ``floor`` is
(plain + that) / plain: a variant's ratio above it is overhead, below it is not possible.
For the points workload the floor is N mixes of the curve's 3 anchors on top of N forwards
(per call), or N mixes once for the whole evaluation pass (``evaluate_coefficients``).

``--pool both`` times every subspace variant a second time with subspaces' CPU buffer pool off
(``VARIANT_nopool``, interleaved) and reports pool on / off ratios; every timed fn also records
the process's minor page faults (``minor_faults_median``).

Two evaluation workloads (``torch.no_grad()``, eval mode, one batch read once for everything):

    points    N points of a connect curve on one batch (``sub(x, point=t)`` for N values of t:
              N mixes + N forwards) against N forwards of N separate plain models; and
              ``evaluate_coefficients`` of the N points over ``--eval-batches`` batches (each
              point mixed once per pass) against the same metrics of the plain models
    ensemble  an ensemble of M plain members predicting in one call (``subspaces.ensembles.
              Ensemble`` when present, else an average of softmax outputs) against M separate
              passes ``softmax(model_m(x))`` averaged by hand

The ``gram`` workload (opt-in): the volume term of a 3-vertex simplex, log(Vol^2 + eps) from
the centred Gram of its anchors, forward and backward, as the library takes it
(``Subspace.gram(centred=True)``: ``subspaces.geometry.CentredGram``, float64 in cache-sized
blocks) against the same formula written as one autograd expression over the stacked anchors.

Memory (``memory`` workload; one fresh subprocess per model, variants one after another, never
during timings). peak: the high-water mark during one training step after warm-up, minus what
the process held before the variant was built (so: weights/anchors + optimiser state +
gradients + activations + mixed weights + anything kept between steps). resting: the same after
the step and ``zero_grad``. On CUDA from ``torch.cuda.max_memory_allocated`` /
``memory_allocated``. On CPU torch keeps no allocator statistics (and tracemalloc does not see
its allocations), so the resident set is used: glibc is told to mmap every allocation above
64 KiB (``mallopt(M_MMAP_THRESHOLD)``, so freed tensors leave the resident set at once, and
``malloc_trim`` before each reading), the kernel's high-water mark is reset through
``/proc/self/clear_refs`` and read as ``VmHWM``. analytic: the exact size of everything but
activations: parameters + buffers + optimiser state + one gradient per trainable tensor (+ for
a subspace the mixed weights w(p) and dL/dw, one point's size each).

The performance report's table (one run per model keeps each run under ~8 minutes on 2 cores):
    python analysis/bench.py --models resnet18 --reps 25 --warmup 3 --eval-reps 10 --output resnet18.json
    python analysis/bench.py --models vit_tiny --reps 12 --warmup 2 --eval-reps 5 --output vit_tiny.json
    python analysis/bench.py --models deep_narrow --reps 12 --warmup 2 --eval-reps 5 --output deep_narrow.json
    python analysis/bench.py --merge resnet18.json vit_tiny.json deep_narrow.json --output bench.json
On a shared machine, compare the paired and CPU-time ratios too, and rerun when they disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import subspaces as ss
from subspaces.metrics import nll_per_example

VARIANTS = ("plain", "connect", "line", "simplex")
NOPOOL = "_nopool"   # suffix of a variant stepped with subspaces' CPU buffer pool off (``--pool both``)
# opt-in (``--variants``): the same shapes with one anchor tensor per parameter (layout="per_parameter")
LAYOUT_VARIANTS = ("line_pp", "simplex_pp")
MODEL_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "deep_narrow": "resnet110",
}
DEFAULT_MODELS = ("resnet18", "vit_tiny", "deep_narrow")


# ----------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN on a change)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Deep narrow CIFAR ResNet (He et al. 2016, sec. 4.2): 3 stages x n basic blocks of 16/32/64
    channels; depth = 6n + 2 (n = 18: ResNet-110, ~1.7M parameters in ~330 tensors)."""

    def __init__(self, blocks_per_stage: int = 18, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, img_size: int, num_classes: int, patch_size: int = 4) -> nn.Module:
    """resnet110 / deep_narrow: :class:`CifarResNet`; vit_*: timm ViT at ``img_size`` with
    ``patch_size`` x ``patch_size`` patches (0: the model's own); anything else:
    ``timm.create_model(name, num_classes=num_classes)``."""
    name = MODEL_ALIASES.get(name, name)
    if name == "resnet110":
        return CifarResNet(18, num_classes)
    import timm

    if name.startswith(("vit_", "deit_")):
        extra = {"patch_size": patch_size} if patch_size else {}
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **extra)
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def build_variants(name: str, img_size: int, num_classes: int, variants: Sequence[str], device: torch.device,
                   patch_size: int = 4) -> dict[str, nn.Module]:
    """The models of ``variants`` (``{variant}_nopool``: the same subspace, timed with the buffer pool off)."""
    torch.manual_seed(0)
    model_a = build_model(name, img_size, num_classes, patch_size)
    out: dict[str, nn.Module] = {}
    for variant in variants:
        v = variant.removesuffix(NOPOOL)
        if v == "plain":
            m: nn.Module = copy.deepcopy(model_a)
        elif v == "connect":
            model_b = build_model(name, img_size, num_classes, patch_size)   # a second, independent init
            m = ss.Bezier.connect(model_a, model_b, seed=1)
        elif v in ("line", "line_pp"):
            m = ss.Line(model_a, seed=2, layout="per_parameter" if v == "line_pp" else "flat")
        elif v in ("simplex", "simplex_pp"):
            m = ss.Simplex(model_a, vertices=3, seed=3, layout="per_parameter" if v == "simplex_pp" else "flat")
        else:
            raise ValueError(f"unknown variant {v!r}: choose from {VARIANTS + LAYOUT_VARIANTS}")
        out[variant] = m.to(device)
    return out


# ----------------------------------------------------------------------------- timing helpers
def _without_pool(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with the subspace's CPU buffer pool switched off (``subspaces.subspace.POOLING``):
    every mixed weight set and anchor gradient is then a fresh allocation, as without the pool."""
    from subspaces import subspace as core

    def run() -> None:
        previous, core.POOLING = core.POOLING, False
        try:
            fn()
        finally:
            core.POOLING = previous
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None or amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """One model + its SGD optimiser; ``step()`` is the unit that is timed."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, weight_decay: float, amp: str | None) -> None:
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        self.x, self.y, self.amp = x, y, amp
        self.device = x.device

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with autocast_for(self.device, self.amp):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def persistent_bytes(self) -> int:
        """Exact size of what lives between steps: parameters, buffers, optimiser state."""
        total = sum(t.numel() * t.element_size() for t in self.model.parameters())
        total += sum(t.numel() * t.element_size() for t in self.model.buffers())
        for state in self.opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
        return total

    def analytic_bytes(self) -> int:
        """Everything but activations at the peak of a step: persistent state + one gradient per
        trainable tensor (+ for a subspace the mixed weights w(p) and dL/dw, both one point's size)."""
        grads = sum(p.numel() * p.element_size() for p in self.params)
        mix = 0
        if isinstance(self.model, ss.Subspace):
            per_point = sum(p.numel() * p.element_size() for p in self.model.anchor_parameters(0))
            mix = 2 * per_point
        return self.persistent_bytes() + grads + mix


Timings = dict[str, dict[str, list[float]]]   # fn -> {"wall": [...], "cpu": [...]} in seconds, "faults": [...] counts


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int, device: torch.device, seed: int = 0) -> Timings:
    """Warm every fn up, then time ``reps`` rounds, each running every fn once in a shuffled order.

    Records wall time (``perf_counter``, after a device sync) and the process's CPU time
    (``process_time``: all threads, user + system, so page faults count too). On a shared
    machine the CPU time is the steadier of the two: other processes stretch wall time but
    not our CPU time (they still share caches and memory bandwidth).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Timings = {k: {"wall": [], "cpu": [], "faults": []} for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            _sync(device)
            f0 = _minor_faults()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            times[k]["wall"].append(t1 - t0)
            times[k]["cpu"].append(c1 - c0)
            times[k]["faults"].append(_minor_faults() - f0)
    return times


def _minor_faults() -> int:
    """The process's minor page faults so far (fresh pages touched: what re-allocating large
    buffers costs on CPU); 0 where ``resource`` is unavailable."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(times: Timings, reference: str) -> dict[str, dict[str, float]]:
    """Per fn: median / quartiles / min of wall time (ms), the ratio of its median to the
    reference's, the median of per-repetition paired ratios, and the same medians for CPU time."""
    out = {}
    ref, ref_cpu = times[reference]["wall"], times[reference]["cpu"]
    for k, tk in times.items():
        ts, cs = tk["wall"], tk["cpu"]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[k] = {
            "median_ms": statistics.median(ts) * 1e3,
            "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3,
            "min_ms": min(ts) * 1e3,
            "ratio": statistics.median(ts) / statistics.median(ref),
            "paired_ratio": statistics.median([t / r for t, r in zip(ts, ref)]),
            "cpu_median_ms": statistics.median(cs) * 1e3,
            "cpu_ratio": statistics.median(cs) / statistics.median(ref_cpu),
            "cpu_paired_ratio": statistics.median([c / r for c, r in zip(cs, ref_cpu)]),
            "minor_faults_median": statistics.median(tk["faults"]) if tk.get("faults") else None,
            "reps": len(ts),
        }
    return out


# ----------------------------------------------------------------------------- memory
_M_MMAP_THRESHOLD = -3


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _settle() -> None:
    """Free what can be freed and give free heap pages back, so that RSS = live bytes."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def memory_probe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of training each variant alone (run in a fresh subprocess, see measure_memory).

    Per variant: peak_bytes is the high-water mark during one training step, after warm-up,
    minus what the process held before the variant was built: weights/anchors, optimiser state,
    gradients, activations, mixed weights and anything the wrapper keeps between steps.
    resting_bytes: the same after the step and ``zero_grad(set_to_none=True)``. On CUDA from the
    caching allocator's counters; on CPU from /proc (VmHWM after a reset via clear_refs, VmRSS),
    with glibc told to mmap every allocation above 64 KiB so that freed tensors leave the
    resident set at once. One untimed plain step runs first so that one-off runtime
    allocations (oneDNN primitive caches, thread pools) are not charged to the first variant.
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        libc = _libc()
        if libc is None or not libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) or not _reset_peak_rss():
            return {v: {"method": "unavailable"} for v in args.variants}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)

    def current() -> int:
        return torch.cuda.memory_allocated(device) if cuda else _proc_status_bytes("VmRSS")

    Trainer(build_model(name, args.img_size, args.num_classes, args.patch_size).to(device), x, y, args.lr, args.weight_decay, args.amp).step()
    out = {}
    for variant in args.variants:
        _settle()
        base = current()
        trainer = Trainer(build_variants(name, args.img_size, args.num_classes, [variant], device, args.patch_size)[variant],
                          x, y, args.lr, args.weight_decay, args.amp)
        for _ in range(2):
            trainer.step()
        trainer.opt.zero_grad(set_to_none=True)
        _settle()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _reset_peak_rss()
        trainer.step()
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = _proc_status_bytes("VmHWM")
        trainer.opt.zero_grad(set_to_none=True)
        _settle()
        out[variant] = {
            "method": "cuda.max_memory_allocated" if cuda else "rss_high_water_mark",
            "peak_bytes": peak - base,
            "resting_bytes": current() - base,
            "persistent_bytes": trainer.persistent_bytes(),
            "analytic_bytes": trainer.analytic_bytes(),
        }
        del trainer
    return out


def measure_memory(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """memory_probe in a fresh subprocess (a clean heap, away from the timing runs' models)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, "--variants", ",".join(args.variants),
           "--batch-size", str(args.batch_size), "--img-size", str(args.img_size), "--num-classes", str(args.num_classes),
           "--device", args.device, "--amp", args.amp, "--threads", str(args.threads), "--lr", str(args.lr),
           "--weight-decay", str(args.weight_decay), "--patch-size", str(args.patch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- workloads
def bench_train(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    names = list(args.variants)
    if args.pool == "both":   # the same subspaces again, stepped with the CPU buffer pool off
        names += [v + NOPOOL for v in args.variants if v != "plain"]
    variants = build_variants(name, args.img_size, args.num_classes, names, device, args.patch_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    trainers = {v: Trainer(m, x, y, args.lr, args.weight_decay, args.amp) for v, m in variants.items()}
    fns: dict[str, Callable[[], None]] = {
        v: (_without_pool(t.step) if v.endswith(NOPOOL) or args.pool == "off" else t.step) for v, t in trainers.items()
    }
    if "plain" in trainers:   # the floor's primitives, timed in the same rounds as the steps
        fns.update(floor_primitives(trainers["plain"].params, device, trainers["plain"].opt))
    times = interleaved(fns, args.reps, args.warmup, device, seed=args.seed)
    summary = summarize(times, "plain" if "plain" in times else next(iter(times)))
    primitives = {k: summary.pop(k)["median_ms"] for k in list(summary) if k.startswith("floor:")}
    for v, m in variants.items():
        summary[v]["trainable_parameters"] = sum(p.numel() for p in trainers[v].params)
        summary[v]["num_anchors"] = int(getattr(m, "num_anchors", 1))
        if primitives and v != "plain":
            K = summary[v]["num_anchors"]
            T = round(summary[v]["trainable_parameters"] / summary["plain"]["trainable_parameters"])
            if v.endswith(NOPOOL) and v.removesuffix(NOPOOL) in summary:
                on, off = times[v.removesuffix(NOPOOL)], times[v]
                summary[v]["pool_on_over_off"] = statistics.median(on["wall"]) / statistics.median(off["wall"])
                summary[v]["pool_on_over_off_paired"] = statistics.median([a / b for a, b in zip(on["wall"], off["wall"])])
                summary[v]["pool_on_over_off_cpu"] = statistics.median(on["cpu"]) / statistics.median(off["cpu"])
                summary[v]["pool_on_over_off_cpu_paired"] = statistics.median([a / b for a, b in zip(on["cpu"], off["cpu"])])
                summary[v]["minor_faults_pool_on_off"] = [statistics.median(on["faults"]), statistics.median(off["faults"])]
            extra = arithmetic_floor_ms(K, T, primitives["floor:read"], primitives["floor:copy"], primitives["floor:optimizer"])
            summary[v]["floor_extra_ms"] = extra
            summary[v]["floor_ratio"] = (summary["plain"]["median_ms"] + extra) / summary["plain"]["median_ms"]
    if primitives:
        summary["plain"]["floor_primitives_ms"] = {k.removeprefix("floor:"): t for k, t in primitives.items()}
    return summary


def arithmetic_floor_ms(K: int, T: int, read_ms: float, copy_ms: float, optimizer_ms: float) -> float:
    """What a subspace step must add to the plain step, from memory traffic alone, in ms.

    Mixing reads the K anchors and writes w once: (K - 1) reads + 1 copy of the parameters.
    Backward writes c_k * dL/dw once per trainable anchor: T copies. The optimiser updates T
    parameter sets instead of one: (T - 1) plain optimiser steps. ``read_ms``: one read of the
    parameters (a sum); ``copy_ms``: one read + one write (``copy_``); ``optimizer_ms``: the
    plain model's ``optimizer.step()``; all timed in the same interleaved rounds as the steps.
    """
    return (K - 1) * read_ms + copy_ms + T * copy_ms + (T - 1) * optimizer_ms


def floor_primitives(params: Sequence[torch.Tensor], device: torch.device, optimizer: Any = None) -> dict[str, Callable[[], None]]:
    """Timed primitives over buffers of the parameters' count and dtype: a read, a copy, and
    (given) a plain model's optimiser step on the gradients of its last step."""
    n = sum(p.numel() for p in params)
    src = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=params[0].dtype)
    dst = torch.empty_like(src)
    fns: dict[str, Callable[[], Any]] = {"floor:read": lambda: src.sum(), "floor:copy": lambda: dst.copy_(src)}
    if optimizer is not None:
        fns["floor:optimizer"] = optimizer.step
    return fns


def bench_points(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """N points of a curve vs N separate plain models (no grad), two ways:

    per call     ``curve(x, point=t)`` for N values of t on one batch: N mixes + N forwards,
                 against N forwards (``curve_points`` / ``plain_models``);
    evaluation   ``subspaces.evaluate_coefficients`` of the N points over ``--eval-batches``
                 batches (loss and accuracy per point; each point mixed once for the pass),
                 against the same metrics of the N plain models computed by hand on the same
                 batches (``eval.curve_eval`` / ``eval.plain_eval``).
    """
    torch.manual_seed(0)
    model_a = build_model(name, args.img_size, args.num_classes, args.patch_size)
    model_b = build_model(name, args.img_size, args.num_classes, args.patch_size)
    curve = ss.Bezier.connect(model_a, model_b, seed=0).to(device).eval()
    ts = torch.linspace(0, 1, args.points)
    plains = [curve.export(float(t)).to(device).eval() for t in ts]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1)).to(device)

    @torch.no_grad()
    def subspace_points() -> None:
        with autocast_for(device, args.amp):
            for t in ts:
                curve(x, point=t)

    @torch.no_grad()
    def plain_models() -> None:
        with autocast_for(device, args.amp):
            for m in plains:
                m(x)

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)) for _ in range(args.eval_batches)]
    coeffs = ss.point_coefficients(curve, ts.tolist())

    def curve_eval() -> None:
        with autocast_for(device, args.amp):
            ss.evaluate_coefficients(curve, coeffs, batches)

    @torch.no_grad()
    def plain_eval() -> None:   # what evaluate_coefficients computes per point and batch, for N plain models
        nll = torch.zeros(len(plains), dtype=torch.float64)
        correct = torch.zeros(len(plains), dtype=torch.float64)
        with autocast_for(device, args.amp):
            for bx, by in batches:
                for i, m in enumerate(plains):
                    probs = torch.softmax(m(bx).float(), dim=-1)
                    nll[i] += nll_per_example(probs, by).double().sum().cpu()
                    correct[i] += (probs.argmax(-1) == by).double().sum().cpu()

    fns = {"plain_models": plain_models, "curve_points": subspace_points, "plain_eval": plain_eval, "curve_eval": curve_eval,
           **floor_primitives(list(model_a.parameters()), device)}
    times = interleaved(fns, args.eval_reps, 1, device, seed=args.seed)
    out = summarize(times, "plain_models")
    read, copy_ = out.pop("floor:read")["median_ms"], out.pop("floor:copy")["median_ms"]
    out["points"] = args.points
    # each point mixes the curve's 3 anchors once: at least 2 reads + 1 copy of the parameters
    mix_ms = arithmetic_floor_ms(curve.num_anchors, 0, read, copy_, 0.0)
    out["floor_extra_ms"] = args.points * mix_ms
    out["floor_ratio"] = (out["plain_models"]["median_ms"] + out["floor_extra_ms"]) / out["plain_models"]["median_ms"]
    ev = summarize({k: times[k] for k in ("plain_eval", "curve_eval")}, "plain_eval")
    ev["batches"] = args.eval_batches
    ev["floor_extra_ms"] = args.points * mix_ms   # once per point for the whole pass
    ev["floor_ratio"] = (ev["plain_eval"]["median_ms"] + ev["floor_extra_ms"]) / ev["plain_eval"]["median_ms"]
    out["eval"] = ev
    del out["plain_eval"], out["curve_eval"]
    return out


def _ensemble_class() -> Any:
    try:
        from subspaces.ensembles import Ensemble
    except ImportError:
        return None
    return Ensemble


class _SoftmaxAverage(nn.Module):
    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(torch.softmax(m(x).float(), -1) for m in self.members) / len(self.members)


def bench_ensemble(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """An ensemble of M members predicting in one call vs M separate passes averaged by hand."""
    torch.manual_seed(0)
    members = [build_model(name, args.img_size, args.num_classes).to(device).eval() for _ in range(args.members)]
    cls = _ensemble_class()
    ensemble = (cls(members) if cls is not None else _SoftmaxAverage(members)).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1)).to(device)

    @torch.no_grad()
    def one_pass() -> None:
        with autocast_for(device, args.amp):
            ensemble(x)

    @torch.no_grad()
    def separate() -> None:
        with autocast_for(device, args.amp):
            total = None
            for m in members:
                p = torch.softmax(m(x).float(), -1)
                total = p if total is None else total + p
            assert total is not None
            total / len(members)

    times = interleaved({"separate_passes": separate, "ensemble": one_pass}, args.eval_reps, 1, device, seed=args.seed)
    out = summarize(times, "separate_passes")
    out["members"] = args.members
    out["implementation"] = "subspaces.ensembles.Ensemble" if cls is not None else "softmax average (bench.py)"
    return out


def bench_gram(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """[B]'s volume term of a 3-vertex simplex, forward + backward: the library's centred Gram
    (blocked) against X_c X_c^T over the stacked float64 anchors as one autograd expression."""
    from subspaces.geometry import squared_distances, volume_squared_from_distances
    from subspaces.regularizers import VOLUME_EPS

    torch.manual_seed(0)
    sub = ss.Simplex(build_model(name, args.img_size, args.num_classes), vertices=3).to(device)
    K = sub.num_anchors

    def stacked_gram() -> torch.Tensor:
        total = torch.zeros(K, K, dtype=torch.float64, device=device)
        for rows in zip(*(sub.anchor_parameters(k) for k in range(K))):
            x = torch.stack([r.reshape(-1) for r in rows]).double()
            x = x - x.mean(0, keepdim=True)
            total = total + x @ x.T
        return total

    def volume_term(gram: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            sub.zero_grad(set_to_none=True)
            torch.log(volume_squared_from_distances(squared_distances(gram())).clamp_min(0) + VOLUME_EPS).backward()
        return step

    times = interleaved({"stacked": volume_term(stacked_gram), "blocked": volume_term(lambda: sub.gram(centred=True))},
                        args.reps, args.warmup, device, seed=args.seed)
    import loop_bench  # the sibling analysis/loop_bench.py: its paired bootstrap over the rounds

    out = summarize(times, "stacked")
    out["ratio_interval"] = loop_bench.bootstrap_interval(times["blocked"]["wall"], times["stacked"]["wall"])
    out["parameters_per_vertex"] = sum(p.numel() for p in sub.anchor_parameters(0))
    return out


# ----------------------------------------------------------------------------- reporting
def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def print_tables(results: dict[str, Any], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    title = (
        f"training step (zero_grad + fwd + bwd + SGD momentum): batch {meta['batch_size']}, {meta['img_size']}px, "
        f"{meta['device']}, {meta['threads']} threads, amp {meta['amp']}, {meta['reps']} interleaved reps after {meta['warmup']} warm-up"
    )
    table = Table(title=title)
    cols = ("model", "variant", "anchors", "trainable", "median ms", "p25-p75 ms", "ratio", "paired ratio", "cpu ms", "cpu ratio",
            "floor", "peak mem", "resting", "analytic")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for model, res in results.items():
        mems = res.get("memory", {})
        for v in dict.fromkeys([*meta["variants"], *res.get("train", {}), *mems]):
            if v.startswith("floor:"):
                continue
            r, mem = res.get("train", {}).get(v), mems.get(v, {})
            if r is None and not mem:
                continue
            timing = [
                f"{r['median_ms']:.1f}", f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f}", f"{r['ratio']:.3f}", f"{r['paired_ratio']:.3f}",
                f"{r['cpu_median_ms']:.1f}", f"{r['cpu_ratio']:.3f}", f"{r['floor_ratio']:.3f}" if "floor_ratio" in r else "-",
            ] if r is not None else ["-"] * 7
            head = [model, v, str(r["num_anchors"]) if r else "-", f"{r['trainable_parameters']:,}" if r else "-"]
            table.add_row(*head, *timing, _fmt_bytes(mem.get("peak_bytes")), _fmt_bytes(mem.get("resting_bytes")), _fmt_bytes(mem.get("analytic_bytes")))
        table.add_section()
    if table.row_count:
        console.print(table)
    pool_rows = [(model, v, r) for model, res in results.items() for v, r in res.get("train", {}).items() if "pool_on_over_off" in r]
    if pool_rows:
        pools = Table(title="CPU buffer pool: step time with the pool / without it (same subspace, interleaved)")
        for col in ("model", "variant", "ratio of medians", "paired ratio", "cpu ratio", "cpu paired ratio", "page faults on / off"):
            pools.add_column(col, justify="left" if col in ("model", "variant") else "right")
        for model, v, r in pool_rows:
            on, off = r["minor_faults_pool_on_off"]
            pools.add_row(model, v.removesuffix(NOPOOL), f"{r['pool_on_over_off']:.3f}", f"{r['pool_on_over_off_paired']:.3f}",
                          f"{r['pool_on_over_off_cpu']:.3f}", f"{r['pool_on_over_off_cpu_paired']:.3f}", f"{on:,.0f} / {off:,.0f}")
        console.print(pools)
    evals = Table(title=f"evaluation (no grad, eval mode, one batch of {meta['batch_size']}): {meta['eval_reps']} interleaved reps")
    for col in ("model", "workload", "median ms", "reference ms", "ratio", "paired ratio", "cpu ratio", "floor"):
        evals.add_column(col, justify="left" if col in ("model", "workload") else "right")
    for model, res in results.items():
        if "points" in res:
            p = res["points"]
            evals.add_row(model, f"{p['points']} curve points vs {p['points']} plain models", f"{p['curve_points']['median_ms']:.1f}",
                          f"{p['plain_models']['median_ms']:.1f}", f"{p['curve_points']['ratio']:.3f}", f"{p['curve_points']['paired_ratio']:.3f}",
                          f"{p['curve_points']['cpu_ratio']:.3f}", f"{p['floor_ratio']:.3f}" if "floor_ratio" in p else "-")
            if "eval" in p:
                ev = p["eval"]
                evals.add_row(model, f"evaluate_coefficients: {p['points']} points x {ev['batches']} batches vs plain models",
                              f"{ev['curve_eval']['median_ms']:.1f}", f"{ev['plain_eval']['median_ms']:.1f}", f"{ev['curve_eval']['ratio']:.3f}",
                              f"{ev['curve_eval']['paired_ratio']:.3f}", f"{ev['curve_eval']['cpu_ratio']:.3f}", f"{ev['floor_ratio']:.3f}")
        if "ensemble" in res:
            e = res["ensemble"]
            evals.add_row(model, f"Ensemble of {e['members']} vs {e['members']} passes", f"{e['ensemble']['median_ms']:.1f}",
                          f"{e['separate_passes']['median_ms']:.1f}", f"{e['ensemble']['ratio']:.3f}", f"{e['ensemble']['paired_ratio']:.3f}",
                          f"{e['ensemble']['cpu_ratio']:.3f}", "-")
    if evals.row_count:
        console.print(evals)
    grams = Table(title=f"volume term of a 3-vertex simplex, forward + backward: {meta['reps']} interleaved reps")
    for col in ("model", "parameters per vertex", "blocked ms", "stacked ms", "ratio", "95 % interval", "paired ratio", "cpu ratio"):
        grams.add_column(col, justify="left" if col == "model" else "right")
    for model, res in results.items():
        if "gram" in res:
            g = res["gram"]
            grams.add_row(model, f"{g['parameters_per_vertex']:,}", f"{g['blocked']['median_ms']:.1f}", f"{g['stacked']['median_ms']:.1f}",
                          f"{g['blocked']['ratio']:.3f}", "[{:.3f}, {:.3f}]".format(*g["ratio_interval"]),
                          f"{g['blocked']['paired_ratio']:.3f}", f"{g['blocked']['cpu_ratio']:.3f}")
    if grams.row_count:
        console.print(grams)


# ----------------------------------------------------------------------------- main
WORKLOADS = ("train", "memory", "points", "ensemble", "gram")
DEFAULT_WORKLOADS = WORKLOADS[:4]   # gram: opt-in


def merge(paths: Sequence[str], output: str | None) -> dict[str, Any]:
    """One report from several runs' JSON files: results side by side, metadata per run."""
    runs = [json.load(open(path)) for path in paths]
    results: dict[str, Any] = {}
    for run in runs:
        for model, res in run["results"].items():
            results.setdefault(model, {}).update(res)
    meta = dict(runs[0]["meta"])
    if len({(r["meta"]["reps"], r["meta"]["eval_reps"], r["meta"]["warmup"]) for r in runs}) > 1:
        meta["reps"] = "/".join(str(r["meta"]["reps"]) for r in runs)
        meta["eval_reps"] = "/".join(str(r["meta"]["eval_reps"]) for r in runs)
        meta["warmup"] = "/".join(str(r["meta"]["warmup"]) for r in runs)
    meta["variants"] = list(dict.fromkeys(v for r in runs for v in r["meta"]["variants"]))
    print_tables(results, meta)
    out = {"meta": meta, "runs": [{"file": str(p), "meta": r["meta"]} for p, r in zip(paths, runs)], "results": results}
    if output:
        with open(output, "w") as f:
            json.dump(out, f, indent=1)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Models: resnet18, vit_tiny (vit_tiny_patch16_224 at --img-size with 4x4 patches), deep_narrow "
               "(CIFAR ResNet-110 defined here), or any timm model name.",
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s, line_pp, simplex_pp (per-parameter layout); the first is the reference for ratios")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)} (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=15, help="timed training steps per variant, interleaved (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per variant first (default: %(default)s)")
    p.add_argument("--eval-reps", type=int, default=None, help="repetitions of the eval workloads (default: --reps)")
    p.add_argument("--points", type=int, default=5, help="curve points per batch in the eval workload (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="batches of the points workload's evaluation pass (evaluate_coefficients; default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=4, help="ViT patch size (default: %(default)s; 0: the model's own)")
    p.add_argument("--pool", choices=["on", "off", "both"], default="on",
                   help="subspaces' CPU buffer pool in the train workload: on, off, or both (each subspace variant "
                        "again as VARIANT_nopool, interleaved; default: %(default)s)")
    p.add_argument("--members", type=int, default=3, help="ensemble members in the eval workload (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="torch.autocast dtype for forward + loss")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print one table from earlier --output files (e.g. one run per model) and write --output; runs nothing")
    p.add_argument("--memory-probe", default=None, metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for v in args.variants:
        if v.removesuffix(NOPOOL) not in VARIANTS + LAYOUT_VARIANTS:
            p.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS + LAYOUT_VARIANTS)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}: choose from {', '.join(WORKLOADS)}")
    if args.eval_reps is None:
        args.eval_reps = args.reps
    if args.reps < 1 or args.eval_reps < 1 or args.warmup < 0 or args.eval_batches < 1:
        p.error("--reps and --eval-reps must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        result = memory_probe(args.memory_probe, args)
        print(json.dumps(result))
        return result
    if args.merge:
        return merge(args.merge, args.output)
    device = torch.device(args.device)
    meta = {
        "batch_size": args.batch_size, "img_size": args.img_size, "num_classes": args.num_classes, "device": str(device),
        "threads": torch.get_num_threads(), "amp": args.amp, "reps": args.reps, "warmup": args.warmup,
        "eval_reps": args.eval_reps, "points": args.points, "eval_batches": args.eval_batches, "patch_size": args.patch_size,
        "pool": args.pool, "members": args.members, "lr": args.lr,
        "weight_decay": args.weight_decay, "optimizer": "torch.optim.SGD(momentum=0.9), foreach = torch default",
        "variants": args.variants, "models": args.models, "workloads": args.workloads,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else None,
    }
    results: dict[str, Any] = {}
    for name in args.models:
        res: dict[str, Any] = {}
        if "train" in args.workloads:
            res["train"] = bench_train(name, args, device)
            gc.collect()
        if "memory" in args.workloads:
            res["memory"] = measure_memory(name, args)
        if "points" in args.workloads:
            res["points"] = bench_points(name, args, device)
            gc.collect()
        if "ensemble" in args.workloads:
            res["ensemble"] = bench_ensemble(name, args, device)
            gc.collect()
        if "gram" in args.workloads:
            res["gram"] = bench_gram(name, args, device)
            gc.collect()
        results[name] = res
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_tables(results, meta)
    out = {"meta": meta, "results": results}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
