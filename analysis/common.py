"""Shared helpers of the analysis scripts (curve.py, plane.py, line.py).

Each script evaluates many points of a subspace with :mod:`subspaces.pointwise` (BatchNorm
recomputed at every point, every batch loaded once for all points), draws a PNG with matplotlib
(Agg backend, headless) and writes the numbers behind it as JSON next to the PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402

from subspaces import cli  # noqa: E402
from subspaces.errors import ConfigError  # noqa: E402
from subspaces.io import CheckpointError, load_subspace, write_json  # noqa: E402
from subspaces.subspace import Subspace  # noqa: E402

console = Console(stderr=True)


# ------------------------------------------------------------------------------------ arguments
def subset_arg(value: str) -> int | None:
    """``--train-subset`` / ``--eval-subset``: a positive number of examples, or ``all``."""
    if str(value).lower() in ("all", "none", "0"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of examples or 'all', got {value}")
    return n


def add_eval_args(p: argparse.ArgumentParser, *, train_subset: int | None = 10000, eval_subset: int | None = None) -> None:
    """Data, BatchNorm and device flags shared by the analysis scripts."""
    p.add_argument("-c", "--config", default=None, help="YAML file with the same keys as these flags")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="dataset (default: the run's own, else fashion-mnist)")
    g.add_argument("--data-dir", default=None, help="dataset folder (default: $SUBSPACES_DATA, the Debian package, or the cache)")
    g.add_argument("--train-subset", type=subset_arg, default=train_subset,
                   help="training examples used for train metrics and BatchNorm, or 'all' (default: %(default)s)")
    g.add_argument("--eval-subset", type=subset_arg, default=eval_subset,
                   help="test examples used for test metrics, or 'all' (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the subset choice (default: %(default)s)")
    g.add_argument("-b", "--batch-size", type=int, default=256, help="evaluation batch size (default: %(default)s)")
    g.add_argument("-j", "--workers", type=int, default=0, help="data loader worker processes (default: %(default)s)")
    g.add_argument("--bn-batches", type=int, default=20,
                   help="training batches used to recompute BatchNorm at every point (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the accelerator if there is one)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is much faster on a CPU shared with other jobs)")


def check_eval_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bn_batches < 1:
        raise ConfigError(f"--bn-batches must be >= 1, got {args.bn_batches}")
    check_runtime_args(args)


def check_runtime_args(args: argparse.Namespace) -> None:
    """Check --workers and --threads, and apply --threads to torch."""
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    return cli.parse(p, argv)


def run(job: Callable[[], Any]) -> int:
    """``subspaces.cli.run`` plus ValueError as a clear one-line error (bad points, shapes...)."""

    def guarded() -> Any:
        try:
            return job()
        except (ConfigError, CheckpointError, FileNotFoundError):
            raise
        except ValueError as err:
            raise ConfigError(str(err).splitlines()[0]) from None

    return cli.run(guarded)


# ------------------------------------------------------------------------------------ loading
def device_of(args: argparse.Namespace) -> torch.device:
    if args.device:
        try:
            return torch.device(args.device)
        except RuntimeError as err:
            raise ConfigError(f"--device {args.device}: {err}") from None
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_run_subspace(path: str | os.PathLike) -> Subspace:
    """The subspace of a run folder (or a subspace .safetensors), with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a run folder (with subspace.safetensors)")
    if p.is_dir() and not (p / "subspace.safetensors").exists():
        hint = " (a standard run: its model.safetensors is one network, not a subspace)" if (p / "model.safetensors").exists() else ""
        raise CheckpointError(f"{p} holds no subspace.safetensors{hint}: pass the run folder of a connect run or a --subspace run")
    return load_subspace(p)


def build_data(spec: dict[str, Any], args: argparse.Namespace) -> Any:
    """The DataBundle matching a model spec (channels, size, dataset) with the script's subsets."""
    from subspaces.data import build_datasets

    name = args.dataset or spec.get("dataset") or "fashion-mnist"
    return build_datasets(name, root=args.data_dir, img_size=spec.get("img_size"), in_chans=spec.get("in_chans"),
                          train_subset=args.train_subset, eval_subset=args.eval_subset, seed=args.seed, augment=False)


def loaders(bundle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``bn``: unaugmented training data for BatchNorm (first ``--bn-batches`` batches);
    ``train``: the same data for train metrics; ``test``: the evaluation split."""
    from subspaces.data import make_loader

    def make(ds: Any) -> Any:
        return make_loader(ds, args.batch_size, shuffle=False, num_workers=args.workers)

    return {"bn": make(bundle.bn), "train": make(bundle.bn), "test": make(bundle.eval)}


def progress_bar() -> Any:
    """The scripts' progress display (stderr), one task per pass over the data: a rich progress
    bar on a terminal, plain lines every 10% when the output goes to a file (background jobs)."""
    if not console.is_terminal:
        return PlainProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


class PlainProgress:
    """The part of rich's Progress the scripts use, as a line per 10% of each task (for log files)."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        self.tasks.append({"description": description, "total": total, "done": 0, "printed": -1, "t0": time.perf_counter()})
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        t = self.tasks[task]
        t["done"] += advance
        if not t["total"]:
            return
        tenth = int(10 * t["done"] / t["total"])
        if tenth > t["printed"]:
            t["printed"] = tenth
            elapsed = time.perf_counter() - t["t0"]
            print(f"{t['description']}: {int(t['done'])}/{int(t['total'])} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def update(self, task: int, **_: Any) -> None:
        return None


# ------------------------------------------------------------------------------------ output
def output_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """``--output X.png`` -> (X.png, X.json); the folder is created (ConfigError if it cannot be)."""
    png = Path(output)
    if png.suffix.lower() != ".png":
        png = png.with_suffix(".png") if png.suffix else png / "figure.png"
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder {png.parent}: {err.strerror}") from None
    if not os.access(png.parent, os.W_OK):
        raise ConfigError(f"cannot write to the output folder {png.parent}; pass --output elsewhere")
    return png, png.with_suffix(".json")


def save(fig: Any, data: dict[str, Any], png: Path, js: Path) -> None:
    """Write the figure (150 dpi) and its numbers; both atomically replace older files."""
    import matplotlib.pyplot as plt

    from subspaces.io import atomic_path

    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)
    write_json(_jsonable(data), js)
    console.print(f"wrote {png} and {js}")


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def settings(args: argparse.Namespace, argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The flags that produced the numbers, for the JSON (``argv``: the script's arguments)."""
    keep = {k: v for k, v in vars(args).items() if k not in ("config",)}
    words = sys.argv[1:] if argv is None else list(argv)
    return {**keep, **extra, "argv": words}


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def dumps(x: Any) -> str:
    return json.dumps(_jsonable(x))
