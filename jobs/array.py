"""One task of a job array: `python -m jobs.array TASKS_DIR JOB_FIELDS` on every node of the task.

The launcher links `TASKS_DIR/<task index>` to each task's run directory before it submits the array
(launch/arrays.py); JOB_FIELDS is the JSON of the TrainingJob fields the array's runs share (everything
but the run directory). The task then runs the same TrainingJob a single job runs; an exception (a
failed phase) fails the task, as it fails a single job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jobs.code import check_submitted_code
from jobs.slurm import TrainingJob


def task_job(tasks_dir: Path, fields: dict, task_index: int) -> TrainingJob:
    """The TrainingJob of task `task_index`: the run directory its link in `tasks_dir` points to."""
    return TrainingJob(run_dir=(tasks_dir / str(task_index)).resolve(), **fields)


def main(argv: list[str]) -> None:
    tasks_dir, fields = argv
    check_submitted_code()
    task_job(Path(tasks_dir), json.loads(fields), int(os.environ["SLURM_ARRAY_TASK_ID"]))()


if __name__ == "__main__":
    main(sys.argv[1:])
