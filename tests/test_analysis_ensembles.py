"""analysis/ensembles.py on a tiny compare run: its files, size curves, budget numbers, reliability bins
and one-line errors.

The compare run is built in-process (``--jobs 1``) with tests/test_compare.py's tiny settings
(test_resnet, 64 Fashion-MNIST training images, 32 test images, batch 16, B = 2 epochs, 1B/2B/3B, 3
points per subspace ensemble, every method): Ind has 3 members, SSE 6 snapshots, FGE 9, the line and
the simplex 3 points, ESPRO 3 samples of each of 3 SPRO simplexes (3 vertices, 1 epoch per vertex).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "analysis"))   # the scripts import their sibling `common` as a script does

from analysis import ensembles as script  # noqa: E402

#: the settings of tests/test_compare.py
TINY = ["--train-subset", "64", "--eval-subset", "32", "-b", "16", "--epochs", "2", "--bn-batches", "1",
        "--samples", "3", "--log-interval", "1000", "--eval-batch-size", "32", "--jobs", "1"]
FAST = ["--threads", "1", "--device", "cpu"]


def _compare_main():
    spec = importlib.util.spec_from_file_location("recipe_compare_for_ensembles", REPO / "recipes" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny compare run, and ensembles.py run on it once with its defaults (the compare's own data)."""
    import os

    os.environ["SUBSPACES_OFFLINE"] = "1"
    before = torch.get_num_threads()
    root = tmp_path_factory.mktemp("ensembles")
    cmp = root / "cmp"
    try:
        assert _compare_main()([*TINY, "--output", str(cmp)]) == 0
        png = root / "fig" / "ensembles.png"
        rc = script.main([str(cmp), "--output", str(png), *FAST])
    finally:
        torch.set_num_threads(before)
    return {"cmp": cmp, "png": png, "rc": rc, "root": root}


def _outputs(png: Path) -> dict:
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(png.with_suffix(".json").read_text())


def _evaluation(cmp: Path, r: int = 0) -> dict:
    return json.loads((cmp / f"seed{r}" / "evaluation.json").read_text())["evaluation"]["rows"]


def test_writes_png_and_json(run):
    assert run["rc"] == 0
    data = _outputs(run["png"])
    assert data["eval_count"] == 32 and data["replicate"] == 0 and data["seed"] == 42
    assert data["budgets"] == [1, 2, 3]
    assert set(data["by_size"]) == {"Ind", "SSE", "FGE", "Line 1B", "Simplex 1B", "ESPRO"}
    assert set(data["reliability"]) == {"single", "ensemble"}


def test_size_curves_have_one_point_per_member(run):
    data = _outputs(run["png"])
    rows = _evaluation(run["cmp"])
    expected = {"Ind": rows["Ind"]["3B"]["members"], "SSE": rows["SSE"]["3B"]["members"], "FGE": rows["FGE"]["3B"]["members"],
                "Line 1B": 3, "Simplex 1B": 3, "ESPRO": rows["ESPRO"]["3B"]["members"]}
    assert expected["Ind"] == 3 and expected["SSE"] == 6 and expected["FGE"] == 9 and expected["ESPRO"] == 9
    for name, n in expected.items():
        curve = data["by_size"][name]
        assert curve["members"] == n, name
        for key in ("error", "acc", "nll", "ece", "brier"):
            assert len(curve[key]) == n, (name, key)
        assert curve["error"] == pytest.approx([100 * (1 - a) for a in curve["acc"]])
    # the budget marks are the compare's member counts
    assert data["by_size"]["FGE"]["budget_sizes"] == {b: rows["FGE"][b]["members"] for b in ("1B", "2B", "3B")}
    assert data["by_size"]["ESPRO"]["budget_sizes"] == {"1B": 3, "2B": 6, "3B": 9}
    assert data["by_size"]["ESPRO"]["family"] == "ESPRO"


def test_last_size_point_is_the_full_ensemble(run):
    """The k-th point of a size curve is the ensemble of the first k members: the last one is the compare's full ensemble."""
    data = _outputs(run["png"])
    rows = _evaluation(run["cmp"])
    full = {"Ind": rows["Ind"]["3B"], "SSE": rows["SSE"]["3B"], "FGE": rows["FGE"]["3B"],
            "Line 1B": rows["Line 3 points (ens.)"]["1B"], "Simplex 1B": rows["Simplex 3 samples (ens.)"]["1B"],
            "ESPRO": rows["ESPRO"]["3B"]}
    for name, theirs in full.items():
        curve = data["by_size"][name]
        for key in ("acc", "nll", "ece", "brier"):
            assert curve[key][-1] == pytest.approx(theirs[key], abs=1e-5), (name, key)
    # and every budget's prefix is the compare's ensemble at that budget
    for name in ("SSE", "Ind", "ESPRO"):
        for b, n in data["by_size"][name]["budget_sizes"].items():
            assert data["by_size"][name]["nll"][n - 1] == pytest.approx(rows[name][b]["nll"], abs=1e-5), (name, b)
    # single networks and other ensembles recomputed from the recorded probabilities agree too
    for row, b in (("SWA", "3B"), ("Line midpoint", "1B"), ("Line endpoints (ens.)", "1B"), ("Simplex centre", "1B"),
                   ("Simplex vertices (ens.)", "1B"), ("ESPRO", "2B")):
        assert data["points"][row][b]["nll"] == pytest.approx(rows[row][b]["nll"], abs=1e-5), row
    assert data["points"]["ESPRO"]["2B"]["members"] == 6
    # "Single network": the mean of the Ind networks' own metrics, each with its BatchNorm recomputed
    single = data["points"]["Single network"]["1B"]
    assert single["members"] == 1
    for key in ("acc", "nll", "ece", "brier"):
        assert single[key] == pytest.approx(rows["Single network"]["1B"][key], abs=1e-5), key
    assert data["check"]["compared"] >= 25 and data["check"]["max_abs_diff"] < 1e-5


def test_budget_numbers_are_the_compare_results(run):
    data = _outputs(run["png"])
    table = json.loads((run["cmp"] / "results.json").read_text())["table"]
    assert set(data["budget"]) == set(table)
    for row, per in table.items():
        for b, cell in per.items():
            assert data["budget"][row][b]["error"] == pytest.approx(cell["error"])
            assert data["budget"][row][b]["nll_std"] == pytest.approx(cell["nll_std"])
            assert data["budget"][row][b]["cost"] == pytest.approx(cell["cost"])
    assert {"Line endpoints (ens.)", "Simplex vertices (ens.)", "ESPRO"} <= set(data["budget"])
    # ESPRO pays for its SPRO epochs: 2 added vertices x 1 epoch / B = 2 epochs -> cost k x 2B
    assert data["budget"]["ESPRO"]["2B"]["cost"] == pytest.approx(4.0) and data["budget"]["Ind"]["2B"]["cost"] == pytest.approx(2.0)
    assert data["replicates"] == 1 and data["budget_source"] == "results.json"


def test_reliability_bins(run):
    data = _outputs(run["png"])
    table = json.loads((run["cmp"] / "results.json").read_text())["table"]
    for kind, rel in data["reliability"].items():
        assert rel["n_bins"] == 15 and len(rel["count"]) == 15 and len(rel["edges"]) == 16
        assert sum(rel["count"]) == data["eval_count"] == 32, kind
        occupied = [c > 0 for c in rel["count"]]
        ece = sum(c / 32 * abs(g) for c, g, o in zip(rel["count"], rel["gap"], occupied) if o)
        assert rel["ece"] == pytest.approx(ece, abs=1e-9)
        assert rel["ece"] == pytest.approx(rel["ece_metrics"], abs=1e-5)   # torchmetrics' binning: no confidence of 1.0 here
        # the bins' accuracies give back the model's accuracy
        acc = sum(c * a for c, a, o in zip(rel["count"], rel["accuracy"], occupied) if o) / 32
        assert 100 * (1 - acc) == pytest.approx(rel["error"], abs=1e-6)
    # best = the lowest mean error at the largest budget, among single networks / ensembles
    assert data["reliability"]["single"]["row"] == "SWA" and data["reliability"]["single"]["budget"] == "3B"
    ens = data["reliability"]["ensemble"]
    assert ens["budget"] == "3B" and ens["row"] in ("Ind", "SSE", "FGE", "ESPRO")
    assert table[ens["row"]]["3B"]["error"] == min(table[r]["3B"]["error"] for r in ("Ind", "SSE", "FGE", "ESPRO"))


def test_reliability_function():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.3, 0.7], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1, 1])
    rel = script.reliability(probs, labels, n_bins=5)
    assert rel["count"] == [0, 0, 1, 1, 2]    # 0.5 -> [0.4, 0.6), 0.7 -> [0.6, 0.8), 0.9 and 1.0 -> [0.8, 1] (closed)
    assert rel["accuracy"][4] == pytest.approx(0.5) and rel["confidence"][4] == pytest.approx(0.95)
    assert rel["accuracy"][2] == 0.0           # 0.5 / 0.5: the tie goes to class 0
    assert rel["gap"][3] == pytest.approx(-0.3)
    assert rel["ece"] == pytest.approx((0.5 * 1 + 0.3 * 1 + 0.45 * 2) / 4)
    assert rel["accuracy"][0] is None and rel["gap"][0] is None


def test_pick_best():
    table = {"Single network": {"1B": {"error": 10.0, "members": 1}},
             "Ind": {"1B": {"error": 11.0, "members": 1}, "2B": {"error": 9.0, "members": 2}},
             "SWA": {"1B": {"error": 12.0, "members": 2}, "2B": {"error": 11.0, "members": 5}},
             "FGE": {"1B": {"error": 8.0, "members": 2}, "2B": {"error": 9.5, "members": 5}},
             "Line midpoint": {"1B": {"error": 5.0, "members": 1}}}
    assert script.pick_best(table, singles=True) == ("SWA", "2B")        # the largest budget wins over a lower 1B error
    assert script.pick_best(table, singles=False) == ("Ind", "2B")
    assert script.pick_best({"Ind": {"1B": {"error": 1.0, "members": 1}}}, singles=False) is None


def test_without_results_json_and_with_another_eval_subset(run, tmp_path):
    """A compare still running its later replicates has no results.json: the evaluated replicates make the table."""
    cmp = tmp_path / "cmp"
    shutil.copytree(run["cmp"], cmp)
    (cmp / "results.json").unlink()
    png = tmp_path / "out.png"
    before = torch.get_num_threads()
    try:
        assert script.main([str(cmp), "--eval-subset", "16", "--output", str(png), *FAST]) == 0
    finally:
        torch.set_num_threads(before)
    data = _outputs(png)
    assert data["eval_count"] == 16 and data["by_size"]["FGE"]["members"] == 9
    assert sum(data["reliability"]["ensemble"]["count"]) == 16
    assert data["check"]["compared"] == 0       # other data: not compared with the compare's numbers
    assert "evaluation.json" in data["budget_source"]
    assert data["budget"]["FGE"]["3B"]["error"] == pytest.approx(_outputs(run["png"])["budget"]["FGE"]["3B"]["error"])


@pytest.mark.parametrize("argv, message", [
    (["{root}/missing"], "does not exist"),
    (["{cmp}/seed0/ind0"], "not a compare run"),
    (["{cmp}/seed0"], "not a compare run"),
    (["{cmp}", "--seed", "3"], "no evaluated replicate 3"),
    (["{cmp}", "--seed", "-1"], ">= 0"),
    (["{cmp}", "--threads", "0"], "--threads"),
    (["{cmp}", "--batch-size", "0"], "--batch-size"),
    (["{cmp}", "--eval-subset", "20000"], "--eval-subset 20000 exceeds"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, argv, message):
    argv = [a.format(root=run["root"], cmp=run["cmp"]) for a in argv]
    before = torch.get_num_threads()
    try:
        rc = script.main([*argv, "--output", str(tmp_path / "x.png")])
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_broken_member_is_one_line(run, tmp_path, capsys):
    cmp = tmp_path / "cmp"
    shutil.copytree(run["cmp"], cmp, ignore=shutil.ignore_patterns("checkpoint*", "pretrain"))
    shutil.rmtree(cmp / "seed0" / "sse" / "snapshots")
    assert script.main([str(cmp), "--output", str(tmp_path / "x.png"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "snapshots" in err and len(err.splitlines()) == 1, err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "COMPARE_DIR" in out or "compare_dir" in out
    assert "reliability" in out


def test_single_network_is_drawn_as_ind0(run, tmp_path):
    """Without SWA the best single network at the largest budget it reaches (1B) may be the compare's
    "Single network" (the Ind networks' mean): its diagram is ind0's, the first point of the Ind curve."""
    cmp = tmp_path / "cmp"
    shutil.copytree(run["cmp"], cmp, ignore=shutil.ignore_patterns("checkpoint*", "pretrain"))
    results = json.loads((cmp / "results.json").read_text())
    for row in ("SWA", "Line midpoint", "Simplex centre"):
        del results["table"][row]
    (cmp / "results.json").write_text(json.dumps(results))
    png = tmp_path / "out.png"
    before = torch.get_num_threads()
    try:
        assert script.main([str(cmp), "--output", str(png), *FAST]) == 0
    finally:
        torch.set_num_threads(before)
    data = _outputs(png)
    single = data["reliability"]["single"]
    assert single["row"] == "Single network" and single["budget"] == "1B" and "ind0" in single["label"]
    assert single["error"] == pytest.approx(data["by_size"]["Ind"]["error"][0], abs=1e-6)
    assert sum(single["count"]) == 32
