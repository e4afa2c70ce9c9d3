"""The library from Python alone: a line trained with a TrainConfig, a recipe run from its settings, no command line
(the README's examples)."""

from __future__ import annotations

import json
import re

import pytest
import timm

import subspaces as ss
from subspaces.data import build_datasets
from subspaces.errors import ConfigError
from subspaces.run_folder import RESOLVED_KEY, read_config


def test_a_line_trains_from_python_without_argparse(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    data = build_datasets("fashion-mnist", train_subset=128, eval_subset=64, in_chans=1)
    line = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    config = ss.TrainConfig(epochs=2, batch_size=32, lr=0.05, beta=1.0, bn_batches=2)
    trainer = ss.Trainer.create(config, line, data, output=tmp_path / "line")
    status = trainer.fit()
    results = trainer.evaluate_now(final=True)

    assert status == {"epochs_done": 2, "finished": True}
    assert trainer.updates == 2 * 4
    lines = [json.loads(ln) for ln in (tmp_path / "line" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and "centre" in lines[-1]["eval"]
    assert set(results) == {"centre", "anchor0", "anchor1"}
    assert all(0 <= m["acc"] <= 1 and m["count"] == 64 for m in results.values())
    # the anchors moved apart under the cos^2 of their layer weights, and a resume continues exactly there
    assert ss.cosine_penalty(trainer.unwrapped).item() < 0.5
    again = ss.Trainer.create(config, ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0), data,
                              output=tmp_path / "line")
    assert again.fit(resume=True) == {"epochs_done": 2, "finished": True} and again.updates == 8


@pytest.mark.parametrize("bad, message", [({"epochs": 0}, "--epochs must be >= 1"), ({"lr": -1.0}, "--lr must be > 0"),
                                          ({"volume_form": "cubic"}, "--volume-form 'cubic'"),
                                          ({"mixed_precision": "fp8"}, "--mixed-precision 'fp8'"),
                                          ({"checkpoint_hist": 1}, "--checkpoint-hist 1 is too small")])
def test_train_config_refuses_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        ss.TrainConfig(**bad)


def test_a_whole_recipe_runs_from_its_settings(tmp_path, monkeypatch):
    """``recipes/train.py``'s run from Python: settings in, results and a run folder out; the
    saved config.yaml reads back as the same settings."""
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    settings = ss.TrainRunConfig(model="test_resnet", subspace="line", beta=1.0, train_subset=128, eval_subset=64, epochs=1,
                                 batch_size=32, bn_batches=1, log_interval=1000, output=str(tmp_path / "run"), export_format="safetensors")
    out = ss.run_training(settings)
    assert out["finished"] and set(out["results"]) == {"centre", "anchor0", "anchor1"}
    saved = read_config(str(tmp_path / "run" / "config.yaml"))
    assert saved.pop(RESOLVED_KEY)["img_size"] == 28
    assert ss.TrainRunConfig.from_mapping(saved) == settings
    assert (tmp_path / "run" / "exports" / "centre.safetensors").exists()


@pytest.mark.parametrize("cls, values, message", [
    ("TrainRunConfig", {"subspace": "line", "degree": 3}, "--degree applies to --subspace bezier"),
    ("TrainRunConfig", {"model": "resnet81"}, "unknown timm model 'resnet81'"),
    ("TrainRunConfig", {"dataset": "fashionmnist"}, "did you mean fashion-mnist"),
    ("ConnectConfig", {"model_a": "a", "model_b": "b", "sched": "cosine"}, "--sched cosine: curve fitting uses [G]'s schedule"),
    ("FGEConfig", {"checkpoint": "a"}, "give the cycle length"),
    ("FGEConfig", {"checkpoint": "a", "cycle": 2, "lr_max": 0.001, "lr_min": 0.01}, "alpha1 > alpha2"),
    ("ComplexConfig", {"checkpoints": ["a"]}, "a complex joins at least 2 modes"),
    ("CompareConfig", {"jobs": -1}, "--jobs must be >= 0"),
])
def test_settings_refuse_what_cannot_work(cls, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        getattr(ss, cls)(**values)


def test_settings_from_a_mapping_name_the_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown key 'epoch' \(did you mean epochs\?\)"):
        ss.TrainRunConfig.from_mapping({"epoch": 3})
    member = ss.CompareConfig(seed=7).member("runs/x", seed=8, epochs=3, subspace="line", beta=1.0)
    assert isinstance(member, ss.TrainRunConfig) and (member.seed, member.epochs, member.model, member.batch_size) == (8, 3, "test_resnet", 64)
