"""The sweep's dataset indexes, built at submission: one walk of each dataset's tree, on the login node.

Every run of the sweep on the same data (dataset and root) shares one index file in
`<sweep dir>/datasets/` (sogclr/dataindex.py), which its config names (`dataset_index`): no rank of any
attempt walks the tree again. An index is built the first time a sweep is submitted (or run `--local`)
and reused by later submissions; `--reindex` walks the trees again, for data that really changed. Data
that cannot be a dataset (empty, a class folder without images, splits with different classes) is
refused here, before anything is queued.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from launch.spec import Run, SpecError, SweepSpec
from sogclr.dataindex import DatasetError, ensure_index, source_key

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
            path = ensure_index(same_data[0].config.pretrain, spec.directory / DATASETS_DIR, rebuild)
        except DatasetError as error:
            names = ", ".join(run.name for run in same_data)
            raise SpecError(f"pretrain.data_dir: {error} (runs: {names})") from None
        indexed |= {run.name: with_index(run, path) for run in same_data}
    return [indexed[run.name] for run in runs]


def with_index(run: Run, path: Path) -> Run:
    return dataclasses.replace(run, config=run.config.model_copy(update={"dataset_index": path}))
