"""Staging shards to a node-local directory: a verified copy, made once per node by whichever process
takes the lock (two real processes at once), reused when complete, never used when partial or damaged."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import pytest

from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import DatasetError, prepare_data_root
from sogclr.contract.shards import pack_tree, read_shard_index
from sogclr.data import staging
from sogclr.data.staging import StoppedWhileStaging, Watch, expanded_stage_dir, stage_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = prepare_data_root(
        PretrainConfig(dataset="digits", data_dir=tmp_path_factory.getbasetemp() / "digits-cache")
    )
    out = tmp_path_factory.mktemp("staging") / "shards"
    pack_tree(tree, out, "folder", 400_000)
    return out


def recorded() -> tuple[Watch, list[dict]]:
    reports: list[dict] = []
    return Watch(report=reports.append), reports


def test_a_copy_is_verified_then_reused(shards: Path, tmp_path: Path) -> None:
    source = read_shard_index(shards)
    watch, reports = recorded()
    staged = stage_shards(source, tmp_path / "local", watch)
    assert staged.directory.parent == tmp_path / "local" and staged.digest == source.digest
    staged.check_sizes()
    assert reports[-1]["phase"] == "done" and reports[-1]["copied"] == source.total_bytes
    for shard in source.shard_files:
        assert (staged.directory / shard.name).read_bytes() == (shards / shard.name).read_bytes()

    watch, reports = recorded()
    assert stage_shards(source, tmp_path / "local", watch).directory == staged.directory
    assert reports[-1]["copied"] == 0  # complete: reused

    with open(staged.directory / source.shard_files[-1].name, "r+b") as file:  # damaged on the node
        file.truncate(10)
    watch, reports = recorded()
    stage_shards(source, tmp_path / "local", watch).check_sizes()
    assert reports[-1]["copied"] == source.total_bytes


def test_a_stopped_copy_is_never_used_and_the_next_one_finishes_it(shards: Path, tmp_path: Path) -> None:
    source = read_shard_index(shards)
    chunks = []
    stop_after_two_shards = Watch(stop_requested=lambda: len(chunks) > 2, progressed=lambda: chunks.append(1))
    with pytest.raises(StoppedWhileStaging):
        stage_shards(source, tmp_path / "local", stop_after_two_shards)
    assert [p.name for p in (tmp_path / "local").iterdir() if not p.name.endswith(".lock")] == [
        f".{staging.STAGED_PREFIX}{source.digest[:16]}.partial"
    ]
    watch, reports = recorded()
    stage_shards(source, tmp_path / "local", watch).check_sizes()
    assert 0 < reports[-1]["copied"] < source.total_bytes  # the verified shards were kept


def test_a_damaged_source_shard_is_refused_and_not_staged(shards: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    victim = damaged / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(
        DatasetError, match=r"train-000001.tar: its bytes have sha256 .* the shard is damaged"
    ):
        stage_shards(read_shard_index(damaged), tmp_path / "local")
    assert not any(p.name.startswith(staging.STAGED_PREFIX) for p in (tmp_path / "local").iterdir())


def _stage(shards: Path, local: Path, results: multiprocessing.Queue) -> None:
    watch, reports = recorded()
    stage_shards(read_shard_index(shards), local, watch)
    results.put(reports[-1]["copied"])


def test_processes_staging_at_once_copy_once(shards: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_stage, args=(shards, tmp_path / "local", results)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    copied = sorted(results.get() for _ in processes)
    assert copied == [0, 0, read_shard_index(shards).total_bytes]


def test_the_stage_dir_names_an_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOGCLR_TEST_SCRATCH", "/scratch/job")
    assert expanded_stage_dir("$SOGCLR_TEST_SCRATCH/data") == Path("/scratch/job/data")
    monkeypatch.delenv("SOGCLR_TEST_SCRATCH")
    with pytest.raises(
        DatasetError, match=r"pretrain.stage_dir \$SOGCLR_TEST_SCRATCH: a variable in it is not set"
    ):
        expanded_stage_dir("$SOGCLR_TEST_SCRATCH")
