"""The registry of shapes: one :class:`ShapeEntry` per ``--subspace`` name, read by the settings
(choices, validation, constructor keywords), the command line (``--subspace`` choices and help)
and :mod:`subspaces.io` (what a saved subspace records and how it is rebuilt).

A new shape is one new file plus one registration, as timm's ``register_model``::

    class Cubic(Bezier):                      # any Subspace subclass
        def __init__(self, model, **kwargs):
            super().__init__(model, degree=3, **kwargs)

    register_shape("cubic", Cubic, curve=True)
    TrainRunConfig(subspace="cubic", ...)    # accepted, trained, saved and loaded back

The built-in shapes (line, bezier, polychain, simplex) are registered in :mod:`subspaces.shapes`,
where they are defined. This module imports nothing of the package, so that every layer can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ShapeParam:
    """One integer keyword of a shape's constructor, set from the settings field of the same
    ``name`` (``--name`` on the command line; ``None`` there means ``default``) and saved under
    that name in the shape's I/O spec. ``minimum`` is the smallest valid value and ``why`` says
    what it means ("degree 1 is a line"); ``help`` names the value for ``--help``.

    The name must be a field of :class:`~subspaces.settings.SubspaceConfig` (today ``degree``,
    ``bends``, ``vertices``): a shape reuses those flags rather than adding its own."""

    name: str
    default: int
    minimum: int
    why: str
    help: str


@dataclass(frozen=True)
class ShapeEntry:
    """A registered shape: its ``--subspace`` ``name``, its Subspace class ``cls`` (constructed
    as ``cls(model, **kwargs, sampling=..., seed=..., include=..., exclude=..., layout=...)``),
    the integer ``params`` its constructor takes from the settings, whether its points are a
    ``curve`` (one number t in [0, 1], so ``--sampling arc_length`` applies) or not (barycentric
    coordinates of a simplex), and ``save``: the constructor keywords a saved subspace records
    (by default each param read back as ``getattr(sub, param.name)``)."""

    name: str
    cls: type
    curve: bool
    params: tuple[ShapeParam, ...] = ()
    save: Callable[[Any], dict[str, Any]] | None = None

    def kwargs_from(self, settings: Any) -> dict[str, int]:
        """The constructor keywords from ``settings`` (any object with the params' fields): each
        param's value, or its default where the setting is None."""
        values = {p.name: getattr(settings, p.name, None) for p in self.params}
        return {p.name: p.default if values[p.name] is None else values[p.name] for p in self.params}

    def spec_kwargs(self, sub: Any) -> dict[str, Any]:
        """What :func:`subspaces.io.save_subspace` records of ``sub`` under ``shape_kwargs``:
        the keywords that rebuild a subspace of the same size with ``cls(model, **kwargs)``."""
        if self.save is not None:
            return dict(self.save(sub))
        return {p.name: getattr(sub, p.name) for p in self.params}


_ENTRIES: dict[str, ShapeEntry] = {}
#: name -> class, the live view that :data:`subspaces.io.SHAPES` is
_CLASSES: dict[str, type] = {}


def register_shape(name: str, cls: type, *, curve: bool, params: tuple[ShapeParam, ...] = (),
                   save: Callable[[Any], dict[str, Any]] | None = None) -> ShapeEntry:
    """Register ``cls`` as the shape ``name`` (see :class:`ShapeEntry` for the arguments) and
    return its entry. Names and classes are one to one, because a saved subspace records the
    name of its exact class: registering a taken name, or a class already registered under
    another name, raises ValueError (:func:`unregister_shape` first to replace one)."""
    if not name.isidentifier() or name == "none":
        raise ValueError(f"shape name {name!r} must be an identifier other than 'none' ('none' is a standard network)")
    if name in _ENTRIES:
        raise ValueError(f"a shape named {name!r} is registered already ({_ENTRIES[name].cls.__name__})")
    taken = [n for n, e in _ENTRIES.items() if e.cls is cls]
    if taken:
        raise ValueError(f"{cls.__name__} is registered already as {taken[0]!r}: subclass it to register it under another name")
    entry = ShapeEntry(name, cls, curve, tuple(params), save)
    _ENTRIES[name] = entry
    _CLASSES[name] = cls
    return entry


def unregister_shape(name: str) -> None:
    """Remove the shape ``name`` (KeyError if none is registered): for tests and replacements."""
    del _ENTRIES[name]
    del _CLASSES[name]


def shape_names(curve: bool | None = None) -> tuple[str, ...]:
    """The registered names in registration order; only the curves (``curve=True``) or only the
    others (``curve=False``) when given."""
    return tuple(n for n, e in _ENTRIES.items() if curve is None or e.curve == curve)


def get_shape(name: str) -> ShapeEntry:
    """The entry of ``name``; ConfigError ``--subspace 'NAME': use one of ...`` (the message of
    the settings' choices) for a name nobody registered."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ConfigError(f"--subspace {name!r}: use one of {', '.join(('none', *_ENTRIES))}") from None


def shape_of(sub: Any) -> ShapeEntry:
    """The entry whose class is exactly ``type(sub)``; ConfigError for an unregistered class
    (a subclass is a shape of its own: register it, or it would be loaded back as its parent)."""
    for entry in _ENTRIES.values():
        if type(sub) is entry.cls:
            return entry
    raise ConfigError(f"{type(sub).__name__} is not a registered shape: register it with "
                      f"subspaces.shape_registry.register_shape(name, {type(sub).__name__}, curve=...) to save it")


def shape_classes() -> Mapping[str, type]:
    """A read-only, live mapping name -> class of the registered shapes."""
    return MappingProxyType(_CLASSES)


def param_owners(param: str) -> tuple[str, ...]:
    """The registered shapes that take the integer keyword ``param``."""
    return tuple(n for n, e in _ENTRIES.items() if any(p.name == param for p in e.params))


def param_help(param: str) -> str:
    """``--help`` of a shape keyword, e.g. "Bezier degree (default 2; only with --subspace bezier)"."""
    declared = [(n, p) for n, e in _ENTRIES.items() for p in e.params if p.name == param]
    if not declared:
        return f"not used by any registered shape (--{param})"
    defaults = {p.default for _, p in declared}
    default = f"default {declared[0][1].default}" if len(defaults) == 1 else "default " + ", ".join(f"{p.default} for {n}" for n, p in declared)
    return f"{declared[0][1].help} ({default}; only with --subspace {' or '.join(n for n, _ in declared)})"
