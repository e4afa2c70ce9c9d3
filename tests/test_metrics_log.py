"""metrics.jsonl: one reader, one policy for a torn line (it counts as never written)."""

from __future__ import annotations

import json

from subspaces.metrics_log import append_metrics, keep_epochs, read_metrics, train_seconds

TORN = '{"epoch": 3, "seconds": 2.5, "train_lo'


def _write(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_a_torn_line_is_skipped_dropped_on_resume_and_adds_no_seconds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, json.dumps({"epoch": 1, "seconds": 1.0}), json.dumps({"epoch": 2, "seconds": 2.0}), TORN)
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2]
    assert train_seconds([path, tmp_path / "missing.jsonl"]) == 3.0
    keep_epochs(path, 5)
    assert path.read_text().splitlines() == [json.dumps({"epoch": 1, "seconds": 1.0}), json.dumps({"epoch": 2, "seconds": 2.0})]
    keep_epochs(path, 1)
    assert [r["epoch"] for r in read_metrics(path)] == [1]
    append_metrics(path, {"epoch": 2, "seconds": 0.5})
    assert train_seconds([path]) == 1.5


def test_lines_that_are_not_records_are_not_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, "[1, 2]", "", json.dumps({"epoch": 1}), "null")
    assert read_metrics(path) == [{"epoch": 1}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
