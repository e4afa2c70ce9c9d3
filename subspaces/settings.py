"""Typed settings of every run, from Python or from the recipes' command lines.

Each recipe has one settings class built from sections (:mod:`subspaces.settings_sections`:
model, data, optimisation, subspace, run); a field's name is the recipe's flag with underscores
(``batch_size`` is ``--batch-size``), and each field declares its type, default, help and flag
once (:mod:`subspaces.settings_base`); a recipe whose default differs redeclares only the default.
Construction validates: a value that cannot work raises :class:`~subspaces.errors.ConfigError`
naming the flag and a valid value, before any work starts. Nothing here parses a command line;
:mod:`subspaces.cli_flags` builds the recipes' parsers from these fields.

    cfg = TrainRunConfig(model="test_resnet", subspace="line", beta=1.0, epochs=2, output="runs/line")
    run_training(cfg)                       # what ``recipes/train.py --subspace line ...`` does
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .method_registry import DEFAULT_METHODS
from .settings_base import S, Settings, at_least, either, flag, new_default, one_of, setting
from .settings_sections import (
    COMPILE_MODES,
    EXPORT_FORMATS,
    POINT_SEED_STRIDE,
    SAMPLINGS,
    SHAPE_PARAMS,
    CosineConfig,
    DataConfig,
    LoaderConfig,
    MixingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    RuntimeConfig,
    StopConfig,
    SubspaceConfig,
    TrainConfig,
    TransformConfig,
    VolumeConfig,
    check_compile,
    check_dataset_name,
    check_model_name,
    subspace_choices,
)
from .shape_registry import get_shape, shape_names

__all__ = [
    "COMPILE_MODES", "EXPORT_FORMATS", "METHODS", "POINT_SEED_STRIDE", "SAMPLINGS", "SHAPE_NAMES", "SHAPE_PARAMS",
    "CompareConfig", "ComplexConfig", "ConnectConfig", "CosineConfig", "DataConfig", "FGEConfig", "LoaderConfig",
    "MixingConfig", "ModelConfig", "OptimConfig", "RunConfig", "RuntimeConfig", "SPROConfig", "SSEConfig", "Settings",
    "SnapshotConfig", "StopConfig", "SubspaceConfig", "TrainConfig", "TrainRunConfig", "TransformConfig", "VolumeConfig",
    "DataRun", "ModelRun", "RecipeConfig", "check_compile", "check_dataset_name", "check_model_name", "flag",
    "subspace_choices",
]

#: the ``--subspace`` values of the built-in shapes, as at import (:func:`subspace_choices`
#: also lists the shapes registered since)
SHAPE_NAMES = subspace_choices()
#: the methods the comparison runs by default (``ind`` always runs); any registered method may be named
METHODS = DEFAULT_METHODS


# ---------------------------------------------------------------------------------------- recipes
@dataclass(kw_only=True)
class TrainRunConfig(SubspaceConfig, TrainConfig, ModelConfig, DataConfig, RunConfig, StopConfig):
    """``recipes/train.py``: a standard network, or a line / curve / simplex from scratch [W].
    ``stop_after_epochs`` stops the job (resumably) after that many epochs."""

    def validate(self) -> None:
        super().validate()
        if self.subspace == "none":
            if self.samples_per_step > 1:
                raise ConfigError("--samples-per-step draws several points of a subspace per batch: add --subspace")
            if self.beta or self.volume_lambda:
                raise ConfigError("--beta / --volume-lambda regularise a subspace: add --subspace")
        if self.volume_lambda and get_shape(self.subspace).curve:
            raise ConfigError(f"--volume-lambda is the simplex volume regulariser: use it with --subspace {either(shape_names(curve=False))}")


@dataclass(kw_only=True)
class ConnectConfig(TrainConfig, DataConfig, RunConfig, StopConfig):
    """``recipes/connect.py``: a curve between two trained networks ``model_a`` and ``model_b``
    (run folders or .safetensors exports) [G], with [G]'s optimiser and schedule by default."""

    model_a: str = setting(help="first network: a run folder or a .safetensors export", positional=True)
    model_b: str = setting(help="second network (same architecture)", positional=True)
    curve: str = setting("bezier", "curve family (default: %(default)s)", choices=("bezier", "polychain"))
    degree: int | None = setting(None, "Bezier degree (default 2)")
    bends: int | None = setting(None, "polygonal chain bends (default 1)")
    sampling: str = setting("global", "t sampling (default: uniform per forward)", choices=SAMPLINGS)
    same_point: bool = setting(False, "under DDP, the same t on every rank")
    align: bool = setting(False, "permute B's hidden units to match A first (weight matching; B's function unchanged); "
                                 "details in alignment.json", negatable=True)
    dataset: str | None = new_default(None)
    opt: str = new_default("momentum", why="plain momentum SGD as [G] fitted curves")
    lr: float = new_default(0.015)
    epochs: int = new_default(20)
    sched: str = new_default("garipov")
    output: str = new_default("runs/connect")

    def validate(self) -> None:
        super().validate()
        one_of(self, "curve", ("bezier", "polychain"))
        one_of(self, "sampling", SAMPLINGS)
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


@dataclass(kw_only=True)
class SPROConfig(TrainConfig, DataConfig, RunConfig):
    """``recipes/simplex.py``: SPRO [B] from each of ``checkpoints`` (ESPRO for several),
    ``vertices`` per simplex, ``epochs`` per added vertex, ``samples`` points per simplex
    ensemble; [B]'s volume term and points per batch by default."""

    checkpoints: list[str] = setting(help="trained networks: run folders or .safetensors exports", factory=list, positional=True, nargs="+")
    vertices: int = setting(3, "vertices of each simplex, the trained network included (default: %(default)s)")
    samples: int = setting(5, "points sampled from each simplex for its ensemble (default: %(default)s)")
    volume_lambda: float = new_default(1e-6)
    samples_per_step: int = new_default(5)
    lr: float = new_default(0.01)
    dataset: str | None = new_default(None)
    output: str = new_default("runs/simplex")

    def validate(self) -> None:
        super().validate()
        if not self.checkpoints:
            raise ConfigError("give at least one trained network (a run folder or a .safetensors export) to grow a simplex from")
        if self.vertices < 2:
            raise ConfigError(f"--vertices {self.vertices}: a simplex needs at least 2 vertices")
        at_least(self, 1, "samples")


@dataclass(kw_only=True)
class ComplexConfig(TrainConfig, DataConfig, RunConfig):
    """``recipes/complex.py``: a mode-connecting simplicial complex [B] joining the trained
    networks ``checkpoints`` through ``shared`` vertices, each trained ``epochs`` epochs."""

    checkpoints: list[str] = setting(help="the trained networks (modes): run folders or .safetensors exports, 2 or more",
                                     factory=list, positional=True, nargs="*")
    shared: int = setting(2, "shared vertices m, trained one at a time (default: %(default)s)")
    samples: int = setting(10, "uniform points evaluated in each simplex (default: %(default)s)")
    ensemble_members: int = setting(10, "points drawn across the complex for its largest ensemble (default: %(default)s)")
    mode_epochs: float | None = setting(None, "B, the epochs of one mode, for the cost in B (default: read from the first mode's config.yaml)")
    grid: int = setting(11, "grid points per side of the plane figure; 0: no figure (default: %(default)s)")
    volume_lambda: float = new_default(0.1)
    samples_per_step: int = new_default(5)
    lr: float = new_default(0.005)
    weight_decay: float = new_default(0.0)
    dataset: str | None = new_default(None)
    output: str = new_default("runs/complex")

    def validate(self) -> None:
        super().validate()
        if len(self.checkpoints) < 2:
            raise ConfigError(f"got {len(self.checkpoints)} trained network(s): a complex joins at least 2 modes; pass 2 or more run folders")
        at_least(self, 1, "shared", "samples", "ensemble_members")
        if self.grid < 0:
            raise ConfigError(f"--grid must be >= 0 (0: no figure), got {self.grid}")
        if self.mode_epochs is not None and self.mode_epochs <= 0:
            raise ConfigError(f"--mode-epochs must be > 0, got {self.mode_epochs}")


@dataclass(kw_only=True)
class SnapshotConfig(StopConfig):
    """The cycle of a snapshot run, in epochs (``cycle``) or iterations (``cycle_iters``)."""

    cycle: float | None = setting(None, "cycle length in epochs (FGE: [G] used 2-4; must be an even number of iterations)")
    cycle_iters: int | None = setting(None, "cycle length in iterations (optimiser updates), instead of --cycle")

    def validate(self) -> None:
        super().validate()
        if self.cycle is None and self.cycle_iters is None:
            raise ConfigError("give the cycle length: --cycle EPOCHS (e.g. 2, as in [G]) or --cycle-iters N")


@dataclass(kw_only=True)
class FGEConfig(SnapshotConfig, TrainConfig, DataConfig, RunConfig):
    """``recipes/fge.py``: FGE [G] from the trained network ``checkpoint`` (a run folder with
    its optimiser state), lr cycling ``lr_max`` (alpha1) -> ``lr_min`` (alpha2) -> ``lr_max``."""

    checkpoint: str | None = setting(None, "trained network: a run folder of recipes/train.py, or a .safetensors export", positional=True, nargs="?")
    lr_max: float = setting(0.05, "alpha1, the largest learning rate of a cycle (default: %(default)s, [G]'s ResNets)")
    lr_min: float = setting(0.0005, "alpha2, the smallest, at the snapshots (default: %(default)s)")
    opt: str = new_default("momentum", why="plain momentum SGD as [G]'s FGE")
    epochs: int = new_default(4)
    sched: str = new_default("none")
    dataset: str | None = new_default(None)
    output: str = new_default("runs/fge")

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

    lr_max: float | None = setting(None, "learning rate at the start of every cycle (default: --lr)")
    epochs: int = new_default(12)
    sched: str = new_default("none")
    output: str = new_default("runs/sse")

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

    seeds: int = setting(1, "replicates of the whole protocol; the table reports mean ± std (default: %(default)s)")
    budgets: str = setting("1,2,3", "budgets as multiples of B = --epochs (default: %(default)s)")
    methods: str = setting(",".join(METHODS), "methods to run (default: %(default)s; ind always runs)")
    fge_pretrain: float = setting(0.8, "FGE starts from Ind network 0 at this fraction of B ([G]: 0.8)")
    fge_cycle: float | None = setting(None, "FGE cycle in epochs (default: four cycles in the FGE part of 1B)")
    fge_cycle_iters: int | None = setting(None, "FGE cycle in iterations, instead of --fge-cycle")
    fge_lr_max: float = setting(0.025, "FGE alpha1 (default: %(default)s)")
    fge_lr_min: float = setting(0.0005, "FGE alpha2, at the snapshots (default: %(default)s)")
    sse_cycle: float | None = setting(None, "SSE cycle in epochs (default: B/2, two snapshots per B)")
    sse_cycle_iters: int | None = setting(None, "SSE cycle in iterations, instead of --sse-cycle")
    sse_lr_max: float | None = setting(None, "SSE learning rate at each restart (default: --lr)")
    subspace_budgets: str = setting("1", "budgets (multiples of B) at which a line / simplex is trained (default: %(default)s)")
    line_beta: float = setting(1.0, "cos^2 regulariser of the line [W] (default: %(default)s)")
    simplex_vertices: int = setting(3, "vertices of the simplex from scratch (default: %(default)s)")
    simplex_beta: float = setting(1.0, "cos^2 regulariser of the simplex (default: %(default)s)")
    samples: int = setting(5, "points per subspace ensemble (default: %(default)s)")
    espro_vertices: int = setting(3, "vertices of each ESPRO simplex, its Ind network included (default: %(default)s)")
    spro_epochs: int = setting(1, "SPRO epochs per added vertex (default: %(default)s)")
    spro_lr: float = setting(0.01, "SPRO learning rate, cosine per vertex ([B]: 0.01; default: %(default)s)")
    spro_samples_per_step: int = setting(1, "SPRO points per batch ([B]: 5; each counts in the cost; default: %(default)s)")
    spro_volume_lambda: float = setting(1e-6, "SPRO volume regulariser on [B]'s scale ([B]: 1e-6; default: %(default)s)")
    eval_batch_size: int = setting(500, "batch size of the evaluation passes (default: %(default)s)")
    threads: int = setting(1, "torch CPU threads per member (default: %(default)s)")
    jobs: int = setting(0, "members trained at once by each process, in worker processes (default: 0 = the "
                           "cores divided by --threads and by the processes of this machine; 1 in one process: in-process)")
    stop_after_runs: int | None = setting(None, "stop (resumably) after training this many member runs in this job")
    model: str = new_default("test_resnet")
    train_subset: int | None = new_default(10000)
    eval_subset: int | None = new_default(10000)
    holdout: int = new_default(5000)
    batch_size: int = new_default(64)
    bn_batches: int = new_default(10)
    epochs: int = new_default(20)
    output: str = new_default("runs/compare")
    channels_last: bool = new_default(True, why="the default compare runs faster end to end with it (docs/performance.md §7); "
                                                "measure before keeping it for another model")

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
        point per batch, not evaluated by its own loop (the compare predicts every network a member
        contributes: :func:`subspaces.compare_eval.evaluate_member`), with ``changes`` (seed, epochs, shape...)."""
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
