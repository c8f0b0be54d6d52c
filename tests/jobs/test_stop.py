"""The stop decision, row by row, with what jobs really see at each kind of stop (measured on the local
cluster under each profile: the table in jobs/stop.py), at both moments: at the signal (trainers None)
and after the trainers exit."""

from __future__ import annotations

import pytest

from jobs.stop import Seen, decide

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
    ("the controller does not answer", (TERM, None, None, False, False),
     ("preempted", "after", False), ("preempted", "after", False), ("transient", "after", False)),
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
    signal, job_state, reason, preempt_time, requeued = seen
    stop = decide(Seen(signal, job_state, reason, preempt_time, requeued, trainers))
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
