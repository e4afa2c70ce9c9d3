"""SPRO and ESPRO [B] (docs/science.md §5): grow simplexes from trained networks, one vertex at a time.

SPRO: vertex 0 is a trained network (frozen); each new vertex starts at the centroid of the
current ones, which are frozen, and is trained on E_{p ~ Dirichlet(1)} L(w(p)) - lambda log Vol.
ESPRO: one SPRO simplex per trained network; predict with the average probability of points
sampled from every simplex (BatchNorm recomputed at each point).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console
from accelerate.logging import get_logger

from .data import DataBundle, make_loader
from .ensembles import Ensemble, evaluate
from .io import load_model_with_spec, load_subspace, write_json
from .shapes import Simplex, check_same_architecture
from .subspace import layout_for
from .compare_progress import StageProgress
from .run_folder import prepare_run
from .settings import SPROConfig
from .evaluation import bn_loader
from .models import build_data_for_spec, point_seed
from .reporting import results_table
from .stages import train_in_stages
from .training import finish_run

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)


#: the fields of a model spec that decide the dataset built for it (:func:`build_data_for_spec`)
INPUT_FIELDS = ("dataset", "img_size", "in_chans", "mean", "std")


def same_inputs(spec: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two networks of one architecture are trained on the same dataset built for ``spec``."""
    return all(spec.get(key) == other.get(key) for key in INPUT_FIELDS)


def grow_simplex(args: SPROConfig, base_path: str, out: Path, accelerator: Any, index: int, data: DataBundle | None = None,
                 evaluate: bool = True) -> Simplex:
    """SPRO from one trained network; each added vertex is a resumable stage ``out/vertexV``.
    ``data``: the images to train on (default: the base network's dataset drawn as ``args`` say);
    ``evaluate=False``: the stages are not evaluated (a caller that evaluates the simplex itself)."""
    base, spec = load_model_with_spec(base_path)
    if data is None:
        data = build_data_for_spec(args, spec, base)
    return train_in_stages(
        [(f"vertex{v}", f"simplex {index}: vertex {v}") for v in range(1, args.vertices)], out,
        StageProgress(f"simplex {index}", args.vertices - 1, enabled=accelerator.is_main_process), finished_file="subspace.safetensors",
        load=load_subspace,  # type: ignore[arg-type]
        start=lambda: Simplex.connect([base], new_vertices=1, seed=point_seed(args.seed + 1000 * index, accelerator.process_index),
                                      layout=layout_for(args.opt, args.layer_decay)),
        grow=Simplex.add_vertex, stage_args=lambda v, stage: dataclasses.replace(args, output=str(stage)),
        finish=lambda trainer, i, stage: finish_run(trainer, f"simplex {index}, {i + 2} vertices"),   # stage i adds vertex i + 1
        data=data, spec=spec, accelerator=accelerator, final_evaluation=evaluate)


def run_spro(args: SPROConfig) -> dict[str, Any]:
    """Grow one simplex per checkpoint, then evaluate each simplex and their ESPRO ensemble."""
    loaded = [load_model_with_spec(p) for p in args.checkpoints]
    bases, spec = [model for model, _ in loaded], loaded[0][1]
    check_same_architecture(bases)
    with prepare_run(args) as run:
        out, accelerator = run.out, run.accelerator
        run.record(dict(spec))
        data = build_data_for_spec(args, dict(spec), bases[0])   # shared by every simplex whose network saw the same inputs
        simplexes = [grow_simplex(args, p, out / f"simplex{i}", accelerator, i, data=data if same_inputs(own, spec) else None)
                     for i, (p, (_, own)) in enumerate(zip(args.checkpoints, loaded))]
        bn = bn_loader(data, args.batch_size)
        eval_loader = accelerator.prepare(make_loader(data.eval, args.batch_size, shuffle=False))
        results: dict[str, dict[str, float]] = {}
        members = []
        for i, sub in enumerate(simplexes):
            points = [sub.sample(sub.generator) for _ in range(args.samples)]
            exported = [sub.export(p, bn_loader=bn, bn_batches=args.bn_batches) for p in points]
            results[f"simplex{i} (1 sample)"] = evaluate(exported[0], eval_loader, accelerator=accelerator)
            results[f"simplex{i} ({args.samples} samples)"] = evaluate(Ensemble(exported), eval_loader, accelerator=accelerator)
            members += exported
        for i, base in enumerate(bases):
            results[f"network{i}"] = evaluate(base, eval_loader, accelerator=accelerator)
        if len(bases) > 1:
            results[f"ensemble of the {len(bases)} networks"] = evaluate(Ensemble(bases), eval_loader, accelerator=accelerator)
            results[f"ESPRO ({len(bases)} simplexes x {args.samples} samples)"] = evaluate(Ensemble(members), eval_loader, accelerator=accelerator)
        if accelerator.is_main_process:
            write_json({"title": "SPRO/ESPRO", "results": results, "vertices": args.vertices,
                        "epochs_per_vertex": args.epochs, "samples": args.samples}, out / "results.json")
            Console().print(results_table("SPRO / ESPRO", results))
        return {"finished": True, "results": results}
