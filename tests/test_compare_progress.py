"""The compare's progress display (subspaces/compare_progress.py), without training.

The pure parts (expected updates per member, reading a member's metrics.jsonl and log, the time
left), the plain lines written where stderr is no terminal (no ANSI codes, each member's state
named), the rich table in a terminal, the per-stage lines of SPRO / complex, and run_members'
in-process loop driving the display with stand-in members that write their files at once.
"""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from subspaces.compare_plan import make_plan
from subspaces.compare_progress import (DONE, ELSEWHERE, RUNNING, WAITING, CompareProgress, Member, StageProgress, clock,
                                        compare_progress, estimate_remaining, expected_updates, member_progress, parse_log,
                                        read_metrics, update_cost)
from subspaces.compare_run import Task, run_members
from subspaces.settings import CompareConfig

ANSI = re.compile(r"\x1b\[")


class FakeClock:
    """A clock the test moves by hand, so that elapsed times and estimates are exact."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _plan():
    # the default compare on 10,000 images: B = 20 epochs of 157 updates (tests/test_compare.py)
    return make_plan(CompareConfig(espro_vertices=3, spro_epochs=2, spro_samples_per_step=2), num_train=10_000)


def _record(epoch: int, updates: int, loss: float) -> str:
    return json.dumps({"epoch": epoch, "updates": updates, "train_loss": loss, "train_acc": 0.5, "seconds": 1.0}) + "\n"


# ---------------------------------------------------------------------------------------- pure parts
def test_expected_updates_of_every_member_kind_follow_the_plan():
    p = _plan()
    assert (p.B, p.upe, p.sse_epochs, p.fge_epochs) == (20, 157, 60, 44)
    assert expected_updates(p, "ind0") == expected_updates(p, "ind2") == 20 * 157
    assert expected_updates(p, "sse") == 60 * 157
    assert expected_updates(p, "fge") == 44 * 157
    assert expected_updates(p, "line1B") == expected_updates(p, "layerwise1B") == expected_updates(p, "simplex1B") == 20 * 157
    assert expected_updates(p, "line3B") == 3 * 20 * 157
    assert expected_updates(p, "spro1") == 2 * 2 * 157   # (vertices - 1) x epochs per vertex x updates per epoch
    assert update_cost(p, "spro0") == 2.0 and update_cost(p, "ind0") == update_cost(p, "line2B") == 1.0
    with pytest.raises(ValueError, match="unknown compare member"):
        expected_updates(p, "swa")


def test_metrics_and_log_with_a_torn_last_line(tmp_path):
    folder = tmp_path / "ind1"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(_record(1, 4, 0.9) + '{"epoch": 2, "upd')   # killed mid-write
    assert [r["epoch"] for r in read_metrics(folder / "metrics.jsonl")] == [1]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    log = ("[compare] something\nepoch 1/3 step 2/4 loss 0.9500 acc 0.4 lr 0.1 90 samples/s eta 3s\n"
           "epoch 1: train loss 0.9000 acc 0.5000\n"
           "epoch 2/3 step 2/4 loss 0.7000 acc 0.6 lr 0.1 90 samples/s eta 2s\n"
           "epoch 2/3 step 3/4 loss 0.65")   # being written: ignored
    pos = parse_log(log)
    assert (pos.epoch, pos.epochs, pos.step, pos.steps, pos.loss) == (2, 3, 2, 4, 0.7)
    end = parse_log("epoch 1/3 step 4/4 loss 0.9 acc 0.5\nepoch 1: train loss 0.9000 acc 0.5000 | centre acc 0.1 nll 2.3\n")
    assert (end.epoch, end.epochs, end.step, end.steps, end.loss) == (1, 3, 1, 1, 0.9)
    assert parse_log("") is None and parse_log("no progress here\n") is None
    (tmp_path / "ind1.log").write_text(log)
    prog = member_progress(folder, tmp_path / "ind1.log", upe=4)
    assert prog.updates == 4 + 2 and prog.epoch == 2 and prog.epochs == 3 and prog.loss == 0.7
    assert member_progress(folder, tmp_path / "no.log", upe=4).updates == 4   # the log not written yet
    empty = member_progress(tmp_path / "nothing", None, upe=4)
    assert empty.updates == 0 and empty.epoch is None and empty.loss is None


def test_spro_progress_adds_its_stages(tmp_path):
    folder = tmp_path / "spro0"
    for v, lines in ((1, _record(1, 4, 0.5) + _record(2, 8, 0.4)), (2, _record(1, 4, 0.3))):
        (folder / f"vertex{v}").mkdir(parents=True)
        (folder / f"vertex{v}" / "metrics.jsonl").write_text(lines)
    log = tmp_path / "spro0.log"
    log.write_text("[progress] simplex 0: stage 2/3 (vertex2) started; elapsed 0:04, about 0:08 left\n"
                   "epoch 2/2 step 1/4 loss 0.2500 acc 0.9\n")
    prog = member_progress(folder, log, upe=4)
    assert prog.stage == "vertex2" and prog.epoch == 2 and prog.loss == 0.25
    assert prog.updates == 8 + 4 + 1
    with open(log, "a") as f:
        f.write("epoch 2/2 step 4/4 loss 0.2000 acc 0.9\nepoch 2: train loss 0.2000 acc 0.9000\n")
    (folder / "vertex2" / "metrics.jsonl").write_text(_record(1, 4, 0.3) + _record(2, 8, 0.2))
    (folder / "vertex3").mkdir()   # a new stage, its Trainer not started: the log's last line is vertex2's end
    new = member_progress(folder, log, upe=4)
    assert new.stage == "vertex3" and new.epoch is None and new.updates == 8 + 8


def test_remaining_time_from_the_rate_so_far():
    assert estimate_remaining(0.0, 10.0, [100.0], jobs=2) is None          # nothing measured yet
    assert estimate_remaining(50.0, 0.0, [100.0], jobs=2) is None
    assert estimate_remaining(50.0, 10.0, [], jobs=2) == 0.0
    # 5 updates per worker-second; 300 left in pieces of 100 on 2 workers: 150 each = 30 s
    assert estimate_remaining(50.0, 10.0, [100.0, 100.0, 100.0], jobs=2) == pytest.approx(30.0)
    # one long member cannot be shared: its 400 updates take 80 s whatever the workers
    assert estimate_remaining(50.0, 10.0, [400.0, 10.0], jobs=4) == pytest.approx(80.0)
    assert estimate_remaining(50.0, 10.0, [100.0], jobs=1) == pytest.approx(20.0)
    assert (clock(None), clock(5), clock(754.2), clock(4000)) == ("?", "0:05", "12:34", "1:06:40")


# ---------------------------------------------------------------------------------------- the display
def _members(tmp_path: Path) -> tuple[list[Member], set[str]]:
    done: set[str] = set()
    members = []
    for name in ("ind0", "ind1", "line1B"):
        folder = tmp_path / name
        folder.mkdir()
        members.append(Member(key=name, label=f"seed0/{name}", folder=folder, log=tmp_path / f"{name}.log", expected=8,
                              claim=tmp_path / f"claim.{name}"))
    return members, done


def _advance(member_dir: Path, log: Path, epochs: int, step: int) -> None:
    (member_dir / "metrics.jsonl").write_text("".join(_record(e, 4 * e, 1.0 / e) for e in range(1, epochs + 1)))
    log.write_text(f"epoch {epochs + 1}/2 step {step}/4 loss 0.3000 acc 0.9\n")


def test_plain_lines_name_each_state_and_carry_no_ansi_codes(tmp_path):
    members, done = _members(tmp_path)
    stream, now = StringIO(), FakeClock()
    display = CompareProgress(members, lambda m: m.key in done, jobs=2, upe=4, summary_every=30.0, clock_fn=now,
                              console=Console(file=stream))
    assert display.plain, "a console that is no terminal gets plain lines"
    with display:
        display.update(running=["ind0"])
        now.t += 10
        _advance(tmp_path / "ind0", tmp_path / "ind0.log", epochs=1, step=2)
        (tmp_path / "claim.ind1").touch()   # taken by another rank
        display.update(running=["ind0"])
        assert display.members["ind0"].progress.updates == 6
        assert display.members["ind1"].state == ELSEWHERE and display.members["line1B"].state == WAITING
        # 6 updates in 10 worker-seconds; 2 + 8 + 8 left on 2 workers: max(9, 8) / 0.6 = 15 s
        assert display.remaining() == pytest.approx(15.0)
        now.t += 40
        done.add("ind0")
        display.update(running=[])
        assert display.members["ind0"].state == DONE
    text = stream.getvalue()
    assert not ANSI.search(text), text
    assert "seed0/ind0: running" in text and "seed0/ind0: done in 0:50" in text
    assert "1/3 done" in text and "1 on other ranks" in text and "1 waiting" in text
    assert "elapsed 0:50" in text
    assert all(line.startswith("[progress] ") for line in text.splitlines())


def test_a_terminal_gets_a_live_table(tmp_path):
    members, done = _members(tmp_path)
    stream, now = StringIO(), FakeClock()
    console = Console(file=stream, force_terminal=True, width=120, color_system="standard")
    display = CompareProgress(members, lambda m: m.key in done, jobs=1, upe=4, clock_fn=now, console=console)
    assert not display.plain
    done.add("line1B")
    with display:
        _advance(tmp_path / "ind0", tmp_path / "ind0.log", epochs=1, step=3)
        display.update(running=["ind0"])
        now.t += 5
        display.update(running=["ind0"], force=True)
    text = stream.getvalue()
    assert ANSI.search(text), "a terminal is drawn with rich"
    for word in ("member", "state", "epoch", "loss", "seed0/ind0", "seed0/ind1", "seed0/line1B", "running", "waiting", "done",
                 "2/2", "0.3000", "7/8", "elapsed 0:05"):
        assert word in text, word
    table = StringIO()
    Console(file=table, width=120).print(display.render())
    rows = {line.split()[0]: line for line in table.getvalue().splitlines() if line.strip().startswith("seed0/")}
    assert "running" in rows["seed0/ind0"] and "waiting" in rows["seed0/ind1"] and "done" in rows["seed0/line1B"]


def test_stage_lines(tmp_path):
    stream, now = StringIO(), FakeClock()
    stages = StageProgress("simplex 0", 3, console=Console(file=stream), clock_fn=now)
    stages.end("vertex1", reused=True)
    stages.begin("vertex2")
    now.t += 20
    stages.end("vertex2")
    assert stages.remaining() == pytest.approx(20.0)
    text = stream.getvalue()
    assert not ANSI.search(text)
    assert "simplex 0: stage 1/3 (vertex1) reused" in text and "stage 2/3 (vertex2) started" in text
    assert "stage 2/3 (vertex2) done in 0:20; elapsed 0:20, about 0:20 left" in text
    quiet = StringIO()
    StageProgress("complex", 2, enabled=False, console=Console(file=quiet)).begin("shared0")
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------------------------------- run_members
class StandInRunner:
    """What run_members and the display use of a compare Runner; its members "train" at once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plan = make_plan(CompareConfig(epochs=2, methods="ind,line", budgets="1,2", subspace_budgets="1"), num_train=64)

    def is_done(self, name: str) -> bool:
        return (self.root / name / "results.json").exists()

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def run_task(self, name: str) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        upe = self.plan.upe
        (folder / "metrics.jsonl").write_text(_record(1, upe, 0.8) + _record(2, 2 * upe, 0.6))
        (folder / "results.json").write_text("{}")


def test_run_members_in_process_reports_each_member(tmp_path, capsys):
    runner = StandInRunner(tmp_path / "seed0")
    tasks = [Task(0, "ind0"), Task(0, "ind1"), Task(0, "line1B")]
    assert run_members([runner], tasks, tmp_path, jobs=1, in_process=True) == (True, 3)
    err = capsys.readouterr().err
    assert not ANSI.search(err)
    for name in ("ind0", "ind1", "line1B"):
        assert f"[progress] seed0/{name}: running ({expected_updates(runner.plan, name)} updates)" in err
        assert f"[progress] seed0/{name}: done in" in err
    assert "[progress] 3/3 done, 0 running, 0 waiting" in err
    progress = compare_progress([runner], tasks, 1)
    progress.start()
    assert progress.counts()[DONE] == 3 and progress.remaining() == 0.0
    assert RUNNING not in progress.counts() or progress.counts()[RUNNING] == 0
