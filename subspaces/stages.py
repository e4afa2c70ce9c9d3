"""Growing a subspace one anchor at a time [B]: each new anchor is a resumable stage with a run
folder of its own, trained by the shared Trainer while the earlier anchors stay frozen (SPRO's
vertices, the complex's shared vertices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.logging import get_logger

from .checkpoint import has_checkpoint
from .compare_progress import StageProgress
from .data import DataBundle
from .run_folder import make_accelerator, save_config
from .settings import TrainConfig
from .subspace import Subspace
from .training import Trainer

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)

S = TypeVar("S", bound=Subspace)


def train_in_stages(stages: Sequence[tuple[str, str]], out: Path, progress: StageProgress, *, finished_file: str,
                    load: Callable[[Path], S], start: Callable[[], S], grow: Callable[[S], Any],
                    stage_args: Callable[[int, Path], TrainConfig], finish: Callable[[Trainer, int, Path], Any],
                    data: DataBundle, spec: dict[str, Any], accelerator: Accelerator, final_evaluation: bool = True) -> S:
    """Train stage after stage; ``stages`` are (folder name, what it trains) pairs, stage v in
    ``out/<name>``. A stage whose folder holds ``finished_file`` is reused as ``load(folder)``;
    otherwise the subspace is ``start()`` (first trained stage) or grown by ``grow(sub)`` (a new
    anchor, the earlier ones frozen), trained with ``stage_args(v, folder)`` (its config.yaml
    written there) from the folder's checkpoint if it has one, and ``finish(trainer, v, folder)``
    writes what marks the stage finished (``final_evaluation``: the Trainer's). Returns the subspace after the last stage."""
    sub: S | None = None
    for v, (name, what) in enumerate(stages):
        stage = out / name
        if (stage / finished_file).exists():
            sub = load(stage)
            logger.info(f"{what} already trained, reused from {stage}")
            progress.end(name, reused=True)
            continue
        if sub is None:
            sub = start()
        else:
            grow(sub)
        stage.mkdir(parents=True, exist_ok=True)
        args = stage_args(v, stage)
        if accelerator.is_main_process:
            save_config(args, str(stage / "config.yaml"))
        # a Trainer per stage, each with an accelerator of its own: accelerate names the checkpoints
        # under its project folder and keeps the objects registered for checkpointing
        trainer = Trainer(args, sub, data, spec, make_accelerator(args, project_dir=stage), stage, final_evaluation=final_evaluation)
        progress.begin(name)
        trainer.fit(resume=has_checkpoint(stage))
        finish(trainer, v, stage)
        progress.end(name)
        sub = trainer.unwrapped  # type: ignore[assignment]
    assert sub is not None, "train_in_stages needs at least one stage"
    return sub
