"""The SLURM-independent job logic: one attempt's record, and what follows it (done, requeue, fail)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.attempt import finish_attempt, next_action, run_attempt
from sogclr.state import read_state, update_state

# A stand-in trainer: records `status` and `step` in state.json as sogclr's entry points do, then exits.
RECORDING_TRAINER = """
import sys
from sogclr.state import update_state
update_state(sys.argv[1], status=sys.argv[2], step=int(sys.argv[3]))
"""
# Waits for SLURM's warning signal, then records `preempted` as a real trainer would.
WAITING_TRAINER = """
import signal, sys, time
from sogclr.state import update_state
def stop(*_):
    update_state(sys.argv[1], status="preempted", step=7)
    sys.exit(0)
signal.signal(signal.SIGUSR2, stop)
time.sleep(60)
"""


def attempt(outcome: str, start: int, end: int) -> dict:
    return {"outcome": outcome, "start_step": start, "end_step": end, "reason": f"ended {outcome}"}


@pytest.mark.parametrize(
    "attempts, requeues, expected",
    [
        ([attempt("done", 0, 10)], 0, "done"),
        ([attempt("failed", 0, 3)], 0, "fail"),
        ([attempt("preempted", 0, 3)], 0, "requeue"),
        ([attempt("preempted", 0, 3)], 5, "fail"),  # max_requeues (5) used up
        ([attempt("preempted", 3, 3)], 1, "requeue"),  # one attempt without progress is allowed
        ([attempt("preempted", 0, 3), attempt("preempted", 3, 3), attempt("preempted", 3, 3)], 2, "fail"),
        ([attempt("preempted", 3, 3), attempt("preempted", 3, 4)], 2, "requeue"),
    ],
)
def test_next_action(attempts: list[dict], requeues: int, expected: str):
    action, reason = next_action(attempts, requeues, max_requeues=5)
    assert action == expected
    assert (reason is not None) == (expected == "fail")


def test_finish_attempt_numbers_attempts_and_counts_requeues(tmp_path: Path):
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=3, epoch=0)
    assert finish_attempt(state_path, attempt("preempted", 0, 3), max_requeues=2) == "requeue"
    assert finish_attempt(state_path, attempt("preempted", 3, 5), max_requeues=2) == "requeue"
    assert finish_attempt(state_path, attempt("preempted", 5, 6), max_requeues=2) == "fail"

    state = read_state(state_path)
    assert [a["attempt"] for a in state["attempts"]] == [1, 2, 3]
    assert state["requeues"] == 2
    assert state["status"] == "failed" and "max_requeues" in state["error"]
    assert state["epoch"] == 0  # the trainer's fields are kept


def test_run_attempt_records_steps_and_outcome(tmp_path: Path):
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=4)
    command = [sys.executable, "-c", RECORDING_TRAINER, str(state_path), "done", "9"]
    record = run_attempt(command, state_path, {"job_id": 1})
    assert (record["job_id"], record["start_step"], record["end_step"]) == (1, 4, 9)
    assert record["outcome"] == "done" and record["reason"] is None


def test_a_trainer_that_dies_without_recording_is_a_failure(tmp_path: Path):
    """The previous attempt's `preempted` must not be read as this attempt's outcome."""
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=4)
    record = run_attempt([sys.executable, "-c", "raise SystemExit(3)"], state_path, {})
    assert record["outcome"] == "failed"
    assert "code 3" in record["reason"]


def test_warn_after_sends_usr2_to_the_training_process(tmp_path: Path):
    state_path = tmp_path / "state.json"
    command = [sys.executable, "-c", WAITING_TRAINER, str(state_path)]
    record = run_attempt(command, state_path, {}, log=tmp_path / "log.txt", warn_after=2.0)
    assert record["outcome"] == "preempted" and record["end_step"] == 7
