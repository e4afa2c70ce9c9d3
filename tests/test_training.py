"""End-to-end tests of the recipes (recipes/train.py, recipes/connect.py) run as subprocesses.

Every run is tiny (test_resnet, 128 training / 64 evaluation examples of Fashion-MNIST, batch 32).
Module-scoped fixtures run everything once, independent runs two at a time, shared between tests:

- ``runs``: a line trained 2 epochs in one go, and the same run cut after epoch 1 and resumed;
  standard training from ``-c config.yaml`` (one flag overridden on the command line), and
  standard training in bf16 with gradient accumulation (another seed); a Bezier curve between
  the two standard runs (recipes/connect.py);
- ``quick_runs``: every bad-input case and ``--help`` of every recipe (each a process forked from
  one interpreter that imported the package once: its own exit status and stderr).
"""

from __future__ import annotations

import math
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from helpers import (
    BATCH,
    DATA_TINY,
    EVAL_SUBSET,
    REPO,
    SEED,
    STEPS_PER_EPOCH,
    TINY,
    TRAIN_SUBSET,
    assert_metrics,
    assert_same_params,
    checkpoint_progress,
    read_json,
    read_metrics,
    recipe_cmd,
    run,
    run_forked,
)
from subspaces.io import load_model, load_model_with_spec, load_subspace, read_model_spec, save_model
from subspaces.schedules import garipov_lr_factor, garipov_schedule
from subspaces.shapes import Bezier, Line

RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.py"))


def _ok(res) -> None:
    assert res.rc == 0, res.explain()
    assert "Traceback" not in res.stderr, res.explain()


# ------------------------------------------------------------------------------------ fixtures
def _snapshot(run_dir: Path) -> dict:
    """What a stopped run left behind (read before it is resumed)."""
    return {
        "metrics": read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else None,
        "progress": checkpoint_progress(run_dir),
        "finished_files": sorted(n for n in ("results.json", "subspace.safetensors", "exports") if (run_dir / n).exists()),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The six training runs, two at a time: [cut, a] -> [b, ref] -> [resume, connect].

    - ref: a line, 2 epochs in one go; cut: the same stopped after epoch 1, then resumed;
    - a: standard training from ``-c config.yaml`` (epochs: 2 there, ``--epochs 1`` on the command line);
    - b: standard training in bf16 with 2 batches per update, another seed;
    - curve: recipes/connect.py, a quadratic Bezier between a and b.
    """
    root = tmp_path_factory.mktemp("runs")
    d = types.SimpleNamespace(**{name: root / name for name in ("ref", "cut", "a", "b", "curve")})
    cfg = root / "a.yaml"
    # dashes and underscores both accepted
    cfg.write_text(yaml.safe_dump({
        "model": "test_resnet", "subspace": "none", "epochs": 2, "train-subset": TRAIN_SUBSET,
        "eval_subset": EVAL_SUBSET, "batch-size": BATCH, "bn_batches": 2, "seed": SEED,
    }))
    line = ["--subspace", "line", *TINY, "--epochs", "2"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {
            "cut": pool.submit(run, recipe_cmd("train.py", *line, "--stop-after-epochs", "1", "--output", d.cut)),
            "a": pool.submit(run, recipe_cmd("train.py", "-c", cfg, "--epochs", "1", "--output", d.a)),
            # the later --seed wins
            "b": pool.submit(run, recipe_cmd("train.py", "--subspace", "none", *TINY, "--seed", "1", "--epochs", "1",
                                             "--mixed-precision", "bf16", "--grad-accum-steps", "2", "--output", d.b)),
            "ref": pool.submit(run, recipe_cmd("train.py", *line, "--output", d.ref)),
        }
        d.cut_res = jobs["cut"].result()
        d.after_cut = _snapshot(d.cut)
        if d.cut_res.rc == 0:
            jobs["resume"] = pool.submit(run, recipe_cmd("train.py", "--resume", d.cut))
        d.a_res, d.b_res = jobs["a"].result(), jobs["b"].result()
        if d.a_res.rc == 0 and d.b_res.rc == 0:
            jobs["curve"] = pool.submit(run, recipe_cmd("connect.py", d.a, d.b, "--curve", "bezier", "--epochs", "1",
                                                        *DATA_TINY, "--output", d.curve))
        d.ref_res = jobs["ref"].result()
        d.resume_res = jobs["resume"].result() if "resume" in jobs else None
        d.curve_res = jobs["curve"].result() if "curve" in jobs else None
    return d


@pytest.fixture(scope="module")
def line_runs(runs):
    return runs


@pytest.fixture(scope="module")
def standard_runs(runs):
    return runs


@pytest.fixture(scope="module")
def connect_runs(runs):
    _ok(runs.a_res)
    _ok(runs.b_res)
    assert runs.curve_res is not None
    return runs


#: bad input: (flags, phrases the one-line error must contain)
BAD_FLAGS = {
    "unknown_model": (["--model", "resnet81", *DATA_TINY], ["resnet81", "resnet18"]),
    "degree_on_line": (["--subspace", "line", "--degree", "3", *TINY], ["--degree"]),
    "volume_on_line": (["--subspace", "line", "--volume-lambda", "1", *TINY], ["--volume-lambda"]),
    "arc_length_on_simplex": (["--subspace", "simplex", "--sampling", "arc_length", *TINY], ["arc_length"]),
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Every bad-input case and --help of every recipe, as forked children of one interpreter."""
    root = tmp_path_factory.mktemp("quick")
    cmds = {f"help:{name}": recipe_cmd(name, "--help") for name in RECIPES}
    for key, (flags, _) in BAD_FLAGS.items():
        cmds[key] = recipe_cmd("train.py", *flags, "--epochs", "1", "--output", root / key)
    blocker = root / "a_regular_file"
    blocker.write_text("not a folder")
    cmds["unwritable_output"] = recipe_cmd("train.py", "--subspace", "line", *TINY, "--epochs", "1",
                                           "--output", blocker / "run")
    cfg = root / "bad.yaml"
    cfg.write_text("model: test_resnet\nsubspace: line\nepochz: 1\n")
    cmds["unknown_yaml_key"] = recipe_cmd("train.py", "-c", cfg, *DATA_TINY, "--output", root / "unknown_yaml_key")
    # recipes/connect.py between networks of two architectures
    spec = {"num_classes": 10, "in_chans": 1, "model_kwargs": {}, "dataset": "fashion-mnist"}
    nets = {}
    for name in ("test_resnet", "test_vit"):
        torch.manual_seed(0)
        nets[name] = timm.create_model(name, num_classes=10, in_chans=1)
        save_model(nets[name], root / name / "model", {**spec, "model": name})
    cmds["connect_mismatch"] = recipe_cmd("connect.py", root / "test_resnet", root / "test_vit", "--epochs", "1",
                                          *DATA_TINY, "--output", root / "connect_mismatch")
    return types.SimpleNamespace(root=root, blocker=blocker, nets=nets, res=run_forked(cmds, root))


@pytest.fixture(scope="module")
def fmnist_eval():
    """The evaluation subset and loader the runs used (Fashion-MNIST, seed SEED)."""
    from subspaces.data import build_datasets, make_loader

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBSPACES_OFFLINE", "1")
        mp.delenv("SUBSPACES_DATA", raising=False)
        model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
        data = build_datasets("fashion-mnist", in_chans=1, train_subset=TRAIN_SUBSET, eval_subset=EVAL_SUBSET,
                              seed=SEED, model=model)
    return make_loader(data.eval, BATCH, shuffle=False)


# ------------------------------------------------------------------------------------ 1. a line end to end
def test_line_run_folder(line_runs):
    _ok(line_runs.ref_res)
    run_dir = line_runs.ref
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/checkpoint_1/manifest.json", "subspace.safetensors", "subspace.json",
                 "results.json"):
        assert (run_dir / name).is_file(), f"{name} missing from the run folder"
    for point in ("centre", "anchor0", "anchor1"):
        for ext in ("safetensors", "json"):
            assert (run_dir / "exports" / f"{point}.{ext}").is_file(), f"exports/{point}.{ext} missing"
    assert not (run_dir / "exports" / "anchor2.safetensors").exists(), "a line has two anchors"

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    expected = {"model": "test_resnet", "subspace": "line", "epochs": 2, "train_subset": TRAIN_SUBSET,
                "eval_subset": EVAL_SUBSET, "batch_size": BATCH, "bn_batches": 2, "seed": SEED, "output": str(run_dir)}
    assert {k: cfg.get(k) for k in expected} == expected

    progress = checkpoint_progress(run_dir)
    assert (progress["epoch"], progress["updates"]) == (2, 2 * STEPS_PER_EPOCH)
    spec = read_json(run_dir / "subspace.json")
    assert spec["kind"] == "subspace" and spec["subspace"]["shape"] == "line" and spec["model"] == "test_resnet"


def test_line_metrics_jsonl(line_runs):
    _ok(line_runs.ref_res)
    records = read_metrics(line_runs.ref)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["updates"] for r in records] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for r in records:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert 0.0 <= r["train_acc"] <= 1.0
        assert r["samples_per_s"] > 0
        assert set(r["eval"]) == {"centre"}, "per-epoch evaluation is at the centre"
        assert_metrics(r["eval"]["centre"])
    # timm's cosine schedule stepped per update over 2 epochs (lr 0.05, min 0): half-way, then 0
    assert records[0]["lr"] == pytest.approx(0.025, rel=1e-6)
    assert records[1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_line_results_json(line_runs):
    _ok(line_runs.ref_res)
    results = read_json(line_runs.ref / "results.json")["results"]
    assert set(results) == {"centre", "anchor0", "anchor1"}
    for m in results.values():
        assert_metrics(m)
    # the final centre evaluation is the one logged for the last epoch
    assert results["centre"] == read_metrics(line_runs.ref)[-1]["eval"]["centre"]


def test_line_exports_load_as_timm_models(line_runs, fmnist_eval):
    _ok(line_runs.ref_res)
    from subspaces.ensembles import evaluate

    centre = load_model(line_runs.ref / "exports" / "centre.safetensors")
    fresh = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    assert type(centre) is type(fresh)
    fresh.load_state_dict(centre.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), centre.eval()(x))
    # the exported centre (BatchNorm recomputed) is the model whose metrics results.json reports
    reported = read_json(line_runs.ref / "results.json")["results"]
    for point in ("centre", "anchor0", "anchor1"):
        m = evaluate(load_model(line_runs.ref / "exports" / f"{point}.safetensors"), fmnist_eval, num_classes=10)
        assert m["count"] == EVAL_SUBSET
        assert m["acc"] == reported[point]["acc"], point
        assert m["nll"] == pytest.approx(reported[point]["nll"], rel=1e-5, abs=1e-6), point


def test_load_subspace_matches_exports(line_runs):
    _ok(line_runs.ref_res)
    sub = load_subspace(line_runs.ref)
    assert isinstance(sub, Line) and sub.num_anchors == 2
    # weights (BatchNorm buffers aside: the exports' statistics are recomputed)
    assert_same_params(sub.export(), load_model(line_runs.ref / "exports" / "centre.safetensors"), "centre")
    assert_same_params(sub.export(0.5), load_model(line_runs.ref), "run folder -> centre")
    for k in range(2):
        assert_same_params(sub.anchor(k), load_model(line_runs.ref / "exports" / f"anchor{k}.safetensors"), f"anchor{k}")
    a0, a1 = (dict(sub.anchor(k).named_parameters()) for k in range(2))
    assert any(not torch.equal(a0[n], a1[n]) for n in a0), "the two anchors of a line are identical"


# ------------------------------------------------------------------------------------ 2. standard training
def test_standard_training_writes_model(standard_runs):
    _ok(standard_runs.a_res)
    run_dir = standard_runs.a
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "model.json").is_file()
    assert not (run_dir / "subspace.safetensors").exists() and not (run_dir / "exports").exists()
    results = read_json(run_dir / "results.json")["results"]
    assert set(results) == {"model"}
    assert_metrics(results["model"])
    model, spec = load_model_with_spec(run_dir)
    assert type(model) is type(timm.create_model("test_resnet", num_classes=10, in_chans=1))
    assert spec["kind"] == "model" and read_model_spec(run_dir) == spec
    assert not hasattr(model, "spec")   # the spec is returned beside the timm model, not attached to it


# ------------------------------------------------------------------------------------ 3. resume
def test_cut_run_stops_resumably(line_runs):
    _ok(line_runs.cut_res)
    after = line_runs.after_cut
    assert (after["progress"]["epoch"], after["progress"]["updates"]) == (1, STEPS_PER_EPOCH)
    assert [r["epoch"] for r in after["metrics"]] == [1]
    assert after["finished_files"] == [], "a stopped run has no final results or exports"
    assert "--resume" in line_runs.cut_res.stdout + line_runs.cut_res.stderr


def test_resume_is_bit_identical(line_runs):
    _ok(line_runs.ref_res)
    _ok(line_runs.cut_res)
    assert line_runs.resume_res is not None
    _ok(line_runs.resume_res)
    ref = load_file(str(line_runs.ref / "subspace.safetensors"))
    resumed = load_file(str(line_runs.cut / "subspace.safetensors"))
    assert sorted(ref) == sorted(resumed)
    different = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not different, f"tensors differ after resume: {different}"
    records = read_metrics(line_runs.cut)
    assert [r["epoch"] for r in records] == [1, 2]
    ref_records = read_metrics(line_runs.ref)
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in ref_records]
    assert read_json(line_runs.cut / "results.json")["results"] == read_json(line_runs.ref / "results.json")["results"]


# ------------------------------------------------------------------------------------ 4. bf16 + accumulation
def test_bf16_with_gradient_accumulation(standard_runs):
    _ok(standard_runs.b_res)
    run_dir = standard_runs.b
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["mixed_precision"] == "bf16" and cfg["grad_accum_steps"] == 2 and cfg["seed"] == 1
    updates = STEPS_PER_EPOCH // 2   # one optimiser update per two batches
    progress = checkpoint_progress(run_dir)
    assert (progress["epoch"], progress["updates"]) == (1, updates)
    (record,) = read_metrics(run_dir)
    assert record["updates"] == updates
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["lr"])
    assert_metrics(record["eval"]["model"])
    assert_metrics(read_json(run_dir / "results.json")["results"]["model"])
    assert all(torch.isfinite(t).all() for t in load_model(run_dir).state_dict().values() if t.is_floating_point())


# ------------------------------------------------------------------------------------ 5. -c config.yaml
def test_yaml_config_supplies_flags_and_command_line_wins(standard_runs):
    _ok(standard_runs.a_res)
    run_dir = standard_runs.a
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["epochs"] == 1, "--epochs 1 on the command line must override epochs: 2 of the YAML"
    assert cfg["model"] == "test_resnet" and cfg["subspace"] == "none"
    assert cfg["train_subset"] == TRAIN_SUBSET and cfg["batch_size"] == BATCH and cfg["bn_batches"] == 2
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]
    assert read_json(run_dir / "model.json")["model"] == "test_resnet"


def test_unknown_yaml_key_is_refused(quick_runs):
    res = quick_runs.res["unknown_yaml_key"]
    assert res.rc == 2, res.explain()
    lines = res.error_lines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.explain()
    assert "epochz" in lines[0] and "epochs" in lines[0], lines[0]   # names the key, suggests the flag
    assert not (quick_runs.root / "unknown_yaml_key").exists()


# ------------------------------------------------------------------------------------ 6. bad flags
@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line(quick_runs, case):
    _, phrases = BAD_FLAGS[case]
    res = quick_runs.res[case]
    assert res.rc == 2, res.explain()
    lines = res.error_lines()
    assert len(lines) == 1, res.explain()
    assert "Traceback" not in res.stderr + res.stdout
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    assert not (quick_runs.root / case).exists(), "bad flags must be refused before the run folder is made"


def test_unwritable_output_folder(quick_runs):
    res = quick_runs.res["unwritable_output"]
    assert res.rc == 2, res.explain()
    lines = res.error_lines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.explain()
    assert str(quick_runs.blocker / "run") in lines[0] and "--output" in lines[0], lines[0]
    assert quick_runs.blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------ 7. --help
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_help(quick_runs, recipe):
    res = quick_runs.res[f"help:{recipe}"]
    assert res.rc == 0, res.explain()
    assert res.stdout.startswith("usage:") and "--output" in res.stdout, res.explain()
    assert "Traceback" not in res.stderr


def test_recipes_found():
    assert {"train.py", "connect.py"} <= set(RECIPES)


# ------------------------------------------------------------------------------------ 8. connect
def test_garipov_lr_factor():
    # docs/science.md §2: constant for the first half, linear decay to 1% by 90% of training
    assert garipov_lr_factor(0.0) == 1.0
    assert garipov_lr_factor(0.25) == 1.0
    assert garipov_lr_factor(0.5) == 1.0
    assert garipov_lr_factor(0.7) == pytest.approx(0.505, rel=1e-12)
    assert garipov_lr_factor(0.9) == pytest.approx(0.01, rel=1e-12)
    assert garipov_lr_factor(0.95) == 0.01
    assert garipov_lr_factor(1.0) == 0.01


def test_garipov_schedule_steps_per_update():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.015, momentum=0.9)
    sched = garipov_schedule(opt, total_updates=100)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[25] == pytest.approx(0.015)
    assert lrs[70] == pytest.approx(0.015 * 0.505)
    assert lrs[95] == pytest.approx(0.015 * 0.01)
    assert lrs[100] == pytest.approx(0.015 * 0.01)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the schedule never rises"


def test_garipov_schedule_per_epoch_as_their_code():
    """With updates_per_epoch the factor is that of the epoch, f(epoch / epochs), constant within it."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = garipov_schedule(opt, total_updates=100, updates_per_epoch=10)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(99):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    for epoch in range(10):
        assert lrs[10 * epoch : 10 * epoch + 10] == pytest.approx([garipov_lr_factor(epoch / 10)] * 10), epoch
    assert lrs[69] == pytest.approx(garipov_lr_factor(0.6)) and lrs[69] != pytest.approx(garipov_lr_factor(0.69))


def test_connect_writes_curve_and_exports(connect_runs):
    _ok(connect_runs.curve_res)
    run_dir = connect_runs.curve
    assert (run_dir / "subspace.safetensors").is_file() and (run_dir / "subspace.json").is_file()
    for point in ("centre", "anchor0", "anchor1", "anchor2"):
        assert (run_dir / "exports" / f"{point}.safetensors").is_file(), point
    spec = read_json(run_dir / "subspace.json")
    assert spec["subspace"]["shape"] == "bezier" and spec["subspace"]["shape_kwargs"] == {"degree": 2}
    assert spec["subspace"]["frozen"] == [0, 2]
    results = read_json(run_dir / "results.json")["results"]
    assert set(results) == {"centre", "anchor0", "anchor1", "anchor2"}
    for m in results.values():
        assert_metrics(m)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["sched"] == "garipov" and cfg["lr"] == 0.015 and cfg["epochs"] == 1


def test_connect_keeps_the_ends_and_trains_the_middle(connect_runs):
    _ok(connect_runs.curve_res)
    curve = load_subspace(connect_runs.curve)
    assert isinstance(curve, Bezier) and curve.num_anchors == 3
    model_a, model_b = load_model(connect_runs.a), load_model(connect_runs.b)
    # the ends are the two input networks, bit for bit (BatchNorm buffers aside: shared, from A)
    assert_same_params(curve.anchor(0), model_a, "anchor 0 vs model A")
    assert_same_params(curve.anchor(2), model_b, "anchor 2 vs model B")
    assert_same_params(load_model(connect_runs.curve / "exports" / "anchor0.safetensors"), model_a, "exported anchor0 vs A")
    assert_same_params(load_model(connect_runs.curve / "exports" / "anchor2.safetensors"), model_b, "exported anchor2 vs B")
    pa, pb, theta = dict(model_a.named_parameters()), dict(model_b.named_parameters()), dict(curve.anchor(1).named_parameters())
    assert any(not torch.equal(pa[n], pb[n]) for n in pa), "the two input runs are the same network"
    assert any(not torch.allclose(theta[n], (pa[n] + pb[n]) / 2, atol=1e-6) for n in theta), \
        "the interior anchor never left its start, the midpoint"


def test_connect_follows_garipov_schedule(connect_runs):
    _ok(connect_runs.curve_res)
    (record,) = read_metrics(connect_runs.curve)
    assert record["updates"] == STEPS_PER_EPOCH
    # after the last update of training, progress = 1: the lr is 1% of the base lr
    assert record["lr"] == pytest.approx(0.015 * 0.01, rel=1e-9)


def test_connect_refuses_different_architectures(quick_runs):
    res = quick_runs.res["connect_mismatch"]
    assert res.rc == 2, res.explain()
    lines = res.error_lines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.explain()
    a_state = quick_runs.nets["test_resnet"].state_dict()
    v_state = quick_runs.nets["test_vit"].state_dict()
    first = next(n for n, t in a_state.items() if n not in v_state or v_state[n].shape != t.shape)
    assert f"'{first}'" in lines[0], lines[0]
    assert not (quick_runs.root / "connect_mismatch").exists(), "nothing is written for a refused connection"
