"""Files: plain models and subspaces as safetensors plus a JSON spec, written atomically.

A *model spec* is the JSON needed to recreate a network with timm::

    {"model": "resnet18", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "img_size": 28,
     "mean": [...], "std": [...], "dataset": "fashion-mnist"}

``NAME.safetensors`` holds the weights and ``NAME.json`` the spec (and, for a subspace, its shape).
Every write goes to a temporary file in the same folder first and is then renamed over the
target, so a job killed mid-save leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .shapes import Bezier, Line, PolyChain, Simplex
from .subspace import Subspace

SHAPES: dict[str, type[Subspace]] = {"line": Line, "bezier": Bezier, "polychain": PolyChain, "simplex": Simplex}


class CheckpointError(ValueError):
    """A file that is missing, truncated, corrupted or of the wrong kind; the message names it."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(data: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: every .safetensors export has a .json spec beside it") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is truncated or corrupted") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {path}: {err} (truncated or corrupted file?)") from None


def create_model(spec: dict[str, Any]) -> nn.Module:
    """A fresh timm model from a spec: ``timm.create_model(spec['model'], num_classes, in_chans, **model_kwargs)``."""
    kwargs = dict(spec.get("model_kwargs") or {})
    return timm.create_model(spec["model"], pretrained=False, num_classes=spec["num_classes"], in_chans=spec["in_chans"], **kwargs)


def save_model(model: nn.Module, path: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write a plain model as ``path`` (.safetensors) and its spec as the same name with .json."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json({**spec, "kind": "model"}, path.with_suffix(".json"))
    return path


def load_model(path: str | os.PathLike) -> nn.Module:
    """Recreate a model written by :func:`save_model` (``path``: the .safetensors, or a run folder)."""
    path = resolve_model_path(path)
    spec = _read_json(path.with_suffix(".json"))
    model = create_model(spec)
    state = _load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit a {spec['model']}: {str(err).splitlines()[0]}") from None
    model.spec = spec  # type: ignore[assignment]
    return model


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run folder resolves to its final model (``model.safetensors``, else the centre export)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "model.safetensors", path / "exports" / "centre.safetensors"):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"{path} holds no model.safetensors or exports/centre.safetensors: is it a finished run?")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors model or a run folder")
    return path


def subspace_spec(sub: Subspace) -> dict[str, Any]:
    kind = {Line: "line", Bezier: "bezier", PolyChain: "polychain", Simplex: "simplex"}[type(sub)]
    shape: dict[str, Any] = {}
    if kind == "bezier":
        shape["degree"] = sub.degree  # type: ignore[attr-defined]
    if kind == "polychain":
        shape["bends"] = sub.bends  # type: ignore[attr-defined]
    if kind == "simplex":
        shape["vertices"] = sub.num_anchors
    frozen = [k for k in range(sub.num_anchors) if not sub.anchor_trainable(k)]
    return {"shape": kind, "shape_kwargs": shape, "sampling": sub.sampling, "frozen": frozen,
            "include": sub.include, "exclude": sub.exclude}


def save_subspace(sub: Subspace, path: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write a subspace (anchors, shared weights, buffers, generator state) and its spec."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in sub.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json({**spec, "kind": "subspace", "subspace": subspace_spec(sub)}, path.with_suffix(".json"))
    return path


def load_subspace(path: str | os.PathLike) -> Subspace:
    """Recreate a subspace written by :func:`save_subspace` (``path``: the file or a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "subspace.safetensors"
    spec = _read_json(path.with_suffix(".json"))
    if spec.get("kind") != "subspace":
        raise CheckpointError(f"{path} is a plain model, not a subspace: pass the run folder of a --subspace run or use load_model")
    info = spec["subspace"]
    model = create_model(spec)
    cls = SHAPES[info["shape"]]
    sub = cls(model, **info["shape_kwargs"], sampling=info["sampling"], include=info.get("include"),
              exclude=info.get("exclude"), init=lambda m: None)
    state = _load_tensors(path)
    try:
        sub.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit a {info['shape']} of {spec['model']}: {str(err).splitlines()[0]}") from None
    for k in info.get("frozen", []):
        sub.freeze_anchor(k)
    sub.spec = spec  # type: ignore[assignment]
    return sub
