"""Mode connectivity [G]: fit a Bezier curve or polygonal chain between two trained networks.

The ends are the two networks, frozen; the interior anchors start on the straight segment and are
trained on E_{t~U(0,1)} L(w(t)) (or, with --sampling arc_length, t drawn with density ||w'(t)||).
Defaults follow [G] (docs/science.md §2): SGD momentum 0.9, batch 128, lr 0.015, constant for the first
half, then linear decay to 1% by 90% of training.

    accelerate launch recipes/connect.py runs/a runs/b --curve bezier --epochs 20
    accelerate launch recipes/connect.py a/model.safetensors b/model.safetensors --curve polychain
"""

import argparse
import sys

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, OPTIM, RUN, STOP, build_flags, group
from subspaces.connect import run_connect
from subspaces.settings import ConnectConfig


def build_parser() -> argparse.ArgumentParser:
    return build_flags(ConnectConfig, __doc__, group(None, "model_a", "model_b"),
                       group("curve", "curve", "degree", "bends", "sampling", "same_point", "align"), DATA, AUGMENT, OPTIM, RUN, STOP)


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, ConnectConfig)
    return cli.run(lambda: run_connect(args))


if __name__ == "__main__":
    sys.exit(main())
