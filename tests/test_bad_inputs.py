"""Bad input of every kind: each fails early with the right exception, or exit status and ONE line.

- recipes (train, connect, simplex): bad flags and combinations, unknown models and datasets,
  missing / truncated / corrupted / wrong-kind / mismatched checkpoints, unusable --resume folders,
  unwritable or full output folders. They run in this process through the recipe's ``main(argv)``
  (stderr captured); ``make_accelerator`` is replaced by a tripwire, so each case must be refused
  before any work starts (a missing dataset, found only after the output folder is checked, gets
  a stand-in accelerator). tests/test_training.py runs such cases as real processes.
- the files: ``load_model`` / ``load_subspace`` on damaged or wrong-kind files;
- the core: points out of range, bad simplex points, mismatched endpoints, shape sizes, anchor
  indices, training with every anchor frozen.
"""

from __future__ import annotations

import json
import runpy
import types
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import subspaces as ss
from helpers import DATA_TINY, REPO, TINY
from subspaces import run_folder as ss_run_folder
from subspaces import training as ss_training
from subspaces.io import CheckpointError, load_model, load_subspace, save_model, save_subspace

SPEC = {"model": "test_resnet", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "dataset": "fashion-mnist"}


# ------------------------------------------------------------------------------------ helpers
class GotPastValidation(BaseException):
    """Raised by the tripwire: the recipe started real work although its input was bad."""


@pytest.fixture
def recipe(monkeypatch, capsys):
    """recipe(name, *argv) -> (exit status, stderr lines): the recipe's main() in this process."""
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    monkeypatch.delenv("SUBSPACES_DEBUG", raising=False)

    def tripwire(*a, **k):
        raise GotPastValidation("make_accelerator was reached")

    monkeypatch.setattr(ss_run_folder, "make_accelerator", tripwire)

    def call(name: str, *argv) -> tuple[int, list[str]]:
        main = runpy.run_path(str(REPO / "recipes" / name), run_name="recipe_under_test")["main"]
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        return rc, [ln for ln in captured.err.splitlines() if ln.strip()]

    return call


def one_error(rc_lines, *fragments: str, status: int = 2) -> str:
    rc, lines = rc_lines
    assert rc == status, (rc, lines)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def _timm(num_classes: int = 10, seed: int = 0, name: str = "test_resnet") -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, in_chans=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Finished-run look-alikes: two plain runs (a, b), one with 5 classes, a line run, a ViT."""
    root = tmp_path_factory.mktemp("files")
    ns = types.SimpleNamespace(root=root)
    for name, kwargs in {"a": {}, "b": {"seed": 1}, "five": {"num_classes": 5}}.items():
        save_model(_timm(**kwargs), root / name / "model", {**SPEC, "num_classes": kwargs.get("num_classes", 10)})
        setattr(ns, name, root / name)
    line = ss.Line(_timm(seed=2))
    save_subspace(line, root / "line" / "subspace", SPEC)
    save_model(line.export(), root / "line" / "exports" / "centre", {**SPEC, "point": "centre"})
    ns.line = root / "line"
    return ns


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ recipes/train.py
TRAIN_CASES = {
    "unknown model": (["--model", "resnet81"], ["unknown timm model 'resnet81'", "did you mean", "resnet18"]),
    "unknown dataset": (["--dataset", "fashionmnist"], ["unknown --dataset 'fashionmnist'", "fashion-mnist"]),
    "degree on a line": (["--subspace", "line", "--degree", "3"], ["--degree applies to --subspace bezier", "not --subspace line"]),
    "bends on a simplex": (["--subspace", "simplex", "--bends", "2"], ["--bends applies to --subspace polychain"]),
    "vertices without subspace": (["--vertices", "3"], ["--vertices applies to --subspace simplex"]),
    "degree 0": (["--subspace", "bezier", "--degree", "0"], ["--degree 0 is invalid", ">= 1"]),
    "bends -1": (["--subspace", "polychain", "--bends", "-1"], ["--bends -1 is invalid", ">= 0"]),
    "vertices 1": (["--subspace", "simplex", "--vertices", "1"], ["--vertices 1 is invalid", "at least 2 vertices"]),
    "layerwise without subspace": (["--layerwise"], ["--layerwise needs a --subspace"]),
    "beta without subspace": (["--beta", "1"], ["--beta", "add --subspace"]),
    "volume on a line": (["--subspace", "line", "--volume-lambda", "1"], ["--volume-lambda", "--subspace simplex"]),
    "arc length on a simplex": (["--subspace", "simplex", "--sampling", "arc_length"], ["arc_length", "curves"]),
    "zero epochs": (["--epochs", "0"], ["--epochs must be >= 1, got 0"]),
    "zero lr": (["--lr", "0"], ["--lr must be > 0"]),
    "warmup too long": (["--warmup-epochs", "2"], ["--warmup-epochs 2 must be in [0, --epochs 2)"]),
    "empty subset": (["--train-subset", "0"], ["--train-subset must be >= 1"]),
    "negative holdout": (["--holdout", "-1"], ["--holdout must be >= 0"]),
    "no bn batches": (["--bn-batches", "0"], ["--bn-batches must be >= 1"]),
    "hflip above 1": (["--hflip", "1.5"], ["--hflip is a probability: it must be in [0, 1], got 1.5"]),
    "negative color jitter": (["--color-jitter", "-0.4"], ["--color-jitter must be >= 0"]),
    "scale without rrc": (["--scale", "0.5", "1"], ["--scale sets timm's random resized crop", "--train-crop-mode rrc"]),
    "negative mixup": (["--mixup", "-1"], ["--mixup is a Beta(alpha, alpha) parameter: it must be >= 0"]),
    "mixup prob above 1": (["--mixup", "0.8", "--mixup-prob", "2"], ["--mixup-prob is a probability: it must be in [0, 1], got 2.0"]),
    "pad crop on an image folder": (["--dataset", "imagefolder:/no/such/folder", "--train-crop-mode", "pad"],
                                    ["--train-crop-mode pad needs images of one native size", "rrc | rkrc | rkrr"]),
    "one checkpoint kept": (["--checkpoint-hist", "1"], ["--checkpoint-hist 1 is too small", "--checkpoint-hist 2 or more"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_bad_flags_before_any_work(recipe, tmp_path, case):
    flags, fragments = TRAIN_CASES[case]
    out = tmp_path / "run"
    one_error(recipe("train.py", *TINY, "--epochs", "2", *flags, "--output", out), "error:", *fragments)
    assert not out.exists(), "validation must fail before the run folder is made"


def test_train_unknown_flag_and_missing_config(recipe, tmp_path):
    rc, lines = recipe("train.py", "--epochz", "3")
    assert rc == 2 and "unrecognized arguments: --epochz" in lines[-1]
    one_error(recipe("train.py", "-c", tmp_path / "nope.yaml"), f"config file {tmp_path / 'nope.yaml'} does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    one_error(recipe("train.py", "-c", bad), "is not valid YAML")


def test_unwritable_output_folder(recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    line = one_error(recipe("train.py", *TINY, "--output", blocker / "run"), "cannot write to the output folder", "--output")
    assert str(blocker / "run") in line
    assert blocker.read_text() == "keep me"


def test_full_disk_is_refused_before_training(recipe, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ss_run_folder.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    out = tmp_path / "run"
    one_error(recipe("train.py", *TINY, "--output", out), "only 10 MiB free in", "--output")
    assert sorted(p.name for p in out.iterdir()) == [], "no probe or config file left behind"


@pytest.mark.parametrize("case", ["missing", "no config", "bad yaml", "other recipe"])
def test_resume_folder_that_is_not_a_run(recipe, tmp_path, files, case):
    target = tmp_path / "target"
    if case != "missing":
        target.mkdir()
    if case == "bad yaml":
        (target / "config.yaml").write_text("epochs: [1\n")
    if case == "other recipe":
        (target / "config.yaml").write_text("model_a: runs/a\nmodel_b: runs/b\ncurve: bezier\nepochs: 2\n")
    fragment = {"missing": "no such folder", "no config": "no config.yaml there", "bad yaml": "cannot read",
                "other recipe": "is it a run of another recipe?"}[case]
    rc, lines = recipe("train.py", "--resume", target)
    assert rc == 2 and len(lines) == 1 and f"--resume {target}" in lines[0] and fragment in lines[0], lines


# ------------------------------------------------------------------------------------ recipes/connect.py
def test_connect_bad_flags(recipe, files, tmp_path):
    a, b = files.a, files.b
    one_error(recipe("connect.py", a, b, "--curve", "polychain", "--degree", "3"), "--degree applies to --curve bezier")
    one_error(recipe("connect.py", a, b, "--bends", "2"), "--bends applies to --curve polychain")
    one_error(recipe("connect.py", a, b, "--degree", "0"), "--degree 0 is invalid")
    one_error(recipe("connect.py", a, b, "--curve", "polychain", "--bends", "-1"), "--bends -1 is invalid")
    one_error(recipe("connect.py", a, b, "--sched", "cosine"), "--sched cosine", "garipov")
    one_error(recipe("connect.py", a, b, "--dataset", "cifar"), "unknown --dataset 'cifar'", "did you mean cifar10")
    rc, lines = recipe("connect.py", a)
    assert rc == 2 and "model_b" in lines[-1]


def test_connect_checkpoints_of_different_architectures(recipe, files, tmp_path):
    out = tmp_path / "out"
    line = one_error(recipe("connect.py", files.a, files.five, *DATA_TINY, "--output", out), "cannot connect these models",
                     "'fc.weight' has shape", "num_classes")
    assert str(files.a) in line and str(files.five) in line
    assert not out.exists()


def test_connect_missing_and_wrong_kind_of_checkpoint(recipe, files, tmp_path):
    missing = tmp_path / "nope"
    one_error(recipe("connect.py", files.a, missing), f"{missing} does not exist")
    one_error(recipe("connect.py", files.a, tmp_path / "nope.safetensors"), "nope.safetensors does not exist")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    one_error(recipe("connect.py", files.a, empty), f"{empty} holds no model.safetensors", "finished run")
    text = tmp_path / "weights.pt"
    text.write_text("pickle")
    one_error(recipe("connect.py", files.a, text), "expected a .safetensors model or a run folder")
    one_error(recipe("connect.py", files.a, files.line / "subspace.safetensors"), "is a subspace, not a plain model")


@pytest.mark.parametrize("damage", ["truncated export", "flipped byte", "model.json not json", "model.json not a spec",
                                    "unknown timm model in spec"])
def test_connect_damaged_checkpoint_names_the_file(recipe, files, tmp_path, damage):
    if damage == "truncated export":
        run_dir = _copy_run(files.line, tmp_path / "line")
        target = run_dir / "exports" / "centre.safetensors"
        target.write_bytes(target.read_bytes()[:1000])
        fragments = ["truncated or corrupted"]
    else:
        run_dir = _copy_run(files.b, tmp_path / "b")
        target = run_dir / "model.safetensors"
        if damage == "flipped byte":
            data = bytearray(target.read_bytes())
            data[-100] ^= 0x10
            target.write_bytes(bytes(data))
            fragments = ["is corrupted or was replaced", "model.json"]
        else:
            target = run_dir / "model.json"
            spec = json.loads(target.read_text())
            text = {"model.json not json": target.read_text()[:40], "model.json not a spec": json.dumps({"hello": 1}),
                    "unknown timm model in spec": json.dumps({**spec, "model": "resnet_from_the_future"})}[damage]
            target.write_text(text)
            fragments = {"model.json not json": ["is not valid JSON", "truncated or corrupted"],
                         "model.json not a spec": ["lacks model, num_classes, in_chans"],
                         "unknown timm model in spec": ["timm has no model 'resnet_from_the_future'"]}[damage]
    line = one_error(recipe("connect.py", files.a, run_dir), *fragments)
    assert str(target) in line


# ------------------------------------------------------------------------------------ recipes/simplex.py
def test_simplex_bad_flags_and_checkpoints(recipe, files, tmp_path):
    one_error(recipe("simplex.py", files.a, "--vertices", "1"), "--vertices 1: a simplex needs at least 2 vertices")
    one_error(recipe("simplex.py", files.a, "--samples", "0"), "--samples must be >= 1")
    one_error(recipe("simplex.py", files.a, "--volume-lambda", "-1"), "--volume-lambda must be >= 0")
    one_error(recipe("simplex.py", files.a, "--dataset", "imagenet"), "unknown --dataset 'imagenet'")
    one_error(recipe("simplex.py", files.a, "-b", "0"), "--batch-size must be >= 1")
    one_error(recipe("simplex.py", files.a, tmp_path / "gone"), f"{tmp_path / 'gone'} does not exist")
    out = tmp_path / "out"
    one_error(recipe("simplex.py", files.a, files.five, "--output", out), "cannot connect these models", "'fc.weight'")
    assert not out.exists()


# ------------------------------------------------------------------------------------ missing data
def test_dataset_not_found_says_how_to_get_it(recipe, tmp_path, monkeypatch):
    """The data is looked for after the output folder is checked: the accelerator is a stand-in here."""
    monkeypatch.setattr(ss_run_folder, "make_accelerator", lambda args, project_dir=None: types.SimpleNamespace(process_index=0, is_main_process=True))
    monkeypatch.setattr(ss_run_folder, "set_seed", lambda seed: None)
    empty = tmp_path / "no_data_here"
    empty.mkdir()
    line = one_error(recipe("train.py", *TINY, "--dataset", "cifar10", "--data-dir", empty, "--output", tmp_path / "run"),
                     "error: cifar10 not found", str(empty))
    assert "network access" in line and "SUBSPACES_DATA" in line, "the message says how to get the data"
    assert not (tmp_path / "run" / "config.yaml").exists()
    missing = tmp_path / "no_such_folder"
    one_error(recipe("train.py", *TINY, "--dataset", f"imagefolder:{missing}", "--output", tmp_path / "run2"),
              f"image folder dataset {missing} is incomplete", "train/<class>/<image>")


# ------------------------------------------------------------------------------------ the files
def test_load_subspace_needs_a_subspace(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds a plain model \(model.safetensors\), not a subspace"):
        load_subspace(files.a)
    with pytest.raises(CheckpointError, match="is a plain model, not a subspace"):
        load_subspace(files.line / "exports" / "centre.safetensors")
    with pytest.raises(CheckpointError, match="holds no subspace.safetensors"):
        load_subspace(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_subspace(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match="is a subspace, not a plain model"):
        load_model(files.line / "subspace.safetensors")
    assert isinstance(load_subspace(files.line), ss.Line)


def test_damaged_subspace_files(files, tmp_path):
    run_dir = _copy_run(files.line, tmp_path / "line")
    spec_path = run_dir / "subspace.json"
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "subspace": {"shape": "torus"}}))
    with pytest.raises(CheckpointError, match=r"subspace.json: 'subspace' is not a shape this version knows"):
        load_subspace(run_dir)
    spec_path.write_text(json.dumps(spec))
    weights = run_dir / "subspace.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"subspace.safetensors: .*truncated or corrupted"):
        load_subspace(run_dir)


def test_specs_without_a_digest_still_load(files, tmp_path):
    run_dir = _copy_run(files.a, tmp_path / "a")
    spec = json.loads((run_dir / "model.json").read_text())
    del spec["weights"]   # written before digests were recorded
    (run_dir / "model.json").write_text(json.dumps(spec))
    assert isinstance(load_model(run_dir), nn.Module)


# ------------------------------------------------------------------------------------ the core
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


CORE_CASES = {
    "curve point > 1": (lambda: ss.Line(_mlp()).eval()(torch.randn(2, 3), point=1.5), ValueError, r"t=1.5 is outside \[0, 1\]"),
    "curve point < 0": (lambda: ss.Bezier(_mlp()).set_point(-0.1), ValueError, r"outside \[0, 1\]"),
    "curve point vector": (lambda: ss.PolyChain(_mlp()).export([0.2, 0.8]), ValueError, "one number t in"),
    "simplex point length": (lambda: ss.Simplex(_mlp()).set_point([0.5, 0.5]), ValueError, "has 3 barycentric coordinates"),
    "simplex point negative": (lambda: ss.Simplex(_mlp()).set_point([1.2, -0.1, -0.1]), ValueError, "negative coordinate"),
    "simplex point sum": (lambda: ss.Simplex(_mlp()).set_point([0.5, 0.5, 0.5]), ValueError, "sums to 1.5, not 1"),
    "connect mismatched shapes": (lambda: ss.Line.connect(_mlp(), nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))),
                                  ValueError, r"'2.weight' has shape \(2, 5\) in model 0 but \(4, 5\) in model 1"),
    "connect mismatched names": (lambda: ss.Bezier.connect(_mlp(), nn.Sequential(nn.Linear(3, 5))), ValueError,
                                 r"'2.weight' is in model 0 but not in model 1"),
    "connect timm mismatch": (lambda: ss.PolyChain.connect(_timm(10), _timm(5)), ValueError, r"'fc.weight' has shape"),
    "degree 0": (lambda: ss.Bezier(_mlp(), degree=0), ValueError, "degree=0 is invalid: it must be >= 1"),
    "bends -1": (lambda: ss.PolyChain(_mlp(), bends=-1), ValueError, "bends=-1 is invalid: it must be >= 0"),
    "vertices 1": (lambda: ss.Simplex(_mlp(), vertices=1), ValueError, "vertices=1 is invalid: it must be >= 2"),
    "anchor 2 of a line": (lambda: ss.Line(_mlp()).anchor(2), IndexError, r"anchor 2 out of range: this subspace has 2 anchors \(0..1\)"),
    "anchor -4 of a simplex": (lambda: ss.Simplex(_mlp()).freeze_anchor(-4), IndexError, "anchor -4 out of range"),
}


@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_core_refuses_bad_input(case):
    make, exc, fragment = CORE_CASES[case]
    with pytest.raises(exc, match=fragment):
        make()


def test_training_with_every_anchor_frozen():
    sub = ss.Line.connect(_mlp(1), _mlp(2)).train()
    with pytest.raises(RuntimeError, match="every anchor of this subspace is frozen"):
        sub(torch.randn(4, 3)).sum().backward()
    sub = ss.Simplex(_mlp(), vertices=3).train()
    for k in range(3):
        sub.freeze_anchor(k)
    opt = torch.optim.SGD(sub.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="call unfreeze_anchor"):
        sub(torch.randn(4, 3)).sum().backward()
        opt.step()


# ------------------------------------------------------------------------------------ exit statuses
def _raise(err: BaseException):
    def job():
        raise err
    return job


@pytest.mark.parametrize("err,status", [
    (ValueError("train_subset=99999 exceeds the 60000 examples available\n(pass a smaller --train-subset)"), 2),
    (FileNotFoundError("Fashion-MNIST not found. Looked at:\n  - here\nFix one of:\n  * there"), 2),
    (CheckpointError("x.safetensors is corrupted"), 2),
    (OSError(28, "cannot write runs/x/results.json: No space left on device"), 1),
    (ss_training.NonFiniteLossError("loss is nan at epoch 2, step 3"), 3),
])
def test_cli_run_exit_status_and_one_line(err, status, capsys, monkeypatch):
    from subspaces import cli

    monkeypatch.delenv("SUBSPACES_DEBUG", raising=False)
    assert cli.run(_raise(err)) == status
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(err).splitlines()[0].strip() in lines[0], lines
    monkeypatch.setenv("SUBSPACES_DEBUG", "1")   # the traceback, for bug reports
    with pytest.raises(type(err)):
        cli.run(_raise(err))
    assert cli.run(lambda: {"finished": False}) == 0
