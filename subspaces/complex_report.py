"""The simplicial complex's evaluation and report [B]: test error and NLL of its vertices, of
points drawn uniformly in each simplex and across the complex, and of ensembles against the modes
alone; the cost of training its shared vertices in one mode's epochs."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from .complex import SimplicialComplex
from .pointwise import evaluate_points


def complex_cost(modes: int, shared: int, epochs: int, samples_per_step: int, base_epochs: float | None) -> dict[str, Any]:
    """Training cost of the shared vertices, counted as the compare protocol counts ESPRO:
    m E s epochs of one network's forward/backward passes (m shared vertices, E epochs each, s
    points per batch); in B (one mode's epochs) that is m E s / B, and k + m E s / B with the modes."""
    passes = shared * epochs * samples_per_step
    out: dict[str, Any] = {"shared_vertex_epochs": shared * epochs, "points_per_batch": samples_per_step,
                           "gradient_epochs": passes, "mode_epochs_B": base_epochs}
    if base_epochs:
        out.update({"complex_cost_B": passes / base_epochs, "total_cost_B": modes + passes / base_epochs, "ind_cost_B": float(modes)})
    return out


def error_summary(errors: Tensor, nll: Tensor) -> dict[str, float]:
    """Mean / std / min / max of per-point errors and the mean NLL of N points: Tensor[N] each."""
    e = errors.double()
    return {"points": int(e.numel()), "error_mean": float(e.mean()), "error_std": float(e.std()) if e.numel() > 1 else 0.0,
            "error_min": float(e.min()), "error_max": float(e.max()), "nll_mean": float(nll.double().mean()),
            "nll_max": float(nll.double().max())}


def evaluate_complex(sub: SimplicialComplex, eval_loader: Any, bn: Any, *, samples: int, members: int, seed: int,
                     bn_batches: int | None) -> dict[str, Any]:
    """Test error and NLL of the vertices, of ``samples`` uniform points of each simplex, of all of
    them together, and of ensembles: the first n of ``members`` points drawn across the complex
    (simplex ~ U, Dirichlet(1) in it) against Ind(n), the first n modes, for n = 1..k, and the
    ``members``-point complex ensemble. BatchNorm is recomputed at every point (one pass each over
    ``bn`` and ``eval_loader`` for all points); draws come from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    k, K = sub.modes, sub.num_anchors
    per = [sub.sample_simplex(i, gen, n=samples) for i in range(k)]    # k x [S, K]
    across = sub.sample(gen, n=members)                                  # [M, K]
    coeffs = torch.cat([torch.eye(K), *per, across])
    first_across = K + k * samples
    sizes = sorted({*range(1, k + 1), members})
    groups = [list(range(n)) for n in range(1, k + 1)] + [list(range(first_across, first_across + n)) for n in sizes]
    res = evaluate_points(sub, coefficients=coeffs, loaders=eval_loader, bn_loader=bn, bn_batches=bn_batches, ensembles=groups)
    err, nll = res.error, res.loss
    vertices = {f"mode{i}": {"error": float(err[i]), "nll": float(nll[i])} for i in range(k)}
    vertices.update({f"shared{j - k}": {"error": float(err[j]), "nll": float(nll[j])} for j in range(k, K)})
    simplices = {}
    for i in range(k):
        rows = slice(K + i * samples, K + (i + 1) * samples)
        s = error_summary(err[rows], nll[rows])
        s.update({"vertices": list(sub.simplices[i]), "mode_error": float(err[i]), "mode_nll": float(nll[i]),
                  "gap_mean": s["error_mean"] - float(err[i]), "gap_max": s["error_max"] - float(err[i])})
        simplices[f"simplex{i}"] = s
    all_rows = slice(K, first_across)
    whole = error_summary(err[all_rows], nll[all_rows])
    whole["modes_error_mean"] = float(err[:k].double().mean())
    whole["gap_mean"] = whole["error_mean"] - whole["modes_error_mean"]
    whole["gap_max_per_simplex"] = max(simplices[f"simplex{i}"]["gap_max"] for i in range(k))
    ensembles = {}
    for n in range(1, k + 1):
        ensembles[f"Ind ({n} modes)"] = {"members": n, "error": 1 - float(res.ensemble_acc[n - 1]), "nll": float(res.ensemble_loss[n - 1])}
    for j, n in enumerate(sizes):
        ensembles[f"complex ({n} points)"] = {"members": n, "error": 1 - float(res.ensemble_acc[k + j]), "nll": float(res.ensemble_loss[k + j])}
    return {"vertices": vertices, "simplices": simplices, "complex": whole, "ensembles": ensembles, "test_examples": res.count,
            "claim_within_1_point": bool(whole["gap_max_per_simplex"] <= 0.01), "claim_mean_within_1_point": bool(whole["gap_mean"] <= 0.01)}


def print_report(report: dict[str, Any]) -> None:
    """Two rich tables: per-simplex sampled points against their mode, and ensembles at equal members."""
    console = Console(width=max(Console().width, 110))   # the tables stay readable in a log file
    table = Table(title="simplicial complex: test error (%) of points sampled uniformly in each simplex, BN recomputed at each")
    for col in ("simplex", "points", "mode error", "mean error", "min", "max", "mean - mode", "mean NLL", "mode NLL"):
        table.add_column(col, justify="left" if col == "simplex" else "right")
    for name, s in report["simplices"].items():
        table.add_row(name, str(s["points"]), f"{100 * s['mode_error']:.2f}", f"{100 * s['error_mean']:.2f}", f"{100 * s['error_min']:.2f}",
                      f"{100 * s['error_max']:.2f}", f"{100 * s['gap_mean']:+.2f}", f"{s['nll_mean']:.4f}", f"{s['mode_nll']:.4f}")
    c = report["complex"]
    table.add_row("whole complex", str(c["points"]), f"{100 * c['modes_error_mean']:.2f}", f"{100 * c['error_mean']:.2f}",
                  f"{100 * c['error_min']:.2f}", f"{100 * c['error_max']:.2f}", f"{100 * c['gap_mean']:+.2f}", f"{c['nll_mean']:.4f}", "")
    console.print(table)
    ens = Table(title="ensembles: points across the complex against the modes alone (Ind)")
    for col in ("ensemble", "members", "error %", "NLL"):
        ens.add_column(col, justify="left" if col == "ensemble" else "right")
    for name, e in report["ensembles"].items():
        ens.add_row(name, str(e["members"]), f"{100 * e['error']:.2f}", f"{e['nll']:.4f}")
    console.print(ens)
    cost = report["cost"]
    if cost.get("complex_cost_B") is not None:
        console.print(f"cost: shared vertices {cost['gradient_epochs']} epochs of passes = {cost['complex_cost_B']:.2f}B; "
                      f"with the modes {cost['total_cost_B']:.2f}B (Ind: {cost['ind_cost_B']:.0f}B)")
