"""End to end against a real local SLURM cluster (testkit/slurm_cluster.py): submit, preempt, requeue, chain.

Everything is tiny (digits at 16 px, ResNet-18, batch 64, one CPU per job) so that the whole file runs in a
few minutes on two emulated nodes. Sweeps are submitted as early as possible and waited on later, so that
the cluster's four CPUs work while other tests wait. Waits poll with generous timeouts; no sleep asserts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch import cli
from launch.manifest import read_manifest
from sogclr.contract.state import read_state
from testkit.e2e import (
    TIMEOUT_S,
    assert_identical,
    final_state,
    job_ids,
    last_logged_step,
    sacct_state,
    start_uninterrupted_reference,
    submit,
    wait_until,
)
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import RUNWAY_EPOCHS, STEPS_PER_EPOCH, write_tiny_spec, write_undecodable_dataset

pytestmark = SLURM_MODULE


# --- the module's sweeps, submitted up front ----------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def preempt_spec(workdir: Path) -> Path:
    """No evaluation; the test signals it mid-epoch."""
    spec = write_tiny_spec(workdir, "preempt", pretrain={"epochs": RUNWAY_EPOCHS}, lincls=None)
    assert submit(spec) == 0
    return spec


@pytest.fixture(scope="module")
def sweep_spec(workdir: Path, preempt_spec: Path) -> Path:
    spec = write_tiny_spec(workdir, "pair", sweep={"product": {"gamma": [0.5, 0.9]}})
    assert submit(spec) == 0
    return spec


@pytest.fixture(scope="module")
def two_node_spec(workdir: Path, sweep_spec: Path) -> Path:
    spec = write_tiny_spec(workdir, "twonode", slurm={"nodes": 2})
    assert submit(spec) == 0
    return spec


@pytest.fixture(scope="module")
def crash_spec(workdir: Path, two_node_spec: Path) -> Path:
    """Dataset `folder` of files that are no images: training crashes on every attempt."""
    junk = write_undecodable_dataset(workdir / "junk")
    spec = write_tiny_spec(workdir, "crash", pretrain={"dataset": "folder", "data_dir": str(junk)})
    assert submit(spec) == 0
    return spec


# --- tests ---------------------------------------------------------------------------------------------


def test_warned_job_is_requeued_and_resumes_mid_epoch(workdir: Path, preempt_spec: Path, crash_spec: Path):
    run_dir = workdir / "runs" / "preempt" / "preempt"
    reference_dir = workdir / "reference"
    reference = start_uninterrupted_reference(run_dir, reference_dir)
    job = job_ids(workdir, "preempt", "preempt")["pretrain"]

    wait_until(lambda: last_logged_step(run_dir) >= 3, "the first attempt to take 3 steps")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # as SLURM warns before the time limit
    # COMPLETED comes after the job layer has recorded the last attempt (the trainer's `done` comes before)
    wait_until(lambda: sacct_state(job) == "COMPLETED", "the requeued job to complete")
    state = read_state(run_dir / "state.json")
    first, second = state["attempts"]
    assert (first["outcome"], second["outcome"]) == ("timeout", "done")
    assert first["job_id"] == second["job_id"] == int(job)  # requeued, not resubmitted
    assert (first["restart_count"], second["restart_count"]) == (0, 1)
    assert state["requeues"] == 1
    # resumed from the step saved at the signal, in the middle of an epoch (not from its start)
    assert 3 <= first["end_step"] == second["start_step"] < RUNWAY_EPOCHS * STEPS_PER_EPOCH
    assert first["end_step"] % STEPS_PER_EPOCH != 0
    logged = [yaml.safe_load(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, RUNWAY_EPOCHS * STEPS_PER_EPOCH + 1))  # no step taken twice, none skipped

    assert reference.wait(timeout=TIMEOUT_S) == 0
    assert_identical(final_state(run_dir), final_state(reference_dir))


def test_sweep_completes_with_both_evaluations(workdir: Path, sweep_spec: Path, capsys):
    for run in ("gamma0.5", "gamma0.9"):
        result = workdir / "runs" / "pair" / run / "lincls" / "result.json"
        wait_until(result.is_file, f"{run}'s linear evaluation")
        assert 0 <= read_state(result)["top1"] <= 100
        config = yaml.safe_load((workdir / "runs" / "pair" / run / "config.yaml").read_text())
        assert config["meta"]["point"] == {"pretrain.gamma": float(run.removeprefix("gamma"))}
        assert config["meta"]["resources"]["pretrain"]["cpus_per_task"] == 1

    capsys.readouterr()
    assert cli.main(["status", str(sweep_spec)]) == 0
    table = capsys.readouterr().out
    assert table.count("done") >= 4  # both phases of both runs


def test_submitting_again_creates_no_jobs(workdir: Path, sweep_spec: Path, capsys):
    before = read_manifest(workdir / "runs" / "pair")
    queue_before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert submit(sweep_spec) == 0
    assert "nothing:" in capsys.readouterr().out
    assert read_manifest(workdir / "runs" / "pair") == before
    queue_after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(queue_after) <= set(queue_before)


def test_two_node_run_trains_and_evaluates(workdir: Path, two_node_spec: Path):
    run_dir = workdir / "runs" / "twonode" / "twonode"
    wait_until((run_dir / "lincls" / "result.json").is_file, "the two-node run's evaluation")
    last = read_state(run_dir / "state.json")["attempts"][-1]  # other tests may preempt it: any number
    assert last["hosts"] == ["n1", "n2"] and last["outcome"] == "done"


def test_crashing_run_fails_once_and_its_evaluation_is_cancelled(workdir: Path, crash_spec: Path):
    ids = job_ids(workdir, "crash", "crash")
    wait_until(lambda: sacct_state(ids["pretrain"]) == "FAILED", "the crashing job to fail")
    wait_until(lambda: sacct_state(ids["lincls"]) == "CANCELLED", "its evaluation to be cancelled")
    state = read_state(workdir / "runs" / "crash" / "crash" / "state.json")
    assert state["status"] == "failed" and state["requeues"] == 0
    assert [a["outcome"] for a in state["attempts"]] == ["failed"]


def test_cancel_cancels_this_sweeps_jobs_only(workdir: Path, crash_spec: Path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells at the default 80
    long = write_tiny_spec(workdir, "long", pretrain={"epochs": 50})
    other = subprocess.run(
        ["sbatch", "--parsable", "--wrap", "sleep 300", "-o", "/dev/null"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert submit(long) == 0
    ids = job_ids(workdir, "long", "long")

    assert cli.main(["cancel", str(long)]) == 0
    for job in ids.values():
        wait_until(lambda job=job: sacct_state(job) == "CANCELLED", f"job {job} to be cancelled")
    # the controller's view: accounting may not have recorded the foreign job yet
    foreign = subprocess.run(["squeue", "-h", "-j", other, "-o", "%T"], capture_output=True, text=True)
    assert foreign.stdout.strip() in ("PENDING", "RUNNING")
    subprocess.run(["scancel", other], check=True)

    capsys.readouterr()
    assert cli.main(["status", str(long)]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert submit(long) == 0  # without --resubmit-failed: nothing new
    assert job_ids(workdir, "long", "long") == ids


def test_an_evaluation_that_can_never_run_is_replaced_on_resubmission(workdir: Path, capsys, monkeypatch):
    """Without kill_invalid_depend, cancelling a pretraining before it starts (nothing of ours runs to
    clean up) leaves its evaluation pending for ever; `status` says so and a resubmission replaces it."""
    monkeypatch.setenv("COLUMNS", "200")
    held = {"additional": {"hold": True}}  # the pretraining only: it never starts
    spec = write_tiny_spec(workdir, "orphan", slurm=held, lincls={"slurm": {"additional": {}}})
    assert submit(spec) == 0
    first = job_ids(workdir, "orphan", "orphan")
    subprocess.run(["scancel", first["pretrain"]], check=True)
    wait_until(lambda: sacct_state(first["pretrain"]) == "CANCELLED", "the pretraining to be cancelled")
    never = "pending (dependency never satisfied)"
    wait_until(lambda: never in cli_out(capsys, "status", str(spec)), "status to see the stuck evaluation")

    assert submit(spec, "--resubmit-failed", "--set", "slurm.additional={}") == 0
    second = job_ids(workdir, "orphan", "orphan")
    assert second["pretrain"] != first["pretrain"] and second["lincls"] != first["lincls"]
    wait_until(lambda: sacct_state(first["lincls"]) == "CANCELLED", "the stuck evaluation to be cancelled")
    wait_until(
        (workdir / "runs" / "orphan" / "orphan" / "lincls" / "result.json").is_file, "the new evaluation"
    )


def cli_out(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out
