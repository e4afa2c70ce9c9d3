"""The input a model expects: channels and image size, read from its stem and timm's config."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

def required_img_size(model: nn.Module) -> int | None:
    """Input size a fixed-size model (ViT-style strict patch embedding) insists on."""
    pe = _find_patch_embed(_unwrap(model))
    size = getattr(pe, "img_size", None) if pe is not None else None
    if size is None or not getattr(pe, "strict_img_size", False):
        return None
    return _as_side(size)


# --------------------------------------------------------------------------- #
# Model input spec
# --------------------------------------------------------------------------- #
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile / DDP-style wrappers."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model, seen = inner, seen + 1
    return model


def _find_patch_embed(model: nn.Module) -> nn.Module | None:
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "patch_embed":
            return mod
    return None


def _as_side(size) -> int | None:
    if isinstance(size, int):
        return size
    try:
        return max(int(s) for s in size)
    except (TypeError, ValueError):
        return None


def infer_input_spec(model: nn.Module) -> tuple[int | None, int | None]:
    """``(in_chans, img_size)`` a model expects for inputs ``[B, in_chans, S, S]``.

    ``in_chans`` from the actual stem (a ``patch_embed.proj`` conv, ``model.in_chans``, or
    the first ``Conv2d``), falling back to ``pretrained_cfg``/``default_cfg['input_size'][0]``
    (the config describes the pretrained weights, which may differ from the instantiated
    model). ``img_size`` from a ViT-style ``patch_embed.img_size`` (the exact size a
    fixed-size model needs), else ``input_size[1:]`` of the config (the expected size;
    the larger side if not square). Either entry is ``None`` when unknown.
    """
    model = _unwrap(model)
    in_chans: int | None = None
    img_size: int | None = None
    pe = _find_patch_embed(model)
    if pe is not None:
        proj = getattr(pe, "proj", None)
        if isinstance(proj, nn.Conv2d):
            in_chans = int(proj.in_channels)
        pe_size = getattr(pe, "img_size", None)
        if pe_size is not None:
            img_size = _as_side(pe_size)
    if in_chans is None and isinstance(getattr(model, "in_chans", None), int):
        in_chans = int(model.in_chans)
    if in_chans is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None:
            in_chans = int(conv.in_channels)
    if in_chans is None or img_size is None:
        for mod in model.modules():
            cfg = getattr(mod, "pretrained_cfg", None) or getattr(mod, "default_cfg", None)
            input_size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
            if input_size is not None and len(input_size) == 3:
                if in_chans is None:
                    in_chans = int(input_size[0])
                if img_size is None:
                    img_size = _as_side(input_size[1:])
                break
    return in_chans, img_size
