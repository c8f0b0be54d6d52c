"""The stop decision: from what node 0 sees when a job is stopped to what it does, in one table.

Asked at two moments: when the job task receives SLURM's signal (the trainers still run), and after the
trainers have exited, whenever they stopped on a signal (`preempted`) or were lost (`transient`). Both
moments read SLURM's view of the job from inside it (`scontrol show job -o`: JobState, PreemptTime,
Restarts) and look it up in `ROWS`. The view alone tells a preemption from a cancel, a time-limit
warning from a time limit reached, and a requeue SLURM has already made from one that is ours to make.

What the job sees, measured from inside a job at each kind of stop (`scripts/slurm-stop-states KIND`
on the local cluster under each profile of scripts/local-slurm; Slurm 22.05.8, KillWait 30). The view
is the one at the SIGTERM (or USR2) and the same 2 s later; r is the attempt's SLURM_RESTART_COUNT:

    stop (profile)                    JobState    PreemptTime  Restarts  sacct      `scontrol requeue` then
    preempted, REQUEUE, grace 0       COMPLETING  not shown    r+1       PREEMPTED  "Job is pending execution"
    preempted, REQUEUE, grace 30      RUNNING     set          r         RUNNING    accepted, kills the job
    preempted, CANCEL, grace 0        COMPLETING  set          r         PREEMPTED  accepted: Restarts r+1
    preempted, CANCEL, grace 30       RUNNING     set          r         RUNNING    accepted, kills the job
    scancel                           COMPLETING  None         r         CANCELLED  accepted: undoes it
    USR2 (time-limit warning)         RUNNING     None         r         RUNNING    (requeued after the save)
    time limit reached (TERM)         COMPLETING  None         r         TIMEOUT    (Reason=TimeLimit)

Each preemption row is the same under partition priority (partition low's GraceTime and PreemptMode)
and under QOS preemption (QOS normal's; the partition's do not count). With grace N SLURM sends TERM,
waits N s, then requeues (REQUEUE) or ends the job (CANCEL), killing what still runs KillWait later; with
grace 0 it does so at once. A job that ends within its grace ends COMPLETED: it must requeue itself, and
a requeue while it runs kills it, so that requeue comes after the trainers saved. Ended by SLURM (CANCEL,
grace 0), the job task has KillWait from the TERM, the trainers' save included, and only it can bring
the job back: it requeues at the signal. Accounting (sacct) lags: PENDING or RUNNING seconds after a
job started, so the decision reads only the controller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# When node 0 runs `scontrol requeue`: at the signal (SLURM is ending the job: waiting for the trainers
# could run past KillWait), after the trainers saved (the job is still RUNNING: a requeue kills it), or
# never (SLURM has requeued it itself, or must not: a cancel).
Requeue = Literal["now", "after", "slurm", "no"]


@dataclass(frozen=True)
class Seen:
    """What node 0 sees: the signal its job task received, SLURM's view of the job, and the trainers."""

    signal: str | None  # "SIGUSR2", "SIGTERM"; None: the job task received none
    job_state: str | None  # scontrol's JobState; None: the controller did not answer
    reason: str | None  # scontrol's Reason (TimeLimit once the time limit is reached)
    preempt_time: bool  # PreemptTime is set
    requeued: bool  # Restarts is past this attempt's SLURM_RESTART_COUNT: SLURM has requeued the job
    trainers: str | None  # the attempt's outcome (jobs/attempt.py classify); None: they still run


@dataclass(frozen=True)
class Stop:
    """What node 0 does: the attempt's outcome, when to requeue, whether the dependents go, and why."""

    outcome: str
    requeue: Requeue
    cancel_dependents: bool
    why: str


@dataclass(frozen=True)
class Row:
    """One line of the table: when `applies`, the outcome (None: the trainers' own) and the actions."""

    view: str
    applies: Callable[[Seen], bool]
    outcome: str | None
    requeue: Requeue
    cancel_dependents: bool


def _state(*states: str) -> Callable[[Seen], bool]:
    return lambda seen: seen.job_state in states


ROWS = (
    Row("the controller did not answer", lambda s: s.job_state is None, None, "after", False),
    Row("preempted by SLURM, which has requeued the job", lambda s: s.requeued, "preempted", "slurm", False),
    Row("preempted by SLURM, within its grace time", lambda s: s.preempt_time and s.job_state == "RUNNING",
        "preempted", "after", False),
    Row("preempted by SLURM, which is ending the job", lambda s: s.preempt_time, "preempted", "now", False),
    Row("cancelled", _state("CANCELLED"), "cancelled", "no", True),
    Row("its time limit was reached", lambda s: s.job_state == "TIMEOUT" or s.reason == "TimeLimit",
        "timeout", "now", False),
    Row("running, and no stop signal", lambda s: s.signal is None and s.job_state == "RUNNING", None,
        "after", False),
    Row("a warning before the time limit", _state("RUNNING"), "timeout", "after", False),
    Row("SLURM is ending the job, not for a preemption: a cancel", lambda s: True, "cancelled", "no", True),
)  # fmt: skip


def decide(seen: Seen) -> Stop:
    """The first row of ROWS that applies to `seen`.

    Without an answer the trainers' outcome stands (at the signal: a preemption), and the run is kept: a
    requeue loses nothing, and it fails if SLURM is ending the job. Trainers lost (`transient`) while
    SLURM stops the job take the stop's outcome: a cancel is not retried, a preemption does not spend
    the failure budget; lost with the job running and no signal, they stay `transient`.
    """
    row = next(row for row in ROWS if row.applies(seen))
    outcome = row.outcome or seen.trainers or "preempted"
    signal = seen.signal or "no signal"
    return Stop(outcome, row.requeue, row.cancel_dependents, f"{signal}; {row.view} ({seen.job_state})")
