"""The start of every run: its folder, its one writer, its accelerator, its seed and its config.

:func:`prepare_run` is the preamble every recipe shares::

    with prepare_run(args) as run:          # folder checked, lock taken, accelerator, seed
        data, model, spec = ...
        run.record(spec)                    # prints the resolved input, writes config.yaml
        ...

The lock (``OUT/.lock``, an advisory ``flock`` through ``filelock``) lets one job write a run
folder at a time; the kernel drops it when its process dies, so a folder left by a killed job is
resumed without a stale lock in the way. Only the main process takes it: the ranks of one job
share their folder.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from filelock import FileLock, Timeout
import yaml

from .checkpoint import project_configuration
from .errors import ConfigError
from .io import atomic_path
from .settings import RecipeConfig, RunConfig, Settings, TrainConfig, check_compile

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"
TRACKER_DIR = "trackers"


#: the key of a run's config.yaml that holds what it resolved (input size, channels, mean/std): not a flag
RESOLVED_KEY = "resolved"


def save_config(args: Settings | dict[str, Any], path: str) -> None:
    """Write the resolved settings as YAML, atomically (a temporary file renamed over ``path``)."""
    data = args.to_dict() if isinstance(args, Settings) else dict(args)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=True))


def read_config(path: str) -> dict[str, Any]:
    """A run's ``config.yaml`` as a mapping (empty for an empty file)."""
    with open(path) as f:
        return yaml.safe_load(f) or {}


def prepare_output(args: RunConfig) -> Path:
    """Create the run folder ``args.output``, checking before any work that a real write there
    succeeds and that there is room for checkpoints; nothing is left behind when it fails (ConfigError)."""
    out = Path(args.output)
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:   # a real write (and fsync): a full disk fails here, not mid-run
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ConfigError(f"cannot write to the output folder {out}: {err.strerror or err}; pass --output to a writable folder") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = shutil.disk_usage(out).free
    if free < 200 * 2**20:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free in {out}: checkpoints need more; free space or pass --output elsewhere")
    return out


def make_accelerator(args: TrainConfig, project_dir: str | os.PathLike | None = None) -> Accelerator:
    """accelerate's Accelerator with the run's mixed precision, accumulation and seedable sampler.

    Without an accelerator device it runs on the CPU explicitly (``cpu=True``): that is how
    accelerate picks up the ranks of ``torchrun --nproc_per_node N`` on CPU machines (gloo).
    ``mixed_precision`` None takes the launcher's (``accelerate launch --mixed_precision``,
    ``accelerate config``); the precision that runs is written back into ``args`` so the saved
    config records it. fp16 on the CPU is refused: accelerate would run fp32 and say nothing.
    ``args.log_with`` names accelerate trackers, writing under ``project_dir/trackers``
    (accelerate's ``logging_dir``). With a ``project_dir``, accelerate names the checkpoints
    itself: ``project_dir/checkpoints/checkpoint_<i>``, the newest ``args.checkpoint_hist`` kept
    (:mod:`subspaces.checkpoint`). The launcher's ``--dynamo_backend`` / ``--dynamo_mode``
    become ``args.torchcompile`` / ``torchcompile_mode`` unless those are set (and so are saved
    in the config, for a resume to compile the same way); accelerate's own compile is off
    because the Trainer compiles the prepared model itself (see :func:`subspaces.models.compile_model`).
    """
    on_cpu = args.cpu or not torch.accelerator.is_available()
    requested = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if on_cpu and requested == "fp16":
        source = "--mixed-precision fp16" if args.mixed_precision else "the launcher's mixed precision fp16 (ACCELERATE_MIXED_PRECISION)"
        raise ConfigError(f"{source} needs a GPU: on the CPU accelerate would silently train in fp32; "
                          "use --mixed-precision bf16 (CPU autocast) or no")
    log_with = args.log_with
    if log_with and project_dir is None:
        raise ConfigError("--log-with needs a run folder for the trackers' files: pass an output folder")
    launcher = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if args.torchcompile is None and launcher != "no":   # `accelerate launch --dynamo_backend X` means --torchcompile X
        args.torchcompile = launcher
        launcher_mode = os.environ.get("ACCELERATE_DYNAMO_MODE")
        args.torchcompile_mode = args.torchcompile_mode or (launcher_mode if launcher_mode not in (None, "default") else None)
        check_compile(args.torchcompile, args.torchcompile_mode)
    accelerator = Accelerator(
        # the Trainer compiles after prepare (models.compile_model), not accelerate: the prepared
        # model and its checkpoints stay the eager module's, whether or not a run compiles
        dynamo_backend="no",
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        cpu=on_cpu,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        project_config=None if project_dir is None else project_configuration(
            project_dir, args.checkpoint_hist, logging_dir=Path(project_dir) / TRACKER_DIR),
    )
    args.mixed_precision = str(accelerator.mixed_precision)
    return accelerator


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the block; ConfigError at once when another live job holds it."""
    lock = FileLock(str(out / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = (out / OWNER_NAME).read_text().strip() if (out / OWNER_NAME).exists() else "another process"
        raise ConfigError(f"{out} is being written by another run ({owner}); wait for it to finish or pass another --output") from None
    owner = out / OWNER_NAME
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()   # the empty .lock file stays: deleting it would race with a process opening it


def describe_input(spec: dict[str, Any]) -> str:
    """One line naming the input a run resolved: size, channels, normalisation, dataset."""
    size = spec.get("img_size")
    shown = f"{size}x{size}" if size else "the dataset's own size"
    return (f"input: {spec.get('dataset', '?')} images at {shown}, {spec.get('in_chans')} channel(s), "
            f"mean {_rounded(spec.get('mean'))}, std {_rounded(spec.get('std'))}, for {spec.get('model')}")


def _rounded(values: Any) -> Any:
    return [round(float(v), 4) for v in values] if isinstance(values, (list, tuple)) else values


@dataclass
class Run:
    """A started run: its folder ``out``, its ``accelerator`` and the settings it runs with."""

    args: RecipeConfig
    out: Path
    accelerator: Accelerator

    def record(self, spec: dict[str, Any] | None = None) -> None:
        """Log the resolved input (``spec``: the model spec of :mod:`subspaces.io`) and write
        ``config.yaml`` (:func:`write_run_config`)."""
        if spec is not None:
            logger.info(describe_input(spec))
        if self.accelerator.is_main_process:
            write_run_config(self.args, self.out, spec)


def write_run_config(args: Settings, out: Path, spec: dict[str, Any] | None = None) -> None:
    """``out/config.yaml``: the settings ``args``, plus under ``resolved`` the input the run uses
    (model, dataset, img_size, in_chans, mean, std, num_classes of ``spec``)."""
    data = args.to_dict()
    if spec is not None:
        data[RESOLVED_KEY] = {k: spec.get(k) for k in ("model", "dataset", "img_size", "in_chans", "mean", "std", "num_classes")}
    save_config(data, str(out / "config.yaml"))


@contextmanager
def prepare_run(args: RecipeConfig, seed: int | None = None) -> Iterator[Run]:
    """The preamble of a run into ``args.output`` (``args.resume`` when resuming): the folder
    checked writable, its lock held by the main process for the block, the accelerator made,
    the seed set (``seed``, default ``args.seed``)."""
    if args.resume:
        args.output = args.resume
    out = prepare_output(args)
    accelerator = make_accelerator(args, project_dir=out)
    if accelerator.is_main_process:
        with run_lock(out):
            set_seed(args.seed if seed is None else seed)
            yield Run(args, out, accelerator)
    else:
        set_seed(args.seed if seed is None else seed)
        yield Run(args, out, accelerator)
