"""The training loop's view of an epoch in progress: the steps' losses waiting on the device for
the next check-in (:class:`PendingLosses`), and the progress bar or plain progress lines
(:class:`EpochProgress`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@dataclass
class PendingLosses:
    """The steps since the last check-in, left on the device with no host read: each step's mean
    loss (float32, detached), predicted classes and labels, and on the host its update number and
    batch size (for the message naming a non-finite loss). A step adds one kernel (the argmax);
    the check-in weighs the losses by batch size and compares predictions with labels, once per
    interval. ``first_step``: the epoch's step number of the first pending step."""

    device: torch.device
    first_step: int
    losses: list[torch.Tensor] = field(default_factory=list)
    predictions: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, update: int) -> None:
        """One step: ``loss`` a 0-dim tensor, ``logits`` [N, C] (both detached), labels ``y`` [N]."""
        self.losses.append(loss)
        self.predictions.append(logits.argmax(-1))
        self.labels.append(y)
        self.updates.append(update)
        self.sizes.append(y.shape[0])

    def values(self) -> torch.Tensor:
        """Each pending step's loss times its batch size, [steps] float32."""
        if not self.losses:
            return torch.zeros(0, device=self.device)
        if self.sizes.count(self.sizes[0]) == len(self.sizes):
            return torch.stack(self.losses) * self.sizes[0]
        return torch.stack([loss * size for loss, size in zip(self.losses, self.sizes)])

    def correct(self) -> torch.Tensor:
        """Correct predictions of the pending steps (a long device scalar)."""
        if not self.labels:
            return torch.zeros((), dtype=torch.long, device=self.device)
        return (torch.cat(self.predictions) == torch.cat(self.labels)).sum()

    def where_not_finite(self, values: torch.Tensor, index: int, epoch: int, step: int) -> str:
        """Where the first non-finite loss was: pending step ``index`` (its ``values()`` entry, on
        this rank), or another rank's (``index`` < 0) by epoch ``epoch`` (0-based), step ``step``."""
        if index < 0:
            return f"loss is NaN or infinite on another rank in epoch {epoch + 1}, by step {step}"
        value = float(values[index]) / max(1, self.sizes[index])
        return f"loss is {value} at epoch {epoch + 1}, step {self.first_step + index} (update {self.updates[index]})"

    def clear(self, next_step: int) -> None:
        self.first_step = next_step
        for kept in (self.losses, self.predictions, self.labels, self.updates, self.sizes):
            kept.clear()


class EpochProgress:
    """Rich progress bar on a terminal (main process only); plain lines every N steps otherwise.

    :meth:`advance` moves the bar (host numbers only, called every step); :meth:`update` sets
    the text (loss, accuracy), which the loop reads from the device at its log intervals only.
    """

    def __init__(self, accelerator: Accelerator, total: int, epoch: int, epochs: int, log_interval: int, start: int = 0) -> None:
        self.enabled = accelerator.is_main_process
        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        self.total, self.log_interval, self.label = total, max(1, log_interval), f"epoch {epoch + 1}/{epochs}"
        self.first = start
        self.bar: Progress | None = None
        self.start = time.perf_counter()
        self.moving = self.enabled and self.tty   # whether advance draws anything: the loop skips the call otherwise
        if self.moving:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task(self.label, total=total, completed=start, info="")
            self.bar.start()

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.log_interval == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.first, 1) * (self.total - step)
            print(f"{self.label} step {step}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
