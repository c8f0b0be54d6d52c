"""Asynchronous successive halving (ASHA's stopping rule), decided inside the runs themselves.

The runs that compete share a records directory (the launcher gives a sweep's runs `<sweep dir>/prune`)
and nothing else: no service, no lock. At a rung (after `rung` epochs, once that epoch's metrics are
computed), rank 0 records the run's metric there, reads every record of that rung, and applies `decide`;
the decision is written with the table it was made from and broadcast to every rank. A run that stops
saves its checkpoint and ends with status `pruned`. A run passing a rung that it already decided on (a
requeued attempt resuming from a checkpoint before the rung) keeps that decision: decisions are never
made twice.

Files (one per run per rung, each written atomically, so concurrent writers never clash):

    <records>/rung-<E>/<run>.json            {"run", "rung", "metric", "value", "step", "recorded"}
    <records>/rung-<E>/decisions/<run>.json  {"run", "rung", "metric", "maximize", "eta", "value",
                                              "keep", "threshold", "continue",
                                              "table": [{"run", "value"}, ...] (best first), "decided"}

E is the rung in epochs done (1-based); `<run>` is the name of the run directory. A pruned run's
state.json has `status: "pruned"` and `pruned: {"epoch": E, "metric", "value", "threshold", "decision":
<path of its decision file>}`; the `pruned` object stays after a continuation (the launcher's
`--resume-pruned`), as the record of where the run was stopped: `status` says where it stands.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sogclr.contract.config import PRUNE_METRICS, PruneConfig
from sogclr.contract.state import now, read_state, write_json_atomic


def keep_count(recorded: int, eta: int) -> int:
    """How many of the `recorded` runs at a rung continue: the top 1/eta, at least one.

    ASHA (Li et al., MLSys 2020) promotes the top floor(n / eta) of a rung. Asynchronously each run is
    judged once, against the runs recorded before it, so the first arrivals face fewer rivals: the first
    always continues, and until eta runs are recorded only the best so far does (as Optuna's
    SuccessiveHalvingPruner reads ASHA for runs that cannot wait to be promoted).
    """
    return max(1, recorded // eta)


def ranked(values: dict[str, float], maximize: bool) -> list[tuple[str, float]]:
    """(run, value) best first; a NaN (a diverged run) is the worst; ties by run name, for a stable table."""

    def badness(item: tuple[str, float]) -> tuple[bool, float, str]:
        run, value = item
        return math.isnan(value), -value if maximize else value, run

    return sorted(values.items(), key=badness)


def decide(run: str, values: dict[str, float], maximize: bool, eta: int) -> dict[str, Any]:
    """The rule, pure: does `run` continue, given every value recorded at the rung (its own included)?

    It continues if it is among the `keep_count` best, or ties the threshold (the worst value kept);
    a NaN never continues. Returns the decision's fields: value, keep, threshold, continue and the
    ranked table.
    """
    table = ranked(values, maximize)
    keep = keep_count(len(table), eta)
    threshold = table[keep - 1][1]
    value = values[run]
    position = [name for name, _ in table].index(run)
    return {
        "value": value,
        "keep": keep,
        "threshold": threshold,
        "continue": not math.isnan(value) and (position < keep or value == threshold),
        "table": [{"run": name, "value": v} for name, v in table],
    }


class RungRecords:
    """The records directory of one rung: rank 0's file operations (no collectives here)."""

    def __init__(self, records: Path, rung: int) -> None:
        self.directory = Path(records) / f"rung-{rung}"
        self.rung = rung

    def record_path(self, run: str) -> Path:
        return self.directory / f"{run}.json"

    def decision_path(self, run: str) -> Path:
        return self.directory / "decisions" / f"{run}.json"

    def decision(self, run: str) -> dict[str, Any] | None:
        return read_state(self.decision_path(run)) or None

    def record(self, run: str, metric: str, value: float, step: int) -> None:
        record = {"run": run, "rung": self.rung, "metric": metric, "value": value, "step": step}
        write_json_atomic(self.record_path(run), {**record, "recorded": now()})

    def values(self, metric: str) -> dict[str, float]:
        """run -> value of every record of `metric` at this rung (a temporary file starts with a dot)."""
        records = (read_state(path) for path in sorted(self.directory.glob("*.json")))
        return {r["run"]: float(r["value"]) for r in records if r.get("metric") == metric}

    def decide(self, run: str, cfg: PruneConfig, value: float, step: int) -> dict[str, Any]:
        """Record `value`, read the rung's records, decide and write the decision; an earlier decision
        of this run at this rung, if there is one, is returned unchanged instead."""
        if (earlier := self.decision(run)) is not None:
            return earlier
        self.record(run, cfg.metric, value, step)
        maximize = PRUNE_METRICS[cfg.metric]
        decision = {
            "run": run,
            "rung": self.rung,
            "metric": cfg.metric,
            "maximize": maximize,
            "eta": cfg.eta,
            **decide(run, self.values(cfg.metric), maximize, cfg.eta),
            "decided": now(),
        }
        write_json_atomic(self.decision_path(run), decision)
        return decision
