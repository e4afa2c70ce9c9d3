"""Loss and error barriers between two networks: the straight segment, raw and after permutation
alignment, and trained curves.

For values v(t) along a path (t = 0 at A, t = 1 at B) the barrier is

    B = max_t [ v(t) - ((1 - t) v(0) + t v(1)) ]

(Entezari et al. 2022's loss barrier; with v = the error, the error barrier of Frankle et al. 2020),
with the t where it peaks, on train and test data, BatchNorm recomputed at every point
(subspaces.barrier, subspaces.pointwise). Paths:

    segment           (1 - t) A + t B
    segment aligned   (1 - t) A + t P(B), P from weight matching (--align, subspaces.align)
    curve RUN         a trained curve of a connect run (--curve RUN, repeatable), and the
                      straight segment between its own ends ("segment of RUN")

    python analysis/barrier.py runs/a runs/b                          # -> runs/barrier/barrier.png + .json
    python analysis/barrier.py runs/a runs/b --align --curve runs/connect --curve runs/connect_aligned
    python analysis/barrier.py a/model.safetensors b/model.safetensors --points 11 --output docs/barrier.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common  # noqa: E402  (the sibling module, found because a script's own folder is searched first)
from subspaces.errors import ConfigError  # noqa: E402

DATASETS = ("train", "test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="barrier.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a", help="network A: a run folder or a .safetensors export")
    p.add_argument("model_b", help="network B (same architecture)")
    p.add_argument("--align", action="store_true", help="also the segment from A to B aligned to A by weight matching")
    p.add_argument("--align-seed", type=int, default=0, help="seed of weight matching's group order (default: %(default)s)")
    p.add_argument("--curve", action="append", default=[], metavar="RUN",
                   help="a connect run folder: barrier along its curve and its own segment (repeatable)")
    p.add_argument("--points", type=int, default=25, help="evenly spaced t in [0, 1] on each path (default: %(default)s)")
    p.add_argument("--output", default="runs/barrier/barrier.png", help="PNG to write; the JSON goes beside it (default: %(default)s)")
    common.add_eval_args(p, train_subset=5000)
    return p


def _path_record(label: str, t, metrics: dict, bars: dict, **extra) -> dict:
    """One path's values and barriers, JSON-ready."""
    rec = {"label": label, "t": t.tolist(), **extra}
    for name in DATASETS:
        rec[name] = {"loss": metrics[name].loss.tolist(), "error": metrics[name].error.tolist(),
                     "loss_barrier": bars[name]["loss"].to_dict(), "error_barrier": bars[name]["error"].to_dict()}
    return rec


def analyse(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    import torch

    from subspaces.align import align
    from subspaces.barrier import curve_barriers, segment_barriers
    from subspaces.io import load_model, load_model_with_spec
    from subspaces.shapes import Curve, check_same_architecture

    common.check_eval_args(args)
    if args.points < 2:
        raise ConfigError(f"--points must be >= 2 (both ends), got {args.points}")
    timer = common.Timer()
    png, js = common.output_paths(args.output)
    device = common.device_of(args)
    (a, spec_a), b = load_model_with_spec(args.model_a), load_model(args.model_b)
    try:
        check_same_architecture([a, b])
    except ConfigError as err:   # the message names the files, not "model 0" / "model 1" alone
        raise ConfigError(f"{args.model_a} and {args.model_b}: {err}") from None
    curves = []
    for run in args.curve:
        sub = common.load_run_subspace(run)
        if not isinstance(sub, Curve):
            raise ConfigError(f"{run} holds a {type(sub).__name__}, not a curve: --curve needs a connect run (Bezier or PolyChain)")
        curves.append((run, sub.to(device)))
    a, b = a.to(device), b.to(device)
    bundle = common.build_data(spec_a, args)
    loaders = common.loaders(bundle, args)
    evals = {name: loaders[name] for name in DATASETS}
    kw = dict(bn_loader=loaders["bn"], bn_batches=args.bn_batches, points=args.points)
    paths, alignment = [], None
    with common.progress_bar() as bar:
        t0 = timer()
        t, metrics, bars = segment_barriers(a, b, evals, progress=bar, **kw)
        paths.append(_path_record("segment", t, metrics, bars, seconds=round(timer() - t0, 2)))
        if args.align:
            t0 = timer()
            example = next(iter(loaders["bn"]))[0][:2].to(device)
            b_aligned, alignment = align(a, b, example, seed=args.align_seed)
            alignment["seconds"] = round(timer() - t0, 2)
            t, metrics, bars = segment_barriers(a, b_aligned, evals, progress=bar, **kw)
            paths.append(_path_record("segment aligned", t, metrics, bars, seconds=round(timer() - t0, 2)))
        for run, sub in curves:
            t0 = timer()
            t, metrics, bars = curve_barriers(sub, evals, progress=bar, **kw)
            secs = round(timer() - t0, 2)
            paths.append(_path_record(f"curve {Path(run).name}", t, metrics["curve"], bars["curve"], run=str(run), seconds=secs))
            paths.append(_path_record(f"segment of {Path(run).name}", t, metrics["segment"], bars["segment"], run=str(run), seconds=secs))
    data = {"model_a": str(args.model_a), "model_b": str(args.model_b), "paths": paths, "alignment": alignment,
            "train_count": len(bundle.bn), "test_count": len(bundle.eval), "bn_batches": args.bn_batches,
            "seconds": timer(), "settings": common.settings(args, argv), "torch_threads": torch.get_num_threads()}
    common.save(plot(data), data, png, js)
    print_summary(data)
    return data


def plot(data: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, path in enumerate(data["paths"]):
        style = dict(color=f"C{i}", lw=2, ls="--" if path["label"].startswith("segment") else "-", label=path["label"])
        for ax, (name, kind, scale) in zip(axes, (("train", "loss", 1), ("test", "loss", 1), ("test", "error", 100))):
            ax.plot(path["t"], [scale * v for v in path[name][kind]], **style)
            peak = path[name][f"{kind}_barrier"]
            ax.plot([peak["t"]], [scale * peak["value"]], "o", color=f"C{i}", ms=4)
    for ax, title in zip(axes, ("train loss", "test loss", "test error (%)")):
        ax.set_title(f"{title}, BN recomputed at every t (dot: barrier peak)", fontsize=9)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{data['model_a']} -> {data['model_b']}: {data['train_count']} train / {data['test_count']} test examples, "
                 f"{data['bn_batches']} BN batches", fontsize=9)
    fig.tight_layout()
    return fig


def print_summary(data: dict) -> None:
    from rich.table import Table

    table = Table(title=f"barriers: {data['model_a']} -> {data['model_b']} ({len(data['paths'][0]['t'])} points per path)")
    for col in ("path", "data", "loss barrier", "at t", "error barrier %", "at t", "ends loss", "ends error %"):
        table.add_column(col, justify="left" if col in ("path", "data") else "right")
    for path in data["paths"]:
        for name in DATASETS:
            lb, eb = path[name]["loss_barrier"], path[name]["error_barrier"]
            table.add_row(path["label"], name, f"{lb['height']:.4f}", f"{lb['t']:.3f}", f"{100 * eb['height']:.2f}", f"{eb['t']:.3f}",
                          f"{lb['ends'][0]:.4f} / {lb['ends'][1]:.4f}", f"{100 * eb['ends'][0]:.2f} / {100 * eb['ends'][1]:.2f}")
    common.console.print(table)
    if data["alignment"]:
        al = data["alignment"]
        other = "none run" if al["similarity_alternative"] is None else f"{al['similarity_alternative']:.6g}"
        common.console.print(f"alignment: {al['groups']} groups, {al['channels']} channels ({al['channels_moved']} moved), "
                             f"{al['iterations']} sweeps; similarity {al['similarity_after']:.6g} "
                             f"(upper bound {al['similarity_bound']:.6g}, "
                             f"start '{al['start']}', best other start {other}); "
                             f"||A - B|| {al['distance_before']:.3f} -> {al['distance_after']:.3f}; "
                             f"max output change {al['max_output_change']:.2g}; {al['seconds']:.1f} s")
    common.console.print(f"{data['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = common.parse(p, argv)
    return common.run(lambda: analyse(args, argv))


if __name__ == "__main__":
    sys.exit(main())
