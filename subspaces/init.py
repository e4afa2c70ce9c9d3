"""Re-drawing a network's weights with its own initialisation (anchors learned from scratch [W]).

Order: every module's ``reset_parameters()``; then the model's own initialiser: its
``init_weights()`` method (timm's ResNets, ViTs, ...), or, for timm families that initialise in
``__init__`` through a module-level function, that function (ConvNeXt's ``_init_weights``,
``efficientnet_init_weights`` for EfficientNet / MobileNetV3 / MobileNetV5 / RexNet). A timm model
with neither keeps PyTorch's default ``reset_parameters()`` draws, and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

from torch import nn


def _family_init(model: nn.Module) -> Callable[[], None] | None:
    """The module-level initialiser timm applies in ``__init__`` for this model's family, if known."""
    module = type(model).__module__
    if module == "timm.models.convnext":
        from timm.models import convnext
        from timm.models._manipulate import named_apply

        return lambda: named_apply(partial(convnext._init_weights, head_init_scale=1.0), model)
    if module in ("timm.models.efficientnet", "timm.models.mobilenetv3", "timm.models.mobilenetv5", "timm.models.rexnet"):
        from timm.models._efficientnet_builder import efficientnet_init_weights

        return lambda: efficientnet_init_weights(model)
    return None


def reinitialize(model: nn.Module) -> None:
    """Re-draw every parameter of ``model`` in place with its own initialisation (see module doc)."""
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
    family = _family_init(model)
    if callable(init_weights):
        init_weights()
    elif family is not None:
        family()
    elif type(model).__module__.startswith("timm."):
        warnings.warn(
            f"{type(model).__name__} has no init_weights() and no known timm initialiser: its anchors were "
            "re-drawn with each module's reset_parameters() (PyTorch defaults). Pass init=<callable> for "
            "the model's exact initialisation.",
            stacklevel=4,
        )
