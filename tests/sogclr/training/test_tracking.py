"""Weights & Biases in offline mode: a run stopped by SIGUSR2, resumed, then linear-evaluated logs into one
W&B run (one id, kept in the run directory; one offline folder per attempt and phase), every record with
its phase's step; a W&B failure only switches W&B off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb.proto.wandb_internal_pb2 import Record

from sogclr.contract.config import RunConfig, WandbConfig
from sogclr.contract.layout import RunLayout
from sogclr.training.tracking import WandbRun
from testkit.runs import interrupt_at, run_module, tiny_pretrain, write_config
from testkit.tiny import STEPS_PER_EPOCH

# W&B's offline files: a 7-byte header, then LevelDB-log records (32 KiB blocks; each fragment has a
# 7-byte header: checksum, length, type) holding serialised `Record` protobufs.
HEADER, BLOCK, FRAGMENT_HEADER, FULL, LAST = 7, 32768, 7, 1, 4


def wandb_records(path: Path) -> list[Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", HEADER
    while offset + FRAGMENT_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < FRAGMENT_HEADER:  # the block's tail is padding
            offset += left_in_block
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        pending += data[offset + FRAGMENT_HEADER : offset + FRAGMENT_HEADER + length]
        offset += FRAGMENT_HEADER + length
        if kind in (FULL, LAST):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def history(records: list[Record]) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]


@pytest.fixture(autouse=True)
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's settings and caches in the test's directory, never the user's."""
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_attempts_and_phases_of_a_run_continue_one_offline_wandb_run(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    config = write_config(
        run_dir,
        tiny_pretrain(data_dir, epochs=1, knn_every_epochs=1, knn_subset=200),
        {"epochs": 1, "batch_size": 64, "mode": "features", "workers": 0},
    )
    with open(config, "a") as f:
        f.write("wandb: {project: test, mode: offline}\n")
    interrupt_at(config, run_dir, step=5)
    run_module("sogclr.pretrain", config)
    run_module("sogclr.lincls", config)

    run_id = RunLayout(run_dir).wandb_id.read_text().strip()
    assert run_id.startswith("run-")
    folders = sorted(RunLayout(run_dir).wandb.glob("offline-run-*"))
    assert len(folders) == 3 and all(folder.name.endswith(f"-{run_id}") for folder in folders)
    attempts = [wandb_records(folder / f"run-{run_id}.wandb") for folder in folders]
    for records in attempts:
        [run] = [r.run for r in records if r.HasField("run")]
        assert run.run_id == run_id and run.project == "test"

    first, resumed, evaluation = (history(records) for records in attempts)
    pretrain_steps = [r["pretrain/step"] for r in first + resumed if "pretrain/loss" in r]
    assert pretrain_steps == list(range(1, STEPS_PER_EPOCH + 1))  # the two attempts, no gap, no repeat
    assert {"pretrain/loss", "pretrain/lr", "pretrain/gamma", "pretrain/images_per_s"} <= resumed[0].keys()
    [knn] = [r for r in resumed if "pretrain/knn_top1" in r]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [logged] = [r for r in metrics if "knn_top1" in r]
    assert knn["pretrain/knn_top1"] == logged["knn_top1"] and knn["pretrain/step"] == STEPS_PER_EPOCH
    assert any("lincls/features/top1" in r for r in evaluation)


def test_a_wandb_failure_switches_wandb_off_with_a_warning(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=tmp_path, pretrain={"dataset": "digits"}, wandb=WandbConfig(project="test"))
    tracker = WandbRun(cfg, "pretrain")
    tracker.log(1, {"loss": 0.5, "mode": "features"})
    tracker.run.finish()  # behind its back, as when W&B's service process is killed
    with pytest.warns(UserWarning, match="W&B could not log"):
        tracker.log(2, {"loss": 0.4})
    assert tracker.run is None
    tracker.log(3, {"loss": 0.3})  # a no-op from now on
    tracker.finish()
    assert RunLayout(tmp_path).wandb_id.read_text().startswith(f"{tmp_path.name}-")
