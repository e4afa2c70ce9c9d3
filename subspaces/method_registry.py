"""The registry of compared methods: one :class:`MethodEntry` per ``--methods`` name of
``recipes/compare.py``, read by the plan (validation, derived numbers, accounting), the members'
training and evaluation, the rows of the table and the claims.

A method says which members it trains in each replicate (run folders under ``OUTPUT/seedR/``,
each after the members it starts from), how it trains one, which networks each member
contributes (their probabilities are saved where the member trained) and which rows it builds
from them at each budget. Rows are keyed by identifiers (``line_midpoint``); their display names
(``"Line midpoint"``) are what results.md, results.csv, results.json and predictions.safetensors
show. A new method is one new file plus one registration, as timm's ``register_model``::

    class Toy(CompareMethod):
        rows = (RowName("toy", "Toy"),)

        def members(self, plan):
            return [Member("toy", updates=plan.B * plan.upe)]

        def member(self, plan, name):
            return self.members(plan)[0] if name == "toy" else None

        def train(self, runner, member):
            runner.standard(member.name, runner.seed + 70, runner.plan.B)

        def networks(self, member, ctx):
            yield "net", ctx.recomputed(ctx.folder / "model.safetensors")

        def build_rows(self, plan, rows):
            rows.put("toy", 1, rows.mean([("toy", "net")]), members=1, cost=1.0)

    register_method("toy", Toy(), seed_offset=70)     # then: recipes/compare.py --methods ind,toy

The built-in methods are registered in :mod:`subspaces.methods`, one file each; a module of
methods (or shapes) outside the package is imported by the recipes when named in the
environment variable ``SUBSPACES_PLUGINS`` (:func:`subspaces.cli.load_plugins`), so that the
compare's worker processes see it too. This module imports nothing of the package but its errors,
so that the settings can read :data:`DEFAULT_METHODS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

#: the methods a compare runs unless ``--methods`` says otherwise (``ind`` always runs), in the
#: table's order; every other registered method runs when named
DEFAULT_METHODS = ("ind", "sse", "fge", "swa", "line", "layerwise", "simplex", "espro")


@dataclass(frozen=True)
class RowName:
    """A row of the table: its identifier ``key`` (unique over all methods) and its ``display``
    name, where ``{samples}`` stands for ``--samples`` ("Line {samples} points (ens.)")."""

    key: str
    display: str

    def shown(self, samples: int) -> str:
        """The display name at ``samples`` points per subspace ensemble."""
        return self.display.format(samples=samples)

    @property
    def prefix(self) -> str:
        """The fixed start of the display name (all of it when it has no ``{samples}``)."""
        return self.display.split("{", 1)[0]


@dataclass(frozen=True)
class Member:
    """One run a method trains in each replicate: ``name`` is its folder under ``seedR/``,
    ``deps`` the members it starts from, ``index`` its number within the method (Ind network j,
    the budget k of a shape), ``updates`` the optimiser updates it trains and ``update_cost`` the
    forward/backward passes per update (for the progress view's time estimate). Members start in
    ``rank`` order (ties in registration order): the longest first, so that worker processes
    finish together."""

    name: str
    deps: tuple[str, ...] = ()
    index: int = 0
    updates: int = 0
    update_cost: float = 1.0
    rank: tuple[int, ...] = (4,)


class CompareMethod:
    """A compared method: override the hooks it needs. ``plan`` is the compare's
    :class:`~subspaces.compare_plan.Plan`, ``args`` its :class:`~subspaces.settings.CompareConfig`,
    ``runner`` a :class:`~subspaces.compare_run.Runner` (one replicate: ``args``, ``plan``,
    ``seed``, ``root``, ``data``, ``spec`` and ``standard(name, seed, epochs, subspace, **extra)``
    that trains a plain network or a shape from scratch)."""

    #: the rows this method builds, in the table's order
    rows: tuple[RowName, ...] = ()
    #: another method this one cannot run without, and why: ("fge", "averages the FGE snapshots")
    needs: tuple[str, str] | None = None

    def derive(self, args: Any, B: int, upe: int, budgets: list[int], pretrain_iter: int) -> tuple[dict[str, Any], list[str]]:
        """Validate this method's flags (ConfigError) and return the :class:`Plan` fields it
        sets and notes for the accounting."""
        return {}, []

    def members(self, plan: Any) -> list[Member]:
        """The members this method trains in each replicate under ``plan``."""
        return []

    def member(self, plan: Any, name: str) -> Member | None:
        """The member called ``name`` if it is one of this method's (at any budget), else None."""
        return None

    def train(self, runner: Any, member: Member) -> None:
        """Train ``member`` into ``runner.root / member.name``, resuming its checkpoint."""
        raise NotImplementedError(f"{type(self).__name__} trains no member")

    def is_trained(self, runner: Any, member: Member) -> bool:
        """Whether ``member`` finished training (by default: its run folder's results.json)."""
        return (runner.root / member.name / "results.json").exists()

    def networks(self, member: Member, ctx: Any) -> Iterator[tuple[str, Any]]:
        """The networks ``member`` contributes to the table, as (key, factory) pairs, each factory
        returning the network with BatchNorm recomputed at its weights (``ctx``:
        :class:`~subspaces.compare_eval.NetworkContext`)."""
        return iter(())

    def build_rows(self, plan: Any, rows: Any) -> None:
        """Put this method's rows at each budget into ``rows``
        (:class:`~subspaces.compare_eval.RowBuilder`) from its members' saved networks."""

    def cost(self, plan: Any, k: int) -> float:
        """Training cost of this method's row at budget kB, in B (k unless it pays more)."""
        return float(k)

    def accounting(self, plan: Any, args: Any) -> list[str]:
        """Lines of the budget accounting printed with the results."""
        return []


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its ``--methods`` ``name``, the :class:`CompareMethod` ``method`` and
    its ``seed_offset`` (member seeds of replicate seed s start at s + offset; None: it trains
    nothing of its own)."""

    name: str
    method: CompareMethod
    seed_offset: int | None

    @property
    def rows(self) -> tuple[RowName, ...]:
        return self.method.rows


_ENTRIES: dict[str, MethodEntry] = {}
#: name -> seed offset, the live view that :data:`subspaces.compare_plan.OFFSETS` is
_OFFSETS: dict[str, int] = {}


def register_method(name: str, method: CompareMethod, *, seed_offset: int | None = None) -> MethodEntry:
    """Register ``method`` as the compared method ``name`` (see :class:`MethodEntry`) and return
    its entry; ValueError for a taken name, a taken seed offset or a row key another method
    declares already (:func:`unregister_method` first to replace one)."""
    if not name.isidentifier():
        raise ValueError(f"method name {name!r} must be an identifier")
    if name in _ENTRIES:
        raise ValueError(f"a method named {name!r} is registered already")
    if seed_offset is not None and seed_offset in _OFFSETS.values():
        raise ValueError(f"seed offset {seed_offset} is taken by {next(n for n, o in _OFFSETS.items() if o == seed_offset)!r}")
    taken = {r.key for e in _ENTRIES.values() for r in e.rows}
    clash = [r.key for r in method.rows if r.key in taken]
    if clash:
        raise ValueError(f"row {clash[0]!r} of method {name!r} is declared by another method already")
    entry = MethodEntry(name, method, seed_offset)
    _ENTRIES[name] = entry
    if seed_offset is not None:
        _OFFSETS[name] = seed_offset
    return entry


def unregister_method(name: str) -> None:
    """Remove the method ``name`` (KeyError if none is registered): for tests and replacements."""
    del _ENTRIES[name]
    _OFFSETS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered names in registration order (the table's order)."""
    return tuple(_ENTRIES)


def get_method(name: str) -> MethodEntry:
    """The entry of ``name``; KeyError for a name nobody registered."""
    return _ENTRIES[name]


def seed_offsets() -> Mapping[str, int]:
    """A read-only, live mapping name -> seed offset of the methods that train members."""
    return MappingProxyType(_OFFSETS)


def check_methods(names: list[str]) -> None:
    """ConfigError naming the unknown ``--methods`` and the registered ones, or a method whose
    needed method is missing (``swa`` without ``fge``)."""
    unknown = [m for m in names if m not in _ENTRIES]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {','.join(_ENTRIES)}")
    for m in names:
        needs = _ENTRIES[m].method.needs
        if needs is not None and needs[0] not in names:
            raise ConfigError(f"--methods: {m} {needs[1]}; add {needs[0]}")


def find_member(methods: list[str], plan: Any, name: str) -> tuple[MethodEntry, Member]:
    """The method of ``methods`` that trains the member called ``name``, and the member;
    ValueError ``unknown compare member`` for a name none of them trains."""
    for m in methods:
        entry = _ENTRIES[m]
        found = entry.method.member(plan, name)
        if found is not None:
            return entry, found
    raise ValueError(f"unknown compare member {name!r}")


def row_entries() -> list[tuple[MethodEntry, RowName]]:
    """Every registered row with its method, in the table's order."""
    return [(e, r) for e in _ENTRIES.values() for r in e.rows]


def row_method(row: str) -> MethodEntry:
    """The method that builds ``row`` (an identifier, or a display name at any ``--samples``);
    KeyError for a row no method builds."""
    for entry, name in row_entries():
        if row in (name.key, name.display) or (name.prefix != name.display and row.startswith(name.prefix)
                                               and row.endswith(name.display.rsplit("}", 1)[1])):
            return entry
    raise KeyError(row)


def row_name(key: str) -> RowName:
    """The declaration of row ``key``; KeyError for a row no method declares."""
    for _, name in row_entries():
        if name.key == key:
            return name
    raise KeyError(key)


def row_display(key: str, samples: int) -> str:
    """The display name of row ``key`` at ``samples`` points ("Line 3 points (ens.)")."""
    return row_name(key).shown(samples)


def row_rank(row: str) -> tuple[int, str]:
    """Rows in the table's order (the methods' registration order, then each method's rows),
    whatever order they were stored in; ``row`` is an identifier or a display name, ranked by the
    row whose display name (up to a ``{samples}``) is the longest start of it. Rows no method
    declares go last."""
    best: tuple[int, int] | None = None
    for i, (_, name) in enumerate(row_entries()):
        if row == name.key:
            return (i, row)
        if row.startswith(name.prefix) and (best is None or len(name.prefix) > best[0]):
            best = (len(name.prefix), i)
    return (best[1] if best is not None else len(row_entries()), row)
