"""What each run of a sweep reached, read from its run directory, and the numbers behind the report's
figures: the one home of the data that the report's table (launch/inspect/report.py) and its figures
(launch/inspect/figures.py) both draw.

Collection reads only run directories (state.json, metrics.jsonl, lincls/result.json) and the standings
`status` also shows, and returns plain rows and series. A value a run has not produced yet is None (shown
`-`), never 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from launch.configs import phase_resources
from launch.inspect.status import position
from launch.spec import Run
from launch.standing import NOT_SUBMITTED, PRUNED, PhaseStanding, phase_done
from sogclr.contract.state import read_state


@dataclass(frozen=True)
class Series:
    """One line of a figure: its label and its points."""

    label: str
    x: list[float]
    y: list[float]


@dataclass(frozen=True)
class RunRow:
    """What one run reached; None where it has not (yet) produced the value."""

    run: str
    point: dict[str, Any]
    loss: str
    standing: str
    epochs_done: int
    epochs: int
    objective: float | None  # the training objective of the last logged step
    global_objective: float | None  # the exact global objective of the last epoch-end record
    knn_top1: float | None
    knn_top5: float | None
    linear_top1: float | None
    linear_top5: float | None
    wall_s: float
    hours: float
    hours_unit: str  # GPU-h or CPU-h
    requeues: int
    curves: dict[str, Series] = field(default_factory=dict)  # objective, global objective, kNN top-1
    rungs: list[int] = field(default_factory=list)  # the epochs where successive halving judges the run
    prune_metric: str | None = None  # what it is judged on there
    pruned_at: int | None = None  # the rung (epoch) that stopped it
    hours_saved: float | None = None  # a pruned run: about what training on and evaluating would have cost


# --- collection -------------------------------------------------------------------------------------


def collect(runs: list[Run], where: dict[str, dict[str, PhaseStanding]]) -> list[RunRow]:
    """One row per run, from its run directory and its standing (`launch.manifest.standings`); a pruned
    run's row has about the hours its pruning saved (`Costs`)."""
    rows = [collect_run(run, where[run.name]) for run in runs]
    costs = Costs.of(runs)
    return [
        row if row.pruned_at is None else replace(row, hours_saved=costs.saved(run, row.pruned_at))
        for row, run in zip(rows, runs, strict=True)
    ]


@dataclass(frozen=True)
class Costs:
    """What a pretraining epoch and an evaluation cost in this sweep, from the runs that finished them:
    what a pruned run would have spent on its remaining epochs and its evaluation. Measured in the same
    sweep, so under the same machine load; a run's own rate stands in while no run has finished."""

    epoch_hours: float | None  # pretraining hours per epoch, averaged over finished pretrainings
    evaluation_hours: float  # an evaluation's hours, averaged (0 before any is done)

    @classmethod
    def of(cls, runs: list[Run]) -> Costs:
        trained = [
            pretrain_hours(run) / run.config.pretrain.epochs for run in runs if phase_done(run, "pretrain")
        ]
        evaluated = [
            lincls_hours(run) for run in runs if "lincls" in run.phases and phase_done(run, "lincls")
        ]
        return cls(_mean(trained), _mean(evaluated) or 0.0)

    def saved(self, run: Run, stopped_at: int) -> float:
        """About the hours training `run` on from epoch `stopped_at` to its end and evaluating it take."""
        per_epoch = self.epoch_hours if self.epoch_hours is not None else pretrain_hours(run) / stopped_at
        evaluation = self.evaluation_hours if "lincls" in run.phases else 0.0
        return per_epoch * (run.config.pretrain.epochs - stopped_at) + evaluation


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def collect_run(run: Run, where: dict[str, PhaseStanding]) -> RunRow:
    files = run.files
    state = read_state(files.pretrain.state)
    records = read_records(files.pretrain.metrics)
    steps = [r for r in records if "objective" in r]
    last_step = next((r for r in reversed(records) if "loss" in r), None)
    result = read_state(files.lincls.result)
    wall_s, hours, unit = spent(run)
    prune = run.config.prune
    return RunRow(
        run=run.name,
        point=dict(run.point),
        loss=run.config.pretrain.loss,
        standing=standing(run, where),
        epochs_done=position(run, state, last_step).epochs_done,
        epochs=run.config.pretrain.epochs,
        objective=steps[-1]["objective"] if steps else None,
        global_objective=last_value(records, "global_objective"),
        knn_top1=last_value(records, "knn_top1"),
        knn_top5=last_value(records, "knn_top5"),
        linear_top1=result.get("top1"),
        linear_top5=result.get("top5"),
        wall_s=wall_s,
        hours=hours,
        hours_unit=unit,
        requeues=state.get("requeues", 0) + read_state(files.lincls.state).get("requeues", 0),
        curves=curves(records, state.get("total_steps"), run.config.pretrain.epochs),
        rungs=list(prune.rungs) if prune else [],
        prune_metric=prune.metric if prune else None,
        pruned_at=pruned_at(run, where),
    )


def pruned_at(run: Run, where: dict[str, PhaseStanding]) -> int | None:
    """The rung (epoch) at which successive halving stopped the run, unless it was continued since."""
    if where["pretrain"].state != PRUNED:
        return None
    return (read_state(run.files.pretrain.state).get("pruned") or {}).get("epoch")


def standing(run: Run, where: dict[str, PhaseStanding]) -> str:
    """`done`, `pruned at epoch E`, or the first unfinished phase and its state (a `--local` run has no
    job: its run directory's status)."""
    if (epoch := pruned_at(run, where)) is not None:
        return f"pruned at epoch {epoch}"
    for phase in run.phases:
        state = where[phase].state
        if state == "done":
            continue
        if state == NOT_SUBMITTED:
            state = read_state(run.files.phase(phase).state).get("status", NOT_SUBMITTED)
        return f"{phase} {state}"
    return "done"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl file (a line being written is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_value(records: list[dict[str, Any]], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def curves(records: list[dict[str, Any]], total_steps: int | None, epochs: int) -> dict[str, Series]:
    """Training curves against (fractional) epochs: the objective of each logged step, and the epoch-end
    global objective and kNN top-1 where the run logs them. Epoch-end records count completed epochs."""
    found = {}
    if total_steps:
        points = [(r["step"] * epochs / total_steps, r["objective"]) for r in records if "objective" in r]
        found["objective"] = points
    for key in ("global_objective", "global_objective_pooled_views", "knn_top1"):
        found[key] = [(r["epoch"] + 1, r[key]) for r in records if r.get(key) is not None and "epoch" in r]
    return {key: Series(key, [x for x, _ in p], [y for _, y in p]) for key, p in found.items() if p}


def spent(run: Run) -> tuple[float, float, str]:
    """Wall seconds of the recorded attempts of both phases, the resource-hours they used, and the unit."""
    used = [phase_spent(run, phase) for phase in run.phases]
    units = {"GPU-h" if phase_resources(run, phase).gpus_per_node else "CPU-h" for phase in run.phases}
    return sum(seconds for seconds, _ in used), sum(hours for _, hours in used), "/".join(sorted(units))


def phase_spent(run: Run, phase: str) -> tuple[float, float]:
    """Wall seconds of one phase's recorded attempts and the resource-hours they used (x nodes x GPUs
    per node, or x CPUs per task for a CPU job)."""
    resources = phase_resources(run, phase)
    files = run.files.phase(phase)
    state = read_state(files.state)
    # the attempt in progress counts up to the trainer's last word in state.json
    current = state.get("current_attempt")
    current = [{**current, "ended": state.get("updated")}] if current else []
    attempts = state.get("attempts", []) + current
    lost = any(not attempt.get("ended") for attempt in attempts)
    times = [r["time"] for r in read_records(files.metrics) if "time" in r] if lost else []
    seconds = sum(attempt_seconds(attempts, times))
    per_node = resources.gpus_per_node or resources.cpus_per_task
    return seconds, seconds / 3600 * resources.nodes * per_node


def pretrain_hours(run: Run) -> float:
    return phase_spent(run, "pretrain")[1]


def lincls_hours(run: Run) -> float:
    return phase_spent(run, "lincls")[1]


def attempt_seconds(attempts: list[dict[str, Any]], log_times: Sequence[float] = ()) -> list[float]:
    """How long each attempt ran. A lost attempt (a node failure, a job killed before its task could
    record the end: `ended` null) ran at least until the last metrics record (`log_times`, epoch
    seconds) it logged before the next attempt started; 0 only if it logged none. Counting it as 0
    would leave out the hours exactly where most were burnt (an attempt lost after 23 h)."""
    starts = [_time(attempt.get("started")) for attempt in attempts]
    seconds = []
    for attempt, start, after in zip(attempts, starts, [*starts[1:], None]):  # after: the next's start
        end = _time(attempt.get("ended"))
        if start is not None and end is None:
            within = [t for t in log_times if t >= start and (after is None or t < after)]
            end = max(within, default=start)
        seconds.append(0.0 if start is None else end - start)
    return seconds


def _time(iso: str | None) -> float | None:
    return None if not iso else datetime.fromisoformat(iso).timestamp()


# --- the numbers behind the figures -----------------------------------------------------------------


def numeric_fields(rows: list[RunRow]) -> list[str]:
    """Fields that every run sets, to numbers that take at least two values."""
    return [
        key
        for key in swept_fields(row.point for row in rows)
        if all(_is_number(row.point.get(key)) for row in rows) and len({row.point[key] for row in rows}) > 1
    ]


def top1_series(rows: list[RunRow], key: str) -> list[Series]:
    """Linear top-1 against swept field `key`: one line per loss (and per value of the other swept
    fields), points sorted by `key`; runs without a linear result are left out."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.linear_top1 is None:
            continue
        others = [f"{short(k)}={v}" for k, v in row.point.items() if k not in (key, "pretrain.loss")]
        lines.setdefault(", ".join([row.loss, *others]), []).append((row.point[key], row.linear_top1))
    return [Series(label, [x for x, _ in sorted(p)], [y for _, y in sorted(p)]) for label, p in lines.items()]


def swept_fields(points: Iterable[dict[str, Any]]) -> list[str]:
    """Every field of the points, in the order they first appear (explicit `runs` set different ones)."""
    return list(dict.fromkeys(key for point in points for key in point))


def short(key: str) -> str:
    """`pretrain.batch_size` -> `batch_size`: a bare name is a pretraining field, as in a spec."""
    return key.removeprefix("pretrain.")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- mean ± sd over seeds ---------------------------------------------------------------------------

SEED = "pretrain.seed"


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over the `n` seeds that have a value (sd None for one)."""

    mean: float
    sd: float | None
    n: int


@dataclass(frozen=True)
class SeedGroup:
    """The runs of one point of the sweep that differ only in their seed."""

    point: dict[str, Any]  # the swept values but the seed
    rows: list[RunRow]

    @property
    def label(self) -> str:
        return ", ".join(f"{short(key)}={value}" for key, value in self.point.items())

    def at_epoch(self, key: str, epoch: float) -> Spread | None:
        """Curve `key` at `epoch` over the seeds that have logged it there."""
        return spread([row.curves[key].y[row.curves[key].x.index(epoch)] for row in self._with(key, epoch)])

    def final(self, field: str) -> Spread | None:
        """A RunRow field (knn_top1, linear_top1) over the seeds that have it."""
        return spread([value for row in self.rows if (value := getattr(row, field)) is not None])

    def band(self, key: str) -> tuple[list[float], list[Spread]]:
        """Curve `key` at every epoch that some seed logged it: the epochs and the spread there."""
        epochs = sorted({x for row in self.rows if key in row.curves for x in row.curves[key].x})
        return epochs, [self.at_epoch(key, epoch) for epoch in epochs]

    def _with(self, key: str, epoch: float) -> list[RunRow]:
        return [row for row in self.rows if key in row.curves and epoch in row.curves[key].x]


def seeded(rows: list[RunRow]) -> bool:
    """Whether the sweep varies the seed (and so has something to average over)."""
    return len({row.point.get(SEED) for row in rows}) > 1


def seed_groups(rows: list[RunRow]) -> list[SeedGroup]:
    """The rows grouped by their point without the seed, in the order the groups first appear."""
    groups: dict[tuple, SeedGroup] = {}
    for row in rows:
        point = {key: value for key, value in row.point.items() if key != SEED}
        groups.setdefault(tuple(point.items()), SeedGroup(point, [])).rows.append(row)
    return list(groups.values())


def spread(values: list[float]) -> Spread | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return Spread(mean, sd, len(values))


def table_epochs(groups: list[SeedGroup], key: str = "global_objective", count: int = 4) -> list[float]:
    """Up to `count` epochs at which `key` is logged, evenly spread and ending at the last one logged."""
    logged = sorted(
        {x for group in groups for row in group.rows if key in row.curves for x in row.curves[key].x}
    )
    if len(logged) <= count:
        return logged
    return [logged[round((len(logged) - 1) * (k + 1) / count)] for k in range(count)]
