"""All-reduces per update with ``samples_per_step`` S, for tests/test_distributed_points.py
(``torchrun --nproc_per_node 2 tests/ddp_points_probe.py OUT``, gloo on the CPU).

Trains a line on a Fashion-MNIST slice through the Python API, several variants one after the
other in this process: S = 3 with and without gradient accumulation (2 micro-batches), each as the
Trainer does it and "forced" to all-reduce every backward (``accelerator.no_sync`` replaced by a
null context: the reference loop, without ``no_sync``). A DDP communication hook wrapping torch's default
all-reduce hook records, for every bucket it all-reduces, the update being computed and the
bucket's index. Rank 0 writes ``OUT/<variant>_init.pt`` and ``OUT/<variant>.pt`` (the initial and
final parameters), every rank ``OUT/<variant>_rank<r>.json`` (the hook's calls, the updates and
the backward passes run).
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects
import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import subspaces as ss
from subspaces.data import build_datasets

VARIANTS = {"points": dict(samples_per_step=3), "points_forced": dict(samples_per_step=3),
            "accum": dict(samples_per_step=3, grad_accum_steps=2), "accum_forced": dict(samples_per_step=3, grad_accum_steps=2)}


class CountingTrainer(ss.Trainer):
    """A Trainer whose DDP model counts its all-reduces: (update, bucket index) per hook call."""

    calls: list[tuple[int, int]]

    def setup(self) -> None:
        super().setup()
        self.calls = []

        def hook(state: Any, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
            self.calls.append((self.updates + 1, bucket.index()))
            return default_hooks.allreduce_hook(state, bucket)

        self.model.register_comm_hook(None, hook)   # None: the default process group


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--train", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.output)
    data = build_datasets("fashion-mnist", train_subset=args.train, eval_subset=64, in_chans=1, seed=42)
    for name, extra in VARIANTS.items():
        torch.manual_seed(0)
        line = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
        config = ss.TrainConfig(epochs=1, batch_size=32, lr=0.05, bn_batches=2, log_interval=1, seed=42, **extra)
        trainer = CountingTrainer.create(config, line, data, output=out / name)
        if trainer.accelerator.is_main_process:
            torch.save({k: v.detach().clone() for k, v in line.named_parameters()}, out / f"{name}_init.pt")
        backwards = [0]
        backward = trainer.accelerator.backward

        def counted(loss: torch.Tensor, _backward=backward, **kwargs: Any) -> None:
            backwards[0] += 1
            _backward(loss, **kwargs)

        trainer.accelerator.backward = counted
        if name.endswith("_forced"):   # every backward all-reduces: the reference
            trainer.accelerator.no_sync = lambda model: contextlib.nullcontext()
        trainer.fit()
        rank = trainer.accelerator.process_index
        report = {"rank": rank, "updates": trainer.updates, "backwards": backwards[0], "calls": trainer.calls}
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(report))
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in trainer.unwrapped.named_parameters()}, out / f"{name}.pt")
        trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
