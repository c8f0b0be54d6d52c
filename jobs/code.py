"""Which code this process runs: a sweep's frozen snapshot (launch/snapshot.py), or the live checkout."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Written into the root of every snapshot, next to the frozen packages.
SNAPSHOT_MARKER = "snapshot.json"
# The digest of the snapshot a job was submitted with, exported by its sbatch script.
SUBMITTED_CODE_ENV = "SOGCLR_SUBMITTED_CODE"


def running_code() -> str:
    """The digest of the snapshot this process imported its code from, or `live`."""
    marker = Path(__file__).resolve().parents[1] / SNAPSHOT_MARKER
    return json.loads(marker.read_text())["digest"] if marker.is_file() else "live"


def check_submitted_code() -> None:
    """Fail the job, saying why, when it does not run the snapshot it was submitted with (something in
    its environment put other code first on PYTHONPATH): every attempt would run code nobody froze."""
    submitted = os.environ.get(SUBMITTED_CODE_ENV)
    if submitted and (running := running_code()) != submitted:
        raise SystemExit(
            f"error: this job was submitted with code snapshot {submitted} but imports {running} "
            f"(from {Path(__file__).resolve().parents[1]}): the job's environment (slurm.setup, the "
            "shell's startup files) puts other code first on PYTHONPATH; not running"
        )
