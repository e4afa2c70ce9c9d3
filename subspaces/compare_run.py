"""Training the comparison's members: one process each, in turn, in worker processes or shared out between ranks.

A member is an independent run (an Ind network, the SSE or FGE run, a line, a simplex, a SPRO
simplex: each method's, :mod:`subspaces.methods`) with a run folder of its own under
``OUTPUT/seedR/``. :class:`Runner` trains one member of a replicate (resuming its own
checkpoint) by its method's :meth:`~subspaces.method_registry.CompareMethod.train`;
:func:`run_members` trains every unfinished one: in this process, or ``jobs`` at a time in worker
processes (``python -m subspaces.compare_worker``), each after the members it starts from, the
ranks of a distributed launch claiming them through files. Every member trains alone, so the plan is the same under any launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from . import metrics_log
from .checkpoint import has_checkpoint
from .compare_eval import PREDICTIONS, evaluate_member
from .compare_plan import Plan, in_table_order
from .compare_progress import compare_progress
from .data import DataBundle
from .errors import PREEMPTED_STATUS, ConfigError, MemberFailed, NonFiniteLossError, Preempted
from .io import write_json
from .method_registry import Member, MethodEntry, find_member, get_method
from .methods.common import log
from .methods.ind import PRETRAIN_OPTIMIZER
from .run_folder import make_accelerator, save_config
from .settings import CompareConfig
from .training import Trainer, create_timm_model, finish_run, wrap_subspace

__all__ = ["LAUNCH_VARIABLES", "PRETRAIN_OPTIMIZER", "Runner", "Task", "default_jobs", "log", "run_members", "train_seconds",
           "worker_environment"]

#: environment variables of a distributed launch: a member's worker process must not see them,
#: or accelerate would join it to the launcher's process group
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train_seconds(folder: Path) -> float:
    """Seconds of training a member folder records (its epochs in metrics.jsonl, SPRO stages included)."""
    return metrics_log.train_seconds([folder / "metrics.jsonl", *sorted(folder.glob("vertex*/metrics.jsonl"))])


@dataclass(frozen=True)
class Task:
    """One member run of replicate ``replicate``: ``name`` is its folder, ``deps`` the members it starts from."""

    replicate: int
    name: str
    deps: tuple[str, ...] = ()


class Runner:
    """Trains (or reuses) the members of one replicate (seed) of the protocol."""

    def __init__(self, args: CompareConfig, plan: Plan, data: DataBundle, spec: dict[str, Any], root: Path, seed: int) -> None:
        self.args, self.plan, self.data, self.spec, self.root, self.seed = args, plan, data, spec, root, seed

    def standard(self, name: str, seed: int, epochs: int, subspace: str = "none", on_update: Any = None, **extra: Any) -> None:
        """Train a plain network or a shape from scratch into ``root/name`` (resuming its checkpoint)."""
        folder = self.root / name
        margs = self.args.member(str(folder), seed=seed, epochs=epochs, subspace=subspace, **extra)
        folder.mkdir(parents=True, exist_ok=True)
        accelerator = make_accelerator(margs, project_dir=folder)
        set_seed(seed)
        model, _ = create_timm_model(margs, self.spec["num_classes"], self.spec["in_chans"])
        net = wrap_subspace(margs, model, rank=accelerator.process_index)
        if accelerator.is_main_process:
            save_config(margs, str(folder / "config.yaml"))
        resume = has_checkpoint(folder)
        what = "standard network" if subspace == "none" else f"{subspace} from scratch"
        log(f"{folder}: {what}, {epochs} epochs, seed {seed}" + (" (resuming)" if resume else ""))
        # no evaluation by the member's own loop: run_task predicts each network it contributes, once
        trainer = Trainer(margs, net, self.data, self.spec, accelerator, folder, on_update=on_update, final_evaluation=False)
        trainer.fit(resume=resume)
        finish_run(trainer, f"{name} (seed {seed})")

    def member(self, name: str) -> tuple[MethodEntry, Member]:
        """The method of the plan that trains member ``name``, and the member (ValueError if none)."""
        return find_member(self.plan.methods, self.plan, name)

    def tasks(self, replicate: int) -> list[Task]:
        """The members of this replicate in the order they start, each after the members it starts
        from: the methods' members in their ``rank`` order (ties in the table's order)."""
        members = [m for name in in_table_order(self.plan.methods) for m in get_method(name).method.members(self.plan)]
        return [Task(replicate, m.name, m.deps) for m in sorted(members, key=lambda m: m.rank)]

    def log_path(self, name: str) -> Path:
        """Where a worker process writes member ``name``'s output."""
        return self.root / "logs" / f"{name}.log"

    def is_done(self, name: str) -> bool:
        """Whether member ``name`` is trained and its networks' predictions are saved."""
        return self.is_trained(name) and (self.root / name / PREDICTIONS).exists()

    def is_trained(self, name: str) -> bool:
        entry, member = self.member(name)
        return entry.method.is_trained(self, member)

    def run_task(self, name: str) -> None:
        """Train member ``name`` of this replicate (resuming its own checkpoint if it has one),
        then save the predictions of its networks (:func:`subspaces.compare_eval.evaluate_member`)."""
        if not self.is_trained(name):
            self.train(name)
        a = self.args
        t0 = time.perf_counter()
        evaluate_member(name, self.root / name, self.plan, self.data, samples=a.samples, seed=self.seed, batch_size=a.batch_size,
                        eval_batch_size=a.eval_batch_size, bn_batches=a.bn_batches, channels_last=a.channels_last)
        log(f"{self.root / name}: evaluated in {time.perf_counter() - t0:.0f} s")

    def train(self, name: str) -> None:
        """Train member ``name`` of this replicate (resuming its own checkpoint if it has one)."""
        entry, member = self.member(name)
        entry.method.train(self, member)


def worker_environment(threads: int, output: Path | None = None) -> dict[str, str]:
    """The environment of a member's worker process: this one's, without a distributed launch
    (the member trains alone) and with ``threads`` OpenMP threads; with the compare's ``output``,
    one torch.compile cache for all workers (``output/.compile_cache``) unless the user set one,
    so that only the first member of a kind pays the compile (``--torchcompile``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARIABLES and not k.startswith(("TORCHELASTIC_", "ACCELERATE_", "TORCH_NCCL", "NCCL_"))}
    if output is not None:
        cache = Path(output).absolute() / ".compile_cache"
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    env["OMP_NUM_THREADS"] = str(max(1, threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def default_jobs(threads: int, local_processes: int) -> int:
    """Members trained at once by one process: the cores left to it at ``threads`` threads per member."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads) // max(1, local_processes))


def _failure(name: str, rc: int, log_path: Path) -> Exception:
    """The error of a member's worker that exited with ``rc``: its own kind for the recipes'
    statuses (2 bad input, 3 a non-finite loss, 75 stopped), :class:`MemberFailed` for a crash
    or a kill; the message names the member, its last error line and its log."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.exists() else []
    last = next((ln for ln in reversed(lines) if ln.startswith(("error:", "stopped:"))), lines[-1] if lines else "no output")
    how = f"was killed by signal {-rc}" if rc < 0 else f"failed with exit status {rc}"
    msg = (f"compare member {name} {how}: {last.removeprefix('error: ').removeprefix('stopped: ')} (its log: {log_path}); "
           "run the same command again to resume it")
    if rc == 2:
        return ConfigError(msg)
    if rc == 3:
        return NonFiniteLossError(msg)
    if rc == PREEMPTED_STATUS:
        return Preempted(msg)
    return MemberFailed(msg)


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
    display = compare_progress(runners, tasks, jobs, claims=out / ".claims", live=not in_process)   # progress view
    display.start()   # progress view
    if in_process:
        for t in tasks:
            if done(t):
                log(f"{runners[t.replicate].root / t.name}: finished earlier, reused")
                continue
            if limit is not None and trained >= limit:
                return False, trained
            t0 = time.perf_counter()
            display.update(running=[t])   # progress view
            runners[t.replicate].run_task(t.name)
            trained += 1
            display.update()   # progress view
            log(f"{runners[t.replicate].root / t.name}: done in {time.perf_counter() - t0:.0f} s")
        display.stop()   # progress view
        return True, trained
    claims = out / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    running: dict[Task, tuple[subprocess.Popen, Any, float, Path]] = {}
    # a SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so the workers are stopped, not orphaned
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if threading.current_thread() is threading.main_thread() else None
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
            display.update(running=running)   # progress view
            failed = [t for t in pending if (claims / f"{t.replicate}.{t.name}.failed").exists()]
            if failed:
                t = failed[0]
                raise MemberFailed(f"compare member seed{t.replicate}/{t.name} failed in another process; its log: "
                                   f"{runners[t.replicate].log_path(t.name)}")
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
    except KeyboardInterrupt:   # SIGTERM or SIGINT: each worker checkpoints its member and stops
        statuses = []
        for t, (proc, fh, _, _) in list(running.items()):
            proc.terminate()
            statuses.append(f"seed{t.replicate}/{t.name} exit {proc.wait()}")
            fh.close()
            del running[t]
        stopped = f"; members stopped: {', '.join(statuses)}" if statuses else ""
        raise Preempted(f"compare interrupted after {trained} member run(s) started{stopped}; "
                        "run the same command again (or with --resume OUT) to continue") from None
    finally:
        display.stop()   # progress view
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for proc, fh, _, _ in running.values():   # an error or a signal here: stop the workers (they resume next time)
            proc.terminate()
            proc.wait()
            fh.close()


def _start_worker(runner: Runner, task: Task, claims: Path) -> tuple[subprocess.Popen, Any, float, Path]:
    spec = claims / f"{task.replicate}.{task.name}.json"
    write_json({"args": runner.args.to_dict(), "replicate": task.replicate, "seed": runner.seed, "root": str(runner.root),
                "task": task.name}, spec)
    log_path = runner.log_path(task.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "a")
    log(f"{runner.root / task.name}: started in a worker process (log {log_path})")
    proc = subprocess.Popen([sys.executable, "-m", "subspaces.compare_worker", str(spec)], stdout=fh, stderr=subprocess.STDOUT,
                            env=worker_environment(runner.args.threads, Path(runner.args.output)), start_new_session=False)
    return proc, fh, time.perf_counter(), log_path
