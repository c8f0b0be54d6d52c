"""Job arrays: the runs of a sweep whose jobs have identical resources go to SLURM as one pretraining
array and one evaluation array, evaluation task i waiting for pretraining task i (`aftercorr`).

Every task stays a run of its own: its id `ARRAYJOBID_TASKID` is recorded per run in the manifest, its
logs, state.json and attempts are in its run directory, a requeue requeues that task alone and a failure
cancels its own evaluation task only (jobs/slurm.py).

A task finds its run through `<sweep dir>/arrays/<phase>-<token>/<task index>`, a link to the run
directory written before sbatch. The log paths name that link with `%a`, so SLURM writes each task's
logs into its own run's slurm/ folder, with the names submitit gives array tasks (`%A_%a_%t_log.out`).

We write this array script ourselves instead of using submitit's arrays (`executor.batch()`,
`map_array`): those put every task's pickle and logs in the executor's one folder, not in each run's
directory; they move each task's pickle into place only after sbatch returns (a task that starts first
waits for it); and their range is always `0-{n-1}%{min(n, parallelism)}`. The #SBATCH lines are still
submitit's rendering of the same parameters as a single job's (launch/scripts.py: make_executor).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jobs.slurm_client import controller_setting
from launch.spec import Run

ARRAYS_DIR = "arrays"
# SLURM's own default; the largest task index is one less.
DEFAULT_MAX_ARRAY_SIZE = 1001


def max_array_size() -> int:
    """The controller's MaxArraySize (how many tasks one array may have); 0: arrays are disabled.
    SLURM's default when the controller cannot say."""
    setting = controller_setting("MaxArraySize")
    return int(setting) if setting and setting.isdigit() else DEFAULT_MAX_ARRAY_SIZE


def array_range(tasks: int, max_parallel: int | None, indices: list[int] | None = None) -> str:
    """sbatch's `--array` value: tasks 0 to tasks-1 (or these `indices`), at most `max_parallel` at once."""
    throttle = f"%{max_parallel}" if max_parallel is not None and max_parallel < tasks else ""
    listed = ",".join(map(str, indices)) if indices is not None else f"0-{tasks - 1}"
    return f"{listed}{throttle}"


def link_tasks(sweep_dir: Path, phase: str, runs: list[Run], indices: list[int] | None = None) -> Path:
    """A new folder of links `<index>` -> run directory (with its slurm/ log folder made) for the tasks
    of one array, in the order of `runs` (task indices 0..n-1, or `indices`)."""
    parent = sweep_dir / ARRAYS_DIR
    parent.mkdir(parents=True, exist_ok=True)
    tasks = Path(tempfile.mkdtemp(prefix=f"{phase}-", dir=parent))
    for index, run in zip(indices or range(len(runs)), runs, strict=True):
        run.files.slurm_logs.mkdir(parents=True, exist_ok=True)  # SLURM creates log files, not folders
        os.symlink(run.run_dir, tasks / str(index))
    return tasks
