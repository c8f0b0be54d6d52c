"""The stop decision, row by row, with what jobs really see at each kind of stop (measured on the local
cluster under each profile: the tables in jobs/stop.py), at both moments: at the signal (trainers None)
and after the trainers exit; then the whole plan with the attempts and the budget, and the budget alone
(`next_action`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.stop import Budget, Seen, decide, next_action, unanswered

TERM, USR2 = "signal SIGTERM", "signal SIGUSR2"

# (what happened, what the job task sees at the signal as (signal, JobState, Reason, PreemptTime set,
# Restarts past the attempt's own), what is done at the signal, after the trainers stopped, after they
# were lost)
CASES = [
    # REQUEUE mode, grace 0 (partition or QOS): SLURM has requeued it in the same moment it signalled.
    ("preempted, REQUEUE, grace 0", (TERM, "COMPLETING", "None", False, True),
     ("preempted", "slurm", False), ("preempted", "slurm", False), ("preempted", "slurm", False)),
    # Within a grace time the job still runs: it must requeue itself once saved (else it ends COMPLETED).
    ("preempted, REQUEUE or CANCEL, grace 30", (TERM, "RUNNING", "None", True, False),
     ("preempted", "after", False), ("preempted", "after", False), ("preempted", "after", False)),
    # CANCEL mode, grace 0: SLURM is ending it; only the job can bring it back, at once (KillWait).
    ("preempted, CANCEL, grace 0", (TERM, "COMPLETING", "None", True, False),
     ("preempted", "now", False), ("preempted", "now", False), ("preempted", "now", False)),
    # ... and after node 0 requeued it at the signal, the end sees the requeue: not made twice.
    ("preempted, CANCEL, grace 0, requeued at the signal", (TERM, "COMPLETING", "None", False, True),
     ("preempted", "slurm", False), ("preempted", "slurm", False), ("preempted", "slurm", False)),
    ("scancel", (TERM, "COMPLETING", "None", False, False),
     ("cancelled", "no", True), ("cancelled", "no", True), ("cancelled", "no", True)),
    ("time-limit warning", (USR2, "RUNNING", "None", False, False),
     ("timeout", "after", False), ("timeout", "after", False), ("timeout", "after", False)),
    ("time limit reached", (TERM, "COMPLETING", "TimeLimit", False, False),
     ("timeout", "now", False), ("timeout", "now", False), ("timeout", "now", False)),
    # No requeue on the trainers' word alone: it would bring back a cancelled job (review N5); ask again.
    ("the controller does not answer", (TERM, None, None, False, False),
     ("preempted", "ask", False), ("preempted", "ask", False), ("transient", "ask", False)),
    # ... but accounting (slurmdbd) still answers, and it records the cancel.
    ("the controller does not answer, accounting: cancelled", (TERM, None, None, False, False, "CANCELLED"),
     ("cancelled", "no", True), ("cancelled", "no", True), ("cancelled", "no", True)),
    # A cancel within a preemption's grace time (REQUEUE or CANCEL, grace 30): what the controller shows
    # is a CANCEL-mode preemption's; accounting tells the two apart (review N4).
    ("scancel within a grace time", (TERM, "COMPLETING", "None", True, False, "CANCELLED", True),
     ("cancelled", "no", True), ("cancelled", "no", True), ("cancelled", "no", True)),
    ("preempted, CANCEL, grace 0, sacct: preempted", (TERM, "COMPLETING", "None", True, False, "PREEMPTED"),
     ("preempted", "now", False), ("preempted", "now", False), ("preempted", "now", False)),
    # Accounting silent (none, or lagging): ended later than preempted is taken as a cancel ...
    ("ended after its preemption, accounting silent", (TERM, "COMPLETING", "None", True, False, None, True),
     ("cancelled", "no", True), ("cancelled", "no", True), ("cancelled", "no", True)),
    # ... and ended in the second SLURM preempted it (grace 0) as the preemption it is.
    ("preempted, CANCEL, grace 0, accounting lagging", (TERM, "COMPLETING", "None", True, False, "RUNNING"),
     ("preempted", "now", False), ("preempted", "now", False), ("preempted", "now", False)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("seen", "expected", "trainers"),
    [
        pytest.param(case[1], case[2 + moment], trainers, id=f"{case[0]} / {label}")
        for case in CASES
        for moment, (trainers, label) in enumerate(
            [(None, "at the signal"), ("preempted", "trainers stopped"), ("transient", "trainers lost")]
        )
    ],
)
def test_each_stop_is_decided_as_measured(seen: tuple, expected: tuple, trainers: str | None):
    signal, job_state, reason, preempt_time, requeued, *accounting = seen
    stop = decide(Seen(signal, job_state, reason, preempt_time, requeued, trainers, *accounting))
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == expected
    assert stop.why.startswith(signal) and str(job_state) in stop.why


def test_trainers_lost_with_the_job_running_and_no_signal_are_a_transient_failure():
    stop = decide(Seen(None, "RUNNING", "None", False, False, "transient"))
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == ("transient", "after", False)
    assert stop.why.startswith("no signal")


def test_a_job_slurm_ends_for_another_reason_is_not_requeued_and_its_dependents_go():
    stop = decide(Seen(TERM, "FAILED", "None", False, False, "preempted"))
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == ("cancelled", "no", True)


def test_the_reason_says_what_slurm_showed():
    assert "preempted by SLURM" in decide(Seen(TERM, "RUNNING", "None", True, False, "preempted")).why
    assert "before the time limit" in decide(Seen(USR2, "RUNNING", "None", False, False, "preempted")).why
    assert "a cancel" in decide(Seen(TERM, "COMPLETING", "None", False, False, "preempted")).why


def attempt(outcome: str, start: int, end: int, job_id: int = 1) -> dict:
    return {
        "outcome": outcome,
        "start_step": start,
        "end_step": end,
        "reason": f"ended {outcome}",
        "job_id": job_id,
    }


BUDGET = Budget(max_requeues=5, max_failures=2)


@pytest.mark.parametrize(
    "attempts, expected",
    [
        ([attempt("done", 0, 10)], "done"),
        ([attempt("failed", 0, 3)], "fail"),
        ([attempt("preempted", 0, 3)], "requeue"),
        ([attempt("timeout", 0, 3)], "requeue"),
        ([attempt("cancelled", 0, 3)], "end"),
        ([attempt("preempted", i, i + 1) for i in range(5)] + [attempt("timeout", 5, 6)], "fail"),  # 5 used
        (
            [attempt("preempted", i, i + 1, job_id=1) for i in range(5)] + [attempt("timeout", 5, 6, 2)],
            "requeue",
        ),
        ([attempt("preempted", 3, 3)], "requeue"),  # one attempt without progress is allowed
        ([attempt("preempted", 0, 3), attempt("preempted", 3, 3), attempt("timeout", 3, 3)], "fail"),
        ([attempt("preempted", 3, 3), attempt("preempted", 3, 4)], "requeue"),
        ([attempt("transient", 0, 0), attempt("transient", 0, 0)], "requeue"),  # no progress: still retried
        ([attempt("transient", 0, 2)] * 3, "fail"),  # max_failures (2) retries used up
        ([attempt("transient", 0, 2, job_id=1)] * 2 + [attempt("transient", 2, 2, job_id=2)], "requeue"),
    ],
)
def test_next_action(attempts: list[dict], expected: str):
    action, reason = next_action(attempts, BUDGET)
    assert action == expected
    assert (reason is not None) == (expected == "fail")


# After the attempt: SLURM's view (as at the signal; None: not asked, as when nothing stopped the job or
# in local mode) and the trainers' outcome -> (outcome, action, requeue, cancel dependents, withdraw).
REQUEUED = (TERM, "COMPLETING", "None", False, True)  # node 0 requeued it at the signal
PLANS = [
    ("done, nothing stopped it", None, "done", ("done", "done", "no", False, False)),
    ("failed, nothing stopped it", None, "failed", ("failed", "fail", "no", True, False)),
    ("pruned, nothing stopped it", None, "pruned", ("pruned", "end", "no", True, False)),
    ("preempted with a grace time", (TERM, "RUNNING", "None", True, False), "preempted",
     ("preempted", "requeue", "after", False, False)),
    ("cancelled while saving within a grace",
     (TERM, "COMPLETING", "None", True, False, "CANCELLED", True), "preempted",
     ("cancelled", "end", "no", True, False)),
    ("preempted, the controller silent", (TERM, None, None, False, False), "preempted",
     ("preempted", "requeue", "ask", False, False)),
    # Review N8: a requeue made at the signal is withdrawn when the run then fails or ends ...
    ("requeued at the signal, then failed", REQUEUED, "failed", ("failed", "fail", "no", True, True)),
    ("requeued at the signal, then pruned", REQUEUED, "pruned", ("pruned", "end", "no", True, True)),
    # ... but not when it is done: its evaluation waits on the job, which comes back to find it done.
    ("requeued at the signal, then done", REQUEUED, "done", ("done", "done", "no", False, False)),
    ("requeued at the signal, then stopped", REQUEUED, "preempted",
     ("preempted", "requeue", "slurm", False, False)),
    ("time limit reached, then failed", (TERM, "COMPLETING", "TimeLimit", False, False), "failed",
     ("failed", "fail", "no", True, False)),
]  # fmt: skip


@pytest.mark.parametrize(("seen", "trainers", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_each_plan_after_an_attempt(seen: tuple | None, trainers: str, expected: tuple):
    signal, job_state, reason, preempt_time, requeued, *accounting = seen or (None,) * 5
    observed = (
        None
        if seen is None
        else Seen(signal, job_state, reason, preempt_time, requeued, trainers, *accounting)
    )
    plan = decide(observed, [attempt(trainers, 0, 3)], BUDGET)
    assert (plan.outcome, plan.action, plan.requeue, plan.cancel_dependents, plan.withdraw) == expected


def test_a_stopped_attempt_is_recorded_with_slurms_view_and_a_lost_one_with_the_trainers_account_too():
    seen = Seen(TERM, "RUNNING", "None", True, False, "preempted")
    assert decide(seen, [attempt("preempted", 0, 3)], BUDGET).why == decide(seen).why
    lost = decide(replace(seen, trainers="transient"), [attempt("transient", 0, 3)], BUDGET)
    assert lost.why == f"ended transient; {decide(seen).why}" and lost.outcome == "preempted"
    assert decide(seen, [attempt("failed", 0, 3)], BUDGET).why == "ended failed"


def test_the_budget_ends_a_requeue_slurm_made_and_says_why():
    seen = Seen(TERM, "COMPLETING", "None", False, True, "preempted")  # REQUEUE mode, grace 0
    plan = decide(seen, [attempt("preempted", 0, 3), attempt("preempted", 3, 3)] * 3, BUDGET)
    assert (plan.action, plan.withdraw, plan.cancel_dependents) == ("fail", True, True)
    assert "max_requeues" in plan.error


def test_a_controller_that_never_answers_fails_the_run_loudly_rather_than_requeue_it():
    plan = decide(Seen(TERM, None, None, False, False, "preempted"), [attempt("preempted", 0, 3)], BUDGET)
    given_up = unanswered(plan, 61)
    assert (given_up.action, given_up.requeue, given_up.cancel_dependents) == ("fail", "no", True)
    assert "did not answer for 61 s" in given_up.error and given_up.outcome == "preempted"
