"""Checkpoints of a run folder: accelerate's own, plus what accelerate cannot guarantee.

accelerate writes them (``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)``): ``save_state`` puts the model, optimiser, RNG states and every object given
to ``register_for_checkpointing`` (the scheduler and :class:`TrainingProgress`) into
``OUT/checkpoints/checkpoint_<i>``, deleting the oldest folders beyond ``N``; ``load_state``
reads them back. Layout::

    OUT/checkpoints/checkpoint_<i>/
        model.safetensors  optimizer.bin  random_states_<rank>.pkl     accelerate
        custom_checkpoint_0.pkl (TrainingProgress)  custom_checkpoint_1.pkl (the scheduler)
        rank_state_<rank>.pt    this module: each rank's point generator
        manifest.json           this module, written last: every file's size and SHA-256

What stays here, and why accelerate cannot do it (accelerate 1.16):

- per-rank state: ``register_for_checkpointing`` objects are saved by the main process only
  and loaded on every rank, but a subspace's point generator differs per rank on purpose;
- completeness: accelerate writes straight into ``checkpoint_<i>`` with no marker, so a job
  killed mid-save leaves a folder that its ``load_state()`` would pick as the newest; here
  ``manifest.json`` is written last and only folders with it count (:func:`latest_checkpoint`);
- damage: the manifest's digests find a truncated or corrupted file before anything is loaded;
- the save counter: ``load_state`` does not restore ``save_iteration``, so a resumed run would
  save into ``checkpoint_0`` again (accelerate refuses an existing folder);
  :func:`prepare_saves` sets it past the checkpoint resumed from and removes newer cut folders,
  which would otherwise count against ``total_limit`` and push the last complete one out;
- non-finite weights are never saved over a good checkpoint (:func:`save_checkpoint`).

accelerate loads registered objects with ``torch.load(weights_only=False)`` (a pickle), so a
checkpoint folder is code that runs on resume: resume only run folders you trust. The manifest
catches damage, not forgery; :func:`read_progress` itself reads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .io import atomic_path, file_digest

#: accelerate's folder of automatically named checkpoints, under the project directory
CHECKPOINTS = "checkpoints"
#: written last: a checkpoint folder without it was cut by a kill and is never resumed from
MANIFEST = "manifest.json"
#: the file accelerate writes for the first registered object (the Trainer registers TrainingProgress first)
PROGRESS_FILE = "custom_checkpoint_0.pkl"
#: checkpoints kept by default: 2, so that a kill during a save leaves the previous one complete
DEFAULT_HISTORY = 2
#: the single-folder layout of earlier versions (checkpoint/ + progress.json)
LEGACY_NAMES = ("checkpoint", "checkpoint.old", ".checkpoint.tmp")
#: files written by one rank each: absent on another node's disk, so absent ones are not an error
PER_RANK = re.compile(r"^(random_states_\d+\.pkl|rank_state_\d+\.pt)$")
FOLDER = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class TrainingProgress:
    """Where training stands: ``epoch`` epochs done, ``updates`` optimiser updates, and
    ``within_epoch`` (step, loss and accuracy sums so far) when a stop request saved mid-epoch.
    Saved by accelerate as a registered object (``state_dict`` / ``load_state_dict``)."""

    epoch: int = 0
    updates: int = 0
    within_epoch: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "updates": self.updates}
        if self.within_epoch is not None:
            state["within_epoch"] = dict(self.within_epoch)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.updates = state["epoch"], state["updates"]
        self.within_epoch = state.get("within_epoch")


def check_history(history: int) -> None:
    """ConfigError unless at least 2 checkpoints are kept: accelerate deletes the oldest before
    writing the next, so with 1 a kill during a save would leave none."""
    if history < 2:
        raise ConfigError(f"--checkpoint-hist {history} is too small: a save first deletes the oldest checkpoint, "
                          "so a kill during it would leave none; use --checkpoint-hist 2 or more")


def project_configuration(out: str | os.PathLike, history: int = DEFAULT_HISTORY, logging_dir: str | os.PathLike | None = None) -> ProjectConfiguration:
    """accelerate's ProjectConfiguration for a run folder: checkpoints under ``out/checkpoints``,
    the newest ``history`` (>= 2) kept; trackers under ``logging_dir``."""
    check_history(history)
    return ProjectConfiguration(project_dir=str(out), logging_dir=str(logging_dir) if logging_dir is not None else None,
                                automatic_checkpoint_naming=True, total_limit=history)


def use_run_folder(accelerator: Accelerator, out: str | os.PathLike, history: int = DEFAULT_HISTORY) -> None:
    """Point ``accelerator``'s automatic checkpoint naming at ``out/checkpoints`` keeping ``history``
    folders (for accelerators made elsewhere; :func:`subspaces.run_folder.make_accelerator` does it)."""
    check_history(history)
    config = accelerator.project_configuration
    config.project_dir = str(out)
    config.automatic_checkpoint_naming = True
    config.total_limit = history


def checkpoint_index(folder: str | os.PathLike) -> int | None:
    """``i`` of a folder named ``checkpoint_<i>``, else None."""
    match = FOLDER.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(out: str | os.PathLike) -> list[Path]:
    """Every ``out/checkpoints/checkpoint_<i>``, complete or not, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(checkpoint_index(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for i, p in sorted((i, p) for i, p in found if i is not None)]


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was finished (its manifest, written last, is there)."""
    return (Path(folder) / MANIFEST).is_file()


def latest_checkpoint(out: str | os.PathLike, verify: bool = True) -> Path | None:
    """The newest complete checkpoint of run folder ``out`` (``out/checkpoints/checkpoint_<i>``
    with its manifest), or None. Folders cut by a kill mid-save are skipped. With ``verify`` its
    files are checked against the manifest (:func:`verify_checkpoint`). A folder of the earlier
    single-folder layout (``out/checkpoint/``) and no new one: CheckpointError saying what to do."""
    out = Path(out)
    for folder in reversed(checkpoint_folders(out)):
        if is_complete(folder):
            if verify:
                verify_checkpoint(folder)
            return folder
    legacy = next((out / n for n in LEGACY_NAMES if (out / n / "progress.json").exists()), None)
    if legacy is not None:
        raise CheckpointError(f"{legacy} is a checkpoint of an earlier subspaces (one checkpoint/ folder); this version resumes from "
                              f"{out / CHECKPOINTS}/checkpoint_<i>: finish that run with the version that started it, "
                              f"or delete {legacy} to train it again from scratch")
    return None


def has_checkpoint(out: str | os.PathLike) -> bool:
    """Whether run folder ``out`` holds a complete checkpoint to resume from (not verified)."""
    return latest_checkpoint(out, verify=False) is not None


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint folder before resuming from it; returns its manifest ``{name: {size, sha256}}``.

    Every file listed must have the recorded size and SHA-256; a listed file that is missing is
    an error too, except the per-rank files (``random_states_<r>.pkl``, ``rank_state_<r>.pt``) of
    other nodes (loading names any that is needed). Raises CheckpointError naming the file.
    """
    d = Path(folder)
    fix = f"delete {d} to resume from the checkpoint before it (or {d.parent} to restart the run), or restore the file"
    try:
        files = json.loads((d / MANIFEST).read_text())
        if not isinstance(files, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot resume: {d / MANIFEST} is truncated or corrupted ({err}); {fix}") from None
    for name, want in files.items():
        path = d / name
        if not path.exists():
            if PER_RANK.match(name):
                continue
            raise CheckpointError(f"cannot resume: {path} is missing (it was written with this checkpoint); {fix}")
        have = file_digest(path)
        want = want if isinstance(want, dict) else {}
        if have["size"] != want.get("size"):
            raise CheckpointError(f"cannot resume: {path} is truncated or corrupted ({have['size']} bytes, "
                                  f"{want.get('size')} were written); {fix}")
        if have["sha256"] != want.get("sha256"):
            raise CheckpointError(f"cannot resume: {path} is corrupted (its SHA-256 differs from the one "
                                  f"recorded when it was written); {fix}")
    return files


def read_progress(folder: str | os.PathLike) -> dict[str, Any]:
    """The :class:`TrainingProgress` state saved in a checkpoint folder: ``{"epoch", "updates"[, "within_epoch"]}``
    (read with ``torch.load(weights_only=True)``: plain numbers, nothing executed)."""
    path = Path(folder) / PROGRESS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is named
        raise CheckpointError(f"cannot read the training progress {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(state, dict) or not {"epoch", "updates"} <= set(state):
        raise CheckpointError(f"{path} lacks 'epoch' / 'updates': not a checkpoint of this version (corrupted?)")
    return state


def optimizer_state_file(out: str | os.PathLike) -> Path | None:
    """The optimiser state (accelerate's ``optimizer.bin``) of run folder ``out``'s newest
    complete checkpoint, or of its earlier single-folder layout; None if there is none."""
    out = Path(out)
    complete = [f for f in checkpoint_folders(out) if is_complete(f)]
    for folder in [*reversed(complete), *(out / n for n in LEGACY_NAMES[:2])]:
        if (folder / "optimizer.bin").is_file():
            return folder / "optimizer.bin"
    return None


def save_optimizer_state(optimizer: Any, path: str | os.PathLike) -> Path:
    """``optimizer.state_dict()`` saved atomically at ``path`` (as accelerate's ``optimizer.bin``),
    outside the run's checkpoints: FGE's start (:func:`subspaces.snapshots.load_optimizer_state`)."""
    with atomic_path(path) as tmp:
        torch.save(optimizer.state_dict(), tmp)
    return Path(path)


def remove_checkpoints(out: str | os.PathLike) -> None:
    """Delete every checkpoint of run folder ``out`` (new and earlier layout): a run started afresh."""
    out = Path(out)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for name in LEGACY_NAMES:
        shutil.rmtree(out / name, ignore_errors=True)


def prepare_saves(accelerator: Accelerator, out: str | os.PathLike, resumed_from: Path | None) -> None:
    """Make the next ``save_state`` write ``checkpoint_<i+1>`` after resuming from ``checkpoint_<i>``
    (``checkpoint_0`` for a fresh run, whose old checkpoints are removed): accelerate's
    ``load_state`` leaves its ``save_iteration`` at 0. Folders newer than ``resumed_from`` (cut by
    a kill mid-save) are removed, or ``total_limit`` would count them and delete complete ones."""
    index = -1 if resumed_from is None else checkpoint_index(resumed_from)
    if index is None:
        raise CheckpointError(f"{resumed_from} is not a folder named checkpoint_<i> of accelerate's automatic naming")
    if accelerator.is_main_process:
        if resumed_from is None:
            remove_checkpoints(out)
        for folder in checkpoint_folders(out):
            if checkpoint_index(folder) > index:   # type: ignore[operator]
                shutil.rmtree(folder, ignore_errors=True)
    accelerator.project_configuration.iteration = index + 1
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, progress: TrainingProgress, model: torch.nn.Module,
                    rank_state: torch.Tensor | None = None) -> Path:
    """``accelerator.save_state()`` into the next ``checkpoint_<i>`` (accelerate keeping the newest
    ``total_limit``), then this rank's ``rank_state`` (a subspace's point generator, which differs
    per rank: accelerate saves registered objects on the main process only) as
    ``rank_state_<rank>.pt``, then ``manifest.json`` (every file's size and SHA-256), last.

    ``model`` (the prepared one) is checked first: weights that are not finite are never saved
    (NonFiniteLossError); a failed write (disk full) removes the cut folder and leaves the
    previous checkpoints as they were. Returns the folder.
    """
    for name, p in model.named_parameters():   # never save NaN weights over a good checkpoint
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteLossError(
                f"weight {name} is NaN or infinite after epoch {progress.epoch} (update "
                f"{progress.updates}): the run stopped without saving it; the last good "
                f"checkpoint is kept. Lower --lr, or try --mixed-precision no / bf16"
            )
    folder = Path(accelerator.project_dir) / CHECKPOINTS / f"checkpoint_{accelerator.save_iteration}"
    try:
        accelerator.save_state(safe_serialization=True)
        if rank_state is not None:
            torch.save(rank_state, folder / f"rank_state_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(folder)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        raise OSError(err.errno, f"cannot write the checkpoint {folder} ({err.strerror or err}); "
                                 f"the previous checkpoint is kept") from err
    accelerator.wait_for_everyone()
    return folder


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: ``{name: {size, sha256}}`` of every file in ``folder``, flushed to disk."""
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w") as f:
        json.dump(files, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(accelerator: Accelerator, folder: Path, net: Any = None) -> None:
    """``accelerator.load_state(folder)`` (model, optimiser, RNG, registered objects such as
    :class:`TrainingProgress` and the scheduler) and this rank's ``rank_state_<rank>.pt`` into
    ``net.set_extra_state`` when ``net`` is given. Any failure is a CheckpointError naming the
    folder: never train from a half-loaded state."""
    try:
        accelerator.load_state(str(folder))
        rank_file = folder / f"rank_state_{accelerator.process_index}.pt"
        if net is not None and rank_file.exists():
            net.set_extra_state(torch.load(rank_file, weights_only=True))
    except Exception as err:  # a damaged checkpoint: name it
        raise CheckpointError(f"cannot resume from {folder}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
