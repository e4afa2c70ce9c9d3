"""How a setting is declared: one dataclass field that carries its type, default, help and flag.

    lr: float = setting(0.05, "learning rate (default: %(default)s)")
    batch_size: int = setting(128, "batch size per process (default: %(default)s)", aliases=("-b",))

A settings class is a ``@dataclass(kw_only=True)`` subclass of :class:`Settings`; its fields are
its settings, and each field's :class:`Flag` (in the field's metadata) says how a command line
offers it: :mod:`subspaces.cli_flags` turns the fields into an argparse parser, so the flag
``--batch-size`` has the field's type, default and help and nothing is declared twice. A recipe
whose default differs redeclares only the default, ``lr: float = new_default(0.015)``: the help
and flag stay the base class's. Nothing here parses a command line.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

from .errors import ConfigError

S = TypeVar("S", bound="Settings")

#: the key of a settings field's metadata that holds its :class:`Flag`
FLAG_KEY = "flag"


@dataclass(frozen=True)
class Flag:
    """How a command line offers a setting: ``--name-with-dashes`` (after ``aliases`` such as
    ``-b``), or a positional argument. ``help`` and ``choices`` may be functions, called when a
    parser is built (the shapes registered by then); ``help`` is argparse's text, ``%(default)s``
    included, with ``{why}`` replaced by ``, why`` when a recipe gives a reason for its default.
    ``parse`` turns the text into the value (default: the field's type); a ``bool`` is a switch
    (``--no-name`` too when ``negatable``)."""

    help: str | Callable[[], str]
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None
    const: Any = None
    parse: Callable[[str], Any] | None = None
    negatable: bool = False
    positional: bool = False
    why: str = ""

    def help_text(self) -> str:
        text = self.help() if callable(self.help) else self.help
        return text.replace("{why}", f", {self.why}" if self.why else "")

    def choice_values(self) -> tuple[Any, ...] | None:
        return self.choices() if callable(self.choices) else self.choices


def setting(default: Any = MISSING, help: str | Callable[[], str] = "", *, factory: Callable[[], Any] | None = None,
            **flag: Any) -> Any:
    """A settings field: its default (or ``factory`` for a mutable one; neither: required) and
    its :class:`Flag` (``help`` and the keywords of ``Flag``)."""
    metadata = {FLAG_KEY: Flag(help=help, **flag)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NewDefault:
    """A redeclared field's new default (and the reason it gives in its help): see :func:`new_default`."""

    default: Any
    why: str = ""


def new_default(default: Any, why: str = "") -> Any:
    """In a subclass, the base class's setting of the same name with another ``default`` (its
    type annotation repeated, so the dataclass keeps the field); ``why`` is added to the help."""
    return NewDefault(default, why)


def flag_of(field: dataclasses.Field) -> Flag | None:
    """The :class:`Flag` of a settings field, None for a field no command line offers."""
    return field.metadata.get(FLAG_KEY)


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def at_least(settings: Any, minimum: int, *names: str) -> None:
    """ConfigError naming the flag unless each of ``names`` is None or >= ``minimum``."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{flag(name)} must be >= {minimum}, got {value}")


def one_of(settings: Any, name: str, allowed: tuple[Any, ...]) -> None:
    """ConfigError naming the flag unless the setting ``name`` is one of ``allowed``."""
    if getattr(settings, name) not in allowed:
        raise ConfigError(f"{flag(name)} {getattr(settings, name)!r}: use one of {', '.join(map(str, allowed))}")


def either(names: tuple[str, ...]) -> str:
    """Names as a message offers them: "a, b or c"."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else "(none registered)"


class Settings:
    """Base of the settings classes: validation at construction (each section's ``validate``,
    chained through ``super()``), conversion to and from plain mappings, and new defaults of
    inherited settings (:func:`new_default`) resolved when a subclass is made."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if isinstance(value, NewDefault):
                setattr(cls, name, _redeclared(cls, name, value))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a value that cannot work (sections extend this)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any], what: str = "settings") -> S:
        """Settings from a mapping of field names (a saved config.yaml, a worker's JSON); an
        unknown name is a ConfigError that suggests the closest field."""
        valid = cls.field_names()
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(str(key), sorted(valid), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{what}: unknown key '{key}'{hint}")
        return cls(**values)


def _redeclared(cls: type, name: str, new: NewDefault) -> dataclasses.Field:
    """The field ``name`` of the nearest dataclass base of ``cls``, with ``new``'s default."""
    if name not in cls.__dict__.get("__annotations__", {}):
        raise TypeError(f"{cls.__name__}.{name}: annotate a new_default with the field's type, or the dataclass drops it")
    for base in cls.__mro__[1:]:
        base_field = base.__dict__.get("__dataclass_fields__", {}).get(name)
        if base_field is not None:
            metadata = dict(base_field.metadata)
            if new.why:
                metadata[FLAG_KEY] = dataclasses.replace(metadata[FLAG_KEY], why=new.why)
            return dataclasses.field(default=new.default, metadata=metadata)
    raise TypeError(f"{cls.__name__}.{name}: new_default needs a base class that declares {name}")


def own_fields(cls: type) -> tuple[str, ...]:
    """The settings ``cls`` itself declares, in order (not those it inherits or only redefaults)."""
    inherited = set().union(*(base.__dict__.get("__dataclass_fields__", {}) for base in cls.__mro__[1:]))
    return tuple(f.name for f in fields(cls) if f.name not in inherited and f.name in cls.__dict__.get("__annotations__", {}))
