"""`sogclr-submit cancel`: scancel this sweep's queued and running jobs, and nothing else."""

from __future__ import annotations

from rich.console import Console

from jobs import slurm_client
from jobs.slurm_client import NEVER_RUNS, UNKNOWN
from launch.inspect.status import shown
from launch.manifest import read_manifest
from launch.spec import Run, SweepSpec
from launch.standing import NOT_OURS, reconcile


def cancel(spec: SweepSpec, runs: list[Run], console: Console) -> int:
    """scancel the recorded, still queued or running jobs of `runs` (and nothing else), evaluations that
    can never run included. Jobs SLURM cannot say anything about, and ids that now name other jobs, are
    left alone and listed; 1 if any is unknown or scancel failed."""
    where = reconcile(runs, read_manifest(spec.directory))
    targets, untouched = {}, []
    for run in runs:
        for phase, standing in where[run.name].items():
            # also a job that waits on a dependency that can never be met (no kill_invalid_depend): it
            # would stay in the queue for ever
            if standing.active or (standing.from_slurm and standing.state == NEVER_RUNS):
                targets[standing.job_id] = f"{run.name} {phase}"
            elif standing.state in (UNKNOWN, NOT_OURS):
                untouched.append(
                    f"job {standing.job_id} ({run.name} {phase}) not cancelled: {shown(standing)}"
                )
    for line in untouched:
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    failed = scancel(list(targets), console)
    if not targets and not untouched:
        console.print(f"{spec.name}: no queued or running jobs to cancel")
    for job_id, what in targets.items():
        if job_id not in failed:
            console.print(f"cancelled job {job_id} ({what})", highlight=False)
    unknown = any(standing.state == UNKNOWN for phases in where.values() for standing in phases.values())
    return int(unknown or bool(failed))


def scancel(job_ids: list[str], console: Console) -> set[str]:
    """scancel `job_ids`; the ids it could not cancel, with SLURM's errors printed
    (`slurm_client.scancel`)."""
    failed = slurm_client.scancel(job_ids)
    for why in dict.fromkeys(failed.values()):
        console.print(f"[yellow]warning:[/] {why}", highlight=False)
    return set(failed)
