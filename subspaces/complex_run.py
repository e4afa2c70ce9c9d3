"""recipes/complex.py [B]: join k trained modes by m shared vertices, trained one at a time
(:mod:`subspaces.stages`), then evaluate the complex (:mod:`subspaces.complex_report`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from .complex import SimplicialComplex, load_complex, save_complex
from .complex_report import complex_cost, evaluate_complex, print_report
from .compare_progress import StageProgress
from .data import DataBundle, make_loader
from .evaluation import bn_loader
from .io import load_model_with_spec, write_json
from .metrics_log import METRICS_FILE, train_seconds
from .models import build_data_for_spec, point_seed
from .run_folder import prepare_run, read_config
from .settings import ComplexConfig
from .shapes import check_same_architecture
from .stages import train_in_stages
from .subspace import layout_for


def mode_epochs(paths: Sequence[str], override: float | None) -> float | None:
    """B, the epochs of one mode: ``override``, else the ``epochs`` of the first mode's run folder
    config.yaml (None when the modes are bare .safetensors files without one)."""
    if override is not None:
        return float(override)
    for path in paths:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        for cfg in (folder / "config.yaml", folder.parent / "config.yaml"):
            if cfg.exists():
                epochs = read_config(str(cfg)).get("epochs")
                if isinstance(epochs, (int, float)) and epochs > 0:
                    return float(epochs)
    return None


def train_shared_vertices(args: ComplexConfig, modes: Sequence[nn.Module], data: DataBundle, spec: dict[str, Any],
                          accelerator: Accelerator, out: Path) -> SimplicialComplex:
    """Grow the complex one shared vertex at a time; stage ``out/shared{v}`` is resumable and,
    once finished (``complex.safetensors`` written), reused as it is."""

    def finish(trainer: Any, v: int, stage: Path) -> None:
        if accelerator.is_main_process:
            save_complex(trainer.unwrapped, stage / "complex", spec)
        accelerator.wait_for_everyone()

    return train_in_stages(
        [(f"shared{v}", f"shared vertex {v}") for v in range(args.shared)], out,
        StageProgress("complex", args.shared, enabled=accelerator.is_main_process), finished_file="complex.safetensors",
        load=load_complex,
        start=lambda: SimplicialComplex.connect(modes, shared=1, seed=point_seed(args.seed, accelerator.process_index),
                                                layout=layout_for(args.opt, args.layer_decay)),
        grow=SimplicialComplex.add_shared_vertex,
        # [B]: the first connector's simplices are edges; the volume term starts with the second
        stage_args=lambda v, stage: dataclasses.replace(args, output=str(stage), volume_lambda=0.0 if v == 0 else args.volume_lambda),
        finish=finish, data=data, spec=spec, accelerator=accelerator)


def run_complex(args: ComplexConfig) -> dict[str, Any]:
    """The whole of recipes/complex.py: train the shared vertices (resumable per vertex), then
    evaluate the complex and write ``results.json`` (and ``complex.safetensors``) to ``--output``."""
    started = time.perf_counter()
    loaded = [load_model_with_spec(p) for p in args.checkpoints]
    modes, spec = [model for model, _ in loaded], dict(loaded[0][1])
    check_same_architecture(modes)
    with prepare_run(args) as run:
        out, accelerator = run.out, run.accelerator
        run.record(spec)
        data = build_data_for_spec(args, spec, modes[0])
        sub = train_shared_vertices(args, modes, data, spec, accelerator, out)
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return {"finished": True}
        trained = time.perf_counter()
        eval_loader = make_loader(data.eval, args.batch_size, shuffle=False)
        results = evaluate_complex(sub, eval_loader, bn_loader(data, args.batch_size), samples=args.samples,
                                   members=args.ensemble_members, seed=args.seed, bn_batches=args.bn_batches)
        evaluated = time.perf_counter()
        save_complex(sub, out / "complex", spec)
        base = mode_epochs(args.checkpoints, args.mode_epochs)
        stage_seconds = {f"shared{v}": round(train_seconds([out / f"shared{v}" / METRICS_FILE]), 1) for v in range(args.shared)}
        report = {
            "title": "simplicial complex [B]", "modes": list(args.checkpoints), "simplex_vertices": [list(s) for s in sub.simplices],
            "shared": args.shared, "epochs_per_shared_vertex": args.epochs, "samples_per_step": args.samples_per_step,
            "volume_lambda": args.volume_lambda, "volume_form": args.volume_form, "samples_per_simplex": args.samples,
            "ensemble_members": args.ensemble_members, "bn_batches": args.bn_batches,
            "cost": complex_cost(sub.modes, args.shared, args.epochs, args.samples_per_step, base),
            "seconds": {"train_per_shared_vertex": stage_seconds, "train": round(sum(stage_seconds.values()), 1),
                        "evaluate": round(evaluated - trained, 1), "this_process": round(time.perf_counter() - started, 1)},
            **results,
        }
        write_json(report, out / "results.json")
        print_report(report)
        accelerator.wait_for_everyone()
        return {"finished": True, "results": report}
