"""The training step reads nothing back from the device: loss, accuracy and the non-finite check
are read every ``log_interval`` steps (``Trainer._check_in``) and at the epoch's end only.

On a GPU each host read (``Tensor.item``, ``bool``/``float``/``int`` of a tensor, ``.tolist()``,
``.cpu()``, ``.numpy()``) waits for the queue to drain. The CPU hides that cost, so these tests
count the calls instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import traceback

import pytest
import timm
import torch

import subspaces as ss
from subspaces import training
from subspaces.data import build_datasets
from subspaces.errors import NonFiniteLossError, Preempted

from helpers import checkpoint_progress

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
#: the data loader's own CPU work (indices, targets) happens before a batch reaches the device
DATA_LOADING = ("torch/utils/data/", "accelerate/data_loader.py", "subspaces/data.py", "subspaces/data_sources.py")
#: a subspace draws its point from a CPU generator and checks its coefficients there (Tensor[K],
#: never on the device), then copies them to the device without blocking
POINT_ON_HOST = ("_coeffs_for", "lerp_steps")
TRAIN, BATCH, INTERVAL = 160, 16, 4   # 10 steps per epoch: checks at steps 4, 8 and 10


class HostReads:
    """Counts host reads of tensors made while ``active``, with where they came from."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[str] = []

    @contextlib.contextmanager
    def patched(self, mp: pytest.MonkeyPatch):
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                if self.active:
                    self.active = False   # a read inside the counter (traceback formatting) is not the loop's
                    try:
                        stack = traceback.extract_stack()[:-1]
                        host_side = any(part in frame.filename for frame in stack for part in DATA_LOADING)
                        host_side = host_side or any(frame.name in POINT_ON_HOST for frame in stack)
                        if not host_side:
                            self.calls.append(f"{_name}: {''.join(traceback.format_list(stack[-5:]))}")
                    finally:
                        self.active = True
                return _original(tensor, *args, **kwargs)

            mp.setattr(torch.Tensor, name, counted)
        yield self

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


@pytest.fixture
def data(monkeypatch):
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    return build_datasets("fashion-mnist", train_subset=TRAIN, eval_subset=64, in_chans=1)


def _trainer(tmp_path, data, shape: str, **config):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    net = {"plain": lambda: model, "line": lambda: ss.Line(model, seed=0),
           "simplex": lambda: ss.Simplex(model, vertices=3, seed=0)}[shape]()
    settings = dict(epochs=1, batch_size=BATCH, lr=0.05, bn_batches=2, log_interval=INTERVAL)
    settings.update(config)
    return ss.Trainer.create(ss.TrainConfig(**settings), net, data, output=tmp_path / shape)


@pytest.mark.parametrize("shape, config", [("plain", {}), ("line", {"beta": 1.0}), ("simplex", {"volume_lambda": 1e-6, "samples_per_step": 2}),
                                           ("line", {"mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1})])
def test_no_host_read_between_log_intervals(tmp_path, data, monkeypatch, shape, config):
    reads, checks = HostReads(), []
    trainer = _trainer(tmp_path, data, shape, **config)
    train_epoch, check_in, evaluate_now, save = (training.Trainer.train_epoch, training.Trainer._check_in,
                                                 training.Trainer.evaluate_now, training.Trainer._save)

    def counting_epoch(self, *args, **kwargs):
        reads.active = True
        try:
            return train_epoch(self, *args, **kwargs)
        finally:
            reads.active = False

    def paused(method, record=None):
        def run(self, *args, **kwargs):
            if record is not None:
                record.append(self.updates)
            with reads.paused():
                return method(self, *args, **kwargs)
        return run

    monkeypatch.setattr(training.Trainer, "train_epoch", counting_epoch)
    monkeypatch.setattr(training.Trainer, "_check_in", paused(check_in, checks))
    monkeypatch.setattr(training.Trainer, "evaluate_now", paused(evaluate_now))
    monkeypatch.setattr(training.Trainer, "_save", paused(save))
    with reads.patched(monkeypatch):
        trainer.fit()
    steps = math.ceil(TRAIN / BATCH)
    assert checks == [4, 8, 10], "the loop reads the device at its log intervals and at the epoch's end"
    # the epoch's totals (one .tolist()) after the last step are the only read outside the checks
    assert len(reads.calls) == 1 and reads.calls[0].startswith("tolist"), "\n".join(reads.calls)
    assert trainer.updates == steps


def test_a_nan_between_checks_is_caught_and_named(tmp_path, data, monkeypatch):
    trainer = _trainer(tmp_path, data, "line", epochs=2)
    original, calls = training.Trainer._loss, [0]

    def loss(self, logits, y):
        calls[0] += 1
        value = original(self, logits, y)
        return value * float("nan") if calls[0] >= 10 + 6 else value   # step 6 of epoch 2

    monkeypatch.setattr(training.Trainer, "_loss", loss)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 6 \(update 16\), found at the check of step 8: "
                                                  r"the run stopped; the last good checkpoint .* is kept"):
        trainer.fit()
    progress = checkpoint_progress(tmp_path / "line")
    assert progress["epoch"] == 1 and progress["updates"] == 10


def test_a_stop_request_finishes_the_step_and_resumes_exactly(tmp_path, data):
    reference = _trainer(tmp_path / "ref", data, "line", epochs=2, beta=1.0)
    reference.fit()

    def preempt(trainer, update):
        if update == 13:   # step 3 of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = _trainer(tmp_path, data, "line", epochs=2, beta=1.0)
    stopped.on_update = preempt

    def outer_handler(signum, frame):   # a handler of the caller's, distinct from any default
        raise AssertionError("the outer handler must not receive the stop request")

    original = signal.signal(signal.SIGTERM, outer_handler)
    try:
        with pytest.raises(Preempted, match=r"SIGTERM at epoch 2, step 3 of 10 \(update 13\): checkpoint written"):
            stopped.fit()
        assert signal.getsignal(signal.SIGTERM) is outer_handler, "fit() did not restore the previous SIGTERM handler"
    finally:
        signal.signal(signal.SIGTERM, original)
    resumed = _trainer(tmp_path, data, "line", epochs=2, beta=1.0)
    assert resumed.fit(resume=True) == {"epochs_done": 2, "finished": True}
    for (name, a), (_, b) in zip(reference.unwrapped.state_dict().items(), resumed.unwrapped.state_dict().items()):
        if not name.endswith("_extra_state"):
            assert torch.equal(a, b), name
    assert [h["train_loss"] for h in reference.history][1] == resumed.history[-1]["train_loss"]
