"""A sweep's record of its SLURM jobs (`<sweep dir>/manifest.json`), its lock, and where each run stands.

The manifest maps run -> phase -> the submissions so far (job id, time, job name, cluster), the last one
current. Where a run stands is read from SLURM first (squeue, then sacct) and from the run directory when
SLURM has forgotten the job; `unknown` when SLURM could not be asked (or the job was submitted on another
cluster), and `not ours` when the id now names another job (its JobName differs). Submission, status and
cancel all use this one view.

Every sbatch is first recorded as pending, with a token that the job carries in its comment
(`--comment=sogclr:<token>`): when sbatch's reply is lost (the controller timed out after creating the
job, measured below), the job is found by its token instead of being submitted a second time.

Both phases of a run that the sweep's successive halving stopped read `pruned` from its run directory
(its job ended COMPLETED; its evaluation was cancelled, or in local mode never started), until a
`--resume-pruned` job of it is queued or runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.attempt import PHASES, close_unrecorded_attempt
from launch.spec import Run, SpecError
from sogclr.contract.state import now, read_state, write_json_atomic

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
NOT_OURS = "not ours"  # the id now names another job (a reset controller)
QUERY_TIMEOUT_S = 60
# A pending job whose afterok can never be met (its pretraining failed or was cancelled) on a cluster
# without kill_invalid_depend: it will never run, and a resubmission replaces it.
NEVER_RUNS = "pending (dependency never satisfied)"
# What sacct says on a cluster without accounting (no slurmdbd; measured on 22.05, exit status 1): the
# controller's view is then all there is, and a job squeue has forgotten is read from its run directory.
NO_ACCOUNTING = "accounting storage is disabled"
# A job's comment carries the token of the submission that made it (see `find_submissions`).
TOKEN_PREFIX = "sogclr:"


# The sweep directories whose lock this process holds (flock is per open file: opening it again here
# would wait for ourselves).
_held: set[Path] = set()


@contextmanager
def sweep_lock(directory: Path) -> Iterator[None]:
    """Hold the sweep's lock: two submissions of one sweep run one after the other, never interleaved.
    Says who holds it while waiting. Everything written meanwhile (by this process, and by the jobs it
    submits, which inherit its umask) is closed to writes by group and others (`private_umask`)."""
    private_directory(directory)
    with private_umask(), open(directory / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another sogclr-submit"
            print(f"waiting for the sweep's lock {directory / LOCK_FILE}: held by {holder}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:  # a file system mounted without locks (Lustre `noflock`: ENOSYS)
            raise SpecError(
                f"output_root: {directory} is on a file system without file locks ({err.strerror}); "
                "put output_root on one that has them"
            ) from None
        lock.truncate(0)
        lock.write(f"{socket.gethostname()}:{os.getpid()} since {now()}\n")
        lock.flush()
        _held.add(directory.resolve())
        try:
            yield
        finally:
            _held.discard(directory.resolve())


@contextmanager
def lock_if_free(directory: Path) -> Iterator[bool]:
    """The sweep's lock if this process holds it or can take it at once: True inside. False when
    another process holds it (a submission, a --local run: it closes what it finds itself) or the
    sweep cannot be written (a colleague's): the caller then writes nothing."""
    if directory.resolve() in _held:
        yield True
        return
    try:
        lock = open(directory / LOCK_FILE, "a")
    except OSError:  # read-only, or not ours
        yield False
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


def private_directory(directory: Path) -> None:
    """Make the sweep directory (0750), or refuse it unless only its owner can change what its jobs run:
    it must be this user's and not writable by group or others, and no directory above it may let anyone
    else rename it away and put another in its place (which queued jobs would then run as this user)."""
    with private_umask():
        directory.parent.mkdir(parents=True, exist_ok=True)
    if (unsafe := unsafe_parent(directory)) is not None:
        parent, why = unsafe
        raise SpecError(
            f"output_root: {parent}, above the sweep directory, {why}: another user could rename the sweep "
            "directory away and put one of theirs in its place, whose code your queued jobs would run; "
            f"chmod +t {parent} (as shared /tmp is), or choose an output_root whose parents only root and "
            "you can change"
        )
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o750)
    status = directory.stat()
    if status.st_uid != os.getuid():
        raise SpecError(
            f"output_root: the sweep directory {directory} belongs to uid {status.st_uid}, not to you "
            f"({os.getuid()}): its code, scripts and configs are not yours to run"
        )
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SpecError(
            f"output_root: the sweep directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(status.st_mode):o}): they could change what its jobs run; chmod go-w it"
        )


def unsafe_parent(directory: Path) -> tuple[Path, str] | None:
    """The first directory above `directory` (resolved) through which someone other than root or this
    user could replace it, and why; None if there is none. As OpenSSH's safe_path (misc.c) checks the path
    of a key file: each parent up to / owned by root or the user and not writable by group or others,
    but here a sticky one may be writable (only an entry's owner may rename it: /tmp, shared scratch)."""
    for parent in Path(os.path.realpath(directory)).parents:
        status = parent.stat()
        if status.st_uid not in (0, os.getuid()):
            return parent, f"belongs to uid {status.st_uid}"
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not status.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(status.st_mode)
            return parent, f"is writable by group or others without the sticky bit (mode {mode:o})"
    return None


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories made meanwhile are not writable by group or others, nor readable by others."""
    previous = os.umask(0o027)
    os.umask(previous | 0o027)
    try:
        yield
    finally:
        os.umask(previous)


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


def new_token() -> str:
    return secrets.token_hex(8)


def add_pending(manifest: dict[str, Any], token: str, phase: str, runs: list[str], **about: Any) -> None:
    """Note an sbatch about to be made: its token, its phase and runs (in array task order), and what
    identifies it (`job_name`, `cluster`, `array`, `submitted`); kept until its job id is known."""
    manifest.setdefault("pending", []).append({"token": token, "phase": phase, "runs": runs, **about})


def settle_pending(manifest: dict[str, Any], token: str, job_id: str | None) -> None:
    """The pending sbatch `token` made job `job_id` (an array: task i is its i-th run; `indices` when it
    has other task indices), or none: record its ids, and forget the pending entry."""
    pending = next(entry for entry in manifest.get("pending", []) if entry["token"] == token)
    manifest["pending"].remove(pending)
    if job_id is None:
        return
    about = {"job_name": pending.get("job_name"), "cluster": pending.get("cluster")}
    indices = pending.get("indices") or range(len(pending["runs"]))
    for index, run in zip(indices, pending["runs"], strict=True):
        task = f"{job_id}_{index}" if pending.get("array") else job_id
        record_job(manifest, run, pending["phase"], task, pending["submitted"], **about)


def find_submissions(pending: list[dict[str, Any]]) -> dict[str, str]:
    """token -> job id (an array's id) of the pending submissions SLURM has a job for: one squeue of our
    own jobs with those names, any state, matched by the token in their comment. SlurmUnavailable when
    squeue fails. sacct cannot help: it keeps no comment unless AccountingStoreFlags=job_comment, and
    `sacct --name` leaves out a job that never started (both measured on 22.05)."""
    names = sorted({entry["job_name"] for entry in pending})
    command = ["squeue", "--me", "-h", "-t", "all", "-o", "%F|%k", "--name", ",".join(names)]
    found = {}
    for line in slurm_output(command).splitlines():
        job_id, _, comment = line.partition("|")
        if comment.startswith(TOKEN_PREFIX):
            found[comment.removeprefix(TOKEN_PREFIX).strip()] = job_id.strip()
    return found


def resolve_pending(manifest: dict[str, Any]) -> dict[str, str]:
    """Settle the sbatch calls whose reply was lost (see `settle_pending`): a job SLURM has is recorded,
    one it has not was never made (or has ended and been forgotten: it runs no more either way). Returns
    {token: why} for those SLURM could not be asked about; they stay pending, and their runs `unknown`."""
    pending = manifest.get("pending", [])
    if not pending:
        return {}
    try:
        found = find_submissions(pending)
    except SlurmUnavailable as err:
        return {entry["token"]: str(err) for entry in pending}
    for entry in list(pending):
        settle_pending(manifest, entry["token"], found.get(entry["token"]))
    return {}


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
        accounted = _records(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State,JobName", "-j"], forgotten, NO_ACCOUNTING
        )
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


def _records(
    command: list[str], job_ids: list[str], none_if: str = "Invalid job id"
) -> list[tuple[str, SlurmJob]]:
    """(JobID as listed, SlurmJob) for each line of squeue's or sacct's answer about `job_ids`; none
    when the command fails saying `none_if` (squeue: none of the ids is known any more; sacct: there is
    no accounting, so the jobs squeue has forgotten are known nowhere)."""
    if not job_ids:
        return []
    asked = sorted({job_id.partition("_")[0] for job_id in job_ids})  # a job, or the array of a task
    result = slurm_output([*command, ",".join(asked)], ok_if=none_if)
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
    run: Run,
    phase: str,
    manifest: dict[str, Any],
    jobs: dict[str, SlurmJob],
    cluster: str | None = None,
    unconfirmed: dict[tuple[str, str], str] | None = None,
) -> PhaseStanding:
    """Where one phase stands; `unconfirmed`: (run, phase) -> why, for an sbatch whose reply was lost
    and that SLURM could not be asked about (`resolve_pending`)."""
    submission = current_submission(manifest, run.name, phase)
    job_id = submission["job_id"] if submission else None
    if phase_done(run, phase):
        return PhaseStanding(job_id, "done")
    if (why := (unconfirmed or {}).get((run.name, phase))) is not None:
        return PhaseStanding(job_id, UNKNOWN, reason=why)
    job = jobs.get(job_id) if job_id else None
    if job is not None and job.state == UNKNOWN:  # (a --resume-pruned job of a pruned run may be running)
        return PhaseStanding(job_id, UNKNOWN, reason=job.reason)
    if submission is not None and (why := other_cluster(submission, cluster)) is not None:
        return PhaseStanding(job_id, UNKNOWN, reason=why)  # it may be running there: never act on it
    if pruned(run) and not (job is not None and job.state in ACTIVE):  # not yet resumed (--resume-pruned)
        return PhaseStanding(job_id, PRUNED)
    if submission is None:
        return PhaseStanding(None, NOT_SUBMITTED)
    if (why := not_ours(submission, job)) is not None:
        return PhaseStanding(job_id, NOT_OURS, reason=why)
    if job is not None:
        return PhaseStanding(job_id, job.state, from_slurm=True)
    status = read_state(PHASES[phase].state_path(run.run_dir)).get("status", "never ran")
    return PhaseStanding(job_id, f"{status} (run dir)")


def other_cluster(submission: dict[str, Any], cluster: str | None) -> str | None:
    """Why the job is not this cluster's to ask about, or None (also when a cluster cannot say its
    name): a job on another cluster sharing the file system may be training in the run directory."""
    recorded = submission.get("cluster")
    if recorded and cluster and recorded != cluster:
        return f"submitted on cluster {recorded}, this is {cluster}: ask there"
    return None


def not_ours(submission: dict[str, Any], job: SlurmJob | None) -> str | None:
    """Why the recorded id no longer names the job we submitted, or None if it may (records written
    before names were kept are taken as ours)."""
    expected = submission.get("job_name")
    if job is not None and job.name is not None and expected and job.name != expected:
        return f"job {submission['job_id']} is now {job.name!r}, not {expected!r}"
    return None


def standings(runs: list[Run], manifest: dict[str, Any]) -> dict[str, dict[str, PhaseStanding]]:
    """run -> phase -> standing, with one squeue and at most one sacct call for the whole sweep (and
    one squeue more while an sbatch whose reply was lost is pending: `resolve_pending`, which records
    what it finds in `manifest`; a caller holding the sweep's lock writes it).

    A job that SLURM has ended for good while its run directory still shows an attempt in progress gets
    that attempt closed (`close_unrecorded_attempt`), so the run directory agrees with SLURM: under the
    sweep's lock, and only when it is free or ours (`lock_if_free`); else a later command closes it.
    """
    lost = resolve_pending(manifest)
    unconfirmed = {
        (run, entry["phase"]): f"an sbatch's reply was lost, and whether it made the job: {why}"
        for entry in manifest.get("pending", [])
        if (why := lost.get(entry["token"])) is not None
        for run in entry["runs"]
    }
    job_ids = [
        job_id for run in runs for phase in PHASES if (job_id := current_job(manifest, run.name, phase))
    ]
    jobs = slurm_jobs(job_ids)
    cluster = cluster_name() if job_ids else None
    where = {
        run.name: {
            phase: phase_standing(run, phase, manifest, jobs, cluster, unconfirmed) for phase in PHASES
        }
        for run in runs
    }
    ended = [
        (run, phase, standing.state)
        for run in runs
        for phase, standing in where[run.name].items()
        if standing.from_slurm and standing.state not in ACTIVE and standing.state != "completed"
    ]
    # under the lock: two commands at once would both append the attempt (runs of a sweep share its dir)
    if ended:
        with lock_if_free(ended[0][0].run_dir.parent) as locked:
            if locked:
                for run, phase, slurm_state in ended:
                    close_unrecorded_attempt(PHASES[phase].state_path(run.run_dir), slurm_state)
    return where
