"""`sogclr-submit status`: this sweep's runs as SLURM and their run directories see them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from jobs import slurm_client
from launch.manifest import read_manifest
from launch.spec import Run, SweepSpec
from launch.standing import PhaseStanding, reconcile
from launch.table import print_table
from sogclr.contract.rungs import PROMOTED, RungRecords
from sogclr.contract.state import read_state


def show_status(spec: SweepSpec, runs: list[Run], console: Console) -> int:
    """One row per run: job ids, state of each phase, progress, requeues, last loss, last kNN top-1 (the
    monitor during pretraining), linear top-1."""
    where = reconcile(runs, read_manifest(spec.directory))
    columns = (
        *("run", "pretrain job", "lincls job", "pretraining", "linear eval", "epochs", "steps", "rung"),
        "requeues",
        *("last loss", "kNN top-1", "top-1"),
    )
    rows = []
    grace_times = slurm_client.partition_grace_times()
    warnings = []
    for run in runs:  # each record read once: on a 1,000-run sweep the reads are most of the command
        pretrain, lincls = where[run.name]["pretrain"], where[run.name]["lincls"]
        state = pretrain.record
        # metrics run ahead of checkpoints; epoch-end evaluations log records without a loss
        latest = last_record(run.files.pretrain.metrics, having="loss")
        result = read_state(run.files.lincls.result)
        where_now = position(run, state, latest)
        rows.append(
            (
                run.name,
                pretrain.job_id or "-",
                lincls.job_id or "-",
                shown(pretrain, state),
                shown(lincls, lincls.record) if run.config.lincls is not None else "-",
                where_now.epochs_shown,
                where_now.steps_shown,
                rung(run, state),
                str(state.get("requeues", 0)),
                _format((latest or state).get("loss")),
                _format((last_knn(run) or {}).get("knn_top1")),
                _format(result.get("top1")),
            )
        )
        warnings += save_time_warnings(run, state.get("last_save_s"), grace_times)
    print_table(console, f"{spec.name}: {len(runs)} run(s)", columns, rows)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    return 0


@dataclass(frozen=True)
class Position:
    """How far a run's pretraining got, as `status` and `report` both show it: epochs completed and steps
    taken, each of its total (a finished 8-epoch run of 11 steps an epoch: 8/8 and 88/88)."""

    epochs_done: int
    epochs: int
    steps: int
    total_steps: int | None

    @property
    def epochs_shown(self) -> str:
        return f"{self.epochs_done}/{self.epochs}"

    @property
    def steps_shown(self) -> str:
        return f"{self.steps}/{self.total_steps or '?'}" if self.steps else "-"


def position(run: Run, state: dict[str, Any], latest: dict[str, Any] | None) -> Position:
    """The run's pretraining position: the later of its last checkpoint (`state`, its state.json) and its
    last logged step (`latest`, the last metrics record with a loss: metrics run ahead of checkpoints). A
    metrics record's `epoch` is the zero-based epoch in progress, state.json's the epochs completed: both
    are turned into epochs completed here."""
    steps = max(state.get("step", 0), (latest or {}).get("step", 0))
    total, epochs = state.get("total_steps"), run.config.pretrain.epochs
    done = steps * epochs // total if total else state.get("epoch", 0)
    return Position(done, epochs, steps, total)


def rung(run: Run, state: dict[str, Any]) -> str:
    """Where successive halving has the run: `-` (no pruning), `before 1` (no rung reached yet),
    `kept at 2` (the last rung it passed, on arrival or promoted), `paused at 2` (stopped there, and may
    still be promoted), `pruned at 2` (stopped for good), or `resumed after 2` (pruned, then continued
    with --resume-pruned: never judged again), from its pretraining's `state` and the rungs' records."""
    prune = run.config.prune
    if prune is None:
        return "-"
    name, training = run.run_dir.name, state.get("training")
    if (stopped := state.get("pruned")) is not None:
        verdict = (RungRecords(prune.records, stopped["epoch"]).verdict(name, training) or {}).get("verdict")
        if state.get("status") == "pruned" and verdict != PROMOTED:
            paused = prune.promote and verdict is None
            return f"{'paused at' if paused else 'pruned at'} {stopped['epoch']}"
        if verdict != PROMOTED:
            return f"resumed after {stopped['epoch']}"
    records = [RungRecords(prune.records, epoch) for epoch in prune.rungs]
    kept = [
        rung.rung
        for rung in records
        if (d := rung.decision(name))
        and (d["continue"] or (rung.verdict(name, training) or {}).get("verdict") == PROMOTED)
    ]
    return f"kept at {kept[-1]}" if kept else f"before {prune.rungs[0]}"


def save_time_warnings(run: Run, took: float | None, grace_times: dict[str | None, int]) -> list[str]:
    """Why the run's last checkpoint, which took `took` seconds, may not fit in the time it gets to save
    after a stop signal (its signal lead, its partition's GraceTime); [] when it fits."""
    if took is None:
        return []
    warnings = []
    lead, grace = run.slurm.signal_lead_s, grace_times.get(run.slurm.partition)
    if lead < took:
        warnings.append(
            f"{run.name}: its last save took {took:.1f} s, longer than slurm.signal_lead_s ({lead} s): "
            "at the time limit it may be killed mid-save and lose the steps since its last checkpoint"
        )
    if grace is not None and grace < took:
        warnings.append(
            f"{run.name}: its last save took {took:.1f} s, longer than the partition's GraceTime "
            f"({grace} s): a preemption may kill it mid-save and lose the steps since its last checkpoint"
        )
    return warnings


def shown(standing: PhaseStanding, state: dict[str, Any] | None = None) -> str:
    """A phase's state for the table, with the reason when it is `unknown` or `not ours`, and while a
    job copies its shards to the node's disk (sogclr/data/staging.py: `state`'s `staging`), that."""
    if standing.reason:
        return f"{standing.state}: {standing.reason}"
    state = state or {}
    staging = state.get("staging") or {}
    if staging.get("at", "") < (state.get("current_attempt") or {}).get("started", "~"):
        staging = {}  # an earlier attempt's
    if standing.active and staging.get("phase") == "copying":
        return f"{standing.state}: staging {100 * staging['bytes'] // max(staging['total'], 1)}%"
    if standing.active and staging.get("phase") == "waiting":
        return f"{standing.state}: staging (waiting for the node's copy)"
    return standing.state


def last_knn(run: Run) -> dict[str, Any] | None:
    """The kNN monitor's last record, or None; a run without the monitor has none to look for."""
    if run.config.pretrain.knn_every_epochs is None:
        return None
    return last_record(run.files.pretrain.metrics, having="knn_top1")


def last_record(path: Path, having: str, block: int = 65536) -> dict[str, Any] | None:
    """The last complete record with the key `having` of a metrics.jsonl file, read backwards from the end
    a block at a time (epoch-end records may lie far behind the last step's, or be absent: a run without
    the kNN monitor has none). Only lines that hold the key's bytes are parsed: a 50,000-line file
    without it took 0.56 s when every line was, which `status` paid for each run of a sweep."""
    key = json.dumps(having).encode()
    try:
        with open(path, "rb") as f:
            end, partial = f.seek(0, 2), b""
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                chunk = f.read(end - start) + partial
                # the first line may go on in the block before; it is read again with that one
                first, _, rest = chunk.partition(b"\n") if start > 0 else (b"", b"", chunk)
                partial, end = first, start
                if key not in rest:
                    continue
                for line in reversed(rest.split(b"\n")):
                    record = _json_or_none(line.decode(errors="replace")) if key in line else None
                    if record and having in record:
                        return record
    except FileNotFoundError:
        return None
    return None


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # the first line of the tail, or one being written
        return None


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
