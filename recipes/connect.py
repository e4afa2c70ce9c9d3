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

from subspaces import cli, config
from subspaces.connect import run_connect
from subspaces.sampling import SAMPLING_MODES
from subspaces.settings import ConnectConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a", help="first network: a run folder or a .safetensors export")
    p.add_argument("model_b", help="second network (same architecture)")
    g = p.add_argument_group("curve")
    g.add_argument("--curve", default="bezier", choices=["bezier", "polychain"], help="curve family (default: %(default)s)")
    g.add_argument("--degree", type=int, default=None, help="Bezier degree (default 2)")
    g.add_argument("--bends", type=int, default=None, help="polygonal chain bends (default 1)")
    g.add_argument("--sampling", default="global", choices=SAMPLING_MODES, help="t sampling (default: uniform per forward)")
    g.add_argument("--same-point", action="store_true", help="under DDP, the same t on every rank")
    g.add_argument("--align", action=argparse.BooleanOptionalAction, default=False,
                   help="permute B's hidden units to match A first (weight matching; B's function unchanged); details in alignment.json")
    config.add_data_args(p)
    config.add_optim_args(p, lr=0.015, epochs=20, sched="garipov", wd=5e-4, opt="momentum", opt_why=", plain momentum SGD as [G] fitted curves")
    config.add_run_args(p, output="runs/connect")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="stop (resumably) after this many epochs of this job")
    p.set_defaults(dataset=None)
    return p


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, ConnectConfig)
    return cli.run(lambda: run_connect(args))


if __name__ == "__main__":
    sys.exit(main())
