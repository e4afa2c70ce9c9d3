"""Crashes lose nothing: kill -9 mid-epoch and mid-save, a NaN loss, a full disk, damaged files.

The crashes are made deterministic by a driver (``helpers.CRASH_DRIVER``) that monkeypatches the training
process before running ``recipes/train.py`` through runpy:

- ``kill_step N``: SIGKILL inside ``Trainer._loss`` at its N-th call (step 2 of epoch 2);
- ``kill_save``: SIGKILL inside ``save_checkpoint`` while it writes the progress and scheduler JSON
  (accelerate's model, optimiser and RNG states already written, no manifest yet): the newest
  ``checkpoints/checkpoint_<i>`` is cut and must be passed over for the one before;
- ``nan N``: ``Trainer._loss`` returns NaN from its N-th call on.

One run is killed mid-epoch, resumed and killed mid-save, resumed again, and must end with weights
bit-identical to an uninterrupted run of the same seed (CPU). In-process, with a real accelerate
Accelerator on a small network: the files of the training state, their exact restore, the
number of folders kept, resume after resume, a kill inside ``save_state``, a full disk, NaN weights
and damaged checkpoint files.
"""

from __future__ import annotations

import errno
import json
import shutil
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from helpers import BATCH, CRASH_DRIVER, STEPS_PER_EPOCH, TINY, read_metrics, recipe_cmd, run
import subspaces.checkpoint
from subspaces import io as ssio
from subspaces.checkpoint import (
    TrainingProgress,
    checkpoint_folders,
    latest_checkpoint,
    load_checkpoint,
    prepare_saves,
    project_configuration,
    read_progress,
    save_checkpoint,
    verify_checkpoint,
)
from subspaces.io import CheckpointError, save_model
from subspaces.training import NonFiniteLossError

LINE = ["--subspace", "line", *TINY, "--epochs", "2"]
#: the loss call (1-based) that is step 2 of epoch 2
STEP = STEPS_PER_EPOCH + 2




def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _progress(d: Path) -> dict:
    return read_progress(d)


def _folder(out: Path, i: int) -> Path:
    return out / "checkpoints" / f"checkpoint_{i}"


def _assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: tensors differ: {different[:5]}"


# ------------------------------------------------------------------------------------ the crash runs
@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    driver = root / "driver.py"
    driver.write_text(CRASH_DRIVER)
    ref, killed, nan, damaged, term = root / "ref", root / "killed", root / "nan", root / "damaged", root / "term"
    ns = types.SimpleNamespace(ref=ref, killed=killed, nan=nan, damaged=damaged, term=term, res={}, snap={})

    def drive(mode: str, n: int, *args) -> list[str]:
        return recipe_cmd("train.py", *args)[:1] + [str(driver), mode, str(n), "recipes/train.py", *map(str, args)]

    def lane_kills() -> None:
        # 1. killed at step 2 of epoch 2: epoch 1's checkpoint must be complete
        ns.res["kill_step"] = run(drive("kill_step", STEP, *LINE, "--output", killed))
        ckpt = _folder(killed, 0)
        ns.snap["after_kill_step"] = _progress(ckpt) if (ckpt / "manifest.json").exists() else None
        ns.snap["epoch1_weights"] = _tensors(ckpt / "model.safetensors") if (ckpt / "model.safetensors").exists() else None
        # 2. resumed, killed inside save_state of epoch 2's checkpoint
        ns.res["kill_save"] = run(drive("kill_save", 0, "--resume", killed))
        ns.snap["after_kill_save"] = {
            "folders": [p.name for p in checkpoint_folders(killed)],
            "cut": sorted(p.name for p in _folder(killed, 1).iterdir()) if _folder(killed, 1).exists() else None,
            "latest": latest_checkpoint(killed),
        }
        # 3. resumed to the end
        ns.res["resume"] = run(recipe_cmd("train.py", "--resume", killed))
        # 4. SIGTERM in the middle of step 2 of epoch 2: the step finishes, a checkpoint at that step, then resumed
        ns.res["term"] = run(drive("term", STEP, *LINE, "--output", term))
        ckpt = latest_checkpoint(term, verify=False)
        ns.snap["after_term"] = _progress(ckpt) if ckpt is not None else None
        ns.snap["term_epochs"] = [r["epoch"] for r in read_metrics(term)] if (term / "metrics.jsonl").exists() else None
        ns.res["term_resume"] = run(recipe_cmd("train.py", "--resume", term))

    def lane_others() -> None:
        ns.res["ref"] = run(recipe_cmd("train.py", *LINE, "--output", ref))
        if ns.res["ref"].rc == 0:   # a finished run whose checkpoint is then damaged, resumed
            shutil.copytree(ref, damaged)
            opt = latest_checkpoint(damaged) / "optimizer.bin"
            ns.snap["damaged_file"] = opt
            data = bytearray(opt.read_bytes())
            data[len(data) // 2] ^= 0xFF
            opt.write_bytes(bytes(data))
            ns.snap["damaged_results"] = (damaged / "results.json").read_text()
            ns.res["damaged"] = run(recipe_cmd("train.py", "--resume", damaged))
        ns.res["nan"] = run(drive("nan", STEP, *LINE, "--output", nan))

    with ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(lane_kills), pool.submit(lane_others)]:
            f.result()
    return ns


def _ok(res) -> None:
    assert res.rc == 0, res.explain()
    assert "Traceback" not in res.stderr, res.explain()


def test_kill_mid_epoch_keeps_the_last_complete_checkpoint(crashes):
    res = crashes.res["kill_step"]
    assert res.rc == -9, res.explain()
    assert crashes.snap["after_kill_step"]["epoch"] == 1 and crashes.snap["after_kill_step"]["updates"] == STEPS_PER_EPOCH
    weights = crashes.snap["epoch1_weights"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_kill_mid_save_leaves_a_cut_newest_folder_that_resume_passes_over(crashes):
    res = crashes.res["kill_save"]
    assert res.rc == -9, res.explain()
    assert "resumed from" in res.stdout and "checkpoint_0 after epoch 1" in res.stdout, res.explain()
    snap = crashes.snap["after_kill_save"]
    assert snap["folders"] == ["checkpoint_0", "checkpoint_1"], snap
    assert "model.safetensors" in snap["cut"] and "manifest.json" not in snap["cut"], snap
    assert snap["latest"] == _folder(crashes.killed, 0), "the cut checkpoint_1 has no manifest: never resumed from"


def test_resume_after_kills_is_bit_identical_to_an_uninterrupted_run(crashes):
    _ok(crashes.res["ref"])
    res = crashes.res["resume"]
    _ok(res)
    assert "resumed from" in res.stdout and "checkpoint_0 after epoch 1" in res.stdout, res.explain()
    _assert_equal_tensors(_tensors(crashes.killed / "subspace.safetensors"), _tensors(crashes.ref / "subspace.safetensors"),
                          "killed twice and resumed vs uninterrupted")
    assert [r["epoch"] for r in read_metrics(crashes.killed)] == [1, 2], "metrics.jsonl: one line per epoch, no repeats"
    # the cut folder was replaced by epoch 2's checkpoint under the same number: resume after resume does not collide
    assert [p.name for p in checkpoint_folders(crashes.killed)] == ["checkpoint_0", "checkpoint_1"]
    assert _progress(latest_checkpoint(crashes.killed))["epoch"] == 2
    leftovers = [p.name for p in crashes.killed.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    verify_checkpoint(_folder(crashes.killed, 1))


def test_nan_loss_stops_naming_the_step_and_keeps_epoch_1(crashes):
    res = crashes.res["nan"]
    assert res.rc == 3, res.explain()
    assert "Traceback" not in res.stderr, res.explain()
    last = res.error_lines()[-1]
    assert last.startswith("error: loss is nan at epoch 2, step 2 (update 6), found at the check of step 4"), last
    assert "checkpoint" in last and "kept" in last, last
    ckpt = latest_checkpoint(crashes.nan)
    assert ckpt == _folder(crashes.nan, 0) and [p.name for p in checkpoint_folders(crashes.nan)] == ["checkpoint_0"]
    assert _progress(ckpt)["epoch"] == 1 and _progress(ckpt)["updates"] == STEPS_PER_EPOCH
    weights = _tensors(ckpt / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    _assert_equal_tensors(weights, crashes.snap["epoch1_weights"], "the NaN run's checkpoint vs epoch 1 of the same seed")
    for name in ("subspace.safetensors", "results.json"):
        assert not (crashes.nan / name).exists(), f"{name} written by a run that diverged"


def test_sigterm_finishes_the_step_checkpoints_it_and_resumes_exactly(crashes):
    res = crashes.res["term"]
    assert res.rc == 75, res.explain()
    assert "Traceback" not in res.stderr, res.explain()
    last = res.error_lines()[-1]
    assert last.startswith("stopped: SIGTERM at epoch 2, step 2 of 4 (update 6): checkpoint written; continue with --resume"), last
    progress = crashes.snap["after_term"]
    assert progress["epoch"] == 1 and progress["updates"] == STEPS_PER_EPOCH + 2
    assert progress["within_epoch"]["step"] == 2 and progress["within_epoch"]["seen"] == 2 * BATCH
    assert crashes.snap["term_epochs"] == [1]
    _ok(crashes.res["ref"])
    resumed = crashes.res["term_resume"]
    _ok(resumed)
    assert "after epoch 2, step 2" in resumed.stdout, resumed.explain()
    _assert_equal_tensors(_tensors(crashes.term / "subspace.safetensors"), _tensors(crashes.ref / "subspace.safetensors"),
                          "stopped by SIGTERM mid-epoch and resumed vs uninterrupted")
    ref_metrics, term_metrics = read_metrics(crashes.ref), read_metrics(crashes.term)
    assert [m["train_loss"] for m in term_metrics] == [m["train_loss"] for m in ref_metrics]
    assert [m["eval"] for m in term_metrics] == [m["eval"] for m in ref_metrics]


def test_resume_from_a_corrupted_checkpoint_names_the_file(crashes):
    _ok(crashes.res["ref"])
    res = crashes.res["damaged"]
    assert res.rc == 2, res.explain()
    lines = res.error_lines()
    assert "Traceback" not in res.stderr, res.explain()
    assert str(crashes.snap["damaged_file"]) in lines[-1] and "corrupted" in lines[-1], lines[-1]
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]]
    assert (crashes.damaged / "results.json").read_text() == crashes.snap["damaged_results"], "nothing rewritten"


# ------------------------------------------------------------------------------------ checkpoints, in-process
class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it, no clean-up runs except `finally`."""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _run(out: Path, history: int = 2, resume: bool = False) -> types.SimpleNamespace:
    """What a Trainer sets up, on a small network: an Accelerator with automatic checkpoint naming,
    the model and a momentum optimiser prepared, a scheduler and the progress (saved as JSON,
    not registered with accelerate); with ``resume`` the newest complete checkpoint loaded."""
    acc = Accelerator(cpu=True, project_config=project_configuration(out, history))
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    progress = TrainingProgress()
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        load_checkpoint(acc, ckpt, progress=progress, scheduler=scheduler)
    prepare_saves(acc, out, ckpt)
    return types.SimpleNamespace(acc=acc, model=model, optimizer=optimizer, scheduler=scheduler, progress=progress, resumed=ckpt)


def _step(r: types.SimpleNamespace) -> None:
    """One update: the weights, momentum buffers, scheduler and progress all move."""
    r.model.train()
    loss = r.model(torch.randn(8, 4)).square().mean()
    loss.backward()
    r.optimizer.step()
    r.optimizer.zero_grad()
    r.scheduler.step()
    r.progress.load_state_dict({"epoch": r.progress.epoch + 1, "updates": r.progress.updates + 1})


def _save(r: types.SimpleNamespace) -> Path:
    _step(r)
    return save_checkpoint(r.acc, r.progress, r.model, scheduler=r.scheduler)


@pytest.fixture
def saved(tmp_path):
    """A run folder with epoch 1's checkpoint (checkpoint_0)."""
    r = _run(tmp_path)
    _save(r)
    return types.SimpleNamespace(out=tmp_path, run=r, weights=_tensors(_folder(tmp_path, 0) / "model.safetensors"))


def test_save_checkpoint_is_accelerates_and_records_every_file(saved):
    ckpt = _folder(saved.out, 0)
    assert latest_checkpoint(saved.out) == ckpt
    assert sorted(p.name for p in saved.out.iterdir()) == ["checkpoints"]
    manifest = verify_checkpoint(ckpt)
    # accelerate's files, and the progress and the scheduler as JSON (no pickled registered objects)
    assert set(manifest) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "progress.json", "scheduler.json"}
    assert manifest["optimizer.bin"]["size"] == (ckpt / "optimizer.bin").stat().st_size
    assert _progress(ckpt) == {"epoch": 1, "updates": 1}
    scheduler = json.loads((ckpt / "scheduler.json").read_text())
    assert scheduler["type"] == "StepLR" and scheduler["state"]["last_epoch"] == 1


def test_registered_objects_and_weights_resume_exactly(saved):
    before = saved.run
    _step(before)   # moves on after the save: the resume must bring back the saved state, not this one
    again = _run(saved.out, resume=True)
    assert again.resumed == _folder(saved.out, 0)
    assert (again.progress.epoch, again.progress.updates, again.progress.within_epoch) == (1, 1, None)
    assert again.scheduler.state_dict()["last_epoch"] == 1 and again.optimizer.param_groups[0]["lr"] == 0.05
    _assert_equal_tensors({k: v.detach() for k, v in again.model.state_dict().items()}, saved.weights, "resumed weights")
    momentum = [again.optimizer.state[p]["momentum_buffer"] for p in again.model.parameters()]
    assert all(m is not None and m.abs().sum() > 0 for m in momentum), "the momentum buffers come back"


def test_total_limit_keeps_the_newest_folders(tmp_path):
    r = _run(tmp_path, history=3)
    for _ in range(5):
        _save(r)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint_2", "checkpoint_3", "checkpoint_4"]
    assert _progress(latest_checkpoint(tmp_path))["epoch"] == 5


def test_resume_after_resume_saves_past_the_newest_folder(tmp_path):
    r = _run(tmp_path)
    _save(r)
    _save(r)
    for expected in (2, 3):   # accelerate's load_state leaves save_iteration at 0: prepare_saves moves it on
        r = _run(tmp_path, resume=True)
        assert r.resumed == _folder(tmp_path, expected - 1) and r.acc.save_iteration == expected
        assert _save(r) == _folder(tmp_path, expected)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint_2", "checkpoint_3"]
    assert _progress(_folder(tmp_path, 3))["epoch"] == 4


def test_a_fresh_run_starts_its_checkpoints_again(saved):
    r = _run(saved.out)   # not resumed: the old run's checkpoints go
    assert checkpoint_folders(saved.out) == [] and r.acc.save_iteration == 0
    assert _save(r) == _folder(saved.out, 0)


def test_save_checkpoint_refuses_nan_weights(saved):
    with torch.no_grad():
        saved.run.model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"weight 0\.weight is NaN or infinite after epoch 1 .*checkpoint is kept"):
        save_checkpoint(saved.run.acc, saved.run.progress, saved.run.model)
    assert [p.name for p in checkpoint_folders(saved.out)] == ["checkpoint_0"]
    _assert_equal_tensors(_tensors(_folder(saved.out, 0) / "model.safetensors"), saved.weights, "checkpoint after refused save")


def _fail_in_save_state(monkeypatch, error: BaseException) -> None:
    """save_checkpoint fails while writing the training state (accelerate's model, optimiser and RNG written)."""
    def write_training_state(folder, progress, scheduler=None):
        (Path(folder) / "progress.json").write_bytes(b'{"epoch": ')
        raise error

    monkeypatch.setattr(subspaces.checkpoint, "write_training_state", write_training_state)


def test_save_checkpoint_disk_full_keeps_the_previous_one(saved, monkeypatch):
    _fail_in_save_state(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"cannot write the checkpoint .*checkpoint_1 .*No space left on device.*previous checkpoint is kept") as info:
        _save(saved.run)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in checkpoint_folders(saved.out)] == ["checkpoint_0"], "the cut checkpoint_1 must be removed"
    verify_checkpoint(_folder(saved.out, 0))
    monkeypatch.undo()
    assert _save(saved.run) == _folder(saved.out, 1), "the next save takes the number the failed one did not use"
    verify_checkpoint(_folder(saved.out, 1))


def test_kill_inside_save_state_keeps_the_previous_checkpoint(saved, monkeypatch):
    _fail_in_save_state(monkeypatch, Killed())
    with pytest.raises(Killed):
        _save(saved.run)
    monkeypatch.undo()
    cut = _folder(saved.out, 1)
    assert (cut / "model.safetensors").exists() and not (cut / "manifest.json").exists(), "a kill leaves the cut save"
    assert latest_checkpoint(saved.out) == _folder(saved.out, 0)   # ... which resume passes over
    resumed = _run(saved.out, resume=True)
    assert resumed.resumed == _folder(saved.out, 0) and not cut.exists(), "the cut folder is removed on resume"
    assert _save(resumed) == cut and _progress(cut)["epoch"] == 2
    verify_checkpoint(cut)


@pytest.mark.parametrize("damage", ["truncate", "flip", "progress", "manifest", "missing"])
def test_damaged_checkpoint_is_named(saved, damage):
    ckpt = _folder(saved.out, 0)
    target = {"truncate": ckpt / "model.safetensors", "flip": ckpt / "optimizer.bin", "progress": ckpt / "progress.json",
              "manifest": ckpt / "manifest.json", "missing": ckpt / "scheduler.json"}[damage]
    data = bytearray(target.read_bytes())
    if damage == "missing":
        target.unlink()
    else:
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        else:
            data = data[: len(data) // 2]
        target.write_bytes(bytes(data))
    fragment = {"flip": "corrupted", "missing": "is missing"}.get(damage, "truncated or corrupted")
    with pytest.raises(CheckpointError, match=fragment) as info:
        latest_checkpoint(saved.out)
    assert str(target) in str(info.value)
    assert latest_checkpoint(saved.out, verify=False) == ckpt   # the NaN message only names the folder


def test_a_checkpoint_of_the_earlier_layout_gets_one_line_saying_what_to_do(tmp_path):
    legacy = tmp_path / "checkpoint"
    legacy.mkdir()
    (legacy / "progress.json").write_text('{"epoch": 1, "updates": 4}')
    with pytest.raises(CheckpointError) as info:
        latest_checkpoint(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(legacy) in message and "checkpoints/checkpoint_<i>" in message
    assert "finish that run with the version that started it, or delete" in message

# ------------------------------------------------------------------------------------ atomic writes
def _enospc_after_partial_write(state, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 64)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_during_save_model_leaves_no_partial_file(tmp_path, monkeypatch, existing):
    model = _net()
    target = tmp_path / "exports" / "centre.safetensors"
    spec = {"model": "test_resnet", "num_classes": 3, "in_chans": 1}
    if existing:
        save_model(model, target, spec)
        before = {p.name: p.read_bytes() for p in target.parent.iterdir()}
    monkeypatch.setattr(ssio, "save_file", _enospc_after_partial_write)
    with pytest.raises(OSError, match=r"cannot write .*centre\.safetensors: No space left on device") as info:
        save_model(model, target, spec)
    assert info.value.errno == errno.ENOSPC
    names = sorted(p.name for p in target.parent.iterdir())
    if existing:   # the previous export and its spec are untouched
        assert names == ["centre.json", "centre.safetensors"]
        assert {p.name: p.read_bytes() for p in target.parent.iterdir()} == before
    else:
        assert names == [], f"left behind: {names}"


def test_disk_full_during_write_json_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    ssio.write_json({"a": 1}, target)

    def full(self, data, *a, **k):
        Path.write_bytes(self, data[:3].encode())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="results.json: No space left on device"):
        ssio.write_json({"a": 2}, target)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_exports_are_safetensors_and_checked_against_their_spec(tmp_path):
    model = _net()
    path = save_model(model, tmp_path / "m", {"model": "test_resnet", "num_classes": 3, "in_chans": 1})
    assert path.read_bytes()[8:9] == b"{", "an export is a safetensors file (8-byte length, JSON header)"
    spec = json.loads(path.with_suffix(".json").read_text())
    assert spec["weights"]["size"] == path.stat().st_size and len(spec["weights"]["sha256"]) == 64
