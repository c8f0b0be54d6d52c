"""Settling an sbatch whose reply was lost (the 2026-12-05 review's N7 and N15), on the real local cluster:
the token is found anywhere in the job's comment, a reply lost on another cluster is never settled from
this one, and a job that ran and that SLURM has since forgotten is found in the run directory."""

from __future__ import annotations

from pathlib import Path

from jobs.slurm_client import UNKNOWN, cluster_name
from launch import cli
from launch.manifest import (
    TOKEN_PREFIX,
    add_pending,
    new_token,
    read_manifest,
    resolve_pending,
    write_manifest,
)
from launch.scripts import job_name
from launch.spec import Run, expand, load_spec
from launch.standing import standings
from sogclr.contract.state import now, update_state
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_MODULE
HELD = {"additional": {"hold": True}}  # queued, never started


def sweep(tmp_path: Path, name: str) -> tuple[Path, Run]:
    spec = write_tiny_spec(tmp_path, name, slurm={**HELD})
    (run,) = expand(load_spec(spec))
    return spec, run


def pending_entry(spec: Path, run: Run, cluster: str | None, token: str | None = None) -> str:
    """Note a pretraining sbatch of `run` as made with its reply lost; its token."""
    directory = load_spec(spec).directory
    directory.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(directory)
    token = token or new_token()
    name = job_name(run, "pretrain")
    add_pending(manifest, token, "pretrain", [run.name], job_name=name, cluster=cluster, submitted=now())
    write_manifest(directory, manifest)
    return token


def test_the_token_is_found_anywhere_in_the_comment(slurm_cluster, tmp_path: Path):
    spec, run = sweep(tmp_path, "rewritten")
    token = pending_entry(spec, run, cluster_name())
    # as a site's job_submit plugin that puts its own words before the user's comment
    job = slurm_cluster.sbatch(
        "#!/bin/sh\ntrue\n", "--hold", "-o", "/dev/null", f"--job-name={job_name(run, 'pretrain')}",
        f"--comment=site:acct=42 {TOKEN_PREFIX}{token}",
    )  # fmt: skip
    try:
        manifest = read_manifest(load_spec(spec).directory)
        assert resolve_pending(manifest, cluster_name(), lambda entry: None) == {}
        assert manifest["pending"] == [] and manifest["runs"][run.name]["pretrain"][0]["job_id"] == job
    finally:
        slurm_cluster.run("scancel", job)


def test_a_reply_lost_on_another_cluster_is_left_to_that_cluster(slurm_cluster, tmp_path: Path, capsys):
    spec, run = sweep(tmp_path, "elsewhere")
    pending_entry(spec, run, cluster="another-cluster")
    where = standings([run], read_manifest(load_spec(spec).directory))
    standing = where[run.name]["pretrain"]
    assert standing.state == UNKNOWN and "submitted on cluster another-cluster" in standing.reason
    # a submission here submits nothing for it: its job may be training there, in the same run directory
    assert cli.main([str(spec)]) == 1
    manifest = read_manifest(load_spec(spec).directory)
    assert len(manifest["pending"]) == 1 and run.name not in manifest["runs"]
    assert "unknown" in capsys.readouterr().out


def test_a_job_that_ran_and_was_forgotten_is_found_in_the_run_directory(slurm_cluster, tmp_path: Path):
    spec, run = sweep(tmp_path, "forgotten")
    pending_entry(spec, run, cluster_name())
    # the job ran and failed; SLURM has since forgotten it (MinJobAge): only the run directory knows it
    attempt = {"job_id": 987654, "started": now(), "outcome": "failed", "reason": "RuntimeError: boom"}
    update_state(run.files.pretrain.state, status="failed", attempts=[attempt])
    manifest = read_manifest(load_spec(spec).directory)
    standing = standings([run], manifest)[run.name]["pretrain"]
    assert manifest["pending"] == [] and manifest["runs"][run.name]["pretrain"][0]["job_id"] == "987654"
    assert standing.job_id == "987654" and standing.state == "failed (run dir)"
    # so a plain submission leaves the failed run alone (that takes --resubmit-failed)
    assert cli.main([str(spec)]) == 0
    assert [s["job_id"] for s in read_manifest(load_spec(spec).directory)["runs"][run.name]["pretrain"]] == [
        "987654"
    ]
