"""Nothing hangs: a training image that blocks `open` for ever (a named pipe with the image's name, as a
stalled network file system behaves) ends the attempt within `progress_timeout_minutes`, recorded as
`failed: stalled`, which the job layer classifies as transient (requeued, counted against max_failures).
One process whose loader worker is the blocked one, and two gloo ranks where one rank blocks outside the
collectives while the other waits inside one (their collective timeout is set far longer, so it is the
watchdog that ends them); and through the local launcher, whose requeue resumes the run once the file
system answers. Tiny: digits at 16 px, ResNet-18.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.attempt import classify
from sogclr.contract.config import PROGRESS_TIMEOUT_FLOOR_MINUTES, PretrainConfig
from sogclr.contract.dataindex import build_index
from sogclr.contract.state import read_state
from sogclr.data.datasets import build_pretrain_dataset, epoch_permutation, prepare_data_root
from sogclr.training.watchdog import EXIT_STALLED, STATE_WRITE_S
from testkit.runs import child_env, command, logged_steps, tiny_pretrain, write_config
from testkit.tiny import write_tiny_spec

# the shortest limit allowed; start-up counts too, so it is above the start-up of a loaded 2-core machine
WATCHDOG_MINUTES = PROGRESS_TIMEOUT_FLOOR_MINUTES
BLOCKED_STEP = 2  # the steps before it are taken


STALLED_PROCESS = """
import multiprocessing, sys, time
from pathlib import Path
from sogclr.training.watchdog import Watchdog
if __name__ == "__main__":
    worker = multiprocessing.Process(target=time.sleep, args=(3600,))  # a loader worker
    worker.start()
    print(worker.pid, flush=True)
    with Watchdog(Path(sys.argv[1]), minutes=0.02):
        time.sleep(3600)  # no progress
"""


def test_the_watchdog_ends_the_process_when_the_state_write_blocks_too(tmp_path: Path) -> None:
    """The run directory is on the file system that stalled (state.json a named pipe: reading it blocks,
    as a hung NFS server does): the loader worker is killed first and the process still exits."""
    state = tmp_path / "state.json"
    os.mkfifo(state)
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_PROCESS, str(state)],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(process.stdout.readline())
    try:
        returncode = process.wait(timeout=STATE_WRITE_S + 60)  # a guard, not a measurement
    finally:
        process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)  # on failure: no orphan left behind (gone already if killed)
    assert returncode == EXIT_STALLED
    assert not Path(f"/proc/{worker}").exists() or "State:\tZ" in Path(f"/proc/{worker}/status").read_text()
    assert state.is_fifo()  # the blocked write was abandoned, not completed


def image_tree_with_a_pipe(data_dir: Path, tree: Path, position: int) -> Path:
    """A `folder` dataset (the digits, hard-linked) whose training image read at `position` of epoch 0's
    shuffle is a named pipe: opening it blocks until someone writes."""
    digits = prepare_data_root(PretrainConfig(dataset="digits", data_dir=data_dir))
    shutil.copytree(digits, tree, copy_function=os.link)
    config = PretrainConfig(dataset="folder", data_dir=tree, image_size=16, augment_on="loader")
    dataset = build_pretrain_dataset(config, build_index(config))
    path = Path(dataset.images.name(epoch_permutation(config.seed, 0, len(dataset))[position]))
    path.unlink()
    os.mkfifo(path)
    return path


def has_reader(fifo: Path) -> bool:
    """Whether some process still has `fifo` open for reading (blocked in its `open`)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        assert error.errno == errno.ENXIO
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize(
    ("nproc", "workers", "blocked_rank"),
    [(1, 1, 0), (2, 0, 1)],
    ids=["one-process-worker-blocked", "two-ranks-one-blocked"],
)
def test_a_read_that_blocks_for_ever_ends_the_attempt_as_transient(
    tmp_path: Path, data_dir: Path, nproc: int, workers: int, blocked_rank: int
) -> None:
    batch = 64
    # the first image of the blocked rank's share of BLOCKED_STEP (see ResumableDistributedSampler)
    fifo = image_tree_with_a_pipe(
        data_dir, tmp_path / "tree", BLOCKED_STEP * batch + blocked_rank * batch // nproc
    )
    run_dir = tmp_path / "run"
    pretrain = tiny_pretrain(
        tmp_path / "tree",
        dataset="folder",
        workers=workers,
        batch_size=batch,
        augment_on="loader",
        progress_timeout_minutes=WATCHDOG_MINUTES,
        collective_timeout_s=3600.0,  # not what ends the attempt
    )
    config = write_config(run_dir, pretrain)
    trainer = subprocess.run(
        command("sogclr.pretrain", config, nproc),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,  # a guard against this test hanging, not a measurement
    )
    assert trainer.returncode != 0
    assert (
        "sogclr watchdog" in trainer.stderr
        and f"no progress for {WATCHDOG_MINUTES:g} minutes" in trainer.stderr
    )

    state = read_state(run_dir / "state.json")
    assert state["status"] == "failed" and state["failure"] == "stalled", state
    outcome, reason = classify(state, trainer.returncode)
    assert outcome == "transient" and "stalled" in reason and "progress_timeout_minutes" in reason
    # it trained until the pipe, then stalled (or, on a machine too slow to start in a minute, before it)
    assert max(logged_steps(run_dir), default=0) <= BLOCKED_STEP
    assert not has_reader(fifo)  # the blocked reader (a loader worker, or a rank) is gone too


def test_the_local_launcher_requeues_a_stalled_attempt_which_then_resumes(
    tmp_path: Path, data_dir: Path
) -> None:
    """Through `sogclr-submit --local` (the SLURM job's attempt and requeue rules): the stalled attempt is
    transient and started again; once the file system answers (the pipe replaced by its image), the run
    finishes."""
    fifo = image_tree_with_a_pipe(data_dir, tmp_path / "tree", BLOCKED_STEP * 64)
    original = prepare_data_root(PretrainConfig(dataset="digits", data_dir=data_dir)) / fifo.relative_to(
        tmp_path / "tree"
    )
    pretrain = {
        "dataset": "folder", "data_dir": str(tmp_path / "tree"), "augment_on": "loader", "workers": 1,
        "progress_timeout_minutes": WATCHDOG_MINUTES,
    }  # fmt: skip
    spec = write_tiny_spec(tmp_path, "stall", pretrain=pretrain, lincls=None)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", str(spec), "--local"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_path = tmp_path / "runs" / "stall" / "stall" / "state.json"
    deadline = time.monotonic() + 300
    while not read_state(state_path).get("attempts"):
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the first attempt never ended"
        time.sleep(0.1)
    fifo.unlink()
    os.link(original, fifo)  # the file system answers again
    output = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 0, output[-3000:]

    state = read_state(state_path)
    first, *_, last = state["attempts"]
    assert first["outcome"] == "transient" and "stalled" in first["reason"]
    assert first["end_step"] == 0 and last["outcome"] == "done" and state["status"] == "done"
