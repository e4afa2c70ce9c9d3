"""analysis/paired.py: paired differences between rows of finished comparisons."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import recipe_env
from subspaces.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _tool():
    if str(REPO / "analysis") not in sys.path:   # as `python analysis/paired.py` has it: its sibling claims.py importable
        sys.path.insert(0, str(REPO / "analysis"))
    spec = importlib.util.spec_from_file_location("paired_tool", REPO / "analysis" / "paired.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, labels: torch.Tensor, rows: dict[str, torch.Tensor], replicates: int = 1) -> Path:
    for r in range(replicates):
        (folder / f"seed{r}").mkdir(parents=True)
        tensors = {"val/labels": labels, **{f"val/{name}": p for name, p in rows.items()}}
        save_file(tensors, str(folder / f"seed{r}" / "predictions.safetensors"))
    return folder


def _onehot(pred: torch.Tensor, classes: int = 3, confidence: float = 0.9) -> torch.Tensor:
    p = torch.full((len(pred), classes), (1 - confidence) / (classes - 1))
    p[torch.arange(len(pred)), pred] = confidence
    return p


def test_a_known_difference_between_two_runs_is_measured_and_decided(tmp_path):
    n = 400
    labels = torch.arange(n) % 3
    wrong = (labels + 1) % 3
    a_pred = torch.where(torch.arange(n) < 120, wrong, labels)   # 30 % error
    b_pred = torch.where(torch.arange(n) < 40, wrong, labels)    # 10 % error, wrong only where a is
    run_a = _run(tmp_path / "a", labels, {"Ind@1B": _onehot(a_pred)})
    run_b = _run(tmp_path / "b", labels, {"Ind@1B": _onehot(b_pred), "FGE@1B": _onehot(a_pred)})
    tool = _tool()
    res = tool.compare_rows(run_a, "Ind@1B", run_b, "Ind@1B", "val")
    assert res["error"]["a"] == pytest.approx(30.0) and res["error"]["b"] == pytest.approx(10.0)
    d = res["error"]["difference"]
    assert d["value"] == pytest.approx(-20.0) and d["hi"] < 0 and res["error"]["verdict"] == "held"
    same = tool.compare_rows(run_a, "Ind@1B", run_b, "FGE@1B", "val")
    assert same["error"]["difference"]["value"] == 0 and same["error"]["verdict"] == "not resolved at this scale"


def test_runs_on_other_images_and_unknown_rows_are_refused_with_one_line(tmp_path):
    labels = torch.arange(30) % 3
    run_a = _run(tmp_path / "a", labels, {"Ind@1B": _onehot(labels)})
    run_b = _run(tmp_path / "b", labels.flip(0), {"Ind@1B": _onehot(labels)})
    tool = _tool()
    with pytest.raises(ConfigError, match="labels .* differ"):
        tool.compare_rows(run_a, "Ind@1B", run_b, "Ind@1B", "val")
    with pytest.raises(ConfigError, match="has no row 'SSE@1B'; it has: Ind@1B"):
        tool.compare_rows(run_a, "SSE@1B", run_a, "Ind@1B", "val")
    with pytest.raises(ConfigError, match="NAME@KB"):
        tool.compare_rows(run_a, "Ind", run_a, "Ind@1B", "val")
    res = subprocess.run([sys.executable, str(REPO / "analysis" / "paired.py"), str(run_a), "Ind@1B", str(run_a), "Ind@1B", "--split", "test"],
                         env=recipe_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "has no test split" in res.stderr and "Traceback" not in res.stderr
