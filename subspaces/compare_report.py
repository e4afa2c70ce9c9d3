"""The comparison's report: tables over replicates and their renderings, pure functions of the results.

A replicate's evaluation is ``{"rows": {row: {"kB": cell}}}`` with cells of metrics (``acc``,
``nll``, ``ece``, ``brier``), ``members`` and ``cost`` (in B). :func:`aggregate` gives the mean
and std over replicates; the renderers write them as markdown, CSV and a rich table, with the
claims of :mod:`subspaces.claims`.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from rich.table import Table

ROW_ORDER = ("Single network", "Ind", "SSE", "FGE", "SWA", "Line midpoint", "Line endpoints", "Line ", "Line (layerwise)", "Simplex centre",
             "Simplex ", "ESPRO")


def row_rank(row: str) -> tuple[int, str]:
    """Rows in the table's order (baselines, snapshot methods, then subspaces), whatever order they
    were stored in: the rank of the longest entry of ``ROW_ORDER`` the row starts with."""
    matches = [(len(prefix), i) for i, prefix in enumerate(ROW_ORDER) if row == prefix or row.startswith(prefix)]
    return (max(matches)[1] if matches else len(ROW_ORDER), row)


def aggregate(per_seed: list[dict[str, Any]], budgets: list[int]) -> dict[str, dict[str, Any]]:
    """mean and std (over replicates) of every metric, per row and budget; rows keep their first order."""
    order: list[str] = []
    for rep in per_seed:
        order += [r for r in rep["rows"] if r not in order]
    order.sort(key=row_rank)
    out: dict[str, dict[str, Any]] = {}
    for row in order:
        for k in budgets:
            cells = [rep["rows"][row][f"{k}B"] for rep in per_seed if f"{k}B" in rep["rows"].get(row, {})]
            if not cells:
                continue
            agg: dict[str, Any] = {"n": len(cells), "members": cells[0]["members"], "cost": cells[0].get("cost", float(k))}
            for key in ("acc", "nll", "ece", "brier"):
                vals = [c[key] for c in cells]
                agg[key] = statistics.fmean(vals)
                agg[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            errs = [100 * (1 - c["acc"]) for c in cells]
            agg["error"] = statistics.fmean(errs)
            agg["error_std"] = statistics.stdev(errs) if len(errs) > 1 else 0.0
            out.setdefault(row, {})[f"{k}B"] = agg
    return out


def _cell(agg: dict[str, Any] | None, key: str, digits: int, seeds: int) -> str:
    if agg is None:
        return "-"
    value = f"{agg[key]:.{digits}f}"
    return value + (f" ± {agg[key + '_std']:.{digits}f}" if seeds > 1 else "")


def _error_cell(cells: dict[str, Any], k: int, seeds: int) -> str:
    """Error with its members, and its cost where it is not k x B (ESPRO's SPRO epochs)."""
    agg = cells.get(f"{k}B")
    if agg is None:
        return "-"
    cost = agg.get("cost", float(k))
    extra = f", cost {cost:.2f}B" if abs(cost - k) > 1e-9 else ""
    return f"{_cell(agg, 'error', 2, seeds)} ({agg['members']}{extra})"


def render_markdown(title: str, table: dict[str, dict[str, Any]], budgets: list[int], seeds: int, lines: list[str], footer: list[str],
                    claims: list[str] | None = None) -> str:
    head = ["method"] + [f"{k}B error %" for k in budgets] + [f"{k}B NLL" for k in budgets]
    md = [f"# {title}", "", f"Mean{' ± std over ' + str(seeds) + ' seeds' if seeds > 1 else ' (1 seed)'}; "
          "(n) = ensemble members at that budget (and the training cost where it is not k x B); \"Single network\" is the "
          "mean of the Ind networks' own metrics; (ens.) = probability-averaged ensemble of points of one trained subspace.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in table.items():
        errs = [_error_cell(cells, k, seeds) for k in budgets]
        nlls = [_cell(cells.get(f"{k}B"), "nll", 4, seeds) for k in budgets]
        md.append("| " + " | ".join([row] + errs + nlls) + " |")
    head2 = ["method"] + [f"{k}B ECE" for k in budgets] + [f"{k}B Brier" for k in budgets]
    md += ["", "Calibration:", "", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for row, cells in table.items():
        md.append("| " + " | ".join([row] + [_cell(cells.get(f"{k}B"), "ece", 4, seeds) for k in budgets]
                                    + [_cell(cells.get(f"{k}B"), "brier", 4, seeds) for k in budgets]) + " |")
    if claims is not None:
        md += ["", "## Claims", "", "Checked by the run on its own numbers (error in %; a claim is held when it holds on at "
               "least two thirds of the seeds):", ""] + claims
    md += ["", "Budget accounting:", ""] + [f"- {ln}" for ln in lines] + [""] + footer
    return "\n".join(md) + "\n"


def render_csv(per_seed: list[dict[str, Any]], table: dict[str, dict[str, Any]], seeds: list[int], claims: list[Any] | None = None) -> str:
    """One row per (method, budget, seed), then the mean and std rows, then one row per claim and
    seed (method ``claim (b)``, ``held`` 1 or 0; the budget column names what it compares)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "budget", "members", "cost_B", "seed", "error_pct", "acc", "nll", "ece", "brier", "held"])
    for s, rep in zip(seeds, per_seed):
        for row, cells in rep["rows"].items():
            for b, c in cells.items():
                w.writerow([row, b, c["members"], f"{c.get('cost', int(b[:-1])):.4f}", s, f"{100 * (1 - c['acc']):.4f}", f"{c['acc']:.6f}",
                            f"{c['nll']:.6f}", f"{c['ece']:.6f}", f"{c['brier']:.6f}", ""])
    for stat in ("mean", "std"):
        for row, cells in table.items():
            for b, c in cells.items():
                suffix = "" if stat == "mean" else "_std"
                w.writerow([row, b, c["members"], f"{c['cost']:.4f}", stat, f"{c['error' + suffix]:.4f}", f"{c['acc' + suffix]:.6f}",
                            f"{c['nll' + suffix]:.6f}", f"{c['ece' + suffix]:.6f}", f"{c['brier' + suffix]:.6f}", ""])
    for claim in claims or []:
        for s, held in zip(seeds, claim.held_per_seed):
            w.writerow([f"claim ({claim.key})", claim.statement, "", "", s, "", "", "", "", "", int(held)])
    return buf.getvalue()


def rich_table(title: str, table: dict[str, dict[str, Any]], budgets: list[int], seeds: int) -> Any:
    t = Table(title=title)
    t.add_column("method")
    for k in budgets:
        t.add_column(f"{k}B error %", justify="right")
    for k in budgets:
        t.add_column(f"{k}B NLL", justify="right")
    for row, cells in table.items():
        errs = [_error_cell(cells, k, seeds) for k in budgets]
        t.add_row(row, *errs, *[_cell(cells.get(f"{k}B"), "nll", 4, seeds) for k in budgets])
    return t
