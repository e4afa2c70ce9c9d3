"""SPRO [B]: grow a simplex of low-loss networks from a trained network, one vertex at a time.

Each new vertex starts at the centroid of the current ones (which are frozen) and is trained for
--epochs epochs on E_{p~Dirichlet(1)} L(w(p)) - lambda / log(Vol0^2 + 1e-4) * log(Vol^2 + 1e-4), the
expectation taken over --samples-per-step points per batch; the defaults are [B]'s (lambda 1e-6, 5 points
per batch, 10 epochs per vertex, lr 0.01). Several checkpoints give
ESPRO: one simplex per network, predictions averaged over points sampled from all of them.

    accelerate launch recipes/simplex.py runs/a --vertices 3 --epochs 5
    accelerate launch recipes/simplex.py runs/a runs/b runs/c --vertices 3 --samples 5   # ESPRO
"""

import argparse
import sys

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, OPTIM, RUN, build_flags, group
from subspaces.settings import SPROConfig, VolumeConfig
from subspaces.spro import run_spro


def build_parser() -> argparse.ArgumentParser:
    return build_flags(SPROConfig, __doc__, group(None, "checkpoints"), group("simplex", "vertices", VolumeConfig, "samples"),
                       DATA, AUGMENT, OPTIM, RUN)


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, SPROConfig)
    return cli.run(lambda: run_spro(args))


if __name__ == "__main__":
    sys.exit(main())
