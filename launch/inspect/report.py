"""`sogclr-submit report`: what a sweep found, one row per run, as a table (terminal, md, csv, json) and
as figures.

The rows come from launch/inspect/results.py, which the table (here) and the PNGs
(launch/inspect/figures.py) draw exactly; neither renderer imports the other's module for data.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from launch.inspect.results import RunRow, collect, short
from launch.manifest import read_manifest
from launch.spec import Run, SweepSpec
from launch.standing import reconcile

REPORT_DIR = "report"  # <sweep dir>/report/: the figures
TABLE_NOTE = (
    "objective: the training loss's own objective at its last logged step (SogCLR's and SimCLR's are on "
    "different scales); global objective: the exact one, the same for every loss, at the last epoch end that "
    "logged it. wall time: the recorded attempts of both phases (one in progress: up to its last update); "
    "hours: that x the job's nodes x GPUs per node (GPU-h), "
    "or x CPUs per task for CPU jobs (CPU-h); a pruned run's `saved`: about what its remaining epochs and "
    "an evaluation would have cost, at the sweep's average per epoch and per evaluation"
)


def show_report(spec: SweepSpec, runs: list[Run], console: Console, fmt: str, figures: bool = True) -> int:
    """Print the report table in `fmt` (table, md, csv, json) and write the figures."""
    rows = collect(runs, reconcile(runs, read_manifest(spec.directory)))
    render(rows, f"{spec.name}: {len(runs)} run(s)", fmt, console)
    console.file.flush()  # the table first, then the notes (on stderr for md, csv and json)
    notes = console if fmt == "table" else Console(stderr=True)  # stdout stays machine-readable
    if (saved := savings(rows)) is not None:
        notes.print(saved, highlight=False, soft_wrap=True)
    if figures:
        from launch.inspect.figures import write_figures  # matplotlib: only when drawing

        directory = spec.directory / REPORT_DIR
        paths = write_figures(rows, directory)
        notes.print(f"{len(paths)} figure(s) in {directory}/", highlight=False, soft_wrap=True)
    return 0


# --- rendering --------------------------------------------------------------------------------------


def columns(rows: list[RunRow]) -> list[str]:
    """The table's columns: the global objective only if a run logs it (kNN always: `-` until logged)."""
    swept = [short(key) for key in rows[0].point] if rows else []
    global_objective = any(row.global_objective is not None for row in rows)
    return [
        "run",
        *swept,
        "standing",
        "epochs",
        "objective",
        *(["global objective"] if global_objective else []),
        "kNN top-1",
        "kNN top-5",
        "linear top-1",
        "linear top-5",
        "wall time",
        "hours",
        "requeues",
    ]


def formatted(row: RunRow) -> dict[str, str]:
    """The row as the table shows it: `-` for a value not reached yet."""
    return {
        "run": row.run,
        **{short(key): str(value) for key, value in row.point.items()},
        "standing": row.standing,
        "epochs": f"{row.epochs_done}/{row.epochs}",
        "objective": _number(row.objective),
        "global objective": _number(row.global_objective),
        "kNN top-1": _number(row.knn_top1, ".2f"),
        "kNN top-5": _number(row.knn_top5, ".2f"),
        "linear top-1": _number(row.linear_top1, ".2f"),
        "linear top-5": _number(row.linear_top5, ".2f"),
        "wall time": _duration(row.wall_s),
        "hours": _hours(row.hours, row.hours_unit)
        + ("" if row.hours_saved is None else f" (~{_hours(row.hours_saved)} saved)"),
        "requeues": str(row.requeues),
    }


def as_json(rows: list[RunRow]) -> list[dict[str, Any]]:
    """Rows for notebooks: raw numbers, null for what a run has not produced; no curves."""
    return [{key: value for key, value in asdict(row).items() if key != "curves"} for row in rows]


def render(rows: list[RunRow], title: str, fmt: str, console: Console) -> None:
    """Print the rows as a terminal table (with a title and the hours note) or as md, csv or json."""
    names = columns(rows)
    cells = [[formatted(row)[name] for name in names] for row in rows]
    if fmt == "table":
        table = Table(title=title, title_justify="left", caption=TABLE_NOTE, caption_justify="left")
        for name in names:
            table.add_column(name, overflow="fold")
        for line in cells:
            table.add_row(*line)
        console.print(table)
        return
    if fmt == "json":
        text = json.dumps(as_json(rows), indent=2)
    else:
        text = markdown(names, cells) if fmt == "md" else csv_text(names, cells)
    console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


def markdown(names: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    return "\n".join([*lines, *("| " + " | ".join(line) + " |" for line in cells)])


def csv_text(names: list[str], cells: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows([names, *cells])
    return out.getvalue()


def savings(rows: list[RunRow]) -> str | None:
    """What pruning saved, summed over the sweep (None if no run was pruned): the hours spent, and about
    what training the pruned runs to the end and evaluating them would have added."""
    stopped = [row for row in rows if row.hours_saved is not None]
    if not stopped:
        return None
    spent, saved = sum(row.hours for row in rows), sum(row.hours_saved for row in stopped)
    unit = "/".join(sorted({row.hours_unit for row in rows}))
    share = saved / (spent + saved) if saved else 0.0  # nothing recorded yet: nothing saved
    return (
        f"pruning: {len(stopped)} of {len(rows)} run(s) stopped early; the sweep used {_hours(spent, unit)}, "
        f"about {_hours(saved)} ({share:.0%}) less than training every run to the end"
    )


def _hours(hours: float, unit: str = "") -> str:
    return f"{hours:{'.3f' if hours < 10 else '.1f'}} {unit}".rstrip()


def _number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
