"""The comparison's report: tables over replicates and their renderings, pure functions of the results.

A replicate's evaluation is ``{"rows": {row: {"kB": cell}}}`` with cells of test metrics
(``acc``, ``nll``, ``ece``, ``brier``), the same on the validation split (``val_acc``, ...),
``members`` and ``cost`` (in B). :func:`aggregate` gives the mean and std over replicates with
each cell's bootstrap interval; the renderers write them as markdown, CSV and a rich table, with
the claims of :mod:`subspaces.claims`.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from rich.table import Table

from .method_registry import row_rank

METRICS = ("acc", "nll", "ece", "brier")

__all__ = ["METRICS", "aggregate", "render_csv", "render_markdown", "rich_table", "row_rank"]


def aggregate(per_seed: list[dict[str, Any]], budgets: list[int], intervals: dict[str, dict[str, Any]] | None = None
              ) -> dict[str, dict[str, Any]]:
    """mean and std (over replicates) of every metric, per row and budget; rows in the table's
    order (:func:`~subspaces.method_registry.row_rank`: the methods' registration order).
    ``intervals``: {"ROW@kB": {"error": Interval, "nll": Interval}} adds ``error_lo`` /
    ``error_hi`` / ``nll_lo`` / ``nll_hi`` (the test split's bootstrap intervals) to the cells."""
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
            for prefix in ("", "val_"):
                for key in METRICS:
                    vals = [c[prefix + key] for c in cells if prefix + key in c]
                    if len(vals) != len(cells):
                        continue
                    agg[prefix + key] = statistics.fmean(vals)
                    agg[f"{prefix}{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                if prefix + "acc" in agg:
                    errs = [100 * (1 - c[prefix + "acc"]) for c in cells]
                    agg[prefix + "error"] = statistics.fmean(errs)
                    agg[prefix + "error_std"] = statistics.stdev(errs) if len(errs) > 1 else 0.0
            for metric, iv in (intervals or {}).get(f"{row}@{k}B", {}).items():
                agg[f"{metric}_lo"], agg[f"{metric}_hi"] = iv.lo, iv.hi
            out.setdefault(row, {})[f"{k}B"] = agg
    return out


def _cell(agg: dict[str, Any] | None, key: str, digits: int, seeds: int) -> str:
    """``mean`` (± std over seeds), then the bootstrap interval ``[lo, hi]`` where the cell has one."""
    if agg is None or key not in agg:
        return "-"
    value = f"{agg[key]:.{digits}f}"
    if seeds > 1 and key + "_std" in agg:
        value += f" ± {agg[key + '_std']:.{digits}f}"
    if key + "_lo" in agg:
        value += f" [{agg[key + '_lo']:.{digits}f}, {agg[key + '_hi']:.{digits}f}]"
    return value


def _error_cell(cells: dict[str, Any], k: int, seeds: int, key: str = "error") -> str:
    """Error with its interval and members, and its cost where it is not k x B (ESPRO's SPRO epochs)."""
    agg = cells.get(f"{k}B")
    if agg is None:
        return "-"
    cost = agg.get("cost", float(k))
    extra = f", cost {cost:.2f}B" if abs(cost - k) > 1e-9 else ""
    return f"{_cell(agg, key, 2, seeds)} ({agg['members']}{extra})"


def render_markdown(title: str, table: dict[str, dict[str, Any]], budgets: list[int], seeds: int, lines: list[str], footer: list[str],
                    claims: list[str] | None = None, figure: str | None = None) -> str:
    head = ["method"] + [f"{k}B error %" for k in budgets] + [f"{k}B NLL" for k in budgets]
    md = [f"# {title}", "", f"Test split. Mean{' ± std over ' + str(seeds) + ' seeds' if seeds > 1 else ' (1 seed)'}, then the 95 % bootstrap "
          "interval [lo, hi] over test examples" + (" and seeds" if seeds > 1 else "") + "; (n) = ensemble members at that budget (and the "
          "training cost where it is not k x B); \"Single network\" is the mean of the Ind networks' own metrics; (ens.) = "
          "probability-averaged ensemble of points of one trained subspace.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in table.items():
        errs = [_error_cell(cells, k, seeds) for k in budgets]
        nlls = [_cell(cells.get(f"{k}B"), "nll", 4, seeds) for k in budgets]
        md.append("| " + " | ".join([row] + errs + nlls) + " |")
    if any("val_error" in c for cells in table.values() for c in cells.values()):
        head_v = ["method"] + [f"{k}B val error %" for k in budgets] + [f"{k}B val NLL" for k in budgets]
        md += ["", "Validation split (held out of the training images, never trained on; settings are chosen on it):", "",
               "| " + " | ".join(head_v) + " |", "|" + "---|" * len(head_v)]
        for row, cells in table.items():
            md.append("| " + " | ".join([row] + [_error_cell(cells, k, seeds, "val_error") for k in budgets]
                                        + [_cell(cells.get(f"{k}B"), "val_nll", 4, seeds) for k in budgets]) + " |")
    head2 = ["method"] + [f"{k}B ECE" for k in budgets] + [f"{k}B Brier" for k in budgets]
    md += ["", "Calibration (test):", "", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for row, cells in table.items():
        md.append("| " + " | ".join([row] + [_cell(cells.get(f"{k}B"), "ece", 4, seeds) for k in budgets]
                                    + [_cell(cells.get(f"{k}B"), "brier", 4, seeds) for k in budgets]) + " |")
    if figure is not None:
        md += ["", f"![test error and NLL against the budget]({figure})"]
    if claims is not None:
        md += ["", "## Claims", "", "Checked by the run on its own test predictions:", ""] + claims
    md += ["", "Budget accounting:", ""] + [f"- {ln}" for ln in lines] + [""] + footer
    return "\n".join(md) + "\n"


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render_csv(per_seed: list[dict[str, Any]], table: dict[str, dict[str, Any]], seeds: list[int], claims: list[Any] | None = None) -> str:
    """One row per (method, budget, seed), then the mean and std rows (the mean rows with the test
    split's bootstrap intervals), then one row per part of each claim (method ``claim (b)``, the
    budget column naming the comparison, the difference in ``error_pct`` or ``nll`` with its
    interval, and the part's verdict)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "budget", "members", "cost_B", "seed", "error_pct", "acc", "nll", "ece", "brier", "val_error_pct", "val_nll",
                "error_lo", "error_hi", "nll_lo", "nll_hi", "verdict"])
    for s, rep in zip(seeds, per_seed):
        for row, cells in rep["rows"].items():
            for b, c in cells.items():
                val_err = 100 * (1 - c["val_acc"]) if "val_acc" in c else None
                w.writerow([row, b, c["members"], f"{c.get('cost', int(b[:-1])):.4f}", s, f"{100 * (1 - c['acc']):.4f}", f"{c['acc']:.6f}",
                            f"{c['nll']:.6f}", f"{c['ece']:.6f}", f"{c['brier']:.6f}", _fmt(val_err, 4), _fmt(c.get("val_nll"), 6),
                            "", "", "", "", ""])
    for stat in ("mean", "std"):
        suffix = "" if stat == "mean" else "_std"
        for row, cells in table.items():
            for b, c in cells.items():
                lims = [_fmt(c.get(key), 4 if key.startswith("error") else 6) for key in ("error_lo", "error_hi", "nll_lo", "nll_hi")]
                w.writerow([row, b, c["members"], f"{c['cost']:.4f}", stat, f"{c['error' + suffix]:.4f}", f"{c['acc' + suffix]:.6f}",
                            f"{c['nll' + suffix]:.6f}", f"{c['ece' + suffix]:.6f}", f"{c['brier' + suffix]:.6f}",
                            _fmt(c.get("val_error" + suffix), 4), _fmt(c.get("val_nll" + suffix), 6),
                            *(lims if stat == "mean" else ["", "", "", ""]), ""])
    for claim in claims or []:
        for part in claim.parts:
            d = part.difference
            err = part.metric == "error"
            w.writerow([f"claim ({claim.key})", part.label, "", "", "all", f"{d.value:.4f}" if err else "", "", "" if err else f"{d.value:.6f}",
                        "", "", "", "", f"{d.lo:.4f}" if err else "", f"{d.hi:.4f}" if err else "", "" if err else f"{d.lo:.6f}",
                        "" if err else f"{d.hi:.6f}", "reported" if part.informative else part.verdict])
        w.writerow([f"claim ({claim.key})", claim.statement, "", "", "all", "", "", "", "", "", "", "", "", "", "", "", claim.verdict])
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
