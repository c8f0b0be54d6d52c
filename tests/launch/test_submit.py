"""Submission without SLURM: the manifest, what gets submitted when, the lock, and the sbatch script."""

from __future__ import annotations

import fcntl
import multiprocessing
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from jobs.slurm_client import UNKNOWN, SlurmJob
from launch.configs import provenance_config
from launch.manifest import current_job, read_manifest, record_job, sweep_lock, write_manifest
from launch.plan import phases_to_submit
from launch.scripts import describe_job
from launch.snapshot import git_provenance
from launch.spec import Run, SpecError, expand, load_spec
from launch.standing import PhaseStanding, phase_standing
from sogclr.contract.state import update_state

SPEC = {
    "name": "unit",
    "slurm": {"nodes": 2, "gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": 4, "time": "00:10:00",
              "signal_lead_s": 30, "partition": "debug"},
    "pretrain": {"dataset": "digits", "epochs": 1, "batch_size": 64},
    "lincls": {"epochs": 1, "batch_size": 64, "slurm": {"nodes": 1}},
}  # fmt: skip


@pytest.fixture
def run(tmp_path: Path) -> Run:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "output_root": str(tmp_path / "runs")}))
    (run,) = expand(load_spec(path))
    return run


def test_manifest_keeps_every_submission_and_the_current_one(tmp_path: Path):
    manifest = read_manifest(tmp_path)
    assert current_job(manifest, "a", "pretrain") is None
    record_job(manifest, "a", "pretrain", "11", "t1")
    record_job(manifest, "a", "pretrain", "15", "t2")
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert current_job(again, "a", "pretrain") == "15"
    assert [s["job_id"] for s in again["runs"]["a"]["pretrain"]] == ["11", "15"]


def standing(pretrain: str, lincls: str, active: bool = False, lincls_job: str | None = "2") -> dict:
    return {
        "pretrain": PhaseStanding("1", pretrain, from_slurm=active),
        "lincls": PhaseStanding(lincls_job, lincls, from_slurm=active),
    }


@pytest.mark.parametrize(
    "where, resubmit, expected",
    [
        ({"pretrain": PhaseStanding(None, "not submitted"), "lincls": PhaseStanding(None, "")}, False,
         ["pretrain", "lincls"]),
        (standing("running", "pending", active=True), True, []),
        (standing("pending", "pending", active=True), False, []),
        (standing("failed", "cancelled"), False, []),
        (standing("failed", "cancelled"), True, ["pretrain", "lincls"]),
        (standing("running (run dir)", "unknown (run dir)"), True, ["pretrain", "lincls"]),
        (standing("done", "failed"), False, []),
        (standing("done", "failed"), True, ["lincls"]),
        (standing("done", "done"), True, []),
        (standing("unknown", "unknown"), True, []),
        (standing("done", "unknown"), True, []),
        ({"pretrain": PhaseStanding("1", "pending", from_slurm=True), "lincls": PhaseStanding(None, "")},
         False, ["lincls"]),
        (standing("not ours", "not ours"), False, []),
        (standing("not ours", "not ours"), True, ["pretrain", "lincls"]),
    ],
)  # fmt: skip
def test_what_gets_submitted(run: Run, where: dict, resubmit: bool, expected: list[str]):
    where = {phase: replace(s, reason="why") if s.state == UNKNOWN else s for phase, s in where.items()}
    phases, reason = phases_to_submit(run, where, resubmit)
    assert phases == expected
    assert reason


def test_a_forgotten_job_is_read_from_the_run_directory_and_is_not_active(run: Run):
    manifest = {"runs": {}}
    record_job(manifest, run.name, "pretrain", "7", "t")
    update_state(run.run_dir / "state.json", status="running", step=3)
    forgotten = phase_standing(run, "pretrain", manifest, {})
    assert forgotten.state == "running (run dir)" and not forgotten.active
    queued = phase_standing(run, "pretrain", manifest, {"7": SlurmJob("running")})
    assert queued.active
    update_state(run.run_dir / "state.json", status="done")
    assert phase_standing(run, "pretrain", manifest, {"7": SlurmJob("completing")}).state == "done"


def _try_lock(path: str, answer: multiprocessing.Queue) -> None:
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            answer.put("acquired")
        except BlockingIOError:
            answer.put("blocked")


def test_sweep_lock_excludes_other_processes(tmp_path: Path):
    answer: multiprocessing.Queue = multiprocessing.Queue()
    with sweep_lock(tmp_path):
        other = multiprocessing.Process(target=_try_lock, args=(str(tmp_path / ".submit.lock"), answer))
        other.start()
        other.join(timeout=60)
        assert answer.get(timeout=10) == "blocked"
    other = multiprocessing.Process(target=_try_lock, args=(str(tmp_path / ".submit.lock"), answer))
    other.start()
    other.join(timeout=60)
    assert answer.get(timeout=10) == "acquired"


def test_sbatch_script_and_torchrun_lines(run: Run):
    text = describe_job(run)
    pretrain, lincls = text.split("# --- lincls: sbatch script")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@30", "#SBATCH --mem=4GB", "#SBATCH --partition=debug",
                 "#SBATCH --time=00:10:00", "#SBATCH --cpus-per-task=2"):  # fmt: skip
        assert line in pretrain
    assert "gpus-per-node" not in text  # CPU jobs ask for no GPUs
    assert "--rdzv-backend c10d" in pretrain and "--node-rank $SLURM_NODEID" in pretrain
    assert "#SBATCH --nodes=1" in lincls and "--standalone" in lincls and "afterok" in lincls
    assert not run.run_dir.exists()  # a dry run writes nothing


def test_provenance_names_the_point_resources_and_code(run: Run, tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert git_provenance(repo) is None  # no commit yet
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_provenance(repo) == {"commit": commit, "dirty": False}
    (repo / "a.txt").write_text("b")
    assert git_provenance(repo) == {"commit": commit, "dirty": True}

    code = {"snapshot": "0123abcd", "path": "/sweep/code/0123abcd", "git": git_provenance(repo)}
    meta = provenance_config(run, code).meta
    assert meta["code"] == code and meta["sweep"] == "unit"
    assert meta["resources"]["pretrain"]["nodes"] == 2 and meta["resources"]["lincls"]["nodes"] == 1


def test_an_id_that_names_another_job_is_not_ours_and_one_of_another_cluster_is_unknown(run: Run):
    manifest = {"runs": {}}
    record_job(manifest, run.name, "pretrain", "7", "t", job_name="unit.unit.pretrain", cluster="c1")
    ours = phase_standing(run, "pretrain", manifest, {"7": SlurmJob("running", "unit.unit.pretrain")}, "c1")
    assert ours.active
    other = phase_standing(run, "pretrain", manifest, {"7": SlurmJob("running", "wrap")}, "c1")
    assert (other.state, other.active) == ("not ours", False) and "'wrap'" in other.reason
    nameless = phase_standing(run, "pretrain", manifest, {"7": SlurmJob("cancelled", None)}, "c1")
    assert nameless.state == "cancelled"  # accounting that does not know the name yet says nothing
    # it may be training in the run directory on the other cluster: never resubmitted from this one
    elsewhere = phase_standing(run, "pretrain", manifest, {}, "c2")
    assert elsewhere.state == UNKNOWN and "submitted on cluster c1, this is c2" in elsewhere.reason
    assert phases_to_submit(run, {"pretrain": elsewhere, "lincls": elsewhere}, True)[0] == []
    unknown = phase_standing(run, "pretrain", manifest, {"7": SlurmJob("unknown", reason="squeue failed")})
    assert (unknown.state, unknown.reason, unknown.active) == ("unknown", "squeue failed", False)


def test_a_sweep_directory_is_private_and_one_that_group_or_others_can_write_is_refused(tmp_path: Path):
    with sweep_lock(tmp_path / "new"):
        (tmp_path / "new" / "run").mkdir()
        (tmp_path / "new" / "run" / "state.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "new" / "run").stat().st_mode) & 0o027 == 0  # made under the lock
    assert stat.S_IMODE((tmp_path / "new" / "run" / "state.json").stat().st_mode) & 0o027 == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # a setgid project directory with umask 002
    with pytest.raises(SpecError, match=r"output_root: the sweep directory .*shared is writable by group"):
        with sweep_lock(shared):
            pass
    assert not (shared / ".submit.lock").exists()


def _hold_lock(directory: str, held: multiprocessing.Event) -> None:
    """Hold the sweep's lock until another process waits for it (a blocked request in /proc/locks)."""
    with sweep_lock(Path(directory)):
        held.set()
        inode = (Path(directory) / ".submit.lock").stat().st_ino
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(
                "->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines()
            ):
                return
            time.sleep(0.05)


def test_waiting_for_the_sweep_lock_says_who_holds_it(tmp_path: Path, capfd: pytest.CaptureFixture):
    held = multiprocessing.Event()
    other = multiprocessing.Process(target=_hold_lock, args=(str(tmp_path), held))
    other.start()
    assert held.wait(60)
    with sweep_lock(tmp_path):
        pass
    other.join(60)
    err = " ".join(capfd.readouterr().err.split())
    assert f"waiting for the sweep's lock {tmp_path}/.submit.lock: held by " in err
    assert f":{other.pid} since " in err
