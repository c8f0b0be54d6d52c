"""The submitit job function: one task per node starts torchrun, then node 0 decides for the job.

SLURM signals every process of the job step (USR2 before the time limit; TERM on preemption or cancel),
so the trainers receive the signal themselves. torchrun runs with both ignored, and this process replaces
submitit's handlers (whose `checkpoint()` would requeue from a process that cannot see the model) with
ones that note the signal and keep telling the trainers until they have stopped (see `wait_for`).

After torchrun exits, node 0 reads the phase's state.json. If the trainers stopped on a signal, SLURM's
own view of the job says why (asked from inside the job, never guessed from elapsed time):

    still RUNNING, PreemptTime set   preempted: SLURM would end the job COMPLETED once we exit, even with
                                     PreemptMode=REQUEUE, so node 0 requeues it, exactly once
    still RUNNING                    a time-limit warning (or `scancel --signal`): node 0 requeues it
    anything else (COMPLETING, ...)  SLURM is ending it (a cancel): recorded `cancelled`, never requeued

A requeue keeps the job id and run directory, so `afterok` dependents still wait. An array task is
addressed as `ARRAYJOBID_TASKID` in every SLURM command: its own numeric id may equal the array's id (the
last task keeps it), and that id names the whole array to scontrol and scancel. Transient failures
(a rank killed, a peer lost) are requeued within `max_failures`; a failure in training code raises, so
the job ends FAILED. When the run ends without completing, node 0 also cancels the jobs waiting on it
(its evaluation), which would otherwise stay pending for ever on a cluster without kill_invalid_depend;
after a cancel it does so as soon as the signal arrives, since KillWait may end it before the trainers.
Other nodes run their torchrun and report; they never fail the job themselves (node 0 decides).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from jobs.attempt import PHASES, Budget, finish_attempt, run_attempt, wait_for
from jobs.code import running_code
from jobs.torchrun import (
    Rendezvous,
    rendezvous_port,
    start_ignoring_stop_signals,
    threads_per_rank,
    torchrun_command,
)
from sogclr.layout import RunLayout
from sogclr.state import read_state

SLURM_QUERY_TIMEOUT_S = 30


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
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
        return cls(
            job_id=int(os.environ["SLURM_JOB_ID"]),
            node_rank=int(os.environ["SLURM_NODEID"]),
            hosts=hosts,
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
            on_stop=lambda: cancel_dependents_if_ending(task.slurm_id),
        )
        if attempt["outcome"] == "preempted":
            attempt.update(why_stopped(task.slurm_id, stop.reason() or attempt["reason"]))
        action = finish_attempt(state_path, attempt, Budget(self.max_requeues, self.max_failures))
        if action in ("fail", "end"):
            cancel_dependents(task.slurm_id)
        if action == "fail":
            raise JobFailed(f"{self.phase} of {self.run_dir} failed: {read_state(state_path).get('error')}")
        if action == "requeue":
            subprocess.run(["scontrol", "requeue", task.slurm_id], check=True)
        return {"phase": self.phase, "action": action, "attempt": attempt}

    def _follow(self, task: SlurmTask, stop: StopNote) -> dict[str, Any]:
        """Nodes other than 0 run their torchrun; node 0 records and decides for the job."""
        process = start_ignoring_stop_signals(self.command(task), env=self.env())
        returncode = wait_for(process, stop_requested=stop.requested)
        return {"phase": self.phase, "node_rank": task.node_rank, "returncode": returncode}


class StopNote:
    """Replaces submitit's USR2/TERM handlers: note the signal; the trainers act on it."""

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


def why_stopped(job_id: int | str, signal_reason: str | None) -> dict[str, str]:
    """`outcome` and `reason` of an attempt whose trainers stopped on a signal, from SLURM's view."""
    fields = job_fields(job_id)
    state = fields.get("JobState")
    if state is None:  # no answer: a requeue is the step that loses nothing (it fails if SLURM is ending it)
        return {"outcome": "preempted", "reason": f"{signal_reason}; the controller did not say why"}
    if state != "RUNNING":
        ended_as = accounted_state(job_id) or state
        return {"outcome": "cancelled", "reason": f"{signal_reason}; SLURM is ending the job ({ended_as})"}
    preempted_at = fields.get("PreemptTime", "None")
    if preempted_at not in ("None", "Unknown", ""):
        return {"outcome": "preempted", "reason": f"{signal_reason}; preempted by SLURM at {preempted_at}"}
    return {"outcome": "timeout", "reason": f"{signal_reason}; a warning before the time limit"}


def job_fields(job_id: int | str, tries: int = 3) -> dict[str, str]:
    """`scontrol show job -o` as KEY -> value ({} if the controller does not answer, `tries` times)."""
    for attempt in range(tries):
        result = _slurm(["scontrol", "show", "job", "-o", str(job_id)])
        if result.returncode == 0:
            return scontrol_fields(result.stdout)
        time.sleep(2**attempt)
    return {}


def scontrol_fields(line: str) -> dict[str, str]:
    """One record of `scontrol show ... -o` (KEY=value KEY=value ...) as KEY -> value."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


# States in accounting of a job that has not ended (accounting lags the controller by seconds under load).
ACCOUNTED_UNENDED = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED")


def accounted_state(job_id: int | str, tries: int = 5) -> str | None:
    """The job's final state in accounting ('CANCELLED by 0' -> 'CANCELLED'), once accounting has it,
    asking `tries` times a second apart; None if it does not say."""
    for attempt in range(tries):
        result = _slurm(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)])
        words = result.stdout.split() if result.returncode == 0 else []
        if words and words[0] not in ACCOUNTED_UNENDED:
            return words[0]
        if attempt + 1 < tries:
            time.sleep(1)
    return None


def cancel_dependents_if_ending(job_id: int | str) -> None:
    """On the stop signal, before the trainers have stopped: if SLURM is ending the job (a cancel), its
    dependents go now, since KillWait may run out before the attempt is recorded."""
    if job_fields(job_id, tries=1).get("JobState", "RUNNING") != "RUNNING":
        cancel_dependents(job_id)


def cancel_dependents(job_id: int | str) -> list[str]:
    """scancel the jobs that wait on `job_id` (`afterok:ID` and the like): they can never run now. For an
    array task `A_i` that includes task i, and only task i, of each array waiting with `aftercorr:A_*`."""
    result = _slurm(["squeue", "-r", "-h", "-t", "PD", "-o", "%i|%E"])  # -r: every pending task on its own
    if result.returncode != 0:
        return []
    dependents = [
        dependent
        for dependent, _, dependency in (line.partition("|") for line in result.stdout.splitlines())
        if waits_on(dependent, dependency, str(job_id))
    ]
    if dependents:
        _slurm(["scancel", *dependents])
    return dependents


def waits_on(dependent: str, dependency: str, job_id: str) -> bool:
    """Whether job (or array task) `dependent`, whose squeue dependency is `dependency`, waits on `job_id`."""
    if re.search(rf"\bafter\w*:{job_id}(?![0-9_])", dependency):
        return True
    array, _, index = job_id.partition("_")
    corresponding = dependent.partition("_")[2] == index  # aftercorr: the task of the same index
    return bool(index) and corresponding and re.search(rf"\baftercorr:{array}_\*", dependency) is not None


def _slurm(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=SLURM_QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return subprocess.CompletedProcess(command, 1, "", str(error))
