"""The recipes' command lines, generated from their settings classes, plus ``-c FILE.yaml``.

Every flag is a settings field (:mod:`subspaces.settings`): its name (``batch_size`` is
``--batch-size``), aliases, type, default, help, choices and nargs come from the field, so a
recipe's parser is only its layout, the argument groups in the order ``--help`` shows them::

    build_flags(TrainRunConfig, __doc__, MODEL, DATA, AUGMENT, OPTIM, SUBSPACE, RUN, STOP)

The flag names are timm train.py's. ``-c/--config FILE.yaml`` holds the same keys as the flags
(``batch_size`` or ``batch-size``); flags given on the command line override it. The resolved
configuration is written to the run's output directory as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError
from .run_folder import RESOLVED_KEY
from .settings import (
    CosineConfig,
    DataConfig,
    LoaderConfig,
    MixingConfig,
    ModelConfig,
    OptimConfig,
    Settings,
    StopConfig,
    TransformConfig,
    VolumeConfig,
    flag,
)
from .settings_base import flag_of, own_fields


@dataclass(frozen=True)
class Group:
    """An argument group of ``--help``: its ``title`` (None: the parser's own positionals and
    options) and the settings it shows, in order."""

    title: str | None
    names: tuple[str, ...]


def group(title: str | None, *members: type | str) -> Group:
    """A :class:`Group` of the settings that each section class among ``members`` declares
    (:func:`~subspaces.settings_base.own_fields`) and of the settings named."""
    names: list[str] = []
    for member in members:
        names += [member] if isinstance(member, str) else own_fields(member)
    return Group(title, tuple(names))


MODEL = group("model", ModelConfig)
DATA = group("data", DataConfig, LoaderConfig)
AUGMENT = group("training augmentation (timm names; evaluation and BatchNorm images are never augmented)", TransformConfig, MixingConfig)
OPTIM = group("optimisation (timm names)", OptimConfig)
RUN = group("run", "config", "mixed_precision", "grad_accum_steps", "seed", "output", "resume", "checkpoint_hist", "log_interval",
            "eval_every", "cpu", "torchcompile", "torchcompile_mode", "channels_last", "log_with", "export_format")
SUBSPACE = group("subspace", "subspace", "degree", "bends", "vertices", "layerwise", "sampling", "same_point", CosineConfig, VolumeConfig,
                 "include", "exclude")
STOP = group(None, StopConfig)


def build_flags(settings: type[Settings], description: str | None, *groups: Group) -> argparse.ArgumentParser:
    """The parser of a recipe whose settings are ``settings``: one argument per setting of
    ``groups``, in their order, with the field's flag, type and (possibly redeclared) default."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(settings)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(settings)
    shown: set[str] = set()
    for g in groups:
        target = p if g.title is None else p.add_argument_group(g.title)
        for name in g.names:
            if name not in fields or name in shown:
                raise ValueError(f"{settings.__name__} has no setting {name!r}" if name not in fields else f"{name!r} is in two groups")
            add_setting(target, fields[name], hints[name])
            shown.add(name)
    return p


def add_setting(target: Any, field: dataclasses.Field, hint: Any) -> None:
    """Add the setting ``field`` (its type ``hint``) to a parser or argument group ``target``."""
    spec = flag_of(field)
    if spec is None:
        raise ValueError(f"the setting {field.name!r} has no flag")
    kwargs: dict[str, Any] = {"help": spec.help_text()}
    if field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    value_type = _value_type(hint)
    if value_type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if spec.negatable else "store_true"
    else:
        parse = spec.parse or value_type
        if parse is not str:
            kwargs["type"] = parse
        extra = {"nargs": spec.nargs, "const": spec.const, "metavar": spec.metavar, "choices": spec.choice_values()}
        kwargs.update({key: value for key, value in extra.items() if value is not None})
    names = (field.name,) if spec.positional else (*spec.aliases, flag(field.name))
    target.add_argument(*names, **kwargs)


def _value_type(hint: Any) -> Any:
    """The type of one value of a setting: ``int | None`` -> int, ``list[str]`` -> str, ``tuple[float, float]`` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _value_type(args[0]) if len(args) == 1 else hint
    if typing.get_origin(hint) in (list, tuple):
        return args[0]
    return hint


def parse_with_config(p: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      valid: set[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; defaults come from ``-c FILE.yaml`` when given, flags override them. The
    file's keys (dashes or underscores) must be in ``valid`` (a recipe's settings fields), by
    default the flags of ``p``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        p.set_defaults(**load_yaml_config(known.config, valid if valid is not None else set(vars(p.parse_args(argv)))))
    return p.parse_args(argv)


def load_yaml_config(path: str, valid: set[str]) -> dict[str, Any]:
    """Read a YAML config; its keys (dashes or underscores) must be in ``valid``."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest == RESOLVED_KEY:   # a run's config.yaml used as -c: what it resolved is not a flag
            continue
        if dest not in valid:
            close = difflib.get_close_matches(dest, sorted(valid), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key '{key}'{hint}")
        out[dest] = value
    return out
