"""The progress watchdog: a training process that makes no progress for N minutes records why and exits.

A read that blocks for ever (a stalled Lustre OST or NFS server; a named pipe with an image's name blocks
`open` until someone writes to it), a hung decoder, or a rank stuck outside a collective never reaches a
step boundary: no stop signal is acted on, and with one rank nothing else times out, so the job would
hold its allocation to the time limit and end TIMEOUT, not requeued. The watchdog is a thread that keeps
running while the main thread is blocked (a blocking `open` or read releases the GIL); when no progress
was reported for `progress_timeout_minutes`, it kills this process's loader workers (one of them may be
the one blocked), records `failed` with `failure: stalled` in state.json and exits at once; when that
write blocks too (the run directory is on the stalled file system) it exits without it after
`STATE_WRITE_S`, and the job layer reads the lost process as transient all the same. The job layer
reads that record as a transient failure: the job is requeued and resumes from its last checkpoint,
counted against `max_failures`. The other ranks then lose their peer and fail as transient too.

Progress is reported with `progressed()` from every loop that waits on data: training steps, feature
extraction, the epoch-end monitors. Like the stop-signal handlers it is process-wide: one watchdog per
training process, whose loops need no handle to it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from sogclr.contract.state import update_state

EXIT_STALLED = 3
STATE_WRITE_S = 10.0  # the most the stalled record may take to write before the process exits without it
_last_progress = time.monotonic()


def progressed() -> None:
    """Report progress (a step taken, a batch read): the watchdog's clock starts again."""
    global _last_progress
    _last_progress = time.monotonic()


def stalled_for() -> float:
    """Seconds since the last reported progress."""
    return time.monotonic() - _last_progress


class Watchdog:
    """While entered, ends this process (recording why in `state_path`) after `minutes` without progress;
    `minutes=None` watches nothing. Entering counts as progress: start-up has the same allowance."""

    def __init__(self, state_path: Path, minutes: float | None) -> None:
        self.state_path = state_path
        self.limit_s = None if minutes is None else 60.0 * minutes
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        progressed()
        if self.limit_s is not None:
            self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        poll_s = min(5.0, self.limit_s / 10)
        while not self._done.wait(poll_s):
            if stalled_for() >= self.limit_s:
                self._expire()

    def _expire(self) -> None:
        minutes = self.limit_s / 60
        error = (
            f"no progress for {minutes:g} minutes (progress_timeout_minutes): a read, a decoder or a "
            "peer outside a collective is blocked"
        )
        print(f"sogclr watchdog: rank {os.environ.get('RANK', 0)}: {error}; exiting", file=sys.stderr)
        for child in multiprocessing.active_children():  # loader workers: one may be the blocked one
            os.kill(child.pid, signal.SIGKILL)
        # The write below may block on the very file system that stalled: exit after STATE_WRITE_S anyway.
        threading.Timer(STATE_WRITE_S, os._exit, args=(EXIT_STALLED,)).start()
        try:
            update_state(self.state_path, status="failed", failure="stalled", error=f"Stalled: {error}")
        finally:
            os._exit(EXIT_STALLED)
