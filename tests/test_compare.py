"""recipes/compare.py end to end on a tiny budget, its restart behaviour and its bad-input errors.

The protocol runs in-process (imports are the slow part of a recipe process): test_resnet, 64
Fashion-MNIST training images, batch 16 (4 updates per epoch), B = 2 epochs, 1B/2B/3B.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_progress
from subspaces.settings import CompareConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-subset", "64", "--eval-subset", "32", "-b", "16", "--epochs", "2", "--bn-batches", "1",
        "--samples", "3", "--log-interval", "1000", "--eval-batch-size", "32", "--jobs", "1"]


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory):
    """A compare run stopped after 2 member runs, the same command again (finishes), and once more."""
    import os

    os.environ["SUBSPACES_OFFLINE"] = "1"
    out = tmp_path_factory.mktemp("compare") / "cmp"
    main = _recipe("compare").main
    argv = [*TINY, "--output", str(out)]
    rc_stop = main([*argv, "--stop-after-runs", "2"])
    after_stop = {
        "ind0": (out / "seed0" / "ind0" / "results.json").exists(),
        "sse": (out / "seed0" / "sse" / "snapshots.json").exists(),   # the longest runs start first
        "ind1": (out / "seed0" / "ind1").exists(),
        "results": (out / "results.md").exists(),
        "mtimes": {n: _mtimes(out / "seed0" / n) for n in ("ind0", "sse")},
    }
    rc_full = main(argv)
    mtimes_full = {n: _mtimes(out / "seed0" / n) for n in ("ind0", "ind1", "ind2", "fge", "sse", "line1B", "layerwise1B", "simplex1B", "spro0", "spro2")}
    results_mtime = (out / "results.json").stat().st_mtime_ns
    rc_again = main(argv)
    return {"out": out, "rc_stop": rc_stop, "after_stop": after_stop, "rc_full": rc_full, "mtimes_full": mtimes_full,
            "rc_again": rc_again, "results_mtime": results_mtime}


def test_compare_writes_all_three_result_files(compare_runs):
    out = compare_runs["out"]
    assert compare_runs["rc_full"] == 0
    data = json.loads((out / "results.json").read_text())
    table = data["table"]
    for row in ("Ind", "SSE", "FGE", "SWA"):
        assert set(table[row]) == {"1B", "2B", "3B"}, row
        for cell in table[row].values():
            assert 0 <= cell["acc"] <= 1 and cell["nll"] > 0 and cell["members"] >= 1
    assert [table["Ind"][f"{k}B"]["members"] for k in (1, 2, 3)] == [1, 2, 3]
    for row in ("Line midpoint", "Line endpoints (ens.)", "Line 3 points (ens.)", "Simplex centre", "Simplex vertices (ens.)",
                "Simplex 3 samples (ens.)", "Single network", "Line (layerwise) midpoint", "Line (layerwise) endpoints (ens.)"):
        assert set(table[row]) == {"1B"}, row
    # ESPRO(k): 3 samples from each of the first k SPRO simplexes, its SPRO epochs in its cost
    assert [table["ESPRO"][f"{k}B"]["members"] for k in (1, 2, 3)] == [3, 6, 9]
    spro_cost = (3 - 1) * 1 * 1 / 2   # (vertices - 1) x epochs per vertex x points per batch / B
    assert [table["ESPRO"][f"{k}B"]["cost"] for k in (1, 2, 3)] == pytest.approx([k * (1 + spro_cost) for k in (1, 2, 3)])
    assert table["Ind"]["2B"]["cost"] == 2
    assert {c["key"] for c in data["claims"]} == {"b", "c1", "c1-layerwise", "c2", "d"}
    assert "## Claims" in (out / "results.md").read_text()
    # FGE's budget counts its 0.8B pre-training: snapshots at iterations 6 + i <= 8k (cycle 2, snapshot at i odd)
    plan = data["plan"]
    assert plan["pretrain_iter"] == 6 and plan["fge_cycle"] == 2 and plan["upe"] == 4
    assert [table["FGE"][f"{k}B"]["members"] for k in (1, 2, 3)] == [1, 5, 9]
    assert [table["SSE"][f"{k}B"]["members"] for k in (1, 2, 3)] == [2, 4, 6]
    assert any("FGE(kB)" in line for line in data["accounting"])
    md = (out / "results.md").read_text()
    assert "| Ind |" in md and "| FGE |" in md and "Budget accounting" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} >= {"Ind", "SSE", "FGE", "SWA", "Line midpoint", "ESPRO", "claim (b)", "claim (d)"}
    assert {r["seed"] for r in rows} == {"42", "mean", "std", "all"}
    assert {r["verdict"] for r in rows if r["method"].startswith("claim")} <= {"held", "contradicted", "not resolved at this scale", "reported"}
    assert all(float(r["error_lo"]) <= float(r["error_pct"]) <= float(r["error_hi"]) for r in rows if r["seed"] == "mean")
    assert (out / "results.png").exists() and "results.png" in md and "Validation split" in md


def test_every_row_is_evaluated_with_batchnorm_recomputed(compare_runs):
    """Ind(1B) is ind0 with its BatchNorm recomputed, as every other row, not its running statistics."""
    from subspaces.bn import update_bn
    from subspaces.data import build_datasets, make_loader
    from subspaces.ensembles import evaluate
    from subspaces.io import load_model

    out = compare_runs["out"]
    data = json.loads((out / "results.json").read_text())
    model = load_model(out / "seed0" / "ind0" / "model.safetensors")
    proto = data["protocol"]
    bundle = build_datasets("fashion-mnist", in_chans=1, train_subset=proto["train_subset"], eval_subset=proto["eval_subset"],
                            holdout=proto["holdout"], seed=proto["seed"], model=model)
    running = evaluate(model, make_loader(bundle.eval, 32, shuffle=False))
    update_bn(model, make_loader(bundle.bn, proto["batch_size"], shuffle=False), max_batches=proto["bn_batches"])
    recomputed = evaluate(model, make_loader(bundle.eval, 32, shuffle=False))
    ind1 = data["table"]["Ind"]["1B"]
    assert ind1["nll"] == pytest.approx(recomputed["nll"], abs=1e-5)
    assert ind1["nll"] != pytest.approx(running["nll"], abs=1e-5)


def test_rows_from_saved_predictions_equal_a_direct_evaluation(compare_runs):
    """The rows the main process averages from the members' saved probabilities equal the same
    ensembles evaluated directly (BatchNorm recomputed at each network, probabilities averaged)."""
    from subspaces.compare_plan import make_plan
    from subspaces.data import build_datasets, make_loader
    from subspaces.ensembles import Ensemble, evaluate
    from subspaces.io import load_model, load_subspace
    from subspaces.snapshots import list_snapshots

    out = compare_runs["out"]
    data = json.loads((out / "results.json").read_text())
    proto, table = data["protocol"], data["table"]
    line = load_subspace(out / "seed0" / "line1B")
    bundle = build_datasets("fashion-mnist", in_chans=1, train_subset=proto["train_subset"], eval_subset=proto["eval_subset"],
                            holdout=proto["holdout"], seed=proto["seed"], model=line.export(0.5))
    bn = make_loader(bundle.bn, proto["batch_size"], shuffle=False)
    test = make_loader(bundle.eval, 32, shuffle=False)
    ends = Ensemble([line.export(t, bn_loader=bn, bn_batches=proto["bn_batches"]) for t in (0.0, 1.0)])
    direct = evaluate(ends, test)
    assert table["Line endpoints (ens.)"]["1B"]["acc"] == pytest.approx(direct["acc"], abs=1e-9)
    assert table["Line endpoints (ens.)"]["1B"]["nll"] == pytest.approx(direct["nll"], abs=1e-5)
    snaps = list_snapshots(out / "seed0" / "fge")
    plan = make_plan(CompareConfig.from_mapping(proto), len(bundle.train))
    n = plan.fge_count(2, [s.iteration for s in snaps])
    direct = evaluate(Ensemble([load_model(s.path) for s in snaps[:n]]), test)
    assert table["FGE"]["2B"]["members"] == n
    assert table["FGE"]["2B"]["nll"] == pytest.approx(direct["nll"], abs=1e-5)
    val = evaluate(ends, make_loader(bundle.holdout, 32, shuffle=False))
    assert table["Line endpoints (ens.)"]["1B"]["val_nll"] == pytest.approx(val["nll"], abs=1e-5)


def test_members_leave_their_evaluation_to_the_compare(compare_runs):
    """A member's own loop evaluates nothing (the compare predicts each network it contributes,
    once): no evaluation in its metrics, no metrics in its results.json, its predictions saved."""
    seed0 = compare_runs["out"] / "seed0"
    checked = 0
    for name in ("ind0", "line1B", "layerwise1B", "simplex1B", "fge", "sse", "spro0"):
        folder = seed0 / name
        assert (folder / "predictions.safetensors").exists(), name
        for metrics in [folder / "metrics.jsonl", *sorted(folder.glob("vertex*/metrics.jsonl"))]:
            if metrics.exists():
                records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                assert records and not any("eval" in r for r in records), metrics
                checked += 1
        for results in [folder / "results.json", *sorted(folder.glob("vertex*/results.json"))]:
            if results.exists():
                assert json.loads(results.read_text())["results"] == {}, results
    assert checked >= 7


def test_a_stopped_compare_reuses_its_finished_members(compare_runs):
    stop = compare_runs["after_stop"]
    assert compare_runs["rc_stop"] == 0
    assert stop["ind0"] and stop["sse"] and not stop["ind1"] and not stop["results"]
    assert (compare_runs["out"] / "seed0" / "ind0" / "pretrain" / "optimizer.bin").exists()
    for name, before in stop["mtimes"].items():   # not retrained by the second job
        assert compare_runs["mtimes_full"][name] == before, name
    # a third job trains nothing and rewrites only the result files
    assert compare_runs["rc_again"] == 0
    for name, before in compare_runs["mtimes_full"].items():
        assert _mtimes(compare_runs["out"] / "seed0" / name) == before, name
    assert (compare_runs["out"] / "results.json").stat().st_mtime_ns >= compare_runs["results_mtime"]


def test_compare_refuses_other_settings_in_the_same_folder(compare_runs, capsys):
    main = _recipe("compare").main
    rc = main([*TINY, "--output", str(compare_runs["out"]), "--lr", "0.01"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "other settings" in err[0]


@pytest.mark.parametrize("extra, message", [
    (["--fge-cycle-iters", "3"], "even"),
    (["--sse-cycle-iters", "1000"], "longer than the run"),
    (["--fge-pretrain", "0.95"], "less than one cycle"),
    (["--budgets", "0,1"], "positive"),
    (["--espro-vertices", "9"], "above the largest budget 3B: use --espro-vertices <= 5"),
])
def test_compare_bad_inputs_fail_with_one_line(tmp_path, capsys, extra, message):
    rc = _recipe("compare").main([*TINY, "--output", str(tmp_path / "x"), *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.parametrize("extra, message", [
    (["--cycle-iters", "3"], "even"),
    (["--cycle", "1"], "even"),                  # 1 epoch = 3 iterations with 48 examples, batch 16
    (["--cycle-iters", "100", "--epochs", "2"], "longer than the run"),
])
def test_fge_recipe_bad_cycles_fail_with_one_line(compare_runs, tmp_path, capsys, extra, message):
    start = compare_runs["out"] / "seed0" / "ind0"
    rc = _recipe("fge").main([str(start), "--train-subset", "48", "-b", "16", "--output", str(tmp_path / "f"), *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def _cells(table: dict, rows: list[str]) -> dict:
    return {(row, b): (c["members"], round(c["acc"], 6), round(c["nll"], 5)) for row in rows for b, c in table[row].items()}


@pytest.mark.parametrize("launcher", ["workers", "torchrun"])
def test_the_protocol_is_the_same_under_any_launcher(compare_runs, tmp_path, launcher):
    """Two worker processes, or two real gloo ranks sharing the members out, train the same members
    (same update counts, same snapshots) and give the same table as one process doing them in turn."""
    import subprocess
    import sys

    from helpers import recipe_env

    out = tmp_path / "cmp"
    flags = TINY[:-2] + ["--methods", "ind,fge,swa,line", "--output", str(out)]
    if launcher == "workers":
        cmd = [sys.executable, "recipes/compare.py", *flags, "--jobs", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "recipes/compare.py", *flags]
    res = subprocess.run(cmd, cwd=REPO, env=recipe_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    if launcher == "torchrun":
        assert "rank 1 of 2" in res.stderr and "rank 0 of 2" in res.stderr
    one = json.loads((compare_runs["out"] / "results.json").read_text())
    many = json.loads((out / "results.json").read_text())
    assert many["plan"]["upe"] == one["plan"]["upe"] and many["plan"]["fge_cycle"] == one["plan"]["fge_cycle"]
    for name in ("ind0", "ind1", "ind2", "line1B"):
        progress = lambda root: checkpoint_progress(root / "seed0" / name)  # noqa: E731
        assert progress(out)["updates"] == progress(compare_runs["out"])["updates"], name
    snaps = lambda root: json.loads((root / "seed0" / "fge" / "snapshots.json").read_text())["snapshots"]  # noqa: E731
    assert [s["iteration"] for s in snaps(out)] == [s["iteration"] for s in snaps(compare_runs["out"])]
    rows = ["Single network", "Ind", "FGE", "SWA", "Line midpoint", "Line endpoints (ens.)"]
    assert _cells(many["table"], rows) == _cells(one["table"], rows)


@pytest.mark.parametrize("preset", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid_compare_configs(preset):
    import re

    from subspaces.cli_flags import parse_with_config

    args = CompareConfig(**vars(parse_with_config(_recipe("compare").build_parser(), ["-c", str(preset)], CompareConfig.field_names())))
    lines = preset.read_text().splitlines()
    header = " ".join(line.lstrip("# ") for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert args.model and args.epochs >= 1 and args.output.startswith("runs/")
    # The header states the work, "N x E [epochs] x S [images] = W M training images", with the
    # preset's own epochs and arithmetic that holds, and then a measured time or "not timed".
    work = re.search(r"(\d+) x (\d+)(?: epochs)? x ([\d,]+)(?: images)? = ([\d.]+) M training images", header)
    assert work, f"{preset.name}: the header states its work as 'N x E x S = W M training images'"
    budgets, epochs, images, millions = int(work[1]), int(work[2]), int(work[3].replace(",", "")), float(work[4])
    assert epochs == args.epochs, f"{preset.name}: the work figure uses {epochs} epochs, the preset {args.epochs}"
    assert budgets * epochs * images == pytest.approx(millions * 1e6, rel=1e-3), f"{preset.name}: the work figure's arithmetic"
    assert (re.search(r"\b\d+(?:\.\d+)?\s*(?:s|min|minutes|h|hours)\b", header)
            or "not timed here" in header), f"{preset.name}: the header names its expected time or says it is not timed"


def test_the_plan_is_a_pure_function_of_the_settings():
    """The default compare's plan, derived without training or reading a file."""
    from subspaces.compare_plan import accounting, make_plan

    args = CompareConfig(**vars(_recipe("compare").build_parser().parse_args([])))
    assert args == CompareConfig(), "the recipe's defaults are CompareConfig's"
    plan = make_plan(args, num_train=10_000)
    assert (plan.B, plan.upe, plan.budget_iters) == (20, 157, 3140)
    assert plan.pretrain_iter == 2512 and plan.fge_cycle == 156 and plan.fge_epochs == 44
    assert plan.sse_cycle == 1570 and plan.sse_epochs == 60
    assert plan.methods == ["ind", "sse", "fge", "swa", "line", "layerwise", "simplex", "espro"]
    assert plan.spro_cost == pytest.approx(0.1) and plan.cost("ESPRO", 2) == pytest.approx(2.2) and plan.cost("Ind", 2) == 2
    assert plan.fge_count(1, [78 + 156 * i for i in range(30)]) == 4   # four cycles in the 628 FGE iterations of 1B
    assert any("ESPRO(k)" in line for line in accounting(plan, args))


def test_sigterm_stops_the_members_with_checkpoints_and_the_same_command_continues(compare_runs, tmp_path):
    """SIGTERM to a comparison reaches its worker processes, which checkpoint and stop; the
    comparison exits 75 with one line, and the same command again finishes the same members."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import recipe_env

    out = tmp_path / "cmp"
    cmd = [sys.executable, "recipes/compare.py", *TINY[:-2], "--methods", "ind,line", "--jobs", "2", "--output", str(out)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=recipe_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + 300
        while "started in a worker process" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(4)   # the worker is importing or training by now
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith(("stopped:", "error:"))]
    assert rc == 75, log.read_text()[-3000:]
    assert len(lines) == 1 and lines[0].startswith("stopped: compare interrupted"), lines
    again = subprocess.run(cmd, cwd=REPO, env=recipe_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("ind0", "ind1", "ind2", "line1B"):
        progress = lambda root: checkpoint_progress(root / "seed0" / name)  # noqa: E731
        assert progress(out)["updates"] == progress(compare_runs["out"])["updates"], name


def test_same_command_same_cells_under_jobs_1_and_2_with_a_killed_member_resumed(tmp_path):
    """A tiny 2-seed compare run in one process (--jobs 1) and in two worker processes (--jobs 2),
    the latter with one member killed by SIGKILL and the same command run again, writes an
    identical results.csv (every row, ESPRO included); every member, SPRO stages included,
    trained on the replicate's training images (equal digests), and every compare writes the
    predictions, the validation rows and the figure."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import recipe_env
    from safetensors.torch import load_file

    flags = ["--train-subset", "64", "--eval-subset", "64", "--holdout", "32", "-b", "16", "--epochs", "2", "--bn-batches", "1",
             "--samples", "2", "--log-interval", "1000", "--eval-batch-size", "64", "--seeds", "2", "--threads", "1",
             "--budgets", "1,2", "--methods", "ind,sse,fge,swa,line,simplex,espro"]
    one, two = tmp_path / "jobs1", tmp_path / "jobs2"
    assert _recipe("compare").main([*flags, "--jobs", "1", "--output", str(one)]) == 0
    cmd = [sys.executable, "recipes/compare.py", *flags, "--jobs", "2", "--output", str(two)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=recipe_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
        victim, deadline = None, time.monotonic() + 300
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            found = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "subspaces.compare_worker"], capture_output=True, text=True)
            victim = int(found.stdout.split()[0]) if found.stdout.split() else None
            time.sleep(0.2)
        assert victim is not None, log.read_text()[-3000:]
        time.sleep(3)   # importing or training by now
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
    assert rc == 1, log.read_text()[-3000:]   # a crash, not bad input (2)
    assert len(lines) == 1 and "was killed by signal 9" in lines[0] and "its log:" in lines[0], lines
    again = subprocess.run(cmd, cwd=REPO, env=recipe_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (one / "results.csv").read_text() == (two / "results.csv").read_text()
    results = json.loads((one / "results.json").read_text())
    digest = results["data"]["train_digest"]
    records = sorted((one / "seed0").glob("*/data.json")) + sorted((one / "seed1").glob("*/data.json"))
    records += sorted((one / "seed0").glob("spro*/vertex*/data.json"))
    # per seed: ind0, ind1, sse, fge, line1B, simplex1B; seed 0's SPRO stages: 2 simplexes x 2 added vertices
    assert len(records) == 2 * 6 + 4
    assert {json.loads(p.read_text())["train_digest"] for p in records} == {digest}
    assert {json.loads(p.read_text())["holdout_digest"] for p in records} == {results["data"]["holdout_digest"]}
    for out in (one, two):
        assert (out / "results.png").stat().st_size > 10_000
        preds = load_file(str(out / "seed1" / "predictions.safetensors"))
        assert preds["test/labels"].shape == (64,) and preds["val/labels"].shape == (32,)
        assert preds["test/ESPRO@2B"].shape == (64, 10) and preds["test/ESPRO@2B"].dtype == torch.float32
        assert preds["test/Single network@1B"].shape == (2, 64, 10)
        table = json.loads((out / "results.json").read_text())["table"]
        assert {"val_error", "error_lo", "error_hi", "nll_lo", "nll_hi"} <= set(table["ESPRO"]["1B"])
