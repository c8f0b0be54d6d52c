"""The torchrun command line of one node's training processes, and how it is started.

One node: `--standalone`. Several nodes: the c10d rendezvous on the allocation's first host, on a port
derived from the job id (so concurrent jobs sharing a host do not collide), with the job id as rendezvous
id. `--max-restarts 0`: lasting retries are SLURM requeues from the last checkpoint, not in-job restarts.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# torchrun runs with SLURM's stop signals ignored (SIG_IGN survives exec), so that only the trainers act
# on them: unhandled, USR2 kills the agent and with it the workers; on TERM the agent would forward it and
# SIGKILL the trainers 30 s later, maybe in the middle of their save. The agent must also not install its
# own TERM handler over SIG_IGN: recent torchrun takes the signals it handles from --signals-to-handle
# (whose default overrides the environment), older ones from the environment variable alone.
AGENT_IGNORES = ("USR2", "TERM")
AGENT_HANDLES = "SIGINT,SIGHUP,SIGQUIT"
AGENT_ENV = {"TORCHELASTIC_SIGNALS_TO_HANDLE": AGENT_HANDLES}
# `trap ''` sets SIG_IGN before exec; unlike preexec_fn it is safe when several runs launch from threads.
_IGNORING_EXEC = f"trap '' {' '.join(AGENT_IGNORES)}; exec \"$@\""


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node job meet: `host:port`, under a job-unique id."""

    host: str
    port: int | str
    run_id: str

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


# Below Linux's ephemeral range (ip_local_port_range, 32768-60999 by default, as on this machine): a port
# in it may be held by any outgoing connection on the first host, and the rendezvous would fail on every
# retry of the job. Above the well-known services and SLURM's own (6817-6819).
RENDEZVOUS_PORTS = range(20000, 32768)


def rendezvous_port(job_id: int) -> int:
    """A port of RENDEZVOUS_PORTS that depends only on the job id (the same after a requeue)."""
    return RENDEZVOUS_PORTS.start + job_id % len(RENDEZVOUS_PORTS)


def torchrun_command(
    module: str,
    config: Path | str,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int | str = 0,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """`python -m torch.distributed.run ... -m MODULE --config CONFIG` for one node."""
    command = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0", *_agent_signal_options()]
    if nnodes == 1:
        command += ["--standalone"]
    else:
        if rendezvous is None:
            raise ValueError(f"{nnodes} nodes need a rendezvous endpoint")
        command += [
            "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous.endpoint, "--rdzv-id", rendezvous.run_id,
        ]  # fmt: skip
    return command + ["--nproc-per-node", str(nproc_per_node), "-m", module, "--config", str(config)]


@functools.cache
def _agent_signal_options() -> list[str]:
    from torch.distributed.run import get_args_parser  # torch only when a command line is built

    if "--signals-to-handle" in get_args_parser()._option_string_actions:
        return ["--signals-to-handle", AGENT_HANDLES]
    return []


def threads_per_rank(cpus: int, ranks: int) -> dict[str, str]:
    """OMP_NUM_THREADS for each rank: its share of the CPUs, unless the user set it.

    torchrun sets 1 only for several ranks per node; a single rank would use every core of the machine,
    and more threads than the CPUs it was given makes CPU training many times slower.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cpus // ranks))}


def ignoring_stop_signals(command: list[str]) -> list[str]:
    """`command` run with USR2 and TERM ignored from its start (SIG_IGN survives exec) until it handles
    them itself; arguments appended to the result reach `command`."""
    return ["sh", "-c", _IGNORING_EXEC, command[0], *command]


def start_ignoring_stop_signals(
    command: list[str], log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `command` with USR2 and TERM ignored, `env` added to ours; output to `log` (appended) or ours."""
    wrapped = ignoring_stop_signals(command)
    full_env = {**os.environ, **AGENT_ENV, **(env or {})}
    if log is None:
        return subprocess.Popen(wrapped, env=full_env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, env=full_env)


def signal_tree(pid: int, sig: signal.Signals) -> list[int]:
    """Send `sig` to `pid` and all its descendants (torchrun's workers live in their own sessions)."""
    targets = [pid, *descendants(pid)]
    for target in targets:
        try:
            os.kill(target, sig)
        except ProcessLookupError:  # exited meanwhile
            pass
    return targets


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_pid(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def _parent_pid(proc_dir: Path) -> int | None:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:  # the process exited while we looked
        return None
    # The name (field 2) may hold spaces and parentheses; the fields after its last ')' are plain.
    return int(stat.rsplit(")", 1)[1].split()[1])
