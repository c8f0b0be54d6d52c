"""docs/cluster.md's promises under each cluster profile where SLURM behaves differently, end to end on the
local cluster: preemption with grace 0 and 30, PreemptMode REQUEUE and CANCEL, by partition priority and
by QOS (eight profiles, switched live); a cancel under SLURM's defaults (no kill_invalid_depend),
including an evaluation whose dependency can never be met; a trainer's CPUs where the cluster binds
tasks to cores.

Every preempted run is submitted held; under each profile in turn one is released, preempted once it
trains, and left to come back. They then finish side by side: each must end COMPLETED in sacct, `done`,
evaluated, with the weights, optimizer state and u of an uninterrupted run. A preemption may hit the
other runs on the same node too: assertions ask for the attempt each profile caused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launch import cli
from sogclr.contract.layout import RunLayout
from sogclr.contract.state import read_state
from testkit.e2e import (
    assert_identical,
    attempts_chain,
    final_state,
    job_ids,
    last_logged_step,
    release,
    sacct_state,
    start_uninterrupted_reference,
    submit,
    trainer_pids,
    wait_until,
)
from testkit.slurm_cluster import cluster_of_its_own
from testkit.tiny import RUNWAY_EPOCHS, write_tiny_spec

CLUSTER_MARKS, slurm_cluster = cluster_of_its_own("matrix")  # beside the session's cluster
pytestmark = [*CLUSTER_MARKS, pytest.mark.timeout(1800)]
WAIT_S = 1200

RECIPE = {"epochs": RUNWAY_EPOCHS, "workers": 1}  # loader workers on: SLURM's SIGTERM reaches them too
# (preempt_type, preempt mode, grace_s): every combination, each a profile of its own.
PREEMPTIONS = [
    (kind, mode, grace)
    for kind in ("partition", "qos")
    for mode in ("requeue", "cancel")
    for grace in (0, 30)
]
# What node 0 finds once the trainers have saved: with a grace time the job still runs, and node 0
# requeues it; without one SLURM has requeued it (REQUEUE) or node 0 did so at the signal (CANCEL).
SEEN_AFTER = {0: "which has requeued the job", 30: "within its grace time"}


def run_name(kind: str, mode: str, grace: int) -> str:
    return f"{kind}-{mode}-{grace}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def preempted(workdir: Path, slurm_cluster: Any) -> dict[str, Path]:
    """Each run of PREEMPTIONS preempted once under its own profile; they finish side by side."""
    names = [run_name(*combination) for combination in PREEMPTIONS]
    for name in names:
        spec = write_tiny_spec(workdir, name, slurm={"additional": {"hold": True}}, pretrain=RECIPE)
        assert submit(spec) == 0
    run_dirs = {name: workdir / "runs" / name / name for name in names}
    for (kind, mode, grace), name in zip(PREEMPTIONS, names, strict=True):
        with slurm_cluster.profile(preempt_type=kind, preempt=mode, grace_s=grace):
            release(slurm_cluster, workdir, name)
            wait_until(
                lambda run_dir=run_dirs[name]: last_logged_step(run_dir) >= 3, f"{name} to take 3 steps"
            )
            job = job_ids(workdir, name, name)["pretrain"]
            slurm_cluster.preempt_node(slurm_cluster.node_of(job))
            wait_until(lambda run_dir=run_dirs[name]: stopped(run_dir), f"{name}'s node 0 to decide", 180)
    return run_dirs


def stopped(run_dir: Path) -> bool:
    return any(a["outcome"] == "preempted" for a in read_state(run_dir / "state.json").get("attempts", []))


@pytest.fixture(scope="module")
def reference(workdir: Path, preempted: dict[str, Path]) -> Path:
    """RECIPE trained without interruption, outside SLURM."""
    reference_dir = workdir / "reference"
    process = start_uninterrupted_reference(next(iter(preempted.values())), reference_dir)
    assert process.wait(timeout=WAIT_S) == 0
    return reference_dir


@pytest.mark.parametrize(("kind", "mode", "grace"), PREEMPTIONS, ids=[run_name(*c) for c in PREEMPTIONS])
def test_a_preempted_run_comes_back_resumes_and_is_evaluated(
    kind: str, mode: str, grace: int, workdir: Path, preempted: dict[str, Path], reference: Path
):
    name = run_name(kind, mode, grace)
    run_dir = preempted[name]
    ids = job_ids(workdir, name, name)
    wait_until(lambda: sacct_state(ids["pretrain"]) == "COMPLETED", f"{name}'s pretraining", WAIT_S)
    lincls = RunLayout(run_dir).lincls
    wait_until(lambda: read_state(lincls.state).get("status") == "done", f"{name}'s evaluation", WAIT_S)
    assert lincls.result.is_file()
    state = read_state(run_dir / "state.json")
    attempts_chain(state)
    assert {a["job_id"] for a in state["attempts"]} == {int(ids["pretrain"])}  # requeued, never resubmitted
    first = next(a for a in state["attempts"] if a["outcome"] == "preempted")
    assert "SIGTERM" in first["reason"] and SEEN_AFTER[grace] in first["reason"], first["reason"]
    assert first["end_step"] >= 3  # saved at the signal
    assert all(a["outcome"] in ("preempted", "done") for a in state["attempts"]), state["attempts"]
    assert_identical(final_state(run_dir), final_state(reference))


def test_a_cancelled_sweep_leaves_nothing_in_the_queue_even_an_evaluation_that_can_never_run(
    workdir: Path, slurm_cluster: Any, capsys: pytest.CaptureFixture
):
    """Under SLURM's defaults (no kill_invalid_depend): a pretraining cancelled while held never runs its
    node 0, so nothing in the job cancels the evaluation; `sogclr-submit cancel` must."""
    spec = write_tiny_spec(workdir, "nevermet", slurm={"additional": {"hold": True}})
    assert submit(spec) == 0
    ids = job_ids(workdir, "nevermet", "nevermet")
    slurm_cluster.run("scancel", ids["pretrain"])
    slurm_cluster.run("scontrol", "release", ids["lincls"])  # held too: hold is a spec-wide sbatch option
    wait_until(
        lambda: "DependencyNeverSatisfied" in reason_of(slurm_cluster, ids["lincls"]), "never satisfied"
    )
    assert cli.main(["cancel", str(spec)]) == 0
    assert slurm_cluster.wait_job(ids["lincls"], "CANCELLED") == "CANCELLED"
    assert slurm_cluster.wait_job(ids["pretrain"], "CANCELLED") == "CANCELLED"


def reason_of(cluster: Any, job: str) -> str:
    return cluster.run("squeue", "-h", "-j", job, "-o", "%r", check=False).stdout


def test_a_trainer_gets_every_cpu_of_its_task_where_the_cluster_binds_tasks_to_cores(
    workdir: Path, slurm_cluster: Any
):
    spec = write_tiny_spec(workdir, "bound", slurm={"cpus_per_task": 2}, pretrain={"epochs": 20}, lincls=None)
    with slurm_cluster.profile(cpu_bind="cores"):
        assert submit(spec) == 0
        run_dir = workdir / "runs" / "bound" / "bound"
        try:
            trainer = wait_until(lambda: trainer_pids(run_dir), "the trainer", 300)[0]
            allowed = cpus_allowed(trainer)
        finally:
            assert cli.main(["cancel", str(spec)]) == 0
    assert len(allowed) == 2, allowed  # srun 22.05 without --cpus-per-task: one CPU


def cpus_allowed(pid: int) -> set[int]:
    """The CPUs `pid` may run on, from /proc ("0-1" -> {0, 1})."""
    status = Path(f"/proc/{pid}/status").read_text()
    listed = next(
        line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list")
    )
    cpus = set()
    for part in listed.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def test_a_warning_in_the_first_second_of_a_job_does_not_kill_its_job_task(workdir: Path, slurm_cluster: Any):
    """USR2 as soon as the job step exists, before Python has installed a handler (review finding 29):
    the job task starts with it ignored (before: killed by it, the job FAILED, no attempt recorded)."""
    spec = write_tiny_spec(workdir, "early", slurm={"additional": {"hold": True}}, lincls=None)
    assert submit(spec) == 0
    job = job_ids(workdir, "early", "early")["pretrain"]
    slurm_cluster.run("scontrol", "release", job)
    steps = lambda: slurm_cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i", check=False).stdout  # noqa: E731
    wait_until(lambda: f"{job}.0" in steps(), "the job step", poll_s=0.02)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    assert slurm_cluster.wait_job(job, timeout=WAIT_S) == "COMPLETED"
    assert read_state(workdir / "runs" / "early" / "early" / "state.json")["status"] == "done"
