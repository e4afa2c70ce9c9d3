"""Equal-budget comparison of ensembles and subspaces ([G]'s Table 1 protocol, docs/science.md §7).

B = --epochs, the epochs of one standard network. At budgets 1B, 2B, 3B it trains and evaluates:
independently trained networks (Ind), snapshot ensembles (SSE), Fast Geometric Ensembling (FGE,
from Ind network 0 at 0.8B with its optimiser state), SWA of the FGE snapshots, a line and a
simplex learned from scratch [W] (midpoint/centre, endpoints/vertices, k points) and ESPRO [B]
(a SPRO simplex from each Ind network), every network with BatchNorm recomputed. It prints the
budget accounting, the table and the papers' claims checked on it, and writes results.md,
results.json and results.csv to --output.

Members are independent runs: --jobs of them train at once in worker processes (default: one per
core); under torchrun / accelerate launch the ranks share them out. The plan is the same either
way. Every member is a run folder under OUTPUT/seedR/: run the same command again after a stop
and finished members are reused, unfinished ones resumed.

    accelerate launch recipes/compare.py                      # the default: Fashion-MNIST, test_resnet, 10k images, B = 20
    accelerate launch recipes/compare.py --seeds 3 --output runs/compare3
    torchrun --nproc_per_node 2 recipes/compare.py             # two ranks, one member each at a time
    accelerate launch recipes/compare.py -c recipes/configs/garipov_cifar10_resnet18.yaml   # [G]'s CIFAR-10 scale (a GPU)
"""

import argparse
import sys

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, MODEL, OPTIM, RUN, build_flags, group
from subspaces.compare import run_compare
from subspaces.settings import CompareConfig


def build_parser() -> argparse.ArgumentParser:
    return build_flags(CompareConfig, __doc__, MODEL, DATA, AUGMENT, OPTIM, RUN, group("protocol", CompareConfig))


def main(argv=None) -> int:
    cli.load_plugins()   # modules named in SUBSPACES_PLUGINS: their shapes and methods become flag values
    p = build_parser()
    args = cli.parse(p, argv, CompareConfig)
    return cli.run(lambda: run_compare(args))


if __name__ == "__main__":
    sys.exit(main())
