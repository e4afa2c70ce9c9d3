"""One member of a comparison, trained in a process of its own (``python -m subspaces.compare_worker SPEC``).

``SPEC`` is the JSON file :func:`subspaces.compare.run_members` writes: the compare's resolved
flags, the replicate's seed and folder, and the member's name. The process rebuilds the data and
the plan from the flags, so a member trains exactly as it would inside the compare's own process,
and exits with the recipes' statuses (2 bad input, 1 a failed read or write, 3 a non-finite loss).
It imports the modules of ``SUBSPACES_PLUGINS`` first (:func:`subspaces.cli.load_plugins`), as the
compare did: the methods and shapes they register are known here too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import cli
from .compare import Runner, make_plan
from .settings import CompareConfig
from .training import build_data_and_model


def train_member(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    args = CompareConfig.from_mapping(spec["args"], what=spec_path)
    torch.set_num_threads(max(1, int(args.threads)))
    data, _, model_spec = build_data_and_model(args)
    plan = make_plan(args, len(data.train))
    Runner(args, plan, data, model_spec, Path(spec["root"]), int(spec["seed"])).run_task(spec["task"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m subspaces.compare_worker SPEC.json", file=sys.stderr)
        return 2
    cli.load_plugins()   # the compare's SUBSPACES_PLUGINS, inherited: its methods and shapes
    return cli.run(lambda: train_member(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
