"""The dataset index (built once, read by everyone), its fingerprint at resume, and the launcher's part:
real image trees on disk, real checkpoints, the real entry point."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from launch import cli
from launch.datasets import index_datasets
from launch.spec import SpecError, expand, load_spec
from sogclr.contract.config import CheckpointConfig, PretrainConfig
from sogclr.contract.dataindex import (
    SOURCES,
    DatasetError,
    build_index,
    ensure_index,
    index_split,
    prepare_data_root,
    read_index,
    write_index,
)
from sogclr.distributed import StopSignals
from sogclr.losses import GlobalContrastiveLoss
from sogclr.training.checkpoint import FINAL, CheckpointManager, load_file
from sogclr.training.datacheck import DataChanged, TrainingData
from sogclr.training.loop import Progress, Session
from testkit.runs import SINGLE_PROCESS, child_env, tiny_pretrain, write_config
from testkit.tiny import write_tiny_spec


def image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), color=(shade, 40, 90)).save(path)


def tree(root: Path, files: dict[str, list[str]]) -> Path:
    """`root/{train,val}/<class>/<file>` for each class's files (the same in both splits)."""
    for split in ("train", "val"):
        for name, names in files.items():
            for number, file in enumerate(names):
                image(root / split / name / file, shade=number)
    return root


def folder_config(root: Path) -> PretrainConfig:
    return PretrainConfig(dataset="folder", data_dir=root)


SIX = {"a": ["0.png", "1.png", "2.png"], "b": ["0.png", "1.png", "2.png"]}


# --------------------------------------------------------------------------------------------- the index


def test_index_lists_exactly_what_image_folder_lists(tmp_path: Path) -> None:
    root = tree(tmp_path / "data", {"a": ["x.png", "sub/y.png", "Z.JPG"], "a-b": ["q.png"], "c": ["1.png"]})
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    split = index_split(root / "train")
    assert split.samples(root / "train") == ImageFolder(root / "train").samples
    assert split.classes == ImageFolder(root / "train").classes == ["a", "a-b", "c"]
    assert list(split.relative_paths())[:3] == ["a/Z.JPG", "a/x.png", "a/sub/y.png"]


def test_fingerprint_names_the_files_not_where_they_are(tmp_path: Path) -> None:
    first = build_index(folder_config(tree(tmp_path / "one", SIX)))
    moved = build_index(folder_config(shutil.copytree(tmp_path / "one", tmp_path / "two")))
    assert moved.fingerprint == first.fingerprint and moved.file_name == first.file_name
    (tmp_path / "two" / "train" / "b" / "1.png").rename(tmp_path / "two" / "train" / "b" / "9.png")
    renamed = build_index(folder_config(tmp_path / "two"))
    assert renamed.splits["train"].count == first.splits["train"].count == 6
    assert renamed.splits["train"].sha256 != first.splits["train"].sha256
    assert renamed.splits["val"].identity == first.splits["val"].identity
    assert renamed.fingerprint != first.fingerprint


def test_index_file_reads_back_and_damage_is_reported(tmp_path: Path) -> None:
    index = build_index(folder_config(tree(tmp_path / "data", SIX)))
    path = write_index(index, tmp_path / "indexes")
    assert path.name == f"folder-{index.fingerprint[:16]}.json"
    assert read_index(path) == index
    path.write_text(path.read_text().replace('"2.png"', '"3.png"', 1))
    with pytest.raises(DatasetError, match="damaged"):
        read_index(path)
    path.write_text(path.read_text()[:50])
    with pytest.raises(DatasetError, match="unreadable"):
        read_index(path)


def test_an_index_is_built_once_until_rebuilt(tmp_path: Path) -> None:
    cfg, directory = folder_config(tree(tmp_path / "data", SIX)), tmp_path / "indexes"
    first = ensure_index(cfg, directory)
    image(tmp_path / "data" / "train" / "a" / "3.png")  # the tree changes: the index stays until rebuilt
    assert ensure_index(cfg, directory) == first and read_index(first).splits["train"].count == 6
    rebuilt = ensure_index(cfg, directory, rebuild=True)
    assert rebuilt != first and first.is_file() and read_index(rebuilt).splits["train"].count == 7
    assert json.loads((directory / SOURCES).read_text()) == {f"folder {tmp_path / 'data'}": rebuilt.name}


def class_folder_without_images(root: Path) -> None:
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "notes.txt").write_text("not an image")


BAD_DATA = {
    "no class folder": (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    "a class without images": (class_folder_without_images, "train/b holds no image"),
    "val lacks a class": (lambda root: shutil.rmtree(root / "val" / "b"), "val lacks class b"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_submission_refuses_data_that_is_no_dataset(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    if case != "no class folder":
        tree(root, {"a": ["0.png"]} if case == "a class without images" else SIX)
    else:
        (root / "val").mkdir(parents=True)
    spoil, expected = BAD_DATA[case]
    spoil(root)
    spec = write_tiny_spec(tmp_path, "bad", pretrain={"dataset": "folder", "data_dir": str(root)})
    assert cli.main([str(spec), "--local"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: pretrain.data_dir: ") and expected in line and "(runs: bad)" in line
    assert not (tmp_path / "runs").exists()  # nothing written, nothing run


def test_a_sweep_shares_one_index_per_dataset(tmp_path: Path) -> None:
    tree(tmp_path / "data", SIX)
    sweep = {"product": {"gamma": [0.5, 0.9]}}
    path = write_tiny_spec(
        tmp_path, "pair", pretrain={"dataset": "folder", "data_dir": str(tmp_path / "data")}, sweep=sweep
    )
    spec = load_spec(path)
    umask = os.umask(0o002)  # a group-writable default: the sweep's files must not follow it
    try:
        runs = index_datasets(spec, expand(spec))
    finally:
        os.umask(umask)
    (index,) = {run.config.dataset_index for run in runs}
    assert index.parent == spec.directory / "datasets" and read_index(index).splits["train"].count == 6
    for written in (spec.directory, index.parent, index, index.parent / SOURCES):
        assert written.stat().st_mode & 0o022 == 0, written  # no more writable by others than the configs
    assert {run.config.dataset_index for run in index_datasets(spec, expand(spec))} == {index}
    image(tmp_path / "data" / "train" / "a" / "3.png")  # an image added later is seen, and named
    with pytest.raises(SpecError, match=r"data/train/a holds \d+ images, the index \d+ .*--reindex"):
        index_datasets(spec, expand(spec))
    (rebuilt,) = {run.config.dataset_index for run in index_datasets(spec, expand(spec), rebuild=True)}
    assert rebuilt != index and read_index(rebuilt).splits["train"].count == 7


# ------------------------------------------------------------------------------------- the data at resume


def session(directory: Path, data: TrainingData, log_u: torch.Tensor | None = None) -> Session:
    """A pretraining session's checkpointing part with a real estimator of `data.split.count` images."""
    criterion = GlobalContrastiveLoss(data.split.count)
    if log_u is not None:
        criterion.log_u.copy_(log_u)
    checkpoints = CheckpointManager(directory / "checkpoints", CheckpointConfig())
    return Session(
        SINGLE_PROCESS,
        StopSignals(),
        checkpoints,
        directory / "state.json",
        {"criterion": criterion},
        Progress(steps_per_epoch=3, epoch=1, step_in_epoch=2),
        total_steps=30,
        config={},
        phase="pretrain",
        data=data,
    )


def training_data(root: Path, indexes: Path, accept: bool = False) -> TrainingData:
    path = ensure_index(folder_config(root), indexes, rebuild=True)
    return TrainingData(path, read_index(path).splits["train"], accept, ("criterion", "log_u"))


def test_resume_on_other_data_fails_naming_the_change_unless_accepted(tmp_path: Path) -> None:
    root, indexes = tree(tmp_path / "data", SIX), tmp_path / "indexes"
    saved = session(tmp_path, training_data(root, indexes), log_u=torch.arange(6.0))
    saved.save()

    # moved, same files: resumes as it is
    moved = shutil.copytree(root, tmp_path / "moved")
    assert session(tmp_path, training_data(moved, indexes)).resume().global_step == 5

    # one image replaced by another, the count unchanged
    (root / "train" / "a" / "1.png").unlink()
    image(root / "train" / "b" / "5.png")
    with pytest.raises(DataChanged) as refused:
        session(tmp_path, training_data(root, indexes)).resume()
    message = str(refused.value)
    assert "6 images in the checkpoint's, 6 now" in message
    assert "first differing path (index 1): a/1.png in the checkpoint's, a/2.png now" in message
    assert "pretrain.accept_data_change=true" in message

    # accepted: u follows its images by path, the new one starts unseen
    resumed = session(tmp_path, training_data(root, indexes, accept=True))
    assert resumed.resume().global_step == 5
    # old order a/0 a/1 a/2 b/0 b/1 b/2; new a/0 a/2 b/0 b/1 b/2 b/5
    expected = torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, -torch.inf])
    assert torch.equal(resumed.stateful["criterion"].log_u, expected)


def test_the_same_paths_with_other_bytes_are_refused_where_both_sides_know_the_bytes(tmp_path: Path) -> None:
    """Shards record the images' content: a tree and its shards are the same data, but re-packed
    re-encoded images under the same names are not."""
    root, indexes = tree(tmp_path / "data", SIX), tmp_path / "indexes"
    from_shards = dataclasses.replace(training_data(root, indexes), content="a" * 64)
    session(tmp_path, from_shards).save()
    assert session(tmp_path, training_data(root, indexes)).resume().global_step == 5  # the tree
    assert session(tmp_path, from_shards).resume().global_step == 5
    reencoded = dataclasses.replace(from_shards, content="b" * 64)
    with pytest.raises(DataChanged, match=r"the same 6 paths, but other image bytes \(content sha256 a{16}"):
        session(tmp_path, reencoded).resume()


def test_a_shorter_epoch_continues_with_the_next_and_a_lost_index_is_said(tmp_path: Path) -> None:
    root, indexes = tree(tmp_path / "data", SIX), tmp_path / "indexes"
    saved = session(tmp_path, training_data(root, indexes))
    saved.save()
    (root / "train" / "a" / "2.png").unlink()
    data = training_data(root, indexes, accept=True)
    resumed = session(tmp_path, data)
    resumed.progress.steps_per_epoch = 2  # five images now: as if an epoch were two steps
    assert (resumed.resume().epoch, resumed.progress.step_in_epoch) == (2, 0)

    shutil.rmtree(indexes)  # the checkpoint's index is gone: the counts alone are named
    with pytest.raises(DataChanged, match=r"6 images in the checkpoint's, 5 now; its index .* is gone"):
        session(tmp_path, training_data(root, indexes)).resume()


def test_pretraining_builds_its_own_index_once_and_refuses_changed_data(
    tmp_path: Path, data_dir: Path
) -> None:
    """`python -m sogclr.pretrain` without the launcher: rank 0 indexes the tree into the run directory,
    checkpoints record the training split, and a run on other data stops at its start."""
    digits = prepare_data_root(PretrainConfig(dataset="digits", data_dir=data_dir))
    root = tmp_path / "data"
    for split, count in (("train", 40), ("val", 5)):
        for digit in ("0", "1"):
            for png in sorted((digits / split / digit).glob("*.png"))[:count]:
                image_path = root / split / digit / png.name
                image_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(png, image_path)
    run_dir = tmp_path / "run"
    config = write_config(
        run_dir, {**tiny_pretrain(data_dir), "dataset": "folder", "data_dir": str(root), "epochs": 1}
    )
    command = [sys.executable, "-m", "sogclr.pretrain", "--config", str(config)]
    subprocess.run(command, env=child_env(), check=True, capture_output=True)
    (index,) = (run_dir / "datasets").glob("folder-*.json")
    recorded = load_file(run_dir / "checkpoints" / FINAL)["data"]
    assert recorded == {**read_index(index).splits["train"].identity, "index": str(index)}
    assert recorded["count"] == 80

    replaced = root / "train" / "1" / sorted(p.name for p in (root / "train" / "1").iterdir())[0]
    replaced.rename(replaced.with_name("9999.png"))
    (run_dir / "datasets" / SOURCES).unlink()  # rebuild: the data really changed
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True)
    assert result.returncode != 0
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and state["failure"] == "exception"
    assert re.search(
        r"80 images in the checkpoint's, 80 now; first differing path \(index 40\): 1/", state["error"]
    )
