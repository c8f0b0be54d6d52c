"""The job function (jobs/single.py, jobs/array.py): one task per node starts torchrun, then node 0
decides for the job.

SLURM signals every process of the job step (USR2 before the time limit; TERM on preemption or cancel),
so the trainers receive the signal themselves. torchrun runs with both ignored, and this process installs
handlers that note the signal and keep telling the trainers until they have stopped (see `wait_for`);
until then it ignores both (launch/scripts.py starts it so), since an unhandled USR2 would kill it.

After torchrun exits, node 0 reads the phase's state.json. Why the trainers stopped, and what to do
about it, is decided by jobs/stop.py from SLURM's own view of the job (asked from inside it, never
guessed from elapsed time), at the signal and again after the trainers exit: preempted (requeued by
node 0, or already by SLURM), a time-limit warning (requeued by node 0), or a cancel (never requeued).

A requeue keeps the job id and run directory, so `afterok` dependents still wait. `scontrol requeue`
is retried with backoff for REQUEUE_WINDOW_S (a busy controller answers "Socket timed out"); if it
still fails, state.json says so, the dependents are cancelled and the job fails. An array task is
addressed as `ARRAYJOBID_TASKID` in every SLURM command: its own numeric id may equal the array's id (the
last task keeps it), and that id names the whole array to scontrol and scancel. Transient failures
(a rank killed, a peer lost) are requeued within `max_failures`; a failure in training code raises, so
the job ends FAILED. When the run ends without completing, node 0 also cancels the jobs waiting on it
(its evaluation), which would otherwise stay pending for ever on a cluster without kill_invalid_depend;
after a cancel it does so as soon as the signal arrives, since KillWait may end it before the trainers.
It looks for them among the user's own pending jobs only (`squeue --me`), never the whole queue.
Other nodes run their torchrun and report; they never fail the job themselves (node 0 decides).
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from jobs import slurm_client
from jobs.attempt import PHASES, Budget, finish_attempt, run_attempt, wait_for
from jobs.code import running_code
from jobs.stop import Seen, Stop, decide
from jobs.torchrun import (
    Rendezvous,
    rendezvous_port,
    start_ignoring_stop_signals,
    threads_per_rank,
    torchrun_command,
)
from sogclr.contract.layout import RunLayout
from sogclr.contract.state import read_state, update_state

# How often node 0 tries `scontrol requeue` (pauses of 1, 2, 4, 8 s between; each try waits up to
# MessageTimeout, 10 s by default): about a minute, within a grace time or a signal lead of a minute or
# more. A controller that stays silent longer fails the job loudly.
REQUEUE_ATTEMPTS = 5


class JobFailed(RuntimeError):
    """The phase failed or gave up; raising it makes the SLURM job FAILED."""


@dataclass(frozen=True)
class SlurmTask:
    """This node's place in the allocation, from SLURM's environment."""

    job_id: int  # SLURM_JOB_ID: unique, also for an array task, and kept across requeues
    node_rank: int
    hosts: list[str]
    restart_count: int
    array_task: str | None = None  # `ARRAYJOBID_TASKID` under a job array

    @classmethod
    def from_environ(cls) -> SlurmTask:
        nodelist = os.environ["SLURM_JOB_NODELIST"]
        return cls(
            job_id=int(os.environ["SLURM_JOB_ID"]),
            node_rank=int(os.environ["SLURM_NODEID"]),
            hosts=slurm_client.hostnames(nodelist),
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            array_task=_array_task(),
        )

    @property
    def slurm_id(self) -> str:
        """The id that names this job (or array task) alone to scontrol, scancel, squeue and sacct."""
        return self.array_task or str(self.job_id)

    def rendezvous(self) -> Rendezvous:
        return Rendezvous(self.hosts[0], rendezvous_port(self.job_id), str(self.job_id))


def _array_task() -> str | None:
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else None


@dataclass(frozen=True)
class TrainingJob:
    """Picklable job function of one phase (`pretrain` or `lincls`) of the run in `run_dir`."""

    phase: str
    run_dir: Path
    nodes: int
    ranks_per_node: int
    cpus_per_task: int
    max_requeues: int
    max_failures: int = 3

    def command(self, task: SlurmTask) -> list[str]:
        return torchrun_command(
            PHASES[self.phase].module,
            RunLayout(self.run_dir).config,
            self.ranks_per_node,
            self.nodes,
            task.node_rank,
            task.rendezvous() if self.nodes > 1 else None,
        )

    def env(self) -> dict[str, str]:
        return threads_per_rank(self.cpus_per_task, self.ranks_per_node)

    def __call__(self) -> dict[str, Any]:
        stop = StopNote.install()
        task = SlurmTask.from_environ()
        if task.node_rank != 0:
            return self._follow(task, stop)
        state_path = PHASES[self.phase].state_path(self.run_dir)
        where = {
            "job_id": task.job_id,
            "restart_count": task.restart_count,
            "hosts": task.hosts,
            "code": running_code(),
            **({"array_task": task.array_task} if task.array_task else {}),
        }
        attempt = run_attempt(
            self.command(task),
            state_path,
            where,
            env=self.env(),
            stop_requested=stop.requested,
            on_stop=lambda: act_on_signal(task, stop.reason()),
        )
        decided = judge(task, stop.reason(), attempt)
        action = finish_attempt(state_path, attempt, Budget(self.max_requeues, self.max_failures))
        action = carry_out(task, state_path, action, decided)
        if action == "fail":
            raise JobFailed(f"{self.phase} of {self.run_dir} failed: {read_state(state_path).get('error')}")
        return {"phase": self.phase, "action": action, "attempt": attempt}

    def _follow(self, task: SlurmTask, stop: StopNote) -> dict[str, Any]:
        """Nodes other than 0 run their torchrun; node 0 records and decides for the job."""
        process = start_ignoring_stop_signals(self.command(task), env=self.env())
        returncode = wait_for(process, stop_requested=stop.requested)
        return {"phase": self.phase, "node_rank": task.node_rank, "returncode": returncode}


class StopNote:
    """The job task's USR2/TERM handlers: note the signal; the trainers act on it."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    @classmethod
    def install(cls) -> StopNote:
        note = cls()
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, note._note)
        return note

    def requested(self) -> bool:
        return self.received is not None

    def reason(self) -> str | None:
        """The signal SLURM sent (the trainers may have seen our USR2 relay first)."""
        return None if self.received is None else f"signal {self.received.name}"

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        print(f"job task: received {self.received.name}; telling the training processes", flush=True)


def observe(task: SlurmTask, signal: str | None, trainers: str | None) -> Seen:
    """What node 0 sees of its job now: `signal` and `trainers` as given, and SLURM's view."""
    fields = slurm_client.job_fields(task.slurm_id, attempts=3 if trainers else 2)
    restarts = fields.get("Restarts", "")
    return Seen(
        signal=signal,
        job_state=fields.get("JobState"),
        reason=fields.get("Reason"),
        preempt_time=fields.get("PreemptTime", "None") not in ("None", "Unknown", ""),
        requeued=restarts.isdigit() and int(restarts) > task.restart_count,
        trainers=trainers,
    )


def judge(task: SlurmTask, signal: str | None, attempt: dict[str, Any]) -> Stop | None:
    """After the trainers exit: for an attempt that stopped on a signal or lost its trainers, the stop
    decision (its outcome and reason written into `attempt`); None for `done` and `failed`."""
    if attempt["outcome"] not in ("preempted", "transient"):
        return None
    stopped = attempt["outcome"] == "preempted"  # then the trainers' record names the signal they saw
    decided = decide(observe(task, signal or (attempt["reason"] if stopped else None), attempt["outcome"]))
    reason = decided.why if stopped else f"{attempt['reason']}; {decided.why}"
    attempt.update(outcome=decided.outcome, reason=reason)
    return decided


def carry_out(task: SlurmTask, state_path: Path, action: str, decided: Stop | None) -> str:
    """Do what `action` (finish_attempt's) and the stop decision ask; the action, `fail` if a requeue
    that was ours to make failed (then recorded as such in state.json)."""
    if action == "requeue" and decided is not None and decided.requeue != "slurm":
        if error := requeue(task.slurm_id):
            update_state(state_path, status="failed", error=f"scontrol requeue failed: {error}")
            action = "fail"
    if action in ("fail", "end"):
        cancel_dependents(task.slurm_id)
    if action == "fail" and decided is not None and decided.requeue == "slurm":
        slurm_client.scancel([task.slurm_id])  # SLURM requeued it, but the run gives up: no next attempt
    return action


def act_on_signal(task: SlurmTask, signal: str | None) -> Stop:
    """At the stop signal, while the trainers save: what cannot wait for them (KillWait may end the job
    first): cancel the dependents of a cancelled job, requeue a job SLURM is ending. A requeue that
    fails here is tried again after the trainers exit."""
    decided = decide(observe(task, signal, None))
    print(f"job task: {decided.why}: requeue {decided.requeue}", flush=True)
    if decided.cancel_dependents:
        cancel_dependents(task.slurm_id)
    if decided.requeue == "now":
        requeue(task.slurm_id)
    return decided


def requeue(job_id: int | str, attempts: int | None = None) -> str | None:
    """`scontrol requeue`, tried `attempts` times (REQUEUE_ATTEMPTS); None once SLURM has it requeued
    (also when it already was: "Job is pending execution"), else the last error."""
    try:
        slurm_client.requeue(str(job_id), REQUEUE_ATTEMPTS if attempts is None else attempts)
    except slurm_client.SlurmError as error:
        print(f"job task: scontrol requeue {job_id} failed, giving up: {error}", flush=True)
        return str(error)
    return None


def cancel_dependents(job_id: int | str) -> list[str]:
    """scancel the jobs that wait on `job_id` (`afterok:ID` and the like): they can never run now. For an
    array task `A_i` that includes task i, and only task i, of each array waiting with `aftercorr:A_*`."""
    try:
        pending = slurm_client.pending_dependencies()  # our own pending jobs only: the evaluation is ours
    except slurm_client.SlurmError as error:
        print(f"job task: cannot list the jobs waiting on {job_id}, none cancelled: {error}", flush=True)
        return []
    dependents = [
        dependent for dependent, dependency in pending if waits_on(dependent, dependency, str(job_id))
    ]
    for job, why in slurm_client.scancel(dependents).items():
        print(f"job task: could not cancel {job}, which waits on {job_id}: {why}", flush=True)
    return dependents


def waits_on(dependent: str, dependency: str, job_id: str) -> bool:
    """Whether job (or array task) `dependent`, whose squeue dependency is `dependency`, waits on `job_id`."""
    if re.search(rf"\bafter\w*:{job_id}(?![0-9_])", dependency):
        return True
    array, _, index = job_id.partition("_")
    corresponding = dependent.partition("_")[2] == index  # aftercorr: the task of the same index
    return bool(index) and corresponding and re.search(rf"\baftercorr:{array}_\*", dependency) is not None
