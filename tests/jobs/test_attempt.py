"""The SLURM-independent job logic: one attempt, run and recorded with what follows it (the decision
itself: tests/jobs/test_stop.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from jobs.attempt import begin_attempt, close_unrecorded_attempt, finish_attempt, run_attempt
from jobs.stop import Budget
from sogclr.contract.state import read_state, update_state
from tests.jobs.test_stop import attempt

# A stand-in trainer: records `status` and `step` in state.json as sogclr's entry points do, then exits.
RECORDING_TRAINER = """
import sys
from sogclr.contract.state import update_state
update_state(sys.argv[1], status=sys.argv[2], step=int(sys.argv[3]))
"""
# Waits for SLURM's warning signal, then records `preempted` as a real trainer would.
WAITING_TRAINER = """
import signal, sys, time
from sogclr.contract.state import update_state
def stop(*_):
    update_state(sys.argv[1], status="preempted", step=7)
    sys.exit(0)
signal.signal(signal.SIGUSR2, stop)
time.sleep(60)
"""


def test_finish_attempt_numbers_attempts_and_counts_requeues(tmp_path: Path):
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=3, epoch=0)
    budget = Budget(max_requeues=2)
    assert finish_attempt(state_path, attempt("preempted", 0, 3), budget) == "requeue"
    assert finish_attempt(state_path, attempt("timeout", 3, 5), budget) == "requeue"
    assert finish_attempt(state_path, attempt("preempted", 5, 6), budget) == "fail"

    state = read_state(state_path)
    assert [a["attempt"] for a in state["attempts"]] == [1, 2, 3]
    assert state["requeues"] == 2
    assert state["status"] == "failed" and "max_requeues" in state["error"]
    assert state["epoch"] == 0  # the trainer's fields are kept


def test_a_cancelled_attempt_ends_the_run_as_cancelled(tmp_path: Path):
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=3)
    assert finish_attempt(state_path, attempt("cancelled", 0, 3), Budget(5)) == "end"
    state = read_state(state_path)
    assert state["status"] == "cancelled" and state["requeues"] == 0


def test_run_attempt_records_steps_and_outcome(tmp_path: Path):
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=4)
    command = [sys.executable, "-c", RECORDING_TRAINER, str(state_path), "done", "9"]
    record = run_attempt(command, state_path, {"job_id": 1})
    assert (record["job_id"], record["start_step"], record["end_step"]) == (1, 4, 9)
    assert record["outcome"] == "done" and record["reason"] is None


def test_a_trainer_that_dies_without_recording_is_transient(tmp_path: Path):
    """The previous attempt's `preempted` must not be read as this attempt's outcome."""
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted", step=4)
    record = run_attempt([sys.executable, "-c", "raise SystemExit(3)"], state_path, {})
    assert record["outcome"] == "transient"
    assert "code 3" in record["reason"]


@pytest.mark.parametrize(
    "failure, outcome",
    [("exception", "failed"), ("peer", "transient"), ("stalled", "transient"), (None, "failed")],
)
def test_a_recorded_failure_is_a_bug_unless_a_peer_was_lost_or_a_rank_stalled(
    tmp_path: Path, failure: str | None, outcome: str
):
    state_path = tmp_path / "state.json"
    fields = f"status='failed', error='RuntimeError: boom', failure={failure!r}"
    trainer = (
        f"import sys; from sogclr.contract.state import update_state; update_state(sys.argv[1], {fields})"
    )
    record = run_attempt([sys.executable, "-c", trainer, str(state_path)], state_path, {})
    assert record["outcome"] == outcome and "boom" in record["reason"]


def test_an_attempt_that_never_finished_is_recorded_as_lost_by_the_next(tmp_path: Path):
    state_path = tmp_path / "state.json"
    update_state(state_path, step=4)
    begin_attempt(state_path, {"job_id": 7, "restart_count": 0})  # then its node died: no record
    update_state(state_path, step=6)  # it had saved once
    opening = begin_attempt(state_path, {"job_id": 7, "restart_count": 1})

    (lost,) = read_state(state_path)["attempts"]
    assert (lost["attempt"], lost["outcome"], lost["restart_count"]) == (1, "transient", 0)
    assert (lost["start_step"], lost["end_step"]) == (4, 6) and lost["reason"].startswith("lost")
    assert opening["start_step"] == 6
    assert finish_attempt(state_path, {**opening, "outcome": "done", "end_step": 9}, Budget(1)) == "done"
    state = read_state(state_path)
    assert [a["attempt"] for a in state["attempts"]] == [1, 2] and state["current_attempt"] is None


def test_stop_after_sends_usr2_to_the_training_process(tmp_path: Path):
    state_path = tmp_path / "state.json"
    command = [sys.executable, "-c", WAITING_TRAINER, str(state_path)]
    record = run_attempt(command, state_path, {}, log=tmp_path / "log.txt", stop_after=2.0)
    assert record["outcome"] == "preempted" and record["end_step"] == 7


def test_a_stop_request_is_repeated_until_a_starting_trainer_acts_on_it(tmp_path: Path):
    """A trainer that ignores USR2 while it starts (as torchrun's workers do) still gets the message."""
    state_path = tmp_path / "state.json"
    slow_starter = "import signal, time; signal.signal(signal.SIGUSR2, signal.SIG_IGN); time.sleep(3)\n"
    command = [sys.executable, "-c", slow_starter + WAITING_TRAINER, str(state_path)]
    stops: list[float] = []
    record = run_attempt(
        command, state_path, {}, stop_requested=lambda: True, on_stop=lambda: stops.append(time.time())
    )
    assert record["outcome"] == "preempted" and record["end_step"] == 7
    assert len(stops) == 1  # once, though the request is repeated


@pytest.mark.parametrize("slurm_state, status", [("cancelled", "cancelled"), ("node_fail", "failed")])
def test_an_attempt_slurm_ended_before_it_was_recorded_is_closed(
    tmp_path: Path, slurm_state: str, status: str
):
    state_path = tmp_path / "state.json"
    begin_attempt(state_path, {"job_id": 7})
    update_state(state_path, status="preempted", step=5)  # the trainers saved; then SIGKILL took the job task
    assert close_unrecorded_attempt(state_path, slurm_state)
    state = read_state(state_path)
    (attempt,) = state["attempts"]
    assert state["status"] == status and attempt["outcome"] == status and attempt["end_step"] == 5
    assert slurm_state.upper() in attempt["reason"] and state["current_attempt"] is None
    assert not close_unrecorded_attempt(state_path, slurm_state)  # nothing left to close
