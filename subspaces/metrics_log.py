"""A run folder's ``metrics.jsonl``: one JSON object per finished epoch, appended by the Trainer.

One reader (:func:`read_metrics`) with one policy for a line that is not a complete JSON object
(a job killed mid-write leaves a torn last line; a reader racing the writer can see one being
written): it counts as never written. It is skipped when reading, dropped when a resume rewrites
the file (:func:`keep_epochs`), and adds nothing to the seconds of training (:func:`train_seconds`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: the file name in a run folder (and in each stage folder of SPRO and the complex)
METRICS_FILE = "metrics.jsonl"


def parse_record(line: str) -> dict[str, Any] | None:
    """The record of one line, or None for a line that is not a complete JSON object (torn)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in order, torn lines skipped; [] when it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    return [record for record in map(parse_record, text.splitlines()) if record is not None]


def append_metrics(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_epochs(path: str | Path, last_epoch: int) -> None:
    """Rewrite ``path`` with the lines of epochs ``<= last_epoch`` only (those of the checkpoint a
    run resumes from); a torn line, or one without an epoch, is dropped with the later ones."""
    path = Path(path)
    kept = []
    for line in path.read_text().splitlines():
        record = parse_record(line)
        epoch = record.get("epoch", math.inf) if record is not None else math.inf
        if isinstance(epoch, (int, float)) and epoch <= last_epoch:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def train_seconds(paths: Iterable[str | Path]) -> float:
    """Seconds of training recorded in the metrics files ``paths`` (the ``seconds`` of every epoch,
    resumes included; a missing file adds 0)."""
    total = 0.0
    for path in paths:
        for record in read_metrics(path):
            seconds = record.get("seconds", 0.0)
            if isinstance(seconds, (int, float)):
                total += float(seconds)
    return total


def flat_metrics(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: nested keys joined with "/" ("eval/centre/acc"),
    numbers only."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, prefix=name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def print_epoch(record: dict[str, Any]) -> None:
    """The epoch's line on stderr: train loss / accuracy, then accuracy and NLL of each evaluated point."""
    parts = [f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"]
    for name, m in record.get("eval", {}).items():
        parts.append(f"{name} acc {m['acc']:.4f} nll {m['nll']:.4f}")
    print(" | ".join(parts), file=sys.stderr, flush=True)
