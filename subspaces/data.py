"""Datasets and data loaders for ``subspaces``: the bundle a run trains and evaluates on.

:func:`build_datasets` turns any supported dataset into a :class:`DataBundle` of
ready-to-use ``torch.utils.data.Dataset`` objects that yield ``(x, y)`` with ``x`` a
float32 tensor ``[C, H, W]`` (normalised) and ``y`` a Python ``int`` class index;
:func:`make_loader` makes their loaders. Where the files are found is
:mod:`subspaces.data_sources` (Fashion-MNIST offline, CIFAR through torchvision); the
input a model expects is :mod:`subspaces.input_spec`.

Decisions callers must know
---------------------------
* Every image goes through timm's ``create_transform`` (its config from
  ``resolve_data_config``, with the dataset's size, mean and std given explicitly): the
  in-memory uint8 Fashion-MNIST / CIFAR arrays become PIL images per item. At the native
  size without augmentation a tensor is exactly ``(x / 255 - mean) / std`` of the uint8
  array.
* Fashion-MNIST / CIFAR images whose native size (28 / 32) differs from the
  requested ``img_size`` are **resized** (PIL bilinear, antialiased, on the uint8 image,
  so rounded to uint8 before normalisation), never padded.
* Fashion-MNIST is not augmented by default, so ``bundle.train`` and ``bundle.bn`` yield
  identical tensors; CIFAR's default is the papers' pad-4 random crop + flip; an
  :class:`~subspaces.augment.Augmentation` (``--hflip``, ``--color-jitter``, ...) changes either.
* Augmentation draws from the global
  RNGs (torch's; timm also uses Python's ``random``): reproducible with
  ``num_workers > 0`` through the seeded loader generator of :func:`make_loader`
  (workers are seeded from it), and with ``num_workers == 0`` once the caller seeds
  ``torch.manual_seed`` / ``random.seed``.

Nothing is read or parsed at import time and the module keeps no global state.
"""

from __future__ import annotations

import copy
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .augment import PAD_PIXELS, TIMM_CROP_MODES, Augmentation, for_dataset
from .data_sources import fashion_mnist_root, load_cifar, load_fashion_mnist
from .errors import DatasetNotFoundError
from .input_spec import infer_input_spec, required_img_size

__all__ = [
    "DATASETS",
    "Augmentation",
    "DataBundle",
    "DatasetNotFoundError",
    "build_datasets",
    "fashion_mnist_root",
    "infer_input_spec",
    "make_loader",
]

DATASETS = ("fashion-mnist", "cifar10", "cifar100")  # plus "imagefolder:PATH"

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# ITU-R 601-2 luma weights (torchvision's rgb_to_grayscale, PIL's "L" conversion): RGB statistics -> grey.
_LUMA = (0.2989, 0.587, 0.114)



# --------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------- #
@dataclass
class DataBundle:
    """Everything the training code needs about one dataset.

    All datasets yield ``(x, y)``: ``x`` float32 ``[in_chans, img_size, img_size]``,
    normalised with ``mean``/``std``; ``y`` an ``int`` in ``[0, num_classes)``.
    """

    train: Dataset  # training split, augmented as build_datasets(augment=...) says (default: CIFAR, image folders)
    eval: Dataset  # test split, no augmentation
    holdout: Dataset | None  # held-out part of the training set, no augmentation
    bn: Dataset  # training images without augmentation, same indices as ``train``
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


#: bytes of transformed images an unaugmented in-memory split keeps per process: each image then
#: goes through PIL and timm's transform once, not once per epoch (Fashion-MNIST's 60,000 training
#: images at 28 px take 188 MB)
CACHE_BYTES = 1 << 30


class _Pairs(list):
    """A batch of ``(image, target)`` pairs that also holds them stacked (``x`` [B, C, H, W],
    ``y`` int64 [B]): :func:`make_loader`'s collate returns those without stacking again; any
    other collate sees a list of pairs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(zip(x.unbind(0), y.tolist()))
        self.x, self.y = x, y


def _batched_transform(transform: Any, pixels: torch.Tensor, mode: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a transform that leaves the geometry of ``pixels`` as it is -- timm's eval transform at
    the images' own size: Resize and CenterCrop to that size (no-ops), ToTensor, Normalize --
    the same computation on a batch of them, uint8 [B, H, W] (or [B, H, W, 3]) -> float32
    [B, C, H, W]: x / 255, then (x - mean) / std per channel, the float32 operations ToTensor and
    Normalize do per image, so the same bits. None for any other transform or a mode conversion."""
    from torchvision import transforms

    native = "L" if pixels.ndim == 3 else "RGB" if pixels.ndim == 4 and pixels.shape[-1] == 3 else None
    steps = getattr(transform, "transforms", None)
    if native != mode or steps is None or pixels.shape[1] != pixels.shape[2]:
        return None
    size = int(pixels.shape[1])
    square = lambda s: list(s) in ([size], [size, size]) if isinstance(s, (list, tuple)) else s == size  # noqa: E731
    mean = std = None
    for i, step in enumerate(steps):
        if isinstance(step, transforms.Resize) and square(step.size) and step.max_size is None and mean is None:
            continue
        if isinstance(step, transforms.CenterCrop) and square(step.size) and mean is None:
            continue
        if type(step).__name__ in ("ToTensor", "MaybeToTensor") and isinstance(step, transforms.ToTensor) and i == len(steps) - 2:
            continue
        if isinstance(step, transforms.Normalize) and i == len(steps) - 1 and i > 0:
            mean, std = step.mean, step.std
            continue
        return None
    if mean is None:
        return None
    chans = 1 if pixels.ndim == 3 else 3
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    if mean_t.shape[1] not in (1, chans) or std_t.shape[1] not in (1, chans):
        return None

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
        return x.to(torch.float32).div(255).sub_(mean_t).div_(std_t).contiguous()
    return run


class _ArrayImageDataset(Dataset):
    """In-memory uint8 images + int64 targets ``[N]``; ``__getitem__`` -> ``(transform(image), int)``.

    ``pixels``: ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB) uint8, shared by every split. Each
    image becomes a PIL image in ``mode`` ("L" or "RGB": PIL's conversion repeats grey, RGB -> grey
    uses its ITU-R 601-2 luma) and goes through ``transform`` (timm's, ending in ToTensor +
    Normalize: float32 ``[C, S, S]``). A ``deterministic`` transform's outputs are kept (up to
    :data:`CACHE_BYTES`) and handed out as copies; a batch of indices (``__getitems__``, the
    DataLoader's fetch) is transformed at once where :func:`_batched_transform` applies (the same
    values) and handed out stacked (:class:`_Pairs`)."""

    def __init__(self, pixels: torch.Tensor, targets: torch.Tensor, *, mode: str, transform: Callable[[Any], torch.Tensor],
                 deterministic: bool = False) -> None:
        self.pixels = pixels
        self.targets = targets
        self.mode = mode
        self.transform = transform
        self.cache: dict[int, torch.Tensor] | None = {} if deterministic else None
        self.cached_bytes = 0
        self.batched = _batched_transform(transform, pixels, mode) if deterministic else None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if self.cache is not None and index in self.cache:
            return self.cache[index].clone(), int(self.targets[index])
        image = Image.fromarray(self.pixels[index].numpy())
        if image.mode != self.mode:
            image = image.convert(self.mode)
        x = self.transform(image)
        self._keep(index, x.clone())
        return x, int(self.targets[index])

    def _keep(self, index: int, x: torch.Tensor) -> None:
        if self.cache is not None and self.cached_bytes + x.nbytes <= CACHE_BYTES:
            self.cache[index] = x
            self.cached_bytes += x.nbytes

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The items at ``indices``, as ``[self[i] for i in indices]`` gives them; for a
        deterministic transform stacked at once (a :class:`_Pairs`)."""
        if self.cache is None:
            return [self[i] for i in indices]
        cache = self.cache
        missing = list(dict.fromkeys(i for i in indices if i not in cache))
        if missing and self.batched is not None:
            fresh = self.batched(self.pixels[missing])
            for i, x in zip(missing, fresh.unbind(0)):
                self._keep(i, x)
        xs = [cache[i] if i in cache else self[i][0] for i in indices]
        return _Pairs(torch.stack(xs), self.targets[list(indices)].to(torch.int64))


def _convert_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Adapt per-channel stats to ``in_chans`` (repeat grey; luma-weighted RGB -> grey;
    the grey std is the weighted sum, exact for fully correlated channels)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == in_chans:
        return mean, std
    if len(mean) == 1:
        return mean * in_chans, std * in_chans
    if len(mean) == 3 and in_chans == 1:
        return (sum(w * m for w, m in zip(_LUMA, mean)),), (sum(w * s for w, s in zip(_LUMA, std)),)
    raise ValueError(f"cannot adapt {len(mean)}-channel statistics to in_chans={in_chans}")


def _check_chans(in_chans: int | None, default: int) -> int:
    c = default if in_chans is None else int(in_chans)
    if c not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    return c


def _check_size(img_size: int | None, default: int) -> int:
    s = default if img_size is None else int(img_size)
    if s < 1:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    return s


def _split_indices(n: int, *, subset: int | None, holdout: int, seed: int, what: str
                   ) -> tuple[list[int] | None, list[int] | None]:
    """Seeded split of ``range(n)``: a permutation ``p`` of ``range(n)`` from ``seed``;
    holdout = ``p[:holdout]``, selection = ``p[holdout:holdout+subset]`` (both sorted).

    Returns ``(selection or None for "all of range(n)", holdout or None)``. A larger
    ``subset`` with the same seed/holdout is a superset of a smaller one."""
    holdout = int(holdout)
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    if subset is not None and int(subset) < 1:
        raise ValueError(f"{what} must be None or >= 1, got {subset}")
    available = n - holdout
    if available < 1:
        raise ValueError(f"holdout={holdout} leaves no {what.split('_')[0]} examples (dataset has {n})")
    if subset is not None and int(subset) > available:
        flag = "--" + what.replace("_", "-")
        raise ValueError(f"{flag} {subset} exceeds the {available} examples available "
                         f"(the split has {n}, --holdout {holdout}): use {flag} <= {available}")
    if subset is None and holdout == 0:
        return None, None
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    held = sorted(perm[:holdout].tolist()) if holdout else None
    stop = n if subset is None else holdout + int(subset)
    return sorted(perm[holdout:stop].tolist()), held


def _take(ds: Dataset, indices: list[int] | None) -> Dataset:
    return ds if indices is None else Subset(ds, indices)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` uint8 -> what PIL reads per image: ``[N, H, W]`` (C = 1, a view) or
    ``[N, H, W, 3]`` (C = 3; no copy for torchvision's CIFAR, whose arrays are stored that way)."""
    return images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1).contiguous()


def _data_config(chans: int, size: int, mean: Sequence[float], std: Sequence[float], model: nn.Module | None) -> dict[str, Any]:
    """timm's ``resolve_data_config`` with this dataset's input size and statistics given
    explicitly, so they win over the model's pretrained_cfg (ImageNet's 224 px, mean and std,
    crop_pct 0.875): evaluation images are resized to ``size`` (bilinear) and centre-cropped to it
    (crop_pct 1, nothing cut off)."""
    import timm.data

    args = {"input_size": (chans, size, size), "mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0,
            "crop_mode": "center", "interpolation": "bilinear"}
    return dict(timm.data.resolve_data_config(args, model=model))


def _array_transforms(cfg: Mapping[str, Any], native_size: int, aug: Augmentation | None
                      ) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """``(train, eval)`` transforms of PIL images, timm's ``create_transform`` from ``cfg``.

    A timm crop mode (rrc, ...) is timm's training transform as it is. Otherwise timm's colour
    and final stages (ColorJitter; ToTensor + Normalize) follow this geometry: "pad" crops the
    native image padded by 4 px back to its size at random (the papers' CIFAR crop), then the
    flips, then the resize to the input size (none at the native size). No augmentation: the
    train transform is the eval one."""
    import timm.data
    from torchvision import transforms

    eval_tf = timm.data.create_transform(**cfg, is_training=False)
    if aug is None or aug.is_off():
        return eval_tf, eval_tf
    jitter = aug.color_jitter or None   # a ColorJitter(0, 0, 0) would still draw from the RNG
    flips = dict(hflip=aug.hflip or 0.0, vflip=aug.vflip or 0.0)
    if aug.train_crop_mode in TIMM_CROP_MODES:
        train_tf = timm.data.create_transform(**cfg, is_training=True, train_crop_mode=aug.train_crop_mode, scale=aug.scale,
                                              ratio=aug.ratio, color_jitter=jitter, **flips)
        return train_tf, eval_tf
    _, colour, final = timm.data.create_transform(**cfg, is_training=True, separate=True, hflip=0.0, vflip=0.0, color_jitter=jitter)
    geometry: list[Any] = []
    if aug.train_crop_mode == "pad":
        geometry.append(transforms.RandomCrop(native_size, padding=PAD_PIXELS))
    if flips["hflip"]:
        geometry.append(transforms.RandomHorizontalFlip(flips["hflip"]))
    if flips["vflip"]:
        geometry.append(transforms.RandomVerticalFlip(flips["vflip"]))
    size = cfg["input_size"][-1]
    geometry += [transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(size)]
    return transforms.Compose([*geometry, *colour.transforms, *final.transforms]), eval_tf


def _array_bundle(train_images, train_targets, test_images, test_targets, *, native_size: int,
                  native_chans: int, num_classes: int, mean, std, img_size, in_chans, model,
                  augmentation: Augmentation | None, train_subset, eval_subset, holdout, seed) -> DataBundle:
    if model is not None:
        model_chans, _ = infer_input_spec(model)
        if in_chans is None:
            in_chans = model_chans
        if img_size is None:
            img_size = required_img_size(model)
    chans = _check_chans(in_chans, native_chans)
    size = _check_size(img_size, native_size)
    mean, std = _convert_stats(mean, std, chans)
    train_tf, eval_tf = _array_transforms(_data_config(chans, size, mean, std, model), native_size, augmentation)
    mode = "L" if chans == 1 else "RGB"
    train_pixels = _pixels(train_images)
    plain_train = _ArrayImageDataset(train_pixels, train_targets, mode=mode, transform=eval_tf, deterministic=True)
    aug_train = (_ArrayImageDataset(train_pixels, train_targets, mode=mode, transform=train_tf)
                 if train_tf is not eval_tf else plain_train)
    test = _ArrayImageDataset(_pixels(test_images), test_targets, mode=mode, transform=eval_tf, deterministic=True)
    train_idx, held_idx = _split_indices(len(plain_train), subset=train_subset, holdout=holdout,
                                         seed=seed, what="train_subset")
    eval_idx, _ = _split_indices(len(test), subset=eval_subset, holdout=0, seed=seed, what="eval_subset")
    return DataBundle(
        train=_take(aug_train, train_idx),
        eval=_take(test, eval_idx),
        holdout=None if held_idx is None else Subset(plain_train, held_idx),
        bn=_take(plain_train, train_idx),
        num_classes=num_classes, in_chans=chans, img_size=size, mean=mean, std=std,
    )


def _imagefolder_bundle(path_str: str, *, img_size, in_chans, model, augmentation: Augmentation | None, mean, std,
                        train_subset, eval_subset, holdout, seed) -> DataBundle:
    import timm.data
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.vision import StandardTransform

    path = pathlib.Path(path_str).expanduser()
    train_dir = path / "train"
    eval_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        missing = [str(train_dir)] if not train_dir.is_dir() else []
        if eval_dir is None:
            missing.append(f"{path / 'val'} (or {path / 'test'})")
        raise DatasetNotFoundError(
            f"image folder dataset {path} is incomplete: missing {', '.join(missing)}. Expected "
            f"{path}/train/<class>/<image> and {path}/val/<class>/<image> (or test/ instead of val/)."
        )

    if model is not None:
        cfg = dict(timm.data.resolve_data_config({}, model=model))
        model_chans, _ = infer_input_spec(model)
    else:
        cfg = dict(timm.data.resolve_data_config({"img_size": int(img_size or 224)}))
        model_chans = None
    chans = _check_chans(in_chans if in_chans is not None else model_chans, 3)
    _, h, w = cfg["input_size"]
    size = _check_size(img_size, int(w))
    cfg["input_size"] = (chans, size, size) if img_size is not None else (chans, int(h), int(w))
    mean, std = _convert_stats(cfg["mean"] if mean is None else mean, cfg["std"] if std is None else std, chans)
    cfg["mean"], cfg["std"] = mean, std
    mode = "L" if chans == 1 else "RGB"

    eval_tf = timm.data.create_transform(**cfg, is_training=False)
    if augmentation is None:
        train_tf = eval_tf
    else:
        a = augmentation
        train_tf = timm.data.create_transform(**cfg, is_training=True, train_crop_mode=a.train_crop_mode, scale=a.scale,
                                              ratio=a.ratio, hflip=a.hflip, vflip=a.vflip, color_jitter=a.color_jitter or None)
    loader = _PilLoader(mode)
    train_aug = ImageFolder(str(train_dir), transform=train_tf, loader=loader)
    train_plain = copy.copy(train_aug)  # shares the (possibly huge) sample list
    train_plain.transform = eval_tf
    train_plain.transforms = StandardTransform(eval_tf, None)
    test = ImageFolder(str(eval_dir), transform=eval_tf, loader=loader, allow_empty=True)
    _adopt_classes(test, train_aug.classes, train_aug.class_to_idx)

    train_idx, held_idx = _split_indices(len(train_aug), subset=train_subset, holdout=holdout,
                                         seed=seed, what="train_subset")
    eval_idx, _ = _split_indices(len(test), subset=eval_subset, holdout=0, seed=seed, what="eval_subset")
    return DataBundle(
        train=_take(train_aug, train_idx),
        eval=_take(test, eval_idx),
        holdout=None if held_idx is None else Subset(train_plain, held_idx),
        bn=_take(train_plain, train_idx),
        num_classes=len(train_aug.classes), in_chans=chans, img_size=size, mean=mean, std=std,
    )


def _adopt_classes(ds, classes: list[str], class_to_idx: Mapping[str, int]) -> None:
    """Relabel an ImageFolder with the training split's class -> index map (the eval split
    may lack some classes; a class unknown to the training split is an error)."""
    unknown = sorted(set(ds.classes) - set(class_to_idx))
    if unknown:
        raise ValueError(f"{ds.root} has classes absent from the training split: {unknown}")
    samples = [(p, class_to_idx[ds.classes[t]]) for p, t in ds.samples]
    ds.samples = ds.imgs = samples
    ds.targets = [t for _, t in samples]
    ds.classes, ds.class_to_idx = list(classes), dict(class_to_idx)


class _PilLoader:
    """Picklable image loader converting to a fixed PIL mode ('L' or 'RGB')."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str):
        from PIL import Image

        with open(path, "rb") as fh:
            return Image.open(fh).convert(self.mode)


def build_datasets(
    name: str = "fashion-mnist",
    *,
    root: str | os.PathLike | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    holdout: int = 0,
    seed: int = 0,
    augment: bool | Augmentation = True,
    model: nn.Module | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """Build train / eval / holdout / BN datasets for ``name``.

    Every dataset yields ``(x, y)``: ``x`` float32 ``[C, S, S]`` with ``C = bundle.in_chans``,
    ``S = bundle.img_size``, normalised by ``bundle.mean``/``bundle.std``; ``y`` an int. Each
    image goes through timm's ``create_transform`` (config from ``resolve_data_config``) as a
    PIL image; Fashion-MNIST and CIFAR stay in memory as uint8 arrays.

    Args:
        name: ``"fashion-mnist"`` (28x28 grey, 60000/10000, mean 0.2860 std 0.3530, not
            augmented by default), ``"cifar10"`` / ``"cifar100"`` (32x32 RGB, 50000/10000, train
            augmentation RandomCrop(32, padding=4) + horizontal flip by default), or
            ``"imagefolder:PATH"`` (``PATH/train`` and ``PATH/val`` or ``PATH/test``,
            one sub-folder per class; timm transforms from ``model``'s data config or
            from ``img_size``, default 224).
        root: data folder (Fashion-MNIST: see :func:`fashion_mnist_root`; CIFAR: where
            ``cifar-10-batches-py`` / ``cifar-100-python`` lives or is downloaded to;
            default ``$SUBSPACES_DATA`` then the cache). Ignored for ``imagefolder:``.
        img_size: output side ``S``. Fashion-MNIST / CIFAR images are **resized** (PIL
            bilinear, antialiased, on the uint8 image) when it differs from 28 / 32. Default:
            native size, or the exact size a fixed-size ``model`` (strict ViT patch embedding) requires.
        in_chans: 1 or 3. Grey -> 3 repeats the channel; RGB -> 1 uses PIL's luma conversion.
            Default: the model's input channels when ``model`` is given, else native.
        train_subset, eval_subset: keep only N examples, chosen by a permutation seeded
            with ``seed`` (same seed -> same subset; sorted original order).
        holdout: move N training examples (disjoint from ``train``) into ``bundle.holdout``
            (no augmentation); ``None`` in the bundle when 0.
        seed: seed of the subset / holdout permutations.
        augment: training augmentation of ``bundle.train``: True = the dataset's default,
            False = none, or an :class:`~subspaces.augment.Augmentation` (its ``None`` fields
            take the dataset's default). ``eval``, ``holdout`` and ``bn`` are never augmented.
        model: optional timm model used to resolve input channels / size (and timm's
            data config for image folders), see :func:`infer_input_spec`.
        mean, std: normalisation instead of the dataset's (image folders: the model's
            pretrained_cfg's), adapted to ``in_chans`` like the dataset's.

    Raises:
        ValueError: unknown ``name`` (lists valid names) or inconsistent sizes.
        ConfigError: an augmentation that does not apply to the dataset.
        DatasetNotFoundError: data missing and not obtainable.
    """
    common = dict(train_subset=train_subset, eval_subset=eval_subset, holdout=holdout, seed=seed)
    chosen = augment if isinstance(augment, Augmentation) else Augmentation() if augment else None
    if name == "fashion-mnist":
        tr_x, tr_y, te_x, te_y = load_fashion_mnist(root)
        return _array_bundle(tr_x, tr_y, te_x, te_y, native_size=28, native_chans=1, num_classes=10,
                             mean=FASHION_MNIST_MEAN if mean is None else mean, std=FASHION_MNIST_STD if std is None else std,
                             img_size=img_size, in_chans=in_chans, model=model,
                             augmentation=chosen and for_dataset(chosen, name), **common)
    if name in ("cifar10", "cifar100"):
        tr_x, tr_y, te_x, te_y, num_classes = load_cifar(name, root)
        own_mean, own_std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        return _array_bundle(tr_x, tr_y, te_x, te_y, native_size=32, native_chans=3, num_classes=num_classes,
                             mean=own_mean if mean is None else mean, std=own_std if std is None else std,
                             img_size=img_size, in_chans=in_chans, model=model,
                             augmentation=chosen and for_dataset(chosen, name), **common)
    if isinstance(name, str) and name.startswith("imagefolder:") and len(name) > len("imagefolder:"):
        return _imagefolder_bundle(name[len("imagefolder:"):], img_size=img_size, in_chans=in_chans, model=model,
                                   augmentation=chosen and for_dataset(chosen, name), mean=mean, std=std, **common)
    valid = ", ".join(repr(d) for d in DATASETS)
    raise ValueError(f"unknown dataset {name!r}; valid names: {valid}, or 'imagefolder:PATH'")


def split_digest(dataset: Dataset) -> str:
    """A short SHA-256 of which examples a split holds: its indices into the source dataset
    (a ``Subset``'s ``indices``, else ``range(len(dataset))``) and the source's length. Two runs
    with equal digests trained (or were evaluated) on the same examples of the same dataset."""
    import hashlib

    if isinstance(dataset, Subset):
        indices, source = [int(i) for i in dataset.indices], len(dataset.dataset)  # type: ignore[arg-type]
    else:
        indices, source = list(range(len(dataset))), len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"{source}:".encode())
    h.update(torch.tensor(indices, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def split_targets(dataset: Dataset) -> torch.Tensor:
    """The labels of a split, [N] int64 in its order: read from the source dataset's ``targets``
    where it has them (no image is loaded or transformed), else from its items."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, range(len(dataset)))  # type: ignore[arg-type]
    targets = getattr(base, "targets", None)
    if targets is not None:
        return torch.tensor([int(targets[i]) for i in indices], dtype=torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]


def data_record(bundle: DataBundle) -> dict[str, Any]:
    """Digests and sizes of a bundle's splits (:func:`split_digest`): ``train``, ``holdout``
    (the validation split, when there is one) and ``eval`` (the test split)."""
    record: dict[str, Any] = {"train_digest": split_digest(bundle.train), "train_size": len(bundle.train),  # type: ignore[arg-type]
                              "eval_digest": split_digest(bundle.eval), "eval_size": len(bundle.eval)}  # type: ignore[arg-type]
    if bundle.holdout is not None:
        record.update(holdout_digest=split_digest(bundle.holdout), holdout_size=len(bundle.holdout))  # type: ignore[arg-type]
    return record


# --------------------------------------------------------------------------- #
# Loaders
# --------------------------------------------------------------------------- #
def _collate_pairs(batch):
    from torch.utils.data import default_collate

    if isinstance(batch, _Pairs):   # stacked by the dataset already
        return batch.x, batch.y
    xs, ys = default_collate(batch)
    return xs, torch.as_tensor(ys, dtype=torch.int64)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader yielding ``(x, y)`` tuples: ``x`` float ``[B, C, H, W]``, ``y`` int64 ``[B]``.

    The shuffle order (and the base seed of worker processes, hence worker-side
    augmentation) comes from a ``torch.Generator`` seeded with ``seed``: the same seed
    gives the same sequence of epochs; each new iteration (epoch) draws a new order.
    Workers are persistent when ``num_workers > 0``; memory is pinned when CUDA is available.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        generator=gen,
        num_workers=int(num_workers),
        drop_last=bool(drop_last),
        collate_fn=_collate_pairs,
        persistent_workers=int(num_workers) > 0,
        pin_memory=torch.cuda.is_available(),
    )

