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

from subspaces import cli, config
from subspaces.complex_run import run_complex
from subspaces.settings import ComplexConfig

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis" / "complex.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="the trained networks (modes): run folders or .safetensors exports, 2 or more")
    g = p.add_argument_group("complex")
    g.add_argument("--shared", type=int, default=2, help="shared vertices m, trained one at a time (default: %(default)s)")
    config.add_volume_args(g, default_lambda=0.1, default_samples=5)
    g.add_argument("--samples", type=int, default=10, help="uniform points evaluated in each simplex (default: %(default)s)")
    g.add_argument("--ensemble-members", type=int, default=10,
                   help="points drawn across the complex for its largest ensemble (default: %(default)s)")
    g.add_argument("--mode-epochs", type=float, default=None,
                   help="B, the epochs of one mode, for the cost in B (default: read from the first mode's config.yaml)")
    g.add_argument("--grid", type=int, default=11, help="grid points per side of the plane figure; 0: no figure (default: %(default)s)")
    config.add_data_args(p)
    config.add_optim_args(p, lr=0.005, epochs=10, sched="cosine", wd=0.0)
    config.add_run_args(p, output="runs/complex")
    p.set_defaults(dataset=None)
    return p


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
