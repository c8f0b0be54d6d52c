"""Pretraining end to end on CPU: a run stopped by a real SIGUSR2 mid-epoch and resumed is bit-identical to
a run never stopped (one process with either augmentation path, and two gloo ranks under torchrun);
state.json and metrics.jsonl tell the story. Tiny: digits at 16 px, ResNet-18, a 64-wide projector,
batch 64 (22 steps per epoch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from jobs.attempt import classify
from sogclr.contract.config import PretrainConfig
from sogclr.contract.state import read_state, update_state
from sogclr.model import build_pretrain_model
from sogclr.pretrain import build_criterion, set_determinism
from sogclr.training.checkpoint import load_file
from testkit.runs import (
    assert_same_training_state,
    child_env,
    command,
    handles,
    interrupt_at,
    logged_steps,
    run_module,
    start_module,
    tiny_pretrain,
    wait_ok,
    write_config,
)
from testkit.tiny import STEPS_PER_EPOCH, write_undecodable_dataset


def test_sigusr2_mid_epoch_then_resume_is_bit_identical(tmp_path: Path, data_dir: Path) -> None:
    straight = tmp_path / "straight"
    # Runs concurrently with the interrupted one below (two single-thread processes on two cores).
    # The whole augmentation in the loader here; test_device_augmentation_... covers the other path.
    pretrain = tiny_pretrain(data_dir, augment_on="loader")
    uninterrupted = start_module("sogclr.pretrain", write_config(straight, pretrain))

    resumed = tmp_path / "resumed"
    # Extra step-based saves on this run only: when checkpoints are written must not change numerics;
    # deterministic algorithms neither (every operation of a step has one on CPU, or this run fails).
    config = write_config(resumed, pretrain | {"checkpoint": {"every_steps": 4}, "deterministic": True})
    update_state(resumed / "state.json", attempts=[{"job_id": "1"}])  # as the job layer would
    interrupt_at(config, resumed, step=5)

    state = read_state(resumed / "state.json")
    assert state["status"] == "preempted" and state["signal"] == "SIGUSR2"
    stopped = load_file(resumed / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 0 and 5 <= stopped["step_in_epoch"] < STEPS_PER_EPOCH
    assert state["step"] == stopped["global_step"]
    assert not (resumed / "checkpoints" / "final.pt").exists()

    run_module("sogclr.pretrain", config)
    state = read_state(resumed / "state.json")
    assert state["status"] == "done" and state["step"] == state["total_steps"] == 2 * STEPS_PER_EPOCH
    assert state["attempts"] == [{"job_id": "1"}]
    wait_ok(uninterrupted)
    assert_same_training_state(straight / "checkpoints" / "final.pt", resumed / "checkpoints" / "final.pt")

    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "objective", "lr", "gamma", "images_per_s", "u_mean", "u_min", "u_max"} <= records[
        -1
    ].keys()
    assert sorted({r["step"] for r in records}) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert len(sorted((resumed / "checkpoints").glob("ckpt-*.pt"))) == 2  # keep=2 by default


def test_deterministic_turns_on_deterministic_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_determinism(True, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # read when CUDA's cuBLAS starts
    finally:
        torch.use_deterministic_algorithms(False)


# Backward functions of the operations that PyTorch 2.14 lists as failing under deterministic algorithms
# on CUDA (torch.use_deterministic_algorithms' docstring) and that a vision model could meet.
NO_DETERMINISTIC_CUDA_BACKWARD = {
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "AvgPool3DBackward0",
    "FractionalMaxPool2DBackward0", "UpsampleBilinear2DBackward0", "UpsampleBicubic2DBackward0",
    "ReflectionPad2DBackward0", "NllLoss2DBackward0", "GridSampler2DBackward0",
}  # fmt: skip


@pytest.mark.parametrize("loss", ["sogclr", "simclr"])
def test_a_pretraining_step_has_a_deterministic_cuda_backward(loss: str) -> None:
    """What `pretrain.deterministic` relies on, checked on CPU: a ResNet's global pool at output size 1
    is computed as a mean (not adaptive_avg_pool2d, whose CUDA backward would fail)."""
    config = PretrainConfig(arch="resnet18", loss=loss, projector_hidden_dim=32, projector_out_dim=16)
    model, criterion = build_pretrain_model(config), build_criterion(config, num_samples=4)
    views = torch.randn(2, 4, 3, 32, 32)
    loss_value = criterion(model(views[0]), model(views[1]), torch.arange(4))
    names, pending = set(), [loss_value.grad_fn]
    while pending:
        node = pending.pop()
        names.add(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    assert {"ConvolutionBackward0", "MeanBackward1"} <= names
    assert not names & NO_DETERMINISTIC_CUDA_BACKWARD


def test_device_augmentation_stopped_and_resumed_is_bit_identical(tmp_path: Path, data_dir: Path) -> None:
    # Crops from the loader worker, the rest of the augmentation in the training process.
    pretrain = tiny_pretrain(data_dir, epochs=1, augment_on="device")
    straight = tmp_path / "straight"
    uninterrupted = start_module("sogclr.pretrain", write_config(straight, pretrain))

    resumed = tmp_path / "resumed"
    config = write_config(resumed, pretrain)
    interrupt_at(config, resumed, step=5)
    state = read_state(resumed / "state.json")
    assert state["status"] == "preempted" and 5 <= state["step"] < STEPS_PER_EPOCH

    run_module("sogclr.pretrain", config)
    assert read_state(resumed / "state.json")["status"] == "done"
    wait_ok(uninterrupted)
    assert_same_training_state(straight / "checkpoints" / "final.pt", resumed / "checkpoints" / "final.pt")


def test_two_ranks_stop_together_and_resume_bit_identical(tmp_path: Path, data_dir: Path) -> None:
    pretrain = tiny_pretrain(data_dir, epochs=1, workers=0)
    straight = tmp_path / "straight"
    uninterrupted = start_module("sogclr.pretrain", write_config(straight, pretrain), nproc=2)

    resumed = tmp_path / "resumed"
    config = write_config(resumed, pretrain)
    interrupt_at(config, resumed, step=4, nproc=2)
    state = read_state(resumed / "state.json")
    assert state["status"] == "preempted" and 4 <= state["step"] < STEPS_PER_EPOCH
    assert load_file(resumed / "checkpoints" / "last.pt")["world_size"] == 2

    run_module("sogclr.pretrain", config, nproc=2)
    assert read_state(resumed / "state.json")["status"] == "done"
    wait_ok(uninterrupted)
    assert_same_training_state(straight / "checkpoints" / "final.pt", resumed / "checkpoints" / "final.pt")


def test_global_batch_not_divisible_by_world_size_fails_clearly(tmp_path: Path, data_dir: Path) -> None:
    config = write_config(tmp_path, tiny_pretrain(data_dir, batch_size=63))
    result = subprocess.run(
        command("sogclr.pretrain", config, nproc=2), env=child_env(), capture_output=True, text=True
    )
    assert result.returncode != 0
    state = read_state(tmp_path / "state.json")
    assert state["status"] == "failed" and "not divisible by world size 2" in state["error"]


def test_killed_past_its_last_checkpoint_then_resumed_logs_every_step_once(
    tmp_path: Path, data_dir: Path
) -> None:
    """SIGKILL (no stop, no save) with metrics.jsonl ahead of the last checkpoint: the resumed run cuts
    them back to its step, so no step is logged twice (review finding 21)."""
    config = write_config(tmp_path, tiny_pretrain(data_dir, epochs=1, checkpoint={"every_steps": 4}))
    process = start_module("sogclr.pretrain", config)
    while True:  # paused while we look: kill it once its log is ahead of its last checkpoint
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        steps = logged_steps(tmp_path)
        if steps and max(steps) >= 6:
            os.kill(process.pid, signal.SIGSTOP)
            saved = read_state(tmp_path / "state.json").get("step", 0)
            if saved and max(logged_steps(tmp_path)) > saved:
                break
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.01)
    process.kill()
    process.wait()

    run_module("sogclr.pretrain", config)
    assert read_state(tmp_path / "state.json")["status"] == "done"
    assert logged_steps(tmp_path) == list(range(1, STEPS_PER_EPOCH + 1))


def test_a_stop_killed_during_its_save_reads_as_a_stop(tmp_path: Path, data_dir: Path) -> None:
    """A grace time too short for the save: the trainer is killed mid-save. That is a preemption (a
    requeue against max_requeues), not a transient failure (review finding 22). ResNet-50: a save long
    enough to be caught writing."""
    config = write_config(tmp_path, tiny_pretrain(data_dir, epochs=1, arch="resnet50", workers=0))
    process = start_module("sogclr.pretrain", config)
    deadline = time.monotonic() + 300
    while not (logged_steps(tmp_path) and handles(process.pid, signal.SIGUSR2)):
        assert process.poll() is None and time.monotonic() < deadline, "no first step"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGUSR2)
    while not list((tmp_path / "checkpoints").glob(".ckpt-*.tmp")):  # the stop's save has begun
        assert process.poll() is None, "the save was not caught under way"
        time.sleep(0.001)
    process.kill()
    process.wait()
    state = read_state(tmp_path / "state.json")
    assert classify(state, process.returncode) == ("preempted", "signal SIGUSR2")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # the save was indeed cut short


def test_a_crash_inside_a_loader_worker_fails_the_run_and_the_process_exits(tmp_path: Path, data_dir: Path):
    """Files that are no images: the loader worker's exception fails the run, and the process ends (its
    persistent worker ignores SIGTERM; kept alive by the traceback, it held the process at exit for ever)."""
    junk = write_undecodable_dataset(tmp_path / "junk")
    pretrain = tiny_pretrain(data_dir, dataset="folder") | {"data_dir": str(junk)}
    assert pretrain["workers"] > 0
    config = write_config(tmp_path / "run", pretrain)
    result = subprocess.run(
        command("sogclr.pretrain", config, nproc=1), env=child_env(), capture_output=True, timeout=600
    )
    assert result.returncode != 0
    state = read_state(tmp_path / "run" / "state.json")
    assert state["status"] == "failed" and state["error"].startswith("UnreadableImage")
    assert "/junk/" in state["error"] and "UnidentifiedImageError" in state["error"]  # which image, and why
