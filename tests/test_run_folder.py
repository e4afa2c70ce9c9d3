"""The start of a run and the inputs it refuses: one writer per folder (a stale lock never
blocks), precision that runs or says so, numeric flags checked against the model and the data,
the resolved input printed and saved; and the float16 math of the regularisers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import subspaces as ss
from helpers import TINY, recipe_cmd, recipe_env, run
from subspaces.errors import ConfigError
from subspaces.regularizers import cosine_penalty, log_volume, volume_penalty
from subspaces.run_folder import make_accelerator, run_lock
from subspaces.settings import TrainConfig

HOLDER = """
import sys, time
from pathlib import Path
from subspaces.run_folder import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=recipe_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"being written by another run \(pid \d+ on .*\).*another --output"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()   # the file stays; the kernel dropped the lock with the process
    with run_lock(tmp_path):
        pass


def test_a_recipe_into_a_folder_in_use_gives_one_line(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        res = run(recipe_cmd("train.py", *TINY, "--epochs", "1", "--output", tmp_path / "run"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert res.rc == 2, res.explain()
    assert len(res.error_lines()) == 1 and "being written by another run" in res.stderr, res.explain()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 runs for real where an accelerator exists")
@pytest.mark.parametrize("source", ["flag", "launcher"])
def test_fp16_on_the_cpu_is_refused(source, monkeypatch):
    if source == "flag":
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
        config = TrainConfig(mixed_precision="fp16")
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        config = TrainConfig()
    with pytest.raises(ConfigError, match="fp16.*needs a GPU.*bf16"):
        make_accelerator(config)


def test_the_launchers_bf16_runs_and_is_recorded_with_the_resolved_input(tmp_path):
    env = {**recipe_env(), "ACCELERATE_MIXED_PRECISION": "bf16"}
    out = tmp_path / "bf16"
    cmd = recipe_cmd("train.py", "--subspace", "line", *TINY, "--epochs", "1", "--output", out)
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["mixed_precision"] == "bf16"
    assert saved["resolved"]["img_size"] == 28 and saved["resolved"]["in_chans"] == 1
    assert saved["resolved"]["mean"] == pytest.approx([0.2860], abs=1e-4)
    assert "input: fashion-mnist images at 28x28, 1 channel(s), mean [0.286], std [0.353]" in proc.stdout + proc.stderr
    # a run's own config.yaml, with its resolved block, is a valid -c file
    again = run(recipe_cmd("train.py", "-c", out / "config.yaml", "--mixed-precision", "no", "--epochs", "1", "--output", tmp_path / "again"))
    assert again.rc == 0, again.explain()


@pytest.mark.parametrize("flags, fragment", [
    (["--img-size", "2"], "--img-size 2 is too small for test_resnet: its stem reduces by 2"),
    (["-b", "512", "--train-subset", "100"], "--batch-size 512 x 1 process(es) is more than the 100 training images: use --batch-size <= 100"),
    (["--eval-subset", "20000"], "--eval-subset 20000 exceeds the 10000 examples available"),
])
def test_numeric_flags_beyond_the_model_or_the_data_give_one_line(flags, fragment, tmp_path):
    res = run(recipe_cmd("train.py", *TINY, *flags, "--epochs", "1", "--output", tmp_path / "run"))
    assert res.rc == 2 and len(res.error_lines()) == 1 and fragment in res.stderr, res.explain()


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regularisers_do_not_overflow_in_half_precision(dtype, device):
    """Sums of squares of real weights pass float16's 65504: the Gram must not be taken in it,
    neither under autocast (the CPU's, and a GPU's where there is one) nor for half anchors."""
    torch.manual_seed(0)
    simplex = ss.Simplex(timm.create_model("test_resnet", num_classes=3), vertices=3, seed=0).to(device)
    with torch.no_grad():
        for k in range(3):
            for t in simplex.anchors[k].values():
                t.mul_(40)
    expected = (simplex.gram(), cosine_penalty(simplex, pair=(0, 1)), log_volume(simplex), volume_penalty(simplex))
    assert expected[0].diagonal().min() > 65504
    with torch.autocast(device, dtype=dtype):
        got = (simplex.gram(), cosine_penalty(simplex, pair=(0, 1)), log_volume(simplex), volume_penalty(simplex))
    for value, reference in zip(got, expected):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=0)
    half = simplex.to(dtype)
    gram = half.gram()
    assert torch.isfinite(gram).all()
    torch.testing.assert_close(gram, expected[0], rtol=1e-2, atol=0)
    assert torch.isfinite(cosine_penalty(half, pair=(0, 1))) and torch.isfinite(log_volume(half))


def test_log_with_tensorboard_gets_the_metrics_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    res = run(recipe_cmd("train.py", "--subspace", "line", *TINY, "--epochs", "2", "--log-interval", "2",
                         "--log-with", "tensorboard", "--output", out))
    assert res.rc == 0, res.explain()
    events = sorted((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out) for p in out.rglob("*"))
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        scalars.update({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    jsonl = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_acc", "lr", "samples_per_s"):
        assert key in scalars, sorted(scalars)
    assert any(tag.startswith("eval/") for tag in scalars), sorted(scalars)
    # the per-epoch values are those of metrics.jsonl, at the update the epoch ended on
    last = jsonl[-1]
    at_end = [v for s, v in scalars["train_loss"] if s == last["updates"]]
    assert pytest.approx(last["train_loss"], rel=1e-6) in at_end, (last, scalars["train_loss"])
    assert len(scalars["train_loss"]) > len(jsonl)   # per log interval too
