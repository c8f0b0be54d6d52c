"""Shared test set-up: the local SLURM cluster fixture for tests marked `slurm`, and the digits cache."""

from pathlib import Path

import pytest

pytest_plugins = ["testkit.slurm_cluster"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the built-in digits are written once for the whole session."""
    return tmp_path_factory.getbasetemp() / "digits-cache"
