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
from .io import load_model, load_subspace, write_json
from .shapes import Simplex, check_same_architecture
from .subspace import layout_for
from .checkpoint import has_checkpoint
from .compare_progress import StageProgress
from .run_folder import make_accelerator, prepare_run, save_config
from .settings import POINT_SEED_STRIDE, SPROConfig
from .training import Trainer, bn_loader, build_data_for_spec, finish_run, results_table

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)


def grow_simplex(args: SPROConfig, base_path: str, out: Path, accelerator: Any, index: int, data: DataBundle | None = None) -> Simplex:
    """SPRO from one trained network; each added vertex is a resumable stage ``out/vertexV``.
    ``data``: the images to train on (default: the base network's dataset drawn as ``args`` say)."""
    base = load_model(base_path)
    spec = dict(base.spec)
    if data is None:
        data = build_data_for_spec(args, spec, base)
    sub: Simplex | None = None
    stages = StageProgress(f"simplex {index}", args.vertices - 1, enabled=accelerator.is_main_process)
    for v in range(1, args.vertices):
        stage = out / f"vertex{v}"
        if (stage / "subspace.safetensors").exists():
            sub = load_subspace(stage)  # type: ignore[assignment]
            logger.info(f"simplex {index}: vertex {v} already trained, reused from {stage}")
            stages.end(stage.name, reused=True)
            continue
        if sub is None:
            seed = args.seed + 1000 * index + POINT_SEED_STRIDE * accelerator.process_index
            sub = Simplex.connect([base], new_vertices=1, seed=seed, layout=layout_for(args.opt, args.layer_decay))
        else:
            sub.add_vertex()
        stage.mkdir(parents=True, exist_ok=True)
        stage_args = dataclasses.replace(args, output=str(stage))
        if accelerator.is_main_process:
            save_config(stage_args, str(stage / "config.yaml"))
        # a Trainer per stage, each with an accelerator of its own: accelerate names the checkpoints
        # under its project folder and keeps the objects registered for checkpointing
        trainer = Trainer(stage_args, sub, data, spec, make_accelerator(stage_args, project_dir=stage), stage)
        stages.begin(stage.name)
        trainer.fit(resume=has_checkpoint(stage))
        finish_run(trainer, f"simplex {index}, {v + 1} vertices")
        stages.end(stage.name)
        sub = trainer.unwrapped  # type: ignore[assignment]
    assert sub is not None
    return sub


def run_spro(args: SPROConfig) -> dict[str, Any]:
    """Grow one simplex per checkpoint, then evaluate each simplex and their ESPRO ensemble."""
    bases = [load_model(p) for p in args.checkpoints]
    check_same_architecture(bases)
    with prepare_run(args) as run:
        out, accelerator = run.out, run.accelerator
        run.record(dict(bases[0].spec))
        simplexes = [grow_simplex(args, p, out / f"simplex{i}", accelerator, i) for i, p in enumerate(args.checkpoints)]
        data = build_data_for_spec(args, dict(bases[0].spec), bases[0])
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
