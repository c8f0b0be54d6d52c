"""No rank waits forever, and only a lost peer reads as one: with a peer that stops answering or dies, a
collective fails (after the configured timeout, or at once) and reads as a peer failure, which the job
layer retries; a deterministic error of a collective call (gloo names itself in those too) does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from sogclr.distributed import is_peer_failure

RANK_SCRIPT = """
import os, signal, sys, time
import torch, torch.distributed as dist
from sogclr.distributed import agree, init_distributed, is_peer_failure
env = init_distributed(timeout_s=3.0)
peer = sys.argv[1]
if peer == "silent" and env.rank == 1:
    time.sleep(120)  # alive but silent, as a rank on a node that hangs
if peer == "killed":
    agree(env, False)  # connected
    if env.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node ends it
    time.sleep(1)
try:
    if peer == "wrong-call":  # the same bug on every rank: an output buffer of the wrong size
        dist.all_gather_into_tensor(torch.empty(3), torch.ones(2))
    else:
        agree(env, True)
except Exception as error:
    print("peer failure" if is_peer_failure(error) else f"other: {error!r}", flush=True)
    os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("peer", ["silent", "killed", "wrong-call"])
def test_a_lost_peer_and_only_a_lost_peer_reads_as_a_peer_failure(peer: str):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, peer],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        out, _ = ranks[0].communicate(timeout=90)  # well before a silent rank 1 wakes up
        if peer == "silent":
            assert ranks[1].poll() is None  # rank 0 did not wait for it
    finally:
        for process in ranks:
            process.kill()
    if peer == "wrong-call":
        assert out.startswith("other: RuntimeError('ProcessGroupGloo::allgather: invalid tensor size")
    else:
        assert out.strip() == "peer failure"


def test_errors_of_training_code_are_not_peer_failures():
    assert not is_peer_failure(ValueError("bad batch"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
