"""Shared test set-up: one OpenMP thread, the local SLURM cluster fixture for tests marked `slurm`, and
the digits cache."""

import os
from pathlib import Path

import pytest

# One OpenMP thread in every test process and in every job it submits (sbatch passes the environment
# on, and jobs/torchrun.py keeps a user's OMP_NUM_THREADS): two xdist workers share two cores with a local
# cluster that declares four CPUs, and torch's spinning threads then starve each other. Measured on the
# 2-core machine, two width-8 trainers side by side: 621 views/s each at two threads, 2,664 at one
# (`python benchmarks/width.py --widths 8 --views 128 --threads 2`, two at once); a preempted array task
# waited out pytest's 900 s that way in CI. Set before torch is imported; a user's own setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["testkit.slurm_cluster"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the built-in digits are written once for the whole session."""
    return tmp_path_factory.getbasetemp() / "digits-cache"
