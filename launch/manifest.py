"""A sweep's record of its SLURM jobs (`<sweep dir>/manifest.json`), its lock, and where each run stands.

The manifest maps run -> phase -> the submissions so far (job id, time, job name, cluster), the last one
current. Where a run stands is read from SLURM first (squeue, then sacct) and from the run directory when
SLURM has forgotten the job; `unknown` when SLURM could not be asked, and `not ours` when the id now names
another job (its JobName differs, or another cluster). Submission, status and cancel all use this one view.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.attempt import PHASES, close_unrecorded_attempt
from launch.spec import Run
from sogclr.state import read_state, write_json_atomic

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".submit.lock"
# SLURM states of a job that is still queued or may run again. Not `preempted`: a job SLURM requeues
# is PENDING again at once, so a job still PREEMPTED was not requeued (PreemptMode=CANCEL) and is over.
ACTIVE = frozenset(
    "pending running requeued requeue_hold requeue_fed configuring completing suspended resizing "
    "signaling stage_out".split()
)
NOT_SUBMITTED = "not submitted"
UNKNOWN = "unknown"  # SLURM could not be asked: neither live nor forgotten
NOT_OURS = "not ours"  # the id now names another job (a reset controller, another cluster)
QUERY_TIMEOUT_S = 60
# A pending job whose afterok can never be met (its pretraining failed or was cancelled) on a cluster
# without kill_invalid_depend: it will never run, and a resubmission replaces it.
NEVER_RUNS = "pending (dependency never satisfied)"


@contextmanager
def sweep_lock(directory: Path) -> Iterator[None]:
    """Hold the sweep's lock: two submissions of one sweep run one after the other, never interleaved."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_state(directory / MANIFEST_FILE) or {"runs": {}}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(directory / MANIFEST_FILE, manifest)


def record_job(
    manifest: dict[str, Any], run: str, phase: str, job_id: str, submitted: str, **about: str | None
) -> None:
    """Append a submission; `about` is what identifies the job later (`job_name`, `cluster`)."""
    manifest["runs"].setdefault(run, {}).setdefault(phase, []).append(
        {"job_id": job_id, "submitted": submitted, **about}
    )


def current_submission(manifest: dict[str, Any], run: str, phase: str) -> dict[str, Any] | None:
    submissions = manifest["runs"].get(run, {}).get(phase, [])
    return submissions[-1] if submissions else None


def current_job(manifest: dict[str, Any], run: str, phase: str) -> str | None:
    submission = current_submission(manifest, run, phase)
    return submission["job_id"] if submission else None


# --- SLURM's view -----------------------------------------------------------------------------------


class SlurmUnavailable(Exception):
    """SLURM could not be asked (a command failed or is missing): one line saying why."""


@dataclass(frozen=True)
class SlurmJob:
    """What SLURM says of one job id: its lower-case state and its name, or why it could not say."""

    state: str
    name: str | None = None
    reason: str | None = None  # why the state is `unknown`


def slurm_jobs(job_ids: list[str]) -> dict[str, SlurmJob]:
    """job id -> SlurmJob, from squeue, then sacct; ids SLURM has forgotten are absent. When a query
    fails, the ids it was to answer read `unknown`: a failing command is not a forgotten job."""
    jobs: dict[str, SlurmJob] = {}
    try:
        jobs = _query(["squeue", "-h", "-o", "%i|%T|%j|%r", "-j"], job_ids)
        forgotten = [job_id for job_id in job_ids if job_id not in jobs]
        jobs |= _query(["sacct", "-n", "-X", "-P", "-o", "JobIDRaw,State,JobName", "-j"], forgotten)
    except SlurmUnavailable as err:
        unknown = SlurmJob(UNKNOWN, reason=str(err))
        jobs = {job_id: jobs.get(job_id, unknown) for job_id in job_ids}
    return jobs


def _query(command: list[str], job_ids: list[str]) -> dict[str, SlurmJob]:
    if not job_ids:
        return {}
    result = slurm_output([*command, ",".join(job_ids)], ok_if="Invalid job id")
    jobs = {}
    for line in result.splitlines():
        job_id, state, name, *reason = [*line.split("|"), "", ""][:4]
        if job_id in job_ids and state:
            never = state == "PENDING" and reason == ["DependencyNeverSatisfied"]
            # "CANCELLED by 0" -> "cancelled"
            jobs[job_id] = SlurmJob(NEVER_RUNS if never else state.split()[0].lower(), _job_name(name))
    return jobs


def _job_name(name: str) -> str | None:
    """The job's name, or None where SLURM does not know it: accounting shows `allocation` for a while
    for a job cancelled just after it started (measured on 22.05), which says nothing about whose it is."""
    return None if name in ("", "allocation") else name


def slurm_output(command: list[str], ok_if: str | None = None) -> str:
    """stdout of a SLURM client command; SlurmUnavailable when it cannot run or fails (unless its
    error says `ok_if`: squeue fails when none of the ids is known any more, and that means none)."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmUnavailable(f"{command[0]}: {err}") from None
    if result.returncode != 0 and not (ok_if and ok_if in result.stderr):
        why = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise SlurmUnavailable(f"{command[0]} failed: {why}")
    return result.stdout


def cluster_name() -> str | None:
    """This cluster's ClusterName (scontrol show config); None when SLURM cannot say."""
    try:
        config = slurm_output(["scontrol", "show", "config"])
    except SlurmUnavailable:
        return None
    return next(
        (line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("ClusterName")),
        None,
    )


# --- where a run stands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseStanding:
    job_id: str | None
    state: str  # done | not submitted | unknown | not ours | a SLURM state | the run directory's status
    from_slurm: bool = False
    reason: str | None = None  # why `unknown` or `not ours`

    @property
    def active(self) -> bool:
        """Queued or running (a run directory that says `running` without a job is not)."""
        return self.from_slurm and self.state in ACTIVE


def phase_done(run: Run, phase: str) -> bool:
    if phase == "lincls":
        return run.files.lincls.result.is_file()
    return read_state(PHASES[phase].state_path(run.run_dir)).get("status") == "done"


def phase_standing(
    run: Run, phase: str, manifest: dict[str, Any], jobs: dict[str, SlurmJob], cluster: str | None = None
) -> PhaseStanding:
    submission = current_submission(manifest, run.name, phase)
    job_id = submission["job_id"] if submission else None
    if phase_done(run, phase):
        return PhaseStanding(job_id, "done")
    if submission is None:
        return PhaseStanding(None, NOT_SUBMITTED)
    job = jobs.get(job_id)
    if job is not None and job.state == UNKNOWN:
        return PhaseStanding(job_id, UNKNOWN, reason=job.reason)
    if (why := not_ours(submission, job, cluster)) is not None:
        return PhaseStanding(job_id, NOT_OURS, reason=why)
    if job is not None:
        return PhaseStanding(job_id, job.state, from_slurm=True)
    status = read_state(PHASES[phase].state_path(run.run_dir)).get("status", "unknown")
    return PhaseStanding(job_id, f"{status} (run dir)")


def not_ours(submission: dict[str, Any], job: SlurmJob | None, cluster: str | None) -> str | None:
    """Why the recorded id no longer names the job we submitted, or None if it may (records written
    before names were kept, or a cluster that cannot say its name, are taken as ours)."""
    recorded = submission.get("cluster")
    if recorded and cluster and recorded != cluster:
        return f"submitted on cluster {recorded}, this is {cluster}"
    expected = submission.get("job_name")
    if job is not None and job.name is not None and expected and job.name != expected:
        return f"job {submission['job_id']} is now {job.name!r}, not {expected!r}"
    return None


def standings(runs: list[Run], manifest: dict[str, Any]) -> dict[str, dict[str, PhaseStanding]]:
    """run -> phase -> standing, with one squeue and at most one sacct call for the whole sweep.

    A job that SLURM has ended for good while its run directory still shows an attempt in progress gets
    that attempt closed (`close_unrecorded_attempt`), so the run directory agrees with SLURM.
    """
    job_ids = [
        job_id for run in runs for phase in PHASES if (job_id := current_job(manifest, run.name, phase))
    ]
    jobs = slurm_jobs(job_ids)
    cluster = cluster_name() if job_ids else None
    where = {
        run.name: {phase: phase_standing(run, phase, manifest, jobs, cluster) for phase in PHASES}
        for run in runs
    }
    for run in runs:
        for phase, standing in where[run.name].items():
            if standing.from_slurm and standing.state not in ACTIVE and standing.state != "completed":
                close_unrecorded_attempt(PHASES[phase].state_path(run.run_dir), standing.state)
    return where
