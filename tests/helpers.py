"""Helpers for the end-to-end recipe tests: run recipes as subprocesses (a few at a time), read run folders.

Each recipe process costs several seconds of CPU in imports (torch, timm, torchmetrics), so
independent runs are started together (``run_all``) with one intra-op thread each, on tiny
settings (``TINY``). Commands that end in well under a second once imported (``--help``, refused
flags) run as forked children of one interpreter that imported the package once (``run_forked``):
real processes with their own exit status and file-level stdout / stderr.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from subspaces.checkpoint import latest_checkpoint, read_progress

REPO = Path(__file__).resolve().parents[1]
SEED = 42
TRAIN_SUBSET, EVAL_SUBSET, BATCH = 128, 64, 32
STEPS_PER_EPOCH = TRAIN_SUBSET // BATCH
#: tiny data / batch settings (flags of every recipe that trains)
DATA_TINY = ["--train-subset", str(TRAIN_SUBSET), "--eval-subset", str(EVAL_SUBSET), "-b", str(BATCH),
             "--bn-batches", "2", "--seed", str(SEED)]
#: tiny settings of recipes/train.py
TINY = ["--model", "test_resnet", *DATA_TINY]
METRIC_KEYS = ("acc", "nll", "ece", "brier")


@dataclass
class Result:
    cmd: list[str]
    rc: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"command: {' '.join(self.cmd)}\nrc={self.rc}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-6000:]}"

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def recipe_env() -> dict[str, str]:
    env = dict(os.environ)
    env["SUBSPACES_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"        # runs go two at a time on a small machine
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("SUBSPACES_DATA", None)
    return env


def recipe_cmd(recipe: str, *args: str) -> list[str]:
    return [sys.executable, str(Path("recipes") / recipe), *map(str, args)]


def run(cmd: list[str], timeout: float = 600) -> Result:
    """Run ``cmd`` in the repository root with the test environment; never raises on failure."""
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=recipe_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        errs = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        return Result(cmd, -9, out, errs + f"\n[timed out after {timeout}s]")
    return Result(cmd, proc.returncode, proc.stdout, proc.stderr)


def run_all(cmds: dict[str, list[str]], workers: int = 2, timeout: float = 600) -> dict[str, Result]:
    """Run several commands concurrently (``workers`` at a time); results by key."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(run, cmd, timeout) for key, cmd in cmds.items()}
        return {key: f.result() for key, f in futures.items()}


_ZYGOTE = r"""
import json, os, runpy, sys, traceback
import subspaces, subspaces.training, subspaces.connect   # the heavy imports, once, before any fork
cases = json.load(sys.stdin)
codes = {}
for key, case in cases.items():
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: behave as `python SCRIPT ARGS...` started in this folder
        code = 1
        try:
            for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = [case["script"], *case["args"]]
            sys.path[0] = os.path.dirname(os.path.abspath(case["script"]))
            try:
                runpy.run_path(case["script"], run_name="__main__")
                code = 0
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    codes[key] = os.waitstatus_to_exitcode(status)
json.dump(codes, sys.stdout)
"""


def run_forked(cmds: dict[str, list[str]], workdir: Path, timeout: float = 600) -> dict[str, Result]:
    """Run ``[python, script, *args]`` commands as forked children of one interpreter that imported
    ``subspaces`` once (one after the other). Each child has its own exit status, stdout and stderr
    (file descriptors 1 and 2); the shared imports must print nothing (checked), so what a child
    prints is what a fresh ``python script args`` would print."""
    cases = {}
    for i, (key, cmd) in enumerate(cmds.items()):
        assert cmd[0] == sys.executable, "run_forked runs python scripts"
        cases[key] = {"script": cmd[1], "args": list(cmd[2:]),
                      "stdout": str(workdir / f"forked{i}.out"), "stderr": str(workdir / f"forked{i}.err")}
    proc = subprocess.run([sys.executable, "-c", _ZYGOTE], cwd=REPO, env=recipe_env(), input=json.dumps(cases),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stderr == "", f"the forking interpreter failed or printed on stderr:\n{proc.stderr}"
    codes = json.loads(proc.stdout)
    return {key: Result(cmds[key], codes[key], Path(case["stdout"]).read_text(), Path(case["stderr"]).read_text())
            for key, case in cases.items()}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def checkpoint_progress(run_dir: Path) -> dict[str, Any] | None:
    """The progress (epoch, updates, within_epoch) of a run folder's newest complete checkpoint, or None."""
    folder = latest_checkpoint(run_dir, verify=False)
    return None if folder is None else read_progress(folder)


def assert_metrics(m: dict[str, Any], count: int | None = EVAL_SUBSET) -> None:
    """acc / nll / ece / brier present, finite and in range (and the number of examples evaluated)."""
    for key in METRIC_KEYS:
        assert key in m, f"metric {key!r} missing from {m}"
        assert math.isfinite(m[key]), f"metric {key} = {m[key]} is not finite"
    assert 0.0 <= m["acc"] <= 1.0
    assert 0.0 <= m["ece"] <= 1.0
    assert 0.0 <= m["brier"] <= 2.0
    assert m["nll"] >= 0.0
    if count is not None:
        assert m["count"] == count


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    pa, pb = params(a), params(b)
    assert list(pa) == list(pb), f"{what}: parameter names differ"
    different = [n for n in pa if not torch.equal(pa[n], pb[n])]
    assert not different, f"{what}: parameters differ: {different[:5]}"


#: runs a recipe with a crash injected: ``python DRIVER MODE N RECIPE ARGS...``; MODE kill_step (SIGKILL
#: at loss call N), nan (loss NaN from call N), term (SIGTERM in the middle of call N), kill_save
#: (SIGKILL inside save_checkpoint, after accelerate's files)
CRASH_DRIVER = r'''
import os, runpy, signal, sys
mode, n, recipe, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
import torch
from subspaces import training

def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if mode in ("kill_step", "nan", "term"):
    original, calls = training.Trainer._loss, [0]
    def _loss(self, logits, y):
        calls[0] += 1
        loss = original(self, logits, y)
        if calls[0] >= n:
            if mode == "kill_step":
                die()
            if mode == "term":   # a scheduler's preemption notice, delivered in the middle of step n
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGTERM)
                return loss
            return loss * float("nan")
        return loss
    training.Trainer._loss = _loss
elif mode == "kill_save":   # inside save_checkpoint, after accelerate's model, optimiser and RNG files
    from subspaces import checkpoint
    def write_training_state(*a, **k):
        die()
    checkpoint.write_training_state = write_training_state
sys.argv = [recipe, *argv]
runpy.run_path(recipe, run_name="__main__")
'''


def tiny_resnet_as(kind: str) -> Any:
    """timm's test_resnet (10 classes, seed 0) as ``kind``: "plain", "line" (also "mixup": a line
    trained on mixed batches), "layerwise" (a line with a point per layer) or "simplex" (3 vertices)."""
    import timm
    import torch

    import subspaces as ss

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    if kind in ("line", "mixup"):
        return ss.Line(model, seed=0)
    if kind == "layerwise":
        return ss.Line(model, seed=0, sampling="layerwise")
    if kind == "simplex":
        return ss.Simplex(model, vertices=3, seed=0)
    return model
