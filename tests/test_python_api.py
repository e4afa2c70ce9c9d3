"""The library from Python alone: a line trained with a TrainConfig, no command line (the README's example)."""

from __future__ import annotations

import json

import pytest
import timm

import subspaces as ss
from subspaces.data import build_datasets
from subspaces.errors import ConfigError


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


@pytest.mark.parametrize("bad, message", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"volume_form": "cubic"}, "volume_form"),
                                          ({"mixed_precision": "fp8"}, "mixed_precision"), ({"checkpoint_hist": 1}, "checkpoint_hist")])
def test_train_config_refuses_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        ss.TrainConfig(**bad)
