"""The papers' claims checked against a comparison's own numbers (pure functions of its tables).

Each replicate (seed) of ``recipes/compare.py`` gives a table ``{row: {"kB": cell}}`` whose cells
hold ``acc`` and ``nll`` (``error`` = 100 (1 - acc)). A claim compares rows of that table:

- (b) [G] Table 1: FGE(1B) error <= Ind(1B) error.
- (c1) [W] Figure 1: the line's midpoint trained for 1B has error and NLL <= those of one standard
  network (the "Single network" row: the mean of the independent networks, each alone); the same
  for the midpoint of [W]'s layerwise line (c1-layerwise), when the run trains one.
- (c2) [W]: the ensemble of the line's two endpoints at 1B has error <= Ind(1B); the gap to
  Ind(2B) is reported beside it.
- (d) [B]: ESPRO(k) error <= Ind(k) error at every budget k both rows have (the same number of
  independently trained base networks).

A claim whose rows are missing from the run is left out. Over several seeds a claim is *held*
when it holds on at least two thirds of them (2 of 3), and the count is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Table = dict[str, dict[str, dict[str, Any]]]


@dataclass
class Claim:
    """One claim over the seeds: ``held_per_seed[i]`` and the numbers it compared on seed i."""

    key: str
    statement: str
    source: str
    held_per_seed: list[bool] = field(default_factory=list)
    numbers: list[dict[str, float]] = field(default_factory=list)

    @property
    def seeds_held(self) -> int:
        return sum(self.held_per_seed)

    @property
    def held(self) -> bool:
        return 3 * self.seeds_held >= 2 * len(self.held_per_seed) and bool(self.held_per_seed)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds_held": self.seeds_held, "seeds": len(self.held_per_seed), "held": self.held}


def error(cell: dict[str, Any]) -> float:
    """Test error in percent of a table cell: 100 (1 - acc)."""
    return 100.0 * (1.0 - float(cell["acc"]))


def _cell(table: Table, row: str, budget: int) -> dict[str, Any] | None:
    return table.get(row, {}).get(f"{budget}B")


def _one_seed(table: Table, budgets: Sequence[int]) -> dict[str, tuple[bool, dict[str, float]]]:
    """Every claim that this replicate's rows allow: key -> (held, numbers)."""
    out: dict[str, tuple[bool, dict[str, float]]] = {}
    ind1, ind2 = _cell(table, "Ind", 1), _cell(table, "Ind", 2)
    fge1 = _cell(table, "FGE", 1)
    if ind1 is not None and fge1 is not None:
        out["b"] = (error(fge1) <= error(ind1), {"FGE(1B) error": error(fge1), "Ind(1B) error": error(ind1)})
    single = _cell(table, "Single network", 1)
    for key, row in (("c1", "Line midpoint"), ("c1-layerwise", "Line (layerwise) midpoint")):
        mid = _cell(table, row, 1)
        if mid is not None and single is not None:
            held = error(mid) <= error(single) and float(mid["nll"]) <= float(single["nll"])
            out[key] = (held, {"midpoint error": error(mid), "single error": error(single),
                               "midpoint NLL": float(mid["nll"]), "single NLL": float(single["nll"])})
    ends = _cell(table, "Line endpoints (ens.)", 1)
    if ends is not None and ind1 is not None:
        numbers = {"endpoints error": error(ends), "Ind(1B) error": error(ind1)}
        if ind2 is not None:
            numbers["Ind(2B) error"] = error(ind2)
            numbers["gap to Ind(2B)"] = error(ends) - error(ind2)
        out["c2"] = (error(ends) <= error(ind1), numbers)
    pairs = [(k, _cell(table, "ESPRO", k), _cell(table, "Ind", k)) for k in budgets]
    pairs = [(k, e, i) for k, e, i in pairs if e is not None and i is not None]
    if pairs:
        numbers = {}
        for k, e, i in pairs:
            numbers[f"ESPRO({k}) error"] = error(e)
            numbers[f"Ind({k}B) error"] = error(i)
        out["d"] = (all(error(e) <= error(i) for _, e, i in pairs), numbers)
    return out


STATEMENTS = {
    "b": ("FGE(1B) error <= Ind(1B) error", "[G] Table 1"),
    "c1": ("Line midpoint at 1B: error and NLL <= one standard network's", "[W] Figure 1"),
    "c1-layerwise": ("Layerwise line's midpoint at 1B: error and NLL <= one standard network's", "[W], layerwise variant"),
    "c2": ("Line endpoints (ens.) at 1B: error <= Ind(1B) error (gap to Ind(2B) reported)", "[W]"),
    "d": ("ESPRO(k) error <= Ind(k) error, same number of base networks, at every budget", "[B]"),
}


def check_claims(tables: Sequence[Table], budgets: Sequence[int]) -> list[Claim]:
    """The claims over replicates: one :class:`Claim` per claim the rows allow, in the order b, c1, c1-layerwise, c2, d."""
    per_seed = [_one_seed(t, budgets) for t in tables]
    claims = []
    for key, (statement, source) in STATEMENTS.items():
        results = [r[key] for r in per_seed if key in r]
        if len(results) != len(per_seed) or not results:
            continue
        claims.append(Claim(key, statement, source, [held for held, _ in results], [nums for _, nums in results]))
    return claims


def render_claims(claims: Sequence[Claim]) -> list[str]:
    """Markdown lines: one bullet per claim with its verdict, the seeds that held it and its numbers."""
    if not claims:
        return ["No claim could be checked: the run lacks the rows they compare."]
    lines = []
    for c in claims:
        n = len(c.held_per_seed)
        verdict = "**held**" if c.held else "**not held**"
        where = f"{c.seeds_held} of {n} seeds" if n > 1 else ("this seed" if c.seeds_held else "not on this seed")
        nums = "; ".join(
            f"replicate {i}: " + ", ".join(f"{k} {v:.2f}" if "NLL" not in k else f"{k} {v:.4f}" for k, v in numbers.items())
            for i, numbers in enumerate(c.numbers)
        )
        lines.append(f"- ({c.key}) {c.statement} ({c.source}): {verdict} ({where}). {nums}")
    return lines
