"""Whatever happens, the same weights: a small sweep in local mode suffers a seeded random schedule of
faults, and every run still ends bit-identical (weights, optimizer state, u) to a run never interrupted,
with its evaluation done.

The faults are what a cluster does to the processes of a job, sent to the real processes of
`sogclr-submit --local` (which retries them by the same rules as SLURM jobs):

    preempt        SIGTERM to every process of the run (agent, trainer, loader worker), as SLURM sends it
    kill trainer   SIGKILL of the training process (OOM killer, kill -9)
    lose node      SIGKILL of the run's whole process tree
    kill in save   SIGKILL of the trainer while it writes a checkpoint (a temporary file is on disk)
    kill at start  SIGKILL of a trainer before it has taken a step
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs.torchrun import descendants
from sogclr.contract.state import read_state
from testkit.e2e import (
    assert_identical,
    attempts_chain,
    final_state,
    last_logged_step,
    start_uninterrupted_reference,
    trainer_pids,
    wait_until,
)
from testkit.tiny import STEPS_PER_EPOCH, write_tiny_spec

# Two runs, their two uninterrupted references and seven restarts, each a torch start-up: on a loaded
# 2-core machine it overran the suite's 900 s, as the SLURM end-to-end tests do (they have 1800 s too).
pytestmark = pytest.mark.timeout(1800)

SEED = 20261201
EPOCHS = 12  # 264 steps a run: room for seven faults and their restarts, also on a fast machine
RUNS = ("gamma0.5", "gamma0.9")
KINDS = ("preempt", "kill trainer", "lose node", "kill in save", "kill at start")


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return write_tiny_spec(
        tmp_path,
        "faults",
        slurm={"max_requeues": 20, "max_failures": 20},
        pretrain={"epochs": EPOCHS, "workers": 1, "checkpoint": {"every_steps": 4}},
        sweep={"product": {"gamma": [0.5, 0.9]}},
    )


def test_a_random_schedule_of_faults_changes_no_weights(tmp_path: Path, sweep: Path):
    rng = random.Random(SEED)
    schedule = [*KINDS, *rng.choices(KINDS, k=2)]  # every kind, seven faults
    rng.shuffle(schedule)
    run_dirs = {name: tmp_path / "runs" / "faults" / name for name in RUNS}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", str(sweep), "--local", "--parallel", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    references = {}
    try:
        for name, run_dir in run_dirs.items():
            wait_until((run_dir / "config.yaml").is_file, f"{name}'s config")
            references[name] = start_uninterrupted_reference(run_dir, tmp_path / f"reference-{name}")
        injector = FaultInjector(rng, run_dirs)
        injected = [fault for kind in schedule for fault in injector.inject(kind)]
        output, _ = launcher.communicate(timeout=900)
    finally:
        launcher.kill()
        for process in references.values():
            process.wait(timeout=600)
    assert launcher.returncode == 0, output

    hits = {name: [kind for kind, target in injected if target == name] for name in RUNS}
    assert sum(map(len, hits.values())) >= 6 and len({kind for kind, _ in injected}) >= 3, injected
    for name, run_dir in run_dirs.items():
        state = read_state(run_dir / "state.json")
        attempts_chain(state)
        outcomes = [attempt["outcome"] for attempt in state["attempts"]]
        assert len(outcomes) == len(hits[name]) + 1, (hits[name], outcomes)  # each fault ended one attempt
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
        assert read_state(run_dir / "lincls" / "result.json")["top1"] > 0
        assert_identical(final_state(run_dir), final_state(tmp_path / f"reference-{name}"), name)


class FaultInjector:
    """Deals each fault to an attempt (a torchrun agent) that no fault has hit yet, at a random moment."""

    def __init__(self, rng: random.Random, run_dirs: dict[str, Path]) -> None:
        self.rng = rng
        self.run_dirs = run_dirs
        self.hit: set[int] = set()  # agents of the attempts already dealt a fault

    def inject(self, kind: str) -> list[tuple[str, str]]:
        """Do `kind` to a run still training; returns the (kind, run) faults done."""
        time.sleep(self.rng.uniform(0.5, 3.0))
        name = wait_until(self.training_run, "a run still pretraining", timeout=300)
        run_dir = self.run_dirs[name]
        done = []
        if kind == "kill at start":  # a trainer to catch starting: the next attempt's, after a kill
            self.deal(sigkill, self.trainer(run_dir))
            done.append(("kill trainer", name))
            pid = wait_until(lambda: self.trainer(run_dir), "the next attempt's trainer")
            time.sleep(self.rng.uniform(0.0, 1.5))  # inside its start-up: imports, data, model, resume
        elif kind == "kill in save":
            pid = wait_until(lambda: self.saving_trainer(run_dir), "a checkpoint write", poll_s=0.005)
        else:
            pid = wait_until(lambda: self.stepping_trainer(run_dir), "a trainer taking steps")
        self.deal(ACTIONS[kind], pid)
        print(f"{time.strftime('%H:%M:%S')} {kind} -> {name} (pid {pid}, step {last_logged_step(run_dir)})")
        return [*done, (kind, name)]

    def deal(self, action: Callable[[int], None], trainer: int) -> None:
        self.hit.add(parent(trainer))
        action(trainer)

    def trainer(self, run_dir: Path) -> int | None:
        """The trainer of the run's current attempt, if no fault has hit that attempt yet."""
        fresh = [pid for pid in trainer_pids(run_dir) if parent(pid) not in self.hit]
        return fresh[0] if fresh else None

    def training_run(self) -> str | None:
        """A run whose pretraining is far enough from its end that a fault still lands in it."""
        candidates = [
            name
            for name, run_dir in self.run_dirs.items()
            if self.trainer(run_dir) and last_logged_step(run_dir) < EPOCHS * STEPS_PER_EPOCH - 12
        ]
        return self.rng.choice(sorted(candidates)) if candidates else None

    def stepping_trainer(self, run_dir: Path) -> int | None:
        """The current trainer once it has taken a step in this attempt."""
        pid, step = self.trainer(run_dir), last_logged_step(run_dir)
        time.sleep(0.3)
        return pid if pid and last_logged_step(run_dir) > step and self.trainer(run_dir) == pid else None

    def saving_trainer(self, run_dir: Path) -> int | None:
        """The current trainer while a checkpoint of it is being written."""
        pid = self.trainer(run_dir)
        return pid if pid and list((run_dir / "checkpoints").glob(".*.tmp")) else None


def sigterm_everything(trainer: int) -> None:
    agent = parent(trainer)
    for pid in [agent, *descendants(agent)]:
        os.kill(pid, signal.SIGTERM)


def sigkill_tree(trainer: int) -> None:
    agent = parent(trainer)
    for pid in [*descendants(agent), agent]:
        os.kill(pid, signal.SIGKILL)


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


ACTIONS: dict[str, Callable[[int], None]] = {
    "preempt": sigterm_everything,
    "kill trainer": sigkill,
    "lose node": sigkill_tree,
    "kill in save": sigkill,
    "kill at start": sigkill,
}
