"""Typed settings of one training run, for :class:`subspaces.training.Trainer` from Python.

The recipes build the same settings from their flags (an ``argparse.Namespace`` with these
names); a program builds a :class:`TrainConfig` instead and needs no command line. The names
are timm's ``train.py`` flag names with underscores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError


@dataclass
class TrainConfig:
    """What the training loop reads. Optimiser and scheduler are timm's (``create_optimizer_v2``,
    ``create_scheduler_v2`` stepped per update); the regularisers are [W]'s cos^2 (``beta``) and
    [B]'s volume term (``volume_lambda`` on the ``volume_form`` scale), see docs/science.md §4-§5."""

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
    checkpoint_hist: int = 2   # checkpoints kept (accelerate's total_limit); >= 2 so a kill mid-save leaves one

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "samples_per_step", "bn_batches", "eval_every", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_hist < 2:
            raise ConfigError(f"TrainConfig.checkpoint_hist must be >= 2 (a kill during a save would leave no checkpoint), got {self.checkpoint_hist}")
        if self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs < max(self.epochs, 1) and self.warmup_epochs:
            raise ConfigError(f"TrainConfig.warmup_epochs {self.warmup_epochs} must be in [0, epochs {self.epochs})")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"TrainConfig.layer_decay must be in (0, 1] (timm uses e.g. 0.75), got {self.layer_decay}")
        choices = {"mixed_precision": (None, "no", "bf16", "fp16"), "beta_params": ("weights", "all"), "volume_form": ("benton", "log")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: use one of {', '.join(map(str, allowed))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
