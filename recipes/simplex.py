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

from subspaces import cli, config
from subspaces.settings import SPROConfig
from subspaces.spro import run_spro


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="trained networks: run folders or .safetensors exports")
    g = p.add_argument_group("simplex")
    g.add_argument("--vertices", type=int, default=3, help="vertices of each simplex, the trained network included (default: %(default)s)")
    config.add_volume_args(g, default_lambda=1e-6, default_samples=5)
    g.add_argument("--samples", type=int, default=5, help="points sampled from each simplex for its ensemble (default: %(default)s)")
    config.add_data_args(p)
    config.add_optim_args(p, lr=0.01, epochs=10, sched="cosine", wd=5e-4)
    config.add_run_args(p, output="runs/simplex")
    p.set_defaults(dataset=None)
    return p


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, SPROConfig)
    return cli.run(lambda: run_spro(args))


if __name__ == "__main__":
    sys.exit(main())
