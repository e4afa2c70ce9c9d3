"""Fitting a curve between two trained networks ([G], docs/science.md §2), on the shared Trainer."""

from __future__ import annotations

from typing import Any

from accelerate.logging import get_logger

from .align import align, example_batch
from .errors import ConfigError
from .io import load_model, load_model_with_spec, write_json
from .schedules import garipov_schedule
from .shapes import Bezier, PolyChain, check_same_architecture
from .subspace import layout_for
from .run_folder import prepare_run
from .settings import ConnectConfig
from .models import build_data_for_spec, point_seed
from .reporting import stopped_message
from .training import Trainer, finish_run

logger = get_logger(__name__)   # messages of the main process (accelerate's multi-process logger)


def run_connect(args: ConnectConfig) -> dict[str, Any]:
    """Load both ends, build the curve, train its interior anchors, evaluate and export."""
    (model_a, spec), model_b = load_model_with_spec(args.model_a), load_model(args.model_b)
    try:
        check_same_architecture([model_a, model_b])
    except ConfigError as err:   # the message names the files, not "model 0" / "model 1" alone
        raise ConfigError(f"{args.model_a} and {args.model_b}: {err}") from None
    with prepare_run(args) as run:
        data = build_data_for_spec(args, spec, model_a)
        if args.align:   # B permuted to match A (weight matching): the same function, a shorter segment
            model_b, alignment = align(model_a, model_b, example_batch(data.bn), seed=args.seed)
            if run.accelerator.is_main_process:
                write_json(alignment, run.out / "alignment.json")
        seed = args.seed if args.same_point else point_seed(args.seed, run.accelerator.process_index)
        layout = layout_for(args.opt, args.layer_decay)
        if args.curve == "bezier":
            curve = Bezier.connect(model_a, model_b, degree=args.degree or 2, sampling=args.sampling, seed=seed, layout=layout)
        else:
            curve = PolyChain.connect(model_a, model_b, bends=args.bends if args.bends is not None else 1, sampling=args.sampling,
                                      seed=seed, layout=layout)
        run.record(spec)
        make_scheduler = None
        if args.sched == "garipov":
            make_scheduler = lambda opt, per_epoch: garipov_schedule(opt, per_epoch * args.epochs)  # noqa: E731
        elif args.sched == "garipov-epoch":
            make_scheduler = lambda opt, per_epoch: garipov_schedule(opt, per_epoch * args.epochs, per_epoch)  # noqa: E731
        trainer = Trainer(args, curve, data, spec, run.accelerator, run.out, make_scheduler=make_scheduler)
        status = trainer.fit(resume=bool(args.resume), train_epochs=args.stop_after_epochs)
        if not status["finished"]:
            logger.info(stopped_message(run.out, status["epochs_done"], args.epochs))
            return {"finished": False}
        title = f"{args.curve} between {args.model_a} and {args.model_b}"
        return {"finished": True, "results": finish_run(trainer, title)}
