"""Pretraining end to end on CPU: a run stopped by a real SIGUSR2 mid-epoch and resumed is bit-identical to
a run never stopped (one process, and two gloo ranks under torchrun); state.json and metrics.jsonl tell
the story. Tiny: digits at 16 px, ResNet-18, a 64-wide projector, batch 64 (22 steps per epoch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sogclr.checkpoint import load_file
from sogclr.state import read_state, update_state

STEPS_PER_EPOCH = 22  # 1437 digits training images // batch 64


def tiny_pretrain(data_dir: Path, **overrides: object) -> dict:
    config = {
        "dataset": "digits",
        "data_dir": str(data_dir),
        "image_size": 16,
        "arch": "resnet18",
        "projector_hidden_dim": 64,
        "projector_out_dim": 32,
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.05,
        "warmup_epochs": 0.5,
        "workers": 1,
        "precision": "fp32",
        "log_every_steps": 1,
    }
    return config | overrides


def write_config(run_dir: Path, pretrain: dict, lincls: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"run_dir": str(run_dir), "pretrain": pretrain}
    if lincls is not None:
        config["lincls"] = lincls
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(module: str, config: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, "--config", str(config)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*torchrun, "-m", module, "--config", str(config)]


def _env() -> dict[str, str]:
    # One thread per process: the 2-core test machine is shared, and oversubscription is slower.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start_module(module: str, config: Path, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        _command(module, config, nproc), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_ok(process: subprocess.Popen) -> None:
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-3000:]


def run_module(module: str, config: Path, nproc: int = 1) -> None:
    wait_ok(start_module(module, config, nproc))


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def interrupt_at(config: Path, run_dir: Path, step: int, nproc: int = 1) -> None:
    """Start training, send SIGUSR2 once metrics.jsonl reaches `step`, expect a clean exit.

    With several ranks the signal goes to one worker only: the all-reduce must stop the others too.
    """
    process = subprocess.Popen(
        _command("sogclr.pretrain", config, nproc),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not logged_steps(run_dir) or max(logged_steps(run_dir)) < step:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "training did not reach the step"
        time.sleep(0.05)
    target = process.pid if nproc == 1 else _worker_pids(process.pid)[-1]
    os.kill(target, signal.SIGUSR2)
    wait_ok(process)


def _worker_pids(agent_pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(pid) for pid in children)


def assert_same_training_state(path_a: Path, path_b: Path) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a["global_step"] == b["global_step"]
    for key in ("model", "criterion"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys() and states_a
    for param_id in states_a:
        for name, value in states_a[param_id].items():
            assert torch.equal(value, states_b[param_id][name]), f"optimizer state {param_id}.{name} differs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "digits-cache"


def test_sigusr2_mid_epoch_then_resume_is_bit_identical(tmp_path: Path, data_dir: Path) -> None:
    straight = tmp_path / "straight"
    # Runs concurrently with the interrupted one below (two single-thread processes on two cores).
    uninterrupted = start_module("sogclr.pretrain", write_config(straight, tiny_pretrain(data_dir)))

    resumed = tmp_path / "resumed"
    # Extra step-based saves on this run only: when checkpoints are written must not change numerics.
    config = write_config(resumed, tiny_pretrain(data_dir, checkpoint={"every_steps": 4}))
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
        _command("sogclr.pretrain", config, nproc=2), env=_env(), capture_output=True, text=True
    )
    assert result.returncode != 0
    state = read_state(tmp_path / "state.json")
    assert state["status"] == "failed" and "not divisible by world size 2" in state["error"]
