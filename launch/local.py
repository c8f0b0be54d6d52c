"""Local mode (`--local`): the sweep's runs on this machine, with the SLURM jobs' resume and requeue rules.

Progress shows live (launch/inspect/progress.py), and the closing table has each run's outcome and linear
top-1.

Each run uses its usual run directory; a preempted attempt is started again from its checkpoint (that is
the local requeue, counted against `max_requeues`), and linear evaluation follows a completed pretraining
(not a pruned one: a pruned run ends there). With promotion, the launcher gives the rungs' verdicts
after each run's attempts (jobs/promote.py) and continues each paused run that a rung's top takes in,
from its checkpoint; otherwise a pruned run is continued only with `--resume-pruned`.
`--preempt-after` rehearses preemption: SLURM's warning signal (USR2) to the training processes after
that many seconds of a run's first attempt. `--debug` runs one run in this process, single rank.

Stopping the launcher stops the sweep where it stands, and the same command resumes it: Ctrl-C reaches
torchrun with the launcher; SIGTERM (`kill`, a batch system ending the session) reaches only the
launcher, since torchrun ignores it (jobs/attempt.py: on SLURM the trainers get it themselves), so the
launcher passes it on as a preemption (USR2: each running trainer checkpoints and exits), starts and
requeues nothing more, and exits 1. Otherwise its trainers would train on without it, and the next
launch would start a second trainer in the same run directory.
"""

from __future__ import annotations

import os
import pdb
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from jobs.attempt import PHASES, finish_attempt, run_attempt
from jobs.promote import give_verdicts, own_verdict
from jobs.slurm_client import UNKNOWN
from jobs.stop import Budget
from jobs.torchrun import threads_per_rank, torchrun_command
from launch.configs import check_recipes, phase_resources, write_run_config
from launch.inspect.progress import LiveProgress
from launch.manifest import read_manifest, sweep_lock, write_manifest
from launch.snapshot import live_code
from launch.spec import Run, SpecError, SweepSpec
from launch.standing import PRUNED, phase_done, pruned, reconcile
from sogclr.contract.rungs import PROMOTED
from sogclr.contract.state import now, read_state

STOPPED = "stopped"  # the launcher got SIGTERM: the run resumes at the next launch


@contextmanager
def owning(spec: SweepSpec, runs: list[Run], reconfigure: bool) -> Iterator[None]:
    """Hold the sweep's lock, and refuse (SpecError) runs whose SLURM jobs are queued or running, or
    that SLURM cannot say about: one owner per run directory. Also the recipe check of a submission."""
    with sweep_lock(spec.directory):
        check_recipes(runs, reconfigure)
        manifest = read_manifest(spec.directory)
        lost_replies = bool(manifest.get("pending"))
        where = reconcile(runs, manifest)
        if lost_replies:
            write_manifest(spec.directory, manifest)  # what the lookup of their tokens settled
        busy = [
            f"{run.name} ({phase} job {standing.job_id}: {standing.state})"
            for run in runs
            for phase, standing in where[run.name].items()
            if standing.active or standing.state == UNKNOWN
        ]
        if busy:
            raise SpecError(
                f"{', '.join(busy)}: SLURM jobs may be training in these run directories; "
                "cancel them (sogclr-submit cancel) or wait for them to end"
            )
        yield


def run_local(
    spec: SweepSpec,
    runs: list[Run],
    parallel: int,
    preempt_after: float | None,
    console: Console,
    reconfigure: bool = False,
) -> int:
    """Run every run (pretraining, then linear eval), `parallel` at once; 0 when all of them finish.
    Holds the sweep's lock throughout: a submission of the same sweep waits."""

    with owning(spec, runs, reconfigure), stopped_by_term() as stopping, LiveProgress(console, runs) as live:

        def one(run: Run) -> str:
            if stopping.is_set():
                return STOPPED
            outcome = run_locally(run, preempt_after, console, live, stopping)
            console.print(f"{run.name}: {outcome}", highlight=False)
            return outcome

        outcomes: dict[str, str] = {}
        by_dir = {run.run_dir: run for run in runs}
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            running = {pool.submit(one, run): run for run in runs}
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    run = running.pop(future)
                    outcomes[run.name] = future.result()
                    for promoted in promoted_by(run, by_dir):  # paused runs its arrivals put in a top
                        console.print(f"{promoted.name}: promoted, continued from its rung", highlight=False)
                        running[pool.submit(one, promoted)] = promoted
    table = Table(title=f"{spec.name}: local runs", title_justify="left")
    for column in ("run", "outcome", "linear top-1", "run directory"):
        table.add_column(column, overflow="fold")
    for run in runs:
        outcome = outcomes[run.name]
        top1 = read_state(run.files.lincls.result).get("top1")
        table.add_row(run.name, outcome, "-" if top1 is None else f"{top1:.2f}", str(run.run_dir))
    console.print(table)
    return 0 if all(outcome in ("done", PRUNED) for outcome in outcomes.values()) else 1


@contextmanager
def stopped_by_term() -> Iterator[threading.Event]:
    """An event set when this process gets SIGTERM, for as long as the block runs."""
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGTERM, previous)


def promoted_by(run: Run, by_dir: dict[Path, Run]) -> list[Run]:
    """The runs of this invocation that the verdicts due after `run`'s attempts promote (the launcher is
    the job layer here: jobs/promote.py)."""
    prune = run.config.prune
    if prune is None or not prune.promote or not run.files.config.is_file():
        return []
    return [by_dir[path] for path in give_verdicts(run.run_dir)[PROMOTED] if path in by_dir]


def run_locally(
    run: Run, preempt_after: float | None, console: Console, live: LiveProgress, stopping: threading.Event
) -> str:
    """Both phases of one run; returns `done`, `pruned` (its evaluation never starts), `stopped` (the
    launcher was, `stopping`) or which phase failed. A pruned run is settled: it trains again only with
    `--resume-pruned`."""
    prune = run.config.prune
    promoted = prune is not None and own_verdict(run.run_dir, prune) == PROMOTED
    if pruned(run) and not (run.resume_pruned or promoted):
        return PRUNED
    write_run_config(run, live_code())
    for phase in run.phases:
        if phase_done(run, phase):
            continue
        if stopping.is_set():
            return STOPPED
        warn_after = preempt_after if phase == "pretrain" else None
        live.phase_started(run, phase)
        try:
            action = run_phase_locally(run, phase, warn_after, console, stopping)
        finally:
            live.phase_ended(run)
        if action == STOPPED:
            return STOPPED
        if action != "done":
            return PRUNED if pruned(run) else f"{phase} failed (see {run.files.local_logs / phase}.log)"
    return "done"


def run_phase_locally(
    run: Run, phase: str, warn_after: float | None, console: Console, stopping: threading.Event
) -> str:
    """Attempts of one phase until it is done or gives up, or `stopped` after an attempt that `stopping`
    ended (recorded as the preemption it was; the next launch resumes it); `warn_after` applies to the
    first attempt."""
    state_path = PHASES[phase].state_path(run.run_dir)
    resources = phase_resources(run, phase)
    ranks = local_ranks(run, phase)
    command = torchrun_command(PHASES[phase].module, run.files.config, ranks)
    env = threads_per_rank(min(resources.cpus_per_task, os.cpu_count() or 1), ranks)
    log = run.files.local_logs / f"{phase}.log"  # torchrun's output in local mode
    budget = Budget(resources.max_requeues, resources.max_failures)
    where = {"job_id": f"local-{now()}", "hosts": ["localhost"]}  # one submission: one budget
    while True:
        attempt = run_attempt(
            command, state_path, where, log, warn_after, env, stop_requested=stopping.is_set
        )
        action = finish_attempt(state_path, attempt, budget)
        console.print(
            f"{run.name} {phase}: {attempt['outcome']} at step {attempt['end_step']} -> {action}",
            highlight=False,
        )
        if action == "requeue" and stopping.is_set():
            return STOPPED
        if action != "requeue":
            return action
        warn_after = None


def local_ranks(run: Run, phase: str) -> int:
    """One node's worth of ranks: the GPUs asked for (when there are GPUs), else one CPU process."""
    return phase_resources(run, phase).ranks_per_node if torch.cuda.is_available() else 1


def run_debug(spec: SweepSpec, run: Run, reconfigure: bool = False) -> int:
    """Pretrain (and evaluate) one run in this process; on an exception, the debugger (or the traceback)."""
    with owning(spec, [run], reconfigure):
        return _debug(run)


def _debug(run: Run) -> int:
    from sogclr import lincls, pretrain  # the training library, in-process: no torchrun, one rank

    config = write_run_config(run, live_code())
    for phase in (config.pretrain, config.lincls):  # a debugger may hold a step as long as it likes
        if phase is not None:
            phase.progress_timeout_minutes = None
    try:
        status = pretrain.train(config)
        if status == "done" and config.lincls is not None:
            status = lincls.train(config)
    except Exception:
        if not sys.stdin.isatty():
            traceback.print_exc()
            return 1
        pdb.post_mortem(sys.exc_info()[2])
        return 1
    return 0 if status in ("done", PRUNED) else 1
