"""The sweep's dataset indexes, built at submission: one walk of each dataset's tree, on the login node.

Every run of the sweep on the same data (dataset and root) shares one index file in `<sweep dir>/datasets/`
(sogclr/contract/dataindex.py), which its config names (`dataset_index`): no rank of any attempt walks the
tree again. An index is built the first time a sweep is submitted (or run `--local`) and reused by later
submissions, after a cheap look at the data (one listing per class folder, or a stat per shard): data that
changed since (images added would never be trained on, removed ones would fail a run mid-epoch) is refused,
naming what differs; `--reindex` walks the trees again. Data that cannot be a dataset (empty, a class
folder without images, splits with different classes) is refused here, before anything is queued; so are
shards to be staged (`pretrain.stage_dir`) that are larger than the local disk SLURM reports for the
nodes of the run's partition (TmpDisk).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jobs import slurm_client
from launch.manifest import private_directory, private_umask
from launch.spec import Run, SpecError, SweepSpec
from sogclr.contract.dataindex import (
    DatasetError,
    build_index,
    changes_since,
    current_index,
    data_root,
    read_index,
    record_index,
    source_key,
)
from sogclr.contract.shards import read_shard_index

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
        if (change := changes_since(cfg, read_index(path))) is not None:
            raise DatasetError(
                f"{change} (the sweep's index is {path}): submit with --reindex to train on the data as "
                "it is now (runs that have started then need pretrain.accept_data_change: true)"
            )
        return path
    index = build_index(cfg)
    private_directory(sweep_dir)
    with private_umask():
        return record_index(cfg, index, index_dir)


def with_index(run: Run, path: Path) -> Run:
    return dataclasses.replace(run, config=run.config.model_copy(update={"dataset_index": path}))


def check_staging_fits(runs: list[Run]) -> None:
    """SpecError for a run whose shards are to be staged (`pretrain.stage_dir`) but are larger than the
    largest local disk SLURM reports for its partition's nodes (TmpDisk); nothing is said when no node
    reports one (TmpDisk=0, SLURM's default), and the copy then checks the free space itself."""
    for run in runs:
        pcfg = run.config.pretrain
        if pcfg.stage_dir is None:
            continue
        size = read_shard_index(data_root(pcfg)).total_bytes
        disks = [mb for mb in slurm_client.tmp_disks_mb(run.slurm.partition) if mb > 0]
        if disks and size > max(disks) * 2**20:
            where = f"partition {run.slurm.partition}" if run.slurm.partition else "the default partition"
            raise SpecError(
                f"pretrain.stage_dir: the shards of run {run.name} are {size / 2**30:.2f} GiB, more than the "
                f"largest local disk of {where}'s nodes ({max(disks) / 1024:.2f} GiB, TmpDisk in sinfo): "
                "stage them elsewhere or read them in place (pretrain.stage_dir: null)"
            )
