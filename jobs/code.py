"""Which code this process runs: a sweep's frozen snapshot (launch/snapshot.py), or the live checkout."""

from __future__ import annotations

import json
from pathlib import Path

# Written into the root of every snapshot, next to the frozen packages.
SNAPSHOT_MARKER = "snapshot.json"


def running_code() -> str:
    """The digest of the snapshot this process imported its code from, or `live`."""
    marker = Path(__file__).resolve().parents[1] / SNAPSHOT_MARKER
    return json.loads(marker.read_text())["digest"] if marker.is_file() else "live"
