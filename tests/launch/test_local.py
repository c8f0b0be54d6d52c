"""Local mode: real runs on this machine (one, or several at once), preempted by `--preempt-after`, requeued,
resumed, evaluated."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import cli
from launch.inspect.status import last_record
from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import prepare_data_root
from sogclr.contract.layout import RunLayout
from sogclr.contract.shards import pack_tree
from sogclr.contract.state import read_state
from testkit.tiny import STEPS_PER_EPOCH, write_tiny_spec, write_undecodable_dataset


def write_spec(tmp_path: Path, **pretrain: object) -> Path:
    return write_tiny_spec(tmp_path, "local", pretrain={"epochs": 3, **pretrain})


def test_local_run_is_preempted_resumes_and_is_evaluated(tmp_path: Path):
    # Early, so that it lands during training however fast the machine (an idle one trains these 66 steps in
    # about 9 s): the warning is repeated until the trainer has its handlers, and it stops after a step.
    assert cli.main([str(write_spec(tmp_path)), "--local", "--preempt-after", "3"]) == 0

    run_dir = tmp_path / "runs" / "local" / "local"
    state = read_state(run_dir / "state.json")
    first, second = state["attempts"]
    assert (first["outcome"], first["reason"]) == ("preempted", "signal SIGUSR2")
    assert 0 < first["end_step"] == second["start_step"] < second["end_step"] == state["total_steps"]
    assert state["status"] == "done" and state["requeues"] == 1
    assert 0 <= read_state(run_dir / "lincls" / "result.json")["top1"] <= 100

    # run again: everything is done, nothing is trained twice
    assert cli.main([str(write_spec(tmp_path)), "--local"]) == 0
    assert read_state(run_dir / "state.json")["attempts"] == state["attempts"]


def test_debug_mode_prints_the_traceback_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture):
    junk = write_undecodable_dataset(tmp_path / "junk")
    spec = write_spec(tmp_path, dataset="folder", data_dir=str(junk))
    assert cli.main([str(spec), "--debug"]) == 1  # pytest's stdin is not a TTY: no debugger
    assert "Traceback" in capsys.readouterr().err


def test_parallel_runs_of_a_sweep_all_finish_with_their_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    spec = write_tiny_spec(tmp_path, "pair", sweep={"product": {"gamma": [0.5, 0.9]}})
    assert cli.main([str(spec), "--local", "--parallel", "2"]) == 0

    out = capsys.readouterr().out  # not a terminal: plain progress lines, then the closing table
    for run in ("gamma0.5", "gamma0.9"):
        run_dir = tmp_path / "runs" / "pair" / run
        state = read_state(run_dir / "state.json")
        assert state["status"] == "done" and [a["outcome"] for a in state["attempts"]] == ["done"]
        top1 = read_state(run_dir / "lincls" / "result.json")["top1"]
        assert 0 <= top1 <= 100
        steps = rf"step \d+/{STEPS_PER_EPOCH}, epoch 1/1, loss "
        assert re.search(rf"^{run} pretrain: {steps}[-.\de]+, objective .* img/s", out, re.MULTILINE)
        assert re.search(rf"^{run} lincls: {steps}", out, re.MULTILINE)
        for phase in ("pretrain", "lincls"):  # each phase's last step record is shown at its end
            last = last_record(RunLayout(run_dir).phase(phase).metrics, having="loss")
            assert f"{run} {phase}: step {last['step']}/{STEPS_PER_EPOCH}," in out
        (row,) = [line for line in out.splitlines() if line.startswith(f"│ {run} ")]  # the closing table
        assert "done" in row and f" {top1:.2f} " in row


def test_a_local_run_reads_staged_shards_and_is_evaluated(tmp_path: Path, data_dir: Path):
    """The quickstart's path with shards (written here from the digits) staged to a node directory."""
    tree = prepare_data_root(PretrainConfig(dataset="digits", data_dir=data_dir))
    shards = pack_tree(tree, tmp_path / "shards", "folder", 1_000_000)
    where = {"data_dir": str(shards.directory), "data_format": "shards", "stage_dir": str(tmp_path / "node")}
    assert cli.main([str(write_spec(tmp_path, epochs=1, dataset="folder", **where)), "--local"]) == 0
    run_dir = tmp_path / "runs" / "local" / "local"
    state = read_state(run_dir / "state.json")
    assert state["status"] == "done" and state["staging"]["copied"] == shards.total_bytes
    assert read_state(run_dir / "lincls" / "state.json")["staging"]["copied"] == 0  # the same node's copy
    assert 0 <= read_state(run_dir / "lincls" / "result.json")["top1"] <= 100


def test_a_terminated_launcher_stops_its_trainers_and_the_same_command_resumes(tmp_path: Path):
    # SIGTERM reaches only the launcher (torchrun ignores it): it must pass the stop on, not leave its
    # trainer training alone in the run directory that the next launch trains in too.
    spec = write_tiny_spec(tmp_path, "local", pretrain={"epochs": 2}, lincls=None)
    run_dir = tmp_path / "runs" / "local" / "local"
    command = [sys.executable, "-m", "launch.cli", str(spec), "--local"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while last_record(run_dir / "metrics.jsonl", having="loss") is None:  # training has started
            assert launcher.poll() is None, "the launcher ended before training"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=300) == 1
    finally:
        launcher.kill()
    (stopped,) = read_state(run_dir / "state.json")["attempts"]
    assert (stopped["outcome"], stopped["reason"]) == ("preempted", "signal SIGUSR2")
    assert not trainers_of(run_dir / "config.yaml")

    assert cli.main([str(spec), "--local"]) == 0
    state = read_state(run_dir / "state.json")
    first, second = state["attempts"]
    assert 0 < first["end_step"] == second["start_step"] < second["end_step"] == state["total_steps"]


def trainers_of(config: Path) -> list[int]:
    """Processes whose command line names `config` (torchrun and its trainers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(config).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found
