"""The job layer's questions to SLURM, asked of the real local cluster: why did the trainers stop, and
which jobs wait on this one. A shim on PATH stands for a controller that does not answer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.slurm import cancel_dependents, why_stopped
from tests.slurm_cluster import SLURM_MODULE

pytestmark = SLURM_MODULE


def test_a_running_job_without_a_preemption_was_warned_of_its_time_limit(slurm_cluster):
    job = slurm_cluster.sbatch("#!/bin/sh\nsleep 60\n", "-o", "/dev/null")
    try:
        slurm_cluster.wait_job(job, "RUNNING")
        stopped = why_stopped(int(job), "signal SIGUSR2")
        assert stopped["outcome"] == "timeout" and stopped["reason"].startswith("signal SIGUSR2")
    finally:
        slurm_cluster.run("scancel", job)


def test_a_job_slurm_is_ending_was_cancelled(slurm_cluster):
    job = slurm_cluster.sbatch("#!/bin/sh\ntrap '' TERM\nsleep 60\n", "-o", "/dev/null")
    slurm_cluster.wait_job(job, "RUNNING")
    slurm_cluster.run("scancel", job)  # the script ignores TERM: the job is COMPLETING for KillWait
    stopped = why_stopped(int(job), "signal SIGTERM")
    assert stopped["outcome"] == "cancelled" and "CANCELLED" in stopped["reason"]


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


def test_without_an_answer_from_the_controller_the_stop_is_taken_for_a_preemption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    shim = tmp_path / "scontrol"
    shim.write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    stopped = why_stopped(12345, "signal SIGTERM")
    assert stopped["outcome"] == "preempted" and "did not say why" in stopped["reason"]
