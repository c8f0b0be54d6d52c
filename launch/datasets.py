"""The sweep's dataset indexes, built at submission: one walk of each dataset's tree, on the login node.

Every run of the sweep on the same data (dataset and root) shares one index file in `<sweep dir>/datasets/`
(sogclr/contract/dataindex.py), which its config names (`dataset_index`): no rank of any attempt walks the
tree again. An index is built the first time a sweep is submitted (or run `--local`) and reused by later
submissions; `--reindex` walks the trees again, for data that really changed. Data that cannot be a dataset
(empty, a class folder without images, splits with different classes) is refused here, before anything is
queued.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from launch.manifest import private_directory, private_umask
from launch.spec import Run, SpecError, SweepSpec
from sogclr.contract.dataindex import DatasetError, build_index, current_index, record_index, source_key

DATASETS_DIR = "datasets"


def index_datasets(spec: SweepSpec, runs: list[Run], rebuild: bool = False) -> list[Run]:
    """`runs`, each with `dataset_index` naming its data's index (built now where there is none, or
    for all with `rebuild`); SpecError, one line naming the data and the runs, for data that is no dataset."""
    by_source: dict[str, list[Run]] = {}
    for run in runs:
        by_source.setdefault(source_key(run.config.pretrain), []).append(run)
    indexed = {}
    for same_data in by_source.values():
        try:
            path = index_of(spec.directory, same_data[0], rebuild)
        except DatasetError as error:
            names = ", ".join(run.name for run in same_data)
            raise SpecError(f"pretrain.data_dir: {error} (runs: {names})") from None
        indexed |= {run.name: with_index(run, path) for run in same_data}
    return [indexed[run.name] for run in runs]


def index_of(sweep_dir: Path, run: Run, rebuild: bool) -> Path:
    """The run's index in the sweep directory. A new one is walked first (bad data leave nothing behind),
    then written as privately as the sweep's configs: what its jobs train on is no more writable by
    others than what they run (launch/manifest.py)."""
    cfg, index_dir = run.config.pretrain, sweep_dir / DATASETS_DIR
    if not rebuild and (path := current_index(cfg, index_dir)) is not None:
        return path
    index = build_index(cfg)
    private_directory(sweep_dir)
    with private_umask():
        return record_index(cfg, index, index_dir)


def with_index(run: Run, path: Path) -> Run:
    return dataclasses.replace(run, config=run.config.model_copy(update={"dataset_index": path}))
