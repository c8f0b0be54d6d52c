"""Live progress of `--local` runs, read from the files their trainers write (metrics.jsonl, state.json):
the launcher polls them, the trainers know nothing of it. On a terminal, a rich progress display with one
line per run (phase, epoch, step / total, loss and objective, images/s, time left); otherwise (a log file,
CI) plain lines, at most one per run every PLAIN_EVERY_S seconds, and the phase's last record at its end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Column

from launch.inspect.status import last_record, rung
from launch.spec import Run
from sogclr.contract.state import read_state

POLL_S = 1.0
PLAIN_EVERY_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    """Where a phase of a run is, from its latest step record."""

    phase: str
    record: dict[str, Any]
    epochs: int
    total_steps: int | None
    seconds_left: float | None
    rung: str | None = None  # where successive halving has the run (launch.inspect.status.rung), if it prunes


def snapshot(run: Run, phase: str, first: dict[str, Any] | None) -> Snapshot | None:
    """The phase's latest step record, with the time left at the rate since `first` (the first record
    this launcher saw); None before the phase has logged a step."""
    files = run.files.phase(phase)
    record = last_record(files.metrics, having="loss")
    if record is None:
        return None
    state = read_state(files.state)
    total = state.get("total_steps")
    epochs = run.config.pretrain.epochs if phase == "pretrain" else run.config.lincls.epochs
    left = None
    if first is not None and total and record["step"] > first["step"] and record["time"] > first["time"]:
        rate = (record["step"] - first["step"]) / (record["time"] - first["time"])
        left = max(0, total - record["step"]) / rate
    judged = phase == "pretrain" and run.config.prune is not None
    return Snapshot(phase, record, epochs, total, left, rung(run, state) if judged else None)


def describe(shot: Snapshot) -> str:
    """epoch 3/8, loss 0.41, objective -0.02, 95 img/s, 0:01:20 left, rung: kept at 2 (what the record
    has; the rung where the sweep prunes)."""
    record = shot.record
    parts = [f"epoch {record.get('epoch', 0) + 1}/{shot.epochs}"]
    parts += [f"{key} {record[key]:.4g}" for key in ("loss", "objective") if key in record]
    if "images_per_s" in record:
        parts.append(f"{record['images_per_s']:.0f} img/s")
    if shot.seconds_left is not None:
        parts.append(f"{timedelta(seconds=round(shot.seconds_left))} left")
    if shot.rung is not None:
        parts.append(f"rung: {shot.rung}")
    return ", ".join(parts)


def plain_line(run: Run, shot: Snapshot) -> str:
    total = shot.total_steps or "?"
    return f"{run.name} {shot.phase}: step {shot.record['step']}/{total}, {describe(shot)}"


def progress_bar(console: Console, names: list[str]) -> Progress:
    """One line per run. The run's name is never cut (two runs of a sweep differ only in it), nor its
    phase; the bar is short; what is left of the width holds the details, wrapped onto more lines when
    narrow (at 80 columns a long name would otherwise cut everything to `gamma…` and `pretr…`)."""
    return Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=max(map(len, names)))),
        TextColumn("{task.fields[phase]}", table_column=Column(no_wrap=True, min_width=len("pretrain"))),
        BarColumn(bar_width=10),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[info]}", table_column=Column(overflow="fold", ratio=1)),
        console=console,
    )


@dataclass
class Tracked:
    """What the display knows of one run: its current phase and the records seen in it."""

    phase: str | None = None
    started: float = 0.0  # records older than the phase's start are an earlier invocation's
    first: dict[str, Any] | None = None
    shown: tuple[int, str | None] | None = None  # the step and rung of the last plain line
    shown_at: float = 0.0
    task: TaskID | None = None


class LiveProgress:
    """Polls the runs' files every POLL_S seconds from a thread; `phase_started` and `phase_ended` come
    from the threads that run the phases."""

    def __init__(self, console: Console, runs: list[Run]) -> None:
        self.console = console
        self.runs = {run.name: run for run in runs}
        self.tracked = {run.name: Tracked() for run in runs}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll_until_stopped, daemon=True)
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = progress_bar(console, [run.name for run in runs])

    def __enter__(self) -> LiveProgress:
        if self.bar is not None:
            self.bar.start()
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.bar is not None:
            self.bar.stop()

    def phase_started(self, run: Run, phase: str) -> None:
        with self.lock:
            tracked = self.tracked[run.name]
            tracked.phase, tracked.started, tracked.first, tracked.shown = phase, time.time(), None, None
            if self.bar is not None and tracked.task is None:
                tracked.task = self.bar.add_task(run.name, total=None, phase=phase, info="starting")

    def phase_ended(self, run: Run) -> None:
        """Show the phase's last record (a plain line only if not shown yet; on the bar, the step saved)."""
        self._update(run, final=True)
        with self.lock:
            self.tracked[run.name].phase = None

    def _poll_until_stopped(self) -> None:
        while not self.stop.wait(POLL_S):
            for run in self.runs.values():
                self._update(run)

    def _update(self, run: Run, final: bool = False) -> None:
        with self.lock:
            tracked = self.tracked[run.name]
            if tracked.phase is None:
                return
            shot = snapshot(run, tracked.phase, tracked.first)
            if shot is None or shot.record["time"] < tracked.started:
                return
            if tracked.first is None or shot.record["step"] < tracked.first["step"]:  # lincls: next mode
                tracked.first = shot.record
            if self.bar is not None:
                # at the end, the step it saved (the last step records may run short of it)
                saved = read_state(run.files.phase(shot.phase).state).get("step") if final else None
                self.bar.update(
                    tracked.task,
                    completed=saved or shot.record["step"],
                    total=shot.total_steps,
                    phase=shot.phase,
                    info=describe(shot),
                )
                return
            now = time.monotonic()
            # a rung decided after the epoch's last step record is news too (at the end: `pruned at 2`)
            new = (shot.record["step"], shot.rung) != tracked.shown
            if new and (final or tracked.shown is None or now - tracked.shown_at >= PLAIN_EVERY_S):
                self.console.print(plain_line(run, shot), highlight=False, soft_wrap=True)
                tracked.shown, tracked.shown_at = (shot.record["step"], shot.rung), now
