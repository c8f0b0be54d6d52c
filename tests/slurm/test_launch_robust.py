"""The launcher where things go wrong: a refused sbatch, SLURM that cannot be asked, ids that name other
jobs, local runs beside SLURM jobs, and recipes changed behind a run's back. The SLURM tests use the real
local cluster; a shim on PATH stands in for a SLURM command only to make it fail on purpose."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from launch.configs import check_recipes, write_run_config
from launch.manifest import read_manifest, record_job, write_manifest
from launch.snapshot import live_code
from launch.spec import expand, load_spec
from sogclr import pretrain
from testkit.e2e import job_ids
from testkit.slurm_cluster import SLURM_GROUP
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_GROUP  # some of its tests need the cluster: the same worker as the others

HELD = {"additional": {"hold": True}}  # queued, never started: nothing trains, nothing uses a CPU


def error_line(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich may wrap long lines


def failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, message: str) -> None:
    """Put a `command` first on PATH that prints `message` and fails, as a SLURM client does."""
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    shim = shims / command
    shim.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")


def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


# --- the recipe of a run (no SLURM) -------------------------------------------------------------------


def test_a_changed_recipe_is_refused_with_its_fields_and_resources_may_change(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    (run,) = expand(load_spec(write_tiny_spec(tmp_path, "r", pretrain={"epochs": 1, "lr": 0.05})))
    write_run_config(run, live_code())
    before = (run.run_dir / "config.yaml").read_text()
    changed = write_tiny_spec(tmp_path, "r", pretrain={"epochs": 2, "lr": 0.1}, slurm={"time": "00:30:00"})
    for mode in ("--local", "--debug"):
        assert cli.main([str(changed), mode]) == 2
        error = error_line(capsys)
        assert "run r: the recipe differs" in error and "--reconfigure" in error
        assert "pretrain.epochs: 1 -> 2" in error and "pretrain.lr: 0.05 -> 0.1" in error
        assert "slurm.time" not in error
        assert (run.run_dir / "config.yaml").read_text() == before  # nothing written
    (resources_only,) = expand(load_spec(write_tiny_spec(tmp_path, "r", slurm={"time": "00:30:00"})))
    check_recipes([resources_only], reconfigure=False)  # resources may change
    (recipe,) = expand(load_spec(changed))
    check_recipes([recipe], reconfigure=True)


def test_resuming_from_a_checkpoint_of_another_recipe_fails_with_the_fields(tmp_path: Path):
    (run,) = expand(load_spec(write_tiny_spec(tmp_path, "c", lincls=None)))
    assert pretrain.train(run.config) == "done"
    (longer,) = expand(load_spec(write_tiny_spec(tmp_path, "c", lincls=None, pretrain={"epochs": 2})))
    with pytest.raises(ValueError, match=r"recipe differs.*pretrain\.epochs: 1 -> 2"):
        pretrain.train(longer.config)


# --- on the local SLURM cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def held(workdir: Path) -> Any:
    """A run whose two jobs are queued (held) for the whole module, then cancelled."""
    spec = write_tiny_spec(workdir, "held", slurm=HELD)
    assert cli.main([str(spec)]) == 0
    ids = job_ids(workdir, "held", "held")
    yield spec, ids
    subprocess.run(["scancel", *ids.values()], check=True)


@pytest.mark.slurm
def test_a_refused_sbatch_orphans_nothing_and_the_next_submission_completes_the_run(
    workdir: Path, capsys: pytest.CaptureFixture
):
    bad = write_tiny_spec(workdir, "orphan", slurm=HELD, lincls={"slurm": {"partition": "nope"}})
    assert cli.main([str(bad)]) == 1
    error = error_line(capsys)
    assert error.startswith("error: run orphan lincls: sbatch failed:")
    assert "invalid partition" in error.lower()
    pretrain_job = job_ids(workdir, "orphan", "orphan")
    assert list(pretrain_job) == ["pretrain"]  # recorded as soon as sbatch returned it
    try:
        good = write_tiny_spec(workdir, "orphan", slurm=HELD)
        assert cli.main([str(good)]) == 0
        ids = job_ids(workdir, "orphan", "orphan")
        runs = read_manifest(workdir / "runs" / "orphan")["runs"]["orphan"]
        assert (
            ids["pretrain"] == pretrain_job["pretrain"] and len(runs["pretrain"]) == len(runs["lincls"]) == 1
        )
        job = subprocess.run(
            ["scontrol", "show", "job", ids["lincls"]], capture_output=True, text=True
        ).stdout
        assert f"Dependency=afterok:{ids['pretrain']}" in job
        assert runs["lincls"][0]["job_name"] == "orphan.orphan.lincls" and runs["lincls"][0]["cluster"]
    finally:
        subprocess.run(["scancel", *job_ids(workdir, "orphan", "orphan").values()], check=True)


@pytest.mark.slurm
def test_when_squeue_fails_runs_are_unknown_and_nothing_acts_on_them(
    held: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    spec, ids = held
    failing(tmp_path, monkeypatch, "squeue", "squeue: error: Unable to contact slurm controller")
    capsys.readouterr()
    assert cli.main(["status", str(spec)]) == 0
    assert "unknown: squeue failed: squeue: error: Unable to contact" in capsys.readouterr().out
    manifest = read_manifest(spec.parent / "runs" / "held")
    assert cli.main([str(spec), "--resubmit-failed"]) == 1
    assert "nothing: unknown (squeue failed" in capsys.readouterr().out
    assert read_manifest(spec.parent / "runs" / "held") == manifest
    assert cli.main(["cancel", str(spec)]) == 1
    assert f"job {ids['pretrain']} (held pretrain) not cancelled: unknown" in capsys.readouterr().out
    monkeypatch.undo()
    assert squeue_state(ids["pretrain"]) == squeue_state(ids["lincls"]) == "PENDING"


@pytest.mark.slurm
def test_when_sacct_fails_a_job_squeue_has_forgotten_is_unknown(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    spec = write_tiny_spec(workdir, "gone", lincls=None)
    manifest = {"runs": {}}
    record_job(manifest, "gone", "pretrain", "999999", "t")  # no controller knows this id
    write_manifest(workdir / "runs" / "gone", manifest)
    failing(tmp_path, monkeypatch, "sacct", "sacct: error: Problem talking to the database")
    capsys.readouterr()
    assert cli.main(["status", str(spec)]) == 0
    assert "unknown: sacct failed: sacct: error: Problem talking to the database" in capsys.readouterr().out
    assert cli.main([str(spec), "--resubmit-failed"]) == 1
    assert read_manifest(workdir / "runs" / "gone") == manifest


@pytest.mark.slurm
def test_local_and_debug_refuse_runs_with_queued_slurm_jobs(held: Any, capsys: pytest.CaptureFixture):
    spec, ids = held
    config = (spec.parent / "runs" / "held" / "held" / "config.yaml").read_text()
    for mode in ("--local", "--debug"):
        assert cli.main([str(spec), mode]) == 2
        error = error_line(capsys)
        assert f"held (pretrain job {ids['pretrain']}: pending)" in error and "cancel them" in error
    assert (spec.parent / "runs" / "held" / "held" / "config.yaml").read_text() == config
    assert not (spec.parent / "runs" / "held" / "held" / "state.json").exists()


@pytest.mark.slurm
def test_an_id_that_now_names_another_job_is_never_cancelled(workdir: Path, capsys: pytest.CaptureFixture):
    # As after a controller's state was reset: the recorded id now belongs to someone else's job.
    other = subprocess.run(
        ["sbatch", "--parsable", "--hold", "-J", "someone-else", "-o", "/dev/null", "--wrap", "sleep 1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        spec = write_tiny_spec(workdir, "stale", lincls=None)
        manifest = {"runs": {}}
        record_job(manifest, "stale", "pretrain", other, "t", job_name="stale.stale.pretrain", cluster=None)
        write_manifest(workdir / "runs" / "stale", manifest)
        capsys.readouterr()
        assert cli.main(["status", str(spec)]) == 0
        assert f"not ours: job {other} is now 'someone-else'" in capsys.readouterr().out
        assert cli.main(["cancel", str(spec)]) == 0
        assert f"job {other} (stale pretrain) not cancelled: not ours" in capsys.readouterr().out
        assert squeue_state(other) == "PENDING"
        assert cli.main([str(spec)]) == 0  # without --resubmit-failed: nothing
        assert read_manifest(workdir / "runs" / "stale") == manifest
    finally:
        subprocess.run(["scancel", other], check=True)


@pytest.mark.slurm
def test_a_cancel_that_the_controller_does_not_answer_says_so_and_fails(
    held: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    spec, ids = held  # scancel as a controller that stopped answering after squeue did answers it:
    message = (
        f"scancel: error: Kill job error on job id {ids['pretrain']}: Socket timed out on send/recv operation"
    )
    failing(tmp_path, monkeypatch, "scancel", message)
    capsys.readouterr()
    assert cli.main(["cancel", str(spec)]) == 1  # no traceback
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: {message}" in out
    assert f"cancelled job {ids['pretrain']}" not in out and f"cancelled job {ids['lincls']}" in out
    monkeypatch.undo()
    assert squeue_state(ids["pretrain"]) == "PENDING"
