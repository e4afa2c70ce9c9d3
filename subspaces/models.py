"""Building what a run trains: the timm model (``timm.create_model`` from the settings) and
the probes that check it runs on the dataset's inputs, the dataset sized for it, the subspace
wrapped around it, and the compiled module.
"""

from __future__ import annotations

import sys
from typing import Any

import timm
import timm.data
import torch
from accelerate.utils import is_compiled_module
from torch import nn

from .augment import augmentation_from
from .data import DataBundle, build_datasets, infer_input_spec
from .input_spec import required_img_size
from .errors import ConfigError
from .init import rebuilding_init
from .shape_registry import get_shape
from .subspace import Subspace, layout_for
from .settings import POINT_SEED_STRIDE, DataConfig, DataRun, ModelConfig, ModelRun, TrainRunConfig


def point_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s points in a distributed run: ``seed + POINT_SEED_STRIDE * rank``
    (a prime larger than every seed offset between runs, so no rank repeats another's stream)."""
    return seed + POINT_SEED_STRIDE * rank


def create_timm_model(args: ModelConfig, num_classes: int, in_chans: int, pretrained: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` from the settings, and the kwargs it was given beyond num_classes /
    in_chans; ``img_size`` goes to models that take one (ViTs). ``pretrained``: instead of
    ``args.pretrained`` (False: a fresh random initialisation)."""
    pretrained = args.pretrained if pretrained is None else pretrained
    kwargs = dict(args.model_kwargs or {})
    if args.img_size is not None and "img_size" not in kwargs:
        try:
            model = timm.create_model(args.model, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, img_size=args.img_size, **kwargs)
            kwargs["img_size"] = args.img_size
            return model, kwargs
        except TypeError:
            pass
    model = timm.create_model(args.model, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return model, kwargs


def data_seed(args: DataConfig) -> int:
    """The seed of the subset / held-out draws: ``data_seed``, else the run's ``seed``."""
    return int(args.data_seed if args.data_seed is not None else args.seed)  # type: ignore[attr-defined]


def build_data_and_model(args: ModelRun) -> tuple[DataBundle, nn.Module, dict[str, Any]]:
    """Dataset (sized for the model) and a fresh timm model, plus the spec that recreates it.

    Normalisation: the dataset's mean / std, or with ``pretrained`` the model's pretrained_cfg
    ones (timm's ``resolve_data_config``), which its weights were trained with. The dataset is
    built once to learn its classes and channels, again only where the model changes it
    (:func:`needs_model_config`) and once more where the model needs larger images."""
    common = dict(root=args.data_dir, img_size=args.img_size, train_subset=args.train_subset,
                  eval_subset=args.eval_subset, holdout=args.holdout, seed=data_seed(args), augment=augmentation_from(args))
    data = build_datasets(args.dataset, in_chans=args.in_chans, **common)
    num_classes = args.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {data.num_classes} classes of {args.dataset}")
    model, kwargs = create_timm_model(args, num_classes, args.in_chans or data.in_chans)
    if args.pretrained:   # pretrained weights expect the inputs they were trained on: their own mean / std
        stats = timm.data.resolve_data_config({}, model=model)
        common.update(mean=stats["mean"], std=stats["std"])
    if needs_model_config(args, model, data):
        data = build_datasets(args.dataset, in_chans=args.in_chans or data.in_chans, model=model, **common)
    if args.img_size is None and not accepts_input(model, data.in_chans, data.img_size):
        size = infer_input_spec(model)[1]
        if size is None or not accepts_input(model, data.in_chans, size):
            raise ConfigError(f"{args.model} does not run on {data.img_size}px inputs; pass --img-size with a size it accepts")
        print(f"{args.model} needs larger inputs than {data.img_size}px: images are resized to {size}px", file=sys.stderr)
        common["img_size"] = size
        data = build_datasets(args.dataset, in_chans=data.in_chans, model=model, **common)
    check_input_size(model, data.img_size, args.model)
    spec = {"model": args.model, "num_classes": num_classes, "in_chans": data.in_chans, "model_kwargs": kwargs,
            "img_size": data.img_size, "mean": list(data.mean), "std": list(data.std), "dataset": args.dataset}
    return data, model, spec


def needs_model_config(args: ModelRun, model: nn.Module, data: DataBundle) -> bool:
    """Whether ``data``, built without the model, differs from the dataset built for ``model``:
    with ``pretrained`` (the weights' own mean / std), for an image folder (its transforms follow
    the model's data config), or for a model that insists on another input size (a strict ViT).
    Fashion-MNIST and CIFAR give timm every field of their data config, so the model adds nothing."""
    if args.pretrained or args.dataset.startswith("imagefolder:"):
        return True
    return args.img_size is None and required_img_size(model) not in (None, data.img_size)


def check_input_size(model: nn.Module, img_size: int | None, name: str) -> None:
    """ConfigError when ``img_size`` leaves less than 2x2 pixels after the model's stem (the
    first reduction of timm's ``feature_info``): such a network trains to chance and says nothing."""
    info = getattr(model, "feature_info", None)
    if not img_size or not isinstance(info, list) or not info or not isinstance(info[0], dict) or "reduction" not in info[0]:
        return
    stem = int(info[0]["reduction"])
    if img_size < 2 * stem:
        raise ConfigError(f"--img-size {img_size} is too small for {name}: its stem reduces by {stem}, leaving less than 2x2 pixels; "
                          f"use --img-size >= {2 * stem} (or leave it out for the dataset's own size)")


def accepts_input(model: nn.Module, in_chans: int, size: int) -> bool:
    """Whether ``model`` runs on a [2, in_chans, size, size] input (a probe forward, eval mode)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, in_chans, size, size))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        model.train(was_training)


def build_data_for_spec(args: DataRun, spec: dict[str, Any], model: nn.Module) -> DataBundle:
    """The dataset a trained model was made for (``spec``: its size, channels and normalisation),
    unless ``args.dataset`` says otherwise; training images augmented as the settings say."""
    args.dataset = args.dataset or spec.get("dataset", "fashion-mnist")
    same = args.dataset == spec.get("dataset", args.dataset)
    return build_datasets(args.dataset, root=args.data_dir, img_size=spec.get("img_size"), in_chans=spec["in_chans"],
                          train_subset=args.train_subset, eval_subset=args.eval_subset, holdout=args.holdout,
                          seed=data_seed(args), model=model, augment=augmentation_from(args),
                          mean=spec.get("mean") if same else None, std=spec.get("std") if same else None)


def wrap_subspace(args: TrainRunConfig, model: nn.Module, rank: int = 0) -> nn.Module:
    """The model itself (``subspace`` "none") or a subspace of it learned from scratch, its anchors
    drawn with the model's own initialisation (:func:`subspaces.init.reinitialize`, rebuilding
    it from ``args`` where timm initialises in ``__init__``); each rank draws its own points
    (:func:`point_seed`) unless ``same_point``."""
    if args.subspace == "none":
        return model
    seed = args.seed if args.same_point else point_seed(args.seed, rank)
    sampling = "layerwise" if args.layerwise else args.sampling
    layout = layout_for(args.opt, args.layer_decay)
    init: Any = "reinit"
    if not callable(getattr(model, "init_weights", None)):   # timm initialised it in __init__: build it again, with the run's kwargs
        num_classes, in_chans = int(getattr(model, "num_classes")), infer_input_spec(model)[0] or 3
        init = rebuilding_init(lambda: create_timm_model(args, num_classes, in_chans, pretrained=False)[0])
    return get_shape(args.subspace).cls(model, sampling=sampling, seed=seed, include=args.include, exclude=args.exclude,
                                        layout=layout, init=init, **args.shape_kwargs())


def use_channels_last(net: nn.Module) -> nn.Module:
    """Run ``net``'s convolutions in channels-last (NHWC) memory layout (timm's ``--channels-last``):
    its 4-D parameters and buffers converted in place; a Subspace binds the 4-D weights of each
    point in that layout (:meth:`~subspaces.subspace.Subspace.use_memory_format`). Values and
    checkpoints are unchanged; returns ``net``."""
    if isinstance(net, Subspace):
        return net.use_memory_format(torch.channels_last)
    return net.to(memory_format=torch.channels_last)


def channels_last_input(x: Any) -> Any:
    """A batch of images ``[B, C, H, W]`` in channels-last layout (the same values); other inputs as they are."""
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.ndim == 4 else x


def compile_model(model: nn.Module, backend: str | None, mode: str | None = None) -> nn.Module:
    """``torch.compile(model)`` for training with ``backend`` / ``mode`` (timm's ``--torchcompile``),
    or ``model`` itself when ``backend`` is None or it is compiled already (an Accelerator with
    its own dynamo plugin). Compiled after ``accelerator.prepare``, so that accelerate's
    registered model, and so the checkpoints' keys, stay the eager module's: a compiled run
    resumes eagerly and the other way round.

    ``dynamic=False``: a batch of another size (an epoch's last) compiles a second graph
    once, instead of turning every graph's batch dimension symbolic. A subspace's moving point
    does not recompile: the point and its coefficients are tensors drawn outside the graph
    (``Subspace._coeffs_for`` is not traced), the same graph serves every point."""
    if backend is None or is_compiled_module(model):
        return model
    return torch.compile(model, backend=backend, mode=mode, dynamic=False)
