"""The job layer's questions to SLURM, asked of the real local cluster: what SLURM shows of a stopped job,
which jobs wait on this one, and a requeue that the controller refuses. Shims on PATH stand for a
controller that does not answer."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from jobs.slurm import SlurmTask, cancel_dependents, carry_out, observe, requeue
from jobs.stop import Stop, decide
from sogclr.contract.state import read_state, update_state
from testkit.slurm_cluster import SLURM_MODULE

pytestmark = SLURM_MODULE


def task_of(job: str) -> SlurmTask:
    return SlurmTask(job_id=int(job), node_rank=0, hosts=["n1"], restart_count=0)


def failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, subcommand: str = "") -> None:
    """`command` (only `command subcommand ...` if given; the real one otherwise) answers as a controller
    that does not: an error, exit status 1."""
    real = shutil.which(command)
    shim = tmp_path / command
    shim.write_text(
        f'#!/bin/sh\nif [ -z "{subcommand}" ] || [ "$1" = "{subcommand}" ]; then\n'
        "  echo 'Socket timed out on send/recv operation' >&2; exit 1\n"
        f'fi\nexec {real} "$@"\n'
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_a_running_job_without_a_preemption_was_warned_of_its_time_limit(slurm_cluster):
    job = slurm_cluster.sbatch("#!/bin/sh\nsleep 60\n", "-o", "/dev/null")
    try:
        slurm_cluster.wait_job(job, "RUNNING")
        stop = decide(observe(task_of(job), "signal SIGUSR2", "preempted"))
        assert (stop.outcome, stop.requeue) == ("timeout", "after")
        assert stop.why.startswith("signal SIGUSR2")
    finally:
        slurm_cluster.run("scancel", job)


def test_a_job_slurm_is_cancelling_was_cancelled_and_its_dependents_go(slurm_cluster):
    job = slurm_cluster.sbatch("#!/bin/sh\ntrap '' TERM\nsleep 60\n", "-o", "/dev/null")
    slurm_cluster.wait_job(job, "RUNNING")
    slurm_cluster.run("scancel", job)  # the script ignores TERM: the job is ending for KillWait
    stop = decide(observe(task_of(job), "signal SIGTERM", None))
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == ("cancelled", "no", True)
    assert "a cancel" in stop.why


def test_the_jobs_waiting_on_a_job_are_cancelled_with_it(slurm_cluster):
    held = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", "--hold", "-o", "/dev/null")
    waiting = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", f"--dependency=afterok:{held}", "-o", "/dev/null")
    other = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", "--hold", "-o", "/dev/null")
    try:
        assert cancel_dependents(int(held)) == [waiting]
        assert slurm_cluster.wait_job(waiting, "CANCELLED") == "CANCELLED"
        assert slurm_cluster.state(other) == "PENDING"
    finally:
        slurm_cluster.run("scancel", held, other)


def test_a_requeue_slurm_has_already_made_counts_as_made(slurm_cluster):
    job = slurm_cluster.sbatch("#!/bin/sh\nsleep 60\n", "--hold", "-o", "/dev/null")
    try:  # a pending job answers as a job SLURM has requeued: "Job is pending execution"
        assert requeue(job, attempts=1) is None
    finally:
        slurm_cluster.run("scancel", job)


def test_without_an_answer_from_the_controller_the_stop_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    failing(tmp_path, monkeypatch, "scontrol")
    stop = decide(observe(task_of("12345"), "signal SIGTERM", "preempted"))
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == ("preempted", "after", False)
    assert "did not answer" in stop.why


def test_a_requeue_the_controller_keeps_refusing_is_retried_then_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    failing(tmp_path, monkeypatch, "scontrol")
    assert "Socket timed out" in requeue("12345", attempts=2)
    printed = capsys.readouterr()
    assert printed.err.count("again in") == 1 and "giving up" in printed.out  # tried at 0 s and 1 s


def test_a_requeue_while_the_controller_does_not_answer_is_retried_until_it_does(
    slurm_cluster, capsys: pytest.CaptureFixture
):
    job = slurm_cluster.sbatch("#!/bin/sh\nsleep 120\n", "-o", "/dev/null")
    try:
        slurm_cluster.wait_job(job, "RUNNING")
        outcome = {}
        with slurm_cluster.profile(message_timeout_s=2):  # clients give up after 2 s, not 10
            with slurm_cluster.frozen_controller():
                worker = threading.Thread(target=lambda: outcome.update(error=requeue(job)))
                worker.start()
                time.sleep(8)  # frozen past MessageTimeout, well within REQUEUE_ATTEMPTS' minute
            worker.join(timeout=120)
        assert outcome == {"error": None}
        assert "again in" in capsys.readouterr().err  # the first tries timed out
        fields = slurm_cluster.run("scontrol", "show", "job", "-o", job).stdout
        assert "Restarts=1" in fields
    finally:
        slurm_cluster.run("scancel", job)


def test_a_requeue_that_finally_fails_is_recorded_and_fails_the_job_and_its_dependents_go(
    slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    job = slurm_cluster.sbatch("#!/bin/sh\nsleep 120\n", "-o", "/dev/null")
    waiting = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", f"--dependency=afterok:{job}", "-o", "/dev/null")
    state_path = tmp_path / "state.json"
    update_state(state_path, status="preempted")
    monkeypatch.setattr("jobs.slurm.REQUEUE_ATTEMPTS", 2)
    failing(tmp_path, monkeypatch, "scontrol", "requeue")
    try:
        slurm_cluster.wait_job(job, "RUNNING")
        stop = Stop("timeout", "after", False, "signal SIGUSR2; a warning before the time limit (RUNNING)")
        assert carry_out(task_of(job), state_path, "requeue", stop) == "fail"
        state = read_state(state_path)
        assert state["status"] == "failed" and state["error"].startswith("scontrol requeue failed: Socket")
        assert slurm_cluster.wait_job(waiting, "CANCELLED") == "CANCELLED"
    finally:
        slurm_cluster.run("scancel", job, waiting)
