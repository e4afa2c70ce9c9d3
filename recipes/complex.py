"""Mode-connecting simplicial complex [B]: join k trained networks (modes) through m shared vertices.

Every simplex (mode_i, shared_0, .., shared_{m-1}) is trained to be low-loss: the modes stay
frozen; the shared vertices are added one at a time ([B]'s complex_iterative.py), each starting
at the centroid of all current vertices, trained for --epochs epochs on
E_{i ~ U, p ~ Dirichlet(1)} L(w(p on simplex i)) - lambda / sum_i log(Vol0_i^2 + 1e-4) * sum_i log(Vol_i^2 + 1e-4)
(the first shared vertex without the volume term, as [B]). Each shared vertex is a resumable stage
OUTPUT/shared{v}. Then: test error and NLL of --samples uniform points of every simplex and of
the whole complex (BatchNorm recomputed at each), ensembles of points across the complex against
the modes alone (Ind) at equal members, the cost in epochs, all in OUTPUT/results.json; and
OUTPUT/plane.png (+ plane.json): test error on the plane through mode 0, shared vertex 0 and mode 1.

    accelerate launch recipes/complex.py runs/m0 runs/m1 runs/m2 --shared 2 --epochs 5
    accelerate launch recipes/complex.py --resume runs/complex
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from subspaces import cli
from subspaces.cli_flags import AUGMENT, DATA, OPTIM, RUN, build_flags, group
from subspaces.complex_run import run_complex
from subspaces.settings import ComplexConfig, VolumeConfig

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis" / "complex.py"


def build_parser() -> argparse.ArgumentParser:
    return build_flags(ComplexConfig, __doc__, group(None, "checkpoints"),
                       group("complex", "shared", VolumeConfig, "samples", "ensemble_members", "mode_epochs", "grid"),
                       DATA, AUGMENT, OPTIM, RUN)


def figure(args: ComplexConfig) -> int:
    """The plane figure, drawn by analysis/complex.py in a child process (matplotlib stays out of training)."""
    cmd = [sys.executable, str(ANALYSIS), args.output, "--grid", str(args.grid), "--bn-batches", str(args.bn_batches),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.eval_subset is not None:
        cmd += ["--eval-subset", str(args.eval_subset)]
    if args.train_subset is not None:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.data_dir is not None:
        cmd += ["--data-dir", args.data_dir]
    return subprocess.run(cmd).returncode


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv, ComplexConfig)
    status = cli.run(lambda: run_complex(args))
    if status == 0 and args.grid > 0 and os.environ.get("RANK", "0") == "0":
        status = figure(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
