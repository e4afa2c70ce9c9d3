"""The comparison's figure: test error and NLL against the training budget, in the style of the
budget plots of [G] and [W].

A row reported at several budgets (Ind, SSE, FGE, SWA, ESPRO, subspaces trained at several
budgets) is a line through its cells; a row at one budget only (the single network, a line's
midpoint, a simplex's centre) is a point. A cell sits at its training cost (ESPRO pays its SPRO
epochs on top of kB). Error bars are the cells' 95 % bootstrap intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def budget_figure(table: dict[str, dict[str, Any]], budgets: list[int], path: Path, title: str) -> Path:
    """Write ``path`` (PNG): two panels, test error (%) and NLL against the budget kB, one series
    per row of ``table`` (:func:`subspaces.compare_report.aggregate`'s cells, with ``error_lo`` /
    ``error_hi`` / ``nll_lo`` / ``nll_hi`` where known). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    markers = "osD^vP*Xh<>"
    colours = plt.get_cmap("tab20").colors
    for i, (row, cells) in enumerate(table.items()):
        ks = [k for k in budgets if f"{k}B" in cells]
        if not ks:
            continue
        # budgets apart a little so that error bars of rows with equal costs do not hide each other
        shift = (i - len(table) / 2) * 0.012
        for ax, key in zip(axes, ("error", "nll")):
            ys = [cells[f"{k}B"][key] for k in ks]
            lo = [cells[f"{k}B"].get(f"{key}_lo", y) for k, y in zip(ks, ys)]
            hi = [cells[f"{k}B"].get(f"{key}_hi", y) for k, y in zip(ks, ys)]
            xs = [cells[f"{k}B"].get("cost", float(k)) + shift for k in ks]
            yerr = [[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]]
            ax.errorbar(xs, ys, yerr=yerr, marker=markers[i % len(markers)], color=colours[i % len(colours)], capsize=3,
                        label=row, linestyle="-" if len(ks) > 1 else "none")
    for ax, label in zip(axes, ("test error (%)", "test NLL")):
        ax.set_xticks(budgets, [f"{k}B" for k in budgets])
        ax.set_xlabel("training cost (B = epochs of one network)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title + "; 95 % bootstrap intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
