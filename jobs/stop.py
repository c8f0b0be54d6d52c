"""The stop decision: from what node 0 sees when an attempt ends (or a stop signal arrives) to what
happens next, in one table. "Will this job come back, and why not?" is answered here and only here.

`decide(seen, attempts, budget)` takes SLURM's view of the job (`Seen`), the phase's attempts (the last
one just ended) and the submission's budget, and returns a `Plan`: the attempt's outcome, the action
(`done`, `requeue`, `fail`, `end`), when node 0 requeues, whether the jobs waiting on this one go,
whether a requeue already made is withdrawn, and why. jobs/slurm.py observes, decides, records (through
jobs/attempt.py) and does; local mode decides from the attempts alone.

It is asked at two moments: when the job task receives SLURM's signal (the trainers still run; no
attempts yet), and after the trainers have exited. SLURM's view is read from inside the job
(`scontrol show job -o`: JobState, PreemptTime, Restarts, EndTime) and, where the controller's view
cannot tell a cancel from a preemption, from accounting (`sacct`: State, which slurmdbd records apart
from the controller). The view alone tells a preemption from a cancel, a time-limit warning from a time
limit reached, and a requeue SLURM has already made from one that is ours to make.

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
the job back: it requeues at the signal.

A cancel that meets a stop, measured the same way (2026-12-05, partition priority; the observer job
catches TERM and stays up; EndTime and PreemptTime to the second):

    what happened (profile)              JobState    PreemptTime  EndTime        sacct      `scontrol requeue`
    scancel 1 s into grace (REQUEUE 30)  COMPLETING  set          the cancel's   CANCELLED  accepted: back
    scancel 1 s into grace (CANCEL 30)   COMPLETING  set          the cancel's   CANCELLED  accepted: back
    preempted, CANCEL, grace 0 (again)   COMPLETING  set          = PreemptTime  PREEMPTED  accepted: back
    scancel, then slurmctld stopped 40s  no answer (timed out after 40 s)        CANCELLED  later: back

(the last with KillWait 90; back: Restarts r+1, the job runs again). Under QOS preemption the cancel
rows read the same (`cancel-in-grace-qos`, REQUEUE and CANCEL, grace 30), there with EndTime =
PreemptTime: a cancel in the second of the preemption. A requeue made at the signal
(CANCEL, grace 0), then withdrawn while the job task still runs: `scancel` is accepted (JobState
COMPLETING) and the job ends CANCELLED once the job task exits, never to run again (sacct says REQUEUED
then and after); `scontrol hold` leaves it PENDING (JobHeldAdmin) for ever.

`scontrol requeue Incomplete` answers nothing (exit 0) and requeues nothing for a COMPLETING job, a
preempted one included: it cannot bring back a CANCEL-mode preemption. `squeue -t CANCELLED` (or
`-t PREEMPTED`) does not list a COMPLETING job, and `squeue --json` says COMPLETING too: in 22.05 the
controller shows no base state while the job completes. Accounting does, at once on this cluster (and
with the controller stopped, slurmdbd still answers), so a COMPLETING job with PreemptTime is a
preemption only when sacct says PREEMPTED, or, with accounting silent (none, or lagging), when SLURM
ended it the second it preempted it (EndTime = PreemptTime: grace 0). Ended later than it was preempted
with accounting silent is a cancel within the grace time or a CANCEL-mode grace that ran out before the
trainers saved: taken as a cancel, since bringing back a job its user cancelled is the worse mistake
(the run is then `cancelled`; `--resubmit-failed` brings it back). Without an answer from the
controller node 0 never requeues on the trainers' word: it asks accounting, asks again until SLURM
answers or jobs/slurm.py REQUEUE_ATTEMPTS tries pass, then fails the job loudly (see `unanswered`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Action = Literal["done", "requeue", "fail", "end"]
# When node 0 runs `scontrol requeue`: at the signal (SLURM is ending the job: waiting for the trainers
# could run past KillWait), after the trainers saved (the job is still RUNNING: a requeue kills it),
# never (SLURM has requeued it itself, or must not: a cancel), or once SLURM answers (`ask`).
Requeue = Literal["now", "after", "slurm", "no", "ask"]
# Outcomes after which the job comes back (a requeue) and resumes from its last checkpoint.
STOPPED = ("preempted", "timeout")


@dataclass(frozen=True)
class Budget:
    """How often one submission may come back: after stop signals, and after transient failures."""

    max_requeues: int
    max_failures: int = 3


@dataclass(frozen=True)
class Seen:
    """What node 0 sees: the signal its job task received, SLURM's view of the job, and the trainers."""

    signal: str | None  # "SIGUSR2", "SIGTERM"; None: the job task received none
    job_state: str | None  # scontrol's JobState; None: the controller did not answer
    reason: str | None  # scontrol's Reason (TimeLimit once the time limit is reached)
    preempt_time: bool  # PreemptTime is set
    requeued: bool  # Restarts is past this attempt's SLURM_RESTART_COUNT: the job is requeued
    trainers: str | None  # the attempt's outcome (jobs/attempt.py classify); None: they still run
    accounted: str | None = None  # sacct's State (CANCELLED, PREEMPTED, ...); None: not asked, no answer
    ended_after_preemption: bool = False  # EndTime is later than PreemptTime


@dataclass(frozen=True)
class Plan:
    """What follows: the attempt's outcome, the action (None at the signal), when node 0 requeues,
    whether the dependents go and a requeue already made is withdrawn (scancel), and why."""

    outcome: str
    action: Action | None
    requeue: Requeue
    cancel_dependents: bool
    withdraw: bool
    why: str  # SLURM's view at the signal; after the attempt, the reason recorded with it
    error: str | None = None  # why the run gives up, when it does though training did not fail


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


def _ending_after_preemption(seen: Seen) -> bool:
    return seen.preempt_time and seen.job_state != "RUNNING"


ROWS = (
    Row("the controller did not answer; accounting records a cancel",
        lambda s: s.job_state is None and s.accounted == "CANCELLED", "cancelled", "no", True),
    Row("the controller did not answer", lambda s: s.job_state is None, None, "ask", False),
    Row("preempted by SLURM, which has requeued the job", lambda s: s.requeued, "preempted", "slurm", False),
    Row("preempted by SLURM, within its grace time", lambda s: s.preempt_time and s.job_state == "RUNNING",
        "preempted", "after", False),
    Row("cancelled within a preemption's grace time (accounting: CANCELLED)",
        lambda s: _ending_after_preemption(s) and s.accounted == "CANCELLED", "cancelled", "no", True),
    Row("preempted by SLURM, which is ending the job",
        lambda s: s.preempt_time and (s.accounted == "PREEMPTED" or not s.ended_after_preemption),
        "preempted", "now", False),
    Row("ended after its preemption, accounting silent: taken as a cancel", lambda s: s.preempt_time,
        "cancelled", "no", True),
    Row("cancelled", _state("CANCELLED"), "cancelled", "no", True),
    Row("its time limit was reached", lambda s: s.job_state == "TIMEOUT" or s.reason == "TimeLimit",
        "timeout", "now", False),
    Row("running, and no stop signal", lambda s: s.signal is None and s.job_state == "RUNNING", None,
        "after", False),
    Row("a warning before the time limit", _state("RUNNING"), "timeout", "after", False),
    Row("SLURM is ending the job, not for a preemption: a cancel", lambda s: True, "cancelled", "no", True),
)  # fmt: skip


def decide(seen: Seen | None, attempts: Sequence[dict[str, Any]] = (), budget: Budget | None = None) -> Plan:
    """The plan for `seen` (None: no SLURM to ask, as in local mode) after `attempts` (the last one just
    ended; none at the signal), within `budget`.

    The first row of ROWS that applies gives the stop's outcome and when to requeue. Trainers lost
    (`transient`) while SLURM stops the job take the stop's outcome: a cancel is not retried, a
    preemption does not spend the failure budget; lost with the job running and no signal, they stay
    `transient`. Trainers that finished (`done`, `failed`, `pruned`) keep their outcome. Then
    `next_action` applies the budget. A requeue already made (by SLURM, or by node 0 at the signal) is
    withdrawn when the run fails or ends; after `done` the job is left to come back, finding the phase
    done, since its evaluation waits on it.
    """
    row = next(row for row in ROWS if row.applies(seen)) if seen is not None else None
    view = "" if seen is None else f"{seen.signal or 'no signal'}; {row.view} ({seen.job_state})"
    if not attempts:  # at the signal: what cannot wait for the trainers
        outcome = row.outcome or seen.trainers or "preempted"
        return Plan(outcome, None, row.requeue, row.cancel_dependents, False, view)
    last = attempts[-1]
    stopped = row is not None and last["outcome"] in ("preempted", "transient")
    outcome = (row.outcome or last["outcome"]) if stopped else last["outcome"]
    action, error = next_action([*attempts[:-1], {**last, "outcome": outcome}], budget or Budget(0))
    ends = action in ("fail", "end")
    return Plan(
        outcome=outcome,
        action=action,
        requeue=row.requeue if row is not None and action == "requeue" else "no",
        cancel_dependents=ends or (row is not None and row.cancel_dependents),
        withdraw=ends and seen is not None and seen.requeued,
        why=_recorded_reason(last, view, stopped),
        error=error if action == "fail" and last["outcome"] != "failed" else None,
    )


def _recorded_reason(attempt: dict[str, Any], view: str, stopped: bool) -> str | None:
    """A stopped attempt's reason is SLURM's view (after the trainers' own account when they were lost)."""
    if not stopped:
        return attempt.get("reason")
    return view if attempt["outcome"] == "preempted" else f"{attempt['reason']}; {view}"


def unanswered(plan: Plan, waited_s: float) -> Plan:
    """The plan once SLURM has not answered for `waited_s` while the run wanted a requeue: fail, loudly.

    A requeue on the trainers' word alone brings back a job its user cancelled (measured above: a
    requeue sent to a stopped controller is applied once it runs). Failing keeps the run's checkpoint
    and says so; a resubmission continues it.
    """
    error = (
        f"SLURM did not answer for {waited_s:.0f} s after the trainers stopped: not requeued on their "
        "word alone (it could bring back a cancelled job); resubmit to continue"
    )
    return replace(plan, action="fail", requeue="no", cancel_dependents=True, error=error)


def next_action(attempts: list[dict[str, Any]], budget: Budget) -> tuple[Action, str | None]:
    """What follows the last attempt, and why when it is `fail`.

    Budgets count the attempts of the last attempt's submission (its job id): a resubmission starts
    afresh, keeping the history.
    """
    last = attempts[-1]
    outcome = last["outcome"]
    if outcome == "done":
        return "done", None
    if outcome == "failed":
        return "fail", last.get("reason")
    if outcome == "pruned":  # over for good, though not done: end the job, cancel its evaluation
        return "end", None
    if outcome not in (*STOPPED, "transient"):  # cancelled: SLURM ends the job
        return "end", None
    submission = [a for a in attempts if a.get("job_id") == last.get("job_id")]
    if outcome == "transient":
        failures = sum(a["outcome"] == "transient" for a in submission)
        if failures > budget.max_failures:
            return "fail", f"{last['reason']}; max_failures ({budget.max_failures}) retries are used up"
        return "requeue", None
    requeues = sum(a["outcome"] in STOPPED for a in submission[:-1])
    if requeues >= budget.max_requeues:
        return "fail", f"preempted, but max_requeues ({budget.max_requeues}) requeues are used up"
    last_two = [a for a in submission if a["outcome"] in STOPPED][-2:]
    if len(last_two) == 2 and all(a["end_step"] == a["start_step"] for a in last_two):
        return "fail", "two stops in a row without progress; not requeueing again"
    return "requeue", None
