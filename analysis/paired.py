"""Paired difference between two rows of finished comparisons, on the same examples.

    python analysis/paired.py runs/a "FGE@1B" runs/b "FGE@1B" --split val      # b's row - a's row
    python analysis/paired.py runs/a "Line midpoint@1B" runs/a "Single network@1B"

Each ROW@KB names a row of results.csv at budget K. The two rows may come from one run or from
two runs of the same data (the same ``--data-seed`` and split sizes: the labels must agree);
replicate R of one is paired with replicate R of the other. Printed: each row's error and NLL,
and the second minus the first with a 95 % bootstrap interval over the examples and replicates
(:class:`subspaces.stats.Bootstrap`), with its verdict for "the second is lower".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from subspaces import cli
from subspaces.compare import BOOTSTRAP_RESAMPLES
from subspaces.compare_eval import load_replicate_predictions, per_example_losses
from subspaces.errors import ConfigError
from subspaces.stats import Bootstrap, paired_difference, verdict

from claims import replicate_paths, run_seed  # noqa: E402  (the sibling analysis/claims.py: a run's replicates and seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paired.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", help="a compare output folder")
    p.add_argument("row_a", help="a row at a budget, as in results.csv: 'Ind@1B'")
    p.add_argument("run_b", help="a compare output folder (may be run_a)")
    p.add_argument("row_b", help="the row compared against row_a: the difference is row_b - row_a")
    p.add_argument("--split", choices=("test", "val"), default="test", help="the split (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples (default: %(default)s, as the compare)")
    p.add_argument("--seed", type=int, default=None, help="seed of the bootstrap draws (default: run_a's --seed, as its own intervals)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def row_losses(run: Path, row: str, split: str) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """(labels [N], per replicate the per-example ``error`` / ``nll`` [N] of ``row`` on ``split``)."""
    name, _, budget = row.rpartition("@")
    if not name or not budget.endswith("B") or not budget[:-1].isdigit():
        raise ConfigError(f"row {row!r}: write it as NAME@KB, e.g. 'Ind@1B' (the names are results.csv's)")
    labels, out = None, []
    for path in replicate_paths(run):
        split_labels, rows = load_replicate_predictions(path)
        if split not in rows:
            raise ConfigError(f"{path} has no {split} split (a compare run with --holdout 0 has no validation split)")
        key = (name, int(budget[:-1]))
        if key not in rows[split]:
            known = ", ".join(sorted(f"{r}@{k}B" for r, k in rows[split]))
            raise ConfigError(f"{path} has no row {row!r}; it has: {known}")
        labels = split_labels[split]
        out.append(per_example_losses(rows[split][key], labels))
    assert labels is not None
    return labels, out


def compare_rows(run_a: Path, row_a: str, run_b: Path, row_b: str, split: str, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int | None = None) -> dict:
    """row_b - row_a per example (error in points, NLL in nats), paired over replicates and examples;
    the bootstrap's seed is run_a's ``--seed`` unless given."""
    labels_a, a = row_losses(run_a, row_a, split)
    labels_b, b = row_losses(run_b, row_b, split)
    if not torch.equal(labels_a, labels_b):
        raise ConfigError(f"the {split} labels of {run_a} and {run_b} differ: the runs drew other images "
                          "(use the same --data-seed, --train-subset, --eval-subset and --holdout)")
    n = min(len(a), len(b))
    boot = Bootstrap(n, len(labels_a), resamples=resamples, seed=run_seed(run_a, default=0) if seed is None else seed)
    out: dict = {"split": split, "replicates": n, "examples": len(labels_a), "a": f"{run_a}:{row_a}", "b": f"{run_b}:{row_b}"}
    for metric in ("error", "nll"):
        xa = torch.stack([r[metric] for r in a[:n]]).numpy()
        xb = torch.stack([r[metric] for r in b[:n]]).numpy()
        d = paired_difference(xb, xa, boot)
        out[metric] = {"a": float(xa.mean()), "b": float(xb.mean()), "difference": d.to_dict(), "verdict": verdict(d)}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        res = compare_rows(Path(args.run_a), args.row_a, Path(args.run_b), args.row_b, args.split, args.resamples, args.seed)
        if args.json:
            print(json.dumps(res, indent=1))
            return
        print(f"{res['split']}: {res['examples']} examples, {res['replicates']} replicate(s); b = {res['b']}, a = {res['a']}")
        for metric, unit in (("error", "points"), ("nll", "nats")):
            r, d = res[metric], res[metric]["difference"]
            print(f"  {metric}: a {r['a']:.4f}, b {r['b']:.4f}; b - a {d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] {unit}"
                  f" (95 %): {r['verdict']} for b < a")

    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
