"""The papers' claims recomputed from a finished comparison's saved predictions.

    python analysis/claims.py runs/compare                 # the test split, as results.md
    python analysis/claims.py runs/compare --split val     # the validation split
    python analysis/claims.py runs/compare --json          # the parts and intervals as JSON

Reads ``RUN/seedR/predictions.safetensors`` of every replicate (written by recipes/compare.py:
per row and budget the probabilities of each test and validation example) and prints each claim
with its paired differences, 95 % bootstrap intervals and verdict (:mod:`subspaces.claims`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from subspaces import cli
from subspaces.claims import check_claims, render_claims
from subspaces.compare import BOOTSTRAP_RESAMPLES
from subspaces.compare_eval import PREDICTIONS, load_replicate_predictions, per_example_losses
from subspaces.errors import ConfigError
from subspaces.stats import Bootstrap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="claims.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a compare output folder (holds seed0/predictions.safetensors, ...)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="the split to check the claims on (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples (default: %(default)s, as the run)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the bootstrap draws (default: the run's --seed, so that the run's own intervals are reproduced)")
    p.add_argument("--json", action="store_true", help="print the claims as JSON instead of text")
    return p


def run_seed(run: Path, default: int | None = None) -> int:
    """The ``--seed`` a finished comparison ran with (its bootstrap's seed), from its results.json;
    ``default`` when it has none (refused when there is no default)."""
    path = run / "results.json"
    if not path.exists():
        if default is not None:
            return default
        raise ConfigError(f"{path} is missing: pass the output folder of a finished recipes/compare.py run, or --seed")
    return int(json.loads(path.read_text())["protocol"]["seed"])


def replicate_paths(run: Path) -> list[Path]:
    """``run/seedR/predictions.safetensors`` of every replicate, in replicate order."""
    paths = sorted(run.glob(f"seed*/{PREDICTIONS}"), key=lambda p: int(p.parent.name.removeprefix("seed")))
    if not paths:
        raise ConfigError(f"{run} holds no seed*/{PREDICTIONS}: pass the output folder of a finished recipes/compare.py run")
    return paths


def recompute(run: Path, split: str, resamples: int = BOOTSTRAP_RESAMPLES, seed: int | None = None) -> list:
    """The claims of every replicate under ``run`` on ``split`` (bootstrap seed: the run's own by default)."""
    loaded = [load_replicate_predictions(p) for p in replicate_paths(run)]
    if split not in loaded[0][0]:
        raise ConfigError(f"{run} has no {split} split in its predictions (a compare run with --holdout 0 has no validation split)")
    labels = loaded[0][0][split]
    budgets = sorted({k for _, rows in loaded for (_, k) in rows[split]})
    boot = Bootstrap(len(loaded), len(labels), resamples=resamples, seed=run_seed(run) if seed is None else seed)
    return check_claims([rows[split] for _, rows in loaded], labels, budgets, boot, per_example_losses)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        claims = recompute(Path(args.run), args.split, args.resamples, args.seed)
        if args.json:
            print(json.dumps([c.to_dict() for c in claims], indent=1))
        else:
            replicates = len(replicate_paths(Path(args.run)))
            print("\n".join(render_claims(claims, replicates, "validation" if args.split == "val" else "test")))

    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
