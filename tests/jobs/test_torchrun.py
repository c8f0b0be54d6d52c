"""torchrun command lines, the rendezvous port, and starting torchrun so that USR2 does not kill it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from jobs.torchrun import (
    Rendezvous,
    descendants,
    rendezvous_port,
    signal_tree,
    start_ignoring_stop_signals,
    threads_per_rank,
    torchrun_command,
)


def flag_values(command: list[str]) -> dict[str, str]:
    """`--name value` pairs of a command line (flags without a value map to '')."""
    flags, i = {}, 0
    while i < len(command):
        if command[i].startswith("--"):
            has_value = i + 1 < len(command) and not command[i + 1].startswith("--")
            flags[command[i]] = command[i + 1] if has_value else ""
            i += 1 + has_value
        else:
            i += 1
    return flags


def test_single_node_is_standalone():
    command = torchrun_command("sogclr.pretrain", "/runs/a/config.yaml", nproc_per_node=4)
    flags = flag_values(command)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in flags and "--rdzv-endpoint" not in flags
    assert flags["--nproc-per-node"] == "4" and flags["--max-restarts"] == "0"
    assert command[-4:] == ["-m", "sogclr.pretrain", "--config", "/runs/a/config.yaml"]


def test_multi_node_meets_on_the_first_host():
    rendezvous = Rendezvous("n1", rendezvous_port(123456), "123456")
    command = torchrun_command("sogclr.lincls", "c.yaml", 8, nnodes=4, node_rank=2, rendezvous=rendezvous)
    flags = flag_values(command)
    assert "--standalone" not in flags
    assert flags["--nnodes"] == "4" and flags["--node-rank"] == "2" and flags["--nproc-per-node"] == "8"
    assert flags["--rdzv-backend"] == "c10d" and flags["--rdzv-id"] == "123456"
    assert flags["--rdzv-endpoint"] == f"n1:{20000 + 123456 % 12768}"


def test_multi_node_without_rendezvous_is_an_error():
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_command("sogclr.pretrain", "c.yaml", 1, nnodes=2)


@pytest.mark.parametrize("job_id", [0, 1, 12767, 12768, 987654321])
def test_rendezvous_port_is_a_function_of_the_job_id(job_id: int):
    assert 20000 <= rendezvous_port(job_id) < 32768  # below the ephemeral ports (32768-60999 by default)
    assert rendezvous_port(job_id) == rendezvous_port(job_id + 12768)


PROBE = (
    "import signal; print([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR2, signal.SIGTERM)])"
)
GRANDCHILD = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {PROBE!r}])"


@pytest.mark.parametrize("code", [PROBE, GRANDCHILD], ids=["torchrun", "its workers"])
def test_started_with_stop_signals_ignored(tmp_path, code: str):
    """SIG_IGN survives exec: the agent survives SLURM's signals; workers install their own handlers."""
    out = tmp_path / "out.txt"
    process = start_ignoring_stop_signals([sys.executable, "-c", code], log=out)
    assert process.wait(timeout=60) == 0
    assert out.read_text().strip() == "[True, True]"


# A trainer that takes its time to stop on SIGTERM (a slow save), then records that it finished.
SLOW_STOPPER = """
import pathlib, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
pathlib.Path(sys.argv[1]).write_text("started")
while not stop:
    time.sleep(0.1)
time.sleep(3)
pathlib.Path(sys.argv[1]).write_text("saved")
"""


def test_torchrun_leaves_a_sigterm_to_its_workers(tmp_path):
    """SLURM sends TERM to every process of the step: the agent must neither forward it nor kill the
    worker after its shutdown timeout, only wait for the worker to finish."""
    script, marker, log = tmp_path / "trainer.py", tmp_path / "marker", tmp_path / "log.txt"
    script.write_text(SLOW_STOPPER)
    command = torchrun_command("unused", "unused", 1)
    command = [*command[: command.index("-m", 3)], str(script), str(marker)]  # a script, not a module
    agent = start_ignoring_stop_signals(command, log=log)
    for _ in range(600):  # until the worker has installed its handler
        if marker.exists():
            break
        subprocess.run(["sleep", "0.1"])
    signal_tree(agent.pid, signal.SIGTERM)
    assert agent.wait(timeout=120) == 0, log.read_text()
    assert marker.read_text() == "saved"
    assert "death signal" not in log.read_text()


def test_signal_tree_reaches_every_descendant():
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        for _ in range(200):  # until both sleeps have been forked
            if len(descendants(parent.pid)) == 2:
                break
            subprocess.run(["sleep", "0.05"])
        children = descendants(parent.pid)
        assert len(children) == 2
        assert set(signal_tree(parent.pid, signal.SIGTERM)) == {parent.pid, *children}
        assert parent.wait(timeout=30) != 0
        assert descendants(parent.pid) == []
    finally:
        parent.kill()


def test_threads_per_rank_share_the_cpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_rank(32, 4) == {"OMP_NUM_THREADS": "8"}
    assert threads_per_rank(2, 4) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_rank(32, 4) == {}  # the user's choice stands
