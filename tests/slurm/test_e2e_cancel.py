"""A cancel stays cancelled, end to end on the local cluster (review N4, N5): a `scancel` that lands while
a preemption's grace time runs and the trainers are still saving, and one that lands while slurmctld does
not answer node 0 (stopped with SIGSTOP), each under PreemptMode REQUEUE and CANCEL. Each run must end
CANCELLED and never run again (Restarts 0), record `cancelled`, and lose its evaluation.

Before the fix both came back: node 0 read the cancel within the grace time as a CANCEL-mode preemption
(COMPLETING, PreemptTime set) and requeued it at once; without an answer it requeued on the trainers'
`preempted`, and the requeue went through once slurmctld ran again.

Under each mode the two runs train side by side, the grace one on n1, the other on n2, so that the
preemption of n1 reaches only the first. The cluster keeps KillWait 90 and MessageTimeout 2 meanwhile:
a cancelled job's node 0 then outlives the frozen controller (as on clusters with a long KillWait), and
its questions time out in seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sogclr.contract.state import read_state
from testkit.e2e import job_ids, last_logged_step, release, submit, wait_until
from testkit.slurm_cluster import FINAL_STATES, cluster_of_its_own
from testkit.tiny import write_tiny_spec

# On a cluster of its own, beside the session's: most of its time is SLURM's timers (grace, KillWait) and a
# frozen controller, which would stop every other test of the session's cluster meanwhile.
CLUSTER_MARKS, slurm_cluster = cluster_of_its_own("cancel")
pytestmark = [*CLUSTER_MARKS, pytest.mark.timeout(1800)]

MODES = ("requeue", "cancel")
HOW = {"grace": "n1", "frozen": "n2"}  # the kind of cancel -> the node its run trains on
FROZEN_S = 80  # at most: within KillWait (90 s), so that node 0 outlives the frozen controller
PROFILE = {"grace_s": 30, "kill_wait_s": 90, "message_timeout_s": 2}
# Width 64: its checkpoint takes long enough to write that the cancel lands while the trainers save.
RECIPE = {"epochs": 20, "workers": 1, "width": 64}


def run_name(how: str, mode: str) -> str:
    return f"{how}-{mode}"


CASES = [(how, mode) for mode in MODES for how in HOW]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("cancel")


@pytest.fixture(scope="module")
def cancelled(workdir: Path, slurm_cluster: Any) -> dict[str, Path]:
    """Every run of CASES cancelled as its name says, under its mode's profile; node 0 has decided."""
    for how, mode in CASES:
        name = run_name(how, mode)
        slurm = {"additional": {"hold": True, "nodelist": HOW[how]}}
        assert submit(write_tiny_spec(workdir, name, slurm=slurm, pretrain=RECIPE)) == 0
    run_dirs = {run_name(*case): workdir / "runs" / run_name(*case) / run_name(*case) for case in CASES}
    for mode in MODES:
        with slurm_cluster.profile(preempt=mode, **PROFILE):
            names = [run_name(how, mode) for how in HOW]
            for name in names:
                release(slurm_cluster, workdir, name)
            for name in names:
                wait_until(lambda run_dir=run_dirs[name]: last_logged_step(run_dir) >= 3, f"{name} to train")
            for how, name in zip(HOW, names, strict=True):
                job = job_ids(workdir, name, name)["pretrain"]
                CANCELS[how](slurm_cluster, job, run_dirs[name])
                wait_until(
                    lambda job=job, name=name: decided(slurm_cluster, job, run_dirs[name]), "node 0", 300
                )
    return run_dirs


def cancel_within_grace(cluster: Any, job: str, run_dir: Path) -> None:
    """Preempted (grace 30 s), then cancelled as soon as SLURM has signalled it: while its trainers save."""
    cluster.preempt_node(HOW["grace"])
    wait_until(lambda: "PreemptTime=20" in shown(cluster, job), "the preemption", poll_s=0.05)
    cluster.run("scancel", job)


def cancel_while_frozen(cluster: Any, job: str, run_dir: Path) -> None:
    """Cancelled; slurmctld stopped once node 0 has seen the cancel at the signal, until node 0 has asked
    again after its trainers exited (and, unanswered, recorded the attempt or begun a requeue)."""
    cluster.run("scancel", job)
    wait_until(lambda: "requeue no" in job_log(run_dir, "out"), "node 0 to decide at the signal", poll_s=0.05)
    with cluster.frozen_controller():
        wait_until(lambda: node_0_has_asked(run_dir), "node 0 to ask after its trainers", FROZEN_S)


def node_0_has_asked(run_dir: Path) -> bool:
    """Node 0 recorded the attempt, or began a requeue (its failed tries are logged)."""
    tried = "scontrol requeue" in job_log(run_dir, "out") + job_log(run_dir, "err")
    return bool(read_state(run_dir / "state.json").get("attempts")) or tried


def job_log(run_dir: Path, stream: str) -> str:
    return "".join(log.read_text() for log in (run_dir / "slurm").glob(f"*_0_log.{stream}"))


def shown(cluster: Any, job: str) -> str:
    return cluster.run("scontrol", "show", "job", "-o", job).stdout


CANCELS = {"grace": cancel_within_grace, "frozen": cancel_while_frozen}


def decided(cluster: Any, job: str, run_dir: Path) -> bool:
    """Node 0 has recorded the attempt, or the job has ended (its job task killed first), or come back."""
    back = "Restarts=0" not in shown(cluster, job)
    return (
        bool(read_state(run_dir / "state.json").get("attempts")) or back or cluster.state(job) in FINAL_STATES
    )


@pytest.mark.parametrize(("how", "mode"), CASES, ids=[run_name(*case) for case in CASES])
def test_a_cancel_stays_cancelled(
    how: str, mode: str, workdir: Path, cancelled: dict[str, Path], slurm_cluster
):
    name = run_name(how, mode)
    ids = job_ids(workdir, name, name)
    wait_until(lambda: slurm_cluster.state(ids["pretrain"]) in FINAL_STATES, f"{name}'s job to end", 300)
    time.sleep(8)  # past a requeued job's restart delay (cred_expire 5 s)
    view = shown(slurm_cluster, ids["pretrain"])
    assert "JobState=CANCELLED" in view and "Restarts=0" in view, view
    state = wait_until(lambda: cancelled_state(cancelled[name]), f"{name} recorded as cancelled", 120)
    assert state["attempts"][-1]["outcome"] == "cancelled", state["attempts"]
    assert slurm_cluster.wait_job(ids["lincls"], "CANCELLED", timeout=180) == "CANCELLED"


def cancelled_state(run_dir: Path) -> dict[str, Any] | None:
    state = read_state(run_dir / "state.json")
    return state if state.get("status") == "cancelled" and state.get("attempts") else None
