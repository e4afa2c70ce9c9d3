"""Loss or error on a grid in the plane through three networks A, THETA, B ([G]'s Figure 1).

The plane's orthonormal basis comes from Gram-Schmidt in weight space (float64):

    u = (B - A) / ||B - A||                  v = r / ||r||,  r = (THETA - A) - <THETA - A, u> u

so A sits at (0, 0), B at (||B - A||, 0) and THETA at (<THETA - A, u>, ||r||) > 0. Every grid point
w = A + x u + y v is a linear combination of A, THETA and B, evaluated as a coefficient vector
over the three (subspaces.pointwise: BatchNorm recomputed at every grid point, every batch
loaded once for all of them). The three points, the segment A-B and the curve through THETA
(the learned one of a connect run; a quadratic Bezier or a 1-bend chain for three files) are
drawn on the map.

    python analysis/plane.py runs/connect                        # ends + middle anchor of a connect run
    python analysis/plane.py a/model.safetensors theta.safetensors b/model.safetensors --curve polychain
    python analysis/plane.py runs/connect --grid 21 --margin 0.2 --metrics test_error --output docs/plane.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)
from subspaces.errors import ConfigError  # noqa: E402

METRICS = ("test_error", "test_loss", "train_loss", "train_error")
A, THETA, B = 0, 1, 2   # anchor order of the plane's subspace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plane.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a connect run folder (degree-2 Bezier or 1-bend chain), or three model files / run folders A THETA B")
    p.add_argument("--grid", type=int, default=21, help="grid points per side (default: %(default)s, as [G])")
    p.add_argument("--margin", type=float, default=0.2, help="margin around the three points, as a fraction of their extent (default: %(default)s)")
    p.add_argument("--margin-left", type=float, default=None, help="left margin (default: --margin)")
    p.add_argument("--margin-right", type=float, default=None, help="right margin (default: --margin)")
    p.add_argument("--margin-bottom", type=float, default=None, help="bottom margin (default: --margin)")
    p.add_argument("--margin-top", type=float, default=None, help="top margin (default: --margin)")
    p.add_argument("--metrics", nargs="+", default=["train_loss", "test_error"], choices=METRICS,
                   help="one panel per metric (default: train_loss test_error)")
    p.add_argument("--curve", default="bezier", choices=["bezier", "polychain", "none"],
                   help="curve drawn through THETA for three model files (default: %(default)s); a run draws its own")
    p.add_argument("--output", default=None, help="PNG to write; the JSON goes beside it (default: RUN_DIR/plane.png, else ./plane.png)")
    common.add_eval_args(p)
    return p


# ------------------------------------------------------------------------------------ geometry
def plane_basis(sub) -> dict:
    """Gram-Schmidt basis of the plane through anchors A=0, THETA=1, B=2 of ``sub`` (float64).

    Returns ``u``, ``v``: coefficient vectors Tensor[3] over the anchors of the unit vectors
    u = (B - A)/||B - A|| and v (THETA - A orthogonalised against u, normalised), and the plane
    coordinates of the three points: ``A`` (0, 0), ``B`` (||B - A||, 0), ``THETA`` (s, h), h > 0.
    Inner products are those of the differences B - A and THETA - A, summed in float64.
    """
    import torch

    if sub.num_anchors != 3:
        raise ValueError(f"the plane needs exactly three anchors (A, THETA, B); this {type(sub).__name__} has {sub.num_anchors}")
    with torch.no_grad():   # <x - a, y - a> from the centred Gram (float64, exact for any centre)
        G = sub.gram(centred=True).detach()
        ba = float(G[B, B] + G[A, A] - 2 * G[A, B])
        ta = float(G[THETA, THETA] + G[A, A] - 2 * G[A, THETA])
        dtb = float(G[THETA, B] - G[THETA, A] - G[A, B] + G[A, A])
    nu = math.sqrt(ba)
    if nu == 0:
        raise ValueError("A and B are the same network: the plane needs two distinct ends")
    s = dtb / nu
    h2 = ta - s * s
    if h2 <= 1e-12 * max(ta, 1e-300):
        raise ValueError("THETA lies on the line through A and B: the three networks span no plane")
    h = math.sqrt(h2)
    u = torch.tensor([-1.0 / nu, 0.0, 1.0 / nu], dtype=torch.float64)
    r = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) - s * u
    v = r / h
    return {"u": u, "v": v, "A": (0.0, 0.0), "B": (nu, 0.0), "THETA": (s, h), "norm_BA": nu, "norm_TA": math.sqrt(ta)}


def project(basis: dict, coeffs):
    """Plane coordinates (x, y) of points given as coefficient vectors [N, 3] over (A, THETA, B)
    that sum to 1: w - A = c_THETA (THETA - A) + c_B (B - A), so x = c_THETA s + c_B ||B - A||, y = c_THETA h."""
    import torch

    c = torch.as_tensor(coeffs, dtype=torch.float64)
    s, h = basis["THETA"]
    nu = basis["B"][0]
    return c[:, THETA] * s + c[:, B] * nu, c[:, THETA] * h


def grid_axes(basis: dict, grid: int, margins: tuple[float, float, float, float]):
    """x and y grid coordinates covering the three points plus margins (left, right, bottom, top),
    each margin a fraction of the points' extent along that axis."""
    import torch

    left, right, bottom, top = margins
    xs = [basis["A"][0], basis["B"][0], basis["THETA"][0]]
    lo, hi = min(xs), max(xs)
    h = basis["THETA"][1]
    return (torch.linspace(lo - left * (hi - lo), hi + right * (hi - lo), grid, dtype=torch.float64),
            torch.linspace(-bottom * h, h + top * h, grid, dtype=torch.float64))


def grid_coefficients(basis: dict, xs, ys):
    """Coefficients [len(ys) * len(xs), 3] of w = A + x u + y v, row-major over (y, x)."""
    import torch

    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    e0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    return e0 + gx.reshape(-1, 1) * basis["u"] + gy.reshape(-1, 1) * basis["v"]


# ------------------------------------------------------------------------------------ inputs
def load_plane(inputs: list[str], curve: str):
    """(subspace with anchors A, THETA, B, curve coefficient function or None, labels, spec)."""
    from subspaces.io import load_model_with_spec
    from subspaces.shapes import Bezier, PolyChain, Simplex, check_same_architecture

    if len(inputs) == 1:
        sub = common.load_run_subspace(inputs[0])
        ok = (isinstance(sub, Bezier) and sub.degree == 2) or (isinstance(sub, PolyChain) and sub.bends == 1)
        if not ok:
            raise ConfigError(f"{inputs[0]} holds a {type(sub).__name__} with {sub.num_anchors} anchors: the plane of a run needs a "
                              "degree-2 Bezier or a 1-bend polygonal chain (pass three model files A THETA B instead)")
        name = "Bezier" if isinstance(sub, Bezier) else "polygonal chain"
        return sub, sub.coefficients, {"A": "$w_1$", "THETA": r"$\theta$", "B": "$w_2$", "curve": f"learned {name}"}, sub.spec
    if len(inputs) != 3:
        raise ConfigError(f"plane.py takes one connect run folder or three models A THETA B, got {len(inputs)} inputs")
    loaded = [load_model_with_spec(path) for path in inputs]
    models = [model for model, _ in loaded]
    check_same_architecture(models)
    sub = Simplex.connect(models)
    labels = {"A": Path(inputs[0]).stem, "THETA": Path(inputs[1]).stem, "B": Path(inputs[2]).stem}
    fn = None
    if curve != "none":
        fn = quadratic_bezier if curve == "bezier" else one_bend_chain
        labels["curve"] = "quadratic Bezier through them" if curve == "bezier" else "1-bend chain through them"
    return sub, fn, labels, loaded[0][1]


def quadratic_bezier(t):
    """Coefficients over (A, THETA, B) of (1 - t)^2 A + 2t(1 - t) THETA + t^2 B: Tensor[N] -> Tensor[N, 3]."""
    import torch

    return torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], dim=-1)


def one_bend_chain(t):
    """Coefficients over (A, THETA, B) of the chain A -> THETA (t = 1/2) -> B: hats max(0, 1 - |2t - k|)."""
    import torch

    k = torch.arange(3, dtype=t.dtype)
    return torch.clamp(1 - torch.abs(2 * t.unsqueeze(-1) - k), min=0)


# ------------------------------------------------------------------------------------ main
def analyse(args: argparse.Namespace, argv: list[str] | None = None, plane: tuple | None = None) -> dict:
    """Evaluate the grid, draw it and write PNG + JSON. ``plane``: an already built
    (subspace with anchors A, THETA, B, curve coefficient function or None, labels, spec) in place
    of :func:`load_plane` on ``args.inputs`` (analysis/complex.py passes a complex's slice)."""
    import torch

    from subspaces.pointwise import evaluate_points

    common.check_eval_args(args)
    if args.grid < 2:
        raise ConfigError(f"--grid must be >= 2, got {args.grid}")
    margins = tuple(args.margin if m is None else m for m in (args.margin_left, args.margin_right, args.margin_bottom, args.margin_top))
    if any(m < 0 or not math.isfinite(m) for m in margins):
        raise ConfigError(f"margins must be finite and >= 0, got {margins}")
    metrics = list(dict.fromkeys(args.metrics))
    timer = common.Timer()
    sub, curve_fn, labels, spec = plane if plane is not None else load_plane(list(args.inputs), args.curve)
    default_out = Path(args.inputs[0]) / "plane.png" if len(args.inputs) == 1 else Path("plane.png")
    png, js = common.output_paths(args.output or default_out)
    device = common.device_of(args)
    sub = sub.to(device)
    basis = plane_basis(sub)
    xs, ys = grid_axes(basis, args.grid, margins)
    grid_c = grid_coefficients(basis, xs, ys)
    anchors_c = torch.eye(3, dtype=torch.float64)
    coeffs = torch.cat([grid_c, anchors_c]).float()

    bundle = common.build_data(spec, args)
    loaders = common.loaders(bundle, args)
    splits = sorted({m.split("_")[0] for m in metrics})
    with common.progress_bar() as bar:
        res = evaluate_points(sub, coefficients=coeffs, loaders={s: loaders[s] for s in splits},
                              bn_loader=loaders["bn"], bn_batches=args.bn_batches, progress=bar)
    n = grid_c.shape[0]
    values, at_points = {}, {}
    for m in metrics:
        split, kind = m.split("_")
        vec = res[split].loss if kind == "loss" else res[split].error
        values[m] = vec[:n].reshape(len(ys), len(xs)).tolist()
        at_points[m] = {"A": float(vec[n + A]), "THETA": float(vec[n + THETA]), "B": float(vec[n + B])}
    curve_xy = None
    if curve_fn is not None:
        t = torch.linspace(0, 1, 101)
        cx, cy = project(basis, curve_fn(t).double())
        curve_xy = {"x": cx.tolist(), "y": cy.tolist()}
    data = {
        "inputs": list(args.inputs), "labels": labels, "metrics": metrics, "x": xs.tolist(), "y": ys.tolist(), "values": values,
        "at_points": at_points, "points": {"A": basis["A"], "THETA": basis["THETA"], "B": basis["B"]},
        "basis": {"u": basis["u"].tolist(), "v": basis["v"].tolist(), "norm_BA": basis["norm_BA"], "norm_TA": basis["norm_TA"],
                  "anchor_order": ["A", "THETA", "B"]},
        "curve": curve_xy, "grid": args.grid, "margins": margins, "bn_batches": args.bn_batches,
        "counts": {s: res[s].count for s in splits}, "seconds": timer(), "settings": common.settings(args, argv),
    }
    fig = plot(data)
    common.save(fig, data, png, js)
    print_summary(data)
    return data


def _levels(z, count: int = 20):
    """Contour levels dense near the minimum (log-like spacing, as [G]'s plots)."""
    import numpy as np

    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    if not hi > lo:
        return np.linspace(lo - 1e-6, lo + 1e-6, 3)
    return lo + (hi - lo) * (np.logspace(0, 1, count) - 1) / 9


def plot(data: dict):
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects

    metrics = data.get("metrics") or list(data["values"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics), 4.6), squeeze=False)
    x, y = np.array(data["x"]), np.array(data["y"])
    titles = {"test_error": "test error (%)", "test_loss": "test loss", "train_loss": "train loss", "train_error": "train error (%)"}
    for ax, m in zip(axes[0], metrics):
        z = np.array(data["values"][m], dtype=float) * (100 if m.endswith("error") else 1)
        cs = ax.contourf(x, y, z, levels=_levels(z), cmap="viridis")
        ax.contour(x, y, z, levels=cs.levels, colors="k", linewidths=0.3, alpha=0.5)
        cb = fig.colorbar(cs, ax=ax, format="%.3g")
        cb.set_label(titles[m])
        (ax_, ay), (bx, by), (tx, ty) = data["points"]["A"], data["points"]["B"], data["points"]["THETA"]
        outline = [patheffects.withStroke(linewidth=3.5, foreground="black")]
        ax.plot([ax_, bx], [ay, by], "w--", lw=1.5, label="segment", path_effects=outline)
        if data["curve"] is not None:
            ax.plot(data["curve"]["x"], data["curve"]["y"], "w-", lw=2, label=data["labels"].get("curve", "curve"), path_effects=outline)
        for key, (px, py) in (("A", (ax_, ay)), ("THETA", (tx, ty)), ("B", (bx, by))):
            ax.plot(px, py, "o", ms=8, mfc="white", mec="black")
            ax.annotate(data["labels"][key], (px, py), textcoords="offset points", xytext=(6, 6), color="white", fontsize=11,
                        fontweight="bold", path_effects=outline)
        ax.set_title(f"{titles[m]}, BN recomputed at every point")
        ax.set_xlabel("x along u = (B - A) / |B - A|")
        ax.set_ylabel("y along v (THETA - A, orthogonalised)")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.6)
    counts = ", ".join(f"{n} {s}" for s, n in data["counts"].items())
    fig.suptitle(f"plane through {', '.join(Path(i).name for i in data['inputs'])}: {data['grid']}x{data['grid']} grid, "
                 f"{counts} examples, {data['bn_batches']} BN batches (x and y drawn at different scales)", fontsize=9)
    fig.tight_layout()
    return fig


def print_summary(data: dict) -> None:
    from rich.table import Table

    table = Table(title="plane: metrics at the three points and over the grid")
    table.add_column("metric")
    for col in ("A", "THETA", "B", "grid min", "grid max"):
        table.add_column(col, justify="right")
    for m, at in data["at_points"].items():
        scale = 100 if m.endswith("error") else 1
        flat = [v for row in data["values"][m] for v in row]
        table.add_row(m + (" %" if scale == 100 else ""), *(f"{scale * at[k]:.3f}" for k in ("A", "THETA", "B")),
                      f"{scale * min(flat):.3f}", f"{scale * max(flat):.3f}")
    common.console.print(table)
    p = data["points"]
    common.console.print(f"|B - A| = {p['B'][0]:.3f}, THETA at ({p['THETA'][0]:.3f}, {p['THETA'][1]:.3f}); {data['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = common.parse(p, argv)
    return common.run(lambda: analyse(args, argv))


if __name__ == "__main__":
    sys.exit(main())
