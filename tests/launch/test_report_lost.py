"""Review finding 24: the report's hours count an attempt that was lost (its node failed, its job was
killed before its task could record the end), up to the last step it logged, not as 0.

A real `--local` run is killed with SIGKILL, launcher and trainer alike (nothing records the end, as
after a NODE_FAIL); the next attempt's start (jobs.attempt.begin_attempt, what a requeued job task calls
first) records it as lost, with `ended: null`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from jobs.attempt import begin_attempt
from jobs.torchrun import signal_tree
from launch.inspect.results import collect, read_records
from launch.manifest import read_manifest
from launch.spec import expand, load_spec
from launch.standing import standings
from sogclr.contract.state import read_state
from testkit.tiny import write_tiny_spec

STEPS_BEFORE_THE_LOSS = 5
PATIENCE_S = 600  # how long a loaded machine may take to start a trainer and log its first steps


def test_a_lost_attempt_counts_until_its_last_logged_step(tmp_path: Path):
    spec = write_tiny_spec(tmp_path, "lost", pretrain={"epochs": 20}, lincls=None)
    (run,) = expand(load_spec(spec))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from launch.cli import main; sys.exit(main(sys.argv[1:]))"]
        + [str(spec), "--local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + PATIENCE_S
        while len(step_records(run.files.pretrain.metrics)) < STEPS_BEFORE_THE_LOSS:
            assert launcher.poll() is None and time.monotonic() < deadline, "the run never got going"
            time.sleep(0.5)
    finally:
        signal_tree(launcher.pid, signal.SIGKILL)  # nothing records the end: a node failure
        launcher.wait()
    time.sleep(1)  # the next attempt starts later than the lost one's last record
    begin_attempt(run.files.pretrain.state, {"job_id": "requeued", "hosts": ["localhost"]})

    state = read_state(run.files.pretrain.state)
    (lost,) = state["attempts"]
    assert lost["ended"] is None and lost["reason"].startswith("lost")
    last_logged = max(r["time"] for r in step_records(run.files.pretrain.metrics))
    lost_s = last_logged - timestamp(lost["started"])
    current_s = timestamp(state["updated"]) - timestamp(state["current_attempt"]["started"])
    assert lost_s > 0

    (row,) = collect([run], standings([run], read_manifest(load_spec(spec).directory)))
    assert row.wall_s == lost_s + current_s
    assert row.hours == row.wall_s / 3600  # one CPU


def step_records(metrics: Path) -> list[dict]:
    return [r for r in read_records(metrics) if "loss" in r]


def timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
