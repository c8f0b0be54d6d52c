"""The launcher on a cluster that does not answer, and on one without accounting: a second real cluster
(scripts/local-slurm with SOGCLR_SLURM_ACCOUNTING=0, MinJobAge 10 s), beside the session's.

The controller is frozen for real (SIGSTOP to slurmctld, SIGCONT after), and clients wait at most
MessageTimeout=3 s for it (SLURM's default is 10 s). Measured (22.05): sbatch fails after MessageTimeout
with `Socket timed out on send/recv operation`, and once continued, the controller creates the job all
the same.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from launch.local import owning
from launch.manifest import read_manifest
from launch.spec import expand, load_spec
from launch.standing import standings
from testkit.e2e import job_ids, wait_until
from testkit.slurm_cluster import another_cluster
from testkit.tiny import write_tiny_spec, write_undecodable_dataset

pytestmark = pytest.mark.xdist_group("slurm-unanswered")  # its own cluster: beside the session's tests

HELD = {"additional": {"hold": True}}  # queued, never started


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    settings = {
        "SOGCLR_SLURM_ACCOUNTING": "0",
        "SOGCLR_SLURM_MIN_JOB_AGE": "10",
        "SOGCLR_SLURM_MESSAGE_TIMEOUT_S": "3",
    }
    with another_cluster("unanswered", **settings) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, cluster: Any) -> Path:
    return tmp_path_factory.mktemp("unanswered")


def jobs_named(name: str) -> list[str]:
    """Every job or array task of ours with this name, in any state."""
    command = ["squeue", "--me", "-h", "-r", "-t", "all", "--name", name, "-o", "%i"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()


def output(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())  # rich may wrap long lines


@pytest.fixture(scope="module")
def lost_replies(cluster: Any, workdir: Path) -> dict[str, Path]:
    return {
        "array": write_tiny_spec(workdir, "lostarray", slurm=HELD, sweep={"product": {"gamma": [0.5, 0.9]}}),
        "single": write_tiny_spec(workdir, "lostsingle", slurm={**HELD, "arrays": False}),
    }


def test_a_submission_whose_sbatch_reply_is_lost_makes_exactly_one_job_per_run(
    cluster: Any, workdir: Path, lost_replies: dict[str, Path], capsys: pytest.CaptureFixture
):
    with cluster.frozen_controller():
        for spec in lost_replies.values():
            assert cli.main([str(spec)]) == 1
            error = output(capsys)
            assert "sbatch failed: sbatch: error: Batch job submission failed: Socket timed out" in error
            assert "SLURM could not say whether it made the job" in error
            assert "the next submission looks for it before submitting again" in error
        (run, _) = expand(load_spec(lost_replies["array"]))
        standing = standings([run], read_manifest(workdir / "runs" / "lostarray"))[run.name]["pretrain"]
        assert standing.state == "unknown" and standing.reason.startswith(
            "an sbatch's reply was lost, and whether it made the job: squeue failed"
        )
    # continued, the controller makes the jobs whose replies were lost
    wait_until(lambda: jobs_named("lostarray.pretrain"), "the lost array to appear", timeout=60)
    wait_until(lambda: jobs_named("lostsingle.lostsingle.pretrain"), "the lost job to appear", timeout=60)
    lost = {"array": jobs_named("lostarray.pretrain"), "single": jobs_named("lostsingle.lostsingle.pretrain")}

    for spec in lost_replies.values():
        assert cli.main([str(spec)]) == 0  # finds the job by its token, submits the rest
    assert sorted(jobs_named("lostarray.pretrain")) == sorted(lost["array"]) and len(lost["array"]) == 2
    assert jobs_named("lostsingle.lostsingle.pretrain") == lost["single"] and len(lost["single"]) == 1
    array = {run: job_ids(workdir, "lostarray", run) for run in ("gamma0.5", "gamma0.9")}
    assert sorted(ids["pretrain"] for ids in array.values()) == sorted(lost["array"])
    # the evaluations: one array, task i after pretraining task i
    assert sorted(jobs_named("lostarray.lincls")) == sorted(ids["lincls"] for ids in array.values())
    assert job_ids(workdir, "lostsingle", "lostsingle")["pretrain"] == lost["single"][0]
    assert len(jobs_named("lostsingle.lostsingle.lincls")) == 1
    for spec in lost_replies.values():
        assert cli.main([str(spec)]) == 0  # and again: nothing new
    assert len(jobs_named("lostarray.pretrain")) == 2 and len(jobs_named("lostarray.lincls")) == 2
    assert not read_manifest(workdir / "runs" / "lostarray").get("pending")


def test_status_and_cancel_under_a_frozen_controller_act_on_nothing(
    cluster: Any, lost_replies: dict[str, Path], capsys: pytest.CaptureFixture
):
    spec = lost_replies["array"]
    queued = sorted(jobs_named("lostarray.pretrain") + jobs_named("lostarray.lincls"))
    assert len(queued) == 4
    with cluster.frozen_controller():
        assert cli.main(["status", str(spec)]) == 0
        shown = output(capsys)  # table cells wrap: the reasons are whole in the cancel's warnings
        assert shown.count("unknown:") == 4 and "Socket" in shown, shown
        assert cli.main(["cancel", str(spec)]) == 1
        shown = output(capsys)
        assert shown.count("not cancelled: unknown: squeue failed: slurm_load_jobs error: Socket timed") == 4
        assert "cancelled job" not in shown
        assert cli.main([str(spec), "--resubmit-failed"]) == 1
        assert output(capsys).count("nothing: unknown") == 2
    states = subprocess.run(
        ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(queued), "-o", "%T"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert states == ["PENDING"] * 4
    assert cli.main(["cancel", str(spec)]) == 0
    assert output(capsys).count("cancelled job") == 4


def test_without_accounting_a_forgotten_job_is_read_from_its_run_directory(
    workdir: Path, capsys: pytest.CaptureFixture
):
    junk = write_undecodable_dataset(workdir / "junk")  # training fails on its first batch
    spec = write_tiny_spec(workdir, "noacct", pretrain={"dataset": "folder", "data_dir": str(junk)})
    assert cli.main([str(spec)]) == 0
    first = job_ids(workdir, "noacct", "noacct")

    def forgotten() -> bool:  # ended, and past MinJobAge: squeue knows it no more, and sacct never did
        listed = subprocess.run(["squeue", "-h", "-t", "all", "-j", first["pretrain"]], capture_output=True)
        return listed.returncode != 0 or not listed.stdout.strip()

    wait_until(forgotten, "the controller to forget the failed job", timeout=300)
    assert cli.main(["status", str(spec)]) == 0
    shown = output(capsys)
    assert "failed (run dir)" in shown and "unknown" not in shown, shown
    (run,) = expand(load_spec(spec))
    with owning(load_spec(spec), [run], reconfigure=False):
        pass  # --local would run it: no job of it can be queued or running
    assert cli.main([str(spec), "--resubmit-failed", "--set", "slurm.additional.hold=true"]) == 0
    second = job_ids(workdir, "noacct", "noacct")
    assert second["pretrain"] != first["pretrain"] and second["lincls"] != first["lincls"]
    assert "resubmitted (pretraining was failed (run dir))" in output(capsys)
    assert cli.main(["cancel", str(spec)]) == 0
