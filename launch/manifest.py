"""A sweep's record of its SLURM jobs (`<sweep dir>/manifest.json`), its lock, and where each run stands.

The manifest maps run -> phase -> the submissions so far (job id, time, job name, cluster), the last one
current. Where a run stands is read from SLURM first (squeue, then sacct) and from the run directory when
SLURM has forgotten the job; `unknown` when SLURM could not be asked, and `not ours` when the id now names
another job (its JobName differs, or another cluster). Submission, status and cancel all use this one view.

Both phases of a run that the sweep's successive halving stopped read `pruned` from its run directory
(its job ended COMPLETED; its evaluation was cancelled, or in local mode never started), until a
`--resume-pruned` job of it is queued or runs.
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
PRUNED = "pruned"  # stopped at a rung by the sweep's successive halving: settled, like done
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
    fails, the ids it was to answer read `unknown`: a failing command is not a forgotten job.

    Array tasks (`A_i`) are asked by their array, and squeue lists each task on its own (`-r`). A task
    cancelled while still pending inside its array's record vanishes (measured, 22.05): squeue lists it
    no more, and sacct only has the array's record of its pending tasks, which still says PENDING.
    A task missing from an array the controller still lists is therefore read as cancelled.
    """
    jobs: dict[str, SlurmJob] = {}
    try:
        live = dict(_records(["squeue", "-r", "-t", "all", "-h", "-o", "%i|%T|%j|%r", "-j"], job_ids))
        jobs = {job_id: live[job_id] for job_id in job_ids if job_id in live}
        forgotten = [job_id for job_id in job_ids if job_id not in live]
        accounted = _records(["sacct", "-n", "-X", "-P", "-o", "JobID,State,JobName", "-j"], forgotten)
    except SlurmUnavailable as err:
        unknown = SlurmJob(UNKNOWN, reason=str(err))
        return {job_id: jobs.get(job_id, unknown) for job_id in job_ids}
    own = {record: job for record, job in accounted if "[" not in record}
    in_pending_record = {task: job for record, job in accounted if "[" in record for task in task_ids(record)}
    listed_arrays = {job_id.partition("_")[0] for job_id in live if "_" in job_id}
    for job_id in forgotten:
        array, _, task = job_id.partition("_")
        if job_id in own:
            jobs[job_id] = own[job_id]
        elif task and array in listed_arrays:
            jobs[job_id] = SlurmJob("cancelled")
        elif job_id in in_pending_record:
            jobs[job_id] = in_pending_record[job_id]
    return jobs


def _records(command: list[str], job_ids: list[str]) -> list[tuple[str, SlurmJob]]:
    """(JobID as listed, SlurmJob) for each line of squeue's or sacct's answer about `job_ids`."""
    if not job_ids:
        return []
    asked = sorted({job_id.partition("_")[0] for job_id in job_ids})  # a job, or the array of a task
    result = slurm_output([*command, ",".join(asked)], ok_if="Invalid job id")
    records = []
    for line in result.splitlines():
        record, state, name, *reason = [*line.split("|"), "", ""][:4]
        if state:
            never = state == "PENDING" and reason == ["DependencyNeverSatisfied"]
            # "CANCELLED by 0" -> "cancelled"
            records.append(
                (record, SlurmJob(NEVER_RUNS if never else state.split()[0].lower(), _job_name(name)))
            )
    return records


def task_ids(record: str) -> list[str]:
    """The ids a squeue/sacct JobID stands for: `12`, `12_3`, or a range of tasks `12_[0-3,7%2]`."""
    array, _, tasks = record.partition("_")
    if not tasks.startswith("["):
        return [record]
    ids = []
    for part in tasks.strip("[]").partition("%")[0].split(","):
        first, _, last = part.partition("-")
        ids += [f"{array}_{index}" for index in range(int(first), int(last or first) + 1)]
    return ids


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


def controller_setting(key: str) -> str | None:
    """One setting of `scontrol show config` (ClusterName, MaxArraySize); None when SLURM cannot say."""
    try:
        config = slurm_output(["scontrol", "show", "config"])
    except SlurmUnavailable:
        return None
    return next(
        (value.strip() for name, _, value in (line.partition("=") for line in config.splitlines())
         if name.strip() == key),
        None,
    )  # fmt: skip


def cluster_name() -> str | None:
    """This cluster's ClusterName; None when SLURM cannot say."""
    return controller_setting("ClusterName")


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


def pruned(run: Run) -> bool:
    """Whether the sweep's successive halving stopped the run (and it has not been continued since)."""
    return read_state(run.files.pretrain.state).get("status") == PRUNED


def continued_after_pruning(run: Run) -> bool:
    """Whether the run was pruned once and continued since (`--resume-pruned`): it is never pruned again,
    also when a later submission resumes it after an interruption."""
    state = read_state(run.files.pretrain.state)
    return "pruned" in state and state.get("status") != PRUNED


def phase_standing(
    run: Run, phase: str, manifest: dict[str, Any], jobs: dict[str, SlurmJob], cluster: str | None = None
) -> PhaseStanding:
    submission = current_submission(manifest, run.name, phase)
    job_id = submission["job_id"] if submission else None
    if phase_done(run, phase):
        return PhaseStanding(job_id, "done")
    job = jobs.get(job_id) if job_id else None
    if job is not None and job.state == UNKNOWN:  # a --resume-pruned job may be running: unknown
        return PhaseStanding(job_id, UNKNOWN, reason=job.reason)
    if pruned(run) and not (job is not None and job.state in ACTIVE):  # not yet resumed (--resume-pruned)
        return PhaseStanding(job_id, PRUNED)
    if submission is None:
        return PhaseStanding(None, NOT_SUBMITTED)
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
