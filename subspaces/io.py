"""Files: plain models and subspaces as safetensors plus a JSON spec, written atomically.

A *model spec* is the JSON needed to recreate a network with timm::

    {"model": "resnet18", "num_classes": 10, "in_chans": 1, "model_kwargs": {}, "img_size": 28,
     "mean": [...], "std": [...], "dataset": "fashion-mnist"}

``NAME.safetensors`` holds the weights and ``NAME.json`` the spec (and, for a subspace, its shape).
:func:`save_for_timm` writes a plain model as timm's ``save_for_hf`` folder instead
(``config.json`` + ``model.safetensors``), which ``timm.create_model("local-dir:PATH",
pretrained=True)`` loads, our spec kept in its config.json under ``"subspaces"``.
Every write goes to a temporary file in the same folder first and is then renamed over the
target, so a job killed mid-save leaves the previous file intact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.models import save_for_hf
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, ConfigError
from . import shapes  # noqa: F401  (importing it registers the built-in shapes that SHAPES lists)
from .shape_registry import get_shape, shape_classes, shape_of
from .subspace import Subspace

#: name -> Subspace class of every registered shape (a live, read-only view of the registry)
SHAPES: Mapping[str, type[Subspace]] = shape_classes()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        try:
            yield tmp
        except OSError as err:   # disk full, permissions: name the file, leave nothing behind
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
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
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: every .safetensors export has a .json spec beside it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is truncated or corrupted") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a model spec (a JSON object expected): the file is corrupted or of another kind")
    return data


def _check_spec(spec: dict[str, Any], path: Path, *keys: str) -> None:
    missing = [k for k in ("model", "num_classes", "in_chans", *keys) if k not in spec]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a model spec written by subspaces (corrupted?)")


def _check_digest(path: Path, spec: dict[str, Any], spec_path: Path) -> None:
    """The weights must be the file the spec was written with (its size and SHA-256, when recorded)."""
    want = spec.get("weights")
    if not isinstance(want, dict):
        return
    have = file_digest(path)
    if have["size"] != want.get("size"):
        raise CheckpointError(f"{path} is truncated or corrupted: {have['size']} bytes, but {spec_path} records {want.get('size')}")
    if have["sha256"] != want.get("sha256"):
        raise CheckpointError(f"{path} is corrupted or was replaced: its SHA-256 differs from the one recorded in {spec_path}")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {path}: {err} (truncated or corrupted file?)") from None


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def create_model(spec: dict[str, Any]) -> nn.Module:
    """A fresh timm model from a spec: ``timm.create_model(spec['model'], num_classes, in_chans, **model_kwargs)``."""
    kwargs = dict(spec.get("model_kwargs") or {})
    return timm.create_model(spec["model"], pretrained=False, num_classes=spec["num_classes"], in_chans=spec["in_chans"], **kwargs)


def _create_from(spec: dict[str, Any], spec_path: Path) -> nn.Module:
    if not timm.is_model(spec["model"]):
        raise CheckpointError(f"{spec_path}: timm has no model {spec['model']!r} (written by a newer timm, or corrupted?)")
    try:
        return create_model(spec)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{spec_path}: cannot create {spec['model']} from this spec: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def write_weights(module: nn.Module, path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """``path``.safetensors: ``module``'s state_dict, written atomically; ``path``.json: ``record``
    plus, under ``"weights"``, that file's size and SHA-256 (checked by :func:`load_weights_into`)."""
    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
        digest = file_digest(tmp)
    write_json({**record, "weights": digest}, path.with_suffix(".json"))
    return path


def load_weights_into(module: nn.Module, path: Path, spec: dict[str, Any], spec_path: Path, what: str) -> None:
    """Load the safetensors file ``path`` into ``module`` (strict), after checking it against the
    size and SHA-256 that ``spec`` (read from ``spec_path``) records; CheckpointError names the
    file and ``what`` it should have fitted (e.g. "a resnet18") when it does not."""
    state = _load_tensors(path)
    _check_digest(path, spec, spec_path)
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit {what}: {str(err).splitlines()[0]}") from None


def save_model(model: nn.Module, path: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write a plain model as ``path`` (.safetensors) and its spec as the same name with .json."""
    return write_weights(model, path, {**spec, "kind": "model"})


TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"


def is_timm_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in timm's ``save_for_hf`` layout (config.json + model.safetensors)."""
    path = Path(path)
    return (path / TIMM_CONFIG).is_file() and (path / TIMM_WEIGHTS).is_file()


def save_for_timm(model: nn.Module, folder: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write a plain timm model as timm's ``save_for_hf`` folder, atomically: ``model.safetensors``
    (its ``state_dict``) and ``config.json`` with ``architecture = spec['model']``,
    ``num_classes``, ``model_args`` = {num_classes, in_chans, **spec['model_kwargs']} and a
    ``pretrained_cfg`` whose input_size = (in_chans, img_size, img_size), mean and std come from
    ``spec``; ``config.json['subspaces']`` is ``spec`` (with ``point``, when given, naming the
    subspace point) plus the weights' size and SHA-256.
    ``timm.create_model(f"local-dir:{folder}", pretrained=True)`` then rebuilds the network."""
    folder = Path(folder)
    missing = [k for k in ("model", "num_classes", "in_chans") if k not in spec]
    if missing:
        raise ConfigError(f"save_for_timm: spec lacks {', '.join(missing)}; pass the run's model spec (see subspaces.io)")
    if not hasattr(model, "pretrained_cfg") or not timm.is_model(spec["model"]):
        raise ConfigError(f"save_for_timm: {type(model).__name__} is not a timm model {spec['model']!r}; use save_model for other networks")
    if getattr(model, "num_classes", spec["num_classes"]) != spec["num_classes"]:
        raise ConfigError(f"save_for_timm: the model has {model.num_classes} classes but spec says {spec['num_classes']}")
    model_args = {"num_classes": spec["num_classes"], "in_chans": spec["in_chans"], **dict(spec.get("model_kwargs") or {})}
    data_config: dict[str, Any] = {"input_size": (spec["in_chans"], spec["img_size"], spec["img_size"])} if spec.get("img_size") else {}
    for key in ("mean", "std"):
        if spec.get(key) is not None:
            data_config[key] = tuple(spec[key])
    record = {k: v for k, v in spec.items() if k not in ("weights", "kind")}
    if not _on_cpu(model) or not all(t.is_contiguous() for t in model.state_dict().values()):
        # safetensors stores contiguous tensors only: a copy on the CPU in the default layout (a --channels-last run)
        model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    with atomic_path(folder) as tmp:
        try:
            save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True,
                        data_config=data_config or None)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"save_for_timm: timm cannot describe this {spec['model']}: {str(err).splitlines()[0]}") from None
        config = json.loads((tmp / TIMM_CONFIG).read_text())
        config["subspaces"] = {**record, "kind": "model", "weights": file_digest(tmp / TIMM_WEIGHTS)}
        (tmp / TIMM_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


EXPORT_FORMATS = ("both", "timm", "safetensors")


def save_export(model: nn.Module, path: str | os.PathLike, spec: dict[str, Any], export_format: str = "both") -> list[Path]:
    """Write a plain model at ``path`` in ``export_format``: ``"safetensors"`` (``path.safetensors``
    + ``path.json``, :func:`save_model`), ``"timm"`` (the folder ``path/``, :func:`save_for_timm`)
    or ``"both"``. Returns what was written."""
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    written = []
    if export_format in ("both", "safetensors"):
        written.append(save_model(model, path, spec))
    if export_format in ("both", "timm"):
        written.append(save_for_timm(model, path.with_suffix(""), spec))
    return written


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in model.state_dict().values())


def _timm_folder_spec(folder: Path) -> dict[str, Any]:
    """Our spec of a timm folder: its ``config.json['subspaces']``, else one built from timm's
    own fields (architecture, num_classes, model_args) for folders timm itself wrote."""
    config = _read_json(folder / TIMM_CONFIG)
    if isinstance(config.get("subspaces"), dict):
        return config["subspaces"]
    args = dict(config.get("model_args") or {})
    cfg = config.get("pretrained_cfg") or {}
    in_chans = args.pop("in_chans", (cfg.get("input_size") or [3])[0])
    num_classes = args.pop("num_classes", config.get("num_classes"))
    if "architecture" not in config or num_classes is None:
        raise CheckpointError(f"{folder / TIMM_CONFIG} lacks architecture / num_classes: it is not a timm model config")
    return {"model": config["architecture"], "num_classes": num_classes, "in_chans": in_chans, "model_kwargs": args,
            "mean": cfg.get("mean"), "std": cfg.get("std")}


def read_model_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The spec of a model written by :func:`save_model` or :func:`save_for_timm` (``path`` as
    :func:`load_model` takes it), without reading its weights."""
    return _model_spec(resolve_model_path(path))[0]


def _model_spec(path: Path) -> tuple[dict[str, Any], Path]:
    """(spec, the file it was read from) of a resolved model path, checked."""
    if path.is_dir():   # timm's layout
        spec_path = path / TIMM_CONFIG
        spec = _timm_folder_spec(path)
    else:
        spec_path = path.with_suffix(".json")
        spec = _read_json(spec_path)
    _check_spec(spec, spec_path)
    if not path.is_dir() and spec.get("kind") == "subspace":
        raise CheckpointError(f"{path} is a subspace, not a plain model: load it with load_subspace, or pass an export (exports/centre.safetensors)")
    return spec, spec_path


def load_model_with_spec(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Recreate a model written by :func:`save_model` or :func:`save_for_timm` (``path``: the
    .safetensors, a timm folder, or a run folder); returns it with its spec (see module doc),
    which the caller keeps: nothing is attached to the timm model."""
    path = resolve_model_path(path)
    spec, spec_path = _model_spec(path)
    model = _create_from(spec, spec_path)
    weights = path / TIMM_WEIGHTS if path.is_dir() else path
    load_weights_into(model, weights, spec, spec_path, f"a {spec['model']}")
    return model, spec


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model of :func:`load_model_with_spec` alone (:func:`read_model_spec` reads its spec)."""
    return load_model_with_spec(path)[0]


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run folder resolves to its final model (``model.safetensors`` with its spec, else the
    centre export, .safetensors or timm folder); a timm folder (:func:`save_for_timm`) to itself."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").exists() and (path / "model.json").exists():
            return path / "model.safetensors"
        if is_timm_folder(path):
            return path
        centre = path / "exports" / "centre"
        if centre.with_suffix(".safetensors").exists():
            return centre.with_suffix(".safetensors")
        if is_timm_folder(centre):
            return centre
        raise CheckpointError(f"{path} holds no model.safetensors or exports/centre(.safetensors): is it a finished run?")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run folder or a .safetensors model")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors model or a run folder")
    return path


def subspace_spec(sub: Subspace) -> dict[str, Any]:
    """What a saved subspace records besides its weights: its registered ``shape`` name, the
    ``shape_kwargs`` that rebuild it (:meth:`ShapeEntry.spec_kwargs`), sampling, frozen
    anchors, include / exclude and layout. ConfigError for a class no shape is registered as."""
    entry = shape_of(sub)
    frozen = [k for k in range(sub.num_anchors) if not sub.anchor_trainable(k)]
    return {"shape": entry.name, "shape_kwargs": entry.spec_kwargs(sub), "sampling": sub.sampling, "frozen": frozen,
            "include": sub.include, "exclude": sub.exclude, "layout": sub.layout}


def save_subspace(sub: Subspace, path: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """Write a subspace (anchors, shared weights, buffers, generator state) and its spec."""
    return write_weights(sub, path, {**spec, "kind": "subspace", "subspace": subspace_spec(sub)})


def load_subspace(path: str | os.PathLike) -> Subspace:
    """Recreate a subspace written by :func:`save_subspace` (``path``: the file or a run folder)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "subspace.safetensors").exists():
            plain = (path / "model.safetensors").exists()
            what = "a plain model (model.safetensors), not a subspace" if plain else "no subspace.safetensors: is it a finished run?"
            raise CheckpointError(f"{path} holds {what}; pass the run folder of a --subspace, connect or simplex run")
        path = path / "subspace.safetensors"
    elif not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run folder or its subspace.safetensors")
    spec_path = path.with_suffix(".json")
    spec = _read_json(spec_path)
    if spec.get("kind") != "subspace":
        raise CheckpointError(f"{path} is a plain model, not a subspace: pass the run folder of a --subspace run or use load_model")
    _check_spec(spec, spec_path, "subspace")
    info = spec["subspace"]
    if not isinstance(info, dict) or info.get("shape") not in SHAPES or not isinstance(info.get("shape_kwargs", {}), dict):
        raise CheckpointError(f"{spec_path}: 'subspace' is not a shape this version knows (corrupted, or written by another version?)")
    model = _create_from(spec, spec_path)
    cls = get_shape(info["shape"]).cls
    try:
        sub = cls(model, **info.get("shape_kwargs", {}), sampling=info.get("sampling", "global"), include=info.get("include"),
                  exclude=info.get("exclude"), layout=info.get("layout", "flat"), init=lambda m: None)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{spec_path}: cannot build its {info['shape']}: {str(err).splitlines()[0]}") from None
    load_weights_into(sub, path, spec, spec_path, f"a {info['shape']} of {spec['model']}")
    for k in info.get("frozen", []):
        sub.freeze_anchor(k)
    sub.spec = spec  # type: ignore[assignment]
    return sub
