"""The job function (jobs/single.py, jobs/array.py): one task per node starts torchrun, then node 0
decides for the job.

SLURM signals every process of the job step (USR2 before the time limit; TERM on preemption or cancel),
so the trainers receive the signal themselves. torchrun runs with both ignored, and this process installs
handlers that note the signal and keep telling the trainers until they have stopped (see `wait_for`);
before then and once its work is done it ignores both (launch/scripts.py starts it so; `StopNote`), since
an unhandled USR2 would kill it.

After torchrun exits, node 0 reads the phase's state.json and goes observe -> decide -> record -> do:
SLURM's own view of the job (asked from inside it, never guessed from elapsed time), jobs/stop.py's
table (the one place that says whether the job comes back, and why not), jobs/attempt.py's record,
then the SLURM calls the plan asks for. The same table is asked at the signal too, for what cannot
wait for the trainers: preempted (requeued by node 0, or already by SLURM), a time-limit warning
(requeued by node 0), or a cancel (never requeued). A requeue is made only on an answer from SLURM:
without one node 0 asks again, and gives up loudly (jobs/stop.py `unanswered`).

A requeue keeps the job id and run directory, so `afterok` dependents still wait. `scontrol requeue`
is tried REQUEUE_ATTEMPTS times with backoff (a busy controller answers "Socket timed out"); if it
still fails, state.json says so, the dependents are cancelled and the job fails. A requeue already
made when the run then fails or ends (made at the signal, or by SLURM) is withdrawn with `scancel`,
which leaves the requeued job CANCELLED once its job task exits (measured: jobs/stop.py). An array task is
addressed as `ARRAYJOBID_TASKID` in every SLURM command: its own numeric id may equal the array's id (the
last task keeps it), and that id names the whole array to scontrol and scancel. Transient failures
(a rank killed, a peer lost) are requeued within `max_failures`; a failure in training code raises, so
the job ends FAILED. When the run ends without completing, node 0 also cancels the jobs waiting on it
(its evaluation), which would otherwise stay pending for ever on a cluster without kill_invalid_depend;
after a cancel it does so as soon as the signal arrives, since KillWait may end it before the trainers.
It looks for them among the user's own pending jobs only (`squeue --me`), never the whole queue, and
asks again when squeue does not answer (a pruned job ends COMPLETED: only this cancels its evaluation).
Other nodes run their torchrun and report; they never fail the job themselves (node 0 decides).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from jobs import slurm_client
from jobs.attempt import PHASES, record_attempt, run_attempt, wait_for, with_attempt
from jobs.code import running_code
from jobs.stop import Budget, Plan, Seen, decide, unanswered
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
# more. A controller that stays silent longer fails the job loudly. Asking SLURM's view again while it
# does not answer follows the same rhythm.
REQUEUE_ATTEMPTS = 5
# How often node 0 lists the jobs waiting on its job once the run is over (as above: about a minute): a
# pruned job ends COMPLETED, so its evaluation's afterok is met unless node 0 cancels it.
LIST_ATTEMPTS = 5
# A time as scontrol prints it (PreemptTime, EndTime); "None" and "Unknown" are not.
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


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
        with StopNote.installed() as stop:
            task = SlurmTask.from_environ()
            return self._lead(task, stop) if task.node_rank == 0 else self._follow(task, stop)

    def _lead(self, task: SlurmTask, stop: StopNote) -> dict[str, Any]:
        """Node 0 runs its torchrun, records the attempt and decides for the job."""
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
        plan = conclude(
            task, stop.reason(), attempt, state_path, Budget(self.max_requeues, self.max_failures)
        )
        record_attempt(state_path, attempt, plan)
        if self.phase == "pretrain":
            from jobs.promote import after_pretraining  # (it imports this module)

            plan = promoted(plan, after_pretraining(task.slurm_id, self.run_dir, plan.action))
        action = carry_out(task, state_path, plan)
        if action == "fail":
            raise JobFailed(f"{self.phase} of {self.run_dir} failed: {read_state(state_path).get('error')}")
        return {"phase": self.phase, "action": action, "attempt": attempt}

    def _follow(self, task: SlurmTask, stop: StopNote) -> dict[str, Any]:
        """Nodes other than 0 run their torchrun only."""
        process = start_ignoring_stop_signals(self.command(task), env=self.env())
        returncode = wait_for(process, stop_requested=stop.requested)
        return {"phase": self.phase, "node_rank": task.node_rank, "returncode": returncode}


class StopNote:
    """The job task's USR2/TERM handlers: note the signal; the trainers act on it."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[StopNote]:
        """Noting the signals while the job task works; ignoring them once it is done, as it did before it
        began (launch/scripts.py). Python's exit gives a signal with a Python handler back its default
        action, death: a warning or a cancel in that moment failed a finished job's step (measured under
        load: "task 0: User defined signal 2", the job FAILED after its run was done, the evaluation that
        waited on it never ran)."""
        note = cls()
        for sig in cls.SIGNALS:
            signal.signal(sig, note._note)
        try:
            yield note
        finally:
            for sig in cls.SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def requested(self) -> bool:
        return self.received is not None

    def reason(self) -> str | None:
        """The signal SLURM sent (the trainers may have seen our USR2 relay first)."""
        return None if self.received is None else f"signal {self.received.name}"

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        print(f"job task: received {self.received.name}; telling the training processes", flush=True)


def observe(task: SlurmTask, signal: str | None, trainers: str | None) -> Seen:
    """What node 0 sees of its job now: `signal` and `trainers` as given, SLURM's view, and accounting's
    where the controller's view cannot tell a cancel from a preemption (or the controller did not answer)."""
    fields = slurm_client.job_fields(task.slurm_id, attempts=3 if trainers else 2)
    restarts = fields.get("Restarts", "")
    requeued = restarts.isdigit() and int(restarts) > task.restart_count
    preempted_at, ended_at = fields.get("PreemptTime", ""), fields.get("EndTime", "")
    preempt_time = bool(TIMESTAMP.fullmatch(preempted_at))
    ending = not fields or (preempt_time and fields.get("JobState") != "RUNNING" and not requeued)
    return Seen(
        signal=signal,
        job_state=fields.get("JobState"),
        reason=fields.get("Reason"),
        preempt_time=preempt_time,
        requeued=requeued,
        trainers=trainers,
        accounted=slurm_client.accounted_state(task.slurm_id) if ending else None,
        ended_after_preemption=preempt_time
        and bool(TIMESTAMP.fullmatch(ended_at))
        and ended_at > preempted_at,
    )


def conclude(
    task: SlurmTask, signal: str | None, attempt: dict[str, Any], state_path: Path, budget: Budget
) -> Plan:
    """After the trainers exit: the plan for `attempt`, from SLURM's view when a stop signal came or the
    trainers stopped or were lost. While SLURM does not answer and the run wants a requeue, ask again for
    REQUEUE_ATTEMPTS times; then the plan fails the job (stop.unanswered)."""
    attempts = with_attempt(read_state(state_path), attempt)
    stopped = attempt["outcome"] == "preempted"  # then the trainers' record names the signal they saw
    if signal is None and attempt["outcome"] not in ("preempted", "transient"):
        return decide(None, attempts, budget)
    started, pause = time.monotonic(), 1.0
    for asked in range(1, REQUEUE_ATTEMPTS + 1):
        seen = observe(task, signal or (attempt["reason"] if stopped else None), attempt["outcome"])
        plan = decide(seen, attempts, budget)
        if plan.requeue != "ask" or asked == REQUEUE_ATTEMPTS:
            break
        print(
            f"job task: SLURM did not answer; asking again in {pause:.0f} s (no requeue without it)",
            flush=True,
        )
        time.sleep(pause)
        pause *= 2
    return unanswered(plan, time.monotonic() - started) if plan.requeue == "ask" else plan


def promoted(plan: Plan, action: str) -> Plan:
    """The plan once promotion (jobs/promote.py) has had its say on a `pruned` attempt: unchanged, or, when
    it held the job (`paused`) or requeued it (`requeue`: promoted meanwhile), nothing more to do: the
    evaluation waits on the job."""
    if action == plan.action:
        return plan
    return replace(plan, action=action, requeue="no", cancel_dependents=False, withdraw=False)


def carry_out(task: SlurmTask, state_path: Path, plan: Plan) -> str:
    """Do what `plan` asks; its action, `fail` if a requeue that was ours to make failed (then recorded as
    such in state.json)."""
    action = plan.action
    if action == "requeue" and plan.requeue in ("now", "after"):
        if error := requeue(task.slurm_id):
            update_state(state_path, status="failed", error=error)  # the client names the command
            action = "fail"
    if action in ("fail", "end") or plan.cancel_dependents:
        cancel_dependents(task.slurm_id, attempts=LIST_ATTEMPTS)
    if plan.withdraw:  # requeued (by SLURM, or by us at the signal), but the run is over: no next attempt
        print(f"job task: {plan.outcome} after a requeue; withdrawing it (scancel)", flush=True)
        slurm_client.scancel([task.slurm_id])
    return action


def act_on_signal(task: SlurmTask, signal: str | None) -> Plan:
    """At the stop signal, while the trainers save: what cannot wait for them (KillWait may end the job
    first): cancel the dependents of a cancelled job, requeue a job SLURM is ending. A requeue that
    fails here is tried again after the trainers exit."""
    plan = decide(observe(task, signal, None))
    print(f"job task: {plan.why}: requeue {plan.requeue}", flush=True)
    if plan.cancel_dependents:
        cancel_dependents(task.slurm_id)
    if plan.requeue == "now":
        requeue(task.slurm_id)
    return plan


def requeue(job_id: int | str, attempts: int | None = None) -> str | None:
    """`scontrol requeue`, tried `attempts` times (REQUEUE_ATTEMPTS); None once SLURM has it requeued
    (also when it already was: "Job is pending execution"), else the last error."""
    try:
        slurm_client.requeue(str(job_id), REQUEUE_ATTEMPTS if attempts is None else attempts)
    except slurm_client.SlurmError as error:
        print(f"job task: giving up the requeue of {job_id}: {error}", flush=True)
        return str(error)
    return None


def cancel_dependents(job_id: int | str, attempts: int = 3) -> list[str]:
    """scancel the jobs that wait on `job_id` (`afterok:ID` and the like): they can never run now. For an
    array task `A_i` that includes task i, and only task i, of each array waiting with `aftercorr:A_*`.
    The listing is asked `attempts` times before node 0 gives up on them."""
    try:  # our own pending jobs only: the evaluation is ours
        pending = slurm_client.pending_dependencies(attempts)
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
