"""What real clusters do to a run, end to end on the local SLURM cluster under its default profile (SLURM's
defaults with partition-priority preemption, REQUEUE mode, no grace time: testkit/slurm_cluster.py):
preemption by a high-priority job (SIGTERM; tests/slurm/test_e2e_matrix.py has the other profiles), a cancel,
a real time limit, a trainer killed with -9, a node lost. Each run but the cancelled one ends COMPLETED in
sacct, `done`, with its linear evaluation, and the interrupted ones with the weights, optimizer state and u of
an uninterrupted run.

Sweeps are submitted up front (module fixtures) so that they train side by side; faults on one node may
hit other tests' jobs too, so assertions ask for the attempt they caused, not for an exact history.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from sogclr.contract.layout import PhaseLayout, RunLayout
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

# On a cluster of its own, beside the session's. The runs train side by side on two nodes, and the first
# test waits for all of them to be dealt their fault (the time limit's takes minutes): room for a loaded
# machine.
CLUSTER_MARKS, slurm_cluster = cluster_of_its_own("faults")
pytestmark = [*CLUSTER_MARKS, pytest.mark.timeout(1800)]
WAIT_S = 1200

# Loader workers on: SLURM's SIGTERM reaches them too, and they must not take the trainer down.
RECIPE = {"epochs": RUNWAY_EPOCHS, "workers": 1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("faults")


RUNS = {  # name -> the spec's sections
    # Its first attempt is frozen until SLURM's timer signals it (`freeze_until_the_timer`), so that the timer
    # fires on any machine without a run long enough for the fastest one. The timer fires on a 30 s grid
    # (USR2 88 and 94 s after the trainer started, in two runs here), time for the second attempt to end.
    "timelimit": {"slurm": {"time": "00:03:00", "signal_lead_s": 60}, "pretrain": RECIPE},
    "preempt": {"pretrain": RECIPE},
    "kill9": {"pretrain": RECIPE},
    "cancel": {"pretrain": {"epochs": 50}},
    "twonode": {"slurm": {"nodes": 2}, "pretrain": {"epochs": RUNWAY_EPOCHS}},
}


@pytest.fixture(scope="module")
def runs(workdir: Path, slurm_cluster: Any) -> dict[str, Path]:
    """Every run of the module, submitted held, then released one by one and each dealt its fault as
    soon as it trains; the tests then wait for the outcomes, which come side by side."""
    for name, sections in RUNS.items():
        slurm = {**sections.get("slurm", {}), "additional": {"hold": True}}
        assert submit(write_tiny_spec(workdir, name, **{**sections, "slurm": slurm})) == 0
    run_dirs = {name: workdir / "runs" / name / name for name in RUNS}
    faults = [("preempt", preempt), ("kill9", kill9), ("cancel", scancel), ("twonode", lose_n2)]
    # The time limit last: its frozen trainer would be hit by the other faults on its node.
    for name, deal in [*faults, ("timelimit", freeze_until_the_timer)]:
        release(slurm_cluster, workdir, name)
        wait_until(lambda run_dir=run_dirs[name]: last_logged_step(run_dir) >= 3, f"{name} to take 3 steps")
        deal(slurm_cluster, workdir, run_dirs[name])
    return run_dirs


def freeze_until_the_timer(cluster: Any, workdir: Path, run_dir: Path) -> None:
    """The trainer is stopped (SIGSTOP: a step that takes minutes, at no CPU) until SLURM's time-limit
    warning is pending for it, then continued: it saves at its step and the attempt ends `timeout`."""
    trainer = wait_until(lambda: trainer_pids(run_dir), "the trainer process")[0]
    os.kill(trainer, signal.SIGSTOP)
    try:
        wait_until(lambda: pending_or_gone(trainer, signal.SIGUSR2), "SLURM's time-limit warning", 300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(trainer, signal.SIGCONT)


def pending_or_gone(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` waits for process `pid` (a stopped process takes it when continued), or it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    pending = [line.split()[1] for line in status.splitlines() if line.startswith(("SigPnd", "ShdPnd"))]
    masks = [int(mask, 16) for mask in pending]
    return any(mask >> (sig - 1) & 1 for mask in masks) or "\nState:\tZ" in status


def preempt(cluster: Any, workdir: Path, run_dir: Path) -> None:
    cluster.preempt_node(cluster.node_of(job_ids(workdir, "preempt", "preempt")["pretrain"]))


def kill9(cluster: Any, workdir: Path, run_dir: Path) -> None:
    trainer = wait_until(lambda: trainer_pids(run_dir), "the trainer process")[0]
    os.kill(trainer, signal.SIGKILL)


def scancel(cluster: Any, workdir: Path, run_dir: Path) -> None:
    cluster.run("scancel", job_ids(workdir, "cancel", "cancel")["pretrain"])


def lose_n2(cluster: Any, workdir: Path, run_dir: Path) -> None:
    """Node 1 of the two-node run is lost; it comes back once SLURM has declared it DOWN."""
    cluster.lose_node("n2")
    try:
        wait_until(
            lambda: "transient" in outcomes(read_state(run_dir / "state.json")),
            "node 0 to record the lost node",
            timeout=120,
        )
        wait_until(
            lambda: cluster.node_state("n2").startswith("down"), "SLURM to declare n2 down", timeout=120
        )
    finally:
        cluster.restore_node("n2")


@pytest.fixture(scope="module")
def reference(workdir: Path, runs: dict[str, Path]) -> Path:
    """RECIPE trained without interruption, outside SLURM (preempt, kill9 and timelimit share the recipe)."""
    reference_dir = workdir / "reference"
    process = start_uninterrupted_reference(runs["preempt"], reference_dir)
    assert process.wait(timeout=WAIT_S) == 0
    return reference_dir


def wait_done(run_dir: Path, workdir: Path) -> dict[str, Any]:
    """Until pretraining is COMPLETED in sacct and the evaluation's result is there; the final state."""
    name = run_dir.name
    ids = job_ids(workdir, name, name)
    wait_until(
        lambda: sacct_state(ids["pretrain"]) == "COMPLETED", f"{name}'s pretraining to complete", WAIT_S
    )
    # The evaluation's own record, not its job's sacct state: the two-node run's lost node may take the job
    # down after the evaluation finished (measured: FAILED on n2 under load).
    lincls = RunLayout(run_dir).lincls
    wait_until(lambda: lincls_done(lincls), f"{name}'s linear evaluation", WAIT_S)
    assert lincls.result.is_file()
    state = read_state(run_dir / "state.json")
    attempts_chain(state)
    assert {a["job_id"] for a in state["attempts"]} == {int(ids["pretrain"])}  # requeued, never resubmitted
    return state


def lincls_done(lincls: PhaseLayout) -> bool:
    return read_state(lincls.state).get("status") == "done"


def outcomes(state: dict[str, Any]) -> list[str]:
    return [attempt["outcome"] for attempt in state["attempts"]]


def test_preempted_by_a_high_priority_job_resumes_from_its_saved_step(
    runs: dict[str, Path], workdir: Path, reference: Path
):
    state = wait_done(runs["preempt"], workdir)
    preempted = [a for a in state["attempts"] if a["outcome"] == "preempted"]
    assert preempted, outcomes(state)
    assert "SIGTERM" in preempted[0]["reason"] and "preempted by SLURM" in preempted[0]["reason"]
    assert preempted[0]["end_step"] >= 3  # saved at the signal, not at the last epoch boundary
    assert state["requeues"] >= 1
    assert_identical(final_state(runs["preempt"]), final_state(reference))


def test_a_trainer_killed_with_sigkill_is_requeued_as_transient(
    runs: dict[str, Path], workdir: Path, reference: Path
):
    state = wait_done(runs["kill9"], workdir)
    assert any(a["outcome"] == "transient" and "without a record" in a["reason"] for a in state["attempts"])
    assert_identical(final_state(runs["kill9"]), final_state(reference))


def test_scancel_ends_the_run_as_cancelled_without_its_evaluation(
    runs: dict[str, Path], workdir: Path, capsys: pytest.CaptureFixture
):
    run_dir = runs["cancel"]
    ids = job_ids(workdir, "cancel", "cancel")
    wait_until(lambda: sacct_state(ids["pretrain"]) == "CANCELLED", "the job to be cancelled")
    wait_until(lambda: sacct_state(ids["lincls"]) == "CANCELLED", "node 0 to cancel its evaluation")
    wait_until(lambda: read_state(run_dir / "state.json").get("status") == "cancelled", "status cancelled")
    state = read_state(run_dir / "state.json")
    assert outcomes(state)[-1] == "cancelled" and "a cancel" in state["attempts"][-1]["reason"]
    assert sacct_state(ids["pretrain"]) == "CANCELLED"  # not requeued: it would be PENDING or RUNNING again
    assert not (run_dir / "lincls").exists()
    capsys.readouterr()
    assert cli.main(["status", str(workdir / "cancel.yaml")]) == 0
    assert "cancelled" in capsys.readouterr().out


def test_a_real_time_limit_requeues_through_slurms_own_timer(
    runs: dict[str, Path], workdir: Path, reference: Path
):
    state = wait_done(runs["timelimit"], workdir)
    timeouts = [a for a in state["attempts"] if a["outcome"] == "timeout"]
    assert timeouts and all("before the time limit" in a["reason"] for a in timeouts)
    assert timeouts[0]["end_step"] >= 3  # saved at the signal, at the step it was frozen in
    assert_identical(final_state(runs["timelimit"]), final_state(reference))


def test_a_two_node_job_that_loses_a_node_resumes_once_the_node_is_back(runs: dict[str, Path], workdir: Path):
    state = wait_done(runs["twonode"], workdir)
    lost = next(a for a in state["attempts"] if a["outcome"] == "transient")
    assert "lost its peer" in lost["reason"] or "without a record" in lost["reason"]
    assert state["attempts"][-1]["hosts"] == ["n1", "n2"]
