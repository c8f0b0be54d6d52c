"""Counting SLURM calls. The project's own calls count themselves: jobs/slurm_client.py appends
`COMMAND BYTES` to the file SOGCLR_SLURM_CALL_LOG names, in every process that inherits it. Code from
before that client (job_end.py's baseline) is counted by a shim first on PATH for each command, which logs
the same line and then answers as the real command (output and exit status)."""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from pathlib import Path


def install_shims(directory: Path, log: Path, commands: tuple[str, ...]) -> None:
    """`COMMAND` first on PATH for each of `commands`: logs `COMMAND <bytes of its answer>` to `log`."""
    directory.mkdir()
    for command in commands:
        real = shutil.which(command)
        if real is None:
            sys.exit(f"{command} not found: start the local cluster (scripts/local-slurm up) and its env")
        shim = directory / command
        shim.write_text(
            f'#!/bin/bash\nout=$("{real}" "$@")\nstatus=$?\necho "{command} ${{#out}}" >> "{log}"\n'
            '[ -n "$out" ] && printf "%s\\n" "$out"\nexit $status\n'
        )
        shim.chmod(0o755)
    os.environ["PATH"] = f"{directory}:{os.environ['PATH']}"


def logged_calls(log: Path) -> tuple[Counter, int]:
    """The calls logged since `log` was last emptied, per command, and the bytes their answers held."""
    calls = [line.split() for line in log.read_text().splitlines()]
    return Counter(command for command, _ in calls), sum(int(size) for _, size in calls)
