"""No rank waits forever: with a peer that stops answering, a collective fails after the configured
timeout and reads as a peer failure (which the job layer retries), not as a bug in training code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from sogclr.distributed import is_peer_failure

RANK_SCRIPT = """
import os, sys, time
from sogclr.distributed import agree, init_distributed, is_peer_failure
env = init_distributed(timeout_s=3.0)
if env.rank == 1:
    time.sleep(120)  # alive but silent, as a rank on a node that hangs
try:
    agree(env, True)
except Exception as error:
    print("peer failure" if is_peer_failure(error) else f"other: {error!r}", flush=True)
    os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_silent_peer_fails_the_collective_after_the_timeout():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        out, _ = ranks[0].communicate(timeout=90)  # well before rank 1 wakes up
        assert ranks[1].poll() is None  # rank 0 did not wait for it
    finally:
        for process in ranks:
            process.kill()
    assert out.strip() == "peer failure"


def test_errors_of_training_code_are_not_peer_failures():
    assert not is_peer_failure(ValueError("bad batch"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:545] Connection reset by peer"))
