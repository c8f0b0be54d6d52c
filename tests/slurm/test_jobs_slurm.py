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

from jobs.slurm import SlurmTask, act_on_signal, cancel_dependents, carry_out, observe, requeue
from jobs.stop import Budget, Plan, decide
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
    # kept, but requeued only once SLURM answers: a requeue on the trainers' word undoes a cancel (N5)
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == ("preempted", "ask", False)
    assert "did not answer" in stop.why


def test_without_an_answer_from_the_controller_accounting_still_tells_a_cancel(
    slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    job = slurm_cluster.sbatch("#!/bin/sh\ntrap '' TERM\nsleep 60\n", "-o", "/dev/null")
    slurm_cluster.wait_job(job, "RUNNING")
    slurm_cluster.run("scancel", job)
    failing(tmp_path, monkeypatch, "scontrol")
    stop = decide(observe(task_of(job), "signal SIGTERM", "preempted"))
    assert (stop.outcome, stop.requeue, stop.cancel_dependents) == ("cancelled", "no", True)
    assert "accounting records a cancel" in stop.why


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
        why = "signal SIGUSR2; a warning before the time limit (RUNNING)"
        stop = Plan("timeout", "requeue", "after", False, False, why)
        assert carry_out(task_of(job), state_path, stop) == "fail"
        state = read_state(state_path)
        assert state["status"] == "failed" and state["error"].startswith("scontrol requeue failed: Socket")
        assert slurm_cluster.wait_job(waiting, "CANCELLED") == "CANCELLED"
    finally:
        slurm_cluster.run("scancel", job, waiting)


def test_the_jobs_waiting_on_a_job_are_cancelled_though_squeue_fails_at_first(
    slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A pruned job ends COMPLETED, meeting its evaluation's afterok: only node 0 cancels the evaluation,
    so one failed listing must not leave it to run (review N16)."""
    held = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", "--hold", "-o", "/dev/null")
    waiting = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", f"--dependency=afterok:{held}", "-o", "/dev/null")
    failing_first(tmp_path, monkeypatch, "squeue", times=2)
    try:
        assert cancel_dependents(int(held), attempts=3) == [waiting]
        assert slurm_cluster.wait_job(waiting, "CANCELLED") == "CANCELLED"
    finally:
        slurm_cluster.run("scancel", held, waiting)


def failing_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, times: int) -> None:
    """`command` fails as a controller that does not answer for its first `times` calls, then is real."""
    real, count = shutil.which(command), tmp_path / f"{command}.calls"
    shim = tmp_path / command
    shim.write_text(
        f"#!/bin/sh\necho call >> {count}\nif [ $(wc -l < {count}) -le {times} ]; then\n"
        "  echo 'Socket timed out on send/recv operation' >&2; exit 1\n"
        f'fi\nexec {real} "$@"\n'
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


@pytest.mark.parametrize("trainers", ["failed", "pruned"])
def test_a_requeue_made_at_the_signal_is_withdrawn_when_the_run_then_ends(
    slurm_cluster, tmp_path: Path, trainers: str
):
    """CANCEL-mode preemption without grace: node 0 requeues at the signal; the trainers then end `failed`
    or `pruned`: the requeue is withdrawn, the job stays ended and its evaluation goes (review N8)."""
    with slurm_cluster.profile(preempt="cancel"):
        job = slurm_cluster.sbatch(
            "#!/bin/sh\ntrap '' TERM\nsleep 120\n", "-c", "2", "-w", "n1", "-o", "/dev/null"
        )
        waiting = slurm_cluster.sbatch("#!/bin/sh\ntrue\n", f"--dependency=afterok:{job}", "-o", "/dev/null")
        try:
            slurm_cluster.wait_job(job, "RUNNING")
            slurm_cluster.preempt_node("n1")
            task = task_of(job)
            wait_until_shown(slurm_cluster, job, "JobState=COMPLETING")
            assert act_on_signal(task, "signal SIGTERM").requeue == "now"
            ended = {
                "job_id": int(job),
                "start_step": 0,
                "end_step": 3,
                "outcome": trainers,
                "reason": trainers,
            }
            plan = decide(observe(task, "signal SIGTERM", trainers), [ended], Budget(5))
            assert plan.withdraw
            carry_out(task, tmp_path / "state.json", plan)
            # once KillWait (30 s) ends the job task; the controller's view: accounting keeps REQUEUED
            wait_until_shown(slurm_cluster, job, "JobState=CANCELLED", timeout=120)
            time.sleep(8)  # past a requeued job's restart delay (cred_expire 5 s): it must not run again
            assert "JobState=CANCELLED" in slurm_cluster.run("scontrol", "show", "job", "-o", job).stdout
            assert slurm_cluster.wait_job(waiting, "CANCELLED") == "CANCELLED"
        finally:
            slurm_cluster.run("scancel", job, waiting)


def wait_until_shown(cluster, job: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in cluster.run("scontrol", "show", "job", "-o", job).stdout:
        assert time.monotonic() < deadline, f"job {job} never showed {text}"
        time.sleep(0.2)
