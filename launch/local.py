"""Local mode (`--local`): the sweep's runs on this machine, with the SLURM jobs' resume and requeue rules.

Progress shows live (launch/inspect/progress.py), and the closing table has each run's outcome and linear
top-1.

Each run uses its usual run directory; a preempted attempt is started again from its checkpoint (that is
the local requeue, counted against `max_requeues`), and linear evaluation follows a completed pretraining
(not a pruned one: a pruned run ends there, and is continued only with `--resume-pruned`).
`--preempt-after` rehearses preemption: SLURM's warning signal (USR2) to the training processes after
that many seconds of a run's first attempt. `--debug` runs one run in this process, single rank.
"""

from __future__ import annotations

import os
import pdb
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.table import Table

from jobs.attempt import PHASES, Budget, finish_attempt, run_attempt
from jobs.slurm_client import UNKNOWN
from jobs.torchrun import threads_per_rank, torchrun_command
from launch.configs import check_recipes, phase_resources, write_run_config
from launch.inspect.progress import LiveProgress
from launch.manifest import read_manifest, sweep_lock, write_manifest
from launch.snapshot import live_code
from launch.spec import Run, SpecError, SweepSpec
from launch.standing import PRUNED, phase_done, pruned, reconcile
from sogclr.contract.state import now, read_state


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

    with owning(spec, runs, reconfigure), LiveProgress(console, runs) as live:

        def one(run: Run) -> str:
            outcome = run_locally(run, preempt_after, console, live)
            console.print(f"{run.name}: {outcome}", highlight=False)
            return outcome

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            outcomes = list(pool.map(one, runs))
    table = Table(title=f"{spec.name}: local runs", title_justify="left")
    for column in ("run", "outcome", "linear top-1", "run directory"):
        table.add_column(column, overflow="fold")
    for run, outcome in zip(runs, outcomes, strict=True):
        top1 = read_state(run.files.lincls.result).get("top1")
        table.add_row(run.name, outcome, "-" if top1 is None else f"{top1:.2f}", str(run.run_dir))
    console.print(table)
    return 0 if all(outcome in ("done", PRUNED) for outcome in outcomes) else 1


def run_locally(run: Run, preempt_after: float | None, console: Console, live: LiveProgress) -> str:
    """Both phases of one run; returns `done`, `pruned` (its evaluation never starts) or which phase
    failed. A pruned run is settled: it trains again only with `--resume-pruned`."""
    if pruned(run) and not run.resume_pruned:
        return PRUNED
    write_run_config(run, live_code())
    for phase in run.phases:
        if phase_done(run, phase):
            continue
        warn_after = preempt_after if phase == "pretrain" else None
        live.phase_started(run, phase)
        try:
            action = run_phase_locally(run, phase, warn_after, console)
        finally:
            live.phase_ended(run)
        if action != "done":
            return PRUNED if pruned(run) else f"{phase} failed (see {run.files.local_logs / phase}.log)"
    return "done"


def run_phase_locally(run: Run, phase: str, warn_after: float | None, console: Console) -> str:
    """Attempts of one phase until it is done or gives up; `warn_after` applies to the first one."""
    state_path = PHASES[phase].state_path(run.run_dir)
    resources = phase_resources(run, phase)
    ranks = local_ranks(run, phase)
    command = torchrun_command(PHASES[phase].module, run.files.config, ranks)
    env = threads_per_rank(min(resources.cpus_per_task, os.cpu_count() or 1), ranks)
    log = run.files.local_logs / f"{phase}.log"  # torchrun's output in local mode
    budget = Budget(resources.max_requeues, resources.max_failures)
    where = {"job_id": f"local-{now()}", "hosts": ["localhost"]}  # one submission: one budget
    while True:
        attempt = run_attempt(command, state_path, where, log, warn_after, env)
        action = finish_attempt(state_path, attempt, budget)
        console.print(
            f"{run.name} {phase}: {attempt['outcome']} at step {attempt['end_step']} -> {action}",
            highlight=False,
        )
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
