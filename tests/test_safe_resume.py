"""Resuming a run folder never runs code stored in it.

A run folder is shared between people and machines, and its manifest catches damage, not
forgery: anyone who edits the folder can update the digests. So every file a resume reads must
be loaded without executing anything: the progress and the scheduler as JSON, accelerate's
files through ``torch.load(weights_only=True)`` or safetensors, checked before accelerate reads
them. These tests forge checkpoints whose pickles would create a marker file when unpickled,
update the manifest to match, and resume: refused with one line naming the file, marker absent.
An honest SIGTERM / resume still ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.scheduler import create_scheduler_v2

from helpers import CRASH_DRIVER, STEPS_PER_EPOCH, TINY, recipe_cmd, run
from subspaces.checkpoint import (
    TrainingProgress,
    latest_checkpoint,
    load_checkpoint,
    load_training_state,
    prepare_saves,
    project_configuration,
    read_progress,
    save_checkpoint,
    write_manifest,
    write_training_state,
)
from subspaces.errors import CheckpointError
from subspaces.schedules import FGESchedule, SSESchedule, garipov_schedule

LINE = ["--subspace", "line", *TINY, "--epochs", "2"]
#: the loss call (1-based) that is step 2 of epoch 2: SIGTERM there stops the run mid-epoch
STEP = STEPS_PER_EPOCH + 2


class Payload:
    """Unpickled, it runs a shell command creating ``marker``: what a forged checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _forge(path: Path, marker: Path, raw: bool = False) -> None:
    """Replace ``path`` by a code-running pickle: torch.save's zip format, or a bare pickle (``raw``)."""
    if raw:
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), path)


def _forge_folder(run_dir: Path, marker: Path, earlier_layout: bool = False) -> Path:
    """Forge the newest checkpoint of ``run_dir``: every .pkl / .bin / .pt replaced by a code-running
    pickle; with ``earlier_layout`` the JSON state replaced by the pickled registered objects
    (``custom_checkpoint_<i>.pkl``) of an earlier version, which accelerate would unpickle with
    ``weights_only=False``. The manifest is rewritten to match, as anyone who edits the folder can."""
    folder = latest_checkpoint(run_dir)
    assert folder is not None
    for i, path in enumerate(sorted(p for p in folder.iterdir() if p.suffix in (".pkl", ".bin", ".pt"))):
        _forge(path, marker, raw=i % 2 == 1)
    if earlier_layout:
        for i, name in enumerate(("progress.json", "scheduler.json")):
            (folder / name).unlink(missing_ok=True)
            _forge(folder / f"custom_checkpoint_{i}.pkl", marker)
    write_manifest(folder)
    return folder


def _one_line_refusal(res, *fragments: str) -> str:
    """The resume exited 2 with one error line, no traceback, holding every fragment."""
    assert res.rc == 2, res.explain()
    assert "Traceback" not in res.stderr, res.explain()
    errors = [ln for ln in res.error_lines() if ln.startswith("error:")]
    assert len(errors) == 1, res.explain()
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------ recipes/train.py
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ref: 2 epochs in one go; term: the same stopped by SIGTERM at step 2 of epoch 2, copied into
    two forged folders, then resumed; the forged copies resumed too."""
    root = tmp_path_factory.mktemp("safe_resume")
    driver = root / "term_driver.py"
    driver.write_text(CRASH_DRIVER)
    ns = types.SimpleNamespace(root=root, ref=root / "ref", term=root / "term", marker=root / "MARKER",
                               forged=root / "forged", earlier=root / "earlier", res={})

    def lane_term() -> None:
        cmd = recipe_cmd("train.py")[:1] + [str(driver), "term", str(STEP), "recipes/train.py", *LINE, "--output", str(ns.term)]
        ns.res["term"] = run(cmd)
        if ns.res["term"].rc != 75:
            return
        shutil.copytree(ns.term, ns.forged)
        shutil.copytree(ns.term, ns.earlier)
        ns.forged_folder = _forge_folder(ns.forged, ns.marker)
        ns.earlier_folder = _forge_folder(ns.earlier, ns.marker, earlier_layout=True)
        ns.res["forged"] = run(recipe_cmd("train.py", "--resume", ns.forged))
        ns.res["earlier"] = run(recipe_cmd("train.py", "--resume", ns.earlier))
        ns.res["resume"] = run(recipe_cmd("train.py", "--resume", ns.term))

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(lane_term), pool.submit(lambda: ns.res.__setitem__("ref", run(recipe_cmd("train.py", *LINE, "--output", ns.ref))))]
        for job in jobs:
            job.result()
    return ns


def test_a_forged_checkpoint_is_refused_without_running_its_pickles(runs):
    assert runs.res["term"].rc == 75, runs.res["term"].explain()
    line = _one_line_refusal(runs.res["forged"], "is not a file this project wrote", str(runs.forged_folder))
    assert "GLOBAL" in line and "weights_only=False" not in line, line   # why, and never the advice to unpickle
    assert not runs.marker.exists(), "a pickle stored in the run folder ran on resume"


def test_a_forged_checkpoint_of_the_earlier_layout_is_refused_without_unpickling(runs):
    assert runs.res["term"].rc == 75, runs.res["term"].explain()
    _one_line_refusal(runs.res["earlier"], "written by an earlier version of subspaces", "custom_checkpoint_0.pkl",
                      "must be restarted")
    assert not runs.marker.exists(), "a pickle stored in the run folder ran on resume"


def test_an_honest_sigterm_and_resume_still_give_the_uninterrupted_weights(runs):
    for name in ("ref", "term", "resume"):
        assert runs.res[name].rc == (75 if name == "term" else 0), runs.res[name].explain()
    assert "after epoch 2, step 2" in runs.res["resume"].stdout, runs.res["resume"].explain()
    ref, resumed = load_file(str(runs.ref / "subspace.safetensors")), load_file(str(runs.term / "subspace.safetensors"))
    assert sorted(ref) == sorted(resumed)
    different = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not different, f"tensors differ after SIGTERM and resume: {different[:5]}"
    folder = latest_checkpoint(runs.term)
    assert not list(folder.glob("custom_checkpoint_*")), "no pickled registered objects are written"
    assert json.loads((folder / "progress.json").read_text()) == read_progress(folder)


# ------------------------------------------------------------------------------------ in-process
def _run(out: Path, resume: bool = False) -> types.SimpleNamespace:
    """A small network with accelerate's checkpoints, a momentum optimiser, a scheduler and the
    progress (as the Trainer has them); with ``resume`` the newest checkpoint loaded."""
    acc = Accelerator(cpu=True, project_config=project_configuration(out))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    progress = TrainingProgress()
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        load_checkpoint(acc, ckpt, progress=progress, scheduler=scheduler)
    prepare_saves(acc, out, ckpt)
    return types.SimpleNamespace(acc=acc, model=model, optimizer=optimizer, scheduler=scheduler, progress=progress)


@pytest.fixture
def saved(tmp_path):
    """A run folder with one checkpoint after one update, and the marker a forged pickle would create."""
    r = _run(tmp_path)
    r.model(torch.randn(8, 4)).square().mean().backward()
    r.optimizer.step()
    r.scheduler.step()
    r.progress.load_state_dict({"epoch": 1, "updates": 1})
    folder = save_checkpoint(r.acc, r.progress, r.model, scheduler=r.scheduler)
    return types.SimpleNamespace(out=tmp_path, folder=folder, marker=tmp_path / "MARKER")


def test_the_forged_pickles_would_run_if_unpickled(saved):
    """The payload is armed: unpickled as accelerate unpickles registered objects, it creates the marker."""
    _forge(saved.folder / "optimizer.bin", saved.marker)
    torch.load(saved.folder / "optimizer.bin", weights_only=False)
    assert saved.marker.exists()


@pytest.mark.parametrize("raw", [False, True], ids=["torch_zip", "bare_pickle"])
@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_each_forged_torch_file_is_named_and_not_run(saved, name, raw):
    _forge(saved.folder / name, saved.marker, raw=raw)
    write_manifest(saved.folder)
    with pytest.raises(CheckpointError) as info:
        _run(saved.out, resume=True)
    message = str(info.value)
    assert "\n" not in message and str(saved.folder / name) in message and "is not a file this project wrote" in message
    assert not saved.marker.exists()


def test_an_rng_file_accelerate_would_skip_is_refused(saved):
    """accelerate's load_state passes over an RNG file it cannot use without a word: the resume
    would not be exact. A loadable file without accelerate's keys is refused, naming it."""
    torch.save({"step": 0}, saved.folder / "random_states_0.pkl")
    write_manifest(saved.folder)
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl lacks accelerate's RNG states"):
        _run(saved.out, resume=True)


def test_forged_json_state_is_refused(saved):
    (saved.folder / "progress.json").write_text('{"epoch": "__import__(\'os\')", "updates": 1}')
    write_manifest(saved.folder)
    with pytest.raises(CheckpointError, match=r"progress\.json lacks an integer 'epoch'"):
        _run(saved.out, resume=True)


def test_a_checkpoint_of_an_earlier_version_is_refused_in_one_line_without_unpickling(saved):
    """An earlier version registered the progress and scheduler with accelerate (pickles). Every
    reader refuses the folder, saying it must be restarted, before opening them."""
    for i, name in enumerate(("progress.json", "scheduler.json")):
        (saved.folder / name).unlink()
        _forge(saved.folder / f"custom_checkpoint_{i}.pkl", saved.marker)
    write_manifest(saved.folder)
    for read in (lambda: latest_checkpoint(saved.out), lambda: read_progress(saved.folder), lambda: _run(saved.out, resume=True)):
        with pytest.raises(CheckpointError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and "written by an earlier version of subspaces" in message and "must be restarted" in message
        assert str(saved.folder / "custom_checkpoint_0.pkl") in message
    assert not saved.marker.exists()


def _schedulers() -> dict[str, object]:
    """The schedulers a Trainer may checkpoint: timm's (by name), FGE, SSE and [G]'s LambdaLR."""
    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    made = {name: create_scheduler_v2(opt(), sched=name, num_epochs=4, warmup_epochs=1, min_lr=1e-5, step_on_epochs=False,
                                      updates_per_epoch=3)[0] for name in ("cosine", "step", "multistep", "tanh", "poly")}
    made.update(fge=FGESchedule(opt(), 4, 0.1, 0.01), sse=SSESchedule(opt(), 4, 0.1), garipov=garipov_schedule(opt(), 12, 3))
    return made


def _advance(scheduler, update: int) -> None:
    """One update: timm's schedulers are told the update number, torch's are stepped."""
    scheduler.optimizer.step()
    if hasattr(scheduler, "step_update"):
        scheduler.step_update(num_updates=update)
    else:
        scheduler.step()


@pytest.mark.parametrize("name", list(_schedulers()))
def test_every_scheduler_state_comes_back_exactly_from_json(tmp_path, name):
    """Floats through JSON come back to the bit, so a resumed schedule matches an uninterrupted one."""
    first, second = _schedulers()[name], _schedulers()[name]
    for update in range(1, 6):   # mid-warmup / mid-cycle
        _advance(first, update)
    write_training_state(tmp_path, TrainingProgress(epoch=1, updates=5, within_epoch={"step": 2, "loss_sum": 0.1 + 0.2}), first)
    progress = TrainingProgress()
    load_training_state(tmp_path, progress, second)
    assert progress.within_epoch == {"step": 2, "loss_sum": 0.1 + 0.2}
    assert json.dumps(second.state_dict(), sort_keys=True) == json.dumps(first.state_dict(), sort_keys=True)
    for update in range(6, 10):
        _advance(first, update)
        _advance(second, update)
        assert [g["lr"] for g in first.optimizer.param_groups] == [g["lr"] for g in second.optimizer.param_groups]
