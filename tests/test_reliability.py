"""Crashes lose nothing: kill -9 mid-epoch and mid-save, a NaN loss, a full disk, damaged files.

The crashes are made deterministic by a driver (``DRIVER`` below) that monkeypatches the training
process before running ``recipes/train.py`` through runpy:

- ``kill_step N``: SIGKILL inside ``Trainer._loss`` at its N-th call (step 2 of epoch 2);
- ``kill_rename``: SIGKILL inside ``os.replace(.checkpoint.tmp, checkpoint)`` while saving, after
  ``checkpoint/`` was renamed to ``checkpoint.old/`` and before the new one took its place (the
  worst moment of a save: no ``checkpoint/`` at all);
- ``nan N``: ``Trainer._loss`` returns NaN from its N-th call on.

One run is killed mid-epoch, resumed and killed mid-save, resumed again, and must end with weights
bit-identical to an uninterrupted run of the same seed (CPU). A kill inside ``save_state`` (half of
the files written) is checked in-process with a stand-in accelerator, as are a full disk, NaN
weights and damaged checkpoint files.
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
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import BATCH, STEPS_PER_EPOCH, TINY, read_metrics, recipe_cmd, run
from subspaces import io as ssio
from subspaces.io import CheckpointError, save_model, verify_checkpoint
from subspaces.training import NonFiniteLossError, _checkpoint_dir, save_checkpoint

LINE = ["--subspace", "line", *TINY, "--epochs", "2"]
#: the loss call (1-based) that is step 2 of epoch 2
STEP = STEPS_PER_EPOCH + 2

DRIVER = r'''
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
elif mode == "kill_rename":
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == "checkpoint":
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
sys.argv = [recipe, *argv]
runpy.run_path(recipe, run_name="__main__")
'''


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _progress(d: Path) -> dict:
    return json.loads((d / "progress.json").read_text())


def _assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: tensors differ: {different[:5]}"


# ------------------------------------------------------------------------------------ the crash runs
@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    ref, killed, nan, damaged, term = root / "ref", root / "killed", root / "nan", root / "damaged", root / "term"
    ns = types.SimpleNamespace(ref=ref, killed=killed, nan=nan, damaged=damaged, term=term, res={}, snap={})

    def drive(mode: str, n: int, *args) -> list[str]:
        return recipe_cmd("train.py", *args)[:1] + [str(driver), mode, str(n), "recipes/train.py", *map(str, args)]

    def lane_kills() -> None:
        # 1. killed at step 2 of epoch 2: epoch 1's checkpoint must be complete
        ns.res["kill_step"] = run(drive("kill_step", STEP, *LINE, "--output", killed))
        ckpt = killed / "checkpoint"
        ns.snap["after_kill_step"] = _progress(ckpt) if (ckpt / "progress.json").exists() else None
        ns.snap["epoch1_weights"] = _tensors(ckpt / "model.safetensors") if (ckpt / "model.safetensors").exists() else None
        # 2. resumed, killed between renaming checkpoint/ away and the new one into place
        ns.res["kill_rename"] = run(drive("kill_rename", 0, "--resume", killed))
        ns.snap["after_kill_rename"] = {
            "checkpoint": ckpt.exists(),
            "old": _progress(killed / "checkpoint.old") if (killed / "checkpoint.old" / "progress.json").exists() else None,
            "tmp": _progress(killed / ".checkpoint.tmp") if (killed / ".checkpoint.tmp" / "progress.json").exists() else None,
        }
        # 3. resumed to the end
        ns.res["resume"] = run(recipe_cmd("train.py", "--resume", killed))
        # 4. SIGTERM in the middle of step 2 of epoch 2: the step finishes, a checkpoint at that step, then resumed
        ns.res["term"] = run(drive("term", STEP, *LINE, "--output", term))
        ckpt = term / "checkpoint"
        ns.snap["after_term"] = _progress(ckpt) if (ckpt / "progress.json").exists() else None
        ns.snap["term_epochs"] = [r["epoch"] for r in read_metrics(term)] if (term / "metrics.jsonl").exists() else None
        ns.res["term_resume"] = run(recipe_cmd("train.py", "--resume", term))

    def lane_others() -> None:
        ns.res["ref"] = run(recipe_cmd("train.py", *LINE, "--output", ref))
        if ns.res["ref"].rc == 0:   # a finished run whose checkpoint is then damaged, resumed
            shutil.copytree(ref, damaged)
            opt = damaged / "checkpoint" / "optimizer.bin"
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


def test_kill_mid_rename_leaves_checkpoint_old(crashes):
    res = crashes.res["kill_rename"]
    assert res.rc == -9, res.explain()
    assert "resumed from" in res.stdout and "checkpoint after epoch 1" in res.stdout, res.explain()
    snap = crashes.snap["after_kill_rename"]
    assert snap["checkpoint"] is False, "the kill came after checkpoint/ was renamed away"
    assert snap["old"]["epoch"] == 1 and snap["tmp"]["epoch"] == 2, snap


def test_resume_after_kills_is_bit_identical_to_an_uninterrupted_run(crashes):
    _ok(crashes.res["ref"])
    res = crashes.res["resume"]
    _ok(res)
    assert "resumed from" in res.stdout and "checkpoint.old after epoch 1" in res.stdout, res.explain()
    _assert_equal_tensors(_tensors(crashes.killed / "subspace.safetensors"), _tensors(crashes.ref / "subspace.safetensors"),
                          "killed twice and resumed vs uninterrupted")
    assert [r["epoch"] for r in read_metrics(crashes.killed)] == [1, 2], "metrics.jsonl: one line per epoch, no repeats"
    assert _progress(crashes.killed / "checkpoint")["epoch"] == 2
    leftovers = [p.name for p in crashes.killed.iterdir()
                 if p.name in (".checkpoint.tmp", "checkpoint.old") or p.name.startswith(".") and p.name != ".lock"]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    verify_checkpoint(crashes.killed / "checkpoint")


def test_nan_loss_stops_naming_the_step_and_keeps_epoch_1(crashes):
    res = crashes.res["nan"]
    assert res.rc == 3, res.explain()
    assert "Traceback" not in res.stderr, res.explain()
    last = res.error_lines()[-1]
    assert last.startswith("error: loss is nan at epoch 2, step 2 (update 6), found at the check of step 4"), last
    assert "checkpoint" in last and "kept" in last, last
    ckpt = crashes.nan / "checkpoint"
    assert _progress(ckpt)["epoch"] == 1 and _progress(ckpt)["updates"] == STEPS_PER_EPOCH
    weights = _tensors(ckpt / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    _assert_equal_tensors(weights, crashes.snap["epoch1_weights"], "the NaN run's checkpoint vs epoch 1 of the same seed")
    for name in ("subspace.safetensors", "results.json", ".checkpoint.tmp", "checkpoint.old"):
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
    assert str(crashes.damaged / "checkpoint" / "optimizer.bin") in lines[-1] and "corrupted" in lines[-1], lines[-1]
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]]
    assert (crashes.damaged / "results.json").read_text() == crashes.snap["damaged_results"], "nothing rewritten"


# ------------------------------------------------------------------------------------ save_checkpoint, in-process
class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it, no clean-up runs except `finally`."""


class FakeAccelerator:
    """What save_checkpoint uses of accelerate.Accelerator, on one process; ``fail_after_model``
    (an exception) is raised after model.safetensors and half of optimizer.bin are written."""

    is_main_process = True

    def __init__(self, model: nn.Module, fail_after_model: BaseException | None = None) -> None:
        self._models = [model]
        self.fail_after_model = fail_after_model

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str, safe_serialization: bool = True) -> None:
        d = Path(output_dir)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self._models[0].state_dict().items()}, str(d / "model.safetensors"))
        if self.fail_after_model is not None:
            (d / "optimizer.bin").write_bytes(b"PK\x03\x04 half of an optimizer state")
            raise self.fail_after_model
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.bin")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


@pytest.fixture
def saved(tmp_path):
    """A run folder with epoch 1's checkpoint written by save_checkpoint."""
    model = _net()
    save_checkpoint(FakeAccelerator(model), tmp_path, {"epoch": 1, "updates": 4})
    return types.SimpleNamespace(out=tmp_path, model=model, weights=_tensors(tmp_path / "checkpoint" / "model.safetensors"))


def test_save_checkpoint_records_and_verifies_every_file(saved):
    progress = verify_checkpoint(saved.out / "checkpoint")
    assert progress == {"epoch": 1, "updates": 4}
    manifest = json.loads((saved.out / "checkpoint" / "manifest.json").read_text())
    assert set(manifest) == {"model.safetensors", "optimizer.bin"}
    assert manifest["optimizer.bin"]["size"] == (saved.out / "checkpoint" / "optimizer.bin").stat().st_size
    assert _checkpoint_dir(saved.out) == saved.out / "checkpoint"
    assert sorted(p.name for p in saved.out.iterdir()) == ["checkpoint"]


def test_save_checkpoint_refuses_nan_weights(saved):
    with torch.no_grad():
        saved.model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"weight 0\.weight is NaN or infinite after epoch 2 .*checkpoint is kept"):
        save_checkpoint(FakeAccelerator(saved.model), saved.out, {"epoch": 2, "updates": 8})
    assert _progress(saved.out / "checkpoint")["epoch"] == 1
    _assert_equal_tensors(_tensors(saved.out / "checkpoint" / "model.safetensors"), saved.weights, "checkpoint after refused save")


def test_save_checkpoint_disk_full_keeps_the_previous_one(saved):
    with pytest.raises(OSError, match=r"cannot write the checkpoint into .*No space left on device.*previous checkpoint is kept") as info:
        save_checkpoint(FakeAccelerator(saved.model, OSError(errno.ENOSPC, "No space left on device")), saved.out, {"epoch": 2, "updates": 8})
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in saved.out.iterdir()) == ["checkpoint"], "the half-written .checkpoint.tmp must be removed"
    assert _progress(saved.out / "checkpoint")["epoch"] == 1
    verify_checkpoint(saved.out / "checkpoint")


def test_kill_inside_save_state_keeps_the_previous_checkpoint(saved):
    with pytest.raises(Killed):
        save_checkpoint(FakeAccelerator(saved.model, Killed()), saved.out, {"epoch": 2, "updates": 8})
    assert (saved.out / ".checkpoint.tmp" / "model.safetensors").exists(), "a kill leaves the half-written save"
    assert _checkpoint_dir(saved.out) == saved.out / "checkpoint"   # ... which resume ignores
    assert _progress(saved.out / "checkpoint")["epoch"] == 1
    _assert_equal_tensors(_tensors(saved.out / "checkpoint" / "model.safetensors"), saved.weights, "checkpoint after a kill mid-save")
    save_checkpoint(FakeAccelerator(saved.model), saved.out, {"epoch": 2, "updates": 8})   # the next save
    assert sorted(p.name for p in saved.out.iterdir()) == ["checkpoint"] and _progress(saved.out / "checkpoint")["epoch"] == 2
    verify_checkpoint(saved.out / "checkpoint")


@pytest.mark.parametrize("damage", ["truncate", "flip", "progress", "manifest"])
def test_damaged_checkpoint_is_named(saved, damage):
    ckpt = saved.out / "checkpoint"
    target = {"truncate": ckpt / "model.safetensors", "flip": ckpt / "optimizer.bin", "progress": ckpt / "progress.json",
              "manifest": ckpt / "manifest.json"}[damage]
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    fragment = "corrupted" if damage == "flip" else "truncated or corrupted"
    with pytest.raises(CheckpointError, match=fragment) as info:
        _checkpoint_dir(saved.out)
    assert str(target) in str(info.value)
    assert _checkpoint_dir(saved.out, verify=False) == ckpt   # the NaN message only names the folder


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
