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
    assert flags["--rdzv-endpoint"] == f"n1:{20000 + 123456 % 20000}"


def test_multi_node_without_rendezvous_is_an_error():
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_command("sogclr.pretrain", "c.yaml", 1, nnodes=2)


@pytest.mark.parametrize("job_id", [0, 1, 19999, 20000, 987654321])
def test_rendezvous_port_is_a_function_of_the_job_id(job_id: int):
    assert 20000 <= rendezvous_port(job_id) < 40000
    assert rendezvous_port(job_id) == rendezvous_port(job_id + 20000)


PROBE = "import signal; print(signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN, flush=True)"
GRANDCHILD = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {PROBE!r}])"


@pytest.mark.parametrize("code", [PROBE, GRANDCHILD], ids=["torchrun", "its workers"])
def test_started_with_usr2_ignored(tmp_path, code: str):
    """SIG_IGN survives exec: the agent survives SLURM's USR2; workers install their own handler."""
    out = tmp_path / "out.txt"
    process = start_ignoring_stop_signals([sys.executable, "-c", code], log=out)
    assert process.wait(timeout=60) == 0
    assert out.read_text().strip() == "True"


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
