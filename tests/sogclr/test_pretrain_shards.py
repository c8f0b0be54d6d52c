"""Pretraining from shards staged to a node-local directory, end to end on CPU: a run stopped by a real
SIGUSR2 mid-epoch and resumed from its staged copy ends bit-identical to a run on the tree that never
stopped; a stop signal while a process waits for its node's copy ends the attempt `preempted`; a copy that
stalls (a shard that is a named pipe) is ended by the watchdog as a transient failure."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobs.attempt import classify
from sogclr.contract.config import PROGRESS_TIMEOUT_FLOOR_MINUTES, PretrainConfig
from sogclr.contract.dataindex import prepare_data_root
from sogclr.contract.shards import pack_tree, read_shard_index
from sogclr.contract.state import read_state
from sogclr.data.staging import STAGED_PREFIX
from testkit.runs import (
    assert_same_training_state,
    child_env,
    command,
    interrupt_at,
    run_module,
    start_module,
    tiny_pretrain,
    wait_ok,
    write_config,
)
from testkit.tiny import STEPS_PER_EPOCH


@pytest.fixture
def tree(data_dir: Path) -> Path:
    return prepare_data_root(PretrainConfig(dataset="digits", data_dir=data_dir))


def staged_recipe(tree: Path, shards: Path, local: Path, **fields: object) -> dict:
    where = {"dataset": "folder", "data_format": "shards", "stage_dir": str(local)}
    return tiny_pretrain(shards, epochs=1, **where, **fields)


def test_resumed_from_staged_shards_is_bit_identical_to_a_tree_run(tmp_path: Path, tree: Path) -> None:
    shards = pack_tree(tree, tmp_path / "shards", "folder", 300_000)
    straight = tmp_path / "straight"
    from_tree = tiny_pretrain(tree, epochs=1, dataset="folder")
    uninterrupted = start_module("sogclr.pretrain", write_config(straight, from_tree))

    resumed = tmp_path / "resumed"
    config = write_config(resumed, staged_recipe(tree, shards.directory, tmp_path / "node"))
    interrupt_at(config, resumed, step=5)
    state = read_state(resumed / "state.json")
    assert state["status"] == "preempted" and 5 <= state["step"] < STEPS_PER_EPOCH
    assert state["staging"]["phase"] == "done" and state["staging"]["copied"] == shards.total_bytes

    run_module("sogclr.pretrain", config)  # the next attempt on the same node reuses the copy
    state = read_state(resumed / "state.json")
    assert state["status"] == "done" and state["staging"]["copied"] == 0
    wait_ok(uninterrupted)
    assert_same_training_state(straight / "checkpoints" / "final.pt", resumed / "checkpoints" / "final.pt")


def test_a_stop_while_waiting_for_the_nodes_copy_ends_the_attempt_preempted(
    tmp_path: Path, tree: Path
) -> None:
    shards = pack_tree(tree, tmp_path / "shards", "folder", 300_000)
    local = tmp_path / "node"
    local.mkdir()
    # another process of this node holds the copy's lock (it is copying)
    held = os.open(local / f".{STAGED_PREFIX}{shards.digest[:16]}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    run_dir = tmp_path / "run"
    trainer = start_module(
        "sogclr.pretrain", write_config(run_dir, staged_recipe(tree, shards.directory, local))
    )
    deadline = time.monotonic() + 300
    while (read_state(run_dir / "state.json").get("staging") or {}).get("phase") != "waiting":
        assert trainer.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    trainer.send_signal(signal.SIGUSR2)
    wait_ok(trainer)
    state = read_state(run_dir / "state.json")
    assert state["status"] == "preempted" and state["signal"] == "SIGUSR2"
    assert classify(state, trainer.returncode)[0] == "preempted"
    os.close(held)


def test_a_stalled_copy_is_ended_by_the_watchdog_as_transient(tmp_path: Path, tree: Path) -> None:
    shards = pack_tree(tree, tmp_path / "shards", "folder", 300_000)
    second = shards.directory / shards.shard_files[1].name
    second.unlink()
    os.mkfifo(second)  # opening it blocks until someone writes: a stalled file system
    run_dir = tmp_path / "run"
    minutes = PROGRESS_TIMEOUT_FLOOR_MINUTES  # the shortest a config may ask for
    recipe = staged_recipe(tree, shards.directory, tmp_path / "node", progress_timeout_minutes=minutes)
    trainer = subprocess.run(
        command("sogclr.pretrain", write_config(run_dir, recipe), 1),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,  # a guard against this test hanging, not a measurement
    )
    assert "sogclr watchdog" in trainer.stderr and f"no progress for {minutes:g} minutes" in trainer.stderr
    state = read_state(run_dir / "state.json")
    assert state["status"] == "failed" and state["failure"] == "stalled"
    assert classify(state, trainer.returncode)[0] == "transient"
    assert not any(p.name.startswith(STAGED_PREFIX) for p in (tmp_path / "node").iterdir())
    assert read_shard_index(shards.directory).digest == shards.digest
