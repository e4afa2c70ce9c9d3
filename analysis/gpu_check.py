"""The prepared GPU check: one script, one JSON, under 8 minutes on an H200.

Three parts, each timed and written to the JSON even if a later one fails:

1. ``step_bench``: the training-step bench of ``analysis/bench.py`` (its ``bench_train``: plain,
   connect, line and simplex interleaved, medians, ratios to plain, the arithmetic floor) in
   bf16 autocast for resnet18 and a ViT (``vit_small_patch16_224`` at 224 px, its own 16x16
   patches). Targets: connect / line / simplex <= 1.02 / 1.05 / 1.08 of plain.
2. ``trainer_sync``: one epoch of ``subspaces.Trainer`` (a line of resnet18 on synthetic data,
   bf16) under ``torch.cuda.set_sync_debug_mode("warn")``, counting the synchronisation
   warnings and where they came from. Expected: only the loop's check-ins (every
   ``log_interval`` steps) and the epoch's end, none per step.
3. ``compile``: ``torch.compile`` of a line whose point moves every step (train mode, forward +
   backward); after the first steps ``torch._dynamo.config.error_on_recompile`` is set and the
   dynamo frame counters are compared: no recompiles expected.
4. ``trainer_compile``: the Trainer eager against ``--torchcompile`` (``analysis/compile_bench.py``:
   plain, line and simplex of resnet18, interleaved epochs, speed-up eager / compiled with
   bootstrap intervals, the first compile's seconds), fp32, inductor.

    python analysis/gpu_check.py --output gpu_check.json              # on the GPU machine
    python analysis/gpu_check.py --cpu --output /tmp/gpu_check.json   # tiny CPU dry run (tests)

``--cpu`` (alias ``--dry-run``) runs the same code on the CPU with tiny models (timm's
test_resnet and test_vit, batch 4, 2 repetitions; sync counting is skipped without CUDA and
compile uses the ``aot_eager`` backend, the compiled Trainer too), so the script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

import subspaces as ss
from subspaces.preemption import StopSignals

import bench  # noqa: E402  (the sibling analysis/bench.py, found because a script's own folder is searched first)
import compile_bench  # noqa: E402  (the sibling analysis/compile_bench.py: eager vs compiled Trainer epochs)
import loop_bench  # noqa: E402  (the sibling analysis/loop_bench.py: synthetic data)

TARGETS = {"connect": 1.02, "line": 1.05, "simplex": 1.08}


def settings(cpu: bool) -> dict[str, Any]:
    if cpu:
        return {"device": "cpu", "models": [("test_resnet", 32, 4), ("test_vit", 32, 0)], "batch_size": 4, "reps": 2, "warmup": 1,
                "trainer_model": "test_resnet", "trainer_img": 32, "trainer_batch": 4, "trainer_steps": 4, "log_interval": 2,
                "compile_model": "test_resnet", "compile_img": 32, "compile_batch": 2, "compile_steps": 4, "backend": "aot_eager",
                "tc_argv": ["--models", "test_resnet", "--img-size", "16", "--in-chans", "3", "--batch-size", "4", "--train-size", "8",
                            "--reps", "2", "--warmup", "0", "--resamples", "100", "--warm-cache"]}
    return {"device": "cuda", "models": [("resnet18", 224, 4), ("vit_small_patch16_224", 224, 0)], "batch_size": 256, "reps": 30,
            "warmup": 5, "trainer_model": "resnet18", "trainer_img": 64, "trainer_batch": 128, "trainer_steps": 40, "log_interval": 20,
            "compile_model": "resnet18", "compile_img": 64, "compile_batch": 64, "compile_steps": 12, "backend": "inductor",
            "tc_argv": ["--models", "resnet18", "--img-size", "64", "--in-chans", "3", "--batch-size", "128", "--train-size", "2560",
                        "--reps", "8", "--warmup", "1", "--device", "cuda"]}


# ---------------------------------------------------------------------------------------- 1. step bench
def step_bench(cfg: dict[str, Any], amp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, img, patch in cfg["models"]:
        argv = ["--models", name, "--img-size", str(img), "--batch-size", str(cfg["batch_size"]), "--reps", str(cfg["reps"]),
                "--warmup", str(cfg["warmup"]), "--device", cfg["device"], "--amp", amp, "--patch-size", str(patch),
                "--num-classes", "1000" if cfg["device"] == "cuda" else "10", "--workloads", "train"]
        args = bench.parse_args(argv)
        t0 = time.perf_counter()
        res = bench.bench_train(name, args, torch.device(cfg["device"]))
        res["seconds"] = time.perf_counter() - t0
        res["targets"] = {v: {"target": t, "ratio": res[v]["ratio"], "met": res[v]["ratio"] <= t} for v, t in TARGETS.items() if v in res}
        out[name] = res
    return {"models": out}


# ---------------------------------------------------------------------------------------- 2. syncs
def trainer_sync(cfg: dict[str, Any], amp: str) -> dict[str, Any]:
    n = cfg["trainer_batch"] * cfg["trainer_steps"]
    data = loop_bench.synthetic_data(n, cfg["trainer_img"], 10)
    config = ss.TrainConfig(epochs=2, batch_size=cfg["trainer_batch"], lr=1e-3, sched="cosine", log_interval=cfg["log_interval"],
                            # on the CPU (the dry run, maybe inside a test process whose accelerate state is fixed): no autocast
                            mixed_precision=amp if amp != "none" and cfg["device"] == "cuda" else "no", cpu=cfg["device"] == "cpu", seed=0)
    torch.manual_seed(0)
    line = ss.Line(timm.create_model(cfg["trainer_model"], num_classes=10), seed=0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        trainer = ss.Trainer.create(config, line, data, output=Path(tmp))
        trainer.setup()
        signals = StopSignals(announce=False)
        trainer.train_epoch(0, signals)   # warm-up epoch: allocator, cuDNN autotuning, first-call work
        cuda = torch.cuda.is_available() and cfg["device"] == "cuda"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            try:
                trainer.train_epoch(1, signals)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            seconds = time.perf_counter() - t0
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    steps = cfg["trainer_steps"]
    check_ins = len({s for s in range(1, steps + 1) if s % cfg["log_interval"] == 0 or s == steps})
    return {
        "counted": cuda, "steps": steps, "log_interval": cfg["log_interval"], "check_ins": check_ins, "sync_warnings": len(syncs),
        "sync_sites": dict(where.most_common(20)), "first_messages": sorted({str(w.message)[:200] for w in syncs})[:5],
        "syncs_per_step": len(syncs) / steps, "seconds": seconds,
        "met": (not cuda) or len(syncs) <= 4 * (check_ins + 1),   # a check-in and the epoch's end read a few values each
    }


# ---------------------------------------------------------------------------------------- 3. compile
def compile_check(cfg: dict[str, Any], amp: str) -> dict[str, Any]:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    device = torch.device(cfg["device"])
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    line = ss.Line(timm.create_model(cfg["compile_model"], num_classes=10), seed=0).to(device).train()
    compiled = torch.compile(line, backend=cfg["backend"])
    opt = torch.optim.SGD(line.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["compile_batch"], 3, cfg["compile_img"], cfg["compile_img"], generator=g).to(device)
    y = torch.randint(0, 10, (cfg["compile_batch"],), generator=g).to(device)

    def step() -> None:
        with bench.autocast_for(device, amp):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = 2
    t0 = time.perf_counter()
    for _ in range(warm):
        step()
    first_s = time.perf_counter() - t0
    frames_after_warmup = dict(counters["frames"])
    stats_after_warmup = dict(counters["stats"])
    error, previous = None, dynamo.config.error_on_recompile
    dynamo.config.error_on_recompile = True
    points_before = line.points_drawn
    t0 = time.perf_counter()
    try:
        for _ in range(cfg["compile_steps"]):
            step()
    except Exception as err:  # a recompile (RecompileError) or a failure of the compiled graph
        error = f"{type(err).__name__}: {str(err)[:1000]}"
    finally:
        dynamo.config.error_on_recompile = previous
    if device.type == "cuda":
        torch.cuda.synchronize()
    steady_s = time.perf_counter() - t0
    frames_after = dict(counters["frames"])
    recompiles = sum(frames_after.values()) - sum(frames_after_warmup.values())
    return {
        "backend": cfg["backend"], "warmup_steps": warm, "steps": cfg["compile_steps"], "points_drawn": line.points_drawn - points_before,
        "frames_after_warmup": frames_after_warmup, "frames_after": frames_after, "stats_after_warmup": stats_after_warmup,
        "stats_after": dict(counters["stats"]), "graph_breaks": dict(counters["graph_break"]),
        "new_frames_after_warmup": recompiles, "error": error, "first_steps_s": first_s, "steady_s": steady_s,
        "met": error is None and recompiles == 0,
    }


# ---------------------------------------------------------------------------------------- 4. compiled Trainer
def trainer_compile(cfg: dict[str, Any], amp: str) -> dict[str, Any]:
    """Eager against compiled Trainer epochs for plain / line / simplex (fp32: ``amp`` is not used)."""
    args = compile_bench.parse_args([*cfg["tc_argv"], "--backend", cfg["backend"]])
    with tempfile.TemporaryDirectory(prefix="gpu_check_compile_") as tmp:
        res = {name: compile_bench.bench_model(name, args, Path(tmp)) for name in args.models}
    torch.compiler.reset()
    for r in res.values():
        r.pop("times", None)   # the per-round times: the summary is enough here
    return {"backend": cfg["backend"], "models": res,
            "met": all(r[v]["ratio"] > 0 for r in res.values() for v in args.variants)}


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true", help="tiny models on the CPU (a test of the script)")
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"], help="autocast dtype (default: %(default)s)")
    p.add_argument("--parts", default="step_bench,trainer_sync,compile,trainer_compile", help="comma-separated subset of %(default)s")
    p.add_argument("--output", default="gpu_check.json")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = set(args.parts) - {"step_bench", "trainer_sync", "compile", "trainer_compile"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}")
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu for the tiny dry run")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = settings(args.cpu)
    os.environ.setdefault("SUBSPACES_OFFLINE", "1")
    meta = {"mode": "cpu dry run" if args.cpu else "gpu", "amp": args.amp, "settings": cfg, "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else None}
    out: dict[str, Any] = {"meta": meta}
    parts = {"step_bench": step_bench, "trainer_sync": trainer_sync, "compile": compile_check, "trainer_compile": trainer_compile}
    t_start = time.perf_counter()
    for name in args.parts:
        t0 = time.perf_counter()
        try:
            out[name] = parts[name](cfg, args.amp)
        except Exception as err:
            out[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:], "met": False}
        out[name]["part_seconds"] = time.perf_counter() - t0
        Path(args.output).write_text(json.dumps(out, indent=1, default=str))   # what is done survives a later failure
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    out["total_seconds"] = time.perf_counter() - t_start
    met = {k: out[k].get("met") for k in ("trainer_sync", "compile", "trainer_compile") if k in out}
    if "step_bench" in out and "error" not in out["step_bench"]:
        met["step_bench"] = all(t["met"] for r in out["step_bench"]["models"].values() for t in r["targets"].values())
    out["met"] = met
    Path(args.output).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({"met": met, "total_seconds": round(out["total_seconds"], 1), "output": args.output}), flush=True)
    return out


if __name__ == "__main__":
    main()
