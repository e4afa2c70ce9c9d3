"""Training augmentation in timm's names: image transforms (:class:`Augmentation`) and batch mixing.

:class:`Augmentation` holds the per-image settings :func:`subspaces.data.build_datasets` hands to
timm's ``create_transform`` (``--hflip``, ``--vflip``, ``--color-jitter``, ``--train-crop-mode``,
``--scale``, ``--ratio``); a field left ``None`` takes the dataset's default (:data:`NO_AUGMENTATION`
for Fashion-MNIST, :data:`CIFAR_AUGMENTATION` for CIFAR, :data:`TIMM_AUGMENTATION` for image
folders). :func:`batch_mixer` builds timm's ``Mixup`` (mixup / CutMix, ``--mixup``, ``--cutmix``,
...) that the training step applies to each batch; :func:`check_mixup` validates its settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .errors import ConfigError

#: crop modes of timm's training transform (RandomResizedCrop, or its resize-keep-ratio variants)
TIMM_CROP_MODES = ("rrc", "rkrc", "rkrr")
#: all crop modes: "pad" is the papers' CIFAR crop (pad the native image by PAD_PIXELS, crop it
#: back at random), "none" no geometric augmentation
CROP_MODES = ("pad", "none", *TIMM_CROP_MODES)
PAD_PIXELS = 4
MIXUP_MODES = ("batch", "pair", "elem")


@dataclass(frozen=True)
class Augmentation:
    """Per-image training augmentation; ``None`` = the dataset's default. Errors name the flags.

    ``hflip`` / ``vflip``: flip probabilities in [0, 1]; ``color_jitter``: brightness, contrast and
    saturation factor >= 0 (0 = off); ``train_crop_mode``: one of :data:`CROP_MODES`; ``scale`` /
    ``ratio``: ``(lo, hi)`` of timm's RandomResizedCrop (area fraction in (0, 1], aspect ratio > 0),
    only with a timm crop mode.
    """

    hflip: float | None = None
    vflip: float | None = None
    color_jitter: float | None = None
    train_crop_mode: str | None = None
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"--{name} is a probability: it must be in [0, 1], got {value}")
        if self.color_jitter is not None and not self.color_jitter >= 0:
            raise ConfigError(f"--color-jitter must be >= 0 (0 = off, timm uses 0.4), got {self.color_jitter}")
        if self.train_crop_mode is not None and self.train_crop_mode not in CROP_MODES:
            raise ConfigError(f"--train-crop-mode {self.train_crop_mode!r}: use one of {', '.join(CROP_MODES)}")
        for name, upper in (("scale", 1.0), ("ratio", None)):
            value = getattr(self, name)
            if value is None:
                continue
            pair = _pair(value)
            bound = f"0 < LO <= HI <= {upper:g}" if upper is not None else "0 < LO <= HI"
            if pair is None or not 0 < pair[0] <= pair[1] or (upper is not None and pair[1] > upper):
                raise ConfigError(f"--{name} takes two numbers LO HI with {bound}, got {value}")
            object.__setattr__(self, name, pair)
            if self.train_crop_mode is not None and self.train_crop_mode not in TIMM_CROP_MODES:
                raise ConfigError(f"--{name} sets timm's random resized crop: use it with --train-crop-mode "
                                  f"{' | '.join(TIMM_CROP_MODES)}, not {self.train_crop_mode}")

    def resolved(self, defaults: Augmentation) -> Augmentation:
        """These settings with every ``None`` taken from ``defaults``."""
        return replace(defaults, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})

    def is_off(self) -> bool:
        """Whether a resolved augmentation changes nothing (no crop, no flip, no jitter)."""
        return self.train_crop_mode == "none" and not self.hflip and not self.vflip and not self.color_jitter


#: Fashion-MNIST's default: none, so that train and BatchNorm images are the same tensors
NO_AUGMENTATION = Augmentation(hflip=0.0, vflip=0.0, color_jitter=0.0, train_crop_mode="none")
#: the papers' CIFAR protocol ([G], [W], [B]): RandomCrop(32, padding=4) + horizontal flip
CIFAR_AUGMENTATION = Augmentation(hflip=0.5, vflip=0.0, color_jitter=0.0, train_crop_mode="pad")
#: timm's ``create_transform(is_training=True)`` defaults, used for image folders
TIMM_AUGMENTATION = Augmentation(hflip=0.5, vflip=0.0, color_jitter=0.4, train_crop_mode="rrc")


def dataset_default(dataset: str | None) -> Augmentation:
    """The training augmentation a dataset gets unless told otherwise: none for Fashion-MNIST,
    the papers' crop + flip for CIFAR, timm's defaults for an image folder (or an unknown name)."""
    if dataset == "fashion-mnist":
        return NO_AUGMENTATION
    if dataset in ("cifar10", "cifar100"):
        return CIFAR_AUGMENTATION
    return TIMM_AUGMENTATION


def for_dataset(settings: Augmentation, dataset: str | None) -> Augmentation:
    """``settings`` with the dataset's defaults filled in; ConfigError for a crop that needs images
    of one native size (pad, none) on an image folder."""
    resolved = settings.resolved(dataset_default(dataset))
    if str(dataset).startswith("imagefolder:") and resolved.train_crop_mode not in TIMM_CROP_MODES:
        raise ConfigError(f"--train-crop-mode {resolved.train_crop_mode} needs images of one native size (fashion-mnist, "
                          f"cifar); for an image folder use {' | '.join(TIMM_CROP_MODES)}")
    return resolved


def _pair(value: Any) -> tuple[float, float] | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        return None
    try:
        return float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None


def augmentation_from(settings: Any) -> Augmentation:
    """The :class:`Augmentation` named by ``settings``' attributes (parsed flags); missing ones are None."""
    return Augmentation(**{f.name: getattr(settings, f.name, None) for f in fields(Augmentation)})


# ---------------------------------------------------------------------------------------- mixing
def check_mixup(mixup: float, cutmix: float, mixup_prob: float, mixup_switch_prob: float, mixup_mode: str,
                smoothing: float) -> None:
    """ConfigError for a mixing setting outside its range, naming its flag."""

    def name(field: str) -> str:
        return "--" + field.replace("_", "-")

    for field, value in (("mixup", mixup), ("cutmix", cutmix)):
        if not value >= 0:
            raise ConfigError(f"{name(field)} is a Beta(alpha, alpha) parameter: it must be >= 0 (0 = off, timm uses e.g. "
                              f"{'0.8' if field == 'mixup' else '1.0'}), got {value}")
    for field, value in (("mixup_prob", mixup_prob), ("mixup_switch_prob", mixup_switch_prob)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{name(field)} is a probability: it must be in [0, 1], got {value}")
    if mixup_mode not in MIXUP_MODES:
        raise ConfigError(f"{name('mixup_mode')} {mixup_mode!r}: use one of {', '.join(MIXUP_MODES)}")
    if not 0 <= smoothing < 1:
        raise ConfigError(f"{name('smoothing')} is label smoothing: it must be in [0, 1), got {smoothing}")


def batch_mixer(settings: Any, num_classes: int) -> Any:
    """timm's ``Mixup`` from ``settings``' ``mixup``, ``cutmix``, ``mixup_prob``, ``mixup_switch_prob``,
    ``mixup_mode`` and ``smoothing`` (its label smoothing), or None when both alphas are 0.

    ``mixer(x, y)`` mixes ``x [B, C, H, W]`` in place with its reverse ``x.flip(0)`` and returns it
    with soft targets ``[B, num_classes]``: ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``.
    """
    from timm.data import Mixup

    values = {name: getattr(settings, name, default) for name, default in
              (("mixup", 0.0), ("cutmix", 0.0), ("mixup_prob", 1.0), ("mixup_switch_prob", 0.5), ("mixup_mode", "batch"), ("smoothing", 0.0))}
    check_mixup(**values)
    if not values["mixup"] and not values["cutmix"]:
        return None
    return Mixup(mixup_alpha=float(values["mixup"]), cutmix_alpha=float(values["cutmix"]), prob=float(values["mixup_prob"]),
                 switch_prob=float(values["mixup_switch_prob"]), mode=values["mixup_mode"],
                 label_smoothing=float(values["smoothing"]), num_classes=int(num_classes))


def mix_batch(mixer: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x mixed in place, soft targets [B, K])`` from timm's ``Mixup``. timm pairs image i with
    image B-1-i and needs B even: an odd batch (an epoch's last) mixes its first B-1 images and
    keeps the last one as it is (its target one-hot, label-smoothed). No host synchronisation."""
    from timm.data.mixup import mixup_target

    even = y.shape[0] - y.shape[0] % 2
    if even == y.shape[0]:
        return mixer(x, y)
    if even:
        _, head = mixer(x[:even], y[:even])   # a view: timm mixes it in place, so x holds the mix
    tail = mixup_target(y[even:], mixer.num_classes, 1.0, mixer.label_smoothing)
    return x, torch.cat([head, tail]) if even else tail
