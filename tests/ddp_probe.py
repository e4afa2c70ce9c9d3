"""A distributed run through the Python API, for tests/test_distributed.py (``torchrun ... tests/ddp_probe.py OUT``).

Each rank trains a line on a Fashion-MNIST slice whose dataset records the indices it serves
(the data loader's side, outside the training step), and writes ``OUT/probe_rank{r}.json``: the
indices, the examples its loop counted and a digest of its final weights. ``--term-at U`` sends
SIGTERM to rank 0 alone after update U: every rank must stop at the same step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import timm
import torch
from torch.utils.data import Dataset

import subspaces as ss
from subspaces import cli
from subspaces.data import build_datasets


class Recording(Dataset):
    def __init__(self, inner: Dataset) -> None:
        self.inner, self.served = inner, []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        self.served.append(int(index))
        return self.inner[index]


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not name.endswith("_extra_state"):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train", type=int, default=128)
    p.add_argument("--term-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = build_datasets("fashion-mnist", train_subset=args.train, eval_subset=64, in_chans=1, seed=42)
    data.train = Recording(data.train)
    torch.manual_seed(0)
    line = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    config = ss.TrainConfig(epochs=args.epochs, batch_size=32, lr=0.05, bn_batches=2, log_interval=1, seed=42)
    trainer = ss.Trainer.create(config, line, data, output=args.output)
    rank = trainer.accelerator.process_index

    def preempt(t: ss.Trainer, update: int) -> None:
        if update == args.term_at and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_update = preempt if args.term_at else None
    status = cli.run(lambda: trainer.fit(resume=args.resume))
    report = {"rank": rank, "status": status, "served": data.train.served, "examples_seen": trainer.examples_seen,
              "updates": trainer.updates, "weights_sha256": digest(trainer.unwrapped)}
    (Path(args.output) / f"probe_rank{rank}.json").write_text(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
