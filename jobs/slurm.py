"""The submitit job function: one task per node starts torchrun, then node 0 requeues, finishes or fails.

SLURM signals every process of the job step, so the workers receive USR2/TERM themselves; torchrun runs
with both ignored, and this process replaces submitit's handlers (whose `checkpoint()` would requeue
from a process that cannot see the model) with ones that only note the signal. After torchrun exits,
node 0 reads the phase's state.json: `done` returns, `preempted` runs `scontrol requeue` (same job id,
same run directory; afterok dependents still wait), anything else raises so the job ends FAILED and
`afterok` dependents are cancelled. Other nodes only report their torchrun's exit status.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from jobs.attempt import CONFIG_FILE, PHASES, finish_attempt, run_attempt, wait_for
from jobs.torchrun import (
    Rendezvous,
    rendezvous_port,
    start_ignoring_stop_signals,
    threads_per_rank,
    torchrun_command,
)
from sogclr.state import read_state


class JobFailed(RuntimeError):
    """The phase failed or gave up; raising it makes the SLURM job FAILED."""


@dataclass(frozen=True)
class SlurmTask:
    """This node's place in the allocation, from SLURM's environment."""

    job_id: int
    node_rank: int
    hosts: list[str]
    restart_count: int

    @classmethod
    def from_environ(cls) -> SlurmTask:
        nodelist = os.environ["SLURM_JOB_NODELIST"]
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
        return cls(
            job_id=int(os.environ["SLURM_JOB_ID"]),
            node_rank=int(os.environ["SLURM_NODEID"]),
            hosts=hosts,
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        )

    def rendezvous(self) -> Rendezvous:
        return Rendezvous(self.hosts[0], rendezvous_port(self.job_id), str(self.job_id))


@dataclass(frozen=True)
class TrainingJob:
    """Picklable job function of one phase (`pretrain` or `lincls`) of the run in `run_dir`."""

    phase: str
    run_dir: Path
    nodes: int
    ranks_per_node: int
    cpus_per_task: int
    max_requeues: int

    def command(self, task: SlurmTask) -> list[str]:
        return torchrun_command(
            PHASES[self.phase].module,
            self.run_dir / CONFIG_FILE,
            self.ranks_per_node,
            self.nodes,
            task.node_rank,
            task.rendezvous() if self.nodes > 1 else None,
        )

    def env(self) -> dict[str, str]:
        return threads_per_rank(self.cpus_per_task, self.ranks_per_node)

    def __call__(self) -> dict[str, Any]:
        note_stop_signals()
        task = SlurmTask.from_environ()
        if task.node_rank != 0:
            return self._follow(task)
        state_path = PHASES[self.phase].state_path(self.run_dir)
        where = {"job_id": task.job_id, "restart_count": task.restart_count, "hosts": task.hosts}
        attempt = run_attempt(self.command(task), state_path, where, env=self.env())
        action = finish_attempt(state_path, attempt, self.max_requeues)
        if action == "fail":
            raise JobFailed(f"{self.phase} of {self.run_dir} failed: {read_state(state_path).get('error')}")
        if action == "requeue":
            subprocess.run(["scontrol", "requeue", str(task.job_id)], check=True)
        return {"phase": self.phase, "action": action, "attempt": attempt}

    def _follow(self, task: SlurmTask) -> dict[str, Any]:
        """Nodes other than 0 run their torchrun; node 0 records and decides for the job."""
        returncode = wait_for(start_ignoring_stop_signals(self.command(task), env=self.env()))
        if returncode:
            raise JobFailed(f"{self.phase} on node {task.node_rank}: torchrun exited with code {returncode}")
        return {"phase": self.phase, "node_rank": task.node_rank}


def note_stop_signals() -> None:
    """Replace submitit's USR2/TERM handlers: the workers act on the signal; this process only logs it."""
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, _note)


def _note(signum: int, frame: FrameType | None) -> None:
    print(f"job task: received {signal.Signals(signum).name}; the training processes handle it", flush=True)
