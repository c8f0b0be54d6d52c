"""ASHA's promotion without a service: whoever ends an attempt of a pruned sweep's pretraining gives the
verdicts the rungs now call for (sogclr/contract/rungs.py), and acts on them.

After every attempt of a pretraining job (node 0, `after_pretraining`) or of a `--local` run (the
launcher, launch/local.py), `give_verdicts` looks at each rung of the sweep: a paused run that the rung's
top now takes in is `promoted`; once every run of the sweep has reached the rung or ended before it for
good (`rung_is_final`), the rung's other paused runs are `closed`. A verdict is given exactly once (an
exclusive create), so two jobs that end at once never both act on a run.

On SLURM a paused run is a held job: its job task, at the end of a `pruned` attempt, holds its own job
(`scontrol requeuehold`) instead of ending it, so its evaluation keeps waiting on it (afterok/aftercorr
are satisfied only by a completion). A promotion releases the job (`scontrol release`): it runs again,
resumes from the rung's checkpoint, finds its promotion and trains on, judged again at the later rungs;
its evaluation follows when it completes. A closure cancels the held job and its evaluation, which then
read `pruned`. Measured on the local SLURM cluster (scripts/local-slurm, SLURM 22.05; see BENCHMARKS.md):

- `scontrol requeuehold` of the job's own running job (an array task by `A_i`) returns 0, and the job's
  processes get SIGTERM within 15 ms (the job is "CANCELLED DUE TO JOB REQUEUE"): it must be the job
  task's last act. The job then reads `PENDING`, Reason `job_requeued_in_held_state`, Priority 0, with
  Restarts + 1; its evaluation stays `PENDING (Dependency)`, for as long as it is held.
- `scontrol release` of such a job runs it again (SLURM_RESTART_COUNT 1), and its evaluation after it.
  Array tasks are held and released one by one.
- `scontrol release` of a job that is still RUNNING returns 0 and does nothing: a promotion given while
  the paused run's job task is still ending waits until its job reads held (`settle`).
- The alternative, `scontrol requeue` of a COMPLETED job, also returns 0, but only while the controller
  remembers the job (MinJobAge, 300 s by default), and the job's evaluation has already started by then
  (a pruned job exits 0, which satisfies afterok): a promotion can come hours later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jobs import slurm_client
from jobs.slurm import cancel_dependents, requeue
from sogclr.contract.config import PruneConfig, load_run_config, yardstick
from sogclr.contract.layout import RunLayout
from sogclr.contract.rungs import CLOSED, PROMOTED, RungRecords
from sogclr.contract.state import read_state

# How long a verdict waits for the paused run's job to read held (its job task holds it last thing).
SETTLE_WINDOW_S = 60
ENDED_FOR_GOOD = ("failed", "cancelled", "done")


def give_verdicts(run_dir: Path) -> dict[str, list[Path]]:
    """The verdicts the sweep's rungs call for now, given by this call (in the name of `run_dir`'s run):
    {"promoted": [run dirs], "closed": [run dirs]}, rung by rung (a closure at one rung may make the next
    one final)."""
    config = load_run_config(RunLayout(run_dir).config)
    prune = config.prune
    settings = yardstick(config.pretrain, prune.metric)
    sweep = sweep_runs(run_dir.parent, prune.records)
    given: dict[str, list[Path]] = {PROMOTED: [], CLOSED: []}
    for rung in prune.rungs:
        records = RungRecords(prune.records, rung)
        verdicts = dict(records.promotable(prune, settings))
        if rung_is_final(records, sweep):
            verdicts = {**records.closable(prune, settings), **verdicts}
        for run, verdict in verdicts.items():
            if paused_at(sweep.get(run), rung, verdict["training"]) and records.give(verdict, run_dir.name):
                given[verdict["verdict"]].append(run_dir.parent / run)
    return given


def sweep_runs(sweep_dir: Path, records: Path) -> dict[str, Path]:
    """run -> run directory, for the runs in `sweep_dir` whose config records at `records`: those the
    launcher has written a config for (every run of a submission, before its first sbatch)."""
    runs = {}
    for config in sorted(sweep_dir.glob("*/config.yaml")):
        prune = (yaml.safe_load(config.read_text()) or {}).get("prune") or {}
        if prune.get("records") == str(records):
            runs[config.parent.name] = config.parent
    return runs


def paused_at(run_dir: Path | None, rung: int, training: str) -> bool:
    """Whether the run in `run_dir` stands pruned at `rung`, in the training `training`."""
    state = read_state(RunLayout(run_dir).pretrain.state) if run_dir else {}
    stopped = state.get("pruned") or {}
    return (
        state.get("status") == "pruned" and stopped.get("epoch") == rung and state.get("training") == training
    )


def rung_is_final(records: RungRecords, sweep: dict[str, Path]) -> bool:
    """Whether no run of the sweep can still arrive at this rung: each recorded there in its current
    training, or ended before it for good (failed, cancelled, done without pruning, or closed at an
    earlier rung)."""
    for run, run_dir in sweep.items():
        state = read_state(RunLayout(run_dir).pretrain.state)
        recorded = read_state(records.record_path(run)).get("training")
        if recorded is not None and recorded == state.get("training"):
            continue
        if state.get("status") in ENDED_FOR_GOOD:
            continue
        stopped = (state.get("pruned") or {}).get("epoch")
        earlier = RungRecords(records.directory.parent, stopped) if stopped else None
        closed = earlier and (earlier.verdict(run, state.get("training")) or {}).get("verdict") == CLOSED
        if state.get("status") == "pruned" and stopped < records.rung and closed:
            continue
        return False
    return True


def own_verdict(run_dir: Path, prune: PruneConfig) -> str | None:
    """The verdict on this run at the rung that stopped it, if it has one."""
    state = read_state(RunLayout(run_dir).pretrain.state)
    rung = (state.get("pruned") or {}).get("epoch")
    verdict = RungRecords(prune.records, rung).verdict(run_dir.name, state.get("training")) if rung else None
    return verdict["verdict"] if verdict else None


# --- on SLURM ---------------------------------------------------------------------------------------


def after_pretraining(slurm_id: str, run_dir: Path, action: str) -> str:
    """Node 0, after an attempt of a pretraining job and its recording (`action`: the stop plan's): give
    the verdicts due and act on them; then, if this attempt paused the run, hold this job (`paused`), or
    requeue it if a promotion came first (`requeue`), or let it end if its rung closed it. Returns the
    action for the job task to carry out."""
    config = load_run_config(RunLayout(run_dir).config)
    if config.prune is None or not config.prune.promote:
        return action
    given = give_verdicts(run_dir)
    for other in given[PROMOTED]:
        if other != run_dir:
            settle(job_of(other), slurm_client.release)
    for other in given[CLOSED]:
        if other != run_dir:
            settle(job_of(other), close)
    if action != "end" or read_state(RunLayout(run_dir).pretrain.state).get("status") != "pruned":
        return action
    verdict = own_verdict(run_dir, config.prune)
    if verdict == CLOSED:
        return "end"
    if verdict == PROMOTED:
        # Promoted while this attempt ended: run again now. If SLURM refuses, the run stays pruned with
        # its promotion on record, and `--resume-pruned` continues it.
        return "end" if requeue(slurm_id) else "requeue"
    print(
        f"job task: paused at a rung; holding job {slurm_id} until a promotion or its rung's end", flush=True
    )
    try:
        slurm_client.requeue_held(slurm_id)  # SLURM signals this job at once: the last act
    except slurm_client.SlurmError as error:
        print(f"job task: {error}; the run ends pruned", flush=True)
        return "end"
    return "paused"


def close(slurm_id: str) -> None:
    """End a paused run's held job for good, and its evaluation (which can never run now)."""
    cancel_dependents(slurm_id)
    slurm_client.scancel([slurm_id])


def job_of(run_dir: Path) -> tuple[str, int]:
    """The SLURM id of the run's last pretraining attempt, and its restart count then."""
    attempts = read_state(RunLayout(run_dir).pretrain.state).get("attempts", [])
    last = attempts[-1] if attempts else {}
    return str(last.get("array_task") or last.get("job_id")), int(last.get("restart_count") or 0)


def settle(job: tuple[str, int], act: Callable[[str], Any]) -> bool:
    """`act` on the paused run's job once it reads held; wait while its job task is still ending the
    attempt that paused it (RUNNING or COMPLETING at the same restart count). True if it was done."""
    slurm_id, restarts = job
    deadline = time.monotonic() + SETTLE_WINDOW_S
    while True:
        fields = slurm_client.job_fields(slurm_id, attempts=3)
        if fields.get("JobState") == "PENDING" and fields.get("Reason") == slurm_client.HELD_REASON:
            try:
                act(slurm_id)
            except slurm_client.SlurmError as error:
                print(f"job task: {error}", flush=True)
                return False
            return True
        ending = fields.get("JobState") in ("RUNNING", "COMPLETING") and fields.get("Restarts") == str(
            restarts
        )
        if not ending or time.monotonic() > deadline:
            print(
                f"job task: job {slurm_id} of a paused run is {fields.get('JobState')}: left alone",
                flush=True,
            )
            return False
        time.sleep(2)
