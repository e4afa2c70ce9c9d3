"""Train a standard network, or a line / curve / simplex of networks from scratch [W].

    accelerate launch recipes/train.py --subspace line --epochs 10          # Fashion-MNIST by default
    accelerate launch recipes/train.py --model resnet18 --dataset cifar10 --subspace line --beta 1
    accelerate launch recipes/train.py --resume runs/train                  # continue a stopped run
"""

import argparse
import sys

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, MODEL, OPTIM, RUN, STOP, SUBSPACE, build_flags
from subspaces.settings import TrainRunConfig
from subspaces.training import run_training


def build_parser() -> argparse.ArgumentParser:
    return build_flags(TrainRunConfig, __doc__, MODEL, DATA, AUGMENT, OPTIM, SUBSPACE, RUN, STOP)


def main(argv=None) -> int:
    cli.load_plugins()   # modules named in SUBSPACES_PLUGINS: their shapes become --subspace values
    args = cli.parse(build_parser(), argv, TrainRunConfig)
    return cli.run(lambda: run_training(args))


if __name__ == "__main__":
    sys.exit(main())
