"""What a finished or stopped run leaves behind: the exported networks, ``results.json`` and the
results table, each rank's report, and the message that says how to continue a stopped run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from torch import nn

from .bn import update_bn
from .data import DataBundle
from .evaluation import bn_loader
from .io import save_export, save_subspace, write_json
from .settings import TrainConfig
from .subspace import Subspace


def resume_hint(out: str | Path) -> str:
    """The instruction that continues a stopped run: "continue with --resume OUT"."""
    return f"continue with --resume {out}"


def stopped_message(out: str | Path, epochs_done: int | None = None, epochs: int | None = None) -> str:
    """How a run that stopped before its last epoch is continued: "stopped after epoch N of M;
    continue with --resume OUT" (the epochs left out where unknown)."""
    where = "" if epochs_done is None else f" after epoch {epochs_done}" + ("" if epochs is None else f" of {epochs}")
    return f"stopped{where}; {resume_hint(out)}"


def results_table(title: str, results: dict[str, dict[str, float]]) -> Table:
    """A rich table: one row per evaluated model or point, columns acc / NLL / ECE / Brier."""
    table = Table(title=title)
    for col in ("point", "accuracy", "error %", "NLL", "ECE", "Brier"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for name, m in results.items():
        table.add_row(name, f"{m['acc']:.4f}", f"{100 * (1 - m['acc']):.2f}", f"{m['nll']:.4f}", f"{m['ece']:.4f}", f"{m['brier']:.4f}")
    return table


def save_exports(net: nn.Module, out: Path, spec: dict[str, Any], data: DataBundle, args: TrainConfig) -> None:
    """The run's networks in ``args.export_format``: a plain model as ``out/model``; a subspace as
    ``out/subspace`` plus ``out/exports/centre`` and ``out/exports/anchor<k>``, each with its
    BatchNorm recomputed on :func:`~subspaces.evaluation.bn_loader`'s images."""
    export_format = getattr(args, "export_format", "both")
    if not isinstance(net, Subspace):
        save_export(net, out / "model", spec, export_format)
        return
    save_subspace(net, out / "subspace", spec)
    bn = bn_loader(data, args.batch_size)
    centre = net.export(bn_loader=bn, bn_batches=args.bn_batches)
    save_export(centre, out / "exports" / "centre", {**spec, "point": "centre"}, export_format)
    for k in range(net.num_anchors):
        anchor = net.anchor(k)
        update_bn(anchor, bn, max_batches=args.bn_batches)
        save_export(anchor, out / "exports" / f"anchor{k}", {**spec, "point": f"anchor{k}"}, export_format)


def save_results(title: str, results: dict[str, dict[str, float]], out: Path) -> None:
    """``out/results.json`` (``{"title", "results"}``) and the results table on the console."""
    write_json({"title": title, "results": results}, out / "results.json")
    if results:
        Console().print(results_table(title, results))


def rank_report(net: nn.Module, accelerator: Accelerator, examples_seen: int, results: dict[str, Any]) -> dict[str, Any]:
    """What this rank did: the examples it trained on in this process, a SHA-256 of its final
    weights (``net``'s state_dict but the per-rank point generator) and the metrics it computed;
    written per rank to check distributed runs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        if name.endswith("_extra_state"):   # the point generator differs per rank on purpose
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "examples_seen": examples_seen,
            "weights_sha256": digest.hexdigest(), "results": results}
