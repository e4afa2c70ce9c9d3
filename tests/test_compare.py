"""recipes/compare.py end to end on a tiny budget, its restart behaviour and its bad-input errors.

The protocol runs in-process (imports are the slow part of a recipe process): test_resnet, 64
Fashion-MNIST training images, batch 16 (4 updates per epoch), B = 2 epochs, 1B/2B/3B.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-subset", "64", "--eval-subset", "32", "-b", "16", "--epochs", "2", "--bn-batches", "1",
        "--samples", "3", "--log-interval", "1000", "--eval-batch-size", "32"]


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
        "ind1": (out / "seed0" / "ind1" / "results.json").exists(),
        "ind2": (out / "seed0" / "ind2").exists(),
        "results": (out / "results.md").exists(),
        "mtimes": {n: _mtimes(out / "seed0" / n) for n in ("ind0", "ind1")},
    }
    rc_full = main(argv)
    mtimes_full = {n: _mtimes(out / "seed0" / n) for n in ("ind0", "ind1", "ind2", "fge", "sse", "line1B", "simplex1B")}
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
    for row in ("Line midpoint", "Line ends (ens.)", "Line 3 points (ens.)", "Simplex centre", "Simplex 3 vertices (ens.)",
                "Simplex 3 samples (ens.)", "Single network"):
        assert set(table[row]) == {"1B"}, row
    # FGE's budget counts its 0.8B pre-training: snapshots at iterations 6 + i <= 8k (cycle 2, snapshot at i odd)
    plan = data["plan"]
    assert plan["pretrain_iter"] == 6 and plan["fge_cycle"] == 2 and plan["upe"] == 4
    assert [table["FGE"][f"{k}B"]["members"] for k in (1, 2, 3)] == [1, 5, 9]
    assert [table["SSE"][f"{k}B"]["members"] for k in (1, 2, 3)] == [2, 4, 6]
    assert any("FGE(kB)" in line for line in data["accounting"])
    md = (out / "results.md").read_text()
    assert "| Ind |" in md and "| FGE |" in md and "Budget accounting" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} >= {"Ind", "SSE", "FGE", "SWA", "Line midpoint"}
    assert {r["seed"] for r in rows} == {"42", "mean", "std"}


def test_a_stopped_compare_reuses_its_finished_members(compare_runs):
    stop = compare_runs["after_stop"]
    assert compare_runs["rc_stop"] == 0
    assert stop["ind0"] and stop["ind1"] and not stop["ind2"] and not stop["results"]
    assert (compare_runs["out"] / "seed0" / "ind0" / "pretrain" / "checkpoint" / "optimizer.bin").exists()
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
