"""Smoke test of analysis/bench.py: tiny settings on timm's test_resnet; checks the JSON's shape
and that the numbers are positive. Never asserts speed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "analysis" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("subspaces_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_help_lists_the_flags(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--models", "--batch-size", "--reps", "--warmup", "--img-size", "--device", "--amp", "--threads", "--output"):
        assert flag in text


def test_smoke_run_writes_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--models", "test_resnet", "--batch-size", "4", "--img-size", "32", "--reps", "2", "--warmup", "1",
        "--eval-reps", "1", "--points", "2", "--members", "2", "--threads", "1", "--device", "cpu",
        "--output", str(out),
    ]
    returned = bench.main(argv)
    data = json.loads(out.read_text())
    assert data["meta"]["reps"] == 2 and data["meta"]["batch_size"] == 4
    assert returned["results"].keys() == data["results"].keys() == {"test_resnet"}
    res = data["results"]["test_resnet"]
    assert set(res) == {"train", "memory", "points", "ensemble"}

    variants = ("plain", "connect", "line", "simplex")
    assert set(res["train"]) == set(variants)
    for v in variants:
        r = res["train"][v]
        for key in ("median_ms", "p25_ms", "p75_ms", "min_ms", "ratio", "paired_ratio", "cpu_median_ms", "cpu_ratio", "trainable_parameters"):
            assert _positive(r[key]), (v, key, r[key])
        assert r["reps"] == 2
    assert res["train"]["plain"]["ratio"] == 1.0
    assert [res["train"][v]["num_anchors"] for v in variants] == [1, 3, 2, 3]
    plain_params = res["train"]["plain"]["trainable_parameters"]
    assert res["train"]["connect"]["trainable_parameters"] == plain_params        # middle anchor only
    assert res["train"]["line"]["trainable_parameters"] == 2 * plain_params
    assert res["train"]["simplex"]["trainable_parameters"] == 3 * plain_params
    assert set(res["train"]["plain"]["floor_primitives_ms"]) == {"read", "copy", "optimizer"}
    for v in variants[1:]:   # the arithmetic floor: above 1, and ordered by the work it counts
        assert res["train"][v]["floor_ratio"] > 1 and _positive(res["train"][v]["floor_extra_ms"])
    assert res["train"]["simplex"]["floor_extra_ms"] > res["train"]["connect"]["floor_extra_ms"]

    assert set(res["memory"]) == set(variants)
    for v in variants:
        m = res["memory"][v]
        if m["method"] == "unavailable":   # not Linux
            continue
        for key in ("peak_bytes", "persistent_bytes", "analytic_bytes"):
            assert _positive(m[key]), (v, key, m[key])
    assert res["memory"]["simplex"]["analytic_bytes"] > res["memory"]["plain"]["analytic_bytes"]

    p = res["points"]
    assert p["points"] == 2
    assert p["floor_ratio"] > 1 and _positive(p["floor_extra_ms"])
    for key in ("curve_points", "plain_models"):
        assert _positive(p[key]["median_ms"]) and _positive(p[key]["ratio"])
    e = res["ensemble"]
    assert e["members"] == 2
    for key in ("ensemble", "separate_passes"):
        assert _positive(e[key]["median_ms"]) and _positive(e[key]["ratio"])


def test_arithmetic_floor_counts_reads_copies_and_optimiser_steps(bench):
    # connect: 3 anchors, 1 trainable -> 2 reads + 1 copy (mix) + 1 copy (backward)
    assert bench.arithmetic_floor_ms(3, 1, read_ms=1.0, copy_ms=10.0, optimizer_ms=100.0) == 22.0
    # line: 2 anchors, both trainable -> 1 read + 1 copy + 2 copies + 1 optimiser step
    assert bench.arithmetic_floor_ms(2, 2, read_ms=1.0, copy_ms=10.0, optimizer_ms=100.0) == 131.0
    # simplex of 3 -> 2 reads + 1 copy + 3 copies + 2 optimiser steps
    assert bench.arithmetic_floor_ms(3, 3, read_ms=1.0, copy_ms=10.0, optimizer_ms=100.0) == 242.0
