"""One progress display for the comparison's members and for the stages of a SPRO simplex or a complex.

The compare's members train in worker processes whose output goes to ``OUTPUT/seedR/logs/<name>.log``
and whose epochs go to ``OUTPUT/seedR/<name>/metrics.jsonl`` (SPRO: ``<name>/vertexV/metrics.jsonl``);
:class:`CompareProgress` reads both to show each member as done / running / waiting with its epoch
and last training loss, the elapsed time and an estimate of the time left from the plan's update
counts (:func:`expected_updates`). In a terminal it is a rich ``Live`` table; elsewhere (CI, ``nohup``,
accelerate's non-main ranks) plain lines: one when a member starts or finishes and a summary at
most every ``summary_every`` seconds, without ANSI codes. :class:`StageProgress` is the same idea
for the stages of ``recipes/simplex.py`` and ``recipes/complex.py``: one line per stage.

Everything that reads a file or estimates a time is a small pure function, testable without training.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .method_registry import find_member
from .metrics_log import read_metrics

#: the Trainer's plain progress line (``progress.EpochProgress``): "epoch 2/3 step 40/235 loss 0.4123 acc ..."
STEP_LINE = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+) loss ([-+0-9.eEinfa]+)")
#: the Trainer's line at an epoch's end: "epoch 2: train loss 0.4011 acc 0.8512 | ..."
EPOCH_LINE = re.compile(r"^epoch (\d+): train loss ([-+0-9.eEinfa]+)")
#: how much of a log's end is read: its last progress line is there (a line every log interval)
LOG_TAIL_BYTES = 16_384

WAITING, RUNNING, ELSEWHERE, DONE = "waiting", "running", "running elsewhere", "done"


# ---------------------------------------------------------------------------------------- the plan's updates
def expected_updates(plan: Any, name: str) -> int:
    """Optimiser updates member ``name`` trains under ``plan`` (a :class:`~subspaces.compare_plan.Plan`:
    ``ind3``, ``sse``, ``fge``, ``line2B``, ``layerwise1B``, ``simplex1B``, ``spro0``, or a
    member of another registered method); ValueError for a name no method of the plan trains."""
    return find_member(plan.methods, plan, name)[1].updates


def update_cost(plan: Any, name: str) -> float:
    """Forward/backward passes per update of member ``name``: SPRO takes ``spro_samples_per_step``
    points per batch, so its updates weigh that much more in the time estimate."""
    return find_member(plan.methods, plan, name)[1].update_cost


@dataclass(frozen=True)
class LogPosition:
    """The last progress line of a member's log: within epoch ``epoch`` of ``epochs``, ``step`` of
    ``steps`` batches done, mean loss ``loss``; ``ended``: the line was the epoch's end (printed after
    its metrics.jsonl record, so the folder already counts that epoch)."""

    epoch: int
    epochs: int | None
    step: int
    steps: int | None
    loss: float
    ended: bool = False


def parse_log(text: str) -> LogPosition | None:
    """The last Trainer progress line of a log's text; a last line without its newline is being
    written (or torn) and is ignored. None when the text holds no progress line."""
    lines = text.split("\n")
    lines.pop()   # after the last newline: "" for a whole log, the torn rest otherwise
    for i in range(len(lines) - 1, -1, -1):
        m = STEP_LINE.match(lines[i])
        if m:
            return LogPosition(int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5]))
        m = EPOCH_LINE.match(lines[i])
        if m:   # an epoch's end: the number of epochs is on that epoch's step lines, before it
            steps = (STEP_LINE.match(line) for line in reversed(lines[:i]))
            epochs = next((int(s[2]) for s in steps if s and int(s[1]) == int(m[1])), None)
            return LogPosition(int(m[1]), epochs, 1, 1, float(m[2]), ended=True)
    return None


def read_log_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    """The last ``size`` bytes of a log ("" when it does not exist yet); the first, cut, line dropped."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text.split("\n", 1)[1] if end > size and "\n" in text else text


@dataclass(frozen=True)
class MemberProgress:
    """How far a member is: ``updates`` done (fractions within an epoch from its log), the epoch it
    is in (``epoch`` of ``epochs``), its stage (SPRO's ``vertexV``) and its last training loss."""

    updates: float = 0.0
    epoch: int | None = None
    epochs: int | None = None
    stage: str | None = None
    loss: float | None = None


def member_progress(folder: Path, log_path: Path | None, upe: int) -> MemberProgress:
    """Read a member's progress from its run folder (metrics.jsonl, or SPRO's ``vertexV/metrics.jsonl``
    stages) and the end of its log (the epoch under way); ``upe`` is updates per epoch."""
    stages = sorted((p for p in folder.glob("vertex*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    updates, last = 0.0, None
    for stage_folder in stages or [folder]:   # each stage's Trainer counts its updates from 0
        records = read_metrics(stage_folder / "metrics.jsonl")
        updates += float(records[-1].get("updates", 0)) if records else 0.0
        last = records[-1] if records else None   # the last stage's: a new stage has no epochs yet
    stage = stages[-1].name if stages else None
    done_epochs = int(last["epoch"]) if last and "epoch" in last else 0
    loss = float(last["train_loss"]) if last and "train_loss" in last else None
    epoch, epochs = (done_epochs or None), None
    position = parse_log(read_log_tail(log_path)) if log_path is not None else None
    if position is not None and position.epoch >= done_epochs:
        epochs = position.epochs
        # the epoch under way; an epoch's end line is counted by metrics.jsonl already, or it is the
        # previous SPRO stage's (a new stage's folder exists before its first step line)
        if position.epoch == done_epochs + 1 and position.steps and not position.ended:
            updates += upe * position.step / position.steps
            epoch = position.epoch
            loss = position.loss
    return MemberProgress(updates=updates, epoch=epoch, epochs=epochs, stage=stage, loss=loss)


# ---------------------------------------------------------------------------------------- time estimates
def estimate_remaining(work_done: float, worker_seconds: float, work_left: Iterable[float], jobs: int) -> float | None:
    """Seconds until the work left is done, at the rate measured so far (work per second of worker
    time, summed over workers): the work left shared by ``jobs`` workers, and never less than the
    largest single piece (one member trains in one worker). None before any work was measured."""
    left = [max(0.0, w) for w in work_left]
    if not left or not any(left):
        return 0.0
    if work_done <= 0 or worker_seconds <= 0:
        return None
    rate = work_done / worker_seconds
    return max(sum(left) / max(1, min(jobs, len(left))), max(left)) / rate


def clock(seconds: float | None) -> str:
    """``754.2`` -> ``"12:34"``, ``4000`` -> ``"1:06:40"``; None -> ``"?"``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


# ---------------------------------------------------------------------------------------- the compare's display
@dataclass
class Member:
    """One member in the display: ``key`` is the caller's handle (a compare Task), ``label`` its name."""

    key: Hashable
    label: str
    folder: Path
    log: Path | None
    expected: int
    cost: float = 1.0
    claim: Path | None = None          # the file a rank creates when it takes the member (several ranks)
    state: str = WAITING
    started: float | None = None       # when this process saw it start
    finished: float | None = None
    baseline: float = 0.0              # updates already done when it started here (a resumed member)
    progress: MemberProgress = field(default_factory=MemberProgress)


class RunnerLike(Protocol):
    """What the display needs of a compare Runner (subspaces.compare_run.Runner)."""

    plan: Any
    root: Path

    def is_done(self, name: str) -> bool: ...

    def log_path(self, name: str) -> Path: ...


class CompareProgress:
    """The members' progress, shown live in a terminal and as plain lines elsewhere.

    The caller tells it which members are running (:meth:`update`, called from its polling loop as
    often as it likes); the display asks ``is_done`` about the others and reads the running members'
    files at most every ``1 / refresh_per_second`` seconds. ``live=False`` never draws a ``Live``
    view (members trained in this process draw their own progress bar): it prints a line when a
    member starts or finishes instead. ``plain=None`` chooses plain lines when the console is not a
    terminal; ``enabled=False`` (a non-main rank, say) also gives plain lines.
    """

    def __init__(self, members: list[Member], is_done: Callable[[Member], bool], jobs: int = 1, *, title: str = "compare",
                 upe: int = 1, console: Console | None = None, plain: bool | None = None, live: bool = True,
                 enabled: bool = True, refresh_per_second: float = 2.0, summary_every: float = 60.0,
                 clock_fn: Callable[[], float] = time.monotonic) -> None:
        self.members = {m.key: m for m in members}
        self.is_done, self.jobs, self.title, self.upe = is_done, max(1, jobs), title, upe
        self.console = console or Console(stderr=True)
        self.plain = (not self.console.is_terminal or not enabled) if plain is None else plain
        self.live_view = live and not self.plain
        self.interval = 1.0 / max(refresh_per_second, 1e-3)
        self.summary_every, self.now = summary_every, clock_fn
        self.t0 = self.now()
        self.last_read = self.last_summary = -float("inf")
        self.live: Live | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> CompareProgress:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start the clock and, in a terminal, the live view (a second start does nothing)."""
        if self.live is not None:
            return
        self.t0 = self.now()
        self._refresh_done()
        if self.live_view:
            # the compare's own messages (stderr) print above the view while it runs
            self.live = Live(self.render(), console=self.console, auto_refresh=False, transient=False,
                             redirect_stdout=True, redirect_stderr=True)
            self.live.start(refresh=True)

    def stop(self) -> None:
        """Draw the last state and stop the live view; plain mode prints a last summary."""
        self._read(force=True)
        if self.live is not None:
            self.live.update(self.render(), refresh=True)
            self.live.stop()
            self.live = None
        elif self.plain:
            self._line(self.summary())
            self.last_summary = self.now()

    # ------------------------------------------------------------------ state
    def update(self, running: Iterable[Hashable] = (), force: bool = False) -> None:
        """``running``: the members training in this process's workers now; the others are done
        (``is_done``), taken by another rank (their claim file exists) or waiting."""
        now = self.now()
        running = {k for k in running if k in self.members}
        changed = []
        for m in self.members.values():   # in the tasks' order, so that the lines are too
            if m.key not in running:
                continue
            if m.state != RUNNING:
                m.state, m.started = RUNNING, now
                m.progress = self._progress(m)
                m.baseline = m.progress.updates
                changed.append(m)
        stale = force or now - self.last_read >= self.interval
        for m in self.members.values():
            if m.key in running or m.state == DONE:
                continue
            if m.state == RUNNING:   # it left the running set: finished, or stopped with an error
                m.finished = now
                m.progress = self._progress(m)
                m.state = DONE if self.is_done(m) else WAITING
                if m.state == WAITING:
                    m.started = m.finished = None
                changed.append(m)
            elif stale:
                state = DONE if self.is_done(m) else ELSEWHERE if m.claim is not None and m.claim.exists() else WAITING
                if state != m.state:
                    m.state = state
        if stale or changed:
            self._read(force=True)
        if self.plain:
            for m in changed:
                self._line(self.member_line(m))
            if now - self.last_summary >= self.summary_every:
                self._line(self.summary())
                self.last_summary = now
        elif self.live is not None:
            if stale or changed:
                self.live.update(self.render(), refresh=True)
        else:   # a terminal without the live view: a line at each start and end
            for m in changed:
                self.console.print(Text(self.member_line(m), style="green" if m.state == DONE else "cyan"))

    def _refresh_done(self) -> None:
        for m in self.members.values():
            if m.state == WAITING and self.is_done(m):
                m.state = DONE

    def _progress(self, m: Member) -> MemberProgress:
        return member_progress(m.folder, m.log, self.upe)

    def _read(self, force: bool = False) -> None:
        now = self.now()
        if not force and now - self.last_read < self.interval:
            return
        self.last_read = now
        for m in self.members.values():
            if m.state in (RUNNING, ELSEWHERE):
                m.progress = self._progress(m)

    # ------------------------------------------------------------------ estimates
    def elapsed(self) -> float:
        return self.now() - self.t0

    def done_here(self, m: Member) -> float:
        """Updates member ``m`` trained in this process (a resumed member's earlier ones excluded)."""
        if m.state == DONE and m.finished is not None:
            return max(0.0, m.expected - m.baseline)
        return max(0.0, min(m.progress.updates, m.expected) - m.baseline) if m.state == RUNNING else 0.0

    def remaining(self) -> float | None:
        """Seconds left: the members' updates left (weighted by their cost) at this process's rate."""
        now = self.now()
        work, seconds, left = 0.0, 0.0, []
        for m in self.members.values():
            if m.started is not None:
                work += self.done_here(m) * m.cost
                seconds += (m.finished if m.finished is not None else now) - m.started
            if m.state != DONE:
                left.append(max(0.0, m.expected - m.progress.updates) * m.cost)
        return estimate_remaining(work, seconds, left, self.jobs)

    def counts(self) -> dict[str, int]:
        out = {DONE: 0, RUNNING: 0, ELSEWHERE: 0, WAITING: 0}
        for m in self.members.values():
            out[m.state] += 1
        return out

    # ------------------------------------------------------------------ text
    def where(self, m: Member) -> str:
        """``"vertex2 epoch 3/5 loss 0.412 (38%)"``: a running member's position."""
        p = m.progress
        parts = [p.stage] if p.stage else []
        if p.epoch is not None:
            parts.append(f"epoch {p.epoch}" + (f"/{p.epochs}" if p.epochs else ""))
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if m.expected:
            parts.append(f"({min(1.0, p.updates / m.expected):.0%})")
        return " ".join(parts)

    def member_line(self, m: Member) -> str:
        """One plain line for a member that started or finished."""
        if m.state == RUNNING:
            return f"[progress] {m.label}: running ({m.expected} updates){' from ' + self.where(m) if m.baseline else ''}"
        if m.state == DONE:
            took = f" in {clock(m.finished - m.started)}" if m.started is not None and m.finished is not None else ""
            return f"[progress] {m.label}: done{took}; {self.summary(prefix=False)}"
        return f"[progress] {m.label}: stopped, waiting"

    def summary(self, prefix: bool = True) -> str:
        """``"3/14 done, 2 running (ind1 epoch 2/3 ...), 9 waiting; elapsed 4:01, about 9:30 left"``."""
        c = self.counts()
        running = [f"{m.label} {self.where(m)}".rstrip() for m in self.members.values() if m.state == RUNNING]
        text = f"{c[DONE]}/{len(self.members)} done, {c[RUNNING]} running" + (f" ({'; '.join(running)})" if running else "")
        if c[ELSEWHERE]:
            text += f", {c[ELSEWHERE]} on other ranks"
        text += f", {c[WAITING]} waiting; elapsed {clock(self.elapsed())}, about {clock(self.remaining())} left"
        return ("[progress] " + text) if prefix else text

    def render(self) -> Group:
        """The terminal view: one row per member, and a line with the elapsed and remaining time."""
        table = Table(title=self.title, title_justify="left", expand=False, show_edge=False, pad_edge=False)
        for col, justify in (("member", "left"), ("state", "left"), ("epoch", "right"), ("loss", "right"),
                             ("updates", "right"), ("time", "right")):
            table.add_column(col, justify=justify)   # type: ignore[arg-type]
        style = {DONE: "green", RUNNING: "bold yellow", ELSEWHERE: "yellow", WAITING: "dim"}
        now = self.now()
        for m in self.members.values():
            p = m.progress
            epoch = (f"{p.stage} " if p.stage else "") + (f"{p.epoch}" + (f"/{p.epochs}" if p.epochs else "") if p.epoch is not None else "")
            updates = f"{min(p.updates, m.expected):.0f}/{m.expected}" if m.state != DONE else f"{m.expected}"
            took = (m.finished if m.finished is not None else now) - m.started if m.started is not None else None
            table.add_row(m.label, Text(m.state, style=style[m.state]), epoch if m.state != WAITING else "",
                          f"{p.loss:.4f}" if p.loss is not None and m.state != WAITING else "",
                          updates if m.state != WAITING else f"{m.expected}", clock(took) if took is not None else "")
        c = self.counts()
        foot = Text(f"{c[DONE]}/{len(self.members)} done, {c[RUNNING]} running, {c[WAITING]} waiting"
                    + (f", {c[ELSEWHERE]} on other ranks" if c[ELSEWHERE] else "")
                    + f" | elapsed {clock(self.elapsed())} | about {clock(self.remaining())} left")
        return Group(table, foot)

    def _line(self, text: str) -> None:
        # plain text straight to the stream: no markup, no ANSI codes, whatever the console thinks
        print(text, file=self.console.file, flush=True)


def compare_progress(runners: list[RunnerLike], tasks: list[Any], jobs: int, *, claims: Path | None = None, live: bool = True,
                     enabled: bool | None = None, console: Console | None = None) -> CompareProgress:
    """The display of ``tasks`` (compare Tasks: ``replicate``, ``name``) of ``runners``: labels
    ``seedR/name``, each member's folder and log, its expected updates from the runner's plan.
    ``enabled=None``: the live view on the main rank of a launch only (``RANK`` unset or 0); the
    other ranks print plain lines (their members are theirs to report)."""
    if enabled is None:
        enabled = os.environ.get("RANK", "0") == "0"
    members = []
    for t in tasks:
        runner = runners[t.replicate]
        members.append(Member(key=t, label=f"seed{t.replicate}/{t.name}", folder=runner.root / t.name, log=runner.log_path(t.name),
                              expected=expected_updates(runner.plan, t.name), cost=update_cost(runner.plan, t.name),
                              claim=None if claims is None else claims / f"{t.replicate}.{t.name}"))
    upe = runners[0].plan.upe if runners else 1
    return CompareProgress(members, lambda m: runners[m.key.replicate].is_done(m.key.name), jobs, upe=upe, live=live,
                           enabled=enabled, console=console)


# ---------------------------------------------------------------------------------------- stages
class StageProgress:
    """One line per stage of a staged run (the vertices of a SPRO simplex, the shared vertices of a
    complex): which stage starts, which finished in how long, and the time left at the mean time of
    the stages trained here. Each stage's Trainer draws its own bar, so there is no live view here."""

    def __init__(self, title: str, total: int, *, enabled: bool = True, console: Console | None = None,
                 clock_fn: Callable[[], float] = time.monotonic) -> None:
        self.title, self.total, self.enabled = title, total, enabled
        self.console = console or Console(stderr=True)
        self.plain = not self.console.is_terminal
        self.now = clock_fn
        self.t0 = self.now()
        self.done = 0
        self.trained: list[float] = []   # seconds of the stages trained in this process
        self.started: float | None = None

    def begin(self, name: str) -> None:
        """Stage ``name`` starts training."""
        self.started = self.now()
        self._say(f"{self.title}: stage {self.done + 1}/{self.total} ({name}) started; {self._times()}", "cyan")

    def end(self, name: str, reused: bool = False) -> None:
        """Stage ``name`` is finished (``reused``: it was finished by an earlier run)."""
        self.done += 1
        took = ""
        if not reused and self.started is not None:
            self.trained.append(self.now() - self.started)
            took = f" in {clock(self.trained[-1])}"
        self.started = None
        what = "reused" if reused else f"done{took}"
        self._say(f"{self.title}: stage {self.done}/{self.total} ({name}) {what}; {self._times()}", "green")

    def remaining(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if not self.trained:
            return None
        return sum(self.trained) / len(self.trained) * left   # the stages are of equal size

    def _times(self) -> str:
        return f"elapsed {clock(self.now() - self.t0)}, about {clock(self.remaining())} left"

    def _say(self, text: str, style: str) -> None:
        if not self.enabled:
            return
        if self.plain:
            print(f"[progress] {text}", file=self.console.file, flush=True)
        else:
            self.console.print(Text(text, style=style))

