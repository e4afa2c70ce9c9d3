"""Command-line configuration shared by the recipes: timm train.py flag names plus a YAML file.

``-c/--config FILE.yaml`` holds the same keys as the flags (``batch_size`` or ``batch-size``);
flags given on the command line override it. The resolved configuration is written to the run's
output directory as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .checkpoint import DEFAULT_HISTORY, check_history
from .data import DATASETS
from .errors import ConfigError
from .io import atomic_path




def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="timm model name (default: %(default)s)")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs them locally)")
    g.add_argument("--num-classes", type=int, default=None, help="classes (default: the dataset's)")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (default: the dataset's)")
    g.add_argument("--img-size", type=int, default=None, help="input side in pixels (default: the dataset's, or what the model needs)")
    g.add_argument("--model-kwargs", type=yaml.safe_load, default=None, help="extra timm.create_model kwargs as YAML, e.g. '{drop_rate: 0.1}'")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | cifar10 | cifar100 | imagefolder:PATH (default: %(default)s)")
    g.add_argument("--data-dir", default=None, help="dataset folder (default: $SUBSPACES_DATA, the Debian package, or the cache)")
    g.add_argument("--train-subset", type=int, default=None, help="use only N training examples (quick runs)")
    g.add_argument("--eval-subset", type=int, default=None, help="use only N evaluation examples")
    g.add_argument("--holdout", type=int, default=0, help="hold N training examples out; BatchNorm is then recomputed on them")
    g.add_argument("-j", "--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--bn-batches", type=int, default=20, help="batches used to recompute BatchNorm at each evaluated point")


def add_optim_args(p: argparse.ArgumentParser, *, lr: float = 0.05, epochs: int = 10, sched: str = "cosine", warmup: int = 0, wd: float = 5e-4,
                   opt: str = "sgd", opt_why: str = "") -> None:
    g = p.add_argument_group("optimisation (timm names)")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="batch size per process (default: %(default)s)")
    g.add_argument("--opt", default=opt, help=f"timm optimiser name: sgd (Nesterov), momentum (plain momentum SGD), adamw, lamb, ... (default: %(default)s{opt_why})")
    g.add_argument("--lr", type=float, default=lr, help="learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=wd, help="weight decay (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="timm's layer-wise lr decay in (0, 1]: block l of L trains at lr * d^(L - l); anchors are then stored per parameter (default: off)")
    g.add_argument("--sched", default=sched, help="timm scheduler: cosine | step | multistep | plateau | poly | tanh | none (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=int, default=warmup, help="warm-up epochs (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=0.0, help="scheduler's lowest learning rate (default: %(default)s)")
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing (default: %(default)s)")


def add_run_args(p: argparse.ArgumentParser, *, output: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("-c", "--config", default=None, help="YAML file with the same keys as these flags")
    g.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="accelerate mixed precision; fp16 needs a GPU (default: the launcher's, from accelerate launch / accelerate config, else no)")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    g.add_argument("--output", default=output, help="run directory (default: %(default)s)")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the stopped run in DIR (its config.yaml is used)")
    g.add_argument("--checkpoint-hist", type=int, default=DEFAULT_HISTORY, metavar="N",
                   help="checkpoints kept in OUTPUT/checkpoints, the newest N, at least 2: a kill during a save leaves the one before (default: %(default)s)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between plain-text progress lines when not on a terminal")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (always after the last)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--log-with", default=None,
                   help="accelerate trackers for the metrics: tensorboard, wandb, mlflow, comet_ml, aim, ... or all; "
                        "files under OUTPUT/trackers (default: metrics.jsonl only)")
    g.add_argument("--export-format", default="both", choices=["both", "timm", "safetensors"],
                   help="trained networks as timm folders (timm.create_model('local-dir:PATH', pretrained=True)), "
                        "safetensors + JSON spec (subspaces.io.load_model), or both (default: %(default)s)")


def add_subspace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("subspace")
    g.add_argument("--subspace", default="none", choices=["none", "line", "bezier", "polychain", "simplex"], help="shape trained from scratch (default: %(default)s: a standard network)")
    g.add_argument("--degree", type=int, default=None, help="Bezier degree (default 2; only with --subspace bezier)")
    g.add_argument("--bends", type=int, default=None, help="polygonal chain bends (default 1; only with --subspace polychain)")
    g.add_argument("--vertices", type=int, default=None, help="simplex vertices (default 3; only with --subspace simplex)")
    g.add_argument("--layerwise", action="store_true", help="an independent point per layer ([W]'s layerwise variant)")
    g.add_argument("--sampling", default="global", choices=["global", "layerwise", "arc_length"], help="point sampling (default: %(default)s)")
    g.add_argument("--same-point", action="store_true", help="under DDP, draw the same point on every rank (default: a different point per rank)")
    g.add_argument("--beta", type=float, default=0.0, help="weight of the cos^2 regulariser between anchors ([W] used 1)")
    g.add_argument("--beta-params", default="weights", choices=["weights", "all"],
                   help="what cos^2 covers: the layer weights (conv / linear / attention, as [W]'s code) or all subspace parameters (default: %(default)s)")
    add_volume_args(g, default_lambda=0.0)
    g.add_argument("--include", nargs="*", default=None, help="parameter-name patterns that live in the subspace (default: all)")
    g.add_argument("--exclude", nargs="*", default=None, help="parameter-name patterns kept shared by all points")


def add_volume_args(g: argparse._ArgumentGroup, default_lambda: float, default_samples: int = 1) -> None:
    """The simplex volume regulariser [B] and several points per batch."""
    g.add_argument("--volume-lambda", type=float, default=default_lambda,
                   help="weight of the volume regulariser of a simplex ([B]; default: %(default)s). With --volume-form benton (the default) "
                        "the loss subtracts lambda / log(Vol0^2 + 1e-4) * log(Vol^2 + 1e-4), Vol0 the volume of freshly initialised "
                        "networks, so lambda is on [B]'s scale ([B] used 1e-6); with --volume-form log it subtracts lambda * log Vol")
    g.add_argument("--volume-form", default="benton", choices=["benton", "log"],
                   help="scale of --volume-lambda: [B]'s normalised log(Vol^2 + 1e-4), or plain log Vol (default: %(default)s)")
    g.add_argument("--samples-per-step", type=int, default=default_samples,
                   help="points of the subspace per batch, one forward/backward each, losses averaged ([B] used 5; default: %(default)s)")


def validate_common_args(args: argparse.Namespace, counts: tuple[str, ...] = ("epochs", "batch_size", "grad_accum_steps", "bn_batches")) -> None:
    """Checks every recipe shares: positive counts and lr, subsets >= 1, holdout >= 0, a known dataset."""
    for name in counts:
        if getattr(args, name, 1) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_subset", "eval_subset"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "lr", 1.0) <= 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    layer_decay = getattr(args, "layer_decay", None)
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"--layer-decay must be in (0, 1] (timm uses e.g. 0.75), got {layer_decay}")
    if getattr(args, "samples_per_step", 1) < 1:
        raise ConfigError(f"--samples-per-step must be >= 1, got {args.samples_per_step}")
    check_history(getattr(args, "checkpoint_hist", DEFAULT_HISTORY))
    if getattr(args, "holdout", 0) < 0:
        raise ConfigError(f"--holdout must be >= 0, got {args.holdout}")
    check_dataset_name(getattr(args, "dataset", None))


def check_dataset_name(name: str | None) -> None:
    """Raise ConfigError for a --dataset value that is none of the known names (suggesting one)."""
    if name is None or name in DATASETS:
        return
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return
    close = difflib.get_close_matches(name, list(DATASETS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown --dataset {name!r}{hint}; valid: {', '.join(DATASETS)} or imagefolder:PATH")


def parse_with_config(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; defaults come from ``-c FILE.yaml`` when given, flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        p.set_defaults(**load_yaml_config(known.config, p))
    return p.parse_args(argv)


def load_yaml_config(path: str, p: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config; its keys must be flags of ``p`` (dashes or underscores)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
    valid = {a.dest for a in p._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == RESOLVED_KEY:   # a run's config.yaml used as -c: what it resolved is not a flag
            continue
        if dest not in valid:
            close = difflib.get_close_matches(dest, sorted(valid), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key '{key}'{hint}")
        out[dest] = value
    return out


#: the key of a run's config.yaml that holds what it resolved (input size, channels, mean/std): not a flag
RESOLVED_KEY = "resolved"


def save_config(args: argparse.Namespace | dict[str, Any], path: str) -> None:
    """Write the resolved flags as YAML, atomically (a temporary file renamed over ``path``)."""
    data = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=True))


def read_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}
