"""Checkpoint files, keep policy, fallback from damaged files, RNG round trips, the save policy, and
the state.json record the job layer shares."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sogclr.contract.config import CheckpointConfig
from sogclr.contract.state import read_state, update_state
from sogclr.distributed import DistEnv, StopSignals
from sogclr.losses import GlobalContrastiveLoss
from sogclr.optim import build_optimizer
from sogclr.training.checkpoint import (
    CheckpointManager,
    cuda_states_to_restore,
    load_file,
    rng_state,
    save_atomic,
    set_rng_state,
)
from sogclr.training.loop import Progress, Session

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def saves(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


class Unpicklable:
    def __reduce__(self) -> tuple:
        raise RuntimeError("cannot pickle this")


def test_failed_save_leaves_previous_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"step": torch.tensor(1)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):  # torch.save fails halfway through
        save_atomic({"step": torch.tensor(2), "bad": Unpicklable()}, path)
    assert load_file(path)["step"].item() == 1


def test_keep_policy_keeps_newest_and_last_points_at_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep=2))
    for step in (10, 20, 30):
        manager.save({"step": step}, step)
    assert saves(tmp_path) == ["ckpt-000000020.pt", "ckpt-000000030.pt", "last.pt"]
    assert load_file(tmp_path / "last.pt")["step"] == 30
    manager.mark_final()
    manager.save({"step": 40}, 40)
    assert load_file(tmp_path / "final.pt")["step"] == 30  # final survives rotation


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_last_falls_back_to_previous_with_warning(tmp_path: Path, damage: str) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep=2))
    manager.save({"weights": torch.arange(10_000.0), "step": 1}, 1)
    manager.save({"weights": torch.arange(10_000.0) + 1, "step": 2}, 2)
    last = tmp_path / "last.pt"
    if damage == "truncate":  # a crash mid-write on a non-atomic file system; the linked ckpt-2 goes too
        with open(last, "r+b") as f:
            f.truncate(last.stat().st_size // 2)
        expected = 1
        with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*ckpt-000000002.pt"):
            path, payload = CheckpointManager(tmp_path, CheckpointConfig()).load_latest()
    else:  # last.pt replaced by garbage: ckpt-2 is a separate file and still good, and read first
        last.unlink()
        last.write_bytes(b"\x00not a checkpoint" * 100)
        expected = 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            path, payload = CheckpointManager(tmp_path, CheckpointConfig()).load_latest()
    assert path.name == f"ckpt-{expected:09d}.pt"
    assert payload["step"] == expected
    assert torch.equal(payload["weights"], torch.arange(10_000.0) + expected - 1)


def test_resume_is_from_the_newest_step_even_when_last_names_an_older_one(tmp_path: Path) -> None:
    """A save killed between writing its step file and linking last.pt to it (review finding 21)."""
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep=3))
    for step in (1, 2, 3):
        manager.save({"step": step}, step)
    (tmp_path / "last.pt").unlink()
    os.link(tmp_path / "ckpt-000000002.pt", tmp_path / "last.pt")
    path, payload = manager.load_latest()
    assert (path.name, payload["step"]) == ("ckpt-000000003.pt", 3)
    for path in tmp_path.glob("ckpt-*.pt"):  # a directory of another layout: last.pt alone
        path.unlink()
    assert manager.load_latest()[1]["step"] == 2


def test_cuda_rng_states_are_restored_onto_the_gpus_there_are() -> None:
    """Saved on 8 GPUs, resumed on 4 (or on 8 after 4): as many generators as both have (finding 16)."""
    saved = [torch.full((16,), device, dtype=torch.uint8) for device in range(8)]
    assert [(device, int(state[0])) for device, state in cuda_states_to_restore(saved, 4)] == [
        (0, 0), (1, 1), (2, 2), (3, 3)
    ]  # fmt: skip
    assert [device for device, _ in cuda_states_to_restore(saved[:4], 8)] == [0, 1, 2, 3]
    assert cuda_states_to_restore(saved, 0) == []


def test_empty_directory_has_nothing_to_resume(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "none", CheckpointConfig()).load_latest() is None


def test_a_killed_save_leaves_nothing_once_resumed(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig())
    manager.save({"step": 1}, 1)
    leftovers = [tmp_path / ".ckpt-000000002.pt.4242.tmp", tmp_path / ".last.pt.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    assert manager.remove_temporary_files() == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt", "last.pt"]


def draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), random.gauss(0, 1)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and one in Python's
    save_atomic(rng_state(), tmp_path / "rng.pt")
    first = draws()
    set_rng_state(load_file(tmp_path / "rng.pt"))
    second = draws()
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_session_checkpoint_loads_weights_only_and_restores_everything(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    criterion = GlobalContrastiveLoss(num_samples=32)
    optimizer = build_optimizer(model, "lars", lr=0.1, weight_decay=1e-6, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        x = torch.randn(16, 8)
        loss = criterion(model(x), model(x + 0.1 * torch.randn_like(x)), torch.arange(16) + 16 * (step % 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def session(stateful: dict) -> Session:
        manager = CheckpointManager(tmp_path, CheckpointConfig())
        return Session(
            CPU,
            StopSignals(),
            manager,
            tmp_path / "state.json",
            stateful,
            Progress(5),
            10,
            {"a": 1},
            "pretrain",
        )

    stateful = {"model": model, "optimizer": optimizer, "criterion": criterion, "scaler": scaler}
    saver = session(stateful)
    saver.progress.epoch, saver.progress.step_in_epoch = 0, 3
    saver.save()

    fresh = {
        "model": nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)),
        "criterion": GlobalContrastiveLoss(num_samples=32),
        "scaler": torch.amp.GradScaler("cpu", enabled=False),
    }
    fresh["optimizer"] = build_optimizer(fresh["model"], "lars", lr=0.1, weight_decay=1e-6, momentum=0.9)
    progress = session(fresh).resume()  # loads with weights_only=True
    assert (progress.epoch, progress.step_in_epoch, progress.global_step) == (0, 3, 3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh["model"].state_dict()[name]), name
    assert torch.equal(criterion.log_u, fresh["criterion"].log_u)
    assert torch.isfinite(criterion.log_u).sum() == 32
    saved_mu = [s["mu"] for s in optimizer.state_dict()["state"].values()]
    loaded_mu = [s["mu"] for s in fresh["optimizer"].state_dict()["state"].values()]
    assert len(saved_mu) == 6 and all(map(torch.equal, saved_mu, loaded_mu))
    assert read_state(tmp_path / "state.json")["status"] == "running"


def test_save_policy_by_time_and_steps(tmp_path: Path) -> None:
    now = [0.0]
    manager = CheckpointManager(
        tmp_path, CheckpointConfig(every_minutes=2, every_steps=5), clock=lambda: now[0]
    )
    now[0] = 119.0
    assert not manager.time_due()
    now[0] = 120.0
    assert manager.time_due()
    manager.save({}, 7)
    assert not manager.time_due()  # the clock restarts at each save
    assert [step for step in range(1, 16) if manager.step_due(step)] == [5, 10, 15]


def test_update_state_keeps_other_fields_and_validates_status(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert read_state(path) == {}
    update_state(path, attempts=[{"job_id": "7"}], requeues=1)
    state = update_state(path, status="running", step=3)
    assert state["attempts"] == [{"job_id": "7"}] and state["requeues"] == 1 and state["step"] == 3
    assert read_state(path) == state and "updated" in state
    with pytest.raises(ValueError, match="not one of"):
        update_state(path, status="finished")
