"""The job layer's questions to SLURM, asked of the real local cluster: what SLURM shows of a stopped job,
which jobs wait on this one, and a requeue that the controller refuses. Shims on PATH stand for a
controller that does not answer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.slurm import SlurmTask, cancel_dependents, observe, requeue
from jobs.stop import decide
from tests.slurm_cluster import SLURM_MODULE

pytestmark = SLURM_MODULE


def task_of(job: str) -> SlurmTask:
    return SlurmTask(job_id=int(job), node_rank=0, hosts=["n1"], restart_count=0)


def failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """`command` answers as a controller that does not: an error, exit status 1."""
    shim = tmp_path / command
    shim.write_text("#!/bin/sh\necho 'Socket timed out on send/recv operation' >&2\nexit 1\n")
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
        assert requeue(job, window_s=0) is None
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
    assert "Socket timed out" in requeue("12345", window_s=3)
    printed = capsys.readouterr().out
    assert (
        printed.count("again in") == 1 and "giving up" in printed
    )  # tried at 0 s and 1 s; 2 s more is past 3 s
