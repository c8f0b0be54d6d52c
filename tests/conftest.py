"""Shared test set-up: the local SLURM cluster fixture for tests marked `slurm`."""

pytest_plugins = ["tests.slurm_cluster"]
