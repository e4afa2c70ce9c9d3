"""Typed settings of every run, from Python or from the recipes' command lines.

Each recipe has one settings class built from sections (model, data, optimisation, subspace,
run); a field's name is the recipe's flag with underscores (``batch_size`` is ``--batch-size``),
and its default is the recipe's. Construction validates: a value that cannot work raises
:class:`~subspaces.errors.ConfigError` naming the flag and a valid value, before any work starts.
Nothing here parses a command line; :mod:`subspaces.config` builds these from flags and YAML.

    cfg = TrainRunConfig(model="test_resnet", subspace="line", beta=1.0, epochs=2, output="runs/line")
    run_training(cfg)                       # what ``recipes/train.py --subspace line ...`` does
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import timm
import torch

from .augment import augmentation_from, check_mixup, for_dataset
from .checkpoint import DEFAULT_HISTORY, check_history
from .data import DATASETS
from . import shapes  # noqa: F401  (importing it registers the built-in shapes that subspace_choices lists)
from .errors import ConfigError
from .method_registry import DEFAULT_METHODS
from .shape_registry import get_shape, param_owners, shape_names

S = TypeVar("S", bound="Settings")

#: rank r of a distributed run draws its points from seed + POINT_SEED_STRIDE * r: a prime larger
#: than every seed offset the comparison gives its members, so no rank repeats another's stream
POINT_SEED_STRIDE = 100_003


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


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


def _at_least(settings: Any, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{flag(name)} must be >= {minimum}, got {value}")


def _one_of(settings: Any, name: str, allowed: tuple[Any, ...]) -> None:
    if getattr(settings, name) not in allowed:
        raise ConfigError(f"{flag(name)} {getattr(settings, name)!r}: use one of {', '.join(map(str, allowed))}")


class Settings:
    """Base of the settings classes: validation at construction (each section's ``validate``,
    chained through ``super()``), conversion to and from plain mappings."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a value that cannot work (sections extend this)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any], what: str = "settings") -> S:
        """Settings from a mapping of field names (a saved config.yaml, a worker's JSON); an
        unknown name is a ConfigError that suggests the closest field."""
        valid = cls.field_names()
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(str(key), sorted(valid), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{what}: unknown key '{key}'{hint}")
        return cls(**values)


# ---------------------------------------------------------------------------------------- sections
@dataclass(kw_only=True)
class ModelConfig(Settings):
    """A fresh timm model: ``timm.create_model(model, pretrained, num_classes, in_chans, **model_kwargs)``;
    ``num_classes`` / ``in_chans`` / ``img_size`` default to the dataset's (or what the model needs)."""

    model: str = "resnet18"
    pretrained: bool = False
    num_classes: int | None = None
    in_chans: int | None = None
    img_size: int | None = None
    model_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "num_classes", "img_size")
        if self.in_chans is not None and self.in_chans not in (1, 3):
            raise ConfigError(f"--in-chans must be 1 or 3, got {self.in_chans}")
        check_model_name(self.model)


@dataclass(kw_only=True)
class DataConfig(Settings):
    """What the run trains and evaluates on (see :func:`subspaces.data.build_datasets`), and the
    batches that recompute BatchNorm at each evaluated point. ``dataset`` None: the dataset a
    trained network was made for (recipes that start from trained networks). The subsets and the
    held-out split are drawn with ``data_seed`` (None: the run's ``seed``), so runs that differ
    only in ``seed`` can share their images."""

    dataset: str | None = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = None
    eval_subset: int | None = None
    holdout: int = 0
    data_seed: int | None = None
    workers: int = 0
    bn_batches: int = 20
    # training images' augmentation (subspaces.augment.Augmentation); None: the dataset's default
    hflip: float | None = None
    vflip: float | None = None
    color_jitter: float | None = None
    train_crop_mode: str | None = None
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "train_subset", "eval_subset", "bn_batches")
        _at_least(self, 0, "holdout", "workers")
        _at_least(self, 0, "data_seed")
        check_dataset_name(self.dataset)
        for_dataset(augmentation_from(self), self.dataset)


@dataclass(kw_only=True)
class TrainConfig(Settings):
    """What the training loop reads. Optimiser and scheduler are timm's (``create_optimizer_v2``,
    ``create_scheduler_v2`` stepped per update); the regularisers are [W]'s cos^2 (``beta``) and
    [B]'s volume term (``volume_lambda`` on the ``volume_form`` scale), see docs/science.md §4-§5.
    ``mixup`` / ``cutmix`` > 0 mix every training batch with timm's ``Mixup`` (soft targets,
    ``smoothing`` included)."""

    epochs: int = 10
    batch_size: int = 128
    opt: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    layer_decay: float | None = None
    sched: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    smoothing: float = 0.0
    mixup: float = 0.0              # timm's Mixup: Beta(alpha, alpha) of mixup, 0 = off
    cutmix: float = 0.0             # Beta(alpha, alpha) of CutMix, 0 = off
    mixup_prob: float = 1.0         # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # with both on: probability of CutMix instead of mixup
    mixup_mode: str = "batch"       # one mixing coefficient per batch, per pair or per element
    grad_accum_steps: int = 1
    mixed_precision: str | None = None   # None: the launcher's (accelerate config), else "no"
    cpu: bool = False
    log_with: str | None = None
    seed: int = 42
    workers: int = 0
    beta: float = 0.0
    beta_params: str = "weights"
    volume_lambda: float = 0.0
    volume_form: str = "benton"
    samples_per_step: int = 1
    bn_batches: int = 20
    eval_every: int = 1
    log_interval: int = 50
    checkpoint_hist: int = DEFAULT_HISTORY   # checkpoints kept (accelerate's total_limit); >= 2 so a kill mid-save leaves one
    torchcompile: str | None = None        # torch.compile backend of the training forward (timm's --torchcompile); None: eager
    torchcompile_mode: str | None = None   # torch.compile mode ("default", "reduce-overhead", "max-autotune"); None: torch's default

    def validate(self) -> None:
        super().validate()
        check_history(self.checkpoint_hist)
        _at_least(self, 1, "epochs", "batch_size", "grad_accum_steps", "samples_per_step", "bn_batches", "eval_every", "log_interval")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or 0 < self.epochs <= self.warmup_epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs})")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1] (timm uses e.g. 0.75), got {self.layer_decay}")
        if self.volume_lambda < 0:
            raise ConfigError(f"--volume-lambda must be >= 0, got {self.volume_lambda}")
        check_mixup(self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob, self.mixup_mode, self.smoothing)
        _one_of(self, "mixed_precision", (None, "no", "bf16", "fp16"))
        _one_of(self, "beta_params", ("weights", "all"))
        _one_of(self, "volume_form", ("benton", "log"))
        check_compile(self.torchcompile, self.torchcompile_mode)


#: torch.compile's modes (``torch.compile(mode=...)``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


def _or(names: tuple[str, ...]) -> str:
    """The shapes a message offers, as "a, b or c"."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else "(none registered)"


#: the ``--subspace`` values of the built-in shapes, as at import (:func:`subspace_choices`
#: also lists the shapes registered since)
SHAPE_NAMES = subspace_choices()
#: the methods the comparison runs by default (``ind`` always runs); any registered method may be named
METHODS = DEFAULT_METHODS
#: the settings fields that registered shapes take as constructor keywords (ShapeParam names)
SHAPE_PARAMS = ("degree", "bends", "vertices")


@dataclass(kw_only=True)
class SubspaceConfig(Settings):
    """The shape trained from scratch [W]: ``subspace`` "none" is a standard network, else a name
    registered with :func:`subspaces.shape_registry.register_shape`; ``degree``, ``bends``,
    ``vertices`` are the built-in shapes' sizes (default 2, 1, 3), None where a shape takes none."""

    subspace: str = "none"
    degree: int | None = None
    bends: int | None = None
    vertices: int | None = None
    layerwise: bool = False
    sampling: str = "global"
    same_point: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        _one_of(self, "subspace", subspace_choices())
        _one_of(self, "sampling", ("global", "layerwise", "arc_length"))
        sub = self.subspace
        params = {} if sub == "none" else {p.name: p for p in get_shape(sub).params}
        for name in SHAPE_PARAMS:
            if getattr(self, name) is not None and name not in params:
                raise ConfigError(f"--{name} applies to --subspace {_or(param_owners(name))}, not --subspace {sub}")
        if sub == "none":
            for name in ("layerwise", "same_point"):
                if getattr(self, name):
                    raise ConfigError(f"{flag(name)} needs a --subspace ({_or(shape_names())})")
        if self.sampling == "arc_length" and (sub == "none" or not get_shape(sub).curve):
            raise ConfigError(f"--sampling arc_length is defined for curves: --subspace {_or(shape_names(curve=True))}")
        for p in params.values():
            value = getattr(self, p.name, None)
            if value is not None and value < p.minimum:
                raise ConfigError(f"--{p.name} {value} is invalid: it must be >= {p.minimum} ({p.why})")

    def shape_kwargs(self) -> dict[str, int]:
        """The keywords of the chosen shape's constructor (its registered params, with their
        defaults), e.g. ``{"degree": 2}`` for a bezier; ``{}`` for "none" and a line."""
        return {} if self.subspace == "none" else get_shape(self.subspace).kwargs_from(self)


EXPORT_FORMATS = ("both", "timm", "safetensors")


@dataclass(kw_only=True)
class RunConfig(Settings):
    """The run folder ``output`` (``resume``: continue the stopped run there), the YAML file the
    settings came from (``config``), and how trained networks are exported."""

    output: str = "runs/train"
    resume: str | None = None
    config: str | None = None
    export_format: str = "both"

    def validate(self) -> None:
        super().validate()
        _one_of(self, "export_format", EXPORT_FORMATS)


# ---------------------------------------------------------------------------------------- recipes
@dataclass(kw_only=True)
class TrainRunConfig(SubspaceConfig, TrainConfig, ModelConfig, DataConfig, RunConfig):
    """``recipes/train.py``: a standard network, or a line / curve / simplex from scratch [W].
    ``stop_after_epochs`` stops the job (resumably) after that many epochs."""

    stop_after_epochs: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.subspace == "none":
            if self.samples_per_step > 1:
                raise ConfigError("--samples-per-step draws several points of a subspace per batch: add --subspace")
            if self.beta or self.volume_lambda:
                raise ConfigError("--beta / --volume-lambda regularise a subspace: add --subspace")
        if self.volume_lambda and get_shape(self.subspace).curve:
            raise ConfigError(f"--volume-lambda is the simplex volume regulariser: use it with --subspace {_or(shape_names(curve=False))}")
        _at_least(self, 1, "stop_after_epochs")


@dataclass(kw_only=True)
class ConnectConfig(TrainConfig, DataConfig, RunConfig):
    """``recipes/connect.py``: a curve between two trained networks ``model_a`` and ``model_b``
    (run folders or .safetensors exports) [G], with [G]'s optimiser and schedule by default."""

    model_a: str
    model_b: str
    curve: str = "bezier"
    degree: int | None = None
    bends: int | None = None
    sampling: str = "global"
    same_point: bool = False
    align: bool = False
    stop_after_epochs: int | None = None
    dataset: str | None = None
    opt: str = "momentum"
    lr: float = 0.015
    epochs: int = 20
    sched: str = "garipov"
    output: str = "runs/connect"

    def validate(self) -> None:
        super().validate()
        _one_of(self, "curve", ("bezier", "polychain"))
        _one_of(self, "sampling", ("global", "layerwise", "arc_length"))
        if self.degree is not None and self.curve != "bezier":
            raise ConfigError("--degree applies to --curve bezier, not polychain (use --bends)")
        if self.bends is not None and self.curve != "polychain":
            raise ConfigError("--bends applies to --curve polychain, not bezier (use --degree)")
        if self.sched not in ("garipov", "garipov-epoch", "none"):
            raise ConfigError(f"--sched {self.sched}: curve fitting uses [G]'s schedule ('garipov' per update, 'garipov-epoch' "
                              "per epoch as [G]'s code) or a constant lr ('none')")
        if self.degree is not None and self.degree < 1:
            raise ConfigError(f"--degree {self.degree} is invalid: it must be >= 1 (degree 1 is a line, 2 is [G]'s curve)")
        if self.bends is not None and self.bends < 0:
            raise ConfigError(f"--bends {self.bends} is invalid: it must be >= 0 (0 bends is a line, 1 is [G]'s chain)")
        _at_least(self, 1, "stop_after_epochs")


@dataclass(kw_only=True)
class SPROConfig(TrainConfig, DataConfig, RunConfig):
    """``recipes/simplex.py``: SPRO [B] from each of ``checkpoints`` (ESPRO for several),
    ``vertices`` per simplex, ``epochs`` per added vertex, ``samples`` points per simplex
    ensemble; [B]'s volume term and points per batch by default."""

    checkpoints: list[str] = field(default_factory=list)
    vertices: int = 3
    samples: int = 5
    volume_lambda: float = 1e-6
    samples_per_step: int = 5
    lr: float = 0.01
    dataset: str | None = None
    output: str = "runs/simplex"

    def validate(self) -> None:
        super().validate()
        if not self.checkpoints:
            raise ConfigError("give at least one trained network (a run folder or a .safetensors export) to grow a simplex from")
        if self.vertices < 2:
            raise ConfigError(f"--vertices {self.vertices}: a simplex needs at least 2 vertices")
        _at_least(self, 1, "samples")


@dataclass(kw_only=True)
class ComplexConfig(TrainConfig, DataConfig, RunConfig):
    """``recipes/complex.py``: a mode-connecting simplicial complex [B] joining the trained
    networks ``checkpoints`` through ``shared`` vertices, each trained ``epochs`` epochs."""

    checkpoints: list[str] = field(default_factory=list)
    shared: int = 2
    samples: int = 10
    ensemble_members: int = 10
    mode_epochs: float | None = None
    grid: int = 11
    volume_lambda: float = 0.1
    samples_per_step: int = 5
    lr: float = 0.005
    weight_decay: float = 0.0
    dataset: str | None = None
    output: str = "runs/complex"

    def validate(self) -> None:
        super().validate()
        if len(self.checkpoints) < 2:
            raise ConfigError(f"got {len(self.checkpoints)} trained network(s): a complex joins at least 2 modes; pass 2 or more run folders")
        _at_least(self, 1, "shared", "samples", "ensemble_members")
        if self.grid < 0:
            raise ConfigError(f"--grid must be >= 0 (0: no figure), got {self.grid}")
        if self.mode_epochs is not None and self.mode_epochs <= 0:
            raise ConfigError(f"--mode-epochs must be > 0, got {self.mode_epochs}")


@dataclass(kw_only=True)
class SnapshotConfig(Settings):
    """The cycle of a snapshot run, in epochs (``cycle``) or iterations (``cycle_iters``)."""

    cycle: float | None = None
    cycle_iters: int | None = None
    stop_after_epochs: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.cycle is None and self.cycle_iters is None:
            raise ConfigError("give the cycle length: --cycle EPOCHS (e.g. 2, as in [G]) or --cycle-iters N")
        _at_least(self, 1, "stop_after_epochs")


@dataclass(kw_only=True)
class FGEConfig(SnapshotConfig, TrainConfig, DataConfig, RunConfig):
    """``recipes/fge.py``: FGE [G] from the trained network ``checkpoint`` (a run folder with
    its optimiser state), lr cycling ``lr_max`` (alpha1) -> ``lr_min`` (alpha2) -> ``lr_max``."""

    checkpoint: str | None = None
    lr_max: float = 0.05
    lr_min: float = 0.0005
    opt: str = "momentum"
    epochs: int = 4
    sched: str = "none"
    dataset: str | None = None
    output: str = "runs/fge"

    def validate(self) -> None:
        if self.checkpoint is None:
            raise ConfigError("give the trained network to start from (a run folder), or --resume DIR")
        super().validate()
        if not self.lr_max > self.lr_min >= 0:
            raise ConfigError(f"FGE needs --lr-max > --lr-min >= 0 (alpha1 > alpha2), got {self.lr_max} and {self.lr_min}")


@dataclass(kw_only=True)
class SSEConfig(SnapshotConfig, TrainConfig, ModelConfig, DataConfig, RunConfig):
    """``recipes/sse.py``: snapshot ensembles [S], cosine from ``lr_max`` (default ``lr``)
    restarted every cycle."""

    lr_max: float | None = None
    epochs: int = 12
    sched: str = "none"
    output: str = "runs/sse"

    def validate(self) -> None:
        super().validate()
        if self.lr_max is not None and self.lr_max <= 0:
            raise ConfigError(f"--lr-max must be > 0, got {self.lr_max}")


@dataclass(kw_only=True)
class CompareConfig(TrainConfig, ModelConfig, DataConfig, RunConfig):
    """``recipes/compare.py``: the equal-budget comparison (docs/science.md §7). B = ``epochs``;
    the protocol's own numbers are derived by :func:`subspaces.compare_plan.make_plan`.
    ``train_subset`` / ``eval_subset`` 0 mean the whole split; ``holdout`` is the validation split
    (never trained on), on which every row is evaluated beside the test split."""

    seeds: int = 1
    budgets: str = "1,2,3"
    methods: str = ",".join(METHODS)
    fge_pretrain: float = 0.8
    fge_cycle: float | None = None
    fge_cycle_iters: int | None = None
    fge_lr_max: float = 0.025
    fge_lr_min: float = 0.0005
    sse_cycle: float | None = None
    sse_cycle_iters: int | None = None
    sse_lr_max: float | None = None
    subspace_budgets: str = "1"
    line_beta: float = 1.0
    simplex_vertices: int = 3
    simplex_beta: float = 1.0
    samples: int = 5
    espro_vertices: int = 3
    spro_epochs: int = 1
    spro_lr: float = 0.01
    spro_samples_per_step: int = 1
    spro_volume_lambda: float = 1e-6
    eval_batch_size: int = 500
    threads: int = 1
    jobs: int = 0
    stop_after_runs: int | None = None
    model: str = "test_resnet"
    train_subset: int | None = 10000
    eval_subset: int | None = 10000
    holdout: int = 5000
    batch_size: int = 64
    bn_batches: int = 10
    epochs: int = 20
    output: str = "runs/compare"

    def __post_init__(self) -> None:
        for name in ("train_subset", "eval_subset"):
            if getattr(self, name) == 0:   # 0: the whole split
                setattr(self, name, None)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.stop_after_runs is not None and self.stop_after_runs < 0:
            raise ConfigError(f"--stop-after-runs must be >= 0, got {self.stop_after_runs}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if self.threads < 1:
            raise ConfigError(f"--threads (torch threads per member) must be >= 1, got {self.threads}")
        if self.jobs < 0:
            raise ConfigError(f"--jobs must be >= 0 (0: as many as the cores allow at --threads each), got {self.jobs}")

    def member(self, output: str, settings: type[S] | None = None, **changes: Any) -> Any:
        """The settings of one member run of the comparison (``settings``, default
        :class:`TrainRunConfig`): this run's model, data and optimisation, no regulariser, one
        point per batch, evaluated once after its last epoch, with ``changes`` (seed, epochs, shape...)."""
        cls = settings or TrainRunConfig
        base = {name: getattr(self, name) for name in self.field_names() & cls.field_names()}
        # every member draws its images with the compare's data seed: members differ only in their own seed
        base.update(output=output, resume=None, config=None, eval_every=10**9, beta=0.0, beta_params="weights",
                    volume_lambda=0.0, volume_form="benton", samples_per_step=1,
                    data_seed=self.data_seed if self.data_seed is not None else self.seed)
        base.update(changes)
        return cls(**base)


#: the settings of runs that create a fresh timm model (``build_data_and_model``)
ModelRun = TrainRunConfig | SSEConfig | CompareConfig
#: the settings of runs that start from trained networks and find their data from them
DataRun = ConnectConfig | SPROConfig | ComplexConfig | FGEConfig
#: the settings of any recipe: a run folder (RunConfig) trained with TrainConfig
RecipeConfig = TrainRunConfig | ConnectConfig | SPROConfig | ComplexConfig | FGEConfig | SSEConfig | CompareConfig
