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

from .augment import CROP_MODES, MIXUP_MODES
from .checkpoint import DEFAULT_HISTORY
from .errors import ConfigError
from .run_folder import RESOLVED_KEY
from .settings import EXPORT_FORMATS, METHODS, subspace_choices
from .shape_registry import param_help


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
    g.add_argument("--holdout", type=int, default=0, help="hold N training examples out, never trained on (compare.py: its validation split, default 5000; "
                        "the other recipes recompute BatchNorm on them)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of the --train-subset / --eval-subset / --holdout draws (default: --seed)")
    g.add_argument("-j", "--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--bn-batches", type=int, default=20, help="batches used to recompute BatchNorm at each evaluated point")
    add_augment_args(p)


def add_augment_args(p: argparse.ArgumentParser) -> None:
    """timm's train.py augmentation flags: per-image transforms (default: the dataset's) and batch mixing."""
    g = p.add_argument_group("training augmentation (timm names; evaluation and BatchNorm images are never augmented)")
    g.add_argument("--hflip", type=float, default=None,
                   help="horizontal flip probability (default: the dataset's: 0 Fashion-MNIST, 0.5 CIFAR and image folders)")
    g.add_argument("--vflip", type=float, default=None, help="vertical flip probability (default: 0)")
    g.add_argument("--color-jitter", type=float, default=None,
                   help="brightness / contrast / saturation jitter factor, 0 = off (default: 0, image folders timm's 0.4)")
    g.add_argument("--train-crop-mode", default=None, choices=list(CROP_MODES),
                   help="random crop: pad (pad 4 px and crop back: [G]/[W]'s CIFAR crop), none, or timm's rrc | rkrc | rkrr "
                        "(default: none Fashion-MNIST, pad CIFAR, rrc image folders)")
    g.add_argument("--scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="area range of timm's random resized crop (default timm's 0.08 1; with --train-crop-mode rrc)")
    g.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="aspect ratio range of timm's random resized crop (default timm's 3/4 4/3; with --train-crop-mode rrc)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, timm's Mixup on each batch; 0 = off (default: %(default)s)")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha; 0 = off (default: %(default)s)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch (default: %(default)s)")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="with --mixup and --cutmix: probability of CutMix instead of mixup (default: %(default)s)")
    g.add_argument("--mixup-mode", default="batch", choices=list(MIXUP_MODES),
                   help="one mixing coefficient per batch, pair or element (default: %(default)s)")


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
    g.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor", metavar="BACKEND",
                   help="torch.compile the training forward with BACKEND (timm's flag; alone: inductor; default: eager, "
                        "or what `accelerate launch --dynamo_backend` says)")
    g.add_argument("--torchcompile-mode", type=str, default=None, metavar="MODE",
                   help="torch.compile mode: default | reduce-overhead | max-autotune (default: torch's)")
    g.add_argument("--log-with", default=None,
                   help="accelerate trackers for the metrics: tensorboard, wandb, mlflow, comet_ml, aim, ... or all; "
                        "files under OUTPUT/trackers (default: metrics.jsonl only)")
    g.add_argument("--export-format", default="both", choices=EXPORT_FORMATS,
                   help="trained networks as timm folders (timm.create_model('local-dir:PATH', pretrained=True)), "
                        "safetensors + JSON spec (subspaces.io.load_model), or both (default: %(default)s)")


def add_subspace_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("subspace")
    # choices and help read the shape registry when the parser is built: shapes registered by then are offered
    g.add_argument("--subspace", default="none", choices=subspace_choices(), help="shape trained from scratch (default: %(default)s: a standard network)")
    g.add_argument("--degree", type=int, default=None, help=param_help("degree"))
    g.add_argument("--bends", type=int, default=None, help=param_help("bends"))
    g.add_argument("--vertices", type=int, default=None, help=param_help("vertices"))
    g.add_argument("--layerwise", action="store_true", help="an independent point per layer ([W]'s layerwise variant)")
    g.add_argument("--sampling", default="global", choices=["global", "layerwise", "arc_length"], help="point sampling (default: %(default)s)")
    g.add_argument("--same-point", action="store_true", help="under DDP, draw the same point on every rank (default: a different point per rank)")
    g.add_argument("--beta", type=float, default=0.0, help="weight of the cos^2 regulariser between anchors ([W] used 1)")
    g.add_argument("--beta-params", default="weights", choices=["weights", "all"],
                   help="what cos^2 covers: the layer weights (conv / linear / attention, as [W]'s code) or all subspace parameters (default: %(default)s)")
    add_volume_args(g, default_lambda=0.0)
    g.add_argument("--include", nargs="*", default=None, help="parameter-name patterns that live in the subspace (default: all)")
    g.add_argument("--exclude", nargs="*", default=None, help="parameter-name patterns kept shared by all points")


def add_volume_args(g: Any, default_lambda: float, default_samples: int = 1) -> None:
    """The simplex volume regulariser [B] and several points per batch, added to ``g`` (a parser
    or one of its argument groups)."""
    g.add_argument("--volume-lambda", type=float, default=default_lambda,
                   help="weight of the volume regulariser of a simplex ([B]; default: %(default)s). With --volume-form benton (the default) "
                        "the loss subtracts lambda / log(Vol0^2 + 1e-4) * log(Vol^2 + 1e-4), Vol0 the volume of freshly initialised "
                        "networks, so lambda is on [B]'s scale ([B] used 1e-6); with --volume-form log it subtracts lambda * log Vol")
    g.add_argument("--volume-form", default="benton", choices=["benton", "log"],
                   help="scale of --volume-lambda: [B]'s normalised log(Vol^2 + 1e-4), or plain log Vol (default: %(default)s)")
    g.add_argument("--samples-per-step", type=int, default=default_samples,
                   help="points of the subspace per batch, one forward/backward each, losses averaged ([B] used 5; default: %(default)s)")


def parse_with_config(p: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      valid: set[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; defaults come from ``-c FILE.yaml`` when given, flags override them. The
    file's keys (dashes or underscores) must be in ``valid`` (a recipe's settings fields), by
    default the flags of ``p``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        p.set_defaults(**load_yaml_config(known.config, valid if valid is not None else set(vars(p.parse_args(argv)))))
    return p.parse_args(argv)


def load_yaml_config(path: str, valid: set[str]) -> dict[str, Any]:
    """Read a YAML config; its keys (dashes or underscores) must be in ``valid``."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
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


def add_snapshot_args(p: argparse.ArgumentParser, method: str) -> None:
    g = p.add_argument_group(method.upper())
    g.add_argument("--cycle", type=float, default=None, help="cycle length in epochs (FGE: [G] used 2-4; must be an even number of iterations)")
    g.add_argument("--cycle-iters", type=int, default=None, help="cycle length in iterations (optimiser updates), instead of --cycle")
    if method == "fge":
        g.add_argument("--lr-max", type=float, default=0.05, help="alpha1, the largest learning rate of a cycle (default: %(default)s, [G]'s ResNets)")
        g.add_argument("--lr-min", type=float, default=0.0005, help="alpha2, the smallest, at the snapshots (default: %(default)s)")
    else:
        g.add_argument("--lr-max", type=float, default=None, help="learning rate at the start of every cycle (default: --lr)")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol")
    g.add_argument("--seeds", type=int, default=1, help="replicates of the whole protocol; the table reports mean ± std (default: %(default)s)")
    g.add_argument("--budgets", default="1,2,3", help="budgets as multiples of B = --epochs (default: %(default)s)")
    g.add_argument("--methods", default=",".join(METHODS), help="methods to run (default: %(default)s; ind always runs)")
    g.add_argument("--fge-pretrain", type=float, default=0.8, help="FGE starts from Ind network 0 at this fraction of B ([G]: 0.8)")
    g.add_argument("--fge-cycle", type=float, default=None, help="FGE cycle in epochs (default: four cycles in the FGE part of 1B)")
    g.add_argument("--fge-cycle-iters", type=int, default=None, help="FGE cycle in iterations, instead of --fge-cycle")
    g.add_argument("--fge-lr-max", type=float, default=0.025, help="FGE alpha1 (default: %(default)s)")
    g.add_argument("--fge-lr-min", type=float, default=0.0005, help="FGE alpha2, at the snapshots (default: %(default)s)")
    g.add_argument("--sse-cycle", type=float, default=None, help="SSE cycle in epochs (default: B/2, two snapshots per B)")
    g.add_argument("--sse-cycle-iters", type=int, default=None, help="SSE cycle in iterations, instead of --sse-cycle")
    g.add_argument("--sse-lr-max", type=float, default=None, help="SSE learning rate at each restart (default: --lr)")
    g.add_argument("--subspace-budgets", default="1", help="budgets (multiples of B) at which a line / simplex is trained (default: %(default)s)")
    g.add_argument("--line-beta", type=float, default=1.0, help="cos^2 regulariser of the line [W] (default: %(default)s)")
    g.add_argument("--simplex-vertices", type=int, default=3, help="vertices of the simplex from scratch (default: %(default)s)")
    g.add_argument("--simplex-beta", type=float, default=1.0, help="cos^2 regulariser of the simplex (default: %(default)s)")
    g.add_argument("--samples", type=int, default=5, help="points per subspace ensemble (default: %(default)s)")
    g.add_argument("--espro-vertices", type=int, default=3, help="vertices of each ESPRO simplex, its Ind network included (default: %(default)s)")
    g.add_argument("--spro-epochs", type=int, default=1, help="SPRO epochs per added vertex (default: %(default)s)")
    g.add_argument("--spro-lr", type=float, default=0.01, help="SPRO learning rate, cosine per vertex ([B]: 0.01; default: %(default)s)")
    g.add_argument("--spro-samples-per-step", type=int, default=1, help="SPRO points per batch ([B]: 5; each counts in the cost; default: %(default)s)")
    g.add_argument("--spro-volume-lambda", type=float, default=1e-6, help="SPRO volume regulariser on [B]'s scale ([B]: 1e-6; default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=500, help="batch size of the evaluation passes (default: %(default)s)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per member (default: %(default)s)")
    g.add_argument("--jobs", type=int, default=0, help="members trained at once by each process, in worker processes (default: 0 = the "
                                                      "cores divided by --threads and by the processes of this machine; 1 in one process: in-process)")
    g.add_argument("--stop-after-runs", type=int, default=None, help="stop (resumably) after training this many member runs in this job")
