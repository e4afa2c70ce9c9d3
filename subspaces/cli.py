"""What every recipe and analysis script does around its work: parse, resume, clear errors.

Bad input exits with status 2 and one line naming the problem (no traceback); a non-finite
loss exits with status 3 after keeping the last good checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_with_config, read_config

#: flags that describe the job rather than the run: a resumed run keeps the caller's values
_JOB_FLAGS = ("resume", "stop_after_epochs", "log_interval", "cpu")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (with ``-c FILE.yaml``); with ``--resume DIR`` the run's own config.yaml wins."""
    try:
        args = parse_with_config(p, argv)
    except ConfigError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    if getattr(args, "resume", None):
        cfg = Path(args.resume) / "config.yaml"
        if not cfg.exists():
            p.exit(2, f"{p.prog}: error: --resume {args.resume}: no config.yaml there; is it a run folder?\n")
        saved = read_config(str(cfg))
        for key, value in saved.items():
            if key not in _JOB_FLAGS and hasattr(args, key):
                setattr(args, key, value)
    return args


def run(job: Callable[[], Any]) -> int:
    """Run ``job``; known failures become one line on stderr and a non-zero exit status."""
    from .io import CheckpointError
    from .training import NonFiniteLossError

    try:
        result = job()
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if isinstance(result, dict) and result.get("finished") is False:
        return 0
    return 0
