"""A sweep's record of its SLURM jobs (`<sweep dir>/manifest.json`), its lock, and where each run stands.

The manifest maps run -> phase -> the submissions so far (job id, time), the last one current. Where a run
stands is read from SLURM first (squeue, then sacct) and from the run directory when SLURM has forgotten
the job. Submission, status and cancel all use this one view.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.attempt import PHASES, close_unrecorded_attempt
from launch.spec import Run
from sogclr.state import read_state, write_json_atomic

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".submit.lock"
# SLURM states of a job that is still queued or may run again (a preempted job with --requeue returns).
ACTIVE = frozenset(
    "pending running requeued requeue_hold requeue_fed configuring completing suspended resizing "
    "signaling stage_out preempted".split()
)
NOT_SUBMITTED = "not submitted"


@contextmanager
def sweep_lock(directory: Path) -> Iterator[None]:
    """Hold the sweep's lock: two submissions of one sweep run one after the other, never interleaved."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_state(directory / MANIFEST_FILE) or {"runs": {}}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(directory / MANIFEST_FILE, manifest)


def record_job(manifest: dict[str, Any], run: str, phase: str, job_id: str, submitted: str) -> None:
    manifest["runs"].setdefault(run, {}).setdefault(phase, []).append(
        {"job_id": job_id, "submitted": submitted}
    )


def current_job(manifest: dict[str, Any], run: str, phase: str) -> str | None:
    submissions = manifest["runs"].get(run, {}).get(phase, [])
    return submissions[-1]["job_id"] if submissions else None


# --- SLURM's view -----------------------------------------------------------------------------------


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> lower-case SLURM state, from squeue, then sacct; ids SLURM has forgotten are absent."""
    states = _query(["squeue", "-h", "-o", "%i|%T", "-j"], job_ids)
    forgotten = [job_id for job_id in job_ids if job_id not in states]
    return states | _query(["sacct", "-n", "-X", "-P", "-o", "JobIDRaw,State", "-j"], forgotten)


def _query(command: list[str], job_ids: list[str]) -> dict[str, str]:
    if not job_ids:
        return {}
    # squeue fails when none of the ids is known any more: that answer is "nothing".
    result = subprocess.run([*command, ",".join(job_ids)], capture_output=True, text=True)
    states = {}
    for line in result.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in job_ids and state:
            states[job_id] = state.split()[0].lower()  # "CANCELLED by 0" -> "cancelled"
    return states


# --- where a run stands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseStanding:
    job_id: str | None
    state: str  # done | not submitted | a SLURM state | the run directory's status
    from_slurm: bool = False

    @property
    def active(self) -> bool:
        """Queued or running (a run directory that says `running` without a job is not)."""
        return self.from_slurm and self.state in ACTIVE


def phase_done(run: Run, phase: str) -> bool:
    if phase == "lincls":
        return (run.run_dir / "lincls" / "result.json").is_file()
    return read_state(PHASES[phase].state_path(run.run_dir)).get("status") == "done"


def phase_standing(run: Run, phase: str, manifest: dict[str, Any], states: dict[str, str]) -> PhaseStanding:
    job_id = current_job(manifest, run.name, phase)
    if phase_done(run, phase):
        return PhaseStanding(job_id, "done")
    if job_id is None:
        return PhaseStanding(None, NOT_SUBMITTED)
    if job_id in states:
        return PhaseStanding(job_id, states[job_id], from_slurm=True)
    status = read_state(PHASES[phase].state_path(run.run_dir)).get("status", "unknown")
    return PhaseStanding(job_id, f"{status} (run dir)")


def standings(runs: list[Run], manifest: dict[str, Any]) -> dict[str, dict[str, PhaseStanding]]:
    """run -> phase -> standing, with one squeue and at most one sacct call for the whole sweep.

    A job that SLURM has ended for good while its run directory still shows an attempt in progress gets
    that attempt closed (`close_unrecorded_attempt`), so the run directory agrees with SLURM.
    """
    job_ids = [
        job_id for run in runs for phase in PHASES if (job_id := current_job(manifest, run.name, phase))
    ]
    states = slurm_states(job_ids)
    for run in runs:
        for phase in PHASES:
            state = states.get(current_job(manifest, run.name, phase) or "")
            if state is not None and state not in ACTIVE and state != "completed":
                close_unrecorded_attempt(PHASES[phase].state_path(run.run_dir), state)
    return {
        run.name: {phase: phase_standing(run, phase, manifest, states) for phase in PHASES} for run in runs
    }
