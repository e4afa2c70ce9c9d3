"""The epoch's training loss and accuracy (``Trainer.history``) equal the per-step values summed
by hand: the step leaves its loss, predictions and labels on the device and the check-ins weigh,
compare and sum them, also when an interval holds batches of different sizes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import subspaces as ss
from subspaces import training
from subspaces.data import DataBundle
from subspaces.preemption import StopSignals

TRAIN, BATCH, INTERVAL = 70, 16, 3   # 5 steps (16, 16, 16 | 16, 6): checks at steps 3 and 5


@pytest.fixture
def data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(TRAIN, 1, 16, 16, generator=g), torch.randint(0, 4, (TRAIN,), generator=g))
    return DataBundle(train=ds, eval=ds, holdout=None, bn=ds, num_classes=4, in_chans=1, img_size=16, mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("shape", ["plain", "line"])
def test_history_holds_the_sums_of_the_steps(tmp_path, data, monkeypatch, shape):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    net = model if shape == "plain" else ss.Line(model, seed=0)
    config = ss.TrainConfig(epochs=2, batch_size=BATCH, lr=0.05, log_interval=INTERVAL)
    trainer = ss.Trainer.create(config, net, data, output=tmp_path)
    steps: list[tuple[float, int, int]] = []   # (loss, correct, size) of each step, read right away
    original = training.Trainer._loss

    def recording(self, logits, y):
        value = original(self, logits, y)
        steps.append((value.item(), int((logits.argmax(-1) == y).sum()), y.shape[0]))
        return value

    monkeypatch.setattr(training.Trainer, "_loss", recording)
    trainer.setup()   # as fit does, then two epochs without evaluation or checkpoints
    for epoch in range(2):
        trainer.train_epoch(epoch, StopSignals(announce=False))
    assert [n for _, _, n in steps] == [16, 16, 16, 16, 6] * 2
    for epoch, record in enumerate(trainer.history):
        mine = steps[5 * epoch: 5 * epoch + 5]
        assert record["train_loss"] == pytest.approx(sum(loss * n for loss, _, n in mine) / TRAIN, rel=1e-6)
        assert record["train_acc"] == sum(c for _, c, _ in mine) / TRAIN
