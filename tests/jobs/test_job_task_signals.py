"""The job task's stop signals (jobs/slurm.py's `StopNote`): noted while it works, ignored once it is
done, so that SLURM's warning or a cancel in the moment its Python exits cannot kill a finished job's
step (Python's exit gives each signal with a Python handler its default action back: USR2 and TERM kill).
"""

from __future__ import annotations

import subprocess
import sys

JOB_TASK = """
import os, signal, subprocess, sys
from jobs.slurm import StopNote

with StopNote.installed() as stop:
    os.kill(os.getpid(), signal.SIGUSR2)  # while it works: noted
print(f"noted {stop.reason()}", flush=True)
# Once it is done, USR2 and TERM without pause until it has ended: some land while its Python exits
# (measured: 10 of 10 processes whose handlers stayed to the end died of USR2 so).
# (The loop writes nowhere: our output's end tells the test that this process has ended.)
loop = f"while kill -USR2 {os.getpid()} && kill -TERM {os.getpid()}; do :; done"
subprocess.Popen(["sh", "-c", loop], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""


def test_a_stop_signal_while_the_job_task_exits_does_not_kill_it():
    result = subprocess.run([sys.executable, "-c", JOB_TASK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "noted signal SIGUSR2" in result.stdout
