"""Snapshot ensembles [S] (docs/science.md §3): one network from scratch, cosine annealing restarted
every cycle, a snapshot (BatchNorm recomputed) at the end of each cycle; evaluates the ensemble
after 1..M snapshots (probabilities averaged).

    accelerate launch recipes/sse.py --epochs 12 --cycle 3 --output runs/sse       # 4 snapshots
    accelerate launch recipes/sse.py --model resnet18 --dataset cifar10 --epochs 200 --cycle 40 --lr-max 0.2
    accelerate launch recipes/sse.py --resume runs/sse
"""

import argparse
import sys

from subspaces import cli, config
from subspaces.settings import SSEConfig
from subspaces.snapshots import run_sse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_model_args(p)
    config.add_snapshot_args(p, "sse")
    config.add_data_args(p)
    config.add_optim_args(p, lr=0.05, epochs=12, sched="none", wd=5e-4)
    config.add_run_args(p, output="runs/sse")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="stop (resumably) after this many epochs of this job")
    return p


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, SSEConfig)
    return cli.run(lambda: run_sse(args))


if __name__ == "__main__":
    sys.exit(main())
