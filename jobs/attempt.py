"""One attempt of a training phase, and what to do after it: the part of a job that knows no SLURM.

An attempt starts torchrun, waits for it, and reads the phase's `state.json` (exit codes do not survive
torchrun reliably; the trainer's record does). The attempt is appended to `attempts`, and `next_action`
decides: `done`, `requeue` (resume from the saved step), or `fail`. SLURM jobs and local mode share this.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs.torchrun import signal_tree, start_ignoring_stop_signals
from sogclr.state import now, read_state, update_state

Action = Literal["done", "requeue", "fail"]


@dataclass(frozen=True)
class Phase:
    """A training entry point and where it records its outcome, relative to the run directory."""

    name: str
    module: str
    state_file: str

    def state_path(self, run_dir: Path) -> Path:
        return run_dir / self.state_file


# The layout of sogclr's outputs (sogclr/pretrain.py, sogclr/lincls.py).
PHASES = {
    "pretrain": Phase("pretrain", "sogclr.pretrain", "state.json"),
    "lincls": Phase("lincls", "sogclr.lincls", "lincls/state.json"),
}
CONFIG_FILE = "config.yaml"


def wait_for(process: subprocess.Popen, warn_after: float | None = None) -> int:
    """Wait for `process`; after `warn_after` seconds send its tree SLURM's warning signal (USR2) once."""
    try:
        return process.wait(timeout=warn_after)
    except subprocess.TimeoutExpired:
        signal_tree(process.pid, signal.SIGUSR2)
        return process.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too; let it stop its workers first
        process.wait()
        raise


def run_attempt(
    command: list[str],
    state_path: Path,
    where: dict[str, Any],
    log: Path | None = None,
    warn_after: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `command` (a torchrun) once and return its attempt record; `where` says which job/host ran it.

    The status is set to `running` first, so a trainer that dies without recording reads as a failure,
    not as the previous attempt's outcome.
    """
    start_step = read_state(state_path).get("step", 0)
    update_state(state_path, status="running")
    started = now()
    returncode = wait_for(start_ignoring_stop_signals(command, log, env), warn_after)
    state = read_state(state_path)
    outcome = state["status"] if state.get("status") in ("done", "preempted", "failed") else "failed"
    return {
        **where,
        "started": started,
        "ended": now(),
        "start_step": start_step,
        "end_step": state.get("step", 0),
        "outcome": outcome,
        "reason": _reason(outcome, state, returncode),
    }


def _reason(outcome: str, state: dict[str, Any], returncode: int) -> str | None:
    if outcome == "preempted":
        return f"signal {state.get('signal')}"
    if outcome == "failed":
        return state.get("error") or f"training exited with code {returncode} without recording an outcome"
    return None


def finish_attempt(state_path: Path, attempt: dict[str, Any], max_requeues: int) -> Action:
    """Append `attempt` to state.json, decide what comes next, and record that decision."""
    state = read_state(state_path)
    attempts = [*state.get("attempts", []), {"attempt": len(state.get("attempts", [])) + 1, **attempt}]
    requeues = state.get("requeues", 0)
    action, reason = next_action(attempts, requeues, max_requeues)
    fields: dict[str, Any] = {"attempts": attempts, "requeues": requeues + (action == "requeue")}
    if action == "fail" and attempt["outcome"] != "failed":  # we give up, though training did not fail
        fields.update(status="failed", error=reason)
    update_state(state_path, **fields)
    return action


def next_action(
    attempts: list[dict[str, Any]], requeues: int, max_requeues: int
) -> tuple[Action, str | None]:
    """What follows the last attempt, and why when it is `fail`."""
    last = attempts[-1]
    if last["outcome"] == "done":
        return "done", None
    if last["outcome"] != "preempted":
        return "fail", last.get("reason")
    if requeues >= max_requeues:
        return "fail", f"preempted, but max_requeues ({max_requeues}) requeues are used up"
    last_two = attempts[-2:]
    if len(last_two) == 2 and all(a["end_step"] == a["start_step"] for a in last_two):
        return "fail", "two attempts in a row ended without progress; not requeueing again"
    return "requeue", None
