"""One single job: `python -m jobs.single RUN_DIR JOB_FIELDS` on every node of the job.

JOB_FIELDS is the JSON of the TrainingJob fields other than the run directory, as for an array task
(jobs/array.py). The sbatch script names everything the job runs, with no pickle to move into place
once sbatch has answered: a job whose sbatch reply was lost, and that the launcher found afterwards by
its submission token, runs like any other. An exception (a failed phase) fails the job.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.code import check_submitted_code
from jobs.slurm import TrainingJob


def main(argv: list[str]) -> None:
    run_dir, fields = argv
    check_submitted_code()
    TrainingJob(run_dir=Path(run_dir), **json.loads(fields))()


if __name__ == "__main__":
    main(sys.argv[1:])
