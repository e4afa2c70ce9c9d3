"""The papers' claims checked against a comparison's own predictions, with their uncertainty.

Each claim compares rows of the table evaluated on the same test examples (every member of a
replicate trains on the same images and every replicate shares the test examples), through the
paired difference method - reference of a per-example loss, error in points or NLL
(:mod:`subspaces.stats`):

- (b) [G] Table 1: FGE(1B) error below Ind(1B) error.
- (c1) [W] Figure 1: the midpoint of a line trained for 1B has lower error and lower NLL than one
  standard network ("Single network": the Ind networks, each alone); (c1-layerwise) the same for
  [W]'s layerwise line, when the run trains one.
- (c2) [W]: the ensemble of the line's two endpoints at 1B has lower error than Ind(1B); its
  difference to Ind(2B) is reported beside it.
- (d) [B]: ESPRO(k) error below Ind(k) error at every budget k (the same number of base networks).

Each part gets a 95 % paired bootstrap interval over test examples (and replicates) and a
verdict: **held** when the interval lies below 0, **contradicted** when it lies above 0, **not
resolved at this scale** otherwise; a claim of several parts is held when every part is held and
contradicted when any part is (:func:`subspaces.stats.combine`). A claim whose rows are missing
from the run is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from . import methods  # noqa: F401  (registers the built-in methods, whose rows the claims compare)
from .method_registry import row_name
from .stats import Bootstrap, Interval, combine, paired_difference, verdict

#: row probabilities of one replicate on the test split: {(row, k): [M, N, C]}, rows by display name as in the files
RowProbs = dict[tuple[str, int], Tensor]


@dataclass
class Part:
    """One paired comparison: ``method`` minus ``reference`` in ``metric`` (error in points or NLL)."""

    label: str
    metric: str
    method: str
    reference: str
    difference: Interval
    verdict: str
    informative: bool = False   # reported beside the claim, not part of its verdict

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "metric": self.metric, "method": self.method, "reference": self.reference,
                "difference": self.difference.to_dict(), "verdict": self.verdict, "informative": self.informative}


@dataclass
class Claim:
    """A claim of a paper, its parts and its verdict over the run's replicates."""

    key: str
    statement: str
    source: str
    parts: list[Part] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return combine([p.verdict for p in self.parts if not p.informative])

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "statement": self.statement, "source": self.source, "verdict": self.verdict,
                "parts": [p.to_dict() for p in self.parts]}


STATEMENTS = {
    "b": ("FGE(1B) error < Ind(1B) error", "[G] Table 1"),
    "c1": ("Line midpoint at 1B: error and NLL < one standard network's", "[W] Figure 1"),
    "c1-layerwise": ("Layerwise line's midpoint at 1B: error and NLL < one standard network's", "[W], layerwise variant"),
    "c2": ("Line endpoints (ens.) at 1B: error < Ind(1B) error (difference to Ind(2B) reported)", "[W]"),
    "d": ("ESPRO(k) error < Ind(k) error, same number of base networks, at every budget", "[B]"),
}


def cell_name(row: str, k: int) -> str:
    """A cell's name as in results.csv and predictions.safetensors: ``ROW@kB``."""
    return f"{row}@{k}B"


def check_claims(replicates: Sequence[RowProbs], labels: Tensor, budgets: Sequence[int], bootstrap: Bootstrap,
                 losses: Any) -> list[Claim]:
    """The claims the rows allow, in the order b, c1, c1-layerwise, c2, d. Claims name rows by
    their identifiers (``fge``, ``line_midpoint``, ...); ``replicates`` hold them under their
    display names, as predictions.safetensors does.

    ``replicates``: each replicate's test row probabilities; ``labels`` [N] the shared test
    labels; ``losses(probs, labels) -> {"error": [N], "nll": [N]}`` the per-example losses of a
    row (:func:`subspaces.compare_eval.per_example_losses`)."""
    cache: dict[tuple[str, int, str], np.ndarray] = {}

    def has(row: str, k: int) -> bool:
        return all((row, k) in rep for rep in replicates)

    def values(row: str, k: int, metric: str) -> np.ndarray:
        if (row, k, metric) not in cache:
            cache[(row, k, metric)] = np.stack([losses(rep[(row, k)], labels)[metric].numpy() for rep in replicates])
        return cache[(row, k, metric)]

    def part(label: str, metric: str, method: tuple[str, int], reference: tuple[str, int], informative: bool = False) -> Part:
        d = paired_difference(values(*method, metric), values(*reference, metric), bootstrap)
        return Part(label, metric, cell_name(*method), cell_name(*reference), d, verdict(d), informative)

    claims: list[Claim] = []

    def add(key: str, parts: list[Part]) -> None:
        statement, source = STATEMENTS[key]
        claims.append(Claim(key, statement, source, parts))

    fge, ind, single, ends, espro = (row_name(key).display for key in ("fge", "ind", "single", "line_endpoints", "espro"))
    if has(fge, 1) and has(ind, 1):
        add("b", [part("FGE(1B) - Ind(1B)", "error", (fge, 1), (ind, 1))])
    for key, row in (("c1", row_name("line_midpoint").display), ("c1-layerwise", row_name("layerwise_midpoint").display)):
        if has(row, 1) and has(single, 1):
            add(key, [part(f"{row} - single network", m, (row, 1), (single, 1)) for m in ("error", "nll")])
    if has(ends, 1) and has(ind, 1):
        parts = [part("endpoints - Ind(1B)", "error", (ends, 1), (ind, 1))]
        if has(ind, 2):
            parts.append(part("endpoints - Ind(2B)", "error", (ends, 1), (ind, 2), informative=True))
        add("c2", parts)
    pairs = [k for k in budgets if has(espro, k) and has(ind, k)]
    if pairs:
        add("d", [part(f"ESPRO({k}) - Ind({k}B)", "error", (espro, k), (ind, k)) for k in pairs])
    return claims


def _number(metric: str, value: float) -> str:
    return f"{value:+.2f}" if metric == "error" else f"{value:+.4f}"


def render_claims(claims: Sequence[Claim], replicates: int, split: str = "test") -> list[str]:
    """Markdown lines: one bullet per claim with its verdict and each part's paired difference and
    interval; ``split`` names the examples the intervals resample ("test" or "validation")."""
    if not claims:
        return ["No claim could be checked: the run lacks the rows they compare."]
    lines = []
    for c in claims:
        parts = "; ".join(
            f"{p.label} {p.metric} {_number(p.metric, p.difference.value)} [{_number(p.metric, p.difference.lo)}, "
            f"{_number(p.metric, p.difference.hi)}]" + (" (reported)" if p.informative else f" {p.verdict}")
            for p in c.parts)
        lines.append(f"- ({c.key}) {c.statement} ({c.source}): **{c.verdict}**. {parts}")
    seeds = f"{replicates} replicates and the {split} examples" if replicates > 1 else f"the {split} examples"
    lines.append(f"Differences are method - reference (error in points, NLL in nats) with 95 % paired bootstrap intervals over "
                 f"{seeds}; held: the interval lies below 0, contradicted: above 0, otherwise not resolved at this scale.")
    return lines
