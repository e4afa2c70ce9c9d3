"""The sections the recipes' settings are built from: the model, the data and its augmentation,
the optimisation, how the job runs, the regularisers, the subspace and the run folder.

Each field is one setting, declared once: its type, default, help and flag (see
:mod:`subspaces.settings_base`); a section validates its own fields at construction, raising
:class:`~subspaces.errors.ConfigError` that names the flag and a valid value.
:class:`TrainConfig`, what the training loop reads, is made of several of them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
import yaml

from .augment import CROP_MODES, MIXUP_MODES, augmentation_from, check_mixup, for_dataset
from .checkpoint import DEFAULT_HISTORY, check_history
from .data import DATASETS
from . import shapes  # noqa: F401  (importing it registers the built-in shapes that subspace_choices lists)
from .errors import ConfigError
from .sampling import SAMPLING_MODES
from .settings_base import Settings, at_least, either, flag, one_of, setting
from .shape_registry import get_shape, param_help, param_owners, shape_names

#: rank r of a distributed run draws its points from seed + POINT_SEED_STRIDE * r: a prime larger
#: than every seed offset the comparison gives its members, so no rank repeats another's stream
POINT_SEED_STRIDE = 100_003
#: how the points of a subspace are drawn per step: one for the whole network, one per layer, or
#: uniformly in arc length (curves)
SAMPLINGS = SAMPLING_MODES
MIXED_PRECISIONS = ("no", "bf16", "fp16")
EXPORT_FORMATS = ("both", "timm", "safetensors")
#: torch.compile's modes (``torch.compile(mode=...)``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the settings fields that registered shapes take as constructor keywords (ShapeParam names)
SHAPE_PARAMS = ("degree", "bends", "vertices")


def check_model_name(name: str) -> None:
    """Raise ConfigError for a name timm does not know, suggesting close names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"unknown timm model '{name}'{hint}")


def check_dataset_name(name: str | None) -> None:
    """Raise ConfigError for a dataset that is none of the known names (suggesting one)."""
    if name is None or name in DATASETS:
        return
    if name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return
    close = difflib.get_close_matches(name, list(DATASETS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown --dataset {name!r}{hint}; valid: {', '.join(DATASETS)} or imagefolder:PATH")


def check_compile(backend: str | None, mode: str | None) -> None:
    """ConfigError unless ``backend`` is None or one of torch.compile's backends (debug ones such
    as ``eager`` / ``aot_eager`` included) and ``mode`` is None or one of :data:`COMPILE_MODES`
    with a backend to go with it: a typo fails before any data is read, not at the first step."""
    if backend is not None:
        known = torch.compiler.list_backends(exclude_tags=())
        if backend not in known:
            raise ConfigError(f"--torchcompile {backend!r} is not a torch.compile backend; use one of {sorted(known)} (default: inductor)")
    if mode is not None:
        if mode not in COMPILE_MODES:
            raise ConfigError(f"--torchcompile-mode must be one of {COMPILE_MODES}, got {mode!r}")
        if backend is None:
            raise ConfigError(f"--torchcompile-mode {mode} needs --torchcompile [BACKEND] (it sets how, not whether, to compile)")


def subspace_choices() -> tuple[str, ...]:
    """The values ``--subspace`` accepts now: "none" (a standard network) and every registered shape."""
    return ("none", *shape_names())


@dataclass(kw_only=True)
class ModelConfig(Settings):
    """A fresh timm model: ``timm.create_model(model, pretrained, num_classes, in_chans, **model_kwargs)``;
    ``num_classes`` / ``in_chans`` / ``img_size`` default to the dataset's (or what the model needs)."""

    model: str = setting("resnet18", "timm model name (default: %(default)s)")
    pretrained: bool = setting(False, "start from timm's pretrained weights (needs them locally)")
    num_classes: int | None = setting(None, "classes (default: the dataset's)")
    in_chans: int | None = setting(None, "input channels (default: the dataset's)")
    img_size: int | None = setting(None, "input side in pixels (default: the dataset's, or what the model needs)")
    model_kwargs: dict[str, Any] | None = setting(None, "extra timm.create_model kwargs as YAML, e.g. '{drop_rate: 0.1}'",
                                                  parse=yaml.safe_load)

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "num_classes", "img_size")
        if self.in_chans is not None and self.in_chans not in (1, 3):
            raise ConfigError(f"--in-chans must be 1 or 3, got {self.in_chans}")
        check_model_name(self.model)


@dataclass(kw_only=True)
class LoaderConfig(Settings):
    """What both the data and the training loop read: loader processes, and the batches that
    recompute BatchNorm at each evaluated point."""

    workers: int = setting(0, "data loader worker processes", aliases=("-j",))
    bn_batches: int = setting(20, "batches used to recompute BatchNorm at each evaluated point")

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "bn_batches")
        at_least(self, 0, "workers")


@dataclass(kw_only=True)
class TransformConfig(Settings):
    """The training images' per-image augmentation (:class:`subspaces.augment.Augmentation`);
    None: the dataset's default (checked against the dataset by :class:`DataConfig`)."""

    hflip: float | None = setting(None, "horizontal flip probability (default: the dataset's: 0 Fashion-MNIST, 0.5 CIFAR and image folders)")
    vflip: float | None = setting(None, "vertical flip probability (default: 0)")
    color_jitter: float | None = setting(None, "brightness / contrast / saturation jitter factor, 0 = off (default: 0, image folders timm's 0.4)")
    train_crop_mode: str | None = setting(
        None, "random crop: pad (pad 4 px and crop back: [G]/[W]'s CIFAR crop), none, or timm's rrc | rkrc | rkrr "
              "(default: none Fashion-MNIST, pad CIFAR, rrc image folders)", choices=CROP_MODES)
    scale: tuple[float, float] | None = setting(
        None, "area range of timm's random resized crop (default timm's 0.08 1; with --train-crop-mode rrc)", nargs=2, metavar=("LO", "HI"))
    ratio: tuple[float, float] | None = setting(
        None, "aspect ratio range of timm's random resized crop (default timm's 3/4 4/3; with --train-crop-mode rrc)", nargs=2, metavar=("LO", "HI"))


@dataclass(kw_only=True)
class DataConfig(TransformConfig, LoaderConfig):
    """What the run trains and evaluates on (see :func:`subspaces.data.build_datasets`) and how
    its training images are augmented. ``dataset`` None: the dataset a trained network was made
    for (recipes that start from trained networks). The subsets and the held-out split are drawn
    with ``data_seed`` (None: the run's ``seed``), so runs that differ only in ``seed`` can share
    their images."""

    dataset: str | None = setting("fashion-mnist", "fashion-mnist | cifar10 | cifar100 | imagefolder:PATH (default: %(default)s)")
    data_dir: str | None = setting(None, "dataset folder (default: $SUBSPACES_DATA, the Debian package, or the cache)")
    train_subset: int | None = setting(None, "use only N training examples (quick runs)")
    eval_subset: int | None = setting(None, "use only N evaluation examples")
    holdout: int = setting(0, "hold N training examples out, never trained on (compare.py: its validation split, default 5000; "
                              "the other recipes recompute BatchNorm on them)")
    data_seed: int | None = setting(None, "seed of the --train-subset / --eval-subset / --holdout draws (default: --seed)")

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "train_subset", "eval_subset")
        at_least(self, 0, "holdout", "data_seed")
        check_dataset_name(self.dataset)
        for_dataset(augmentation_from(self), self.dataset)


@dataclass(kw_only=True)
class OptimConfig(Settings):
    """Optimiser and scheduler, timm's (``create_optimizer_v2``, ``create_scheduler_v2`` stepped
    per update), with timm's flag names."""

    batch_size: int = setting(128, "batch size per process (default: %(default)s)", aliases=("-b",))
    opt: str = setting("sgd", "timm optimiser name: sgd (Nesterov), momentum (plain momentum SGD), adamw, lamb, ... "
                              "(default: %(default)s{why})")
    lr: float = setting(0.05, "learning rate (default: %(default)s)")
    weight_decay: float = setting(5e-4, "weight decay (default: %(default)s)")
    momentum: float = setting(0.9, "SGD momentum (default: %(default)s)")
    layer_decay: float | None = setting(None, "timm's layer-wise lr decay in (0, 1]: block l of L trains at lr * d^(L - l); "
                                              "anchors are then stored per parameter (default: off)")
    sched: str = setting("cosine", "timm scheduler: cosine | step | multistep | plateau | poly | tanh | none (default: %(default)s)")
    epochs: int = setting(10, "epochs (default: %(default)s)")
    warmup_epochs: int = setting(0, "warm-up epochs (default: %(default)s)")
    min_lr: float = setting(0.0, "scheduler's lowest learning rate (default: %(default)s)")
    smoothing: float = setting(0.0, "label smoothing (default: %(default)s)")

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "epochs", "batch_size")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or 0 < self.epochs <= self.warmup_epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs})")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1] (timm uses e.g. 0.75), got {self.layer_decay}")


@dataclass(kw_only=True)
class MixingConfig(Settings):
    """timm's ``Mixup`` on every training batch (soft targets, label smoothing included): mixup
    and CutMix draw their coefficient from Beta(alpha, alpha); an alpha of 0 is off."""

    mixup: float = setting(0.0, "mixup alpha, timm's Mixup on each batch; 0 = off (default: %(default)s)")
    cutmix: float = setting(0.0, "CutMix alpha; 0 = off (default: %(default)s)")
    mixup_prob: float = setting(1.0, "probability of mixing a batch (default: %(default)s)")
    mixup_switch_prob: float = setting(0.5, "with --mixup and --cutmix: probability of CutMix instead of mixup (default: %(default)s)")
    mixup_mode: str = setting("batch", "one mixing coefficient per batch, pair or element (default: %(default)s)", choices=MIXUP_MODES)


@dataclass(kw_only=True)
class RuntimeConfig(Settings):
    """How a training job runs: accelerate's precision and gradient accumulation, the device,
    the seed, evaluation and progress intervals, the checkpoints kept (>= 2, so a kill during a
    save leaves one), trackers, and torch.compile of the training forward (None: eager)."""

    grad_accum_steps: int = setting(1, "gradient accumulation steps (default: %(default)s)")
    mixed_precision: str | None = setting(
        None, "accelerate mixed precision; fp16 needs a GPU (default: the launcher's, from accelerate launch / accelerate config, else no)",
        choices=MIXED_PRECISIONS)
    cpu: bool = setting(False, "run on the CPU even when a GPU is present")
    log_with: str | None = setting(None, "accelerate trackers for the metrics: tensorboard, wandb, mlflow, comet_ml, aim, ... or all; "
                                         "files under OUTPUT/trackers (default: metrics.jsonl only)")
    seed: int = setting(42, "random seed (default: %(default)s)")
    eval_every: int = setting(1, "evaluate every N epochs (always after the last)")
    log_interval: int = setting(50, "steps between plain-text progress lines when not on a terminal")
    checkpoint_hist: int = setting(DEFAULT_HISTORY, "checkpoints kept in OUTPUT/checkpoints, the newest N, at least 2: a kill during a "
                                                    "save leaves the one before (default: %(default)s)", metavar="N")
    torchcompile: str | None = setting(None, "torch.compile the training forward with BACKEND (timm's flag; alone: inductor; default: eager, "
                                             "or what `accelerate launch --dynamo_backend` says)", nargs="?", const="inductor", metavar="BACKEND")
    torchcompile_mode: str | None = setting(None, "torch.compile mode: default | reduce-overhead | max-autotune (default: torch's)", metavar="MODE")
    channels_last: bool = setting(False, "channels-last (NHWC) memory layout for the convolutions, timm's flag: the model's 4-D weights "
                                         "and the inputs; a subspace binds the 4-D weights it mixes at each point in it (default: %(default)s{why})",
                                  negatable=True)

    def validate(self) -> None:
        super().validate()
        check_history(self.checkpoint_hist)
        at_least(self, 1, "grad_accum_steps", "eval_every", "log_interval")
        one_of(self, "mixed_precision", (None, *MIXED_PRECISIONS))
        check_compile(self.torchcompile, self.torchcompile_mode)


@dataclass(kw_only=True)
class CosineConfig(Settings):
    """[W]'s cos^2 regulariser between the anchors (docs/science.md §4)."""

    beta: float = setting(0.0, "weight of the cos^2 regulariser between anchors ([W] used 1)")
    beta_params: str = setting("weights", "what cos^2 covers: the layer weights (conv / linear / attention, as [W]'s code) or all subspace "
                                          "parameters (default: %(default)s)", choices=("weights", "all"))

    def validate(self) -> None:
        super().validate()
        one_of(self, "beta_params", ("weights", "all"))


@dataclass(kw_only=True)
class VolumeConfig(Settings):
    """[B]'s simplex volume regulariser (``volume_lambda`` on the ``volume_form`` scale,
    docs/science.md §5) and the points of the subspace drawn per batch."""

    volume_lambda: float = setting(
        0.0, "weight of the volume regulariser of a simplex ([B]; default: %(default)s). With --volume-form benton (the default) "
             "the loss subtracts lambda / log(Vol0^2 + 1e-4) * log(Vol^2 + 1e-4), Vol0 the volume of freshly initialised "
             "networks, so lambda is on [B]'s scale ([B] used 1e-6); with --volume-form log it subtracts lambda * log Vol")
    volume_form: str = setting("benton", "scale of --volume-lambda: [B]'s normalised log(Vol^2 + 1e-4), or plain log Vol (default: %(default)s)",
                               choices=("benton", "log"))
    samples_per_step: int = setting(1, "points of the subspace per batch, one forward/backward each, losses averaged ([B] used 5; "
                                       "default: %(default)s)")

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "samples_per_step")
        if self.volume_lambda < 0:
            raise ConfigError(f"--volume-lambda must be >= 0, got {self.volume_lambda}")
        one_of(self, "volume_form", ("benton", "log"))


@dataclass(kw_only=True)
class TrainConfig(CosineConfig, VolumeConfig, RuntimeConfig, MixingConfig, OptimConfig, LoaderConfig):
    """What the training loop reads: the optimisation, batch mixing, how the job runs, and the
    regularisers ([W]'s cos^2, [B]'s volume term; docs/science.md §4-§5)."""

    def validate(self) -> None:
        super().validate()
        check_mixup(self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob, self.mixup_mode, self.smoothing)


@dataclass(kw_only=True)
class SubspaceConfig(Settings):
    """The shape trained from scratch [W]: ``subspace`` "none" is a standard network, else a name
    registered with :func:`subspaces.shape_registry.register_shape`; ``degree``, ``bends``,
    ``vertices`` are the built-in shapes' sizes (default 2, 1, 3), None where a shape takes none."""

    subspace: str = setting("none", "shape trained from scratch (default: %(default)s: a standard network)", choices=subspace_choices)
    degree: int | None = setting(None, partial(param_help, "degree"))
    bends: int | None = setting(None, partial(param_help, "bends"))
    vertices: int | None = setting(None, partial(param_help, "vertices"))
    layerwise: bool = setting(False, "an independent point per layer ([W]'s layerwise variant)")
    sampling: str = setting("global", "point sampling (default: %(default)s)", choices=SAMPLINGS)
    same_point: bool = setting(False, "under DDP, draw the same point on every rank (default: a different point per rank)")
    include: list[str] | None = setting(None, "parameter-name patterns that live in the subspace (default: all)", nargs="*")
    exclude: list[str] | None = setting(None, "parameter-name patterns kept shared by all points", nargs="*")

    def validate(self) -> None:
        super().validate()
        one_of(self, "subspace", subspace_choices())
        one_of(self, "sampling", SAMPLINGS)
        sub = self.subspace
        params = {} if sub == "none" else {p.name: p for p in get_shape(sub).params}
        for name in SHAPE_PARAMS:
            if getattr(self, name) is not None and name not in params:
                raise ConfigError(f"--{name} applies to --subspace {either(param_owners(name))}, not --subspace {sub}")
        if sub == "none":
            for name in ("layerwise", "same_point"):
                if getattr(self, name):
                    raise ConfigError(f"{flag(name)} needs a --subspace ({either(shape_names())})")
        if self.sampling == "arc_length" and (sub == "none" or not get_shape(sub).curve):
            raise ConfigError(f"--sampling arc_length is defined for curves: --subspace {either(shape_names(curve=True))}")
        for p in params.values():
            value = getattr(self, p.name, None)
            if value is not None and value < p.minimum:
                raise ConfigError(f"--{p.name} {value} is invalid: it must be >= {p.minimum} ({p.why})")

    def shape_kwargs(self) -> dict[str, int]:
        """The keywords of the chosen shape's constructor (its registered params, with their
        defaults), e.g. ``{"degree": 2}`` for a bezier; ``{}`` for "none" and a line."""
        return {} if self.subspace == "none" else get_shape(self.subspace).kwargs_from(self)


@dataclass(kw_only=True)
class RunConfig(Settings):
    """The run folder ``output`` (``resume``: continue the stopped run there), the YAML file the
    settings came from (``config``), and how trained networks are exported."""

    output: str = setting("runs/train", "run directory (default: %(default)s)")
    resume: str | None = setting(None, "continue the stopped run in DIR (its config.yaml is used)", metavar="DIR")
    config: str | None = setting(None, "YAML file with the same keys as these flags", aliases=("-c",))
    export_format: str = setting("both", "trained networks as timm folders (timm.create_model('local-dir:PATH', pretrained=True)), "
                                         "safetensors + JSON spec (subspaces.io.load_model), or both (default: %(default)s)",
                                 choices=EXPORT_FORMATS)

    def validate(self) -> None:
        super().validate()
        one_of(self, "export_format", EXPORT_FORMATS)


@dataclass(kw_only=True)
class StopConfig(Settings):
    """A job that stops itself, resumably, after ``stop_after_epochs`` epochs (None: at the end)."""

    stop_after_epochs: int | None = setting(None, "stop (resumably) after this many epochs of this job")

    def validate(self) -> None:
        super().validate()
        at_least(self, 1, "stop_after_epochs")
