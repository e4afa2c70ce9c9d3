"""Smoke test of analysis/bench.py: tiny settings on timm's test_resnet; checks the JSON's shape
and that the numbers are positive. Never asserts speed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
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


def test_points_workload_times_the_evaluation_pass_too(bench, tmp_path):
    out = bench.main(["--models", "test_resnet", "--batch-size", "4", "--img-size", "32", "--eval-reps", "1", "--points", "3",
                      "--eval-batches", "2", "--threads", "1", "--device", "cpu", "--workloads", "points"])
    ev = out["results"]["test_resnet"]["points"]["eval"]
    assert ev["batches"] == 2 and ev["floor_ratio"] > 1
    for key in ("curve_eval", "plain_eval"):
        assert _positive(ev[key]["median_ms"]) and _positive(ev[key]["ratio"])


def test_gram_workload_times_the_volume_term_both_ways(bench, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))   # its interval comes from the sibling loop_bench, as when run as a script
    out = bench.main(["--models", "test_resnet", "--workloads", "gram", "--reps", "2", "--warmup", "1", "--threads", "1",
                      "--device", "cpu"])
    g = out["results"]["test_resnet"]["gram"]
    assert g["parameters_per_vertex"] > 0
    for key in ("stacked", "blocked"):
        assert _positive(g[key]["median_ms"]) and g[key]["reps"] == 2
    assert g["stacked"]["ratio"] == 1.0
    lo, hi = g["ratio_interval"]
    assert 0 < lo <= hi


def test_pool_both_times_every_subspace_without_the_pool_too(bench):
    out = bench.main(["--models", "test_resnet", "--variants", "plain,line", "--workloads", "train", "--pool", "both",
                      "--batch-size", "4", "--reps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"])
    train = out["results"]["test_resnet"]["train"]
    assert {"plain", "line", "line_nopool"} <= set(train)
    assert _positive(train["line_nopool"]["pool_on_over_off"]) and train["line_nopool"]["num_anchors"] == 2


# ---------------------------------------------------------------------------------------- the CPU buffer pool
def _line_steps(steps: int = 2):
    import timm
    import torch
    import torch.nn.functional as F

    import subspaces as ss

    torch.manual_seed(0)
    line = ss.Line(timm.create_model("test_resnet", num_classes=10), seed=0).train()
    opt = torch.optim.SGD(line.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    pointers = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(line(x), y).backward()
        opt.step()
        pointers.append({name: pool.storages[-1].data_ptr() for name, pool in line.__dict__.get("_pools", {}).items() if -1 in pool.storages})
    return line, pointers


def test_the_buffer_pool_is_on_and_reuses_the_mixed_weights_between_steps():
    """Fails when the pooled fast path silently stops being taken."""
    import torch

    from subspaces import subspace as core

    assert callable(getattr(torch._C, "_storage_Use_Count", None)), "this torch lacks the call the pool needs: see docs/performance.md"
    assert core.POOLING, "torch has _storage_Use_Count but the pool is off"
    line, pointers = _line_steps(3)
    assert pointers[0], "no pooled mixed weights after a CPU training step: the pooled path was not taken"
    assert pointers[1] == pointers[2], "the pool handed out fresh storage although nothing else held the last one"
    module, _, attr = line.subspace_parameter_names()[0].rpartition(".")
    bound = dict(line.model.named_modules())[module].__dict__[attr]   # what the model runs with is the pooled storage
    assert bound.untyped_storage().data_ptr() in set(pointers[2].values())


def test_a_torch_without_the_pool_call_warns_and_turns_the_pool_off(monkeypatch):
    import torch

    from subspaces import subspace as core
    from subspaces.buffer_pool import pooling_available

    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    with pytest.warns(RuntimeWarning, match="buffer pool is off"):
        assert pooling_available() is False
    monkeypatch.setattr(core, "POOLING", False)
    _, pointers = _line_steps(2)   # still trains, without pooled buffers
    assert pointers == [{}, {}]


# ---------------------------------------------------------------------------------------- points mixed once per pass
def test_evaluation_mixes_each_point_once_per_pass_with_the_same_bits(monkeypatch):
    import timm
    import torch

    import subspaces as ss
    from subspaces.subspace import Subspace

    torch.manual_seed(0)
    curve = ss.Bezier.connect(timm.create_model("test_resnet", num_classes=10), timm.create_model("test_resnet", num_classes=10), seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)) for _ in range(3)]
    coeffs = ss.point_coefficients(curve, [0.0, 0.3, 0.7, 1.0])
    calls = []
    original = Subspace._mix
    monkeypatch.setattr(Subspace, "_mix", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    states = ss.bn_statistics(curve, coeffs, batches)
    cached = ss.evaluate_coefficients(curve, coeffs, batches, bn_states=states)
    assert len(calls) == 2 * 4   # 4 points, once each per pass (BN pass, evaluation pass), not once per batch
    calls.clear()
    states_b = ss.bn_statistics(curve, coeffs, batches, mix_cache_bytes=0)
    per_batch = ss.evaluate_coefficients(curve, coeffs, batches, bn_states=states_b, mix_cache_bytes=0)
    assert len(calls) == 2 * 4 * 3   # no budget: mixed once per batch
    assert torch.equal(cached.loss, per_batch.loss) and torch.equal(cached.acc, per_batch.acc)
    for a, b in zip(states.states, states_b.states):
        for name in a:
            for buf in a[name]:
                assert torch.equal(a[name][buf], b[name][buf])
    with curve.at(0.3):   # after the passes, forwards still mix their point
        curve.eval()(batches[0][0])


# ---------------------------------------------------------------------------------------- loop bench and GPU check
def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "analysis" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"subspaces_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_loop_bench_times_trainer_and_minimal_loop(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    loop = _load("loop_bench")
    out = loop.main(["--models", "test_resnet", "--reps", "1", "--warmup", "0", "--train-size", "8", "--batch-size", "4",
                     "--device", "cpu", "--diagnose", "--count-ops", "--output", str(tmp_path / "loop.json")])
    res = json.loads((tmp_path / "loop.json").read_text())["results"]["test_resnet"]
    assert out["meta"]["steps_per_epoch"] == 2 and out["meta"]["threads"] == 1
    assert set(res["trainer_over_minimal"]) == {"plain", "line", "plain (cached unwrap)", "line (cached unwrap)"}
    for r in res["trainer_over_minimal"].values():
        assert _positive(r["ratio"]) and _positive(r["cpu_ratio"])
        assert r["ratio_ci95"] == [r["ratio"], r["ratio"]]   # one round: nothing to resample
        assert r["verdict"] in ("met", "missed") and r["paired_verdict"] in ("met", "missed") and r["target"] == 1.02
        assert math.isfinite(r["cpu_extra_us_per_step"])
    assert set(res["loadavg_1min"]) == {"min", "median", "max"}
    ops = res["aten_ops"]
    assert set(ops["per_step"]) == {f"{r}:{v}" for r in ("trainer", "minimal", "trainer_cached_unwrap") for v in ("plain", "line")}
    assert ops["per_step"]["minimal:plain"] > 100
    # the Trainer's one kernel a step (its predictions), and one in its one check-in (the first non-finite loss)
    assert ops["trainer:line extra per epoch"]["aten::argmax"] == 2 + 1


@pytest.fixture(scope="module")
def loop_bench():
    yield _load("loop_bench")
    sys.modules.pop("subspaces_loop_bench", None)


def test_loop_bench_linear_model_is_one_layer_on_the_flattened_image(loop_bench):
    model = loop_bench.build_model(loop_bench.LINEAR, num_classes=10, in_chans=3, img_size=8)
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear"] and model[1].in_features == 3 * 8 * 8


def test_bootstrap_interval_of_an_exact_ratio_is_that_ratio(loop_bench):
    b = np.random.default_rng(1).uniform(0.1, 0.3, 50)
    low, high = loop_bench.bootstrap_interval(1.1 * b, b, resamples=500)
    assert low == pytest.approx(1.1, abs=1e-12) and high == pytest.approx(1.1, abs=1e-12)
    assert loop_bench.verdict((low, high), 1.02) == "missed"
    assert loop_bench.verdict(loop_bench.bootstrap_interval(b, b, resamples=500), 1.02) == "met"


def test_bootstrap_interval_covers_the_true_ratio_and_pairing_narrows_it(loop_bench):
    """Rounds whose speed varies 2x (a shared machine's load) hit both loops alike: the paired
    ratio's interval is far narrower than the ratio of medians', both contain the true 1.05."""
    rng = np.random.default_rng(0)
    load = rng.uniform(1.0, 2.0, 400)                     # per round, shared by both
    b = 0.2 * load * rng.normal(1.0, 0.01, 400)
    a = 1.05 * 0.2 * load * rng.normal(1.0, 0.01, 400)
    low, high = loop_bench.bootstrap_interval(a, b, resamples=2000)
    p_low, p_high = loop_bench.bootstrap_interval(a, b, loop_bench.median_paired_ratio, resamples=2000)
    assert low < 1.05 < high and p_low < 1.05 < p_high
    assert p_high - p_low < (high - low) / 3
    assert p_high - p_low < 0.01
    assert loop_bench.verdict((p_low, p_high), 1.02) == "missed" and loop_bench.verdict((p_low, p_high), 1.06) == "met"
    assert loop_bench.verdict((1.01, 1.03), 1.02) == "unresolved"


def test_bootstrap_interval_needs_paired_rounds(loop_bench):
    with pytest.raises(ValueError, match="equal lengths"):
        loop_bench.bootstrap_interval([1.0, 2.0], [1.0])


def test_gpu_check_dry_run_on_cpu_writes_every_part(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    check = _load("gpu_check")
    out_path = tmp_path / "gpu.json"
    check.main(["--cpu", "--output", str(out_path)])
    data = json.loads(out_path.read_text())
    assert data["meta"]["mode"] == "cpu dry run"
    for part in ("step_bench", "trainer_sync", "compile"):
        assert data[part].get("error") is None, data[part].get("traceback")
    assert set(data["step_bench"]["models"]) == {"test_resnet", "test_vit"}
    for res in data["step_bench"]["models"].values():
        assert set(res["targets"]) == {"connect", "line", "simplex"} and _positive(res["line"]["ratio"])
    assert data["trainer_sync"]["counted"] is False and data["trainer_sync"]["steps"] == 4
    comp = data["compile"]
    assert comp["met"] and comp["new_frames_after_warmup"] == 0 and comp["points_drawn"] == comp["steps"]
    compiled = data["trainer_compile"]
    assert compiled.get("error") is None, compiled.get("traceback")
    assert set(compiled["models"]["test_resnet"]) >= {"plain", "line", "simplex"}
    assert _positive(compiled["models"]["test_resnet"]["line"]["ratio"])


def test_compile_bench_against_channels_last_times_an_eager_channels_last_trainer(tmp_path, monkeypatch):
    """``--against channels-last``: the treated runner trains eagerly in channels-last layout
    (its convolutions see channels-last weights), and the ratios are reported as for compile."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH.parent))
    bench = _load("compile_bench")
    seen: list[bool] = []
    original = torch.nn.Conv2d.forward

    def spy(self, x):
        seen.append(self.weight.is_contiguous(memory_format=torch.channels_last))
        return original(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    out = bench.main(["--against", "channels-last", "--models", "test_resnet", "--variants", "plain,line", "--reps", "1",
                      "--warmup", "0", "--train-size", "8", "--batch-size", "4", "--output", str(tmp_path / "cl.json")])
    assert out["meta"]["against"] == "channels-last"
    for v in ("plain", "line"):
        assert _positive(out["results"]["test_resnet"][v]["ratio"])
    assert True in seen and False in seen, "the eager runners run contiguous weights, the treated ones channels-last"
    sys.modules.pop("subspaces_compile_bench", None)
