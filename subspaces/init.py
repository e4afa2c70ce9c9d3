"""Re-drawing a network's weights with its own initialisation (anchors learned from scratch [W]).

Order: every module's ``reset_parameters()``; then the model's own initialiser: its
``init_weights()`` method (timm's ResNets, ViTs, ...), or, for a model that initialises in
``__init__`` with no method to call again (timm's ConvNeXt, EfficientNet, MobileNetV3, RexNet,
...), the weights of a freshly built model of the same architecture: ``rebuild()`` when the
caller knows how the model was made (the recipes pass ``timm.create_model`` with the run's
kwargs, so e.g. a ConvNeXt's ``head_init_scale`` is its own), else ``timm.create_model`` of its
``pretrained_cfg["architecture"]`` with its ``num_classes`` and input channels, used when every
tensor has the model's shape. A model with neither keeps PyTorch's default
``reset_parameters()`` draws, and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .input_spec import infer_input_spec

#: a function that builds a fresh, randomly initialised copy of the network (same architecture)
Rebuild = Callable[[], nn.Module]


def timm_rebuild(model: nn.Module) -> Rebuild | None:
    """``timm.create_model(architecture, num_classes=..., in_chans=...)`` for a timm model, read
    from its public ``pretrained_cfg`` / ``num_classes`` (None for other models). Constructor
    kwargs beyond those are not recorded by timm: pass ``rebuild`` to :func:`reinitialize` for them."""
    import timm

    cfg = getattr(model, "pretrained_cfg", None)
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not type(model).__module__.startswith("timm.") or not architecture or not timm.is_model(architecture):
        return None
    kwargs = {"num_classes": getattr(model, "num_classes", None), "in_chans": infer_input_spec(model)[0]}
    return partial(timm.create_model, architecture, pretrained=False, **{k: v for k, v in kwargs.items() if v is not None})


@torch.no_grad()
def copy_fresh(model: nn.Module, rebuild: Rebuild) -> bool:
    """Load the state of ``rebuild()`` (its constructor's initialisation) into ``model``; False,
    with ``model`` left as it was, when the fresh model's tensors do not match its names and shapes."""
    try:
        fresh = rebuild()
    except (TypeError, ValueError, RuntimeError, KeyError):
        return False
    own, new = model.state_dict(), fresh.state_dict()
    if own.keys() != new.keys() or any(own[k].shape != new[k].shape for k in own):
        return False
    model.load_state_dict(new)
    return True


def reinitialize(model: nn.Module, rebuild: Rebuild | None = None) -> None:
    """Re-draw every parameter of ``model`` in place with its own initialisation (see module doc);
    ``rebuild``: how to build a fresh copy of it, for models whose ``__init__`` initialises them."""
    for name, module in model.named_modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            try:
                reset()
            except TypeError as err:
                raise TypeError(
                    f"cannot re-initialise module '{name or type(module).__name__}': its reset_parameters() "
                    f"needs arguments ({err}); pass init=<callable> to the subspace, or exclude= its parameters"
                ) from err
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        init_weights()
        return
    rebuild = rebuild or timm_rebuild(model)
    if rebuild is not None and copy_fresh(model, rebuild):
        return
    if type(model).__module__.startswith("timm."):
        warnings.warn(
            f"{type(model).__name__} has no init_weights() and could not be rebuilt by timm.create_model: its anchors were "
            "re-drawn with each module's reset_parameters() (PyTorch defaults). Pass init=<callable> for "
            "the model's exact initialisation.",
            stacklevel=4,
        )


def rebuilding_init(rebuild: Rebuild) -> Callable[[nn.Module], None]:
    """``init(model)`` for a subspace: :func:`reinitialize` with ``rebuild`` for the models that
    initialise in ``__init__``."""
    return partial(reinitialize, rebuild=rebuild)
