"""Asynchronous successive halving (ASHA), decided inside the runs themselves, with ASHA's promotion.

The runs that compete share a records directory (the launcher gives a sweep's runs `<sweep dir>/prune`)
and nothing else: no service, no lock. At a rung (after `rung` epochs, once that epoch's metrics are
computed), rank 0 records the run's metric there, reads every comparable record of that rung, and applies
`decide`; the decision is written with the table it was made from and broadcast to every rank. A run that
stops saves its checkpoint and ends with status `pruned`. A run passing a rung that it already decided on
(a requeued attempt resuming from a checkpoint before the rung) keeps that decision.

Promotion (`promote: true`, the default): a run stopped at a rung is paused, not lost. Whenever a later
arrival makes it one of the rung's top max(1, floor(n / eta)) of the n runs recorded there (`promotions`),
a verdict `promoted` is claimed for it (exactly once: an exclusive create) and it is continued from its
checkpoint, judged again at the later rungs. Once every run of the sweep has reached the rung or ended
before it, the rung is final: its paused runs that were not promoted get the verdict `closed`. Who acts on
a verdict is the job layer's business (jobs/promote.py on SLURM, launch/local.py in `--local`).

Like with like: each record carries the run's training identity (`training`: one per start from scratch,
kept across resumes, written to state.json) and the metric's own settings (`settings`, the yardstick:
config.yardstick). A decision or verdict counts only for the training it was made for, under the same
metric, eta and settings; values measured with other settings are left out of the table. A run that
starts from scratch removes its own records, decisions and verdicts first (`forget`): it never inherits an
old decision, and its old value is nobody's rival.

Files (one per run per rung, each written atomically, so concurrent writers never clash):

    <records>/rung-<E>/<run>.json            {"run", "rung", "metric", "value", "step", "training",
                                              "settings", "recorded"}
    <records>/rung-<E>/decisions/<run>.json  {"run", "rung", "metric", "maximize", "eta", "training",
                                              "settings", "value", "keep", "threshold", "continue",
                                              "table": [{"run", "value"}, ...] (best first), "decided"}
    <records>/rung-<E>/verdicts/<run>.json   {"run", "rung", "training", "verdict": promoted | closed,
                                              "by", "keep", "threshold", "table", "given"}

E is the rung in epochs done (1-based); `<run>` is the name of the run directory. A pruned run's
state.json has `status: "pruned"` and `pruned: {"epoch": E, "metric", "value", "threshold", "decision":
<path of its decision file>}`; the `pruned` object stays after a continuation (a promotion, or the
launcher's `--resume-pruned`), as the record of where the run was stopped: `status` says where it stands.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sogclr.contract.atomic import temporary_name
from sogclr.contract.config import PRUNE_METRICS, PruneConfig
from sogclr.contract.state import now, read_state, write_json_atomic

PROMOTED, CLOSED = "promoted", "closed"


def keep_count(recorded: int, eta: int) -> int:
    """How many of the `recorded` runs at a rung belong to its top: the top 1/eta, at least one.

    ASHA (Li et al., MLSys 2020) promotes the top floor(n / eta) of a rung. Asynchronously each run is
    judged on arrival, against the runs recorded before it, so the first arrivals face fewer rivals: the
    first always continues, and until eta runs are recorded only the best so far does (as Optuna's
    SuccessiveHalvingPruner reads ASHA). With promotion, a run stopped on arrival continues later if the
    rung's top, grown with the arrivals since, takes it in.
    """
    return max(1, recorded // eta)


def ranked(values: dict[str, float], maximize: bool) -> list[tuple[str, float]]:
    """(run, value) best first; a NaN (a diverged run) is the worst; ties by run name, for a stable table."""

    def badness(item: tuple[str, float]) -> tuple[bool, float, str]:
        run, value = item
        return math.isnan(value), -value if maximize else value, run

    return sorted(values.items(), key=badness)


def decide(run: str, values: dict[str, float], maximize: bool, eta: int) -> dict[str, Any]:
    """The rule, pure: is `run` in the rung's top now, given every value recorded there (its own
    included)? On arrival that decides whether it continues; later, whether a paused run is promoted. It
    is if it is among the `keep_count` best, or ties the threshold (the worst value kept); a NaN never
    is. Returns the decision's fields: value, keep, threshold, continue and the ranked table."""
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


def promotions(values: dict[str, float], paused: set[str], maximize: bool, eta: int) -> list[str]:
    """The rule of promotion, pure: the paused runs that the rung's top now takes in."""
    return [run for run in sorted(paused) if decide(run, values, maximize, eta)["continue"]]


@dataclass(frozen=True)
class Contender:
    """A run at the rungs: its name, the identity of its current training (a new one at each start from
    scratch), and the settings its metric is measured with (config.yardstick)."""

    run: str
    training: str
    settings: dict[str, Any]


class RungRecords:
    """The records directory of one rung: rank 0's (or a job task's) file operations, no collectives."""

    def __init__(self, records: Path, rung: int) -> None:
        self.directory = Path(records) / f"rung-{rung}"
        self.rung = rung

    def record_path(self, run: str) -> Path:
        return self.directory / f"{run}.json"

    def decision_path(self, run: str) -> Path:
        return self.directory / "decisions" / f"{run}.json"

    def verdict_path(self, run: str) -> Path:
        return self.directory / "verdicts" / f"{run}.json"

    def decision(self, run: str) -> dict[str, Any] | None:
        return read_state(self.decision_path(run)) or None

    def verdict(self, run: str, training: str) -> dict[str, Any] | None:
        """The promotion or closure of this training of `run` at this rung, if there is one."""
        verdict = read_state(self.verdict_path(run))
        return verdict if verdict.get("training") == training else None

    def record(self, who: Contender, metric: str, value: float, step: int) -> None:
        record = {"run": who.run, "rung": self.rung, "metric": metric, "value": value, "step": step}
        record.update(training=who.training, settings=who.settings, recorded=now())
        write_json_atomic(self.record_path(who.run), record)

    def records(self, metric: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """Every record of `metric` at this rung measured with `settings` (a temporary file starts with a
        dot, and is not globbed)."""
        found = (read_state(path) for path in sorted(self.directory.glob("*.json")))
        return [r for r in found if r.get("metric") == metric and r.get("settings") == settings]

    def values(self, metric: str, settings: dict[str, Any]) -> dict[str, float]:
        """run -> value of every comparable record at this rung."""
        return {r["run"]: float(r["value"]) for r in self.records(metric, settings)}

    def standing(self, who: Contender, cfg: PruneConfig) -> dict[str, Any] | None:
        """This training's decision at this rung, if it made one under the same metric, eta and settings;
        a promotion since turns a stop into `continue` (with the verdict under `promoted`)."""
        decision = self.decision(who.run)
        if decision is None or not same_terms(decision, who, cfg):
            return None
        verdict = self.verdict(who.run, who.training)
        if not decision["continue"] and verdict is not None and verdict["verdict"] == PROMOTED:
            return {**decision, "continue": True, "promoted": verdict}
        return decision

    def decide(self, who: Contender, cfg: PruneConfig, value: float, step: int) -> dict[str, Any]:
        """Record `value`, read the rung's comparable records, decide and write the decision; this
        training's earlier standing at this rung, if there is one, is returned unchanged instead."""
        if (earlier := self.standing(who, cfg)) is not None:
            return earlier
        self.record(who, cfg.metric, value, step)
        maximize = PRUNE_METRICS[cfg.metric]
        decision = {
            "run": who.run,
            "rung": self.rung,
            "metric": cfg.metric,
            "maximize": maximize,
            "eta": cfg.eta,
            "training": who.training,
            "settings": who.settings,
            **decide(who.run, self.values(cfg.metric, who.settings), maximize, cfg.eta),
            "decided": now(),
        }
        write_json_atomic(self.decision_path(who.run), decision)
        return decision

    def paused(self, cfg: PruneConfig, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """run -> its record, for the runs this rung stopped (in the training recorded here, under these
        terms) that have no verdict yet."""
        found = {}
        for record in self.records(cfg.metric, settings):
            who = Contender(record["run"], record.get("training"), settings)
            decision = self.standing(who, cfg)
            if decision is not None and not decision["continue"] and not self.verdict(who.run, who.training):
                found[who.run] = record
        return found

    def promotable(self, cfg: PruneConfig, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """run -> the verdict to give it, for the paused runs that the rung's top now takes in."""
        paused = self.paused(cfg, settings)
        values = self.values(cfg.metric, settings)
        maximize = PRUNE_METRICS[cfg.metric]
        return {
            run: self._verdict(paused[run], PROMOTED, decide(run, values, maximize, cfg.eta))
            for run in promotions(values, set(paused), maximize, cfg.eta)
        }

    def closable(self, cfg: PruneConfig, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """run -> the verdict `closed`, for every paused run (call it once the rung is final and its
        promotions are given)."""
        values = self.values(cfg.metric, settings)
        maximize = PRUNE_METRICS[cfg.metric]
        return {
            run: self._verdict(record, CLOSED, decide(run, values, maximize, cfg.eta))
            for run, record in self.paused(cfg, settings).items()
        }

    def _verdict(self, record: dict[str, Any], verdict: str, top: dict[str, Any]) -> dict[str, Any]:
        fields = {k: top[k] for k in ("value", "keep", "threshold", "table")}
        return {
            "run": record["run"],
            "rung": self.rung,
            "training": record["training"],
            "verdict": verdict,
            **fields,
        }

    def give(self, verdict: dict[str, Any], by: str) -> bool:
        """Write `verdict` unless the run already has one at this rung: True if this call gave it. The
        exclusive create (a hard link, atomic also on NFS) makes two jobs that see the same promotion at
        once give it exactly once."""
        path = self.verdict_path(verdict["run"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        write_json_atomic(tmp, {**verdict, "by": by, "given": now()})
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def forget(self, run: str) -> None:
        """Remove `run`'s record, decision and verdict at this rung (its training starts from scratch)."""
        for path in (self.record_path(run), self.decision_path(run), self.verdict_path(run)):
            path.unlink(missing_ok=True)


def same_terms(decision: dict[str, Any], who: Contender, cfg: PruneConfig) -> bool:
    """Whether `decision` was made for this training, under this metric, eta and yardstick."""
    made = (decision.get("training"), decision.get("metric"), decision.get("eta"), decision.get("settings"))
    return made == (who.training, cfg.metric, cfg.eta, who.settings)
