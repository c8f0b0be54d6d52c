"""The outcome record of a training process, `state.json`, shared with the job layer.

Exit codes do not survive torchrun reliably, so this file is the truth about a run: `status` is one of
running | preempted | done | failed | pruned (the trainer's; pruned: stopped at a rung of the sweep's
successive halving, sogclr/training/prune.py) or cancelled (the job layer's, when SLURM ends the job),
`step` is the global step of the last saved checkpoint. The job layer appends to `attempts`, counts
`requeues` and marks the attempt in progress (`current_attempt`); the trainer only updates its own fields
and keeps the rest. Rank 0 writes, and any rank that fails records its error.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sogclr.contract.atomic import write_atomic

STATUSES = ("running", "preempted", "done", "failed", "pruned", "cancelled")
CORRUPT = "corrupt"  # what `read_state` says of a file it cannot read as a record


def now() -> str:
    """The current UTC time as the run records write it (ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_state(path: str | Path) -> dict[str, Any]:
    """The record at `path`, or {} when there is none yet. A file that is not a JSON object (damaged
    outside this code: a full disk, a partial copy) reads as status `corrupt` with the reason as its
    error, so every command can still report the run instead of crashing on it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(text)
    except ValueError as error:
        return {"status": CORRUPT, "error": f"{path} is not valid JSON: {error}"}
    if not isinstance(record, dict):
        return {"status": CORRUPT, "error": f"{path} holds a {type(record).__name__}, not a record"}
    return record


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as JSON so that a reader sees either the old file or the new one, never half of one."""
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def update_state(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Read-modify-write: set `fields` (and `updated`), keep every other key; returns the new record."""
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"status {fields['status']!r} is not one of {STATUSES}")
    state = read_state(path)
    if state.get("status") == CORRUPT:  # keep the damaged file for a look, and start a fresh record
        os.replace(path, Path(path).with_name(f"{Path(path).name}.corrupt"))
        state = {}
    state.setdefault("attempts", [])
    state.setdefault("requeues", 0)
    state.update(fields, updated=now())
    write_json_atomic(path, state)
    return state
