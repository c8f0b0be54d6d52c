"""One attempt of a training phase, run and recorded: the part of a job that knows no SLURM.

An attempt starts torchrun, waits for it, and reads the phase's `state.json` (exit codes do not survive
torchrun reliably; the trainer's record does). Its outcome is one of

    done        the phase finished
    preempted   the trainers stopped at a step on a stop signal (the SLURM layer may refine this into
                `timeout` or `cancelled` from SLURM's own view of the job)
    transient   the trainers were lost, not wrong: a rank killed by a signal (OOM killer, kill -9), a rank
                that lost its peer, one that made no progress for `progress_timeout_minutes` (a blocked
                read, a hung decoder), a node failure, or an attempt that ended without a word (found and
                recorded as such by the next attempt)
    failed      training code raised: a bug, retried never
    pruned      the sweep's successive halving stopped the run at a rung (sogclr/contract/rungs.py): a
                finished outcome, never requeued; the job ends, COMPLETED, which satisfies its
                evaluation's afterok or aftercorr (exit status 0): so its evaluation is cancelled

What follows an attempt (`done`, `requeue`: resume from the saved step, `fail`, or `end`: SLURM is ending
the job, as after a cancel) is jobs/stop.py's decision; `record_attempt` appends the attempt to
`attempts` with that decision. SLURM jobs and local mode share this.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.stop import Action, Budget, Plan, decide
from jobs.torchrun import signal_tree, start_ignoring_stop_signals
from sogclr.contract.layout import RunLayout
from sogclr.contract.state import now, read_state, update_state

RELAY_EVERY_S = 2.0
# Failures the trainers record that are the machine's, not the code's (sogclr/training/loop.py,
# sogclr/training/watchdog.py):
# retried as transient.
TRANSIENT_FAILURES = {"peer": "a rank lost its peer", "stalled": "a training process stalled"}


@dataclass(frozen=True)
class Phase:
    """A training entry point; where it records its outcome is the run layout's business."""

    name: str
    module: str

    def state_path(self, run_dir: Path) -> Path:
        return RunLayout(run_dir).phase(self.name).state


PHASES = {"pretrain": Phase("pretrain", "sogclr.pretrain"), "lincls": Phase("lincls", "sogclr.lincls")}


def wait_for(
    process: subprocess.Popen,
    stop_after: float | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    on_stop: Callable[[], None] = lambda: None,
) -> int:
    """Wait for `process`; once a stop is due, call `on_stop` once and tell its trainers with USR2,
    again every few seconds.

    A stop is due `stop_after` seconds from now, or as soon as `stop_requested()` (this process got a
    stop signal). Repeating it reaches trainers that were still starting (they inherit the signal
    ignored until their handlers are in place) and is harmless to the others: the flag is already set.
    """
    deadline = None if stop_after is None else time.monotonic() + stop_after
    last_relay = None
    try:
        while True:
            try:
                return process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            due = stop_requested() or (deadline is not None and time.monotonic() >= deadline)
            if due and last_relay is None:
                on_stop()
            if due and (last_relay is None or time.monotonic() - last_relay >= RELAY_EVERY_S):
                signal_tree(process.pid, signal.SIGUSR2)
                last_relay = time.monotonic()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too; let it stop its workers first
        process.wait()
        raise


def begin_attempt(state_path: Path, where: dict[str, Any]) -> dict[str, Any]:
    """Mark an attempt as started; an earlier one still marked never finished, and is recorded as lost.

    Returns this attempt's opening record (`where`, start time and step).
    """
    state = read_state(state_path)
    opening = {**where, "started": now(), "start_step": state.get("step", 0)}
    lost = state.get("current_attempt")
    fields: dict[str, Any] = {"status": "running", "current_attempt": opening}
    if lost:
        fields["attempts"] = with_attempt(
            state,
            {
                **lost,
                "ended": None,
                "end_step": state.get("step", 0),
                "outcome": "transient",
                "reason": "lost: the attempt ended without a word (its node or job task was killed)",
            },
        )
    update_state(state_path, **fields)
    return opening


def run_attempt(
    command: list[str],
    state_path: Path,
    where: dict[str, Any],
    log: Path | None = None,
    stop_after: float | None = None,
    env: dict[str, str] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    on_stop: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Run `command` (a torchrun) once and return its attempt record; `where` says which job/host ran it.
    `stop_after`, `stop_requested` and `on_stop` are `wait_for`'s.

    The status is set to `running` first, so a trainer that dies without recording reads as lost, not as
    the previous attempt's outcome.
    """
    opening = begin_attempt(state_path, where)
    process = start_ignoring_stop_signals(command, log, env)
    returncode = wait_for(process, stop_after, stop_requested, on_stop)
    state = read_state(state_path)
    outcome, reason = classify(state, returncode)
    return {**opening, "ended": now(), "end_step": state.get("step", 0), "outcome": outcome, "reason": reason}


def classify(state: dict[str, Any], returncode: int) -> tuple[str, str | None]:
    """The outcome of an attempt from what the trainers recorded, and why."""
    status = state.get("status")
    if status == "done":
        return "done", None
    if status == "preempted":
        return "preempted", f"signal {state.get('signal')}"
    if status == "pruned":
        pruned = state.get("pruned") or {}
        return (
            "pruned",
            f"at epoch {pruned.get('epoch')}: {pruned.get('metric')} {pruned.get('value')}, "
            f"threshold {pruned.get('threshold')}",
        )
    if status == "failed" and (why := TRANSIENT_FAILURES.get(state.get("failure"))):
        return "transient", f"{why}: {state.get('error')}"
    if status == "failed":
        return "failed", state.get("error")
    return "transient", f"training processes ended without a record (torchrun exit code {returncode})"


def finish_attempt(state_path: Path, attempt: dict[str, Any], budget: Budget) -> Action:
    """Local mode's end of an attempt, with no SLURM to ask: the stop table's plan from the attempts
    alone, recorded."""
    plan = decide(None, with_attempt(read_state(state_path), attempt), budget)
    record_attempt(state_path, attempt, plan)
    return plan.action


def record_attempt(state_path: Path, attempt: dict[str, Any], plan: Plan) -> None:
    """Append `attempt` to state.json with the plan's outcome and reason, and record what follows."""
    state = read_state(state_path)
    attempts = with_attempt(state, {**attempt, "outcome": plan.outcome, "reason": plan.why})
    fields: dict[str, Any] = {
        "attempts": attempts,
        "current_attempt": None,
        "requeues": state.get("requeues", 0) + (plan.action == "requeue"),
    }
    if plan.action == "fail" and plan.error is not None:  # we give up, though training did not fail
        fields.update(status="failed", error=plan.error)
    elif plan.action == "end":
        fields.update(status=plan.outcome)
    elif plan.action == "requeue" and plan.outcome == "transient":
        fields.update(status="preempted", error=None)  # waiting for the requeue, as after a stop signal
    update_state(state_path, **fields)


def close_unrecorded_attempt(state_path: Path, slurm_state: str) -> bool:
    """Record the attempt in progress as ended when SLURM says its job has ended for good (lower-case
    state), though its job task never recorded it (killed first, as after a cancel whose trainers took
    longer than KillWait to stop). True if there was such an attempt."""
    state = read_state(state_path)
    current = state.get("current_attempt")
    if not current:
        return False
    reason = f"the job ended {slurm_state.upper()} before its job task could record the attempt"
    outcome = "cancelled" if slurm_state == "cancelled" else "failed"
    attempt = {
        **current,
        "ended": None,
        "end_step": state.get("step", 0),
        "outcome": outcome,
        "reason": reason,
    }
    error = None if outcome == "cancelled" else reason
    update_state(
        state_path, status=outcome, error=error, attempts=with_attempt(state, attempt), current_attempt=None
    )
    return True


def with_attempt(state: dict[str, Any], attempt: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts of `state` and `attempt`, numbered."""
    attempts = state.get("attempts", [])
    return [*attempts, {"attempt": len(attempts) + 1, **attempt}]
