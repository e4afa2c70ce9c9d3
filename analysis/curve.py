"""Train loss and test error along a learned curve and along the straight segment between its ends.

[G]'s Figure 2: for a connect run (a Bezier curve or polygonal chain fitted between two trained
networks, recipes/connect.py), N evenly spaced t in [0, 1] (default 61) on

    the curve     w(t) = sum_k c_k(t) W_k
    the segment   (1 - t) W_0 + t W_{K-1}     (Line.connect(ends), as coefficients over the same anchors)

with BatchNorm recomputed at every point (--bn-batches training batches), all points evaluated
in one pass over each dataset (subspaces.pointwise). Prints the curve's length (integral of
||w'(t)||), the segment's, and the largest test error along each path.
Barriers (max_t of the rise above the chord between the ends' values, subspaces.barrier) of the train/test loss and error are in the JSON, the table and the figure.

    python analysis/curve.py runs/connect                                      # -> runs/connect/curve.png + .json
    python analysis/curve.py runs/connect --train-subset 5000 --eval-subset 2000 --output docs/curve.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)
from subspaces.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a connect run folder (subspace.safetensors: a Bezier curve or polygonal chain)")
    p.add_argument("--points", type=int, default=61, help="evenly spaced t in [0, 1] on each path (default: %(default)s, as [G])")
    p.add_argument("--output", default=None, help="PNG to write; the JSON goes beside it (default: RUN_DIR/curve.png)")
    p.add_argument("--log-loss", action="store_true", help="train loss on a log axis")
    common.add_eval_args(p)
    return p


def coefficients(sub, ts):
    """Curve and segment coefficients over the curve's anchors: two Tensor[N, K]."""
    import torch

    curve = sub.coefficients(ts)
    segment = torch.zeros_like(curve)
    segment[:, 0] = 1 - ts
    segment[:, -1] = ts
    return curve.float(), segment.float()


def analyse(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    import torch

    from subspaces.barrier import barrier
    from subspaces.pointwise import distance, evaluate_points, integrate_speed
    from subspaces.shapes import Curve

    common.check_eval_args(args)
    if args.points < 2:
        raise ConfigError(f"--points must be >= 2 (both ends), got {args.points}")
    timer = common.Timer()
    sub = common.load_run_subspace(args.run_dir)
    if not isinstance(sub, Curve):
        raise ConfigError(f"{args.run_dir} holds a {type(sub).__name__}, not a curve: curve.py needs a connect run (Bezier or PolyChain)")
    png, js = common.output_paths(args.output or Path(args.run_dir) / "curve.png")
    device = common.device_of(args)
    sub = sub.to(device)
    bundle = common.build_data(sub.spec, args)
    loaders = common.loaders(bundle, args)

    ts = torch.linspace(0, 1, args.points)
    curve_c, segment_c = coefficients(sub, ts)
    n = args.points
    with common.progress_bar() as bar:
        res = evaluate_points(sub, coefficients=torch.cat([curve_c, segment_c]), loaders={"train": loaders["train"], "test": loaders["test"]},
                              bn_loader=loaders["bn"], bn_batches=args.bn_batches, progress=bar)

    def path(lo: int) -> dict:
        sl = slice(lo, lo + n)
        return {"train_loss": res["train"].loss[sl].tolist(), "train_error": res["train"].error[sl].tolist(),
                "test_loss": res["test"].loss[sl].tolist(), "test_error": res["test"].error[sl].tolist()}

    curve, segment = path(0), path(n)
    K = sub.num_anchors
    ends = torch.eye(K, dtype=torch.float64)
    length = integrate_speed(sub)
    seg_length = distance(sub, ends[0], ends[-1])
    summary = {}
    for name, d in (("curve", curve), ("segment", segment)):
        err = torch.tensor(d["test_error"])
        loss = torch.tensor(d["train_loss"])
        i, j = int(err.argmax()), int(loss.argmax())
        summary[name] = {"max_test_error": float(err[i]), "t_max_test_error": float(ts[i]), "max_train_loss": float(loss[j]),
                         "t_max_train_loss": float(ts[j]), "mean_test_error": float(err.mean()),
                         "barriers": {key: barrier(d[key], ts).to_dict() for key in ("train_loss", "train_error", "test_loss", "test_error")}}
    summary["endpoints"] = {"test_error": [curve["test_error"][0], curve["test_error"][-1]],
                            "train_loss": [curve["train_loss"][0], curve["train_loss"][-1]]}
    summary["curve_length"] = length
    summary["segment_length"] = seg_length
    seconds = timer()
    data = {"run_dir": str(args.run_dir), "shape": type(sub).__name__, "num_anchors": K, "t": ts.tolist(),
            "curve": curve, "segment": segment, "summary": summary, "train_count": res["train"].count,
            "test_count": res["test"].count, "bn_batches": args.bn_batches, "seconds": seconds,
            "settings": common.settings(args, argv)}
    fig = plot(data)
    common.save(fig, data, png, js)
    print_summary(data)
    return data


def plot(data: dict):
    import matplotlib.pyplot as plt

    t = data["t"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, style in (("curve", dict(color="C0", lw=2, label=f"learned {data['shape']} curve")),
                        ("segment", dict(color="C3", lw=2, ls="--", label="straight segment"))):
        b = data["summary"][name]["barriers"]
        ax1.plot(t, data[name]["train_loss"], **{**style, "label": f"{style['label']} (barrier {b['train_loss']['height']:.3f})"})
        ax2.plot(t, [100 * e for e in data[name]["test_error"]],
                 **{**style, "label": f"{style['label']} (barrier {100 * b['test_error']['height']:.1f} %)"})
        for ax, key, scale in ((ax1, "train_loss", 1), (ax2, "test_error", 100)):   # the barrier: peak above the ends' chord
            peak = b[key]
            ends = peak["ends"]
            chord = scale * ((1 - peak["t"]) * ends[0] + peak["t"] * ends[1])
            ax.vlines(peak["t"], chord, scale * peak["value"], colors=style["color"], linestyles=":", lw=1)
    ax1.set_title("train loss (BN recomputed at every t)")
    ax1.set_xlabel("t")
    ax1.set_ylabel("cross-entropy")
    if data["settings"].get("log_loss"):
        ax1.set_yscale("log")
    ax2.set_title("test error (%)")
    ax2.set_xlabel("t")
    ax2.set_ylabel("error %")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
        ax.legend()
    s = data["summary"]
    fig.suptitle(f"{Path(data['run_dir']).name}: length {s['curve_length']:.1f} (segment {s['segment_length']:.1f}); "
                 f"{data['train_count']} train / {data['test_count']} test examples, {data['bn_batches']} BN batches", fontsize=9)
    fig.tight_layout()
    return fig


def print_summary(data: dict) -> None:
    from rich.table import Table

    s = data["summary"]
    table = Table(title=f"{data['run_dir']}: curve vs straight segment ({len(data['t'])} points each)")
    for col in ("path", "length", "max test error %", "at t", "mean test error %", "max train loss", "at t",
                "test error barrier %", "test loss barrier", "train loss barrier"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, length in (("curve", s["curve_length"]), ("segment", s["segment_length"])):
        d = s[name]
        table.add_row(name, f"{length:.2f}", f"{100 * d['max_test_error']:.2f}", f"{d['t_max_test_error']:.3f}",
                      f"{100 * d['mean_test_error']:.2f}", f"{d['max_train_loss']:.4f}", f"{d['t_max_train_loss']:.3f}",
                      f"{100 * d['barriers']['test_error']['height']:.2f}", f"{d['barriers']['test_loss']['height']:.4f}",
                      f"{d['barriers']['train_loss']['height']:.4f}")
    common.console.print(table)
    e = s["endpoints"]["test_error"]
    common.console.print(f"endpoints: test error {100 * e[0]:.2f}% (t=0), {100 * e[1]:.2f}% (t=1); {data['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = common.parse(p, argv)
    return common.run(lambda: analyse(args, argv))


if __name__ == "__main__":
    sys.exit(main())
