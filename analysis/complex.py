"""Test error / loss on the plane through two modes and a shared vertex of a simplicial complex [B].

The plane through mode A, shared vertex THETA and mode B of a recipes/complex.py run, drawn as
analysis/plane.py draws any three networks (Gram-Schmidt basis, BatchNorm recomputed at every
grid point): the 1-bend path A -> THETA -> B is the pair of complex edges mode_a - shared_s and
shared_s - mode_b, and the dashed segment A - B is the straight line between the modes, which is
not in the complex. Writes RUN/plane.png and RUN/plane.json beside RUN/results.json.

    python analysis/complex.py runs/complex                       # modes 0 and 1, shared vertex 0
    python analysis/complex.py runs/complex --modes 1 2 --shared-vertex 1 --grid 21 --output docs/complex_plane.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)
import plane  # noqa: E402
from subspaces.complex import load_complex  # noqa: E402
from subspaces.errors import ConfigError  # noqa: E402
from subspaces.shapes import Simplex  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="complex.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a recipes/complex.py output folder (with complex.safetensors)")
    p.add_argument("--modes", type=int, nargs=2, default=[0, 1], metavar=("A", "B"), help="the two modes (default: 0 1)")
    p.add_argument("--shared-vertex", type=int, default=0, help="the shared vertex THETA, 0..m-1 (default: %(default)s)")
    p.add_argument("--grid", type=int, default=11, help="grid points per side (default: %(default)s)")
    p.add_argument("--margin", type=float, default=0.2, help="margin around the three points, a fraction of their extent (default: %(default)s)")
    p.add_argument("--metrics", nargs="+", default=["test_error", "test_loss"], choices=plane.METRICS,
                   help="one panel per metric (default: test_error test_loss)")
    p.add_argument("--output", default=None, help="PNG to write, the JSON beside it (default: RUN/plane.png)")
    common.add_eval_args(p, eval_subset=None)
    return p


def slice_of(run: str, modes: list[int], shared: int) -> tuple:
    """(Simplex with anchors mode A, shared vertex THETA, mode B; the A -> THETA -> B path; labels; spec)."""
    sub = load_complex(Path(run))
    a, b = modes
    if a == b or not all(0 <= m < sub.modes for m in modes):
        raise ConfigError(f"--modes {a} {b}: pass two different modes of this complex, 0..{sub.modes - 1}")
    if not 0 <= shared < sub.shared:
        raise ConfigError(f"--shared-vertex {shared}: this complex has shared vertices 0..{sub.shared - 1}")
    theta = sub.shared_indices()[shared]
    three = Simplex.connect([sub.anchor(a), sub.anchor(theta), sub.anchor(b)])
    labels = {"A": f"mode {a}", "THETA": f"shared vertex {shared}", "B": f"mode {b}", "curve": "edges of the complex"}
    return three, plane.one_bend_chain, labels, sub.spec


def main(argv: list[str] | None = None) -> int:
    args = common.parse(build_parser(), argv)

    def job() -> dict:
        built = slice_of(args.run, list(args.modes), args.shared_vertex)
        args.inputs = [args.run]
        args.output = args.output or str(Path(args.run) / "plane.png")
        args.margin_left = args.margin_right = args.margin_bottom = args.margin_top = None
        return plane.analyse(args, argv, plane=built)

    return common.run(job)


if __name__ == "__main__":
    sys.exit(main())
