"""Checkpoints of a run folder: accelerate's own, plus what accelerate cannot guarantee.

accelerate writes them (``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)``): ``save_state`` puts the model, optimiser and RNG states into
``OUT/checkpoints/checkpoint_<i>``, deleting the oldest folders beyond ``N``; ``load_state``
reads them back. Layout::

    OUT/checkpoints/checkpoint_<i>/
        model.safetensors  optimizer.bin  random_states_<rank>.pkl     accelerate
        progress.json (TrainingProgress)  scheduler.json (the scheduler)  this module, JSON
        rank_state_<rank>.pt    this module: each rank's point generator
        manifest.json           this module, written last: every file's size and SHA-256

Resuming never runs code stored in the folder. accelerate unpickles the objects given to
``register_for_checkpointing`` with ``torch.load(weights_only=False)``, so nothing is registered:
the training progress and the scheduler's state are written here as JSON (plain numbers, strings,
lists). Every other file resume reads is loaded with ``weights_only=True`` (torch's restricted
unpickler: tensors, numbers, containers and numpy's RNG arrays, never an arbitrary global) or as
safetensors, and is checked that way here before accelerate reads it (:func:`check_loadable`),
because accelerate skips an RNG file it cannot load without a word. A file in a form this project
does not write is refused with a CheckpointError naming it; a folder of an earlier version, whose
registered objects are pickles (``custom_checkpoint_<i>.pkl``), is refused without reading them.
The manifest catches damage, not forgery: a forged folder can hold wrong numbers, not code.

What stays here, and why accelerate cannot do it (accelerate 1.16):

- the registered state as JSON (above);
- per-rank state: a subspace's point generator differs per rank on purpose, while accelerate's
  registered objects are saved by the main process only;
- completeness: accelerate writes straight into ``checkpoint_<i>`` with no marker, so a job
  killed mid-save leaves a folder that its ``load_state()`` would pick as the newest; here
  ``manifest.json`` is written last and only folders with it count (:func:`latest_checkpoint`);
- damage: the manifest's digests find a truncated or corrupted file before anything is loaded;
- the save counter: ``load_state`` does not restore ``save_iteration``, so a resumed run would
  save into ``checkpoint_0`` again (accelerate refuses an existing folder);
  :func:`prepare_saves` sets it past the checkpoint resumed from and removes newer cut folders,
  which would otherwise count against ``total_limit`` and push the last complete one out;
- non-finite weights are never saved over a good checkpoint (:func:`save_checkpoint`).

This covers the checkpoints the Trainer writes (one process or DDP); accelerate's DeepSpeed,
FSDP and Megatron-LM checkpoints are read by their own code, not checked here.
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
from accelerate.utils import load as accelerate_load

from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .io import atomic_path, file_digest, write_json

#: accelerate's folder of automatically named checkpoints, under the project directory
CHECKPOINTS = "checkpoints"
#: written last: a checkpoint folder without it was cut by a kill and is never resumed from
MANIFEST = "manifest.json"
#: :class:`TrainingProgress` as JSON, written by the main process before the manifest
PROGRESS_FILE = "progress.json"
#: the learning-rate scheduler's ``state_dict()`` as JSON (absent when the run has none)
SCHEDULER_FILE = "scheduler.json"
#: accelerate's pickles of registered objects: an earlier version wrote them; never read
PICKLED_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
#: accelerate's files shared by the ranks that its ``load_state`` may read, all through torch.load(weights_only=True)
TORCH_FILES = re.compile(r"^((model|optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|scaler\.pt)$")
#: the keys accelerate's ``load_state`` reads from ``random_states_<rank>.pkl``
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
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
    Saved as JSON (``progress.json``) by :func:`save_checkpoint`, not registered with accelerate
    (which would pickle it)."""

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
    other nodes (loading names any that is needed). Raises CheckpointError naming the file; a
    folder of an earlier version (pickled registered objects) is refused first (:func:`refuse_pickled_state`).
    """
    d = Path(folder)
    refuse_pickled_state(d)
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


def refuse_pickled_state(folder: str | os.PathLike) -> None:
    """CheckpointError if ``folder`` holds accelerate's pickled registered objects
    (``custom_checkpoint_<i>.pkl``): an earlier version wrote them, and accelerate can only load
    them by unpickling, which runs whatever code the file names. They are never opened."""
    d = Path(folder)
    pickled = sorted(p.name for p in d.iterdir() if PICKLED_STATE.match(p.name)) if d.is_dir() else []
    if pickled:
        raise CheckpointError(f"cannot resume from {d}: it was written by an earlier version of subspaces, which pickled the "
                              f"training state into {d / pickled[0]} (loading it could run code stored in the folder); this "
                              f"version does not read it: the run must be restarted (delete {d.parent} or train into a new --output)")


def read_state_json(path: Path) -> dict[str, Any]:
    """A JSON object written by :func:`save_checkpoint` (``progress.json``, ``scheduler.json``);
    CheckpointError naming ``path`` if it is missing, not JSON or not an object."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume: {path} is missing: not a checkpoint written by this version of subspaces") from None
    except (OSError, ValueError) as err:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"cannot resume: {path} is not a JSON file this project wrote ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot resume: {path} is not a JSON object: not a file this project wrote")
    return state


def read_progress(folder: str | os.PathLike) -> dict[str, Any]:
    """The :class:`TrainingProgress` state saved in a checkpoint folder: ``{"epoch", "updates"[, "within_epoch"]}``
    (JSON: plain numbers, nothing executed). A folder of an earlier version: CheckpointError saying to restart."""
    d = Path(folder)
    path = d / PROGRESS_FILE
    if not path.exists():
        refuse_pickled_state(d)
    state = read_state_json(path)
    if not isinstance(state.get("epoch"), int) or not isinstance(state.get("updates"), int):
        raise CheckpointError(f"{path} lacks an integer 'epoch' / 'updates': not a checkpoint of this version (corrupted?)")
    if not isinstance(state.get("within_epoch", {}), (dict, type(None))):
        raise CheckpointError(f"{path}: 'within_epoch' is not an object: not a checkpoint of this version (corrupted?)")
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
                    rank_state: torch.Tensor | None = None, scheduler: Any = None) -> Path:
    """``accelerator.save_state()`` into the next ``checkpoint_<i>`` (accelerate keeping the newest
    ``total_limit``), then ``progress`` and ``scheduler``'s state as JSON (main process,
    :func:`write_training_state`), then this rank's ``rank_state`` (a subspace's point generator,
    which differs per rank) as ``rank_state_<rank>.pt``, then ``manifest.json`` (every file's size
    and SHA-256), last.

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
    index = accelerator.save_iteration
    folder = Path(accelerator.project_dir) / CHECKPOINTS / f"checkpoint_{index}"
    try:
        accelerator.save_state(safe_serialization=True)
        if accelerator.is_main_process:   # the same on every rank, as accelerate's registered objects were
            write_training_state(folder, progress, scheduler)
        if rank_state is not None:
            torch.save(rank_state, folder / f"rank_state_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(folder)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        # save_state counts a folder it finished even if the rest of the checkpoint failed: the next save reuses the number
        accelerator.project_configuration.iteration = index
        raise OSError(err.errno, f"cannot write the checkpoint {folder} ({err.strerror or err}); "
                                 f"the previous checkpoint is kept") from err
    accelerator.wait_for_everyone()
    return folder


def write_training_state(folder: Path, progress: TrainingProgress, scheduler: Any = None) -> None:
    """``folder/progress.json`` and, with a scheduler, ``folder/scheduler.json`` (``{"type",
    "state"}``): JSON instead of accelerate's pickles, so that loading them cannot run code.
    Floats are written in Python's shortest round-trip form, so a resume restores them exactly."""
    write_json(progress.state_dict(), folder / PROGRESS_FILE)
    if scheduler is not None:
        write_json({"type": type(scheduler).__name__, "state": scheduler.state_dict()}, folder / SCHEDULER_FILE)


def load_training_state(folder: Path, progress: TrainingProgress | None = None, scheduler: Any = None) -> None:
    """Restore ``progress`` and ``scheduler`` from the JSON of :func:`write_training_state`.
    CheckpointError naming the file if it is missing, malformed, of another scheduler type, or if
    the checkpoint has a scheduler's state and this run has no scheduler (a different configuration)."""
    if progress is not None:
        progress.load_state_dict(read_progress(folder))
    path = folder / SCHEDULER_FILE
    if scheduler is None:
        if path.exists():
            raise CheckpointError(f"cannot resume: {path} holds a learning-rate scheduler's state but this run has no "
                                  f"scheduler (--sched none?): resume with the configuration that wrote it")
        return
    saved = read_state_json(path)
    if saved.get("type") != type(scheduler).__name__ or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"cannot resume: {path} holds the state of a {saved.get('type')!r} scheduler, this run "
                              f"has a {type(scheduler).__name__}: resume with the configuration that wrote it")
    scheduler.load_state_dict(saved["state"])


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: ``{name: {size, sha256}}`` of every file in ``folder``, flushed to disk."""
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w") as f:
        json.dump(files, f)
        f.flush()
        os.fsync(f.fileno())


def files_read_on_resume(folder: Path, rank: int) -> list[Path]:
    """The torch files of ``folder`` that resuming rank ``rank`` reads: accelerate's shared ones
    (``optimizer.bin``, ...), this rank's ``random_states_<rank>.pkl`` and ``rank_state_<rank>.pt``."""
    shared = sorted(p for p in folder.iterdir() if TORCH_FILES.match(p.name))
    own = [folder / f"random_states_{rank}.pkl", folder / f"rank_state_{rank}.pt"]
    return [*shared, *(p for p in own if p.exists())]


def load_weights_only(path: Path) -> Any:
    """``torch.load`` of ``path`` as accelerate's ``load_state`` does it (``weights_only=True``,
    with accelerate's numpy globals for the RNG states): tensors, numbers and containers only,
    never an arbitrary global. Memory-mapped (only the zip format torch.save writes), so that
    checking a large optimiser state does not read it twice. CheckpointError naming ``path`` if
    it is anything else."""
    try:
        # weights_only explicitly: some accelerate versions defaulted to False for the RNG file
        return accelerate_load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler refused, the file is named
        raise CheckpointError(f"cannot resume: {path} is not a file this project wrote ({_refusal(err)}); "
                              f"it was not loaded: delete {path.parent} to resume from the checkpoint before it") from None


def _refusal(err: Exception) -> str:
    """One line saying why torch refused a file (its messages run to several lines and advise
    ``weights_only=False``, which is exactly what must not be done)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln]
    if named:
        return named[0].rstrip(".")
    if "mmap" in str(err) or "zip" in str(err).lower():
        return "not a torch.save zip archive"
    return lines[0] if lines else type(err).__name__


def check_loadable(folder: Path, rank: int) -> None:
    """Before accelerate's ``load_state`` reads ``folder`` on rank ``rank``: no pickled registered
    objects (:func:`refuse_pickled_state`; accelerate would unpickle them), every torch file it
    reads loadable with ``weights_only=True`` (:func:`load_weights_only`) and this rank's RNG
    states present with accelerate's keys (accelerate skips an unreadable one silently, which would
    make the resume inexact). CheckpointError naming the file otherwise."""
    refuse_pickled_state(folder)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.bin").is_file():
        raise CheckpointError(f"cannot resume: {folder / 'model.safetensors'} is missing: not a checkpoint this project wrote")
    for path in files_read_on_resume(folder, rank):
        state = load_weights_only(path)
        if path.name.startswith("random_states_") and not (isinstance(state, dict) and set(RNG_KEYS) <= set(state)):
            raise CheckpointError(f"cannot resume: {path} lacks accelerate's RNG states ({', '.join(RNG_KEYS)}): "
                                  f"not a file this project wrote")
    if not (folder / f"random_states_{rank}.pkl").is_file():
        raise CheckpointError(f"cannot resume: {folder / f'random_states_{rank}.pkl'} is missing: rank {rank}'s RNG states "
                              f"are needed for an exact resume (was the checkpoint written on another node?)")


def load_checkpoint(accelerator: Accelerator, folder: Path, net: Any = None, progress: TrainingProgress | None = None,
                    scheduler: Any = None) -> None:
    """Check ``folder`` (:func:`check_loadable`), then ``accelerator.load_state(folder)`` (model,
    optimiser, RNG), ``progress`` and ``scheduler`` from their JSON (:func:`load_training_state`),
    and this rank's ``rank_state_<rank>.pt`` into ``net.set_extra_state`` when ``net`` is given.
    Nothing in the folder is unpickled beyond torch's ``weights_only`` loader. Any failure is a
    CheckpointError naming the folder or file: never train from a half-loaded state."""
    check_loadable(folder, accelerator.process_index)
    try:
        accelerator.load_state(str(folder))
        load_training_state(folder, progress, scheduler)
        rank_file = folder / f"rank_state_{accelerator.process_index}.pt"
        if net is not None and rank_file.exists():
            net.set_extra_state(torch.load(rank_file, weights_only=True))
    except CheckpointError:
        raise
    except Exception as err:  # a damaged checkpoint: name it
        raise CheckpointError(f"cannot resume from {folder}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
