"""The one SLURM client: every sbatch, squeue, sacct, scontrol and scancel call of the project, and its
parser. The login node (launch/) and the job tasks (jobs/) both call SLURM only through here.

One policy for every call:

- it waits at most TIMEOUT_S. A controller that does not answer makes the client commands fail by
  themselves after MessageTimeout (10 s by default: sbatch, squeue and scancel measured on 22.05 under a
  SIGSTOPped slurmctld; scancel exits 140, "Socket timed out"), so the limit only bounds a client that
  hangs in some other way (a stuck munge socket, a dead NFS home);
- a failure raises SlurmError, one line naming the command and what it said; a message that is an answer
  is not a failure (`ok_if`: squeue's "Invalid job id" when none of the ids is known any more, sacct's
  "accounting storage is disabled", scontrol requeue's "Job is pending execution");
- `attempts` > 1 tries again after 1, 2, 4, ... s (for the idempotent calls only: queries, a requeue),
  saying so on stderr, which is the job's log inside a job;
- every call is counted in CALLS, and appended as `COMMAND BYTES-OF-ANSWER` to the file that
  SOGCLR_SLURM_CALL_LOG names, so that a benchmark counts the calls of other processes (the job tasks).

What each command answers, and how it is read, is written beside its function.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 30
CALL_LOG_ENV = "SOGCLR_SLURM_CALL_LOG"
CALLS: Counter[str] = Counter()

# States the parsers give beside SLURM's own (lower-cased) ones.
UNKNOWN = "unknown"  # SLURM could not be asked: neither live nor forgotten
# A pending job whose afterok can never be met (its pretraining failed or was cancelled) on a cluster
# without kill_invalid_depend: it will never run.
NEVER_RUNS = "pending (dependency never satisfied)"
# What sacct says on a cluster without accounting (no slurmdbd; measured on 22.05, exit status 1): the
# controller's view is then all there is.
NO_ACCOUNTING = "accounting storage is disabled"
# squeue -j on ids none of which the controller knows any more (exit status 1).
NONE_KNOWN = "Invalid job id"
# scontrol requeue of a job SLURM has already requeued.
ALREADY_REQUEUED = "pending execution"
# scontrol show job's Reason of a job requeued held (scontrol requeuehold), until released.
HELD_REASON = "job_requeued_in_held_state"
_JOB_ID = re.compile(r"\d+")  # what `sbatch --parsable` prints first (then `;cluster` on a federation)


class SlurmError(Exception):
    """A SLURM command could not run or failed: one line naming it and why."""


def call(args: Sequence[str], ok_if: str | None = None, attempts: int = 1) -> str:
    """stdout of the SLURM command `args`, under the policy above; SlurmError after `attempts` failures."""
    pause = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return _once(args, ok_if)
        except SlurmError as error:
            if attempt == attempts:
                raise
            print(f"slurm: {error}; again in {pause:.0f} s", file=sys.stderr, flush=True)
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def _once(args: Sequence[str], ok_if: str | None) -> str:
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        _count(args[0], 0)
        raise SlurmError(f"{_name(args)}: {error}") from None
    _count(args[0], len(result.stdout))
    if result.returncode != 0 and not (ok_if and ok_if in result.stderr):
        why = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise SlurmError(f"{_name(args)} failed: {why}")
    return result.stdout


def _name(args: Sequence[str]) -> str:
    """How an error names the command: scontrol with its subcommand (`scontrol requeue`)."""
    return " ".join(args[:2]) if args[0] == "scontrol" else args[0]


def _count(command: str, size: int) -> None:
    CALLS[command] += 1
    if log := os.environ.get(CALL_LOG_ENV):
        with open(log, "a") as f:
            f.write(f"{command} {size}\n")


# --- submitting and ending jobs ----------------------------------------------------------------------


def sbatch(script: Path, comment: str) -> str:
    """Submit the batch script `script` with `--comment=comment`; the job id (an array's id). Never tried
    twice here: a lost reply may still have made the job (the launcher looks it up by its comment)."""
    out = call(["sbatch", "--parsable", f"--comment={comment}", str(script)])
    job_id = out.strip().split(";")[0]
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id")
    return job_id


def scancel(job_ids: Sequence[str]) -> dict[str, str]:
    """scancel `job_ids` in one call; {job id: why} for those it could not cancel. Measured on 22.05: a job
    that ended meanwhile is no failure (exit status 0; `already completing or completed`); a controller
    that does not answer fails each job (`Socket timed out`, exit status 140), as does a missing command
    (then every id, with why)."""
    if not job_ids:
        return {}
    try:
        result = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        _count("scancel", 0)
        return dict.fromkeys(job_ids, f"scancel: {error}")
    _count("scancel", len(result.stdout))
    failed: dict[str, str] = {}
    for line in result.stderr.splitlines():
        if "already completing or completed" in line:
            continue  # it ended meanwhile (its node 0, or kill_invalid_depend, got there first)
        named = [job_id for job_id in job_ids if f"job id {job_id}:" in line]
        failed.update(dict.fromkeys(named or job_ids, line.strip()))
    if result.returncode != 0 and not failed:
        failed = dict.fromkeys(job_ids, f"scancel failed: exit status {result.returncode}")
    return failed


def requeue(job_id: str, attempts: int) -> None:
    """`scontrol requeue job_id`; also done when SLURM has already requeued it. SlurmError otherwise."""
    call(["scontrol", "requeue", job_id], ok_if=ALREADY_REQUEUED, attempts=attempts)


def requeue_held(job_id: str) -> None:
    """`scontrol requeuehold job_id`: back to pending, held until released. Measured on 22.05 from inside
    the job itself: exit status 0, and the job's processes get SIGTERM within 15 ms ("CANCELLED DUE TO
    JOB REQUEUE"); then PENDING, Reason `job_requeued_in_held_state` (HELD_REASON), Restarts + 1, and a
    job waiting on it with afterok stays pending for as long as it is held."""
    call(["scontrol", "requeuehold", job_id])


def release(job_id: str) -> None:
    """`scontrol release job_id`: a held job may run (SLURM_RESTART_COUNT as after a requeue). Measured on
    22.05: exit status 0 also for a job that is RUNNING, where it does nothing."""
    call(["scontrol", "release", job_id], attempts=3)


# --- one job, from inside it -------------------------------------------------------------------------


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list (`n[1-2]` -> n1, n2)."""
    return call(["scontrol", "show", "hostnames", nodelist], attempts=3).split()


def job_fields(job_id: str, attempts: int) -> dict[str, str]:
    """`scontrol show job -o` as KEY -> value; {} when the controller does not answer `attempts` times."""
    try:
        return scontrol_fields(call(["scontrol", "show", "job", "-o", job_id], attempts=attempts))
    except SlurmError:
        return {}


def scontrol_fields(line: str) -> dict[str, str]:
    """One record of `scontrol show ... -o` (KEY=value KEY=value ...) as KEY -> value."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def accounted_state(job_id: str, attempts: int = 3) -> str | None:
    """The job's State in accounting (`sacct`: CANCELLED, PREEMPTED, ...; "CANCELLED by 0" -> CANCELLED),
    which slurmdbd keeps apart from the controller: it answers while slurmctld does not (measured, 22.05,
    slurmctld stopped). Asked again while it still says the job runs (it may lag); None without an
    answer or without accounting."""
    for attempt in range(attempts):
        try:
            words = call(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id]).split()
        except SlurmError:
            words = []
        if words and words[0] not in ("RUNNING", "PENDING"):
            return words[0]
        if attempt < attempts - 1:
            time.sleep(2**attempt)
    return None


def pending_dependencies(attempts: int = 3) -> list[tuple[str, str]]:
    """(job id, dependency) of each of our own pending jobs, each array task on its own (`--me -r`):
    where a job's dependents are found without reading the whole queue."""
    out = call(["squeue", "--me", "-r", "-h", "-t", "PD", "-o", "%i|%E"], attempts=attempts)
    return [
        (job_id, dependency) for job_id, _, dependency in (line.partition("|") for line in out.splitlines())
    ]


# --- the controller ----------------------------------------------------------------------------------


def controller_setting(key: str) -> str | None:
    """One setting of `scontrol show config` (ClusterName, MaxArraySize); None when SLURM cannot say."""
    try:
        config = call(["scontrol", "show", "config"])
    except SlurmError:
        return None
    return next(
        (value.strip() for name, _, value in (line.partition("=") for line in config.splitlines())
         if name.strip() == key),
        None,
    )  # fmt: skip


def tmp_disks_mb(partition: str | None) -> list[int]:
    """The TmpDisk (MB: the size of TmpFS, /tmp unless slurm.conf says otherwise) of each node of
    `partition` (every node if None), as `sinfo -N -o %d` prints it, one node a line; [] when SLURM cannot
    say. 0 is what a node without a TmpDisk setting reports (measured on 22.05)."""
    try:
        answer = call(["sinfo", "-h", "-N", "-o", "%d", *(["-p", partition] if partition else [])])
    except SlurmError:
        return []
    return [int(field) for field in answer.split() if field.isdigit()]


def cluster_name() -> str | None:
    """This cluster's ClusterName; None when SLURM cannot say."""
    return controller_setting("ClusterName")


def partition_grace_times() -> dict[str | None, int]:
    """Partition -> GraceTime in seconds, for partitions that preempt (key None: the default one); {}
    when SLURM cannot say."""
    try:
        partitions = call(["scontrol", "show", "partition", "-o"])
    except SlurmError:
        return {}
    grace: dict[str | None, int] = {}
    for line in partitions.splitlines():
        fields = scontrol_fields(line)
        if fields.get("PreemptMode", "OFF").upper() == "OFF" or not fields.get("GraceTime", "").isdigit():
            continue
        grace[fields["PartitionName"]] = int(fields["GraceTime"])
        if fields.get("Default") == "YES":
            grace[None] = int(fields["GraceTime"])
    return grace


# --- many jobs, from the login node ------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmJob:
    """What SLURM says of one job id: its lower-case state and its name, or why it could not say."""

    state: str
    name: str | None = None
    reason: str | None = None  # why the state is `unknown`


def jobs_with_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """(job id, comment) of our own jobs with any of these names, in any state: one squeue. sacct cannot
    help: it keeps no comment unless AccountingStoreFlags=job_comment, and `sacct --name` leaves out a
    job that never started (both measured on 22.05)."""
    out = call(["squeue", "--me", "-h", "-t", "all", "-o", "%F|%k", "--name", ",".join(sorted(set(names)))])
    return [
        (job_id.strip(), comment.strip())
        for job_id, _, comment in (line.partition("|") for line in out.splitlines())
    ]


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
        live = dict(
            _records(["squeue", "-r", "-t", "all", "-h", "-o", "%i|%T|%j|%r", "-j"], job_ids, NONE_KNOWN)
        )
        jobs = {job_id: live[job_id] for job_id in job_ids if job_id in live}
        forgotten = [job_id for job_id in job_ids if job_id not in live]
        accounted = _records(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State,JobName", "-j"], forgotten, NO_ACCOUNTING
        )
    except SlurmError as err:
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


def _records(command: list[str], job_ids: list[str], none_if: str) -> list[tuple[str, SlurmJob]]:
    """(JobID as listed, SlurmJob) for each line of squeue's or sacct's answer about `job_ids`; none
    when the command fails saying `none_if` (squeue: none of the ids is known any more; sacct: there is
    no accounting, so the jobs squeue has forgotten are known nowhere)."""
    if not job_ids:
        return []
    asked = sorted({job_id.partition("_")[0] for job_id in job_ids})  # a job, or the array of a task
    records = []
    for line in call([*command, ",".join(asked)], ok_if=none_if).splitlines():
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
