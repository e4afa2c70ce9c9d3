"""Fast Geometric Ensembling [G] (docs/science.md §3): cycle the learning rate from a trained network.

Starts from a trained network and its optimiser state (a run folder of recipes/train.py: its
``model.safetensors`` and the momentum buffers in its newest ``checkpoints/checkpoint_<i>/optimizer.bin``), runs SGD with
the per-iteration cyclical learning rate (alpha1 -> alpha2 -> alpha1 over a cycle of c
iterations, c even) and saves a snapshot, BatchNorm recomputed, whenever mod(i, c) = c/2. At the
end it evaluates the ensemble after 1..M snapshots (probabilities averaged) and SWA (the
snapshots averaged in weight space, BatchNorm recomputed).

    accelerate launch recipes/train.py --epochs 8 --output runs/train
    accelerate launch recipes/fge.py runs/train --cycle 2 --epochs 4 --output runs/fge
    accelerate launch recipes/fge.py runs/train --cycle-iters 100 --lr-max 0.025 --lr-min 0.0005
    accelerate launch recipes/fge.py --resume runs/fge
"""

import argparse
import sys

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, OPTIM, RUN, STOP, build_flags, group
from subspaces.settings import FGEConfig, SnapshotConfig
from subspaces.snapshots import run_fge


def build_parser() -> argparse.ArgumentParser:
    return build_flags(FGEConfig, __doc__, group(None, "checkpoint"), group("FGE", SnapshotConfig, "lr_max", "lr_min"),
                       DATA, AUGMENT, OPTIM, RUN, STOP)


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, FGEConfig)
    return cli.run(lambda: run_fge(args))


if __name__ == "__main__":
    sys.exit(main())
