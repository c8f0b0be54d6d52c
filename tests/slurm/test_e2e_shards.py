"""Shards staged to each node's own directory, end to end on the local SLURM cluster: a two-node run whose
copy is held up (another process of each node holds its lock), shown as staging by `status`, stopped there
by SLURM's warning signal, requeued, then staged, trained and evaluated; a spec whose shards exceed the
nodes' local disk (TmpDisk, 64 MB on this cluster) is refused at submission, before anything is queued.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import prepare_data_root
from sogclr.contract.shards import ShardIndex, pack_tree, read_shard_index
from sogclr.contract.state import read_state
from sogclr.data.staging import STAGED_PREFIX
from testkit.e2e import job_ids, sacct_state, submit, wait_until
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_MODULE


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("e2e-shards")


@pytest.fixture(scope="module")
def shards(workdir: Path) -> ShardIndex:
    tree = prepare_data_root(PretrainConfig(dataset="digits", data_dir=workdir / "digits-cache"))
    return pack_tree(tree, workdir / "shards", "folder", 1_000_000)


def staged(shards: Path, local: Path) -> dict[str, Any]:
    # each emulated node its own "local disk": both share this host
    where = {"data_dir": str(shards), "data_format": "shards", "stage_dir": f"{local}/$SLURMD_NODENAME"}
    return {"dataset": "folder", **where}


def status_of(spec: Path, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert cli.main(["status", str(spec)]) == 0
    return capsys.readouterr().out


def test_a_two_node_run_stopped_while_staging_is_requeued_then_stages_trains_and_evaluates(
    workdir: Path, shards: ShardIndex, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells at the default 80
    local = workdir / "local"
    locks = []
    for node in ("n1", "n2"):  # another process of each node is copying: its lock is held
        (local / node).mkdir(parents=True)
        lock = os.open(local / node / f".{STAGED_PREFIX}{shards.digest[:16]}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        locks.append(lock)
    spec = write_tiny_spec(workdir, "staged", slurm={"nodes": 2}, pretrain=staged(shards.directory, local))
    assert submit(spec) == 0
    job = job_ids(workdir, "staged", "staged")["pretrain"]
    wait_until(lambda: "staging (waiting" in status_of(spec, capsys), "status to show the attempt staging")

    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # the time limit is near
    state_file = workdir / "runs" / "staged" / "staged" / "state.json"
    wait_until(lambda: read_state(state_file).get("attempts"), "the stopped attempt to be recorded")
    first = read_state(state_file)["attempts"][0]
    assert first["outcome"] in ("timeout", "preempted") and first["end_step"] == 0
    for lock in locks:
        os.close(lock)

    result = workdir / "runs" / "staged" / "staged" / "lincls" / "result.json"
    wait_until(result.is_file, "the requeued run to train and be evaluated")
    assert sacct_state(job) == "COMPLETED"
    state = read_state(state_file)
    assert state["attempts"][-1]["outcome"] == "done" and state["attempts"][-1]["hosts"] == ["n1", "n2"]
    for node in ("n1", "n2"):  # a complete, verified copy on each node
        copy = read_shard_index(local / node / f"{STAGED_PREFIX}{shards.digest[:16]}")
        copy.check_sizes()
        assert copy.digest == shards.digest
    # linear evaluation started on the same nodes: it found the copies complete
    assert read_state(state_file.parent / "lincls" / "state.json")["staging"]["copied"] == 0


def test_shards_larger_than_the_nodes_local_disk_are_refused(workdir: Path, capsys: pytest.CaptureFixture):
    tree = workdir / "large"
    for split in ("train", "val"):
        (tree / split / "noise").mkdir(parents=True)
        (tree / split / "noise" / "0.png").write_bytes(os.urandom(40 * 2**20))  # 80 MB in all
    large = pack_tree(tree, workdir / "large-shards")
    spec = write_tiny_spec(workdir, "large", pretrain=staged(large.directory, workdir / "local"))
    assert submit(spec) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: pretrain.stage_dir: the shards of run large are 0.08 GiB")
    assert "(0.06 GiB, TmpDisk in sinfo)" in line
    assert not (workdir / "runs" / "large" / "manifest.json").exists()  # nothing was submitted
