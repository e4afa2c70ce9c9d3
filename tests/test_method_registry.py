"""The registry of compared methods: a method defined outside the package (tests/toy_plugin.py,
with a toy shape it trains) becomes a ``--methods`` value of recipes/compare.py by one
``register_method`` call, through ``SUBSPACES_PLUGINS`` in the compare and its worker processes;
the built-in methods keep their names, seeds, members and rows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from subspaces.compare_plan import OFFSETS, make_plan
from subspaces.compare_run import Runner
from subspaces.errors import ConfigError
from subspaces.method_registry import (DEFAULT_METHODS, CompareMethod, RowName, find_member, method_names, register_method, row_display,
                                       row_rank, unregister_method)
from subspaces.settings import METHODS, CompareConfig

from helpers import REPO, recipe_env

#: a tiny compare: test_resnet on Fashion-MNIST (1 channel), 1 epoch, budget 1B only
FLAGS = ["--model", "test_resnet", "--epochs", "1", "--train-subset", "256", "--eval-subset", "256", "--holdout", "128", "-b", "64",
         "--bn-batches", "1", "--samples", "2", "--eval-batch-size", "128", "--log-interval", "1000", "--threads", "1",
         "--budgets", "1", "--subspace-budgets", "1"]


def test_the_built_in_methods_are_registered_in_the_table_order():
    assert method_names()[:8] == DEFAULT_METHODS == METHODS
    assert dict(OFFSETS) == {"ind": 0, "sse": 10, "fge": 20, "line": 30, "simplex": 40, "espro": 50, "layerwise": 60}
    assert row_display("line_points", 5) == "Line 5 points (ens.)" and row_display("single", 5) == "Single network"
    shown = ["ESPRO", "Simplex vertices (ens.)", "Simplex 5 samples (ens.)", "Line (layerwise) midpoint", "Line 5 points (ens.)",
             "Line (layerwise) endpoints (ens.)", "SWA", "Line midpoint", "Ind", "Single network", "Simplex centre", "FGE", "SSE",
             "Line endpoints (ens.)"]
    assert sorted(shown, key=row_rank) == [
        "Single network", "Ind", "SSE", "FGE", "SWA", "Line midpoint", "Line endpoints (ens.)", "Line 5 points (ens.)",
        "Line (layerwise) endpoints (ens.)", "Line (layerwise) midpoint", "Simplex centre", "Simplex 5 samples (ens.)",
        "Simplex vertices (ens.)", "ESPRO"]
    assert row_rank("line_midpoint")[0] == row_rank("Line midpoint")[0]


def test_the_members_start_in_the_order_of_today(tmp_path):
    args = CompareConfig(subspace_budgets="1,2")
    plan = make_plan(args, num_train=10_000)
    names = [t.name for t in Runner(args, plan, None, {}, tmp_path, 42).tasks(0)]   # type: ignore[arg-type]
    assert names == ["ind0", "sse", "fge", "ind1", "ind2", "line1B", "layerwise1B", "simplex1B", "line2B", "layerwise2B", "simplex2B",
                     "spro0", "spro1", "spro2"]
    assert find_member(plan.methods, plan, "spro1")[1].deps == ("ind1",)
    with pytest.raises(ValueError, match="unknown compare member"):
        find_member(plan.methods, plan, "swa")


class Nothing(CompareMethod):
    rows = (RowName("nothing", "Nothing"),)


def test_registration_refuses_clashes_and_unknown_methods_name_the_registered_ones():
    with pytest.raises(ValueError, match="registered already"):
        register_method("ind", Nothing())
    with pytest.raises(ValueError, match="seed offset 30 is taken by 'line'"):
        register_method("nothing", Nothing(), seed_offset=30)
    with pytest.raises(ValueError, match="row 'ind' of method 'dup'"):
        register_method("dup", type("Dup", (CompareMethod,), {"rows": (RowName("ind", "Ind again"),)})())
    register_method("nothing", Nothing(), seed_offset=990)
    try:
        assert method_names()[-1] == "nothing" and OFFSETS["nothing"] == 990
        assert row_rank("Nothing")[0] > row_rank("ESPRO")[0]
        with pytest.raises(ConfigError, match=r"--methods: unknown toy; choose from ind,sse,fge,swa,line,layerwise,simplex,espro,nothing"):
            make_plan(CompareConfig(methods="ind,toy"), num_train=1000)
    finally:
        unregister_method("nothing")
    assert "nothing" not in OFFSETS and "nothing" not in method_names()


def test_a_method_from_a_plugin_runs_through_the_cli(tmp_path):
    """SUBSPACES_PLUGINS=toy_plugin: the toy method trains the toy shape in a worker process
    (--jobs 2: the compare's workers import the plugin too) and its row is in every result file,
    after the built-in rows, with its accounting line; a plugin that cannot be imported, and a
    method nobody registered, exit 2 with one line."""
    env = recipe_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    env["SUBSPACES_PLUGINS"] = "toy_plugin"
    out = tmp_path / "cmp"
    cmd = [sys.executable, "recipes/compare.py", *FLAGS, "--methods", "ind,toy", "--jobs", "2", "--output", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "toy1B: started in a worker process" in res.stderr
    assert (out / "seed0" / "logs" / "toy1B.log").exists()
    assert json.loads((out / "seed0" / "toy1B" / "subspace.json").read_text())["subspace"]["shape"] == "toy_cubic"
    rows = list(csv.DictReader((out / "results.csv").open()))
    toy = [r for r in rows if r["method"] == "Toy cubic midpoint"]
    assert [(r["budget"], r["seed"], r["members"]) for r in toy] == [("1B", "42", "1"), ("1B", "mean", "1"), ("1B", "std", "1")]
    assert 0 <= float(toy[0]["error_pct"]) <= 100 and float(toy[0]["nll"]) > 0 and toy[0]["val_error_pct"]
    data = json.loads((out / "results.json").read_text())
    assert set(data["table"]) == {"Single network", "Ind", "Toy cubic midpoint"}
    assert data["plan"]["methods"] == ["ind", "toy"]
    assert any(line.startswith("Toy(1B)") for line in data["accounting"])
    md = (out / "results.md").read_text()
    assert md.index("| Single network |") < md.index("| Ind |") < md.index("| Toy cubic midpoint |")   # the table's order
    preds = load_file(str(out / "seed0" / "predictions.safetensors"))
    assert preds["test/Toy cubic midpoint@1B"].shape == (256, 10)

    env["SUBSPACES_PLUGINS"] = "no_such_plugin"
    bad = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and lines == ["error: SUBSPACES_PLUGINS: cannot import 'no_such_plugin': No module named 'no_such_plugin'"]
    del env["SUBSPACES_PLUGINS"]
    bad = subprocess.run(cmd[:-2] + ["--output", str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and not ln.startswith("[compare]")]
    assert bad.returncode == 2 and lines[-1].startswith("error: --methods: unknown toy; choose from ind,"), bad.stderr[-2000:]
