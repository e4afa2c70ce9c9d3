"""What every recipe and analysis script does around its work: parse, resume, clear errors.

Bad input exits with status 2 and one line naming the problem (no traceback); a failed read or
write (disk full, permissions) exits with status 1 and one line; a non-finite loss exits with
status 3 after keeping the last good checkpoint; a run stopped by SIGTERM / SIGINT exits with
status 75 after writing a checkpoint that ``--resume`` continues exactly. ``SUBSPACES_DEBUG=1`` re-raises instead, with the
traceback.

Plugins: ``SUBSPACES_PLUGINS=my_pkg.shapes,my_methods`` names modules (importable from the
Python path) that ``recipes/train.py``, ``recipes/compare.py`` and the compare's worker
processes import before they read their flags (:func:`load_plugins`), so that the shapes and
compared methods they register (``register_shape``, ``register_method``) are flag values there.
The variable is inherited by every worker process, so a member trains where its method is known.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .cli_flags import parse_with_config
from .errors import PREEMPTED_STATUS, CheckpointError, ConfigError, MemberFailed, NonFiniteLossError, Preempted
from .run_folder import RESOLVED_KEY, read_config
from .settings import Settings

S = TypeVar("S", bound=Settings)

#: the environment variable naming the plugin modules, comma-separated
PLUGINS_VARIABLE = "SUBSPACES_PLUGINS"

#: flags that describe the job rather than the run: a resumed run keeps the caller's values
_JOB_FLAGS = ("resume", "stop_after_epochs", "log_interval", "cpu")


def load_plugins() -> list[str]:
    """Import the modules named in ``SUBSPACES_PLUGINS`` (comma-separated; a module imported
    already is not run again) and return their names. A module that cannot be imported or
    fails to register exits with status 2 and one line naming it."""
    names = [n.strip() for n in os.environ.get(PLUGINS_VARIABLE, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except (ImportError, ValueError, ConfigError) as err:
            sys.exit(_fail(ConfigError(f"{PLUGINS_VARIABLE}: cannot import {name!r}: {one_line(err)}"), 2))
    return names


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None, settings: type[S] | None = None) -> Any:
    """Parse flags (with ``-c FILE.yaml``); with ``--resume DIR`` the run's own config.yaml wins.

    With ``settings`` (a recipe's settings class: every flag is one of its fields; a field
    without a flag is set from the YAML file or keeps its default) the result is an instance of
    it, validated: a value that cannot work exits with status 2 and one line naming the flag.
    Without, the plain ``argparse.Namespace`` (the analysis scripts)."""
    valid = settings.field_names() if settings is not None else None
    try:
        args = parse_with_config(p, argv, valid)
    except ConfigError as err:
        p.exit(2, f"{p.prog}: error: {one_line(err)}\n")
    values = vars(args)
    if values.get("resume"):
        values.update(_saved_settings(p, args.resume, valid if valid is not None else set(values)))
    if settings is None:
        return args
    try:
        return settings(**values)
    except ConfigError as err:
        p.exit(2, f"{p.prog}: error: {one_line(err)}\n")


def _saved_settings(p: argparse.ArgumentParser, folder: str, valid: set[str]) -> dict[str, Any]:
    """The settings a stopped run saved in ``folder/config.yaml``, less the job's own flags."""
    run_dir = Path(folder)
    cfg = run_dir / "config.yaml"
    if not run_dir.is_dir():
        p.exit(2, f"{p.prog}: error: --resume {folder}: no such folder\n")
    if not cfg.exists():
        p.exit(2, f"{p.prog}: error: --resume {folder}: no config.yaml there; is it a run folder?\n")
    try:
        saved = read_config(str(cfg))
        if not isinstance(saved, dict):
            raise ValueError("it does not hold a mapping of flag names to values")
    except (OSError, ValueError, yaml.YAMLError) as err:
        p.exit(2, f"{p.prog}: error: --resume {folder}: cannot read {cfg}: {one_line(err)}\n")
    saved.pop(RESOLVED_KEY, None)
    foreign = sorted(key for key in saved if key not in valid)
    if foreign:
        p.exit(2, f"{p.prog}: error: --resume {folder}: {cfg} has keys this recipe does not know "
                  f"({', '.join(foreign[:4])}): is it a run of another recipe?\n")
    return {key: value for key, value in saved.items() if key not in _JOB_FLAGS}


def one_line(err: BaseException | str) -> str:
    """An error message on one line: its lines joined (a multi-line hint stays readable)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(lines) if lines else type(err).__name__


def run(job: Callable[[], Any]) -> int:
    """Run ``job``; known failures become one line on stderr and a non-zero exit status.

    2: bad input (flags, config, missing data, unreadable or unfitting files, other ValueErrors);
    1: an operating-system error while reading or writing (disk full, permissions);
    3: a non-finite loss (the last good checkpoint is kept);
    75: stopped by SIGTERM / SIGINT with a checkpoint to resume from (EX_TEMPFAIL: run it again).
    """
    show_messages()
    try:
        job()
    except Preempted as err:
        return _fail(err, PREEMPTED_STATUS, prefix="stopped")
    except NonFiniteLossError as err:
        return _fail(err, 3)
    except MemberFailed as err:
        return _fail(err, 1)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        return _fail(err, 2)
    except OSError as err:
        return _fail(err, 1)
    return 0


class StdoutHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stdout`` as it is when a message is emitted, not as it
    was when the handler was made: a caller that replaces stdout (a test's capture, a redirect)
    gets the messages, and none is written to a stream closed since."""

    @property   # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:   # StreamHandler.__init__ assigns it; the current stdout is always used
        pass


def show_messages() -> None:
    """Send the library's messages (``logging`` under "subspaces", INFO, the main process only
    through accelerate's logger) to stdout as plain lines, unless the program configured them."""
    log = logging.getLogger("subspaces")
    if log.handlers:
        return
    handler = StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _fail(err: BaseException, status: int, prefix: str = "error") -> int:
    if os.environ.get("SUBSPACES_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise err
    print(f"{prefix}: {one_line(err)}", file=sys.stderr, flush=True)
    return status
