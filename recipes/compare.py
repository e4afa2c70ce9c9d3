"""Equal-budget comparison of ensembles and subspaces ([G]'s Table 1 protocol, SCIENCE.md §3-§5).

B = --epochs, the epochs of one standard network. At budgets 1B, 2B, 3B it trains and evaluates:
independently trained networks (Ind), snapshot ensembles (SSE), Fast Geometric Ensembling (FGE,
from Ind network 0 at 0.8B with its optimiser state), SWA of the FGE snapshots, and a line and a
simplex learned from scratch [W] (midpoint/centre, ends/vertices, k points), BatchNorm recomputed
at every snapshot, average and point. Budget accounting is printed and written with the results:
a table on the console, results.md, results.json and results.csv in --output.

Every member is a run folder under OUTPUT/seedR/: run the same command again after a stop and
finished members are reused, unfinished ones resumed.

    accelerate launch recipes/compare.py                      # the embedded default: Fashion-MNIST, test_resnet
    accelerate launch recipes/compare.py --seeds 3 --output runs/compare3
    accelerate launch recipes/compare.py --model resnet18 --dataset cifar10 --epochs 150 --train-subset 0 --eval-subset 0 \\
        --batch-size 128 --lr 0.1 --fge-lr-max 0.05 --fge-cycle 2 --sse-cycle 30
"""

import argparse
import sys

from subspaces import cli, config
from subspaces.compare import add_compare_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_model_args(p)
    config.add_data_args(p)
    config.add_optim_args(p, lr=0.05, epochs=6, sched="cosine", wd=5e-4)
    config.add_run_args(p, output="runs/compare")
    add_compare_args(p)
    p.set_defaults(model="test_resnet", train_subset=2000, eval_subset=2000, batch_size=64, bn_batches=10)
    args = cli.parse(p, argv)
    for name in ("train_subset", "eval_subset"):
        if getattr(args, name) == 0:     # 0: the whole split
            setattr(args, name, None)
    from subspaces.compare import run_compare

    return cli.run(lambda: run_compare(args))


if __name__ == "__main__":
    sys.exit(main())
