"""The torch-free contract between the login node, the jobs and the trainers: everything `launch/` and
`jobs/` may import from sogclr. Nothing in this folder imports torch (tests/launch/test_login_side.py
imports the login side with torch made unimportable).

    config     the one schema of a run (pydantic): recipe fields, resources, `--set` overrides
    layout     where a run keeps its config, state, checkpoints, metrics and logs
    state      state.json records, read and updated atomically
    atomic     write to a temporary file, fsync, rename
    dataindex  the dataset index: one walk of a tree, read by every rank
    rungs      successive halving's rule and its per-rung records
    cli        `--config FILE [--set key=value ...]` for the entry points
"""

from sogclr.contract.atomic import write_atomic
from sogclr.contract.config import LinclsConfig, PretrainConfig, RunConfig, load_run_config
from sogclr.contract.dataindex import DatasetError, DatasetIndex, read_index
from sogclr.contract.layout import RunLayout
from sogclr.contract.rungs import RungRecords
from sogclr.contract.state import read_state, update_state

__all__ = [
    "DatasetError",
    "DatasetIndex",
    "LinclsConfig",
    "PretrainConfig",
    "RunConfig",
    "RunLayout",
    "RungRecords",
    "load_run_config",
    "read_index",
    "read_state",
    "update_state",
    "write_atomic",
]
