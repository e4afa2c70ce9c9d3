"""Accuracy along a line of networks trained from scratch ([W]), and of the pairs (alpha, 1 - alpha).

For a line run (recipes/train.py --subspace line), N evenly spaced alpha in [0, 1] (default 21):
the test accuracy of w(alpha) = (1 - alpha) W_0 + alpha W_1, and the accuracy of the ensemble of
w(alpha) and w(1 - alpha) (the average of their probabilities), BatchNorm recomputed at every
alpha. All points are evaluated in one pass over the data (subspaces.pointwise). [W]'s finding:
the midpoint is at least as accurate as the ends, and the pair of the two ends ensembles well.

    python analysis/line.py runs/line                                   # -> runs/line/line.png + .json
    python analysis/line.py runs/line --points 11 --eval-subset 2000 --output docs/line.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)
from subspaces.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="line.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a line run folder (recipes/train.py --subspace line)")
    p.add_argument("--points", type=int, default=21, help="evenly spaced alpha in [0, 1] (default: %(default)s)")
    p.add_argument("--output", default=None, help="PNG to write; the JSON goes beside it (default: RUN_DIR/line.png)")
    common.add_eval_args(p)
    return p


def analyse(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    import torch

    from subspaces.pointwise import evaluate_points
    from subspaces.shapes import Bezier

    common.check_eval_args(args)
    if args.points < 2:
        raise ConfigError(f"--points must be >= 2 (both ends), got {args.points}")
    timer = common.Timer()
    sub = common.load_run_subspace(args.run_dir)
    if not (isinstance(sub, Bezier) and sub.degree == 1):
        raise ConfigError(f"{args.run_dir} holds a {type(sub).__name__} with {sub.num_anchors} anchors, not a line: "
                          "line.py needs a --subspace line run (curve.py takes connect runs)")
    png, js = common.output_paths(args.output or Path(args.run_dir) / "line.png")
    sub = sub.to(common.device_of(args))
    bundle = common.build_data(sub.spec, args)
    loaders = common.loaders(bundle, args)
    n = args.points
    alphas = torch.linspace(0, 1, n)
    half = [i for i in range(n) if i <= n - 1 - i]
    pairs = [[i, n - 1 - i] for i in half]
    with common.progress_bar() as bar:
        res = evaluate_points(sub, alphas, loaders=loaders["test"], bn_loader=loaders["bn"], bn_batches=args.bn_batches,
                              ensembles=pairs, progress=bar)
    acc = res.acc.tolist()
    data = {
        "run_dir": str(args.run_dir), "alpha": alphas.tolist(), "acc": acc, "loss": res.loss.tolist(),
        "pair_alpha": [float(alphas[i]) for i in half], "pair_acc": res.ensemble_acc.tolist(), "pair_loss": res.ensemble_loss.tolist(),
        "summary": {"ends_acc": [acc[0], acc[-1]], "midpoint_acc": acc[n // 2] if n % 2 else None, "best_acc": max(acc),
                    "best_alpha": float(alphas[int(res.acc.argmax())]), "ends_ensemble_acc": float(res.ensemble_acc[0])},
        "test_count": res.count, "bn_batches": args.bn_batches, "seconds": timer(), "settings": common.settings(args, argv),
    }
    fig = plot(data)
    common.save(fig, data, png, js)
    print_summary(data)
    return data


def plot(data: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4))
    ax.plot(data["alpha"], [100 * a for a in data["acc"]], "o-", color="C0", ms=4, label=r"$w(\alpha)$")
    ax.plot(data["pair_alpha"], [100 * a for a in data["pair_acc"]], "s-", color="C2", ms=4,
            label=r"ensemble of $w(\alpha)$ and $w(1-\alpha)$")
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{Path(data['run_dir']).name}: line from scratch, BN recomputed at every $\\alpha$\n"
                 f"{data['test_count']} test examples, {data['bn_batches']} BN batches", fontsize=9)
    fig.tight_layout()
    return fig


def print_summary(data: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{data['run_dir']}: accuracy along the line")
    for col in ("alpha", "acc %", "NLL", "pair (alpha, 1-alpha) acc %"):
        table.add_column(col, justify="right")
    pair = dict(zip(data["pair_alpha"], data["pair_acc"]))
    for a, acc, loss in zip(data["alpha"], data["acc"], data["loss"]):
        table.add_row(f"{a:.3f}", f"{100 * acc:.2f}", f"{loss:.4f}", f"{100 * pair[a]:.2f}" if a in pair else "")
    common.console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = common.parse(p, argv)
    return common.run(lambda: analyse(args, argv))


if __name__ == "__main__":
    sys.exit(main())
