"""Snapshot ensembles [S] (docs/science.md §3): one network from scratch, cosine annealing restarted
every cycle, a snapshot (BatchNorm recomputed) at the end of each cycle; evaluates the ensemble
after 1..M snapshots (probabilities averaged).

    accelerate launch recipes/sse.py --epochs 12 --cycle 3 --output runs/sse       # 4 snapshots
    accelerate launch recipes/sse.py --model resnet18 --dataset cifar10 --epochs 200 --cycle 40 --lr-max 0.2
    accelerate launch recipes/sse.py --resume runs/sse
"""

import argparse
import sys

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, MODEL, OPTIM, RUN, STOP, build_flags, group
from subspaces.settings import SnapshotConfig, SSEConfig
from subspaces.snapshots import run_sse


def build_parser() -> argparse.ArgumentParser:
    return build_flags(SSEConfig, __doc__, MODEL, group("SSE", SnapshotConfig, "lr_max"), DATA, AUGMENT, OPTIM, RUN, STOP)


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, SSEConfig)
    return cli.run(lambda: run_sse(args))


if __name__ == "__main__":
    sys.exit(main())
